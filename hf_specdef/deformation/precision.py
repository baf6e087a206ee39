"""Precision policies: fitting a deformation into the storage dtype, and what a release is exact in (docs/precision.md).

No Hugging Face imports. :func:`resolve` applies ``SpecDefConfig.precision`` to one planned pair (a table of
policies); :func:`summary` says what was requested and what was used; :func:`release_safety` reads, from a
protection record, the dtypes the protected model is exact in -- the downcast guard and the model card use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from hf_specdef.errors import SpecDefError
from hf_specdef.tensor_math import linalg

if TYPE_CHECKING:
    from hf_specdef.config import SpecDefConfig
    from hf_specdef.deformation.engine import PairResult, Plan

# sites whose compensated side shrinks an *activation* (attn.qk: k / f), which float16 rounds to subnormals whatever
# the weights: measured 5.2e-4 relative output error on a tiny Llama whose scaled weights were all exact
SHRINKING_SITES = frozenset({"attn.qk"})
# a float16 factor below alpha / this is refused (the protection would be that much weaker than asked)
EXACT16_MAX_SHORTFALL = 16
# names of the dtypes a release is checked in, widest first
RELEASE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# what each policy label means in "requested -> used"
USED_LABELS = {
    "spectral": "spectral (top singular directions; axis on axis-only sites)",
    "axis": "axis mode, power-of-two alpha (bit-exact in bfloat16 and float32)",
    "axis-float16": "axis mode, power-of-two factor per pair, exact in float16",
    "float32": "model upcast to float32",
}


class PrecisionBudgetError(SpecDefError, ValueError):
    """The storage dtype cannot hold the deformation within the tolerance.

    Raised before any weight is changed when the precision policy cannot fit the requested protection into the
    dtype the weights are stored in: with ``precision="refuse"`` when the expected error exceeds ``cfg.tolerance``,
    or when every selected pair is left out by the policy (e.g. only ``attn.qk`` asked for, in float16). See the
    Precision page of the docs (docs/precision.md). Also a ``ValueError``.

    Example:

    ```python
    import torch
    from transformers import AutoModelForCausalLM

    from hf_specdef import PrecisionBudgetError, SpecDefConfig, protect

    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B", torch_dtype=torch.bfloat16)
    try:
        protect(model, SpecDefConfig(precision="refuse"))  # spectral alpha=1000 does not fit bfloat16
    except PrecisionBudgetError as e:
        print(e)  # use precision="auto" (axis mode, alpha 1024) or protect in float32
    ```
    """

    docs_page = "docs/precision.md"


class NothingExactError(PrecisionBudgetError):
    """Every selected pair was left out by the precision policy (e.g. only ``attn.qk`` asked for, in float16)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _wide_range(dtype: torch.dtype) -> bool:
    """bfloat16, float32, float64: scaling by a power of two up to 2^100 stays exact."""
    return torch.finfo(dtype).max > 1e38


# ------------------------------------------------------------------------------------------
# Policies (one function each) applied to a plan whose budget exceeds the tolerance
# ------------------------------------------------------------------------------------------

def _refuse(plan: Plan, cfg: SpecDefConfig) -> None:
    pow2 = linalg.nearest_power_of_two(cfg.alpha)
    raise PrecisionBudgetError(
        f"Precision budget exceeded: {'axis' if plan.axis else 'spectral'} mode with alpha={cfg.alpha:g} stored in "
        f"{plan.dtype} adds a relative output error of about {plan.budget:.2g} (unit roundoff "
        f"{linalg.unit_roundoff(plan.dtype):.2g}{', amplified by alpha' if not plan.axis else ''}), "
        f"above tolerance={cfg.tolerance:g}; the protected model would be "
        f"broken (first pair: {plan.pair.key}). Options: SpecDefConfig(precision='auto') (the default: the strongest "
        f"protection exact in the storage dtype); load/protect in float32; or "
        f"SpecDefConfig(precision='float32') to upcast the model to float32; or "
        f"SpecDefConfig(mode='axis', alpha={pow2:g}) (a power of two is bit-exact in float32/bfloat16; "
        f"precision='axis' does this switch automatically)."
    )


def _to_axis(plan: Plan, cfg: SpecDefConfig) -> None:
    plan.axis, plan.factor, plan.budget, plan.policy = True, linalg.nearest_power_of_two(cfg.alpha), 0.0, "axis"
    plan.notes.append(f"precision='{cfg.precision}': axis mode with alpha={plan.factor:g} ({dtype_name(plan.dtype)})")


