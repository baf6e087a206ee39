"""``save_protected``: save-time protection for any supported object (the in-memory one stays unchanged)."""

from __future__ import annotations

import os
from typing import Any

from hf_specdef.analysis.integration_registry import saver_for
from hf_specdef.config import SpecDefConfig


def save_protected(obj: Any, save_directory: str | os.PathLike, cfg: SpecDefConfig | None = None, **kwargs: Any) -> Any:
    """Write a protected copy of a transformers model, a diffusers model or a diffusers pipeline.

    The object in memory stays unchanged: it is deformed while an exact backup of the changed rows/columns is kept,
    verified, saved to a temporary folder beside ``save_directory`` that is renamed into place, and restored bit for
    bit (also on any error). Dispatches to the saver of the object's library's integration
    (``hf_specdef.integrations.transformers.save_protected`` or ``hf_specdef.integrations.diffusers.save_protected``);
    see the Integrations page of the docs (docs/integrations.md).

    Args:
        obj (`PreTrainedModel`, a diffusers model or a diffusers pipeline):
            What to save protected, with materialized weights.
        save_directory (`str` or `os.PathLike`):
            The destination folder; it must not exist unless ``overwrite=True``.
        cfg (`SpecDefConfig`, *optional*, defaults to `None`):
            The protection; ``None`` means ``SpecDefConfig()``. ``precision="float32"`` is refused for transformers
            models (it would change the in-memory model's dtypes).
        **kwargs:
            Passed to the integration's saver: ``verify`` (defaults to `True`), ``inputs``, ``force`` (defaults to
            `False`), ``overwrite`` (defaults to `False`), ``progress`` (defaults to `True`), and, for
            transformers, ``save_pretrained`` keyword arguments such as ``max_shard_size``.

    Returns:
        `ProtectionReport`: what was written.

    Raises:
        IntegrationMissingError: the integration of the object's library is not installed.
        ValueError: no integration saves this kind of object, or ``cfg.precision="float32"`` for a transformers
            model.
        AlreadyProtectedError: the object carries a protection record and ``force`` is not True.
        FileExistsError: ``save_directory`` exists and ``overwrite`` is not True.
        NoSitesError: no pair matches the config.
        PrecisionBudgetError: the storage dtype cannot hold the deformation within ``cfg.tolerance``.
        VerificationError: the protected outputs deviate beyond ``cfg.tolerance`` (nothing is written).

    Example:

    ```python
    from transformers import AutoModelForCausalLM

    from hf_specdef import SpecDefConfig, save_protected

    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
    report = save_protected(model, "llama-specdef", SpecDefConfig())
    print(report.modes, report.factors)  # the model in memory is unchanged
    ```
    """
    return saver_for(obj)(obj, save_directory, cfg, **kwargs)
