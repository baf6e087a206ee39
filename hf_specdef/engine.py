"""Deform a list of pairs in a ``name -> tensor`` mapping, in place (no Hugging Face imports).

This is shared by in-memory protection (the mapping holds a model's parameters) and the
streaming path (it holds tensors read from checkpoint shards).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import linalg
from .config import SpecDefConfig
from .linalg import Deformation
from .sites.base import Pair, TensorBlock

logger = logging.getLogger("hf_specdef")

Tensors = MutableMapping[str, torch.Tensor]


class PrecisionBudgetError(ValueError):
    """The storage dtype cannot hold the deformation within the tolerance (SPEC §2)."""


@dataclass
class PairResult:
    """What was done to one pair."""

    pair: Pair
    mode: str
    deformation: Deformation
    sigma_before: float
    sigma_after: float
    dtype: str

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        d = {
            "site": self.pair.site, "layer": self.pair.layer, "block": self.pair.block, "group": self.pair.group,
            "mode": self.mode, "factor": self.deformation.factor, "k": self.deformation.k,
            "hot": list(self.pair.hot_modules), "cold": list(self.pair.cold_modules),
            "sigma_before": self.sigma_before, "sigma_after": self.sigma_after, "dtype": self.dtype,
        }
        if full:
            d["pair"] = self.pair.to_dict()
            d["deformation"] = self.deformation.to_record()
        return d


@dataclass
class Plan:
    """The effective mode and factor of each pair, decided before any tensor is touched."""

    pair: Pair
    axis: bool
    factor: float
    budget: float
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)


def producer_block(pair: Pair, tensors: Tensors,
                   region: Callable[[TensorBlock], torch.Tensor] | None = None) -> torch.Tensor:
    """The ``d x n`` matrix whose spectrum the pair deforms: its weight producers side by side.

    1-D producers (norm weights) are used only when there is no weight matrix. With a single
    producer the result may be a view of the weight (no copy): read it, do not modify it.
    ``region`` gives the slice of one producer (default: ``tensors[b.name]`` narrowed to the block);
    the streaming path passes one that reads the slice from a checkpoint.
    """
    if region is None:
        def region(b: TensorBlock) -> torch.Tensor:
            return tensors[b.name].narrow(b.axis, b.start, b.stop - b.start)
    regions = [(b, region(b)) for b in pair.producers]
    mats = [(b, r) for b, r in regions if r.dim() >= 2] or regions
    parts = [linalg.as_rows(r, b.axis) for b, r in mats]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p.to(parts[0].device) for p in parts], dim=1)


def plan_pairs(pairs: Sequence[Pair], tensors: Tensors, cfg: SpecDefConfig) -> list[Plan]:
    """Decide mode and factor per pair and check the precision budget for the storage dtype.

    With ``cfg.precision == "refuse"`` a budget violation raises :class:`PrecisionBudgetError`
    that explains the options; ``"axis"`` switches the pair to axis mode with a power-of-two
    alpha; ``"float32"`` keeps the pair's tensors in float32 (the caller upcasts them).
    """
    check_finite(pairs, tensors)
    plans = []
    for p in pairs:
        dtype = tensors[p.producers[0].name].dtype
        axis = cfg.mode == "axis" or p.axis_only
        budget = linalg.spectral_budget(axis, cfg.alpha, dtype)
        plan = Plan(p, axis, float(cfg.alpha), budget, dtype)
        if budget > cfg.tolerance:
            _resolve_budget(plan, cfg)
        plans.append(plan)
    return plans


def _resolve_budget(plan: Plan, cfg: SpecDefConfig) -> None:
    if cfg.precision == "refuse":
        pow2 = linalg.nearest_power_of_two(cfg.alpha)
        raise PrecisionBudgetError(
            f"Precision budget exceeded: {'axis' if plan.axis else 'spectral'} mode with alpha={cfg.alpha:g} stored in "
            f"{plan.dtype} adds a relative output error of about {plan.budget:.2g} (unit roundoff "
            f"{linalg.unit_roundoff(plan.dtype):.2g}{', amplified by alpha' if not plan.axis else ''}), "
            f"above tolerance={cfg.tolerance:g}; the protected model would be "
            f"broken (first pair: {plan.pair.key}). Options: load/protect in float32; or "
            f"SpecDefConfig(precision='float32') to upcast the model to float32; or "
            f"SpecDefConfig(mode='axis', alpha={pow2:g}) (a power of two is bit-exact in float32/bfloat16; "
            f"precision='axis' does this switch automatically)."
        )
    if cfg.precision == "axis":
        plan.axis, plan.factor = True, linalg.nearest_power_of_two(cfg.alpha)
        plan.budget = 0.0
        plan.notes.append(f"precision='axis': axis mode with alpha={plan.factor:g} ({plan.dtype})")
    else:  # float32
        plan.dtype = torch.float32
        plan.budget = linalg.spectral_budget(plan.axis, cfg.alpha, torch.float32)
        plan.notes.append("precision='float32': protected model stored in float32")
        if plan.budget > cfg.tolerance:
            raise PrecisionBudgetError(
                f"even float32 cannot hold alpha={cfg.alpha:g} in spectral mode within tolerance={cfg.tolerance:g} "
                f"(expected error {plan.budget:.2g}); lower alpha, raise tolerance, or use mode='axis' with a power-of-two alpha."
            )


def check_finite(pairs: Sequence[Pair], tensors: Tensors) -> None:
    """Refuse NaN/inf weights: each tensor the pairs touch is checked once (a sum first, which is cheap; the sums
    of the tensors on one device are checked together, one host transfer per device)."""
    names = list(dict.fromkeys(n for p in pairs for n in p.names()))
    by_device: dict[torch.device, list[str]] = {}
    for name in names:
        by_device.setdefault(tensors[name].device, []).append(name)
    for group in by_device.values():
        sums = torch.stack([tensors[n].sum().float() for n in group])
        if bool(torch.isfinite(sums).all()):
            continue
        for name, ok in zip(group, torch.isfinite(sums).tolist(), strict=True):
            if not ok and not torch.isfinite(tensors[name]).all():
                raise ValueError(f"tensor {name!r} has NaN or inf values; refusing to deform a broken weight.")


_EXACT_SIDE = 256  # blocks whose short side is at most this get an exact sigma_1 in the report


def sigma_max(block: torch.Tensor, iters: int = 4) -> float:
    """Largest singular value of a block, for the report: exact (to float32) when the short side is <= 256, else
    ``iters`` float32 power iterations warm-started at the largest row (a lower bound, close for the
    weight blocks here)."""
    if min(block.shape) <= _EXACT_SIDE:  # eigenvalues of the small float32 Gram matrix (relative error ~1e-7)
        a = block.to(torch.promote_types(block.dtype, torch.float32))
        gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
        return float(linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())
    a = block.float()
    v = a[a.norm(dim=1).argmax()].clone()
    for _ in range(iters):
        v = a.T @ (a @ v)
        v = v / v.norm().clamp_min(torch.finfo(a.dtype).tiny)
    return float((a @ v).norm())


def apply_pair(pair: Pair, tensors: Tensors, m: Deformation, inverse: bool = False) -> None:
    """Apply ``M`` to the producers and ``M^-1`` to the consumers (the inverse with ``inverse``)."""
    for b in pair.producers:
        linalg.apply_producer(tensors[b.name], b.axis, b.start, b.stop, m, inverse)
    for b in pair.consumers:
        linalg.apply_consumer(tensors[b.name], b.axis, b.start, b.stop, m, inverse)


def build_deformation(plan: Plan, block: torch.Tensor, cfg: SpecDefConfig) -> tuple[Deformation, float, float]:
    """``M`` for one pair from its current producer block, and sigma_1 of the block before and after ``M``.

    Spectral pairs: ``M`` from the top-k decomposition, which also gives sigma_1 (after = factor x before,
    exact in real arithmetic). Axis pairs: sigma_1 measured (see :func:`sigma_max`; small blocks exactly,
    before and after from one Gram matrix).
    """
    if not plan.axis:
        u, s = linalg.top_left_singular(block, cfg.top_k)
        return Deformation(block.shape[0], plan.factor, basis=u), float(s[0]), plan.factor * float(s[0])
    a = block.to(torch.promote_types(block.dtype, torch.float32))  # converted once (16-bit weights), else no copy
    m = linalg.axis_deformation(a, cfg.top_k, plan.factor, rotary_half=plan.pair.rotary)
    if block.shape[0] <= min(block.shape[1], _EXACT_SIDE):  # d x d Gram G; after M: D G D
        gram = a @ a.T
        d = torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
        d[m.indices.to(d.device)] = plan.factor
        before, after = linalg.eigvalsh(torch.stack([gram, gram * d[:, None] * d[None, :]]))[:, -1]
        return m, float(before.clamp_min(0).sqrt()), float(after.clamp_min(0).sqrt())
    return m, (s0 := sigma_max(a)), _axis_sigma_after(a, m, s0)


def _axis_sigma_after(block: torch.Tensor, m: Deformation, sigma_before: float) -> float:
    """sigma_1 of ``M @ block`` for an axis ``M`` (``block`` taken before ``M``): exact on small blocks; on
    large ones the max of sigma_1 of the ``k`` scaled rows and ``sigma_before`` (a lower bound within a factor
    sqrt(2), tight when alpha >> 1)."""
    if min(block.shape) <= _EXACT_SIDE:
        after = block.clone()
        linalg.apply_producer(after, 0, 0, block.shape[0], m)
        return sigma_max(after)
    rows = block.index_select(0, m.indices.to(block.device)).to(torch.promote_types(block.dtype, torch.float32))
    return max(m.factor * float(linalg.top_singular_values(rows, 1)[0]), sigma_before)


def deform_pair(
    plan: Plan, tensors: Tensors, cfg: SpecDefConfig, before_apply: Callable[[Deformation], None] | None = None
) -> PairResult:
    """Build ``M`` for one pair from its current producer block and apply it in place.

    sigma_1 of the producer block is reported before and after (see :func:`build_deformation`).
    """
    block = producer_block(plan.pair, tensors)
    m, s0, s1 = build_deformation(plan, block, cfg)  # before apply_pair: ``block`` may be a view of the weight
    if before_apply is not None:
        before_apply(m)
    apply_pair(plan.pair, tensors, m)
    return result_of(plan, m, s0, s1)


def result_of(plan: Plan, m: Deformation, sigma_before: float, sigma_after: float) -> PairResult:
    """The :class:`PairResult` of a deformed pair."""
    return PairResult(plan.pair, "axis" if plan.axis else "spectral", m, sigma_before, sigma_after,
                      str(plan.dtype).replace("torch.", ""))


def deform(plans: Iterable[Plan], tensors: Tensors, cfg: SpecDefConfig) -> list[PairResult]:
    """Deform every planned pair in order (the order matters: pairs may share tensors)."""
    return [deform_pair(p, tensors, cfg) for p in plans]


def undo(results: Sequence[PairResult], tensors: Tensors) -> None:
    """Apply the inverse of every result, last first (exact in axis mode, to rounding otherwise)."""
    for r in reversed(results):
        apply_pair(r.pair, tensors, r.deformation, inverse=True)
