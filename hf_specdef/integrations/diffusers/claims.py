"""The claims check for diffusers: before anything is written, the weights must show the deformation the record claims.

:func:`check_claims` checks one model (in-process results, else the record's pairs, else a spectral inspection);
:func:`_check_pipeline_claims` also checks the pipeline-level pairs, which span two components. The
``save_pretrained`` hooks call them; inside a pipeline save whose claims were checked (:func:`_checked`), the
component saves skip the re-check.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch

from hf_specdef.analysis.verification import DeformationCheckError, check_deformation  # one claims check for both libraries
from hf_specdef.deformation.record import get_record
from hf_specdef.integrations.diffusers.pipeline import _CLAIMS, _PIPELINE_CLAIMS, ComponentTensors
from hf_specdef.protection.in_memory import ParamTensors
from hf_specdef.sites import Pair

__all__ = ["DeformationCheckError", "check_claims"]

_state = threading.local()


def _check_results(results: list[Any], tensors: Any, where: str) -> None:
    """Recompute each pair's producer sigma_1 (shared check of the transformers integration): it must match the
    recorded value and be inflated, else :class:`DeformationCheckError` naming ``where``."""
    try:
        check_deformation(results, tensors)
    except DeformationCheckError as e:
        raise DeformationCheckError(
            f"{where}: {e} (never write a 'protected' model that is not; see docs/integrations.md)"
        ) from None


def _results_from_record(rec: dict[str, Any], key: str = "pairs") -> list[Any]:
    out = []
    for d in rec.get(key, []):
        out.append(SimpleNamespace(
            pair=Pair.from_dict(d["pair"]), mode=d["mode"], deformation=SimpleNamespace(factor=float(d["factor"])),
            sigma_before=float(d["sigma_before"]), sigma_after=float(d["sigma_after"]),
        ))
    return out


def check_claims(model: torch.nn.Module) -> None:
    """Raise :class:`DeformationCheckError` unless ``model``'s weights show what its protection record claims.

    Uses, in order: the results of a protection done in this process; the record's pairs (``record="full"``);
    otherwise a spectral inspection (:func:`hf_specdef.inspect_model`) that must flag every claimed hot module
    (including the denoiser's side of the pipeline-level pair). A model without a record passes. Pipeline-level
    pairs, which span two components, are checked by the pipeline's ``save_pretrained``.
    """
    rec = get_record(model)
    if not rec:
        return
    where = type(model).__name__
    stash = model.__dict__.get(_CLAIMS)
    claims = stash[1] if stash is not None and stash[0] is rec else None  # ours, and not replaced since
    if claims is not None:
        _check_results(claims, ParamTensors(model), where)
    elif rec.get("pairs"):
        _check_results(_results_from_record(rec), ParamTensors(model), where)
    else:
        _check_by_inspection(model, rec, where)


def _check_by_inspection(model: torch.nn.Module, rec: dict[str, Any], where: str) -> None:
    from hf_specdef.analysis.inspection import DEFAULT_THRESHOLD, inspect_model

    params = dict(model.named_parameters())  # 1-D norm weights (q/k-norm attn.qk pairs) carry no matrix evidence
    hot = [m for m in rec.get("hot_modules") or [] if getattr(params.get(f"{m}.weight"), "ndim", 2) >= 2]
    if not hot:
        return
    alpha = float(rec.get("config", {}).get("alpha", DEFAULT_THRESHOLD * 2))
    threshold = max(1.5, min(DEFAULT_THRESHOLD, alpha / 2))
    findings = {f.name: f for f in inspect_model(model, threshold=threshold).findings}

    def shows(module: str) -> bool:  # per-pair evidence, or a matrix-level outlier (a column scaled by a norm site)
        f = findings.get(f"{module}.weight")
        return f is not None and (f.deformed or max(f.evidence.values(), default=0.0) >= threshold)

    missing = [m for m in hot if not shows(m)]
    if missing:
        raise DeformationCheckError(
            f"{where}: the protection record claims {len(hot)} hot modules but {len(missing)} show no deformation "
            f"(e.g. {missing[:3]}); refusing to write a 'protected' model that is not (see docs/integrations.md). "
            "Re-protect it with hf_specdef.protect(model, cfg, force=True) or remove the '_specdef' record from its config."
        )


def _check_pipeline_claims(pipe: Any) -> None:
    comps = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    for module in comps.values():
        check_claims(module)
        pipe_claims = module.__dict__.get(_PIPELINE_CLAIMS)
        stash = module.__dict__.get(_CLAIMS)
        if pipe_claims and stash is not None and stash[0] is get_record(module):
            names = {b.name.split(".", 1)[0] for r in pipe_claims for b in r.pair.producers + r.pair.consumers}
            missing = sorted(names - set(comps))
            if missing:
                raise DeformationCheckError(f"the pipeline-level protection needs components {missing}, which are gone.")
            _check_results(pipe_claims, ComponentTensors({n: comps[n] for n in names}), type(pipe).__name__)


@contextmanager
def _checked() -> Iterator[None]:
    """Inside a pipeline save whose claims were checked: component saves skip the re-check."""
    old = getattr(_state, "checked", False)
    _state.checked = True
    try:
        yield
    finally:
        _state.checked = old


def _already_checked() -> bool:
    """Whether this thread is inside a save whose claims were checked (:func:`_checked`)."""
    return getattr(_state, "checked", False)
