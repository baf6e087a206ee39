"""The quantization-safe deformation: axis scaling in whole aligned quantization groups (no Hugging Face imports).

Group-wise quantization (GGUF blocks, int-g128 groups: runs of entries along a weight's *input* dimension, one
float16 scale per run) cannot see a power-of-two scaling of a whole group: the integers stay the same, the stored
scale takes the factor, as long as it stays a normal float16 number. So each pair is deformed by scaling, with one
power of two, channels that are

* whole groups of every tensor the pair scales along its input dimension (the consumer of ``attn.vo`` and ``mlp``,
  every reader of a ``norm``): the channels are chosen in *units*, the runs between group boundaries common to all
  requested formats and all those tensors;
* any channels where every tensor is scaled along its output rows (``attn.qk``: query and key rows, one factor per
  rotary pair): a row scales all its groups together.

Norm weights and biases are not quantized (they stay float in GGUF). The ``norm`` site is *inverted*: the norm
weight channels are divided by alpha and the readers' input columns multiplied by it, so only the readers' scales
grow; the other sites shrink one side's scales, so their factor is bounded per pair by the smallest float16 scale
they touch (:func:`~hf_specdef.quantization.formats.max_exact_factor`). A pair that no unit can serve is skipped
with the reason. Each pair is decided on the current weights (pairs share tensors: a ``q_proj`` is a norm reader and
a qk producer) and checked after it is applied: the round trip of every touched group, in every requested format,
must be exactly the deformed round trip of the group before (:class:`QuantizationSafeVariant`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import torch

from hf_specdef.deformation import engine
from hf_specdef.deformation.variants import Decision, VariantBase
from hf_specdef.errors import SpecDefError
from hf_specdef.quantization.formats import (
    QuantFormat,
    UnsupportedShapeError,
    exact_exponents,
    fake_quantize,
    get_format,
    stored_values,
)
from hf_specdef.sites.base import Pair, TensorBlock
from hf_specdef.tensor_math import linalg
from hf_specdef.tensor_math.linalg import Deformation

logger = logging.getLogger("hf_specdef")

Tensors = MutableMapping[str, torch.Tensor]

INVERTED_SITES = frozenset({"norm"})
"""Sites whose producer is divided by alpha (the norm weight, kept in float) and whose consumers are multiplied."""


MIN_FACTOR = 32.0
"""Smallest factor a bounded pair keeps (or alpha, when smaller): below it a deformation is too weak to slow anything,
and neither the inspector (outlier ratio 20) nor a publisher's claim check could tell it from the weights."""


class QuantizationSafetyError(SpecDefError, ValueError):
    """A deformation that was decided to be quantization-safe is not exact after all; nothing is kept."""

    docs_page = "docs/quantization.md"


def along_input(pair: Pair, block: TensorBlock) -> bool:
    """Whether ``block`` runs along its tensor's input dimension: the consumers of every site but ``attn.qk`` (whose
    key consumer is scaled on its output rows). Producers are output rows, or 1-D norm weights / biases."""
    return block in pair.consumers and pair.site != "attn.qk"


def input_axis(pair: Pair, block: TensorBlock) -> int:
    """The input dimension of a 2-D block's tensor."""
    return block.axis if along_input(pair, block) else 1 - block.axis


def _matrices(pair: Pair, tensors: Mapping[str, torch.Tensor]) -> list[TensorBlock]:
    return [b for b in pair.producers + pair.consumers if tensors[b.name].dim() == 2]


