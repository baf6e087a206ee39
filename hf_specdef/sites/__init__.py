"""Site discovery: which (producer, consumer) pairs a model has (docs/design.md, docs/architectures.md)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hf_specdef.config import SpecDefConfig
from hf_specdef.errors import SpecDefError
from hf_specdef.sites import decoders, mmdit, moe  # noqa: F401  (register the decoder, MMDiT and MoE families)
from hf_specdef.sites.base import AXIS_ONLY_SITES, ModelConfigError, Pair, TensorBlock, TensorShapeError
from hf_specdef.sites.config_checks import cfg_get
from hf_specdef.sites.registry import (
    REGISTRY,
    ArchSpec,
    Attention,
    GatedMLP,
    Linear,
    PreNorm,
    find_pairs,
    known_architectures,
    lookup,
    register_architecture,
)

__all__ = [
    "AXIS_ONLY_SITES", "ArchSpec", "Attention", "GatedMLP", "Linear", "Pair", "PreNorm", "REGISTRY", "TensorBlock",
    "ModelConfigError", "NoSitesError", "TensorShapeError", "absent_sites", "check_blocks", "cfg_get", "drop_inexact",
    "find_pairs", "known_architectures", "lookup", "pairs_for", "pairs_from_site_map", "register_architecture",
    "select_pairs",
]


class NoSitesError(SpecDefError, ValueError):
    """The model has no pairs the registry knows, or the config's selection matches none.

    Raised before any weight is changed when the site registry does not know the architecture (and no
    ``site_map`` is given, and no pair can be found and verified otherwise), when ``cfg.sites`` / ``cfg.layers``
    select no pair of the model, or when every selected pair had to be skipped (tied weights, not exact in the
    storage dtype, not quantization-safe). See the Architectures page of the docs (docs/architectures.md). Also a
    ``ValueError``.

    Example:

    ```python
    import torch

    from hf_specdef import NoSitesError, protect

    try:
        protect(torch.nn.Sequential(torch.nn.Linear(8, 8)))  # no architecture the registry knows, no pair found
    except NoSitesError as e:
        print(e)  # names the known architectures and how to pass SpecDefConfig(site_map=...)
    ```
    """

    docs_page = "docs/architectures.md"


SITE_MAP_HELP = (
    "Pass an explicit site map: SpecDefConfig(site_map=[{'site': 'attn.vo', 'layer': 0, "
    "'producers': [{'name': '<v>.weight', 'axis': 0, 'start': 0, 'stop': 64}], "
    "'consumers': [{'name': '<o>.weight', 'axis': 1, 'start': 0, 'stop': 64}]}, ...]) "
    "or register the architecture with hf_specdef.sites.register_architecture(ArchSpec(...))."
)


def pairs_from_site_map(site_map: Sequence[Mapping[str, Any]], shape_of: Mapping[str, Sequence[int]]) -> list[Pair]:
    """Pairs from an explicit site map, checked against the model's tensor names and shapes."""
    pairs = [Pair.from_dict(dict(d)) for d in site_map]
    for p in pairs:
        for b in p.producers + p.consumers:
            if b.name not in shape_of:
                raise ValueError(f"site_map names tensor {b.name!r}, which the model does not have.")
            n = shape_of[b.name][b.axis] if b.axis < len(shape_of[b.name]) else -1
            if not 0 <= b.start < b.stop <= n or b.stop - b.start != p.size:
                raise TensorShapeError(b.name, f"site_map block {b.to_dict()} does not fit {b.name!r} of shape "
                                               f"{tuple(shape_of[b.name])}.")
    return pairs


def check_blocks(pairs: Sequence[Pair], shape_of: Mapping[str, Sequence[int]]) -> None:
    """Every block of every pair lies inside its tensor and the blocks of one pair have one size, else
    :class:`TensorShapeError` naming the tensor, its shape, the block the site needs and the fix (checked on the
    shapes alone, before any tensor is read)."""
    for p in pairs:
        for b in p.producers + p.consumers:
            shape = tuple(int(x) for x in shape_of[b.name])
            n = shape[b.axis] if b.axis < len(shape) else 0
            if 0 <= b.start < b.stop <= n and b.stop - b.start == p.size:
                continue
            raise TensorShapeError(b.name, (
                f"tensor {b.name!r} has shape {shape}, but the {p.site} site of layer {p.layer} ({p.key}) needs entries "
                f"{b.start}..{b.stop} along axis {b.axis} (a {p.size}-entry block, so a size of at least {b.stop} there): "
                "the weight may be stored transposed (a torch Linear weight is (out_features, in_features)) or "
                "config.json may not match the weights; re-save the tensor in the architecture's layout or fix "
                "config.json."))


