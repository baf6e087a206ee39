"""SpecDef as a transformers quantizer: ``from_pretrained(path, quantization_config=cfg)`` (see docs/integrations.md).

SpecDef is not a quantization, but the quantizer registry is transformers' one hook that runs on
the loaded model inside ``from_pretrained``. :class:`SpecDefHfQuantizer` deforms the weights once
they are loaded (on whatever device each layer was placed, ``device_map`` included) and then
removes every trace of itself (``remove_quantization_config``; the private ``config._is_quantized`` flags that
``HfQuantizer.postprocess_model`` set are put back as they were: absent), so the model behaves, saves and
reloads like a plain one: config.json gets the protection record as the plain ``specdef`` key and
no ``quantization_config`` that a loader without hf-specdef would refuse.

:class:`SpecDefQuantizationConfig` is the registry-facing wrapper of the user-facing
:class:`~hf_specdef.SpecDefConfig`, with load options such as ``force=True``. A bare ``SpecDefConfig`` works as
``quantization_config`` too, through the same registry and no ``from_pretrained`` patch: transformers looks the
quantizer up by ``quantization_config.quant_method``, which the integration sets on the class
(:data:`hf_specdef.integrations.PATCHES`), and :class:`SpecDefHfQuantizer` wraps it.

:func:`register` / :func:`unregister` add and remove both registry entries (transformers' registries are dicts
with no unregister function).
"""

from __future__ import annotations

import logging
from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation.record import check_not_protected
from hf_specdef.protection.in_memory import ParamTensors, model_pairs, protect_model

logger = logging.getLogger("hf_specdef")

QUANT_METHOD = "specdef"
_LOAD_OPTIONS = ("force", "verify", "progress")


class SpecDefQuantizationConfig(QuantizationConfigMixin):
    """Registry wrapper of a :class:`~hf_specdef.SpecDefConfig` plus load-time options.

    Args:
        specdef: the protection to apply (a ``SpecDefConfig`` or its dict); the default config if None.
        force: protect even if the checkpoint already carries a protection record (compounds the deformation).
        verify: compare outputs on a probe batch before and after (default True; the model is restored
            and :class:`~hf_specdef.protection.in_memory.VerificationError` raised if they deviate beyond the tolerance).
        progress: show a progress bar over the pairs.
        **fields: ``SpecDefConfig`` fields, when built from a flat dict (``from_dict``).

    Example:
        ```python
        from hf_specdef import SpecDefConfig, SpecDefQuantizationConfig

        qc = SpecDefQuantizationConfig(SpecDefConfig(alpha=1000.0), verify=True)
        model = AutoModelForCausalLM.from_pretrained("path/to/model", quantization_config=qc)
        ```
    """

    def __init__(
        self,
        specdef: SpecDefConfig | dict[str, Any] | None = None,
        *,
        force: bool = False,
        verify: bool = True,
        progress: bool = False,
        **fields: Any,
    ) -> None:
        fields.pop("quant_method", None)
        if specdef is not None and fields:
            raise ValueError(f"SpecDefQuantizationConfig got both specdef= and SpecDefConfig fields {sorted(fields)}; pass one.")
        if isinstance(specdef, dict):
            specdef = SpecDefConfig.from_dict(specdef)
        elif specdef is None:
            specdef = SpecDefConfig.from_dict(fields)
        elif not isinstance(specdef, SpecDefConfig):
            raise ValueError(f"SpecDefQuantizationConfig(specdef={specdef!r}) must be a SpecDefConfig or a dict of its fields.")
        self.quant_method = QUANT_METHOD
        self.specdef = specdef
        self.force = bool(force)
        self.verify = bool(verify)
        self.progress = bool(progress)

    @classmethod
    def wrap(cls, cfg: SpecDefConfig | SpecDefQuantizationConfig) -> SpecDefQuantizationConfig:
        """``cfg`` as a ``SpecDefQuantizationConfig`` (returned as is if it already is one)."""
        return cfg if isinstance(cfg, cls) else cls(cfg)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **self.specdef.to_dict(), **{k: getattr(self, k) for k in _LOAD_OPTIONS}}

    def __iter__(self):
        yield from self.to_dict().items()


