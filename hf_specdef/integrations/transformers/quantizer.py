"""SpecDef as a transformers quantizer: ``from_pretrained(path, quantization_config=cfg)`` (SPEC §4).

SpecDef is not a quantization, but the quantizer registry is transformers' one hook that runs on
the loaded model inside ``from_pretrained``. :class:`SpecDefHfQuantizer` deforms the weights once
they are loaded (on whatever device each layer was placed, ``device_map`` included) and then
removes every trace of itself (``remove_quantization_config``), so the model behaves, saves and
reloads like a plain one: config.json gets the protection record as the plain ``specdef`` key and
no ``quantization_config`` that a loader without hf-specdef would refuse.

:class:`SpecDefQuantizationConfig` is the registry-facing wrapper of the user-facing
:class:`~hf_specdef.SpecDefConfig`; the ``from_pretrained`` hook of
:mod:`hf_specdef.integrations.transformers` converts a ``SpecDefConfig`` into it, so users never
have to build one unless they want load options such as ``force=True``.
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
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        qc = self.quantization_config
        try:
            # no backup: on failure from_pretrained raises and no model is returned (the checkpoint is untouched)
            report = protect_model(model, qc.specdef, verify=qc.verify, force=qc.force, progress=qc.progress,
                                   restore_on_failure=False)
        finally:
            self.remove_quantization_config(model)
            for module in model.modules():  # set by HfQuantizer.postprocess_model
                cfg = getattr(module, "config", None)
                if cfg is not None and hasattr(cfg, "_is_quantized"):
                    cfg._is_quantized = False
        model.specdef_report = report
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register the config and the quantizer under ``"specdef"`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SpecDefQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SpecDefHfQuantizer)
