"""hf-specdef: SpecDef spectral deformation for Hugging Face models, and the attacker's undo.

Public API (see docs/api.md)::

    from hf_specdef import SpecDefConfig, protect, verify, inspect_model, protect_checkpoint, SpecUndoConfig
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

logging.getLogger("hf_specdef").addHandler(logging.NullHandler())

# name -> module; imported on first use so `import hf_specdef` stays light (no torch, transformers, diffusers
# or PEFT). The integrations install themselves when their library is imported (see hf_specdef.integrations).
_LAZY = {
    "SpecDefConfig": "config",
    "SpecDefError": "errors",
    "MissingExtraError": "errors",
    "CheckpointError": "storage.checkpoint",
    "protect": "protection.in_memory",
    "ProtectionReport": "deformation.report",
    "VerificationError": "protection.in_memory",
    "PrecisionBudgetError": "deformation.precision",
    "AlreadyProtectedError": "deformation.record",
    "IntegrationMissingError": "analysis.integration_registry",
    "NoSitesError": "sites",
    "verify": "analysis.verification",
    "inspect_model": "analysis.inspection",
    "protect_checkpoint": "protection.streaming",
    "save_protected": "protection.saving",
    "publish": "publishing.publish",
    "PublishError": "publishing.errors",
    "DowncastError": "analysis.downcast",
    "detect_deformations": "undo.detection",
    "undo_in_place": "undo.merge",
    "export_lora": "tuners.specundo",
    "SpecDefQuantizationConfig": "integrations.transformers.quantizer",
    "register_architecture": "sites",
    "SpecUndoConfig": "tuners.specundo",
    "SpecUndoModel": "tuners.specundo",
}

__all__ = sorted(_LAZY) + ["__version__"]


# module -> (the library it needs, the extra that installs it), for objects that need an optional dependency
_EXTRAS = {"tuners.specundo": ("peft", "peft")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = _LAZY[name]
        try:
            return getattr(importlib.import_module(f".{module}", __name__), name)
        except ModuleNotFoundError as e:
            library, extra = _EXTRAS.get(module, (None, None))
            if library is None or (e.name or "").split(".")[0] != library:
                raise
            from hf_specdef.errors import MissingExtraError

            raise MissingExtraError(f"hf_specdef.{name} needs {library}, which is not installed: "
                                    f"pip install 'hf-specdef[{extra}]'") from None
    raise AttributeError(f"module 'hf_specdef' has no attribute {name!r}")


def _install_integrations() -> None:
    from hf_specdef.integrations import install_all

    install_all()


_install_integrations()
