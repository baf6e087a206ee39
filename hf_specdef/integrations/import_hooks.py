"""Post-import hooks: run a callback once a module of a library has been imported (standard library only).

``import hf_specdef`` must stay light (no transformers, diffusers or PEFT), yet the ``from_pretrained``
hooks must be in place before anyone calls ``from_pretrained``. :func:`when_imported` runs a callback as
soon as a given module is imported -- right away if it already is -- through a small finder at the front
of ``sys.meta_path``.

The callback does not run the moment its module finishes: a library's import chains are tangled (when
``transformers.modeling_utils`` is done, ``transformers.modeling_layers`` that imported it may still be
half-initialized), and importing more of the library then could hit a half-built module. So the finder
counts, per thread and per library, the modules of that library being executed, and runs the callbacks
whose module is loaded when that count returns to zero: at the end of the outermost import of the library.

:func:`cancel` forgets waiting hooks (:func:`hf_specdef.integrations.uninstall`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

logger = logging.getLogger("hf_specdef")

__all__ = ["cancel", "pending", "when_imported"]


@dataclass(frozen=True)
class _Hook:
    module: str  # full module name whose import makes the callback due
    callback: Callable[[], None]
    label: str  # for messages

    @property
    def library(self) -> str:
        return self.module.partition(".")[0]


_lock = threading.RLock()
_hooks: list[_Hook] = []
_depth = threading.local()  # library -> number of its modules this thread is executing


def when_imported(module: str, callback: Callable[[], None], label: str | None = None) -> None:
    """Run ``callback()`` once, after ``module`` is imported (now if it already is).

    A failing callback is logged as a warning and never breaks the user's import.
    """
    hook = _Hook(module, callback, label or module)
    with _lock:
        if _loaded(module) and not _busy(hook.library):
            due = True
        else:
            due = False
            _hooks.append(hook)
            if not any(isinstance(f, _Finder) for f in sys.meta_path):
                sys.meta_path.insert(0, _FINDER)
    if due:
        _run(hook)


def pending() -> list[str]:
    """The modules whose import still has a callback waiting (for tests and diagnostics)."""
    with _lock:
        return [h.module for h in _hooks]


def cancel(callbacks: Iterable[Callable[[], None]]) -> list[str]:
    """Forget the waiting hooks whose callback is one of ``callbacks``; the modules they were waiting for.

    The finder leaves ``sys.meta_path`` once no hook waits (:func:`hf_specdef.integrations.uninstall` runs this).
    """
    targets = list(callbacks)
    with _lock:
        gone = [h for h in _hooks if any(h.callback is c for c in targets)]
        for h in gone:
            _hooks.remove(h)
        if not _hooks and _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
    return [h.module for h in gone]


def _loaded(module: str) -> bool:
    mod = sys.modules.get(module)
    return mod is not None and not getattr(getattr(mod, "__spec__", None), "_initializing", False)


def _busy(library: str) -> bool:
    return getattr(_depth, library, 0) > 0


def _run(hook: _Hook) -> None:
    try:
        hook.callback()
    except Exception as e:  # never break the user's import of the library
        logger.warning("hf-specdef: could not install the %s integration (%s: %s); its from_pretrained/save_pretrained "
                       "keywords will not work in this process.", hook.label, type(e).__name__, e)
        logger.debug("hf-specdef: %s hook failed", hook.label, exc_info=True)


def _settled(library: str) -> None:
    """The outermost import of ``library`` in this thread is done: run the callbacks now due."""
    with _lock:
        # modules in sys.modules: the one whose execution just ended is still flagged as initializing
        due = [h for h in _hooks if h.library == library and h.module in sys.modules]
        for h in due:
            _hooks.remove(h)
        if not _hooks and _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
    for h in due:  # removed first: a callback that imports more of the library does not re-enter itself
        _run(h)


def _libraries() -> set[str]:
    with _lock:
        return {h.library for h in _hooks}


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the watched libraries, counts module execution around the real loader."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        library = fullname.partition(".")[0]
        if library not in _libraries():
            return None
        spec = _find_elsewhere(self, fullname, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            _count_execution(spec.loader, library)
        return spec


def _find_elsewhere(me: _Finder, fullname: str, path: Sequence[str] | None, target: ModuleType | None
                    ) -> importlib.machinery.ModuleSpec | None:
    for finder in list(sys.meta_path):
        if finder is me:
            continue
        find = getattr(finder, "find_spec", None)
        spec = find(fullname, path, target) if find is not None else None
        if spec is not None:
            return spec
    return None


def _count_execution(loader: Any, library: str) -> None:
    """Wrap this loader's ``exec_module`` (on the instance, once) to count the library's depth."""
    original = loader.exec_module

    def exec_module(module: ModuleType) -> None:
        loader.__dict__.pop("exec_module", None)  # back to the class's method for any later use
        setattr(_depth, library, getattr(_depth, library, 0) + 1)
        try:
            original(module)
        finally:
            setattr(_depth, library, getattr(_depth, library, 0) - 1)
        if not _busy(library):
            _settled(library)

    try:
        loader.exec_module = exec_module
    except (AttributeError, TypeError):  # a loader that takes no attributes: not counted (its library settles later)
        pass


_FINDER = _Finder()
