"""``save_protected``: save-time protection for any supported object (the in-memory one stays unchanged)."""

from __future__ import annotations

import os
from typing import Any

from .config import SpecDefConfig
from .protection import is_pipeline


def _is_diffusers_model(obj: Any) -> bool:
    return any(c.__module__.startswith("diffusers.") for c in type(obj).__mro__)


def save_protected(obj: Any, save_directory: str | os.PathLike, cfg: SpecDefConfig | None = None, **kwargs: Any) -> Any:
    """Write a protected copy of a transformers model, a diffusers model or a diffusers pipeline.

    Dispatches to :func:`hf_specdef.integrations.transformers.save_protected` or
    :func:`hf_specdef.integrations.diffusers.save_protected`; see those for the keyword arguments.
    """
    if is_pipeline(obj) or _is_diffusers_model(obj):
        from .integrations.diffusers import save_protected as save
    else:
        from .integrations.transformers import save_protected as save
    return save(obj, save_directory, cfg, **kwargs)
