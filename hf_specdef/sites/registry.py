"""The site registry: a table from architecture to where its pairs are (SPEC §2, §5).

Each :class:`ArchSpec` names, relative to a repeated block (a decoder layer, a transformer
block), the attention projections, the gated-MLP projections and the pre-norms with their
readers. :func:`find_pairs` turns a spec plus the tensor names/shapes of a model or checkpoint
into the list of :class:`~hf_specdef.sites.base.Pair`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import Pair, TensorBlock

ShapeOf = Mapping[str, Sequence[int]]


def cfg_get(config: Any, *names: str, default: Any = None) -> Any:
    """First attribute/key of ``config`` among ``names`` that is set."""
    for n in names:
        v = config.get(n) if isinstance(config, Mapping) else getattr(config, n, None)
        if v is not None:
            return v
    return default


@dataclass(frozen=True)
class Linear:
    """A projection inside a block. ``conv1d``: weight stored (in, out) as GPT-2's ``Conv1D``."""

    name: str
    conv1d: bool = False

    @property
    def out_axis(self) -> int:
        return 1 if self.conv1d else 0

    @property
    def in_axis(self) -> int:
        return 0 if self.conv1d else 1


@dataclass(frozen=True)
class Attention:
    """Attention projections. With ``fused``, q/k/v are consecutive thirds of one projection's outputs.

    ``heads(config, block, shape_of)`` returns ``(num_heads, num_kv_heads, head_dim)``.
    """

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    heads: Callable[[Any, str, ShapeOf], tuple[int, int, int]]
    rotary: bool = False
    fused: bool = False
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class GatedMLP:
    """``down(act(gate x) * up x)``: the ``up`` rows (optionally one half of a fused projection) pair with ``down`` columns."""

    up: Linear
    down: Linear
    up_half: int | None = None  # 0 or 1: the linear ("value") half of a fused GEGLU projection


@dataclass(frozen=True)
class PreNorm:
    """A pre-norm whose output feeds only ``readers`` (SPEC §2 ``norm`` site)."""

    norm: str
    readers: tuple[Linear, ...]


@dataclass(frozen=True)
class ArchSpec:
    """Where the sites of one architecture are. ``block`` is a regex with a named group ``block``."""

    name: str
    block: str
    attention: tuple[Attention, ...] = ()
    mlp: tuple[GatedMLP, ...] = ()
    norms: tuple[PreNorm, ...] = ()
    model_types: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    extra_pairs: Callable[[Any, ShapeOf], list[Pair]] | None = field(default=None)


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _bias(shape_of: ShapeOf, module: str, start: int, stop: int) -> tuple[TensorBlock, ...]:
    name = f"{module}.bias"
    return (TensorBlock(name, 0, start, stop),) if name in shape_of else ()


def _attention_pairs(att: Attention, block: str, layer: int, config: Any, shape_of: ShapeOf) -> dict[str, list[Pair]]:
    q, k, v, o = (f"{block}.{p.name}" for p in (att.q, att.k, att.v, att.o))
    if f"{v}.weight" not in shape_of or f"{o}.weight" not in shape_of:
        return {}
    n, kv, d = att.heads(config, block, shape_of)
    rep = n // kv
    q_off, k_off, v_off = (0, n * d, n * d + kv * d) if att.fused else (0, 0, 0)
    pairs: dict[str, list[Pair]] = {"attn.vo": [], "attn.qk": []}
    for g in range(kv):
        heads = range(g * rep, (g + 1) * rep)
        vs, ks = v_off + g * d, k_off + g * d
        pairs["attn.vo"].append(Pair(
            "attn.vo", layer, block, g,
            producers=(TensorBlock(f"{v}.weight", att.v.out_axis, vs, vs + d),) + _bias(shape_of, v, vs, vs + d),
            consumers=tuple(TensorBlock(f"{o}.weight", att.o.in_axis, h * d, (h + 1) * d) for h in heads),
            tags=att.tags,
        ))
        q_blocks = tuple(TensorBlock(f"{q}.weight", att.q.out_axis, q_off + h * d, q_off + (h + 1) * d) for h in heads)
        q_bias = sum((_bias(shape_of, q, q_off + h * d, q_off + (h + 1) * d) for h in heads), ())
        pairs["attn.qk"].append(Pair(
            "attn.qk", layer, block, g,
            producers=q_blocks + q_bias,
            consumers=(TensorBlock(f"{k}.weight", att.k.out_axis, ks, ks + d),) + _bias(shape_of, k, ks, ks + d),
            rotary=att.rotary,
            tags=att.tags,
        ))
    return pairs


def _mlp_pair(mlp: GatedMLP, block: str, layer: int, shape_of: ShapeOf) -> Pair | None:
    up, down = f"{block}.{mlp.up.name}", f"{block}.{mlp.down.name}"
    if f"{up}.weight" not in shape_of or f"{down}.weight" not in shape_of:
        return None
    inner = shape_of[f"{down}.weight"][mlp.down.in_axis]
    start = 0 if mlp.up_half in (None, 0) else inner
    return Pair(
        "mlp", layer, block, 0,
        producers=(TensorBlock(f"{up}.weight", mlp.up.out_axis, start, start + inner),)
        + _bias(shape_of, up, start, start + inner),
        consumers=(TensorBlock(f"{down}.weight", mlp.down.in_axis, 0, inner),),
    )


