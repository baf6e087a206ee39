"""Site registry entries for the decoder LLM families released today (SPEC §5; issue 19).

Each entry says where its pairs are and, in its comment, which sites it cannot have and why:

* **Qwen3** (``qwen3``): Llama layout plus per-head ``q_norm``/``k_norm`` (RMSNorm over the head dim after
  the projection). Those norms divide out any scaling of q/k rows, so ``attn.qk`` on the projections is not
  exact; instead it scales the *norm weights'* rotary pairs ``(i, i + d/2)``: ``alpha`` on ``q_norm``,
  ``1/alpha`` on ``k_norm``. The weight is shared by every head, so there is one ``attn.qk`` pair per layer.
"""

from __future__ import annotations

from .registry import LLAMA, ArchSpec, Attention, Linear, _llama_heads, register_architecture

_L = Linear
_Q, _K, _V, _O = (_L(f"self_attn.{p}_proj") for p in "qkvo")

QWEN3 = ArchSpec(
    name="qwen3",
    model_types=("qwen3",),
    block=LLAMA.block,
    attention=(Attention(_Q, _K, _V, _O, heads=_llama_heads, rotary=True,
                         qk_norms=("self_attn.q_norm", "self_attn.k_norm")),),
    mlp=LLAMA.mlp,
    norms=LLAMA.norms,
)

for _spec in (QWEN3,):
    register_architecture(_spec)
