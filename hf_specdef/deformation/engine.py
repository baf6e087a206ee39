"""Plan, build, apply, verify: the deformation of pairs in a ``name -> tensor`` mapping (no Hugging Face imports).

This is shared by in-memory protection (the mapping holds a model's parameters) and the streaming path (it holds
tensors read from checkpoint shards). :func:`plan_pairs` gives every pair a :class:`Plan` whose ``variant``
(:mod:`hf_specdef.deformation.variants`) decides ``M`` (``build``), turns it into steps (``steps``, applied with
:func:`hf_specdef.deformation.tensor_ops.apply_steps`) and checks it (``before_apply`` / ``check``);
:func:`deform_pair` runs those stages for one pair, :func:`deform` for a list, one pair at a time, through the same
driver as the batched engine (:func:`hf_specdef.deformation.batched.deform`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import precision, variants
from hf_specdef.deformation.blocks import EXACT_SIDE as _EXACT_SIDE  # noqa: F401 - re-exported
from hf_specdef.deformation.blocks import Region, Tensors, producer_block, sigma_max, spectrum_block  # noqa: F401
from hf_specdef.deformation.precision import PrecisionBudgetError  # noqa: F401 - re-exported (hf_specdef.PrecisionBudgetError)
from hf_specdef.deformation.tensor_ops import TensorOp, apply_steps, steps_by_tensor
from hf_specdef.deformation.variants import Decision, DeformationVariant
from hf_specdef.errors import SpecDefError
from hf_specdef.sites.base import Pair, TensorBlock
from hf_specdef.tensor_math import linalg
from hf_specdef.tensor_math.linalg import Deformation

logger = logging.getLogger("hf_specdef")


class DeformationError(SpecDefError, ValueError):
    """A pair could not be deformed from its weights: a value so large that deciding the pair overflows (a
    non-finite intermediate), or a decision (sigma_1) that is not finite. The message names the tensor."""

    docs_page = "docs/releases.md"


_F32_MAX = float(torch.finfo(torch.float32).max)


def largest_safe_value(row_length: int, factor: float) -> float:
    """The largest magnitude a producer entry may have for deciding a pair to stay finite: the deformation's
    float32 arithmetic (Gram matrices, sigma_1 before and after) sums the squares of ``row_length`` entries per
    channel, scaled by ``factor``."""
    return math.sqrt(_F32_MAX / max(row_length, 1)) / max(factor, 1.0 / factor if factor > 0 else 1.0, 1.0)


def overflow_error(plan: Plan, read: Region, where: Callable[[str], str] | None = None,
                   source: Region | None = None) -> DeformationError | None:
    """Why deciding ``plan``'s pair failed or gave a non-finite sigma_1, when a producer holds values too large to
    deform (see :func:`largest_safe_value`): a :class:`DeformationError` naming the tensor, its largest value and the
    limit (``where(name)`` prefixes it, e.g. with the file). ``None`` when no value is that large (or NaN/inf, which
    the callers report as a broken weight): the failure has another cause, and the caller re-raises it.
    ``read(block)`` gives a producer block's current values (earlier pairs' steps applied); ``source(block)``, where
    given, its values as stored (what the message quotes, with the current ones when they differ)."""
    peaks, row = [], 0
    for b in plan.pair.producers:
        t = read(b)
        if t.numel() == 0:
            continue
        peaks.append((float(t.detach().abs().max()), b))
        row += t.numel() // max(b.stop - b.start, 1)
    if not peaks:
        return None
    peak, b = max(peaks, key=lambda x: x[0] if math.isfinite(x[0]) else -1.0)
    limit = largest_safe_value(row, plan.factor)
    if not (math.isfinite(peak) and peak > limit):
        return None
    prefix = where(b.name) if where is not None else ""
    stored = float(source(b).detach().abs().max()) if source is not None else peak
    if source is None:
        now = " (its values with the steps of earlier pairs, if any, applied)"
    else:
        now = f" ({peak:.3g} after the steps of earlier pairs)" if f"{stored:.3g}" != f"{peak:.3g}" else ""
    return DeformationError(
        f"{prefix}tensor {b.name!r} has values up to {stored:.3g}{now}, too large to deform: deciding pair "
        f"{plan.pair.key} (site {plan.pair.site}, factor {plan.factor:g}) sums the squares of its {row} "
        f"entr{'y' if row == 1 else 'ies'} per channel, which "
        f"overflows float32 (a non-finite intermediate) for values above {limit:.2g}. Trained weights are far "
        "smaller, so the tensor is likely corrupted: repair or re-export it, or leave this site out "
        "(SpecDefConfig(sites=...) / --sites).")


def not_finite_error(plan: Plan, sigma_before: float, sigma_after: float, prefix: str = "") -> DeformationError:
    """The error for a decision whose sigma_1 is not finite and whose weights are neither NaN/inf nor too large."""
    return DeformationError(
        f"{prefix}pair {plan.pair.key} (producers {', '.join(dict.fromkeys(b.name for b in plan.pair.producers))}): "
        f"sigma_1 {sigma_before:g} -> {sigma_after:g} is not finite (a non-finite intermediate); the weights may be "
        "corrupted: check them, or leave this site out (SpecDefConfig(sites=...) / --sites).")


def checked_deformation(plan: Plan, block: torch.Tensor, cfg: SpecDefConfig, read: Region,
                        region: Region | None = None) -> tuple[Deformation, float, float]:
    """:func:`build_deformation`, with a failure of its arithmetic (a solver that does not converge, a non-finite
    sigma_1) explained by :func:`overflow_error` where a producer value is too large to deform. ``read`` gives a
    producer block's values (for the explanation); NaN/inf weights are refused before (:func:`check_finite`)."""
    try:
        m, s0, s1 = build_deformation(plan, block, cfg, region)
    except RuntimeError:  # e.g. torch.linalg's solver failing on an inf Gram matrix
        err = overflow_error(plan, read)
        if err is None:
            raise
        raise err from None
    if not (math.isfinite(s0) and math.isfinite(s1)):
        raise overflow_error(plan, read) or not_finite_error(plan, s0, s1)
    return m, s0, s1


