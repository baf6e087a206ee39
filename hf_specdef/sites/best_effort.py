"""Best-effort sites for a model the registry does not know but whose names follow Llama's conventions
(see docs/architectures.md).

``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm`` / ``post_attention_layernorm``
inside ``...layers.N``, heads from ``num_attention_heads`` / ``num_key_value_heads`` / ``head_dim``. ``attn.qk``
is restricted to rotary pairs ``(i, i + d/2)``, which is exact both with and without (half-split) RoPE.

These are *guesses*: names say nothing about q/k norms, sandwich norms, norm offsets or interleaved RoPE, any of
which makes a guessed site wrong. :mod:`hf_specdef.protection.best_effort_check` therefore keeps a site type only after a
numerical check on the model; nothing here is used unverified (streaming, inspect and detection do not use it).
"""

from __future__ import annotations

from typing import Any

from hf_specdef.sites.base import ModelConfigError, Pair, TensorShapeError
from hf_specdef.sites.config_checks import ShapeOf, cfg_get, llama_heads
from hf_specdef.sites.registry import LLAMA, ArchSpec, find_pairs

BEST_EFFORT = ArchSpec(name="best-effort (Llama-style names)", block=LLAMA.block, attention=LLAMA.attention,
                       mlp=LLAMA.mlp, norms=LLAMA.norms)
_NO_ATTENTION = ArchSpec(name=BEST_EFFORT.name, block=LLAMA.block, mlp=LLAMA.mlp, norms=LLAMA.norms)


def _heads_fit(config: Any, shape_of: ShapeOf, block: str) -> bool:
    """Whether the config's head counts explain the first block's q/k/v/o shapes."""
    if cfg_get(config, "num_attention_heads") is None or cfg_get(config, "hidden_size") is None:
        return False
    try:
        n, kv, d = llama_heads(config, block, shape_of)
    except ModelConfigError:  # a guess: a config the heads cannot be read from means no attention sites
        return False
    shape = {p: shape_of.get(f"{block}.self_attn.{p}_proj.weight") for p in "qkvo"}
    return (None not in shape.values() and shape["q"][0] == n * d and shape["k"][0] == kv * d == shape["v"][0]
            and shape["o"][1] == n * d)


def best_effort_pairs(config: Any, shape_of: ShapeOf) -> list[Pair]:
    """Llama-style pairs of an unregistered model (unverified; see the module docstring). ``[]`` if none."""
    try:
        pairs = find_pairs(_NO_ATTENTION, config, shape_of)
    except (ModelConfigError, TensorShapeError):  # the names look like Llama's, the shapes do not: no guess
        return []
    blocks = sorted({p.block for p in pairs}) or sorted({n.rsplit(".self_attn.", 1)[0] for n in shape_of
                                                          if ".layers." in n and ".self_attn." in n})
    if blocks and _heads_fit(config, shape_of, blocks[0]):
        try:
            pairs = find_pairs(BEST_EFFORT, config, shape_of)
        except (ModelConfigError, TensorShapeError):  # a later block does not fit the heads: keep mlp/norm guesses
            pass
    return pairs
