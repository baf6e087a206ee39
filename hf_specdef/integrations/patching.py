"""Reversible patches of library attributes: the one mechanism every integration uses (standard library only).

A :class:`Patch` names one attribute of a library class and what replaces it; the integrations list theirs in
:data:`hf_specdef.integrations.PATCHES`. :func:`apply` installs a patch once and :func:`restore` puts back the very
object that was there (``owner.__dict__[name] is original``: for a classmethod, the ``classmethod`` object itself).

A method patch installs *one* wrapper, built here for every patch alike: it calls ``replacement(stock, *args,
**kwargs)`` with the stock function first, and is marked (``functools.wraps``: ``__wrapped__`` is the stock
function, name and docstring are copied; ``_specdef_wrapped = True``; ``_specdef_original`` is the replaced
object), so applying again -- a second ``install()``, a reloaded integration module -- changes nothing.
A value patch (``wrap=False``) sets a plain class attribute and, if the class had none, deletes it again.

Another library may wrap over an hf-specdef wrapper later. :func:`apply` then leaves things as they are (the
hf-specdef wrapper is still called, beneath), and :func:`restore` too, with a warning: restoring the stock
method would silently drop the other library's wrapper.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("hf_specdef")

__all__ = ["WRAPPED_FLAG", "Patch", "apply", "is_applied", "restore", "stock"]

WRAPPED_FLAG = "_specdef_wrapped"
_ORIGINAL = "_specdef_original"
_MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<missing>"})()
_CHAIN = 64  # longest __wrapped__ chain followed


@dataclass(frozen=True)
class Patch:
    """One attribute of a library class that an integration replaces.

    Args:
        owner: the class, as ``"module:QualifiedName"`` (e.g. ``"transformers.modeling_utils:PreTrainedModel"``).
        attribute: the attribute of ``owner`` (its own ``__dict__`` entry, never an inherited one).
        integration: the hf-specdef module that installs the patch and defines ``replacement``.
        replacement: the name, in ``integration``, of the wrapper ``replacement(stock, *args, **kwargs)`` (called
            with the stock function first; for a classmethod ``args[0]`` is the class, else the instance; the
            first paragraph of its docstring is appended to the stock one), or of the value with ``wrap=False``.
        wrap: whether ``attribute`` is a method to wrap (``True``) or a plain value to set.
    """

    owner: str
    attribute: str
    integration: str
    replacement: str
    wrap: bool = True

    @property
    def label(self) -> str:
        """``module.Class.attribute``, for messages."""
        return f"{self.owner.replace(':', '.')}.{self.attribute}"

    @property
    def module(self) -> str:
        """The module that defines :attr:`owner`."""
        return self.owner.partition(":")[0]

    def owner_class(self, import_module: bool = True) -> type | None:
        """The class :attr:`owner` (``None`` when its module is not imported and ``import_module`` is false)."""
        module = sys.modules.get(self.module)
        if module is None:
            if not import_module:
                return None
            module = importlib.import_module(self.module)
        obj: Any = module
        for part in self.owner.partition(":")[2].split("."):
            obj = getattr(obj, part)
        return obj

    def current(self) -> Any:
        """What ``owner.__dict__[attribute]`` holds now (a sentinel when it has no such entry or is not imported)."""
        owner = self.owner_class(import_module=False)
        return _MISSING if owner is None else vars(owner).get(self.attribute, _MISSING)


# (owner, attribute) -> (what apply installed, what was there before); the originals survive a reloaded integration
_state: dict[tuple[str, str], tuple[Any, Any]] = {}


def _function(obj: Any) -> Any:
    return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj


def _marked(obj: Any) -> bool:
    return bool(getattr(_function(obj), WRAPPED_FLAG, False))


def _beneath(obj: Any, installed: Any) -> bool:
    """Whether ``installed`` is ``obj`` or in its ``__wrapped__`` chain (something wrapped over it)."""
    func, target = _function(obj), _function(installed)
    for _ in range(_CHAIN):
        if func is target:
            return True
        func = getattr(func, "__wrapped__", None)
        if func is None:
            return False
    return False


def _key(patch: Patch) -> tuple[str, str]:
    return (patch.owner, patch.attribute)


def is_applied(patch: Patch) -> bool:
    """Whether ``patch`` is in effect: its wrapper or value is in place, or beneath another library's wrapper."""
    current = patch.current()
    entry = _state.get(_key(patch))
    if entry is not None:
        return current is entry[0] or (patch.wrap and _beneath(current, entry[0]))
    return patch.wrap and _marked(current)  # installed by an earlier copy of this module


