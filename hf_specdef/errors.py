"""The base of every error hf-specdef raises for a user to act on.

Each library error derives from :class:`SpecDefError` and from the built-in type it has always been
(``ValueError`` for a bad value or file, ``ImportError`` for a missing integration, ...), so
``except SpecDefError`` catches them all and older ``except ValueError`` code keeps working.
Their messages name the file, tensor or field, the value and the fix, on one line.
"""

from __future__ import annotations


class SpecDefError(Exception):
    """Base class of all hf-specdef errors.

    Example::

        from hf_specdef import SpecDefError, protect_checkpoint

        try:
            protect_checkpoint("src", "dst")
        except SpecDefError as e:
            print(f"not protected: {e}")
    """


class MissingExtraError(SpecDefError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra that installs it."""


def require_extra(library: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming ``pip install 'hf-specdef[extra]'`` unless ``library`` can be imported.

    Args:
        library: the importable top-level name (``"peft"``, ``"jinja2"``).
        extra: the hf-specdef extra that installs it.
        feature: what needs it, for the message.

    Raises:
        MissingExtraError: ``library`` is not installed (or is blocked).
    """
    import importlib.util
    import sys

    try:
        found = sys.modules.get(library, True) is not None and importlib.util.find_spec(library) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingExtraError(f"{feature} needs {library}, which is not installed: pip install 'hf-specdef[{extra}]'")
