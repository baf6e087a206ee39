"""Integrations with transformers, diffusers and PEFT, installed when their library is imported.

``import hf_specdef`` imports none of these libraries. :func:`install_all` (run by ``import hf_specdef``)
registers post-import hooks (:mod:`hf_specdef.integrations.import_hooks`): each integration module is imported -- and
installs its hooks -- once the module of the library that defines the hooked classes has been imported,
or right away if it already is. So ``from_pretrained(..., specdef_config=...)`` and the SpecUndo PEFT
method work whether ``hf_specdef`` is imported before or after the library.

The core never imports this package (``tests/test_layering.py``): an integration registers with the core when it
installs -- the savers of :func:`hf_specdef.save_protected` and the pipeline protector of
:func:`hf_specdef.protect` (:mod:`hf_specdef.analysis.integration_registry`), probe builders
(:data:`hf_specdef.analysis.probe.PROBE_BUILDERS`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from hf_specdef.integrations import import_hooks

__all__ = ["HOOKS", "install_all"]


def _import(name: str) -> Callable[[], None]:
    """Import ``hf_specdef.<name>`` unless it is imported (or being imported) already."""
    full = f"hf_specdef.{name}"

    def callback() -> None:
        if full not in sys.modules:
            importlib.import_module(full)

    return callback


def _auto_classes() -> None:
    """``AutoModel*.from_pretrained`` gets the transformers integration on its first call: a process that only
    imports ``AutoTokenizer`` (which imports ``auto_factory``) does not pay for importing ``modeling_utils``."""
    if "hf_specdef.integrations.transformers" in sys.modules:
        return
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    import_hooks.call_through(_BaseAutoModelClass, "from_pretrained", _import("integrations.transformers"))


# (module whose import makes the hooks needed, what to do then, label); run in this order
HOOKS: tuple[tuple[str, Callable[[], None], str], ...] = (
    ("transformers.modeling_utils", _import("integrations.transformers"), "transformers"),
    ("transformers.models.auto.auto_factory", _auto_classes, "transformers (Auto classes)"),
    ("diffusers.models.modeling_utils", _import("integrations.diffusers"), "diffusers"),
    ("diffusers.pipelines.pipeline_utils", _import("integrations.diffusers"), "diffusers"),
    ("peft", _import("tuners.specundo"), "PEFT (SpecUndo)"),
)

_installed = False


def install_all() -> None:
    """Register the post-import hooks of every integration (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    for module, callback, label in HOOKS:
        import_hooks.when_imported(module, callback, label)
