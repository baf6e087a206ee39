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
