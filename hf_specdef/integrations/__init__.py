"""Integrations with transformers, diffusers and PEFT, installed when ``hf_specdef`` is imported."""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger("hf_specdef")

# full module names under hf_specdef; each registers hooks on import
_MODULES = ("integrations.transformers", "integrations.diffusers", "tuners.specundo")


def install_all() -> None:
    """Import each integration module; each registers its hooks on import (idempotent)."""
    for name in _MODULES:
        try:
            importlib.import_module(f"hf_specdef.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("hf_specdef"):
                continue  # integration not written yet / not shipped
            logger.debug("hf-specdef: %s integration unavailable (%s)", name, e)
