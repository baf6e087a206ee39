"""``save_protected``: save-time protection for any supported object (the in-memory one stays unchanged)."""

from __future__ import annotations

import os
from typing import Any

from hf_specdef.analysis.integration_registry import saver_for
from hf_specdef.config import SpecDefConfig


def save_protected(obj: Any, save_directory: str | os.PathLike, cfg: SpecDefConfig | None = None, **kwargs: Any) -> Any:
    """Write a protected copy of a transformers model, a diffusers model or a diffusers pipeline.

    Dispatches to the saver its library's integration registered (:func:`hf_specdef.analysis.integration_registry.saver_for`):
    ``hf_specdef.integrations.transformers.save_protected`` or ``hf_specdef.integrations.diffusers.save_protected``;
    see those for the keyword arguments. Raises
    :class:`~hf_specdef.analysis.integration_registry.IntegrationMissingError` when that
    integration is not installed.
    """
    return saver_for(obj)(obj, save_directory, cfg, **kwargs)