def pairs_for(
    config: Any, shape_of: Mapping[str, Sequence[int]], cfg: SpecDefConfig, class_name: str | None = None
) -> list[Pair]:
    """All pairs of a model (before the config's site/layer selection).

    Raises :class:`NoSitesError` for an architecture the registry does not know and no site map.
    Raises :class:`ModelConfigError` for config fields the registry cannot use (missing, not a positive
    integer, inconsistent) and :class:`TensorShapeError` for a tensor whose shape does not match its site.
    """
    if cfg.site_map is not None:
        return pairs_from_site_map(cfg.site_map, shape_of)
    model_type = cfg_get(config, "model_type")
    spec = lookup(model_type, class_name or cfg_get(config, "_class_name"))
    if spec is None:
        raise NoSitesError(
            f"hf-specdef has no site registry entry for model_type={model_type!r} (class {class_name!r}); "
            f"known: {known_architectures()}. {SITE_MAP_HELP}"
        )
    pairs = find_pairs(spec, config, shape_of)
    check_blocks(pairs, shape_of)
    if not pairs:
        raise NoSitesError(f"the {spec.name} site registry found no pairs in this model's tensors. {SITE_MAP_HELP}")
    return pairs


def absent_sites(cfg: SpecDefConfig, pairs: Sequence[Pair], config: Any, class_name: str | None = None) -> list[str]:
    """``"site type 'mlp': this architecture has none (why)"`` for each site type of ``cfg`` that ``pairs`` (all pairs
    of the model) lack; the reason comes from the registry entry's ``absent`` where it gives one."""
    spec = lookup(cfg_get(config, "model_type"), class_name or cfg_get(config, "_class_name"))
    why = dict(spec.absent) if spec is not None else {}
    have = {p.site for p in pairs}
    return [f"site type {s!r}: this architecture has none" + (f" ({why[s]})" if s in why else "")
            for s in cfg.sites if s not in have]


_OFFSET_EXACT = ("torch.float32", "torch.float64")  # storage dtypes in which an offset block can be scaled


def drop_inexact(pairs: Sequence[Pair], dtype_of: Callable[[str], Any]) -> tuple[list[Pair], list[str]]:
    """The pairs whose deformation can be exact in their tensors' storage dtype, and why the others were left out.

    A block with an offset (Gemma's norm weight ``w`` acting as ``1 + w``) is stored as ``alpha (1 + w) - 1``,
    which a half-precision format rounds (bfloat16 at alpha=1024: about 0.4% of the channel's gain), so such
    pairs are kept only in float32/float64.
    """
    keep, skipped = [], []
    for p in pairs:
        bad = next((b for b in p.producers + p.consumers if b.offset and str(dtype_of(b.name)) not in _OFFSET_EXACT), None)
        if bad is None:
            keep.append(p)
            continue
        dtype = str(dtype_of(bad.name)).replace("torch.", "")
        skipped.append(f"{p.key}: {bad.name} acts as {bad.offset:g} + w; alpha ({bad.offset:g} + w) - {bad.offset:g} has no "
                       f"exact {dtype} value, so the pair would not keep the function (protect in float32 to include it)")
    return keep, skipped


def select_pairs(pairs: Sequence[Pair], cfg: SpecDefConfig) -> list[Pair]:
    """The pairs ``cfg`` asks for (site types and layers). Raises if that is none of them."""
    by_site = [p for p in pairs if p.site in cfg.sites]
    if cfg.layers == "cross-attention":
        by_site = [p for p in by_site if "cross-attention" in p.tags]
    chosen = cfg.select_layers([p.layer for p in pairs]) if pairs else set()
    selected = [p for p in by_site if p.layer in chosen]
    if not selected:
        have = sorted({p.site for p in pairs})
        raise NoSitesError(
            f"SpecDefConfig(sites={list(cfg.sites)}, layers={cfg.layers!r}) matches no pair of this model "
            f"(it has site types {have}). Choose sites among those, or pass a site map. {SITE_MAP_HELP}"
        )
    return selected
