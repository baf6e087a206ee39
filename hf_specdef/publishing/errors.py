"""The error of a refused publication, raised by every step of :func:`hf_specdef.publishing.publish.publish`."""

from __future__ import annotations

from hf_specdef.errors import SpecDefError


class PublishError(SpecDefError, ValueError):
    """Publication refused by :func:`~hf_specdef.publish`; nothing was pushed and no partial folder was left.

    Raised when the protected checkpoint fails verification (its outputs deviate beyond the tolerance), the sites
    the protection claims are not visibly deformed, a quantization format of ``cfg.quantization_safe`` breaks the
    release, ``output_dir`` already exists (without ``overwrite=True``), a push is asked for with
    ``HF_HUB_OFFLINE`` set or without a Hub token, ``measure=True`` is asked for a model that is not a causal LM,
    or the push fails. Also a ``ValueError``.

    Example:

    ```python
    from hf_specdef import PublishError, SpecDefConfig, publish

    try:
        publish("./my-model", "me/my-model-specdef", SpecDefConfig())
    except PublishError as e:  # e.g. no Hugging Face token: nothing was pushed
        print(f"not published: {e}")
    ```
    """

    docs_page = "docs/releases.md"