def _to_float32(plan: Plan, cfg: SpecDefConfig) -> None:
    plan.dtype, plan.policy = torch.float32, "float32"
    plan.budget = linalg.spectral_budget(plan.axis, cfg.alpha, torch.float32)
    plan.notes.append("precision='float32': protected model stored in float32")
    if plan.budget > cfg.tolerance:
        raise PrecisionBudgetError(
            f"even float32 cannot hold alpha={cfg.alpha:g} in spectral mode within tolerance={cfg.tolerance:g} "
            f"(expected error {plan.budget:.2g}); lower alpha, raise tolerance, or use mode='axis' with a power-of-two alpha."
        )


def _to_exact16(plan: Plan, cfg: SpecDefConfig) -> None:
    """float16: axis mode, its factor chosen per pair when the pair is deformed (see :mod:`.exact_scaling`); sites
    that shrink an activation are left out (no weight-only rule keeps them exact)."""
    if plan.pair.site in SHRINKING_SITES:
        plan.skip = (f"precision='auto', float16: {plan.pair.site} divides an activation (the keys) by the factor, "
                     "which float16 rounds to subnormals; not exact, so not deformed")
        return
    plan.axis, plan.factor, plan.budget, plan.policy = True, linalg.nearest_power_of_two(cfg.alpha), 0.0, "axis-float16"
    plan.notes.append(f"precision='auto': float16 storage: axis mode with a power-of-two factor per pair (at most "
                      f"{plan.factor:g}) that keeps every scaled weight exact")


def _auto(plan: Plan, cfg: SpecDefConfig) -> None:
    if plan.dtype == torch.float16:
        _to_exact16(plan, cfg)
    elif plan.budget > cfg.tolerance:
        _to_axis(plan, cfg)
        if _wide_range(plan.dtype):
            plan.notes[-1] += " -- bit-exact"


_POLICIES: dict[str, Callable[[Any, Any], None]] = {"refuse": _refuse, "axis": _to_axis, "float32": _to_float32}


def resolve(plan: Plan, cfg: SpecDefConfig) -> None:
    """Apply ``cfg.precision`` to ``plan`` in place (mode, factor, dtype, budget, policy, notes), or raise
    :class:`PrecisionBudgetError`. ``"auto"`` always acts on float16 weights (even a power-of-two axis factor is
    not exact there); the other policies act only when the budget exceeds ``cfg.tolerance``."""
    if cfg.precision == "auto":
        _auto(plan, cfg)
    elif plan.budget > cfg.tolerance:
        _POLICIES[cfg.precision](plan, cfg)


def min_exact16_factor(cfg: SpecDefConfig) -> float:
    """The smallest float16 factor accepted for a pair: ``alpha / 16`` (power of two), at least 2."""
    return max(2.0, linalg.nearest_power_of_two(cfg.alpha) / EXACT16_MAX_SHORTFALL)


def refuse_exact16(key: str, factor: float, cfg: SpecDefConfig) -> PrecisionBudgetError:
    pow2 = linalg.nearest_power_of_two(cfg.alpha)
    return PrecisionBudgetError(
        f"float16 cannot hold this protection exactly: pair {key} allows at most a factor {factor:g} (every scaled "
        f"weight exactly representable in float16), below alpha/{EXACT16_MAX_SHORTFALL} = {min_exact16_factor(cfg):g} "
        f"(requested alpha={cfg.alpha:g}). float16's narrow exponent range makes the compensated weights (divided by "
        f"{pow2:g}) subnormal, which drops their low bits. Options: convert the checkpoint to bfloat16 (axis mode with "
        f"alpha={pow2:g} is bit-exact there) or to float32; or SpecDefConfig(precision='float32') to upcast; or "
        f"precision='axis' (not exact in float16: expect ~1e-3 relative error, checked by verification). Nothing was "
        "changed."
    )


# ------------------------------------------------------------------------------------------
# What was used, and what the result is exact in
# ------------------------------------------------------------------------------------------

def used_label(cfg: SpecDefConfig, results: Sequence[PairResult]) -> str:
    policies = {getattr(r, "policy", "") for r in results}
    for label in ("float32", "axis-float16", "axis"):
        if label in policies:
            return label
    return "spectral" if any(r.mode == "spectral" for r in results) else "axis"


