"""transformers integration: ``from_pretrained(..., specdef_config=cfg)`` and ``save_protected`` (see docs/integrations.md).

This module is imported once ``hf_specdef`` and ``transformers.modeling_utils`` both are (post-import hook, see
:mod:`hf_specdef.integrations`; a process that only imported an Auto class gets it when the first
``AutoModel*.from_pretrained`` imports the model's module), and then

* registers the ``"specdef"`` quantizer (:mod:`.quantizer`) through transformers' own
  ``register_quantization_config`` / ``register_quantizer``, so
  ``from_pretrained(path, quantization_config=SpecDefConfig(...))`` deforms the weights once loaded;
* applies its rows of :data:`hf_specdef.integrations.PATCHES` (:func:`install`): ``SpecDefConfig.quant_method``
  (what transformers looks the quantizer up by) and one wrapper around ``PreTrainedModel.from_pretrained``
  (:func:`from_pretrained`; ``AutoModel*.from_pretrained`` calls it). The wrapper rewrites one keyword,
  ``specdef_config=cfg`` into ``quantization_config=cfg``, and runs the downcast guard
  (:mod:`hf_specdef.analysis.downcast`): a checkpoint whose protection is exact only in float32 is refused in
  ``dtype=torch.bfloat16 | torch.float16`` and loaded in float32 for ``dtype="auto"`` (the default), unless
  ``specdef_allow_downcast=True``. Everything else goes to the stock method untouched. Stock transformers
  rejects ``specdef_config`` (the model's ``__init__`` gets an unknown keyword), so the keyword works only
  while the integration is installed.

:func:`uninstall` (run by :func:`hf_specdef.integrations.uninstall`) restores both patched attributes and removes
the registry entries.

:func:`save_protected` writes protected files of a model that stays unprotected in memory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from hf_specdef.analysis import downcast, probe
from hf_specdef.analysis import integration_registry as handlers
from hf_specdef.analysis.verification import DeformationCheckError, check_deformation
from hf_specdef.config import CONFIG_KEY, SpecDefConfig
from hf_specdef.deformation.engine import PairResult
from hf_specdef.deformation.record import check_not_protected, get_record, make_record, set_record
from hf_specdef.deformation.report import ProtectionReport
from hf_specdef.integrations import PATCHES, patching
from hf_specdef.integrations.transformers.quantizer import (
    QUANT_METHOD,
    SpecDefHfQuantizer,
    SpecDefQuantizationConfig,
    register,
    unregister,
)
from hf_specdef.protection.in_memory import (
    Backup,
    ParamTensors,
    check_materialized,
    deform_verified,
    guard_outcomes,
    model_pairs,
    plan_model,
    quantization_record,
    quantized_check,
)
from hf_specdef.storage.staging import commit_staging, make_staging, remove_tree

logger = logging.getLogger("hf_specdef")

__all__ = [
    "QUANT_METHOD", "DeformationCheckError", "SpecDefHfQuantizer", "SpecDefQuantizationConfig", "check_deformation",
    "from_pretrained", "install", "save_protected", "translate_kwargs", "uninstall",
]


# --------------------------------------------------------------------------------------------
# from_pretrained(..., specdef_config=cfg)
# --------------------------------------------------------------------------------------------


def translate_kwargs(kwargs: dict[str, Any]) -> None:
    """Rewrite ``specdef_config=cfg`` into ``quantization_config=cfg`` in place (idempotent).

    Raises ``ValueError`` if ``specdef_config`` is not a SpecDef config, or is combined with another
    ``quantization_config`` (SpecDef deforms full-precision weights; stacking it with a real quantizer is not
    supported).
    """
    spec = kwargs.pop("specdef_config", None)
    if spec is None:
        return
    if not isinstance(spec, (SpecDefConfig, SpecDefQuantizationConfig)):
        raise ValueError(
            f"specdef_config={spec!r} must be a hf_specdef.SpecDefConfig (or SpecDefQuantizationConfig for load options)."
        )
    qc = kwargs.get("quantization_config")
    if qc is not None:
        raise ValueError(
            f"from_pretrained got both specdef_config= and quantization_config={type(qc).__name__}; SpecDef cannot be "
            "combined with a quantizer at load time. Load with one of them (e.g. protect in full precision, "
            "save_pretrained, then quantize the protected checkpoint)."
        )
    kwargs["quantization_config"] = SpecDefQuantizationConfig.wrap(spec)


# from_pretrained keywords that say where a config comes from (passed on to get_config_dict)
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def _checkpoint_record(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """A name for the checkpoint and its protection record, read from its config before loading (``None`` when
    there is none or the config cannot be read: the stock loader then reports its own error, or loads)."""
    path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    config = kwargs.get("config")
    where = str(path)
    if isinstance(config, PretrainedConfig):
        return where, get_record(config)
    if path is None or kwargs.get("gguf_file"):
        return where, None
    local = Path(str(path)) / kwargs.get("subfolder", "") / "config.json"
    try:
        if local.is_file():
            return where, get_record(json.loads(local.read_text()))
        conf, _ = PretrainedConfig.get_config_dict(str(path), **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        return where, get_record(conf)
    except Exception as e:  # unreadable: the stock loader says why; the check after loading still runs
        logger.debug("hf-specdef downcast guard: cannot read the config of %s before loading (%s)", where, e)
        return where, None


def _half_dtype(model: Any) -> Any:
    """bfloat16/float16 when a floating-point parameter of ``model`` has that dtype, else ``None``."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return next((p.dtype for p in params if p.dtype in (torch.bfloat16, torch.float16)), None)


