"""diffusers integration: protect pipelines and denoisers at load, in memory and at save (see docs/integrations.md).

This module is imported once ``hf_specdef`` and diffusers' ``ModelMixin`` or ``DiffusionPipeline`` both are
(post-import hook, see :mod:`hf_specdef.integrations`), and then, once (idempotent):

* registers the diffusers denoiser sites (:mod:`hf_specdef.sites.diffusers`) and a probe builder for
  denoisers in :data:`hf_specdef.analysis.probe.PROBE_BUILDERS` (:mod:`.probe`);
* registers with :mod:`hf_specdef.analysis.integration_registry` the pipeline protector of :func:`hf_specdef.protect`
  (:func:`protect_pipeline`, :mod:`.pipeline`) and the saver of :func:`hf_specdef.save_protected`
  for pipelines and diffusers models (:func:`save_protected`, :mod:`.save`);
* applies its rows of :data:`hf_specdef.integrations.PATCHES` -- one wrapper each, diffusers having no public
  quantizer registration to go through:

  - ``ModelMixin.from_pretrained`` and ``DiffusionPipeline.from_pretrained`` (:func:`from_pretrained`;
    ``LegacyModelMixin.from_pretrained`` calls ``ModelMixin``'s): ``specdef_config=cfg`` deforms the weights
    once loaded, and a float32-only protection is never loaded in a 16-bit ``torch_dtype`` (:mod:`.guard`);
  - ``ModelMixin.save_pretrained`` and ``DiffusionPipeline.save_pretrained`` (:func:`save_pretrained`):
    ``specdef_config=cfg`` writes protected files while the in-memory object stays unchanged
    (:func:`save_protected`), and any save of a model that carries a protection record first checks that the
    weights show the claimed deformation (:mod:`.claims`) and refuses to write otherwise
    (:class:`DeformationCheckError`).

:func:`uninstall` (run by :func:`hf_specdef.integrations.uninstall`) restores the four methods (the identical
objects); the registrations with hf-specdef's core stay.

**Stock diffusers silently ignores unknown keywords**: without ``import hf_specdef``,
``UNet2DConditionModel.from_pretrained(path, specdef_config=cfg)`` returns an *unprotected* model and says
nothing. The keywords work only while the integration is installed.

Pipeline-level ``norm`` site (see docs/design.md): in a Stable-Diffusion-style pipeline the text encoder's
``final_layer_norm`` feeds (as ``encoder_hidden_states``) only the cross-attention ``to_k``/``to_v`` of every
denoiser block. Folding a channel scale there makes every cross-attention ``to_k``/``to_v`` a hot side — the
one way to heat ``to_v``. It is on by default (``pipeline_norm=None``: applied when ``"norm"`` is among the
sites, ``layers`` is ``"all"`` or ``"cross-attention"`` and the pipeline qualifies; skipped with the reason
otherwise). It changes the saved text encoder's standalone outputs (only the composed pipeline is unchanged),
so the text encoder's config gets a record too. It is refused for a text encoder with a projection head
(``CLIPTextModelWithProjection``), for pipelines with several text encoders (SDXL, SD3 feed other hidden
states) and for denoisers that transform ``encoder_hidden_states`` before attention (``encoder_hid_proj``,
``cross_attention_norm``, ``caption_projection``, text addition embeddings).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from diffusers import DiffusionPipeline

from hf_specdef.analysis import integration_registry as handlers
from hf_specdef.analysis import probe
from hf_specdef.analysis.probe import composed_output, text_ids  # in the core now (stock.py compares saved pipelines with them)
from hf_specdef.integrations import PATCHES, patching
from hf_specdef.integrations.diffusers.claims import (
    DeformationCheckError,
    _already_checked,
    _check_pipeline_claims,
    _checked,
    check_claims,
)
from hf_specdef.integrations.diffusers.denoiser_probe import diffusers_probe
from hf_specdef.integrations.diffusers.guard import guarded_load
from hf_specdef.integrations.diffusers.pipeline import (
    DENOISER_NAMES,
    FINAL_NORMS,
    TEXT_ENCODER,
    ComponentTensors,
    _apply,
    protect_pipeline,
)
from hf_specdef.integrations.diffusers.save import _as_config, save_protected
from hf_specdef.protection.in_memory import is_pipeline

logger = logging.getLogger("hf_specdef")

__all__ = [
    "DENOISER_NAMES", "FINAL_NORMS", "TEXT_ENCODER", "ComponentTensors", "DeformationCheckError", "check_claims",
    "composed_output", "diffusers_probe", "from_pretrained", "install", "protect_pipeline", "save_pretrained",
    "save_protected", "text_ids", "uninstall",
]


# --------------------------------------------------------------------------------------------
# Hooks (installed once at import)
# --------------------------------------------------------------------------------------------


def _saves(obj: Any) -> bool:
    """The objects :func:`hf_specdef.save_protected` gives to :func:`save_protected`: pipelines, diffusers classes."""
    return is_pipeline(obj) or any(c.__module__.startswith("diffusers.") for c in type(obj).__mro__)


def _protect_loaded(obj: Any, cfg: Any, options: dict[str, Any] | None) -> Any:
    cfg = _as_config(cfg)
    options = dict(options or {})
    unknown = sorted(set(options) - {"verify", "force", "text_encoder", "pipeline_norm", "inputs"})
    if unknown:
        raise ValueError(f"specdef_options has unknown keys {unknown}; allowed: verify, force, text_encoder, pipeline_norm, "
                         "inputs (text_encoder / pipeline_norm only for pipelines).")
    if isinstance(obj, DiffusionPipeline):
        options.setdefault("progress", False)
        protect_pipeline(obj, cfg, **options)
    else:
        if options.get("text_encoder") or options.get("pipeline_norm"):
            raise ValueError("specdef_options text_encoder / pipeline_norm apply to pipelines, not to a single model.")
        model = obj[0] if isinstance(obj, tuple) else obj  # output_loading_info=True
        dname = "model"
        report, _ = _apply({dname: model}, dname, cfg, verify=options.get("verify", True), force=options.get("force", False),
                           progress=False, text_encoder=False, pipeline_norm=False, inputs=options.get("inputs"))
        logger.info("hf-specdef: %s protected at load (%d pairs)", type(model).__name__, len(report.results))
    return obj


def from_pretrained(stock: Any, cls: type, *args: Any, specdef_config: Any = None,
                    specdef_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """``specdef_config=SpecDefConfig(...)`` deforms the weights once loaded, with optional
    ``specdef_options=dict(text_encoder=..., pipeline_norm=..., verify=..., force=...)`` (works only while the
    hf-specdef diffusers integration is installed; stock diffusers silently ignores the keywords).

    The replacement of ``ModelMixin.from_pretrained`` and ``DiffusionPipeline.from_pretrained``
    (:data:`hf_specdef.integrations.PATCHES`); its first paragraph is appended to the stock docstrings.

    Args:
        stock: the stock ``from_pretrained`` function.
        cls: the class it is called on.
        *args: passed to ``stock``.
        specdef_config: the protection to apply once loaded (a ``SpecDefConfig`` or its dict); none by default.
        specdef_options: options of the protection: ``verify``, ``force``, ``inputs``, and for pipelines
            ``text_encoder`` and ``pipeline_norm`` (see :func:`protect_pipeline`).
        **kwargs: passed to ``stock`` once the downcast guard has read them (:func:`.guard.guarded_load`).

    Returns:
        What ``stock`` returns, protected with ``specdef_config``.
    """
    if specdef_options is not None and specdef_config is None:
        raise ValueError("specdef_options= needs specdef_config=SpecDefConfig(...).")
    if specdef_config is not None:
        cfg = _as_config(specdef_config)  # fail on a bad config before the (possibly long) load
    obj = guarded_load(stock, cls, args, kwargs)  # the downcast guard (float32-only protections)
    return obj if specdef_config is None else _protect_loaded(obj, cfg, specdef_options)


def save_pretrained(stock: Any, self: Any, save_directory: str | os.PathLike, *args: Any, specdef_config: Any = None,
                    **kwargs: Any) -> Any:
    """``specdef_config=SpecDefConfig(...)`` writes protected files while the object in memory stays unchanged;
    a model or pipeline whose protection record claims more than its weights show is refused.

    The replacement of ``ModelMixin.save_pretrained`` and ``DiffusionPipeline.save_pretrained``
    (:data:`hf_specdef.integrations.PATCHES`); its first paragraph is appended to the stock docstrings.

    Args:
        stock: the stock ``save_pretrained`` function.
        self: the model or pipeline.
        save_directory: where to write.
        *args: passed to ``stock`` (keywords only with ``specdef_config``).
        specdef_config: write protected files with this protection (:func:`save_protected`); none by default.
        **kwargs: passed to ``stock``, or to :func:`save_protected` with ``specdef_config``.

    Returns:
        What ``stock`` returns, or the :class:`~hf_specdef.ProtectionReport` with ``specdef_config``.
    """
    if specdef_config is not None:
        if args:
            raise TypeError("save_pretrained(..., specdef_config=...) takes its other options as keywords.")
        return save_protected(self, save_directory, _as_config(specdef_config), **kwargs)
    if not _already_checked():
        if isinstance(self, DiffusionPipeline):
            _check_pipeline_claims(self)
        else:
            check_claims(self)
    with _checked():
        return stock(self, save_directory, *args, **kwargs)


def install() -> None:
    """Install the diffusers integration (idempotent): its rows of :data:`hf_specdef.integrations.PATCHES`
    (:func:`from_pretrained`, :func:`save_pretrained`); the denoiser probe builder; the pipeline protector and the
    saver that :func:`hf_specdef.protect` and :func:`hf_specdef.save_protected` look up in
    :mod:`hf_specdef.analysis.integration_registry`."""
    patching.apply_all(PATCHES, __name__)
    if not any(getattr(b, "__module__", None) == diffusers_probe.__module__ and b.__name__ == "diffusers_probe"
               for b in probe.PROBE_BUILDERS):
        probe.PROBE_BUILDERS.append(diffusers_probe)  # once, even if this module is reloaded
    handlers.register_pipeline_protector(protect_pipeline)
    handlers.register_saver("diffusers", _saves, save_protected)


def uninstall() -> list[str]:
    """Undo :func:`install` in diffusers: restore the patched methods (the identical objects); what was undone, one
    line each. The probe builder, pipeline protector and saver registered with hf-specdef's core stay."""
    return patching.restore_all(PATCHES, __name__)


install()
