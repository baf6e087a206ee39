"""transformers integration: ``from_pretrained(..., specdef_config=cfg)`` and ``save_protected`` (SPEC §1, §4, §7).

This module is imported once ``hf_specdef`` and ``transformers.modeling_utils`` both are (post-import hook, see
:mod:`hf_specdef.integrations`; ``AutoModel*.from_pretrained`` imports it on its first call), and then

* registers the ``"specdef"`` quantizer (:mod:`.transformers_quantizer`), so
  ``from_pretrained(path, quantization_config=SpecDefConfig(...))`` deforms the weights once loaded;
* installs, once, a thin wrapper around ``PreTrainedModel.from_pretrained`` and
  ``_BaseAutoModelClass.from_pretrained`` (:func:`install`). The wrapper only rewrites two keywords:
  ``specdef_config=cfg`` becomes ``quantization_config=SpecDefQuantizationConfig(cfg)``, and a bare
  ``SpecDefConfig`` given as ``quantization_config`` is wrapped the same way. Everything else goes to
  the stock method untouched. Stock transformers rejects ``specdef_config`` (the model's ``__init__``
  gets an unknown keyword), so the keyword works only once ``hf_specdef`` is imported.

:func:`save_protected` writes protected files of a model that stays unprotected in memory.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from .. import engine, probe
from ..config import CONFIG_KEY, SpecDefConfig
from ..engine import PairResult
from ..protection import Backup, ParamTensors, _check_materialized, deform_verified, model_pairs
from ..record import check_not_protected, get_record, make_record, set_record
from ..report import ProtectionReport
from ..verification import DeformationCheckError, check_deformation
from .transformers_quantizer import QUANT_METHOD, SpecDefHfQuantizer, SpecDefQuantizationConfig, register

logger = logging.getLogger("hf_specdef")

__all__ = [
    "DeformationCheckError", "SpecDefHfQuantizer", "SpecDefQuantizationConfig", "check_deformation", "install",
    "save_protected", "translate_kwargs",
]

_WRAPPED_FLAG = "_specdef_wrapped"


# --------------------------------------------------------------------------------------------
# from_pretrained(..., specdef_config=cfg)
# --------------------------------------------------------------------------------------------


def translate_kwargs(kwargs: dict[str, Any]) -> None:
    """Rewrite ``specdef_config=`` / a bare ``SpecDefConfig`` ``quantization_config=`` in place (idempotent).

    Raises ``ValueError`` if ``specdef_config`` is combined with another ``quantization_config``
    (SpecDef deforms full-precision weights; stacking it with a real quantizer is not supported).
    """
    spec = kwargs.pop("specdef_config", None)
    qc = kwargs.get("quantization_config")
    if spec is not None:
        if not isinstance(spec, (SpecDefConfig, SpecDefQuantizationConfig)):
            raise ValueError(
                f"specdef_config={spec!r} must be a hf_specdef.SpecDefConfig (or SpecDefQuantizationConfig for load options)."
            )
        if qc is not None:
            raise ValueError(
                f"from_pretrained got both specdef_config= and quantization_config={type(qc).__name__}; SpecDef cannot be "
                "combined with a quantizer at load time. Load with one of them (e.g. protect in full precision, "
                "save_pretrained, then quantize the protected checkpoint)."
            )
        kwargs["quantization_config"] = SpecDefQuantizationConfig.wrap(spec)
    elif isinstance(qc, SpecDefConfig):
        kwargs["quantization_config"] = SpecDefQuantizationConfig(qc)


def _wrap(owner: type) -> None:
    method = owner.__dict__["from_pretrained"]
    func = method.__func__
    if getattr(func, _WRAPPED_FLAG, False):
        return

    @functools.wraps(func)
    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        translate_kwargs(kwargs)
        return func(cls, *args, **kwargs)

    setattr(from_pretrained, _WRAPPED_FLAG, True)
    from_pretrained.__doc__ = (func.__doc__ or "") + (
        "\n\n        hf-specdef: ``specdef_config=SpecDefConfig(...)`` (or a ``SpecDefConfig`` as ``quantization_config``)"
        " deforms the weights once loaded (see hf_specdef.integrations.transformers).\n"
    )
    owner.from_pretrained = classmethod(from_pretrained)


def install() -> None:
    """Register the quantizer and wrap ``from_pretrained`` (PreTrainedModel and the Auto classes). Idempotent."""
    register()
    _wrap(PreTrainedModel)
    _wrap(_BaseAutoModelClass)


# --------------------------------------------------------------------------------------------
# Deformation check (SPEC §7) and save-time protection
# --------------------------------------------------------------------------------------------


def _protect_with_backup(
    model: PreTrainedModel, cfg: SpecDefConfig, inputs: dict[str, Any] | None, verify: bool, progress: bool
) -> tuple[list[PairResult], Backup, float | None, list[str]]:
    """Deform ``model`` in place, verified and checked (SPEC §7), keeping the exact backup (restored on failure)."""
    tensors = ParamTensors(model)
    pairs, skipped = model_pairs(model, cfg, tensors)
    plans = engine.plan_pairs(pairs, tensors, cfg)
    if verify:
        inputs = inputs if inputs is not None else probe.probe_inputs(model)
    run = (lambda: probe.run_probe(model, inputs)) if verify else None
    results, backup, deviation = deform_verified(plans, tensors, cfg, run=run, check=check_deformation, progress=progress)
    return results, backup, deviation, skipped


def save_protected(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    cfg: SpecDefConfig | None = None,
    *,
    verify: bool = True,
    inputs: dict[str, Any] | None = None,
    force: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **save_kwargs: Any,
) -> ProtectionReport:
    """Write a protected copy of ``model`` to ``save_directory``; the in-memory model stays unchanged.

    The model is deformed in place while an exact backup of the changed rows/columns is kept (only
    those: k channels per axis pair, the head blocks of spectral pairs — never a full copy), outputs
    are verified on a probe batch, the claimed deformation is checked on the spectra (SPEC §7), then
    ``save_pretrained`` writes to a temporary directory beside ``save_directory`` that is renamed into
    place, and the model is restored bit for bit (also on any error). The saved config.json carries
    the protection record under ``"specdef"`` and loads with stock transformers.

    Args:
        model: a transformers model with materialized weights.
        save_directory: destination directory; it must not exist unless ``overwrite=True``.
        cfg: the protection (default ``SpecDefConfig()``). ``precision="float32"`` is not supported here
            (it would change module dtypes); protect in float32 or use ``precision="axis"``.
        verify: compare probe outputs before/after (nothing is written if they deviate beyond the tolerance).
        inputs: probe inputs (model kwargs); built from the config if None.
        force: protect even if the model already carries a protection record.
        overwrite: replace an existing ``save_directory``.
        progress: show a progress bar.
        **save_kwargs: passed to ``save_pretrained`` (e.g. ``max_shard_size``).

    Returns:
        The :class:`~hf_specdef.ProtectionReport` of what was written.
    """
    import time

    start = time.perf_counter()
    cfg = cfg or SpecDefConfig()
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"save_protected expects a transformers PreTrainedModel, got {type(model).__name__}.")
    if cfg.precision == "float32":
        raise ValueError(
            "save_protected(cfg.precision='float32') would change module dtypes of the in-memory model; load the model "
            "in float32, or use precision='axis' (or 'refuse'), or protect(model, cfg) then model.save_pretrained(...)."
        )
    dest = Path(save_directory)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True to replace it, or choose another directory.")
    check_not_protected(model, force)
    _check_materialized(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.specdef-", dir=dest.parent))
    had_record = hasattr(model.config, CONFIG_KEY)
    old_record = get_record(model)
    tensors = ParamTensors(model)
    try:
        results, backup, deviation, skipped = _protect_with_backup(model, cfg, inputs, verify, progress)
        try:
            set_record(model, make_record(cfg, results, deviation))
            model.save_pretrained(tmp, **save_kwargs)
        finally:
            backup.restore(tensors)
            if had_record:
                setattr(model.config, CONFIG_KEY, old_record)
            elif hasattr(model.config, CONFIG_KEY):
                delattr(model.config, CONFIG_KEY)
        _check_written_config(tmp, cfg)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ProtectionReport(cfg, results, deviation, skipped, [], time.perf_counter() - start)
    logger.info("hf-specdef wrote %d protected pairs to %s (deviation=%s)", len(results), dest, deviation)
    return report


def _check_written_config(directory: Path, cfg: SpecDefConfig) -> None:
    conf = json.loads((directory / "config.json").read_text())
    qc = conf.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        raise RuntimeError("internal error: a specdef quantization_config reached config.json; nothing was written.")
    if cfg.record != "none" and CONFIG_KEY not in conf:
        raise RuntimeError(f"internal error: config.json lacks the {CONFIG_KEY!r} record; nothing was written.")


install()