@dataclass
class PairResult:
    """What was done to one pair."""

    pair: Pair
    mode: str
    deformation: Deformation
    sigma_before: float
    sigma_after: float
    dtype: str
    policy: str = ""  # what the precision policy did to the pair ("" = as requested; see precision.resolve)

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        d = {
            "site": self.pair.site, "layer": self.pair.layer, "block": self.pair.block, "group": self.pair.group,
            "mode": self.mode, "factor": self.deformation.factor, "k": self.deformation.k,
            "hot": list(self.pair.hot_modules), "cold": list(self.pair.cold_modules),
            "sigma_before": self.sigma_before, "sigma_after": self.sigma_after, "dtype": self.dtype,
        }
        if self.policy:
            d["policy"] = self.policy
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
    policy: str = ""  # "" (as requested), "axis", "axis-float16" or "float32" (see precision.resolve)
    skip: str = ""  # why the policy leaves this pair out ("" = deformed)
    # how M is decided, applied and checked (hf_specdef.deformation.variants); default: from ``axis``, set again by
    # plan_pairs once the precision policy has decided the mode
    variant: DeformationVariant = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.variant is None:
            self.variant = variants.variant_for(self)


def plan_pairs(pairs: Sequence[Pair], tensors: Tensors, cfg: SpecDefConfig,
               skipped: list[str] | None = None) -> list[Plan]:
    """Decide mode and factor per pair and fit them into the storage dtype (``cfg.precision``, see
    :func:`hf_specdef.deformation.precision.resolve`): raises :class:`PrecisionBudgetError` when the policy refuses.
    With ``"float32"`` the pair's tensors are to be kept in float32 (the caller upcasts them).

    Pairs the policy cannot keep exact are left out (``precision="auto"``: ``attn.qk`` in float16), their
    reasons appended to ``skipped``; when none is left, :class:`PrecisionBudgetError`.
    ``cfg.quantization_safe`` is planned by :func:`hf_specdef.deformation.quantization_safe.plan_safe` (in-memory
    protection of transformers models); here it is refused with the paths that support it.
    """
    if getattr(cfg, "quantization_safe", ()):
        raise ValueError(
            f"SpecDefConfig(quantization_safe={list(cfg.quantization_safe)}) is supported by in-memory protection of "
            "transformers models (protect(model, cfg), save_protected(model, dir, cfg), from_pretrained(..., "
            "specdef_config=cfg)); streaming protection (protect_checkpoint, `hf-specdef protect/publish`) and "
            "diffusers pipelines do not support it yet. Load the model, protect it in memory, then save_pretrained."
        )
    check_finite(pairs, tensors)
    plans, left_out = [], {}
    for p in pairs:
        dtype = tensors[p.producers[0].name].dtype
        axis = cfg.mode == "axis" or p.axis_only
        budget = linalg.spectral_budget(axis, cfg.alpha, dtype)
        plan = Plan(p, axis, float(cfg.alpha), budget, dtype)
        precision.resolve(plan, cfg)
        plan.variant = variants.variant_for(plan)
        if plan.skip:
            left_out.setdefault((p.site, plan.skip), []).append(p.key)
        else:
            plans.append(plan)
    reasons = [f"site {site!r}, {len(keys)} pairs (e.g. {keys[0]}): {why}" for (site, why), keys in left_out.items()]
    if reasons and not plans:
        raise precision.NothingExactError(f"no pair can be deformed exactly in the storage dtype: {reasons[0]}; choose other "
                                   "sites or convert the checkpoint (bfloat16: bit-exact axis mode).")
    if skipped is not None:
        skipped.extend(reasons)
    return plans


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


