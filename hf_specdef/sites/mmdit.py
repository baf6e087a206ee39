"""Site registry entries for MMDiT denoisers: diffusers ``SD3Transformer2DModel`` and ``FluxTransformer2DModel``
(see docs/architectures.md). Layout as in diffusers 0.42.

**Joint attention.** An MMDiT block projects the image tokens (``to_q/to_k/to_v``) and the text tokens
(``add_q_proj/add_k_proj/add_v_proj``) separately, concatenates them along the sequence and runs one softmax
over both; the output is split again, image tokens to ``to_out.0``, text tokens to ``to_add_out``. Every output
token mixes values of both streams, so one ``M`` per head must act on both:

* ``attn.vo``: producers ``to_v`` and ``add_v_proj`` rows of head ``h`` (with biases), consumers ``to_out.0`` and
  ``to_add_out`` columns of head ``h`` (any invertible ``M``, spectral OK). SD3's last block has no
  ``to_add_out`` (its text output is dropped): ``to_out.0`` is then the only consumer, ``add_v_proj`` is still a
  producer (image queries read text values). Flux's single-stream blocks have no ``to_out``: the attention
  output is the first ``inner_dim`` columns of ``proj_out`` (which reads ``cat([attn, mlp])``).
* ``attn.qk``: without q/k norms (SD3): ``to_q`` + ``add_q_proj`` rows of head ``h`` against ``to_k`` +
  ``add_k_proj`` rows (dense ``M``, ``K <- M^-T K``). With per-head RMSNorms (SD3.5 ``qk_norm="rms_norm"``,
  Flux): the norms divide out any scaling of q/k rows, so the pair scales the norm weights instead: ``norm_q``
  and ``norm_added_q`` by ``M``, ``norm_k`` and ``norm_added_k`` by ``M^-1`` (diagonal, one pair per attention,
  the weights are shared by every head). Flux applies RoPE after the norms with *adjacent* pairs
  ``(2i, 2i + 1)`` (``apply_rotary_emb(use_real_unbind_dim=-1)``), so each rotary pair gets one factor.
* SD3.5's dual attention (``attn2``, ``dual_attention_layers``) is a plain self-attention of the image stream
  with q/k norms: ``attn.vo`` and the norm-weight ``attn.qk``.

**AdaLN norms (``norm``, float32 only).** The norms are ``LayerNorm(elementwise_affine=False)`` modulated as
``x_hat * (1 + scale) + shift``, with ``shift`` / ``scale`` chunks of a linear map of the conditioning
(``norm1.linear``, ...). Scaling a channel by ``f`` is folded into those chunks: the ``shift`` rows (and bias) by
``f``, the ``scale`` rows by ``f`` and its bias as ``f (1 + b) - 1`` (an offset block), and its readers' columns
by ``1/f``. Exact to float32 rounding, but ``f (1 + b) - 1`` has no exact bfloat16/float16 value, so these pairs
are skipped in half precision with the reason (:func:`hf_specdef.sites.drop_inexact`), as Gemma's offset norms.
Folds (readers): AdaLN-Zero ``norm1`` (chunks ``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
gate_mlp``) -> ``attn.to_q/k/v`` and ``ff.net.0.proj``; SD3.5's ``SD35AdaLayerNormZeroX`` (9 chunks) also ->
``attn2.to_q/k/v``; ``norm1_context`` -> ``attn.add_q/k/v_proj`` and ``ff_context.net.0.proj``, or in SD3's last
block (``AdaLayerNormContinuous``: chunks ``scale, shift``) -> ``attn.add_q/k/v_proj``; Flux single-stream
``norm`` (``shift, scale, gate``) -> ``attn.to_q/k/v`` and ``proj_mlp``. A modulation without a bias cannot hold
the ``1`` of ``1 + scale`` and gets no pair.

A model whose q/k/v were fused at run time (``fuse_qkv_projections()``: ``to_qkv`` / ``to_added_qkv`` beside the
kept ``to_q/k/v``) is refused with the fix (unfuse first): the fused copies are what runs.

**No ``mlp`` site**: the feed-forwards are GELU(tanh) (``ff``, ``ff_context``, Flux ``proj_mlp``), which no
positive diagonal commutes with. The model-level ``norm_out`` -> ``proj_out`` and the embedders are left alone.

Layers: double-stream blocks (``transformer_blocks.N``) first, then Flux's single-stream blocks
(``single_transformer_blocks.N``), in execution order. Attention pairs are tagged ``"joint-attention"`` and
``"cross-attention"`` (the text-image interaction, which ``layers="cross-attention"`` selects); SD3.5's
image-only ``attn2`` is tagged ``"self-attention"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hf_specdef.sites.base import ModelConfigError, Pair, TensorBlock
from hf_specdef.sites.config_checks import ShapeOf, cfg_get
from hf_specdef.sites.registry import ArchSpec, _bias, _natural, register_architecture

__all__ = ["MMDIT", "MMDIT_CLASSES", "AdaNormFold", "Stream", "mmdit_blocks", "mmdit_pairs"]

MMDIT_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel")
_DOUBLE = re.compile(r"^(?P<block>transformer_blocks\.\d+)\.")
_SINGLE = re.compile(r"^(?P<block>single_transformer_blocks\.\d+)\.")
JOINT = frozenset({"joint-attention", "cross-attention"})
SELF = frozenset({"self-attention"})


@dataclass(frozen=True)
class Stream:
    """One token stream of an attention (names relative to the block). ``out``: the linear reading this stream's
    attention output, its head ``h`` in columns ``[h d, (h + 1) d)``; ``None`` where the output is dropped."""

    q: str
    k: str
    v: str
    out: str | None
    q_norm: str | None = None
    k_norm: str | None = None


@dataclass(frozen=True)
class AdaNormFold:
    """``x_hat * (1 + scale) + shift`` with ``shift`` / ``scale`` chunks ``shift`` / ``scale`` of the ``chunks``
    equal parts of ``linear``'s outputs, read only by ``readers`` (names relative to the block)."""

    linear: str
    chunks: int
    shift: int
    scale: int
    readers: tuple[str, ...]