def guarded_load(func: Any, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func(cls, *args, **kwargs)`` with the downcast guard around it (:mod:`hf_specdef.analysis.downcast`)."""
    forced = bool(kwargs.pop(downcast.FORCE_KWARG, False))
    if downcast.active() is not None:  # inside a guarded load (a diffusers pipeline loading its components)
        return func(cls, *args, **kwargs)
    where, record = _checkpoint_record(args, kwargs)
    key = "dtype" if "dtype" in kwargs else "torch_dtype" if "torch_dtype" in kwargs else None
    requested = kwargs.get(key) if key else None
    requested = "auto" if requested is None else requested  # transformers 5: no dtype means the config's dtype
    dtype = downcast.resolve_dtype(record, requested, where, forced)
    if dtype is not requested:
        kwargs.pop("torch_dtype", None)
        kwargs["dtype"] = dtype
    with downcast.scope("allowed" if forced else "checked"):
        out = func(cls, *args, **kwargs)
    model = out[0] if isinstance(out, tuple) else out
    downcast.check_loaded(get_record(model), _half_dtype(model), where, forced)
    return out


def from_pretrained(stock: Any, cls: type, *args: Any, **kwargs: Any) -> Any:
    """``specdef_config=SpecDefConfig(...)`` (or a ``SpecDefConfig`` as ``quantization_config``) deforms the weights
    once loaded; a checkpoint protected exactly only in float32 is refused in bfloat16/float16 unless
    ``specdef_allow_downcast=True`` (see hf_specdef.integrations.transformers).

    The replacement of ``PreTrainedModel.from_pretrained`` (:data:`hf_specdef.integrations.PATCHES`); its first
    paragraph is appended to the stock docstring.

    Args:
        stock: the stock ``from_pretrained`` function.
        cls: the class it is called on.
        *args: passed to ``stock``.
        **kwargs: passed to ``stock`` once ``specdef_config`` is rewritten (:func:`translate_kwargs`) and the
            downcast guard has read ``dtype`` and ``specdef_allow_downcast`` (:func:`guarded_load`).

    Returns:
        What ``stock`` returns.
    """
    translate_kwargs(kwargs)
    return guarded_load(stock, cls, args, kwargs)


def _saves(obj: Any) -> bool:
    """The objects :func:`hf_specdef.save_protected` gives to :func:`save_protected`."""
    return isinstance(obj, PreTrainedModel)


def install() -> None:
    """Register the quantizer, apply this integration's rows of :data:`hf_specdef.integrations.PATCHES`, and register
    :func:`save_protected` as the transformers saver of :func:`hf_specdef.save_protected`
    (:mod:`hf_specdef.analysis.integration_registry`). Idempotent."""
    register()
    patching.apply_all(PATCHES, __name__)
    handlers.register_saver("transformers", _saves, save_protected)


def uninstall() -> list[str]:
    """Undo :func:`install` in transformers: restore the patched attributes (the identical objects) and remove the
    registry entries; what was undone, one line each. The saver registered with hf-specdef's core stays."""
    return patching.restore_all(PATCHES, __name__) + unregister()


# --------------------------------------------------------------------------------------------
# Deformation check and save-time protection
# --------------------------------------------------------------------------------------------


def _protect_with_backup(
    model: PreTrainedModel, cfg: SpecDefConfig, inputs: dict[str, Any] | None, verify: bool, progress: bool,
    notes: list[str],
) -> tuple[list[PairResult], Backup, float | None, list[str], Any]:
    """Deform ``model`` in place, verified and checked, keeping the exact backup (restored on failure);
    with ``cfg.quantization_safe`` also the quantized check (returned last; ``None`` otherwise)."""
    tensors = ParamTensors(model)
    pairs, skipped = model_pairs(model, cfg, tensors)
    plans = plan_model(pairs, tensors, cfg, skipped)
    if verify:
        inputs = inputs if inputs is not None else probe.probe_inputs(model)
    run = (lambda: probe.run_probe(model, inputs)) if verify else None
    qcheck = quantized_check(model, cfg, inputs) if verify else None

    def check(results: list[PairResult], tensors: Any) -> None:
        check_deformation(results, tensors)
        if qcheck is not None:
            qcheck(results, tensors)

    results, backup, deviation = deform_verified(plans, tensors, cfg, run=run, check=check, progress=progress)
    try:
        skipped += guard_outcomes(plans, results, notes)
    except BaseException:
        backup.restore(tensors)
        raise
    return results, backup, deviation, skipped, qcheck


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
    are verified on a probe batch, the claimed deformation is checked on the spectra, then
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
            "in float32, or use precision='auto' (the default: exact in the model's dtype), or protect(model, cfg) then"
            " model.save_pretrained(...)."
        )
    dest = Path(save_directory)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True to replace it, or choose another directory.")
    check_not_protected(model, force)
    check_materialized(model)
    tmp = make_staging(dest.absolute())
    had_record = hasattr(model.config, CONFIG_KEY)
    old_record = get_record(model)
    tensors = ParamTensors(model)
    try:
        notes: list[str] = []
        results, backup, deviation, skipped, qcheck = _protect_with_backup(model, cfg, inputs, verify, progress, notes)
        try:
            record = make_record(cfg, results, deviation)
            if record is not None and cfg.quantization_safe:
                record["quantization"] = quantization_record(cfg, qcheck)
            set_record(model, record)
            model.save_pretrained(tmp, **save_kwargs)
        finally:
            backup.restore(tensors)
            if had_record:
                setattr(model.config, CONFIG_KEY, old_record)
            elif hasattr(model.config, CONFIG_KEY):
                delattr(model.config, CONFIG_KEY)
        _check_written_config(tmp, cfg)
        commit_staging(tmp, dest.absolute(), overwrite=True)  # an existing dest was allowed (overwrite) above
    except BaseException:
        remove_tree(tmp)
        raise
    report = ProtectionReport(cfg, results, deviation, skipped, notes, time.perf_counter() - start,
                              quantization=dict(qcheck.deviations) if qcheck else {})
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
