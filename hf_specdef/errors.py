"""The base of every error hf-specdef raises for a user to act on.

Each library error derives from :class:`SpecDefError` and from the built-in type it has always been
(``ValueError`` for a bad value or file, ``ImportError`` for a missing integration, ...), so
``except SpecDefError`` catches them all and older ``except ValueError`` code keeps working.
Their messages name the file, tensor or field, the value and the fix, on one line.
"""

from __future__ import annotations


class SpecDefError(Exception):
    """Base class of all hf-specdef errors.

    Every error the library raises for a user to act on derives from it and from the built-in type it has always
    been (``ValueError`` for a bad value or file, ``ImportError`` for a missing dependency or integration), so
    ``except SpecDefError`` catches them all and ``except ValueError`` code keeps working. The message names the
    file, tensor or field, the value and the fix, on one line. It is never raised itself, only its subclasses:
    :class:`MissingExtraError`, :class:`~hf_specdef.CheckpointError`, :class:`~hf_specdef.VerificationError`,
    :class:`~hf_specdef.PrecisionBudgetError`, :class:`~hf_specdef.AlreadyProtectedError`,
    :class:`~hf_specdef.IntegrationMissingError`, :class:`~hf_specdef.NoSitesError`,
    :class:`~hf_specdef.PublishError` and others.

    Example:

    ```python
    from hf_specdef import SpecDefError, protect_checkpoint

    try:
        protect_checkpoint("no-such-folder", "protected")
    except SpecDefError as e:  # here a CheckpointError: the source folder does not exist
        print(f"not protected: {e}")
    ```
    """

    #: the documentation page that explains this kind of error and its fixes (appended to the message)
    docs_page: str | None = None

    def __str__(self) -> str:
        text = super().__str__()
        if self.docs_page and self.docs_page not in text:
            text += f" (see {self.docs_page})"
        return text


class MissingExtraError(SpecDefError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra that installs it.

    Raised when an object or function that needs an optional library is used without it: ``SpecUndoConfig`` and
    ``SpecUndoModel`` imported from ``hf_specdef`` without PEFT (``pip install 'hf-specdef[peft]'``), or
    :func:`~hf_specdef.publish` without Jinja2 (``pip install 'hf-specdef[publish]'``). Also an ``ImportError``.

    Example:

    ```python
    from hf_specdef import MissingExtraError

    try:
        from hf_specdef import SpecUndoConfig
    except MissingExtraError as e:  # PEFT is not installed
        print(e)  # ... pip install 'hf-specdef[peft]'
    ```
    """

    docs_page = "docs/index.md"


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