def apply_pair(pair: Pair, tensors: Tensors, m: Deformation, inverse: bool = False) -> None:
    """Apply ``M`` to the producers and ``M^-1`` to the consumers, in place (the inverse with ``inverse``).

    Args:
        pair: the pair.
        tensors: ``name -> tensor``.
        m: its deformation.
        inverse: undo it instead.
    """
    ops = [TensorOp(b, m, True) for b in pair.producers] + [TensorOp(b, m, False) for b in pair.consumers]
    for name, steps in steps_by_tensor(ops).items():
        apply_steps(tensors[name], steps, inverse)


def build_deformation(plan: Plan, block: torch.Tensor, cfg: SpecDefConfig, region: Region | None = None) -> Decision:
    """``M`` for one spectral or axis pair from its current producer block, and sigma_1 of the block before and after.

    Args:
        plan: the pair's plan (its variant decides: :class:`~hf_specdef.deformation.variants.SpectralVariant` from
            the top-k decomposition, :class:`~hf_specdef.deformation.variants.AxisVariant` from the top rows).
        block: the producer block (:func:`producer_block`).
        cfg: the configuration (``top_k``).
        region: reads a block's current values; float16-exact pairs (``plan.policy == "axis-float16"``) need it.

    Returns:
        ``(M, sigma_before, sigma_after)``, exactly what the batched engine decides for the pair.
    """
    return plan.variant.decide(plan, block, cfg, region)  # type: ignore[attr-defined]


def checked_build(plan: Plan, tensors: Tensors, cfg: SpecDefConfig) -> Decision | None:
    """``plan.variant.build`` on ``tensors``, with a failure of its arithmetic (a solver that does not converge, a
    non-finite sigma_1) explained by :func:`overflow_error` where a producer value is too large to deform.

    Returns:
        The decision, or ``None`` when the variant skips the pair.

    Raises:
        DeformationError: a producer value too large to deform, or a non-finite sigma_1.
    """
    def read(b: TensorBlock) -> torch.Tensor:
        return tensors[b.name].narrow(b.axis, b.start, b.stop - b.start)

    try:
        built = plan.variant.build(plan, tensors, cfg)
    except RuntimeError:  # e.g. torch.linalg's solver failing on an inf Gram matrix
        err = overflow_error(plan, read)
        if err is None:
            raise
        raise err from None
    if built is not None and not (math.isfinite(built[1]) and math.isfinite(built[2])):
        raise overflow_error(plan, read) or not_finite_error(plan, built[1], built[2])
    return built


def deform_pair(
    plan: Plan, tensors: Tensors, cfg: SpecDefConfig, before_apply: Callable[[Deformation], None] | None = None
) -> PairResult | None:
    """Build ``M`` for one pair from its current weights, apply it in place and check it (the plan's variant).

    Args:
        plan: the pair's plan.
        tensors: ``name -> tensor``, changed in place.
        cfg: the configuration.
        before_apply: called with ``M`` before anything changes (e.g. to back up the rows it changes).

    Returns:
        What was done, or ``None`` when the variant skips the pair (its ``skipped`` says why).

    Raises:
        DeformationError: see :func:`checked_build`; the variant's check may raise too (nothing is restored).
    """
    built = checked_build(plan, tensors, cfg)
    if built is None:
        return None
    m, s0, s1 = built
    if before_apply is not None:
        before_apply(m)
    plan.variant.before_apply(plan, m, tensors)
    plan.variant.apply(plan, m, tensors)
    plan.variant.check(plan, m, tensors)
    return result_of(plan, m, s0, s1)


def result_of(plan: Plan, m: Deformation, sigma_before: float, sigma_after: float) -> PairResult:
    """The :class:`PairResult` of a deformed pair."""
    return PairResult(plan.pair, "axis" if plan.axis else "spectral", m, sigma_before, sigma_after,
                      str(plan.dtype).replace("torch.", ""), plan.policy)


def deform(plans: Iterable[Plan], tensors: Tensors, cfg: SpecDefConfig) -> list[PairResult]:
    """Deform every planned pair in order, one at a time (the order matters: pairs may share tensors).

    The driver is the batched engine's with one pair per wave, so the result is bit-identical to
    :func:`hf_specdef.deformation.batched.deform`'s.

    Returns:
        The results of the pairs not skipped, in plan order.
    """
    from hf_specdef.deformation import batched  # the driver (batched imports this module)

    return batched.deform(list(plans), tensors, cfg, batch=False)


def undo(results: Sequence[PairResult], tensors: Tensors) -> None:
    """Apply the inverse of every result, last first (exact in axis mode, to rounding otherwise)."""
    for r in reversed(results):
        apply_pair(r.pair, tensors, r.deformation, inverse=True)
