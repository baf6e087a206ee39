"""Site registry entries for the decoder LLM families released today (see docs/architectures.md).

Each entry says where its pairs are and, in its comment, which sites it cannot have and why:

* **Qwen3** (``qwen3``): Llama layout plus per-head ``q_norm``/``k_norm`` (RMSNorm over the head dim after
  the projection). Those norms divide out any scaling of q/k rows, so ``attn.qk`` on the projections is not
  exact; instead it scales the *norm weights'* rotary pairs ``(i, i + d/2)``: ``alpha`` on ``q_norm``,
  ``1/alpha`` on ``k_norm``. The weight is shared by every head, so there is one ``attn.qk`` pair per layer.
* **Gemma / Gemma 2 / Gemma 3 text** (``gemma``, ``gemma2``, ``gemma3_text``): RMSNorm computes
  ``x_hat * (1 + w)``, so the ``norm`` fold scales ``1 + w`` (stored ``w' = alpha (1 + w) - 1``). That is exact
  to float32 rounding, but has no exact bfloat16/float16 value: in those dtypes the offset pairs are skipped
  with the reason (:func:`hf_specdef.sites.drop_inexact`). Gemma 2/3 have sandwich norms: the
  ``post_attention_layernorm`` / ``post_feedforward_layernorm`` outputs go into the residual (no site); the
  pre-norms are ``input_layernorm`` (q, k, v) and ``pre_feedforward_layernorm`` (gate, up). GeGLU
  ``gelu(gate) * up``: ``mlp`` on up rows / down columns. Gemma 3 has ``q_norm``/``k_norm`` as Qwen3 (with the
  offset); Gemma 2's attention-logit soft-capping acts on the scores, which ``attn.qk`` leaves unchanged.
  Multimodal Gemma 3 (``gemma3``) is not registered (its vision tower's layers would match the block pattern).
* **Phi-3** (``phi3``): fused ``qkv_proj`` (q | k | v rows, GQA) and fused ``gate_up_proj`` (``gate, up =
  chunk(2)``: the *second* half is the linear one). Partial rotary (``partial_rotary_factor``, Phi-4-mini)
  is honoured: ``attn.qk`` scales rotary pairs of the rotated dims only.
* **GPT-NeoX** (``gpt_neox``: Pythia, ...): fused ``query_key_value`` interleaved per head (``[q_h, k_h, v_h]``)
  with biases; partial rotary (``rotary_pct``, 0.25 by default: ``attn.qk`` on the rotary pairs of the rotated
  quarter); LayerNorm with bias (the bias channel moves with the weight); parallel or sequential residual, both
  pre-LN: ``input_layernorm`` -> ``query_key_value``, ``post_attention_layernorm`` -> ``dense_h_to_4h``. The
  GELU MLP has no ``mlp`` site.
* **OPT** (``opt``): q/k/v/out projections with biases, no rotary (dense per-head ``attn.qk``); ReLU MLP: a
  positive diagonal commutes with ReLU, so ``fc1`` rows (and bias) / ``fc2`` columns are an exact ``mlp`` site
  (only for ``activation_function="relu"``). Pre-LN (``do_layer_norm_before``, most OPT sizes):
  ``self_attn_layer_norm`` -> q, k, v and ``final_layer_norm`` -> ``fc1``. The post-LN variant (OPT-350m) has
  no ``norm`` site: its norm outputs are also the residual.
"""

from __future__ import annotations

from typing import Any

from hf_specdef.sites.config_checks import cfg_get, llama_heads, mha_heads
from hf_specdef.sites.registry import LLAMA, ArchSpec, Attention, GatedMLP, Linear, PreNorm, register_architecture

_L = Linear
_Q, _K, _V, _O = (_L(f"self_attn.{p}_proj") for p in "qkvo")

