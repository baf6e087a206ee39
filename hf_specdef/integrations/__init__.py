"""Integrations with transformers, diffusers and PEFT: installed when their library is imported, and reversible.

``import hf_specdef`` imports none of these libraries. :func:`install_all` (run by ``import hf_specdef``)
registers post-import hooks (:mod:`hf_specdef.integrations.import_hooks`, table :data:`HOOKS`): each integration
module is imported -- and installs itself -- once the module of the library that defines what it patches has been
imported, or right away if it already is. So ``from_pretrained(..., specdef_config=...)`` and the SpecUndo PEFT
method work whether ``hf_specdef`` is imported before or after the library. :func:`uninstall` undoes all of it.

What an integration changes in a library is, in this order of preference:

* a registration through the library's own extension point: transformers' ``register_quantization_config`` /
  ``register_quantizer`` (``quantization_config=SpecDefConfig(...)`` is a plain transformers quantizer,
  :mod:`hf_specdef.integrations.transformers.quantizer`), PEFT's ``register_peft_method``
  (:mod:`hf_specdef.tuners.specundo`; PEFT only accepts names already in its ``PeftType`` enum, so the member
  ``SPECUNDO`` is added first);
* a patch, listed in :data:`PATCHES` -- nothing is patched that is not in that table. Each method patch is one
  wrapper made by :mod:`hf_specdef.integrations.patching` (marked ``_specdef_wrapped``, ``__wrapped__`` = the stock
  function) around the integration's ``replacement(stock, *args, **kwargs)``.

The core never imports this package (``tests/test_layering.py``): an integration registers with the core when it
installs -- the savers of :func:`hf_specdef.save_protected` and the pipeline protector of
:func:`hf_specdef.protect` (:mod:`hf_specdef.analysis.integration_registry`), probe builders
(:data:`hf_specdef.analysis.probe.PROBE_BUILDERS`). Those are hf-specdef's own tables and change nothing in a
library, so :func:`uninstall` keeps them.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from types import ModuleType

from hf_specdef.integrations import import_hooks, patching
from hf_specdef.integrations.patching import Patch

logger = logging.getLogger("hf_specdef")

__all__ = ["HOOKS", "PATCHES", "Patch", "install_all", "uninstall"]

_TRANSFORMERS = "hf_specdef.integrations.transformers"
_DIFFUSERS = "hf_specdef.integrations.diffusers"
_SPECUNDO = "hf_specdef.tuners.specundo"

# Every attribute of another module that an integration replaces: (owner, attribute, integration, replacement).
# A method's wrapper calls integration.replacement(stock, *args, **kwargs); wrap=False sets a plain value.
PATCHES: tuple[Patch, ...] = (
    # specdef_config=cfg -> quantization_config=cfg, and the downcast guard (AutoModel*.from_pretrained calls it)
    Patch("transformers.modeling_utils:PreTrainedModel", "from_pretrained", _TRANSFORMERS, "from_pretrained"),
    # transformers reads quantization_config.quant_method: a bare SpecDefConfig then goes through its registry
    Patch("hf_specdef.config:SpecDefConfig", "quant_method", _TRANSFORMERS, "QUANT_METHOD", wrap=False),
    # diffusers has no public quantizer registration: specdef_config= / specdef_options=, the downcast guard
    # (LegacyModelMixin.from_pretrained calls ModelMixin's; a pipeline calls its components')
    Patch("diffusers.models.modeling_utils:ModelMixin", "from_pretrained", _DIFFUSERS, "from_pretrained"),
    Patch("diffusers.pipelines.pipeline_utils:DiffusionPipeline", "from_pretrained", _DIFFUSERS, "from_pretrained"),
    # save_pretrained(..., specdef_config=cfg) (save-time protection) and the claims check of every save
    Patch("diffusers.models.modeling_utils:ModelMixin", "save_pretrained", _DIFFUSERS, "save_pretrained"),
    Patch("diffusers.pipelines.pipeline_utils:DiffusionPipeline", "save_pretrained", _DIFFUSERS, "save_pretrained"),
)

# (module whose import makes the integration needed, the integration module, label); installed in this order
HOOKS: tuple[tuple[str, str, str], ...] = (
    ("transformers.modeling_utils", _TRANSFORMERS, "transformers"),
    ("diffusers.models.modeling_utils", _DIFFUSERS, "diffusers"),
    ("diffusers.pipelines.pipeline_utils", _DIFFUSERS, "diffusers"),
    ("peft", _SPECUNDO, "PEFT (SpecUndo)"),
)


def _initializing(module: ModuleType) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _install(integration: str) -> None:
    """Import ``integration`` (which installs itself), or run its ``install()`` if it is imported already."""
    module = sys.modules.get(integration)
    if module is None:
        importlib.import_module(integration)
    elif not _initializing(module):  # being imported right now (it imported its library): it installs when done
        module.install()


_INSTALLERS = {name: functools.partial(_install, name) for _, name, _ in HOOKS}
_installed = False


def install_all() -> None:
    """Register the post-import hooks of every integration (:data:`HOOKS`); idempotent.

    An integration whose library is imported already installs now, and one imported already (for instance before
    an :func:`uninstall`) installs again. ``import hf_specdef`` runs this.

    Example:

    ```python
    >>> import hf_specdef  # runs install_all()
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("gpt2", specdef_config=hf_specdef.SpecDefConfig())
    ```
    """
    global _installed
    if _installed:
        return
    _installed = True
    for module, integration, label in HOOKS:
        import_hooks.when_imported(module, _INSTALLERS[integration], label)


def uninstall() -> list[str]:
    """Undo :func:`install_all`: transformers, diffusers and PEFT behave as if ``hf_specdef`` had never been imported.

    What it restores, each step logged on the ``"hf_specdef"`` logger at INFO:

    * every attribute of :data:`PATCHES`, to the exact object it replaced (``owner.__dict__[name] is original``;
      ``SpecDefConfig.quant_method`` is deleted again);
    * transformers' quantizer registries: the ``"specdef"`` entries of ``AUTO_QUANTIZATION_CONFIG_MAPPING`` and
      ``AUTO_QUANTIZER_MAPPING`` are removed;
    * PEFT: the SpecUndo entries of the ``PEFT_TYPE_TO_*_MAPPING`` tables and the ``SPECUNDO`` member of ``PeftType``
      are removed (``list(PeftType)`` and ``PeftType("SPECUNDO")`` are stock again);
    * the post-import hooks still waiting for a library are cancelled (the finder leaves ``sys.meta_path``).

    What it leaves:

    * hf-specdef's own registries (the savers of :func:`hf_specdef.save_protected`, the pipeline protector of
      :func:`hf_specdef.protect`, the denoiser probe builder): they change nothing in a library, and those explicit
      calls keep working;
    * objects made while installed: a protected model stays protected; a ``SpecUndoConfig`` (whose ``peft_type`` is
      the removed member, still a ``str`` equal to ``"SPECUNDO"``) and a SpecUndo adapter already built keep
      working, but PEFT no longer builds or loads one, as stock PEFT;
    * with a warning, a method another library has wrapped over the hf-specdef wrapper since (restoring the stock
      method would drop that library's wrapper).

    No private flag needs restoring: the ``"specdef"`` quantizer removes its state from every model it loads
    (``quantization_config``, ``hf_quantizer``, the ``config._is_quantized`` flags) at the end of the load.
    :func:`install_all` afterwards installs everything again; so does importing an integration module for the
    first time.

    Returns:
        What was undone, one line each.

    Example:

    ```python
    >>> import hf_specdef
    >>> from transformers import AutoModelForCausalLM
    >>> from hf_specdef import integrations
    >>> undone = integrations.uninstall()  # stock transformers, diffusers and PEFT again
    >>> AutoModelForCausalLM.from_pretrained("gpt2", specdef_config=hf_specdef.SpecDefConfig())
    Traceback (most recent call last):
    TypeError: GPT2LMHeadModel.__init__() got an unexpected keyword argument 'specdef_config'
    >>> integrations.install_all()  # and back
    ```
    """
    global _installed
    undone = [f"post-import hook for {m}" for m in import_hooks.cancel(_INSTALLERS.values())]
    for what in undone:
        logger.info("hf-specdef: cancelled the %s", what)
    for integration in reversed(list(_INSTALLERS)):
        module = sys.modules.get(integration)
        if module is not None and not _initializing(module) and hasattr(module, "uninstall"):
            undone += module.uninstall()
    undone += [p.label for p in reversed(PATCHES) if patching.restore(p)]  # normally none: each restored its own
    _installed = False
    logger.info("hf-specdef: integrations uninstalled (%d changes undone; install_all() installs them again)",
                len(undone))
    return undone
