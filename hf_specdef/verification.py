"""``verify(reference, protected)``: is the function unchanged, and does the storage dtype hold it?"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import linalg, probe
from .record import get_record


@dataclass
class VerifyResult:
    """Max relative output deviation on a probe batch, and the precision budget of the storage dtype."""

    max_relative_deviation: float
    tolerance: float
    dtype: str
    budget: float | None
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        status = "OK" if self.ok else "FAILED"
        return (f"verify {status}: max relative deviation {self.max_relative_deviation:.3e} "
                f"(tolerance {self.tolerance:g}, dtype {self.dtype}, expected budget {self.budget})")


def storage_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def budget_for(model: torch.nn.Module) -> float | None:
    """Expected relative error of the recorded protection in the model's dtype (None without a record)."""
    rec = get_record(model)
    if not rec:
        return None
    conf = rec.get("config", {})
    axis = rec.get("modes") == ["axis"]
    return linalg.spectral_budget(axis, float(conf.get("alpha", 2.0)), storage_dtype(model))


def verify(
    reference: torch.nn.Module,
    protected: torch.nn.Module,
    inputs: dict[str, Any] | None = None,
    tolerance: float = 1e-4,
) -> VerifyResult:
    """Compare ``protected`` with ``reference`` on ``inputs`` (a probe batch from the config if None).

    ``ok`` is True when the max relative deviation ``max|out - ref| / max|ref|`` is within
    ``tolerance`` and outputs are finite.
    """
    inputs = inputs if inputs is not None else probe.probe_inputs(reference)
    ref = probe.run_probe(reference, inputs)
    moved = {k: v.to(probe.model_device(protected)) if torch.is_tensor(v) else v for k, v in inputs.items()}
    dev = probe.max_relative_deviation(ref, probe.run_probe(protected, moved))
    dtype = storage_dtype(protected)
    return VerifyResult(dev, tolerance, str(dtype).replace("torch.", ""), budget_for(protected), dev <= tolerance)