def _commutes(r: PairResult) -> bool:
    """A power-of-two axis pair on blocks without an offset: its scaling commutes with rounding in any wide-range
    format (an offset block stores ``f (offset + w) - offset``, which does not)."""
    blocks = r.pair.producers + r.pair.consumers
    return r.mode == "axis" and linalg.is_power_of_two(float(r.deformation.factor)) and not any(
        getattr(b, "offset", 0.0) for b in blocks)


def exact_in(results: Sequence[PairResult], dtype: torch.dtype, tolerance: float) -> bool:
    """Whether the protected weights, loaded in ``dtype``, keep the function within ``tolerance``.

    float16: only a float16-exact protection (its factors were checked entry by entry in float16). Wider formats:
    power-of-two axis factors commute with rounding (exact); otherwise the precision budget decides (spectral:
    alpha x unit roundoff)."""
    if not results:
        return True
    if dtype == torch.float16:
        return all(getattr(r, "policy", "") == "axis-float16" for r in results)
    for r in results:
        if _commutes(r):
            continue
        if linalg.spectral_budget(r.mode == "axis", float(r.deformation.factor), dtype) > tolerance:
            return False
    return True


def expected_error(results: Sequence[PairResult], dtype: torch.dtype) -> float:
    """The precision budget of ``results`` loaded in ``dtype`` (the largest over pairs; 0 when all are exact there)."""
    worst = 0.0
    for r in results:
        if _commutes(r) and _wide_range(dtype):
            continue
        worst = max(worst, linalg.spectral_budget(r.mode == "axis", float(r.deformation.factor), dtype))
    return worst


def summary(cfg: SpecDefConfig, results: Sequence[PairResult]) -> dict[str, Any]:
    """``{"requested", "used", "storage_dtype", "factors", "exact_dtypes", "float32_only", "expected"}``: what the
    record, the report, the CLI and the model card say about precision."""
    factors = sorted({float(r.deformation.factor) for r in results})
    stored = sorted({r.dtype for r in results})
    exact = [d for d in RELEASE_DTYPES if exact_in(results, getattr(torch, d), cfg.tolerance)]
    return {
        "requested": cfg.precision,
        "used": used_label(cfg, results),
        "storage_dtype": stored[0] if len(stored) == 1 else stored,
        "factors": factors if len(factors) <= 8 else [factors[0], factors[-1]],
        "exact_dtypes": exact,
        "float32_only": bool(results) and exact == ["float32"],
        "expected": {d: expected_error(results, getattr(torch, d)) for d in RELEASE_DTYPES if d not in exact},
    }


def describe(info: Mapping[str, Any]) -> str:
    """One line: ``precision: auto -> axis (...); exact in bfloat16, float32``."""
    f = info.get("factors") or []
    fac = "" if not f else (f", alpha {f[0]:g}" if len(f) == 1 else f", factors {f[0]:g}..{f[-1]:g}")
    stored = info.get("storage_dtype")
    stored = ", ".join(stored) if isinstance(stored, list) else stored
    return (f"precision: requested {info.get('requested')} -> used {info.get('used')}{fac} (stored in {stored}); "
            f"exact in {', '.join(info.get('exact_dtypes') or []) or 'no release dtype'}"
            + (" -- FLOAT32-ONLY: loading it in bfloat16/float16 breaks it" if info.get("float32_only") else ""))


# ------------------------------------------------------------------------------------------
# Reading a record (new or older) for the guard and the card
# ------------------------------------------------------------------------------------------

def release_safety(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The precision entry of a protection record (``None`` without a record). Records written before the entry
    existed are read from their modes: spectral pairs make a release float32-only."""
    if not record:
        return None
    info = record.get("precision")
    if isinstance(info, Mapping) and "exact_dtypes" in info:
        return dict(info)
    conf = record.get("config") or {}
    alpha = float(conf.get("alpha") or 1000.0)
    spectral = "spectral" in (record.get("modes") or [])
    exact = ["float32"] if spectral else ["float32", "bfloat16"]
    expected = {"bfloat16": alpha * linalg.unit_roundoff(torch.bfloat16)} if spectral else {}
    expected["float16"] = alpha * linalg.unit_roundoff(torch.float16) if spectral else 2 * linalg.unit_roundoff(torch.float16)
    return {"requested": conf.get("precision"), "used": "spectral" if spectral else "axis", "exact_dtypes": exact,
            "float32_only": spectral, "expected": expected, "legacy": True}


def format_deviation(x: Any) -> str:
    if isinstance(x, (int, float)) and math.isfinite(x):
        return f"{x:.2g}"
    return "non-finite (NaN/inf)"
