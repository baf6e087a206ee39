"""Save-time protection for diffusers: write protected files of a pipeline or denoiser that stays unchanged in memory.

``pipe.save_pretrained(out, specdef_config=cfg)`` and ``model.save_pretrained(out, specdef_config=cfg)`` call
:func:`save_protected` (the hooks of :mod:`hf_specdef.integrations.diffusers`), and so does
:func:`hf_specdef.save_protected` (the diffusers integration registers it with :mod:`hf_specdef.analysis.integration_registry`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline, ModelMixin

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation.report import ProtectionReport
from hf_specdef.integrations import patching
from hf_specdef.integrations.diffusers.claims import _check_pipeline_claims, _checked, check_claims
from hf_specdef.integrations.diffusers.pipeline import _apply, _denoiser
from hf_specdef.storage.staging import make_staging, remove_tree

logger = logging.getLogger("hf_specdef")

__all__ = ["save_protected"]

def _as_config(cfg: Any) -> SpecDefConfig:
    if isinstance(cfg, SpecDefConfig):
        return cfg
    if isinstance(cfg, dict):
        return SpecDefConfig.from_dict(cfg)
    raise ValueError(f"specdef_config={cfg!r} must be a hf_specdef.SpecDefConfig (or its dict form).")


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the written files into ``dest`` (entry by entry when it exists: other files there are kept)."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    for entry in tmp.iterdir():
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)
    tmp.rmdir()


def save_protected(
    pipe_or_model: Any,
    save_directory: str | os.PathLike,
    cfg: SpecDefConfig | None = None,
    *,
    verify: bool = True,
    force: bool = False,
    progress: bool = True,
    text_encoder: bool = False,
    pipeline_norm: bool | None = None,
    inputs: dict[str, Any] | None = None,
    overwrite: bool = True,
    **save_kwargs: Any,
) -> ProtectionReport:
    """Write protected files of a diffusers pipeline or denoiser; the in-memory object stays exactly as it was.

    The weights are deformed in place while :class:`~hf_specdef.protection.in_memory.Backup` keeps exact copies of the
    changed rows/columns only (never a full copy of the denoiser); the function is verified, the claimed
    deformation re-checked, ``save_pretrained`` writes into a temporary directory beside
    ``save_directory`` which is then renamed into place, and every tensor and config is restored bit for bit
    (also on error). ``pipe.save_pretrained(out, specdef_config=cfg)`` and ``model.save_pretrained(out,
    specdef_config=cfg)`` call this. Options as in :func:`protect_pipeline`; ``save_kwargs`` go to
    ``save_pretrained``. ``precision="float32"`` is refused when it would change the in-memory dtype.
    """
    cfg = _as_config(cfg or SpecDefConfig())
    is_pipe = isinstance(pipe_or_model, DiffusionPipeline)
    if is_pipe:
        dname, _ = _denoiser(pipe_or_model)
        comps = dict(pipe_or_model.components)
    elif isinstance(pipe_or_model, ModelMixin):
        if text_encoder or pipeline_norm:
            raise ValueError("text_encoder / pipeline_norm need a pipeline; got a single diffusers model.")
        dname, comps = "model", {"model": pipe_or_model}
    else:
        raise ValueError(f"save_protected expects a diffusers pipeline or model, got {type(pipe_or_model).__name__}.")
    dest = Path(save_directory)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True to replace it, or choose another directory.")
    tmp = make_staging(dest.absolute())
    try:
        report, applied = _apply(comps, dname, cfg, verify=verify, force=force, progress=progress,
                                 text_encoder=text_encoder, pipeline_norm=pipeline_norm, inputs=inputs,
                                 pipe=pipe_or_model if is_pipe else None, allow_upcast=False)
        try:
            _stock_save(pipe_or_model, tmp, **save_kwargs)  # checks the claims first
        finally:
            applied.restore()
        _move_into_place(tmp, dest)
    except BaseException:
        remove_tree(tmp)
        raise
    logger.info("hf-specdef wrote %d protected pairs to %s (deviation=%s)", len(report.results), dest, report.deviation)
    return report


def _stock_save(obj: Any, directory: Path, **kwargs: Any) -> None:
    """``save_pretrained`` of ``obj`` after the claims check (the original, unwrapped method)."""
    if isinstance(obj, DiffusionPipeline):
        _check_pipeline_claims(obj)
        with _checked():
            patching.stock(DiffusionPipeline.save_pretrained)(obj, directory, **kwargs)
    else:
        check_claims(obj)
        patching.stock(ModelMixin.save_pretrained)(obj, directory, **kwargs)