def _norm_pair(pn: PreNorm, block: str, layer: int, shape_of: ShapeOf, index: int) -> Pair | None:
    norm = f"{block}.{pn.norm}"
    readers = [r for r in pn.readers if f"{block}.{r.name}.weight" in shape_of]
    if f"{norm}.weight" not in shape_of or not readers:
        return None
    dim = shape_of[f"{norm}.weight"][0]
    return Pair(
        "norm", layer, block, index,
        producers=(TensorBlock(f"{norm}.weight", 0, 0, dim),) + _bias(shape_of, norm, 0, dim),
        consumers=tuple(TensorBlock(f"{block}.{r.name}.weight", r.in_axis, 0, dim) for r in readers),
    )


def find_blocks(spec: ArchSpec, names: Sequence[str]) -> list[str]:
    """Distinct block prefixes in ``names``, in natural order (their position is the layer index)."""
    rx = re.compile(spec.block)
    found = {m.group("block") for n in names if (m := rx.match(n))}
    return sorted(found, key=_natural)


SITE_ORDER = {"norm": 0, "attn.qk": 1, "attn.vo": 2, "mlp": 3}


def find_pairs(spec: ArchSpec, config: Any, shape_of: ShapeOf) -> list[Pair]:
    """Every pair of every site type of ``spec`` in a model whose tensors are ``shape_of``."""
    pairs: list[Pair] = []
    for layer, block in enumerate(find_blocks(spec, list(shape_of))):
        for att in spec.attention:
            for site_pairs in _attention_pairs(att, block, layer, config, shape_of).values():
                pairs.extend(site_pairs)
        pairs.extend(p for m in spec.mlp if (p := _mlp_pair(m, block, layer, shape_of)))
        pairs.extend(p for i, pn in enumerate(spec.norms) if (p := _norm_pair(pn, block, layer, shape_of, i)))
    if spec.extra_pairs is not None:
        pairs.extend(spec.extra_pairs(config, shape_of))
    return sorted(pairs, key=lambda p: (p.layer, SITE_ORDER.get(p.site, 9), p.block, p.group))


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

def _llama_heads(config: Any, block: str, shape_of: ShapeOf) -> tuple[int, int, int]:
    n = cfg_get(config, "num_attention_heads")
    kv = cfg_get(config, "num_key_value_heads", default=n)
    d = cfg_get(config, "head_dim", default=cfg_get(config, "hidden_size") // n)
    return n, kv, d


def _mha_heads(n_key: str, hidden_key: str) -> Callable[[Any, str, ShapeOf], tuple[int, int, int]]:
    def heads(config: Any, block: str, shape_of: ShapeOf) -> tuple[int, int, int]:
        n = cfg_get(config, n_key)
        return n, n, cfg_get(config, hidden_key) // n

    return heads


_L = Linear
LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    block=r"^(?P<block>(?:.*\.)?layers\.\d+)\.",
    attention=(Attention(_L("self_attn.q_proj"), _L("self_attn.k_proj"), _L("self_attn.v_proj"), _L("self_attn.o_proj"),
                         heads=_llama_heads, rotary=True),),
    mlp=(GatedMLP(_L("mlp.up_proj"), _L("mlp.down_proj")),),
    norms=(PreNorm("input_layernorm", (_L("self_attn.q_proj"), _L("self_attn.k_proj"), _L("self_attn.v_proj"))),
           PreNorm("post_attention_layernorm", (_L("mlp.gate_proj"), _L("mlp.up_proj")))),
)
_C = Linear("attn.c_attn", conv1d=True)
GPT2 = ArchSpec(
    name="gpt2",
    model_types=("gpt2",),
    block=r"^(?P<block>(?:.*\.)?h\.\d+)\.",
    attention=(Attention(_C, _C, _C, Linear("attn.c_proj", conv1d=True), heads=_mha_heads("n_head", "n_embd"), fused=True),),
    norms=(PreNorm("ln_1", (_C,)), PreNorm("ln_2", (Linear("mlp.c_fc", conv1d=True),))),
)
BERT = ArchSpec(  # post-LN: the norm output is also the residual, so no norm site
    name="bert",
    model_types=("bert", "roberta"),
    block=r"^(?P<block>(?:.*\.)?encoder\.layer\.\d+)\.",
    attention=(Attention(_L("attention.self.query"), _L("attention.self.key"), _L("attention.self.value"),
                         _L("attention.output.dense"), heads=_mha_heads("num_attention_heads", "hidden_size")),),
)
CLIP_TEXT = ArchSpec(
    name="clip_text",
    model_types=("clip_text_model",),
    block=r"^(?!vision_model)(?P<block>(?:.*\.)?encoder\.layers\.\d+)\.",  # text_model. prefix optional
    attention=(Attention(_L("self_attn.q_proj"), _L("self_attn.k_proj"), _L("self_attn.v_proj"), _L("self_attn.out_proj"),
                         heads=_mha_heads("num_attention_heads", "hidden_size")),),
    norms=(PreNorm("layer_norm1", (_L("self_attn.q_proj"), _L("self_attn.k_proj"), _L("self_attn.v_proj"))),
           PreNorm("layer_norm2", (_L("mlp.fc1"),))),
)

REGISTRY: list[ArchSpec] = [LLAMA, GPT2, BERT, CLIP_TEXT]


def register_architecture(spec: ArchSpec) -> None:
    """Add (or replace, by ``name``) an architecture in the registry."""
    REGISTRY[:] = [s for s in REGISTRY if s.name != spec.name] + [spec]


def lookup(model_type: str | None, class_name: str | None = None) -> ArchSpec | None:
    """The spec for a transformers ``model_type`` or a diffusers class name, or ``None``."""
    for spec in REGISTRY:
        if (model_type and model_type in spec.model_types) or (class_name and class_name in spec.class_names):
            return spec
    return None


def known_architectures() -> list[str]:
    return sorted({t for s in REGISTRY for t in s.model_types + s.class_names})