def _attn(a: str, ctx: bool) -> tuple[Stream, ...]:
    img = Stream(f"{a}.to_q", f"{a}.to_k", f"{a}.to_v", f"{a}.to_out.0", f"{a}.norm_q", f"{a}.norm_k")
    if not ctx:
        return (img,)
    return img, Stream(f"{a}.add_q_proj", f"{a}.add_k_proj", f"{a}.add_v_proj", f"{a}.to_add_out",
                       f"{a}.norm_added_q", f"{a}.norm_added_k")


# attention name -> its streams (the joint attention of double-stream blocks, SD3.5's image-only attn2)
DOUBLE_ATTENTIONS = {"attn": (_attn("attn", True), JOINT), "attn2": (_attn("attn2", False), SELF)}
# Flux single-stream blocks: pre_only attention, its output is the first columns of proj_out
SINGLE_ATTENTIONS = {"attn": ((Stream("attn.to_q", "attn.to_k", "attn.to_v", "proj_out", "attn.norm_q", "attn.norm_k"),),
                              JOINT)}

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
# the AdaLN modulations of a block, told apart by their number of chunks
DOUBLE_FOLDS = (
    AdaNormFold("norm1.linear", 6, 0, 1, _QKV), AdaNormFold("norm1.linear", 6, 3, 4, ("ff.net.0.proj",)),
    AdaNormFold("norm1.linear", 9, 0, 1, _QKV), AdaNormFold("norm1.linear", 9, 3, 4, ("ff.net.0.proj",)),
    AdaNormFold("norm1.linear", 9, 6, 7, ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    AdaNormFold("norm1_context.linear", 6, 0, 1, _ADD_QKV),
    AdaNormFold("norm1_context.linear", 6, 3, 4, ("ff_context.net.0.proj",)),
    AdaNormFold("norm1_context.linear", 2, 1, 0, _ADD_QKV),  # AdaLayerNormContinuous: scale, shift
)
SINGLE_FOLDS = (AdaNormFold("norm.linear", 3, 0, 1, _QKV + ("proj_mlp",)),)


def _heads(config: Any, block: str, q: str, shape_of: ShapeOf) -> tuple[int, int]:
    n, d = cfg_get(config, "num_attention_heads"), cfg_get(config, "attention_head_dim")
    rows = shape_of[f"{block}.{q}.weight"][0]
    bad = [f"{k}={v!r}" for k, v in (("num_attention_heads", n), ("attention_head_dim", d))
           if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad or n * d != rows:
        why = " is not a positive integer" if bad else f" does not give the {rows} rows of {block}.{q} (n x d = {n * d})"
        raise ModelConfigError(f"{', '.join(bad) or f'num_attention_heads={n!r} x attention_head_dim={d!r}'}{why}; set "
                               "them to the model's head count and head size, as it was trained, or pass an explicit "
                               "SpecDefConfig(site_map=...) for this model.")
    return n, d


def _rows(shape_of: ShapeOf, module: str, start: int, stop: int) -> tuple[tuple[TensorBlock, ...], tuple[TensorBlock, ...]]:
    """(weight rows, bias rows) of ``module``'s outputs ``[start, stop)``."""
    return (TensorBlock(f"{module}.weight", 0, start, stop),), _bias(shape_of, module, start, stop)


def _weights_then_biases(parts: Sequence[tuple[tuple[TensorBlock, ...], tuple[TensorBlock, ...]]]) -> tuple[TensorBlock, ...]:
    return tuple(b for w, _ in parts for b in w) + tuple(b for _, bias in parts for b in bias)


def attention_pairs(streams: Sequence[Stream], block: str, name: str, layer: int, config: Any, shape_of: ShapeOf,
                    rotary: str, tags: frozenset[str]) -> list[Pair]:
    """``attn.vo`` per head and ``attn.qk`` (per head on the projections, or one diagonal pair on the q/k norm
    weights) of one joint attention over ``streams`` (those present in ``shape_of``)."""
    present = [s for s in streams if all(f"{block}.{m}.weight" in shape_of for m in (s.q, s.k, s.v))]
    if not present:
        return []
    n, d = _heads(config, block, present[0].q, shape_of)
    key = f"{block}.{name}"
    pairs = []
    outs = [s.out for s in present if s.out is not None and f"{block}.{s.out}.weight" in shape_of]
    for h in range(n) if outs else ():
        pairs.append(Pair(
            "attn.vo", layer, key, h,
            producers=_weights_then_biases([_rows(shape_of, f"{block}.{s.v}", h * d, (h + 1) * d) for s in present]),
            consumers=tuple(TensorBlock(f"{block}.{o}.weight", 1, h * d, (h + 1) * d) for o in outs),
            tags=tags,
        ))
    normed = [s for s in present if s.q_norm and f"{block}.{s.q_norm}.weight" in shape_of]
    if normed and len(normed) != len(present):
        raise ValueError(f"{key}: some token streams have q/k norms and some do not; pass an explicit site map.")
    if normed:
        pairs.append(Pair(
            "attn.qk", layer, key, 0,
            producers=tuple(TensorBlock(f"{block}.{s.q_norm}.weight", 0, 0, d) for s in present),
            consumers=tuple(TensorBlock(f"{block}.{s.k_norm}.weight", 0, 0, d) for s in present),
            rotary=rotary, tags=tags, diagonal=True,
        ))
        return pairs
    for h in range(n):
        pairs.append(Pair(
            "attn.qk", layer, key, h,
            producers=_weights_then_biases([_rows(shape_of, f"{block}.{s.q}", h * d, (h + 1) * d) for s in present]),
            consumers=_weights_then_biases([_rows(shape_of, f"{block}.{s.k}", h * d, (h + 1) * d) for s in present]),
            rotary=rotary, tags=tags,
        ))
    return pairs


def fold_pair(fold: AdaNormFold, block: str, layer: int, shape_of: ShapeOf, index: int) -> Pair | None:
    """The ``norm`` pair of one AdaLN modulation, or ``None`` where the block has no such modulation (another
    chunk count), no bias, or a reader is missing or reads another width."""
    lin = f"{block}.{fold.linear}"
    shape = shape_of.get(f"{lin}.weight")
    if shape is None or shape[0] % fold.chunks or f"{lin}.bias" not in shape_of:
        return None
    dim = shape[0] // fold.chunks  # a modulation of another chunk count gives a width no reader has
    readers = [f"{block}.{r}.weight" for r in fold.readers]
    if any(r not in shape_of or shape_of[r][1] != dim for r in readers):
        return None
    shift, scale = fold.shift * dim, fold.scale * dim
    return Pair(
        "norm", layer, block, index,
        producers=(TensorBlock(f"{lin}.weight", 0, shift, shift + dim), TensorBlock(f"{lin}.weight", 0, scale, scale + dim),
                   TensorBlock(f"{lin}.bias", 0, shift, shift + dim), TensorBlock(f"{lin}.bias", 0, scale, scale + dim, 1.0)),
        consumers=tuple(TensorBlock(r, 1, 0, dim) for r in readers),
    )


def mmdit_blocks(names: Sequence[str]) -> list[tuple[str, bool]]:
    """``(block, single_stream)`` in execution order: double-stream blocks, then single-stream ones."""
    double = {m.group("block") for n in names if (m := _DOUBLE.match(n))}
    single = {m.group("block") for n in names if (m := _SINGLE.match(n))}
    return [(b, False) for b in sorted(double, key=_natural)] + [(b, True) for b in sorted(single, key=_natural)]


def mmdit_pairs(config: Any, shape_of: ShapeOf) -> list[Pair]:
    """Every pair of an SD3 / Flux transformer (see the module docstring)."""
    fused = sorted(n for n in shape_of if n.endswith(("to_qkv.weight", "to_added_qkv.weight")))
    if fused:  # diffusers keeps to_q/k/v beside the fused copy and runs the copy only
        raise ValueError(f"{fused[0]}: the q/k/v projections were fused at run time (fuse_qkv_projections()), and the "
                         "fused copies would not follow the deformation; call model.unfuse_qkv_projections() first "
                         "(or protect before fusing).")
    rotary = "adjacent" if cfg_get(config, "axes_dims_rope") is not None else ""  # Flux: RoPE on adjacent pairs
    pairs: list[Pair] = []
    for layer, (block, single) in enumerate(mmdit_blocks(list(shape_of))):
        for name, (streams, tags) in (SINGLE_ATTENTIONS if single else DOUBLE_ATTENTIONS).items():
            pairs += attention_pairs(streams, block, name, layer, config, shape_of, rotary, tags)
        folds = SINGLE_FOLDS if single else DOUBLE_FOLDS
        pairs += [p for i, f in enumerate(folds) if (p := fold_pair(f, block, layer, shape_of, i)) is not None]
    return pairs


MMDIT = ArchSpec(  # every pair comes from mmdit_pairs (joint streams, AdaLN folds, execution-order layers)
    name="mmdit",
    block=r"^(?P<block>(?:single_)?transformer_blocks\.\d+)\.",
    class_names=MMDIT_CLASSES,
    extra_pairs=mmdit_pairs,
    absent=(("mlp", "GELU(tanh) feed-forwards: no positive diagonal commutes with GELU"),),
)

register_architecture(MMDIT)