def _wrapper(original: Any, replacement: Callable[..., Any]) -> Any:
    """The one wrapper of a patched method: ``replacement(stock, *args, **kwargs)``, marked, same descriptor kind."""
    func = _function(original)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return replacement(func, *args, **kwargs)

    setattr(wrapper, WRAPPED_FLAG, True)
    setattr(wrapper, _ORIGINAL, original)
    note = inspect.cleandoc(replacement.__doc__ or "").partition("\n\n")[0].replace("\n", "\n        ")
    wrapper.__doc__ = f"{func.__doc__ or ''}\n\n        hf-specdef: {note}\n"
    return type(original)(wrapper) if isinstance(original, (classmethod, staticmethod)) else wrapper


def apply(patch: Patch) -> bool:
    """Install ``patch`` unless it is in effect already; ``True`` when something changed.

    Raises:
        AttributeError: a method patch whose class does not define the method itself (another library version).
    """
    if is_applied(patch):
        return False
    owner = patch.owner_class()
    current = vars(owner).get(patch.attribute, _MISSING)
    if patch.wrap and not callable(_function(current)):
        raise AttributeError(f"{patch.label} is not a method defined by {patch.owner} (found {current!r}); "
                             "this version of the library is not supported by the hf-specdef integration.")
    replacement = getattr(importlib.import_module(patch.integration), patch.replacement)
    new = _wrapper(current, replacement) if patch.wrap else replacement
    setattr(owner, patch.attribute, new)
    _state[_key(patch)] = (new, current)
    logger.debug("hf-specdef: patched %s", patch.label)
    return True


def restore(patch: Patch) -> bool:
    """Put back what ``patch`` replaced (the identical object; or no attribute, when there was none).

    Nothing happens when ``patch`` is not installed, and, with a warning, when another library has wrapped over
    the hf-specdef wrapper since (the stock method would drop that library's wrapper): ``True`` when restored.
    """
    owner = patch.owner_class(import_module=False)
    if owner is None:
        return False
    current = vars(owner).get(patch.attribute, _MISSING)
    entry = _state.get(_key(patch))
    if entry is not None:
        installed, original = entry
        if current is not installed:
            if patch.wrap and _beneath(current, installed):
                logger.warning("hf-specdef: %s was wrapped again after hf-specdef patched it (now %r); left in place, "
                               "so the hf-specdef wrapper beneath stays active.", patch.label, current)
            else:  # replaced by someone else: nothing of hf-specdef is there any more
                del _state[_key(patch)]
            return False
    elif patch.wrap and _marked(current):  # installed by an earlier copy of this module
        original = getattr(_function(current), _ORIGINAL)
    else:
        return False
    if original is _MISSING:
        delattr(owner, patch.attribute)
    else:
        setattr(owner, patch.attribute, original)
    _state.pop(_key(patch), None)
    logger.info("hf-specdef: restored %s", patch.label)
    return True


def apply_all(patches: Iterable[Patch], integration: str) -> list[str]:
    """:func:`apply` the patches of ``integration``, in order; the labels of those installed now."""
    return [p.label for p in patches if p.integration == integration and apply(p)]


def restore_all(patches: Iterable[Patch], integration: str) -> list[str]:
    """:func:`restore` the patches of ``integration``, last first; the labels of those restored."""
    return [p.label for p in reversed(tuple(patches)) if p.integration == integration and restore(p)]


def stock(method: Any) -> Any:
    """The stock function under an hf-specdef wrapper (``method`` itself when it is not one)."""
    func = _function(method)
    return func.__wrapped__ if getattr(func, WRAPPED_FLAG, False) else method