class SpecDefHfQuantizer(HfQuantizer):
    """Deforms the model once its weights are loaded, then unregisters itself from the model.

    Nothing is replaced before loading (no module is quantized); before the weights are read the
    quantizer only checks, on the meta-device skeleton, that the checkpoint is not already protected
    and that the config selects pairs this architecture has, so a bad config fails before the
    (possibly long) load.
    """

    requires_calibration = False

    def __init__(self, quantization_config: SpecDefQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(SpecDefQuantizationConfig.wrap(quantization_config), **kwargs)

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in set(map(str, device_map.values())):
            raise ValueError(
                "device_map offloads part of the model to disk, where in-memory protection cannot reach it. Load without "
                "disk offload, or protect the checkpoint files instead: hf_specdef.protect_checkpoint(src, dst, cfg) "
                "(streams shard by shard), then load the protected copy."
            )
        if self.pre_quantized:
            raise ValueError(
                "this checkpoint's config.json has a quantization_config with quant_method='specdef', which hf-specdef "
                "never writes (the protection record is the plain 'specdef' key). Remove that entry from config.json."
            )

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        qc = self.quantization_config
        check_not_protected(model, qc.force)
        model_pairs(model, qc.specdef, ParamTensors(model))  # meta tensors: shapes only
        self._flags = _quantized_flags(model)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        qc = self.quantization_config
        try:
            # no backup: on failure from_pretrained raises and no model is returned (the checkpoint is untouched)
            report = protect_model(model, qc.specdef, verify=qc.verify, force=qc.force, progress=qc.progress,
                                   restore_on_failure=False)
        finally:
            self.remove_quantization_config(model)
            _restore_quantized_flags(model, getattr(self, "_flags", {}))
        model.specdef_report = report
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


_FLAG = "_is_quantized"  # private: HfQuantizer.postprocess_model sets it on every config; transformers tests hasattr
_MISSING: Any = object()


def _quantized_flags(model: Any) -> dict[int, tuple[Any, Any]]:
    """``id(config) -> (config, its own _is_quantized or a sentinel)`` for the configs of ``model``'s modules."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    return {i: (c, vars(c).get(_FLAG, _MISSING)) for i, c in configs.items()}


def _restore_quantized_flags(model: Any, before: dict[int, tuple[Any, Any]]) -> None:
    """Put the ``_is_quantized`` flags back as they were before loading: absent on a plain model (a flag left at
    ``False`` would still read as quantized to the ``hasattr`` checks of transformers' attention code)."""
    for i, (config, _) in _quantized_flags(model).items():
        old = before.get(i, (config, _MISSING))[1]
        if old is not _MISSING:
            setattr(config, _FLAG, old)
        elif _FLAG in vars(config):
            delattr(config, _FLAG)


# (transformers registry, its register function, what hf-specdef registers there under QUANT_METHOD)
_REGISTRIES = (
    (AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, SpecDefQuantizationConfig),
    (AUTO_QUANTIZER_MAPPING, register_quantizer, SpecDefHfQuantizer),
)


def register() -> None:
    """Register the config and the quantizer under ``"specdef"`` with transformers' own ``register_quantization_config``
    and ``register_quantizer`` (idempotent)."""
    for mapping, register_with, cls in _REGISTRIES:
        if QUANT_METHOD not in mapping:
            register_with(QUANT_METHOD)(cls)


def unregister() -> list[str]:
    """Remove what :func:`register` put in transformers' registries (an entry of this module, also one registered by
    an earlier copy of it); the entries removed, for the log. transformers has no unregister function: the
    registries are plain dicts."""
    removed = []
    for mapping, _, cls in _REGISTRIES:
        entry = mapping.get(QUANT_METHOD)
        if entry is not None and getattr(entry, "__module__", None) == __name__:
            del mapping[QUANT_METHOD]
            removed.append(f"transformers registry entry {QUANT_METHOD!r} -> {cls.__name__}")
            logger.info("hf-specdef: removed %s", removed[-1])
    return removed
