"""What the integrations register with the core, so that lower layers never import :mod:`hf_specdef.integrations`.

The core looks a handler up here; an integration registers its handlers in its ``install()``, which runs once its
library is imported, or at ``import hf_specdef`` when the library already is (see :mod:`hf_specdef.integrations`).
Whoever holds a diffusers pipeline or a transformers model has imported that library, so its handlers are in place.
When none is (the integration failed to install: a warning said so then), :class:`IntegrationMissingError` names
the missing integration and the fix; nothing is silently skipped.

* the pipeline protector: what :func:`hf_specdef.protect` does with a pipeline (the diffusers integration's
  ``protect_pipeline``);
* savers: :func:`hf_specdef.save_protected` of the objects a predicate accepts, one per library (transformers,
  diffusers).

Probe builders have their own list, :data:`hf_specdef.analysis.probe.PROBE_BUILDERS`. Registering again under the same
library replaces the entry (an integration module reloaded in tests registers anew).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hf_specdef.errors import SpecDefError

__all__ = [
    "IntegrationMissingError", "Saver", "installed", "library_of", "missing_message", "pipeline_protector",
    "register_pipeline_protector", "register_saver", "saver_for",
]

LIBRARIES = ("transformers", "diffusers")  # the libraries hf_specdef integrates (to name a missing integration)
PIPELINE_LIBRARY = "diffusers"  # the library whose integration protects pipelines


def missing_message(library: str, what: str) -> str:
    """Why ``what`` cannot be done without ``library``'s integration, and the fix."""
    return (
        f"{what} needs the hf_specdef {library} integration (hf_specdef.integrations.{library}), which is not "
        f"installed in this process. It installs itself once {library} is imported (before or after hf_specdef): "
        f"check that {library} is installed and importable (pip install {library}), look for an earlier "
        f"'hf-specdef: could not install the {library} integration' warning, or run "
        f"`import hf_specdef.integrations.{library}` to see the error."
    )


class IntegrationMissingError(SpecDefError, ImportError):
    """An object needs the integration of its library, which is not installed in this process.

    Raised by :func:`~hf_specdef.protect` of a diffusers pipeline and by :func:`~hf_specdef.save_protected` when
    the hf_specdef integration of the object's library (transformers or diffusers) did not install, e.g. because
    importing it failed (a warning said so then). The message names the integration and how to see the error. Also
    an ``ImportError``.

    Args:
        library (`str`):
            The library whose integration is missing (``"transformers"`` or ``"diffusers"``).
        what (`str`):
            What needs it, for the message (e.g. ``"save_protected() of a diffusers object (UNet2DConditionModel)"``).

    Attributes:
        library (`str`):
            The library whose integration is missing.

    Example:

    ```python
    from hf_specdef import IntegrationMissingError, save_protected

    try:
        save_protected(pipe, "protected-pipeline")  # a diffusers pipeline
    except IntegrationMissingError as e:
        print(e.library, e)  # "diffusers", and how to see why its integration did not install
    ```
    """

    docs_page = "docs/integrations.md"

    def __init__(self, library: str, what: str) -> None:
        super().__init__(missing_message(library, what))
        self.library = library


# --------------------------------------------------------------------------------------------
# protect(pipeline)
# --------------------------------------------------------------------------------------------

_pipeline_protector: Callable[..., Any] | None = None


def register_pipeline_protector(protect: Callable[..., Any]) -> None:
    """``protect(pipe, cfg, **options)`` for :func:`hf_specdef.protect` of a pipeline (the diffusers integration)."""
    global _pipeline_protector
    _pipeline_protector = protect


def pipeline_protector(pipe: Any) -> Callable[..., Any]:
    """The registered pipeline protector, or :class:`IntegrationMissingError` naming the diffusers integration."""
    if _pipeline_protector is None:
        raise IntegrationMissingError(PIPELINE_LIBRARY, f"protect() of a pipeline ({type(pipe).__name__})")
    return _pipeline_protector


# --------------------------------------------------------------------------------------------
# save_protected(obj, ...)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Saver:
    library: str
    accepts: Callable[[Any], bool]  # whether ``save`` handles this object
    save: Callable[..., Any]  # save(obj, save_directory, cfg, **kwargs) -> ProtectionReport


_savers: dict[str, Saver] = {}


def register_saver(library: str, accepts: Callable[[Any], bool], save: Callable[..., Any]) -> None:
    """Make ``save`` :func:`hf_specdef.save_protected` for the objects ``accepts`` (replaces ``library``'s saver)."""
    _savers[library] = Saver(library, accepts, save)


def installed(library: str) -> bool:
    """Whether ``library``'s integration is installed (each one registers its saver when it installs)."""
    return library in _savers


def library_of(obj: Any) -> str | None:
    """The integrated library (:data:`LIBRARIES`, or one with a saver) that defines the most derived class of ``obj``."""
    known = set(LIBRARIES) | set(_savers)
    for cls in type(obj).__mro__:
        top = (getattr(cls, "__module__", None) or "").partition(".")[0]
        if top in known:
            return top
    return None


def saver_for(obj: Any) -> Callable[..., Any]:
    """The saver of ``obj``: its own library's saver first, then any other saver that accepts it.

    Raises :class:`IntegrationMissingError` when ``obj`` comes from a library whose integration registered no saver,
    ``ValueError`` for an object no integration saves.
    """
    lib = library_of(obj)
    savers = list(_savers.values())
    for saver in sorted(savers, key=lambda s: s.library != lib):  # stable: the object's own library first
        if saver.accepts(obj):
            return saver.save
    if lib is not None and lib not in _savers:
        raise IntegrationMissingError(lib, f"save_protected() of a {lib} object ({type(obj).__name__})")
    raise ValueError(
        f"save_protected expects a transformers PreTrainedModel, a diffusers model or a diffusers pipeline, got "
        f"{type(obj).__name__}."
    )