QWEN3 = ArchSpec(
    name="qwen3",
    model_types=("qwen3",),
    block=LLAMA.block,
    attention=(Attention(_Q, _K, _V, _O, heads=llama_heads, rotary=True,
                         qk_norms=("self_attn.q_norm", "self_attn.k_norm")),),
    mlp=LLAMA.mlp,
    norms=LLAMA.norms,
)

_QKV_READERS = (_Q, _K, _V)
_GATE_UP = (_L("mlp.gate_proj"), _L("mlp.up_proj"))
GEMMA = ArchSpec(
    name="gemma",
    model_types=("gemma",),
    block=LLAMA.block,
    attention=(Attention(_Q, _K, _V, _O, heads=llama_heads, rotary=True),),
    mlp=LLAMA.mlp,
    norms=(PreNorm("input_layernorm", _QKV_READERS, offset=1.0),
           PreNorm("post_attention_layernorm", _GATE_UP, offset=1.0)),
)
_SANDWICH = (PreNorm("input_layernorm", _QKV_READERS, offset=1.0),
             PreNorm("pre_feedforward_layernorm", _GATE_UP, offset=1.0))
GEMMA2 = ArchSpec(name="gemma2", model_types=("gemma2",), block=LLAMA.block, attention=GEMMA.attention,
                  mlp=LLAMA.mlp, norms=_SANDWICH)
GEMMA3_TEXT = ArchSpec(
    name="gemma3_text",
    model_types=("gemma3_text",),
    block=LLAMA.block,
    attention=(Attention(_Q, _K, _V, _O, heads=llama_heads, rotary=True,
                         qk_norms=("self_attn.q_norm", "self_attn.k_norm"), norm_offset=1.0),),
    mlp=LLAMA.mlp,
    norms=_SANDWICH,
)

_QKV = _L("self_attn.qkv_proj")
PHI3 = ArchSpec(
    name="phi3",
    model_types=("phi3",),
    block=LLAMA.block,
    attention=(Attention(_QKV, _QKV, _QKV, _O, heads=llama_heads, rotary=True, fused=True),),
    mlp=(GatedMLP(_L("mlp.gate_up_proj"), _L("mlp.down_proj"), up_half=1),),
    norms=(PreNorm("input_layernorm", (_QKV,)), PreNorm("post_attention_layernorm", (_L("mlp.gate_up_proj"),))),
)

_NEOX_QKV = _L("attention.query_key_value")
GPT_NEOX = ArchSpec(
    name="gpt_neox",
    model_types=("gpt_neox",),
    block=LLAMA.block,
    attention=(Attention(_NEOX_QKV, _NEOX_QKV, _NEOX_QKV, _L("attention.dense"),
                         heads=mha_heads("num_attention_heads", "hidden_size"), rotary=True, interleaved=True),),
    norms=(PreNorm("input_layernorm", (_NEOX_QKV,)), PreNorm("post_attention_layernorm", (_L("mlp.dense_h_to_4h"),))),
)

def _opt_pre_ln(config: Any) -> bool:
    return bool(cfg_get(config, "do_layer_norm_before", default=True))


def _relu(config: Any) -> bool:
    return cfg_get(config, "activation_function", default="relu") == "relu"


_OPT_QKV = (_L("self_attn.q_proj"), _L("self_attn.k_proj"), _L("self_attn.v_proj"))
OPT = ArchSpec(
    name="opt",
    model_types=("opt",),
    block=r"^(?P<block>(?:.*\.)?decoder\.layers\.\d+)\.",
    attention=(Attention(*_OPT_QKV, _L("self_attn.out_proj"), heads=mha_heads("num_attention_heads", "hidden_size")),),
    mlp=(GatedMLP(_L("fc1"), _L("fc2"), when=_relu),),
    norms=(PreNorm("self_attn_layer_norm", _OPT_QKV, when=_opt_pre_ln),
           PreNorm("final_layer_norm", (_L("fc1"),), when=_opt_pre_ln)),
)

for _spec in (QWEN3, GEMMA, GEMMA2, GEMMA3_TEXT, PHI3, GPT_NEOX, OPT):
    register_architecture(_spec)
