"""The error of a refused publication, raised by every step of :func:`hf_specdef.publishing.publish.publish`."""

from __future__ import annotations

from hf_specdef.errors import SpecDefError


class PublishError(SpecDefError, ValueError):
    """Publication refused (verification failed, the claimed sites are not deformed, no token...)."""
