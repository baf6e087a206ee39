"""The site registry: a table from architecture to where its pairs are (see docs/architectures.md).

Each :class:`ArchSpec` names, relative to a repeated block (a decoder layer, a transformer
block), the attention projections, the gated-MLP projections and the pre-norms with their
readers. :func:`find_pairs` turns a spec plus the tensor names/shapes of a model or checkpoint
into the list of :class:`~hf_specdef.sites.base.Pair`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hf_specdef.sites.base import ModelConfigError, Pair, TensorBlock, TensorShapeError
from hf_specdef.sites.config_checks import (
    ShapeOf,
    cfg_get,
    check_attention_shapes,
    check_extent,
    llama_heads,
    mha_heads,
    shape_text,
)


@dataclass(frozen=True)
class Linear:
    """A projection inside a block, named relative to the block.

    ``conv1d``: weight stored (in, out) as GPT-2's ``Conv1D``. ``experts``: a 3-D ``(experts, out, in)``
    parameter of fused MoE experts (transformers 5 ``...experts.gate_up_proj``), named ``name.param``.
    A ``*`` in ``name`` stands for an expert index: it expands to every index the model has (0, 1, ...).
    """

    name: str
    conv1d: bool = False
    param: str = "weight"
    experts: bool = False

    @property
    def weight(self) -> str:
        return f"{self.name}.{self.param}"

    @property
    def out_axis(self) -> int:
        return 1 if self.conv1d or self.experts else 0

    @property
    def in_axis(self) -> int:
        return 0 if self.conv1d else 2 if self.experts else 1


def expand(block: str, lin: Linear, shape_of: ShapeOf) -> list[Linear]:
    """``lin`` with a ``*`` in its name replaced by every expert index present in ``shape_of`` (else ``[lin]``)."""
    if "*" not in lin.name:
        return [lin]
    out = []
    while f"{block}.{(e := replace(lin, name=lin.name.replace('*', str(len(out))))).weight}" in shape_of:
        out.append(e)
    return out


@dataclass(frozen=True)
class Attention:
    """Attention projections. ``heads(config, block, shape_of)`` returns ``(num_heads, num_kv_heads, head_dim)``.

    Layouts: separate q/k/v projections; ``fused``: q, k, v are consecutive parts of one projection's outputs
    (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``); ``interleaved``: one projection holding ``[q_h, k_h, v_h]`` per head
    (GPT-NeoX ``query_key_value``). ``rotary``: RoPE on the first ``rotary_dims`` of each head (partial rotary
    from the config); ``attn.qk`` then scales rotary pairs of that part only (``True``/``"half"``: pairs
    ``(i, i + d/2)``; ``"adjacent"``: pairs ``(2i, 2i + 1)``). ``qk_norms``: per-head q/k norms (one weight of
    ``head_dim`` shared by all heads, after the projection: Qwen3, Gemma 3) normalise away any scaling of q/k
    rows, so ``attn.qk`` scales the *norm weights* instead (their rotary pairs with RoPE; one diagonal pair per
    layer); ``norm_offset``: those norms compute ``x * (offset + w)`` (Gemma).
    """

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    heads: Callable[[Any, str, ShapeOf], tuple[int, int, int]]
    rotary: bool | str = False
    fused: bool = False
    tags: frozenset[str] = frozenset()
    interleaved: bool = False
    qk_norms: tuple[str, str] | None = None
    norm_offset: float = 0.0


@dataclass(frozen=True)
class GatedMLP:
    """``down(act(gate x) * up x)``: the ``up`` rows (optionally one half of a fused projection) pair with ``down`` columns.

    Also a ReLU MLP ``down(relu(up x + b))`` (a positive diagonal commutes with ReLU; the bias rows move too).
    ``up``/``down`` names with ``*`` (per-expert checkpoints) make one pair over every expert, as a fused 3-D
    expert tensor does: the same channels in every expert. ``group`` tells MLPs of one block apart (a MoE
    block's experts and its shared expert); alternative layouts of one MLP share it. ``when(config)``: the
    site exists only where it returns true (e.g. only for a ReLU activation).
    """

    up: Linear
    down: Linear
    up_half: int | None = None  # 0 or 1: the linear ("value") half of a fused GEGLU projection
    group: int = 0
    when: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class PreNorm:
    """A pre-norm whose output feeds only ``readers`` (the ``norm`` site of docs/design.md).

    ``offset``: the norm computes ``x_hat * (offset + w)`` (Gemma's RMSNorm: 1); the channel scale then acts
    on ``offset + w``. Readers that are absent from a model are left out (alternative layouts may be listed);
    ``when(config)``: the site exists only where it returns true (e.g. pre-LN only).
    """

    norm: str
    readers: tuple[Linear, ...]
    offset: float = 0.0
    when: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class ArchSpec:
    """Where the sites of one architecture are. ``block`` is a regex with a named group ``block``. ``absent``:
    ``(site type, why)`` for site types the architecture has no exact pair of (said when they are skipped)."""

    name: str
    block: str
    attention: tuple[Attention, ...] = ()
    mlp: tuple[GatedMLP, ...] = ()
    norms: tuple[PreNorm, ...] = ()
    model_types: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    extra_pairs: Callable[[Any, ShapeOf], list[Pair]] | None = field(default=None)
    absent: tuple[tuple[str, str], ...] = ()


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _bias(shape_of: ShapeOf, module: str, start: int, stop: int) -> tuple[TensorBlock, ...]:
    name = f"{module}.bias"
    return (TensorBlock(name, 0, start, stop),) if name in shape_of else ()


def rotary_dims(config: Any, head_dim: int) -> int:
    """How many leading dims of a head RoPE rotates: ``head_dim`` times the config's partial rotary factor
    (``rope_parameters["partial_rotary_factor"]``, or the legacy ``partial_rotary_factor`` / ``rotary_pct``)."""
    rope = cfg_get(config, "rope_parameters")
    factor = rope.get("partial_rotary_factor") if isinstance(rope, Mapping) else None
    factor = factor if factor is not None else cfg_get(config, "partial_rotary_factor", "rotary_pct", default=1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ModelConfigError(f"partial_rotary_factor={factor!r} is not a number in (0, 1]; set it to the share of each "
                               "head that RoPE rotates (1.0: all of it), or pass an explicit SpecDefConfig(site_map=...).")
    rot = int(head_dim * factor)
    if not 0 < rot <= head_dim or rot % 2:
        raise ModelConfigError(f"partial_rotary_factor={factor!r} rotates {rot} dims of a {head_dim}-dim head, which cannot be "
                               "split into rotary pairs (an even number >= 2 is needed); fix head_dim / the factor, or "
                               "pass an explicit SpecDefConfig(site_map=...) for this model.")
    return rot


def _head_rows(att: Attention, n: int, kv: int, d: int) -> tuple[Callable[[int], int], ...]:
    """First output row of query head ``h``, and of key / value head ``g``, in the q / k / v weights."""
    if att.interleaved:  # [q_h, k_h, v_h] per head (needs n == kv)
        return (lambda h: 3 * d * h), (lambda g: 3 * d * g + d), (lambda g: 3 * d * g + 2 * d)
    k0, v0 = (n * d, n * d + kv * d) if att.fused else (0, 0)
    return (lambda h: h * d), (lambda g: k0 + g * d), (lambda g: v0 + g * d)


def _blocks(shape_of: ShapeOf, module: str, lin: Linear, start: int, stop: int, offset: float = 0.0
            ) -> tuple[TensorBlock, ...]:
    """The weight block ``[start, stop)`` of ``module`` along its output axis, with its bias block (if any)."""
    return (TensorBlock(f"{module}.{lin.param}", lin.out_axis, start, stop, offset),) + _bias(shape_of, module, start, stop)


def _attention_pairs(att: Attention, block: str, layer: int, config: Any, shape_of: ShapeOf) -> dict[str, list[Pair]]:
    q, k, v, o = (f"{block}.{p.name}" for p in (att.q, att.k, att.v, att.o))
    if f"{block}.{att.v.weight}" not in shape_of or f"{block}.{att.o.weight}" not in shape_of:
        return {}
    n, kv, d = att.heads(config, block, shape_of)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (n, kv, d)):
        raise ModelConfigError(f"{block}: the head counts from the config are {n!r} heads and {kv!r} key/value heads of "
                               f"size {d!r}, not positive integers; fix num_attention_heads / num_key_value_heads / "
                               "head_dim, or pass an explicit SpecDefConfig(site_map=...).")
    if att.interleaved and n != kv:
        raise ValueError(f"{block}: an interleaved q/k/v projection needs as many kv heads as heads ({n} != {kv}).")
    if n % kv:
        raise ModelConfigError(f"num_key_value_heads={kv} does not divide num_attention_heads={n} (every key/value "
                               f"head serves the same number of query heads); set it to a divisor of {n}, as the "
                               "model was trained.")
    check_attention_shapes(att, block, config, shape_of, n, kv, d)
    rep = n // kv
    rot = rotary_dims(config, d) if att.rotary else d
    q_row, k_row, v_row = _head_rows(att, n, kv, d)
    pairs: dict[str, list[Pair]] = {"attn.vo": [], "attn.qk": []}
    for g in range(kv):
        heads = range(g * rep, (g + 1) * rep)
        pairs["attn.vo"].append(Pair(
            "attn.vo", layer, block, g,
            producers=_blocks(shape_of, v, att.v, v_row(g), v_row(g) + d),
            consumers=tuple(TensorBlock(f"{block}.{att.o.weight}", att.o.in_axis, h * d, (h + 1) * d) for h in heads),
            tags=att.tags,
        ))
        if att.qk_norms is None:
            pairs["attn.qk"].append(Pair(
                "attn.qk", layer, block, g,
                producers=tuple(b for part in (0, 1) for h in heads  # weights first, then biases
                                for b in _blocks(shape_of, q, att.q, q_row(h), q_row(h) + rot)[part:part + 1]),
                consumers=_blocks(shape_of, k, att.k, k_row(g), k_row(g) + rot),
                rotary=att.rotary,
                tags=att.tags,
            ))
    qn, kn = (f"{block}.{m}" for m in att.qk_norms or ("", ""))
    if att.qk_norms is not None and f"{qn}.weight" in shape_of and f"{kn}.weight" in shape_of:
        pairs["attn.qk"].append(Pair(  # one weight of head_dim shared by every head: one pair per layer
            "attn.qk", layer, block, 0,
            producers=(TensorBlock(f"{qn}.weight", 0, 0, rot, att.norm_offset),),
            consumers=(TensorBlock(f"{kn}.weight", 0, 0, rot, att.norm_offset),),
            rotary=att.rotary,
            tags=att.tags,
            diagonal=True,
        ))
    return pairs


def _mlp_pair(mlp: GatedMLP, block: str, layer: int, shape_of: ShapeOf) -> Pair | None:
    ups, downs = expand(block, mlp.up, shape_of), expand(block, mlp.down, shape_of)
    if not ups or not downs or any(f"{block}.{x.weight}" not in shape_of for x in ups + downs):
        return None
    down0 = f"{block}.{downs[0].weight}"
    if mlp.down.in_axis >= len(shape_of[down0]):
        raise TensorShapeError(down0, f"tensor {down0!r} has shape {shape_text(shape_of[down0])}: the mlp site reads "
                                      f"its input axis {mlp.down.in_axis}, which it lacks; re-save it in the layout "
                                      "the architecture uses.")
    inner = int(shape_of[down0][mlp.down.in_axis])
    start = 0 if mlp.up_half in (None, 0) else inner
    fix = "the up and down projections of one MLP must agree; re-save the weights in the architecture's layout."
    mult = 1 if mlp.up_half is None else 2
    up0 = f"{block}.{ups[0].weight}"
    up_rows = shape_of[up0][mlp.up.out_axis] if mlp.up.out_axis < len(shape_of[up0]) else 0
    if up_rows != inner * mult and up_rows % mult == 0 and len(shape_of[down0]) == 2 \
            and shape_of[down0][1 - mlp.down.in_axis] == up_rows // mult:
        # the down projection is the odd one out (stored transposed): name it, not the up projection
        check_extent(shape_of, down0, mlp.down.in_axis, up_rows // mult,
                     f"the mlp site ({up0} writes {up_rows // mult} hidden channels)", fix)
    basis = f"the mlp site ({down0} reads {inner} hidden channels)"
    for x in downs[1:]:
        check_extent(shape_of, f"{block}.{x.weight}", x.in_axis, inner, basis, fix)
    for u in ups:
        check_extent(shape_of, f"{block}.{u.weight}", u.out_axis, inner * mult, basis, fix)
    return Pair(
        "mlp", layer, block, mlp.group,
        producers=sum((_blocks(shape_of, f"{block}.{u.name}", u, start, start + inner) for u in ups), ()),
        consumers=tuple(TensorBlock(f"{block}.{x.weight}", x.in_axis, 0, inner) for x in downs),
    )


def _norm_pair(pn: PreNorm, block: str, layer: int, shape_of: ShapeOf, index: int) -> Pair | None:
    norm = f"{block}.{pn.norm}"
    readers = [e for r in pn.readers for e in expand(block, r, shape_of) if f"{block}.{e.weight}" in shape_of]
    if f"{norm}.weight" not in shape_of or not readers:
        return None
    dim = int(shape_of[f"{norm}.weight"][0])
    fix = "every reader of a pre-norm reads all its channels; re-save the weights in the architecture's layout."
    widths = {shape_of[f"{block}.{r.weight}"][r.in_axis] if r.in_axis < len(shape_of[f"{block}.{r.weight}"]) else -1
              for r in readers}
    if len(widths) == 1 and dim not in widths and min(widths) > 0:  # the readers agree: the norm weight is the odd one
        check_extent(shape_of, f"{norm}.weight", 0, int(next(iter(widths))),
                     f"the norm site (its readers {', '.join(r.name for r in readers)} read "
                     f"{next(iter(widths))} channels)", fix)
    for r in readers:
        check_extent(shape_of, f"{block}.{r.weight}", r.in_axis, dim,
                     f"the norm site ({norm}.weight has {dim} channels, which it reads)", fix)
    return Pair(
        "norm", layer, block, index,
        producers=(TensorBlock(f"{norm}.weight", 0, 0, dim, pn.offset),) + _bias(shape_of, norm, 0, dim),
        consumers=tuple(TensorBlock(f"{block}.{r.weight}", r.in_axis, 0, dim) for r in readers),
    )


def find_blocks(spec: ArchSpec, names: Sequence[str]) -> list[str]:
    """Distinct block prefixes in ``names``, in natural order (their position is the layer index)."""
    rx = re.compile(spec.block)
    found = {m.group("block") for n in names if (m := rx.match(n))}
    return sorted(found, key=_natural)


def _applies(site: GatedMLP | PreNorm, config: Any) -> bool:
    return site.when is None or bool(site.when(config))


SITE_ORDER = {"norm": 0, "attn.qk": 1, "attn.vo": 2, "mlp": 3}


def find_pairs(spec: ArchSpec, config: Any, shape_of: ShapeOf) -> list[Pair]:
    """Every pair of every site type of ``spec`` in a model whose tensors are ``shape_of``."""
    pairs: list[Pair] = []
    for layer, block in enumerate(find_blocks(spec, list(shape_of))):
        # attention first (its shape checks name a q/k/v/o weight against the config's head counts), then norms
        # (theirs name a reader stored transposed, e.g. an up projection), then the mlp (whose check alone cannot
        # tell an up from a down projection stored transposed); the pairs are sorted below
        for att in spec.attention:
            for site_pairs in _attention_pairs(att, block, layer, config, shape_of).values():
                pairs.extend(site_pairs)
        pairs.extend(p for i, pn in enumerate(spec.norms)
                     if _applies(pn, config) and (p := _norm_pair(pn, block, layer, shape_of, i)))
        pairs.extend(p for m in spec.mlp if _applies(m, config) and (p := _mlp_pair(m, block, layer, shape_of)))
    if spec.extra_pairs is not None:
        pairs.extend(spec.extra_pairs(config, shape_of))
    return sorted(pairs, key=lambda p: (p.layer, SITE_ORDER.get(p.site, 9), p.block, p.group))


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

_L = Linear
LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    block=r"^(?P<block>(?:.*\.)?layers\.\d+)\.",
    attention=(Attention(_L("self_attn.q_proj"), _L("self_attn.k_proj"), _L("self_attn.v_proj"), _L("self_attn.o_proj"),
                         heads=llama_heads, rotary=True),),
    mlp=(GatedMLP(_L("mlp.up_proj"), _L("mlp.down_proj")),),
    norms=(PreNorm("input_layernorm", (_L("self_attn.q_proj"), _L("self_attn.k_proj"), _L("self_attn.v_proj"))),
           PreNorm("post_attention_layernorm", (_L("mlp.gate_proj"), _L("mlp.up_proj")))),
)
_C = Linear("attn.c_attn", conv1d=True)
GPT2 = ArchSpec(
    name="gpt2",
    model_types=("gpt2",),
    block=r"^(?P<block>(?:.*\.)?h\.\d+)\.",
    attention=(Attention(_C, _C, _C, Linear("attn.c_proj", conv1d=True), heads=mha_heads("n_head", "n_embd"), fused=True),),
    norms=(PreNorm("ln_1", (_C,)), PreNorm("ln_2", (Linear("mlp.c_fc", conv1d=True),))),
)
BERT = ArchSpec(  # post-LN: the norm output is also the residual, so no norm site
    name="bert",
    model_types=("bert", "roberta"),
    block=r"^(?P<block>(?:.*\.)?encoder\.layer\.\d+)\.",
    attention=(Attention(_L("attention.self.query"), _L("attention.self.key"), _L("attention.self.value"),
                         _L("attention.output.dense"), heads=mha_heads("num_attention_heads", "hidden_size")),),
)
CLIP_TEXT = ArchSpec(
    name="clip_text",
    model_types=("clip_text_model",),
    block=r"^(?!vision_model)(?P<block>(?:.*\.)?encoder\.layers\.\d+)\.",  # text_model. prefix optional
    attention=(Attention(_L("self_attn.q_proj"), _L("self_attn.k_proj"), _L("self_attn.v_proj"), _L("self_attn.out_proj"),
                         heads=mha_heads("num_attention_heads", "hidden_size")),),
    norms=(PreNorm("layer_norm1", (_L("self_attn.q_proj"), _L("self_attn.k_proj"), _L("self_attn.v_proj"))),
           PreNorm("layer_norm2", (_L("mlp.fc1"),))),
)

REGISTRY: list[ArchSpec] = [LLAMA, GPT2, BERT, CLIP_TEXT]


def register_architecture(spec: ArchSpec) -> None:
    """Add (or replace, by ``name``) an architecture in the registry.

    Args:
        spec: the architecture's :class:`~hf_specdef.sites.registry.ArchSpec` (its module names per block and the
            site types it supports; see docs/architectures.md).

    Returns:
        None.

    Example:
        ```python
        from hf_specdef import register_architecture
        from hf_specdef.sites.registry import LLAMA

        register_architecture(LLAMA)  # replaces the entry of the same name
        ```
    """
    REGISTRY[:] = [s for s in REGISTRY if s.name != spec.name] + [spec]


def lookup(model_type: str | None, class_name: str | None = None) -> ArchSpec | None:
    """The spec for a transformers ``model_type`` or a diffusers class name, or ``None``."""
    for spec in REGISTRY:
        if (model_type and model_type in spec.model_types) or (class_name and class_name in spec.class_names):
            return spec
    return None


def known_architectures() -> list[str]:
    return sorted({t for s in REGISTRY for t in s.model_types + s.class_names})
