"""``verify(reference, protected)``: is the function unchanged, and does the storage dtype hold it?"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hf_specdef.analysis import probe
from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import engine
from hf_specdef.deformation.engine import PairResult
from hf_specdef.deformation.record import get_record
from hf_specdef.errors import SpecDefError
from hf_specdef.tensor_math import linalg


@dataclass
class VerifyResult:
    """Max relative output deviation on a probe batch, and the precision budget of the storage dtype."""

    max_relative_deviation: float
    tolerance: float
    dtype: str
    budget: float | None
    ok: bool
    compared: str = "model"  # or the composed function of a pipeline, e.g. "text_encoder -> unet"

    @classmethod
    def of(cls, deviation: float, tolerance: float, protected: torch.nn.Module, compared: str = "model") -> VerifyResult:
        """The result for ``deviation``, with the dtype and precision budget of the ``protected`` model."""
        dtype = str(storage_dtype(protected)).replace("torch.", "")
        return cls(deviation, tolerance, dtype, budget_for(protected), deviation <= tolerance, compared)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        status = "OK" if self.ok else "FAILED"
        what = "" if self.compared == "model" else f" of {self.compared}"
        return (f"verify {status}: max relative deviation{what} {self.max_relative_deviation:.3e} "
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
    tolerance: float | None = None,
) -> VerifyResult:
    """Compare ``protected`` with ``reference`` on a probe batch: is the function unchanged?

    Both models are run on the same inputs (moved to the protected model's device); the result holds the max
    relative deviation ``max|out - ref| / max|ref|``, the storage dtype of ``protected`` and the precision budget
    its protection record implies in that dtype. Nothing is raised for a deviation: check ``result.ok``.

    Args:
        reference (`torch.nn.Module`):
            The original, unprotected model.
        protected (`torch.nn.Module`):
            The protected model (e.g. after :func:`~hf_specdef.protect`, or loaded from a protected folder).
        inputs (`dict[str, Any]`, *optional*, defaults to `None`):
            The probe batch (model keyword arguments); ``None`` builds one from the reference model's config.
        tolerance (`float`, *optional*, defaults to `None`):
            The largest accepted max relative deviation; ``None`` means ``SpecDefConfig().tolerance`` (1e-3).

    Returns:
        `VerifyResult`: ``max_relative_deviation``, ``tolerance``, ``dtype`` (storage dtype of ``protected``),
        ``budget`` (expected relative error of its recorded protection, ``None`` without a record), ``ok``
        (deviation within tolerance; False for NaN/inf outputs) and ``compared``; printable, and ``to_dict()``.

    Example:

    ```python
    import copy

    from transformers import AutoModelForCausalLM

    from hf_specdef import protect, verify

    original = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
    protected = copy.deepcopy(original)
    protect(protected)
    result = verify(original, protected)
    assert result.ok, result
    ```
    """
    tolerance = SpecDefConfig().tolerance if tolerance is None else tolerance
    inputs = inputs if inputs is not None else probe.probe_inputs(reference)
    ref = probe.run_probe(reference, inputs)
    moved = {k: v.to(probe.model_device(protected)) if torch.is_tensor(v) else v for k, v in inputs.items()}
    return VerifyResult.of(probe.max_relative_deviation(ref, probe.run_probe(protected, moved)), tolerance, protected)


class DeformationCheckError(SpecDefError, ValueError):
    """The weights about to be written do not show the deformation the record claims."""

    docs_page = "docs/releases.md"


def check_deformation(results: list[PairResult], tensors: Any, rel: float = 1e-2) -> None:
    """Check that ``tensors`` show the deformation ``results`` claim; raise :class:`DeformationCheckError` if not.

    For each pair the producer block's sigma_1 is recomputed exactly (top singular value, no full
    SVD): it must reach the recorded ``sigma_after`` (within ``rel``) and be inflated over
    ``sigma_before`` — by ``factor`` in spectral mode, by at least ``factor / sqrt(d)`` in axis mode
    (scaling the largest of ``d`` rows by ``factor`` guarantees that much). An inverted pair (``factor < 1``,
    the quantization-safe ``norm`` site) inflates its consumers' channels by ``1 / factor``: their block is checked.
    """
    bad = []
    for r in results:
        f = r.deformation.factor
        block = engine.spectrum_block(r.pair, tensors, f)
        s = float(linalg.top_singular_values(block, 1)[0])
        f = max(f, 1.0 / f)
        inflated = f / math.sqrt(block.shape[0]) if r.mode == "axis" else f
        if not (s >= (1 - rel) * r.sigma_after and s >= (1 - rel) * inflated * r.sigma_before):
            bad.append(f"{r.pair.key}: sigma_1 {s:.4g} (before {r.sigma_before:.4g}, recorded after {r.sigma_after:.4g})")
    if bad:
        raise DeformationCheckError(
            f"{len(bad)} of {len(results)} pairs do not show the claimed deformation, refusing to write: {bad[:3]}"
        )
