"""Site registry entries for mixture-of-experts decoders (see docs/architectures.md): Mixtral, Qwen2-MoE, Qwen3-MoE.

transformers 5 holds the experts of a layer as two 3-D parameters, ``mlp.experts.gate_up_proj``
``(experts, 2 x inner, hidden)`` (``gate, up = chunk(2)``: the second half is linear) and
``mlp.experts.down_proj`` ``(experts, hidden, inner)``, but ``save_pretrained`` writes the per-expert layout
the Hub uses (Mixtral: ``block_sparse_moe.experts.E.w1/w3/w2``; Qwen-MoE: ``mlp.experts.E.gate_proj/up_proj/
down_proj``). Both layouts are listed (``*`` = every expert) and whichever a model or checkpoint has is used,
so streaming a checkpoint decides exactly what in-memory protection decides.

* ``mlp``: one pair per layer over **every expert**: the same ``top_k`` inner channels of every expert's up
  rows scaled by alpha, of its down columns by 1/alpha (a fused 3-D tensor cannot hold a per-expert choice;
  the channels are ranked by their norm over all experts). Qwen2-MoE's shared expert is a second pair
  (group 1); dense layers (``mlp_only_layers``) get the plain gated-MLP pair.
* ``norm``: ``post_attention_layernorm`` is read by the router (``mlp.gate``), every expert's gate and up
  projections, and in Qwen2-MoE the shared expert and its gate: all of them are compensated. The router's
  logits are unchanged (exactly in bfloat16 with a power-of-two alpha; to float32 rounding otherwise), so
  routing is kept.
* attention as Llama (Mixtral, Qwen2-MoE) or Qwen3 (Qwen3-MoE: ``attn.qk`` on the q/k norm weights).

Not covered: expert biases (``gate_up_proj_bias``, gpt-oss) — such a model is not registered here.
"""

from __future__ import annotations

import re

from hf_specdef.sites.decoders import QWEN3
from hf_specdef.sites.registry import LLAMA, ArchSpec, GatedMLP, Linear, PreNorm, register_architecture

_L = Linear
_FUSED_GATE_UP = Linear("mlp.experts", param="gate_up_proj", experts=True)
_FUSED = GatedMLP(_FUSED_GATE_UP, Linear("mlp.experts", param="down_proj", experts=True), up_half=1)
_INPUT_NORM = LLAMA.norms[0]

MIXTRAL = ArchSpec(
    name="mixtral",
    model_types=("mixtral",),
    block=LLAMA.block,
    attention=LLAMA.attention,
    mlp=(_FUSED, GatedMLP(_L("block_sparse_moe.experts.*.w3"), _L("block_sparse_moe.experts.*.w2"))),
    norms=(_INPUT_NORM, PreNorm("post_attention_layernorm", (
        _L("mlp.gate"), _FUSED_GATE_UP,  # in memory: router, fused experts
        _L("block_sparse_moe.gate"), _L("block_sparse_moe.experts.*.w1"), _L("block_sparse_moe.experts.*.w3")))),
)

_QWEN_MOE_MLP = (
    _FUSED,
    GatedMLP(_L("mlp.experts.*.up_proj"), _L("mlp.experts.*.down_proj")),
    GatedMLP(_L("mlp.up_proj"), _L("mlp.down_proj")),  # dense layers
    GatedMLP(_L("mlp.shared_expert.up_proj"), _L("mlp.shared_expert.down_proj"), group=1),
)
_QWEN_MOE_NORMS = (_INPUT_NORM, PreNorm("post_attention_layernorm", (
    _L("mlp.gate"), _FUSED_GATE_UP, _L("mlp.experts.*.gate_proj"), _L("mlp.experts.*.up_proj"),
    _L("mlp.shared_expert.gate_proj"), _L("mlp.shared_expert.up_proj"), _L("mlp.shared_expert_gate"),
    _L("mlp.gate_proj"), _L("mlp.up_proj"))))

QWEN2_MOE = ArchSpec(name="qwen2_moe", model_types=("qwen2_moe",), block=LLAMA.block, attention=LLAMA.attention,
                     mlp=_QWEN_MOE_MLP, norms=_QWEN_MOE_NORMS)
QWEN3_MOE = ArchSpec(name="qwen3_moe", model_types=("qwen3_moe",), block=LLAMA.block, attention=QWEN3.attention,
                     mlp=_QWEN_MOE_MLP, norms=_QWEN_MOE_NORMS)

for _spec in (MIXTRAL, QWEN2_MOE, QWEN3_MOE):
    register_architecture(_spec)


# checkpoint (per-expert) module names -> the modules transformers 5 loads them into
_LOADED = (
    (re.compile(r"^(.*)\.block_sparse_moe\.experts\.\d+\.w[123]$"), r"\1.mlp.experts"),
    (re.compile(r"^(.*)\.block_sparse_moe\.gate$"), r"\1.mlp.gate"),
    (re.compile(r"^(.*)\.mlp\.experts\.\d+\.(?:gate|up|down)_proj$"), r"\1.mlp.experts"),
)


def loaded_module_name(name: str) -> str:
    """The module a checkpoint's per-expert module ``name`` is loaded into (``...mlp.experts``, whose 3-D
    ``gate_up_proj``/``down_proj`` hold every expert), or ``name`` itself."""
    for rx, repl in _LOADED:
        if rx.match(name):
            return rx.sub(repl, name)
    return name
