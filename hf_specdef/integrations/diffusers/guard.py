"""The downcast guard for diffusers ``from_pretrained(..., torch_dtype=...)`` (see docs/precision.md
and :mod:`hf_specdef.analysis.downcast`).

A model or pipeline component whose protection record says it is exact only in float32 is refused in
``torch_dtype=torch.bfloat16 | torch.float16`` (``dtype=`` too; a dict of per-component dtypes is checked
per component), unless ``specdef_allow_downcast=True`` or ``HF_SPECDEF_ALLOW_DOWNCAST=1``. ``"auto"``
loads such a checkpoint in float32 (stock diffusers reads ``"auto"`` as float32 anyway). Local folders are
checked from their config files before loading; every load is checked again on the loaded modules (this
covers Hub pipelines, whose component configs are not at hand before the download).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from hf_specdef.analysis import downcast
from hf_specdef.deformation.record import get_record

logger = logging.getLogger("hf_specdef")

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None  # the stock loader reports a broken config itself


def component_records(cls: type, path: Any, kwargs: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Protection records by component (``""`` for a single model) read before loading; ``{}`` when unknown."""
    if path is None:
        return {}
    root = Path(str(path))
    if issubclass(cls, DiffusionPipeline):
        index = _read(root / "model_index.json")
        if index is None:
            return {}
        return {name: get_record(conf) for name in index if not name.startswith("_")
                if (conf := _read(root / name / "config.json")) is not None}
    conf = _read(root / kwargs.get("subfolder", "") / "config.json")
    if conf is None and not root.is_dir() and hasattr(cls, "load_config"):
        try:
            conf = cls.load_config(str(path), **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        except Exception as e:  # unreadable: the stock loader says why; the check after loading still runs
            logger.debug("hf-specdef downcast guard: cannot read the config of %s before loading (%s)", path, e)
    return {"": get_record(conf)} if conf is not None else {}


def _dtype_for(dtype: Any, component: str) -> Any:
    if isinstance(dtype, dict):
        return dtype.get(component, dtype.get("default"))
    return dtype


def _where(path: Any, component: str) -> str:
    return f"{path}/{component}" if component else str(path)


def _half_dtype(module: Any) -> torch.dtype | None:
    if not isinstance(module, torch.nn.Module):
        return None
    return next((p.dtype for p in module.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)


def _refuse(refused: list[tuple[str, Any, downcast.DowncastError]]) -> None:
    """One error for every component refused (a pipeline may keep just those in float32)."""
    component, wanted, first = refused[0]
    if not component:
        raise first
    keep = ", ".join(f"'{c}': torch.float32" for c, _, _ in refused)
    raise downcast.DowncastError(
        f"{first} (components refused: {', '.join(c for c, _, _ in refused)}.) A pipeline can keep just those in "
        f"float32: dtype={{{keep}, 'default': {wanted}}}.")


def guarded_load(func: Callable[..., Any], cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func(cls, *args, **kwargs)`` (a stock ``from_pretrained``) with the downcast guard around it."""
    forced = bool(kwargs.pop(downcast.FORCE_KWARG, False))
    if downcast.active() is not None:
        return func(cls, *args, **kwargs)
    path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    key = "dtype" if "dtype" in kwargs else "torch_dtype" if "torch_dtype" in kwargs else None
    requested = kwargs.get(key) if key else None
    records = component_records(cls, path, kwargs)
    float32_only, refused = False, []
    for component, record in records.items():
        wanted = _dtype_for(requested, component)
        if wanted is None:
            continue
        try:
            resolved = downcast.resolve_dtype(record, wanted, _where(path, component), forced)
        except downcast.DowncastError as e:
            refused.append((component, wanted, e))
            continue
        float32_only |= resolved is torch.float32 and wanted == "auto"
    if refused:
        _refuse(refused)
    if float32_only and key and requested == "auto":  # stock diffusers reads "auto" as float32, with a warning
        kwargs[key] = torch.float32
    with downcast.scope("allowed" if forced else "checked"):
        obj = func(cls, *args, **kwargs)
    modules = obj.components if isinstance(obj, DiffusionPipeline) else {"": obj[0] if isinstance(obj, tuple) else obj}
    for component, module in modules.items():
        if isinstance(module, torch.nn.Module):
            downcast.check_loaded(get_record(module), _half_dtype(module), _where(path, component), forced)
    return obj
