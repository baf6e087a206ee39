"""Deform a list of pairs in a ``name -> tensor`` mapping, in place (no Hugging Face imports).

This is shared by in-memory protection (the mapping holds a model's parameters) and the
streaming path (it holds tensors read from checkpoint shards).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import precision
from hf_specdef.deformation.precision import PrecisionBudgetError  # noqa: F401 - re-exported (hf_specdef.PrecisionBudgetError)
from hf_specdef.errors import SpecDefError
from hf_specdef.sites.base import Pair, TensorBlock
from hf_specdef.tensor_math import exact_scaling, linalg
from hf_specdef.tensor_math.linalg import Deformation

logger = logging.getLogger("hf_specdef")

Tensors = MutableMapping[str, torch.Tensor]
Region = Callable[[TensorBlock], torch.Tensor]


class DeformationError(SpecDefError, ValueError):
    """A pair could not be deformed from its weights: a value so large that deciding the pair overflows (a
    non-finite intermediate), or a decision (sigma_1) that is not finite. The message names the tensor."""


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
    # a chooser/checker that decides M on the current weights and checks it once applied (the quantization-safe
    # deformation, hf_specdef.deformation.quantization_safe.SafeGuard): build(tensors) -> (M, sigma0, sigma1) or None
    # (skip), before(M, tensors) / after(M, tensors) around apply_pair
    guard: Any = None


def producer_block(pair: Pair, tensors: Tensors,
                   region: Callable[[TensorBlock], torch.Tensor] | None = None) -> torch.Tensor:
    """The ``d x n`` matrix whose spectrum the pair deforms: its weight producers side by side.

    1-D producers (norm weights) are used only when there is no weight matrix. With a single
    producer the result may be a view of the weight (no copy): read it, do not modify it.
    ``region`` gives the slice of one producer (default: ``tensors[b.name]`` narrowed to the block);
    the streaming path passes one that reads the slice from a checkpoint. A block with an ``offset`` (Gemma's
    norm weight ``w`` in ``x_hat * (1 + w)``) contributes ``offset + w``, the values ``M`` scales.
    """
    if region is None:
        def region(b: TensorBlock) -> torch.Tensor:
            return tensors[b.name].narrow(b.axis, b.start, b.stop - b.start)
    regions = [(b, _with_offset(region(b), b.offset)) for b in pair.producers]
    mats = [(b, r) for b, r in regions if r.dim() >= 2] or regions
    parts = [linalg.as_rows(r, b.axis) for b, r in mats]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p.to(parts[0].device) for p in parts], dim=1)


def _with_offset(t: torch.Tensor, offset: float) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32)) + offset if offset else t


def spectrum_block(pair: Pair, tensors: Tensors, factor: float) -> torch.Tensor:
    """The block whose spectrum a deformation with ``factor`` inflates: the producers' (``factor >= 1``) or, for an
    inverted pair (``factor < 1``: producer shrunk, consumers' channels grown), the consumers' weight matrices,
    rows along the pair axis."""
    if factor >= 1:
        return producer_block(pair, tensors)
    parts = [linalg.as_rows(tensors[b.name].narrow(b.axis, b.start, b.stop - b.start), b.axis)
             for b in pair.consumers if tensors[b.name].dim() >= 2]
    if not parts:
        raise ValueError(f"pair {pair.key}: an inverted deformation needs a weight-matrix consumer.")
    return torch.cat([p.to(parts[0].device) for p in parts], dim=1)


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
        linalg.apply_producer(tensors[b.name], b.axis, b.start, b.stop, m, inverse, b.offset)
    for b in pair.consumers:
        linalg.apply_consumer(tensors[b.name], b.axis, b.start, b.stop, m, inverse, b.offset)


def build_deformation(plan: Plan, block: torch.Tensor, cfg: SpecDefConfig,
                      region: Region | None = None) -> tuple[Deformation, float, float]:
    """``M`` for one pair from its current producer block, and sigma_1 of the block before and after ``M``.

    Spectral pairs: ``M`` from the top-k decomposition, which also gives sigma_1 (after = factor x before,
    exact in real arithmetic). Axis pairs: sigma_1 measured (see :func:`sigma_max`; small blocks exactly,
    before and after from one Gram matrix). float16-exact pairs (``plan.policy == "axis-float16"``) also read
    every producer and consumer block through ``region`` (current values) to pick channels and factor.
    """
    if not plan.axis:
        u, s = linalg.top_left_singular(block, cfg.top_k)
        return Deformation(block.shape[0], plan.factor, basis=u), float(s[0]), plan.factor * float(s[0])
    a = block.to(torch.promote_types(block.dtype, torch.float32))  # converted once (16-bit weights), else no copy
    if plan.policy == "axis-float16":
        m = _exact16_deformation(plan, a, cfg, region)
    else:
        m = linalg.axis_deformation(a, cfg.top_k, plan.factor, rotary=plan.pair.rotary)
    if block.shape[0] <= min(block.shape[1], _EXACT_SIDE):  # d x d Gram G; after M: D G D
        gram = a @ a.T
        d = torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
        d[m.indices.to(d.device)] = m.factor
        before, after = linalg.eigvalsh(torch.stack([gram, gram * d[:, None] * d[None, :]]))[:, -1]
        return m, float(before.clamp_min(0).sqrt()), float(after.clamp_min(0).sqrt())
    return m, (s0 := sigma_max(a)), _axis_sigma_after(a, m, s0)


def _exact16_deformation(plan: Plan, block: torch.Tensor, cfg: SpecDefConfig, region: Region | None) -> Deformation:
    """The float16-exact axis deformation of a pair (channels with the largest exact power-of-two factor), or
    :class:`PrecisionBudgetError` when that factor falls below ``alpha / 16``."""
    if region is None:
        raise ValueError(f"pair {plan.pair.key}: a float16-exact deformation needs the pair's tensors (region=...).")
    lines = {b: linalg.as_rows(region(b), b.axis) for b in plan.pair.producers + plan.pair.consumers}
    log2 = exact_scaling.channel_log2([lines[b] for b in plan.pair.producers], [lines[b] for b in plan.pair.consumers],
                                      plan.dtype, int(round(math.log2(plan.factor))))
    norms = block.pow(2).sum(dim=1)
    m = exact_scaling.exact_axis_deformation(norms, log2, cfg.top_k, rotary=plan.pair.rotary)
    if m.factor < precision.min_exact16_factor(cfg):
        raise precision.refuse_exact16(plan.pair.key, m.factor, cfg)
    return m


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
) -> PairResult | None:
    """Build ``M`` for one pair from its current producer block and apply it in place.

    sigma_1 of the producer block is reported before and after (see :func:`build_deformation`). A plan with a
    ``guard`` is decided and checked by it; ``None`` when the guard skips the pair (its ``skipped`` says why).
    """
    if plan.guard is not None:
        built = plan.guard.build(tensors)
        if built is None:
            return None
        m, s0, s1 = built
        if before_apply is not None:
            before_apply(m)
        plan.guard.before(m, tensors)
        apply_pair(plan.pair, tensors, m)
        plan.guard.after(m, tensors)
        return result_of(plan, m, s0, s1)
    block = producer_block(plan.pair, tensors)

    def read(b: TensorBlock) -> torch.Tensor:
        return tensors[b.name].narrow(b.axis, b.start, b.stop - b.start)

    region = read if plan.policy == "axis-float16" else None
    m, s0, s1 = checked_deformation(plan, block, cfg, read, region)  # before apply_pair: ``block`` may be a view
    if before_apply is not None:
        before_apply(m)
    apply_pair(plan.pair, tensors, m)
    return result_of(plan, m, s0, s1)


def result_of(plan: Plan, m: Deformation, sigma_before: float, sigma_after: float) -> PairResult:
    """The :class:`PairResult` of a deformed pair."""
    return PairResult(plan.pair, "axis" if plan.axis else "spectral", m, sigma_before, sigma_after,
                      str(plan.dtype).replace("torch.", ""), plan.policy)


def deform(plans: Iterable[Plan], tensors: Tensors, cfg: SpecDefConfig) -> list[PairResult]:
    """Deform every planned pair in order (the order matters: pairs may share tensors)."""
    return [r for p in plans if (r := deform_pair(p, tensors, cfg)) is not None]


def undo(results: Sequence[PairResult], tensors: Tensors) -> None:
    """Apply the inverse of every result, last first (exact in axis mode, to rounding otherwise)."""
    for r in reversed(results):
        apply_pair(r.pair, tensors, r.deformation, inverse=True)
