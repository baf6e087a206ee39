"""The error of a refused publication, raised by every step of :func:`hf_specdef.publish.publish`."""

from __future__ import annotations

from ..errors import SpecDefError


class PublishError(SpecDefError, ValueError):
    """Publication refused (verification failed, the claimed sites are not deformed, no token...)."""