def units(pair: Pair, tensors: Mapping[str, torch.Tensor], formats: Sequence[QuantFormat]) -> list[torch.Tensor]:
    """The channel sets (indices into the pair's block) that can be scaled as a whole: runs between the group
    boundaries every format puts in every tensor the pair scales along its input dimension; single channels (rotary
    pairs) when there is none. Raises :class:`UnsupportedShapeError` when a tensor does not fit a format."""
    mats = _matrices(pair, tensors)
    for b in mats:
        width = tensors[b.name].shape[input_axis(pair, b)]
        for f in formats:
            f.boundaries(width)
    constraining = [b for b in mats if along_input(pair, b)]
    d = pair.size
    if not constraining:
        if pair.rotary:
            return [linalg.pair_indices(torch.tensor([i]), d, pair.rotary) for i in range(d // 2)]
        return [torch.tensor([i]) for i in range(d)]
    if pair.rotary:
        raise UnsupportedShapeError("a rotary pair scaled along an input dimension is not supported")
    edges = set(range(d + 1))
    for b in constraining:
        for f in formats:
            edges &= {x - b.start for x in f.boundaries(tensors[b.name].shape[b.axis]) if b.start <= x <= b.stop}
    edges_sorted = sorted(edges)
    return [torch.arange(a, c) for a, c in zip(edges_sorted, edges_sorted[1:], strict=False)]


def _region(t: torch.Tensor, block: TensorBlock, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(block.axis, (idx + block.start).to(t.device))


@dataclass
class QuantizationSafeVariant(VariantBase):
    """The quantization-safe :class:`~hf_specdef.deformation.variants.DeformationVariant` of one pair: decides its
    deformation on the current weights and checks it once applied.

    Set as ``Plan.variant`` by :func:`plan_safe`: ``build`` returns ``(M, sigma_before, sigma_after)`` or ``None``
    (the pair is skipped; ``skipped`` says why), ``before_apply``/``check`` bracket the application and raise
    :class:`QuantizationSafetyError` if a round trip is not exactly the deformed one. Decided pair by pair
    (``batchable = False``).

    Args:
        pair: the pair.
        alpha: the largest factor (a power of two).
        top_k: how many units to scale.
        formats: the quantization formats to stay exact in.
    """

    pair: Pair
    alpha: float
    top_k: int
    formats: tuple[QuantFormat, ...]
    skipped: str | None = None
    note: str | None = None
    _before: dict[tuple[str, int, str], torch.Tensor] = field(default_factory=dict, repr=False)
    name = "quantization-safe"
    batchable = False

    def reads(self, plan: engine.Plan) -> Sequence[TensorBlock]:
        return self.pair.producers + self.pair.consumers

    @property
    def inverted(self) -> bool:
        return self.pair.site in INVERTED_SITES

    def _scale_of(self, block: TensorBlock, factor: float) -> float:
        """What ``apply_pair`` multiplies ``block``'s chosen channels by."""
        return factor if block in self.pair.producers else 1.0 / factor

    def _unit_bounds(self, cands: Sequence[torch.Tensor], tensors: Mapping[str, torch.Tensor],
                     factor: float) -> list[float]:
        """Per candidate unit, the largest power-of-two factor every float16 scale it touches takes exactly."""
        exps = torch.full((len(cands),), math.inf, dtype=torch.float64)
        cache: dict[tuple[str, str, bool], torch.Tensor] = {}  # a tensor can hold several blocks (q heads)
        for b in _matrices(self.pair, tensors):
            t, axis = tensors[b.name], input_axis(self.pair, b)
            grow = self._scale_of(b, factor) > 1
            for f in self.formats:
                key = (b.name, f.name, grow)
                if key not in cache:  # (rows, groups, n)
                    cache[key] = exact_exponents(stored_values(t, f, axis), grow).to("cpu", torch.float64)
                e = cache[key]
                if along_input(self.pair, b):
                    per_group = e.amin(dim=(0, 2))
                    starts = torch.tensor(f.boundaries(t.shape[axis])[:-1], dtype=torch.long)
                    gid = torch.bucketize(torch.arange(t.shape[axis]), starts, right=True) - 1
                    unit_e = [per_group[gid[u + b.start]].min() for u in cands]
                else:
                    per_row = e.amin(dim=(1, 2))
                    unit_e = [per_row[u + b.start].min() for u in cands]
                exps = torch.minimum(exps, torch.stack(unit_e))
        return [float(2.0**x) for x in exps.tolist()]

    def build(self, plan: engine.Plan, tensors: Mapping[str, torch.Tensor], cfg: object = None,
              region: object = None) -> Decision | None:
        """The pair's decision on the current ``tensors``, or ``None`` (skipped, ``skipped`` says why).

        Args:
            plan: the pair's plan (its ``pair`` is this variant's).
            tensors: ``name -> tensor`` (whole tensors: the group scales are read from them).
            cfg, region: unused (the variant carries its own settings; it never streams).

        Returns:
            ``(M, sigma_before, sigma_after)`` or ``None``.

        Raises:
            ValueError: a top-k or shape the units cannot serve is reported through ``skipped``, not raised.
        """
        try:
            cands = units(self.pair, tensors, self.formats)
        except UnsupportedShapeError as e:
            self.skipped = f"{self.pair.key}: {e}"
            return None
        names = "/".join(f.name for f in self.formats)
        if not cands:
            self.skipped = (f"{self.pair.key}: its blocks of {self.pair.size} channels hold no whole {names} group "
                            f"(groups of {max(f.block for f in self.formats)} along the input dimension)")
            return None
        if len(cands) <= self.top_k:
            self.skipped = (f"{self.pair.key}: only {len(cands)} whole {names} unit(s) fit its {self.pair.size} "
                            f"channels; scaling all of them (top_k={self.top_k}) would be a global scale, not a "
                            "deformation")
            return None
        factor = 1.0 / self.alpha if self.inverted else self.alpha
        rows = engine.producer_block(self.pair, tensors)
        energy = rows.to(torch.float64).pow(2).sum(dim=1)
        bounds = self._unit_bounds(cands, tensors, factor)
        energy = energy.cpu()
        ranked = sorted(((bounds[i], float(energy[u].sum()), i) for i, u in enumerate(cands)),
                        key=lambda x: (-min(x[0], self.alpha), -x[1]))
        chosen = ranked[: self.top_k]
        f = min(self.alpha, min(c[0] for c in chosen))
        if f < min(self.alpha, MIN_FACTOR):
            self.skipped = (f"{self.pair.key}: its float16 {names} scales allow a factor of {f:g} at most (a scale "
                            f"would leave the normal range beyond); below {min(self.alpha, MIN_FACTOR):g} the "
                            "deformation is too weak to count")
            return None
        if f < self.alpha:
            self.note = f"{self.pair.key}: alpha bounded to {f:g} by the float16 quantization scales"
        idx = torch.sort(torch.cat([cands[c[2]] for c in chosen])).values.to(torch.long)
        m = Deformation(self.pair.size, 1.0 / f if self.inverted else f, indices=idx)
        s0, s1 = sigma_before_after(self.pair, tensors, m)
        return m, s0, s1

    def before_apply(self, plan: engine.Plan, m: Deformation, tensors: Mapping[str, torch.Tensor]) -> None:
        """Record the quantized round trip of every group ``m`` is about to change."""
        self._before = self._round_trips(m, tensors)

    def check(self, plan: engine.Plan, m: Deformation, tensors: Mapping[str, torch.Tensor]) -> None:
        """Compare the round trips after the application with the deformed ones before.

        Raises:
            QuantizationSafetyError: a round trip is not exactly the deformed one.
        """
        for (name, i, fmt), now in self._round_trips(m, tensors).items():
            b = (self.pair.producers + self.pair.consumers)[i]
            expected = self._before[(name, i, fmt)] * self._scale_of(b, m.factor)
            if not torch.equal(now, expected):
                raise QuantizationSafetyError(
                    f"{self.pair.key}: the {fmt} round trip of {name} is not exactly the deformed one (max difference "
                    f"{float((now - expected).abs().max()):.3g}); refusing to claim quantization safety."
                )
        self._before = {}

    def _round_trips(self, m: Deformation, tensors: Mapping[str, torch.Tensor]) -> dict[tuple[str, int, str], torch.Tensor]:
        out = {}
        for i, b in enumerate(self.pair.producers + self.pair.consumers):
            t = tensors[b.name]
            if t.dim() != 2:
                continue
            region = _region(t, b, m.indices)
            for f in self.formats:
                out[(b.name, i, f.name)] = fake_quantize(region, f, input_axis(self.pair, b))
        return out


def sigma_before_after(pair: Pair, tensors: Mapping[str, torch.Tensor], m: Deformation) -> tuple[float, float]:
    """sigma_1 of the inflated block before and after ``m`` (see :func:`hf_specdef.deformation.blocks.sigma_max`)."""
    block = engine.spectrum_block(pair, tensors, m.factor)
    a = block.to(torch.promote_types(block.dtype, torch.float32), copy=True)
    before = engine.sigma_max(a)
    grow = m.factor if m.factor >= 1 else 1.0 / m.factor
    idx = m.indices.to(a.device)
    a.index_copy_(0, idx, a.index_select(0, idx) * grow)
    return before, engine.sigma_max(a)


def plan_safe(pairs: Sequence[Pair], tensors: Tensors, alpha: float, top_k: int,
              formats: Sequence[str]) -> list[engine.Plan]:
    """Plans whose variant (:class:`QuantizationSafeVariant`) makes each pair quantization-safe for ``formats`` at
    deform time (axis mode, power-of-two factor at most ``alpha``).

    Args:
        pairs: the selected pairs.
        tensors: ``name -> tensor`` (checked for NaN/inf).
        alpha: the largest factor, a power of two.
        top_k: units to scale per pair.
        formats: quantization format names.

    Returns:
        One plan per pair.

    Raises:
        ValueError: NaN/inf weights, or ``alpha`` not a power of two.
    """
    engine.check_finite(pairs, tensors)
    if not linalg.is_power_of_two(alpha):
        raise ValueError(f"a quantization-safe deformation needs a power-of-two alpha, got {alpha:g} "
                         f"(e.g. {linalg.nearest_power_of_two(alpha):g}).")
    fmts = tuple(get_format(f) for f in formats)
    plans = []
    for p in pairs:
        variant = QuantizationSafeVariant(p, float(alpha), top_k, fmts)
        plans.append(engine.Plan(p, True, float(alpha), 0.0, tensors[p.producers[0].name].dtype, variant=variant))
    return plans


SafeGuard = QuantizationSafeVariant  # the former name (``Plan.guard``)
