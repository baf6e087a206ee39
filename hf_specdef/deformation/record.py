"""The protection record: a plain extra key in the model config (never a ``quantization_config``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hf_specdef import __version__
from hf_specdef.config import CONFIG_KEY, DIFFUSERS_CONFIG_KEY, SpecDefConfig
from hf_specdef.deformation import precision
from hf_specdef.errors import SpecDefError

RECORD_FORMAT = "hf-specdef/1"


class AlreadyProtectedError(SpecDefError, ValueError):
    """The model already carries a protection record.

    Raised by :func:`~hf_specdef.protect`, :func:`~hf_specdef.save_protected`,
    :func:`~hf_specdef.protect_checkpoint` and :func:`~hf_specdef.publish` when the model or checkpoint has a
    protection record in its config and ``force`` is False: protecting twice compounds the deformation and the
    precision error. Pass ``force=True`` (CLI: ``--force``) to protect again anyway. Also a ``ValueError``.

    Example:

    ```python
    from transformers import AutoModelForCausalLM

    from hf_specdef import AlreadyProtectedError, protect

    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
    protect(model)
    try:
        protect(model)
    except AlreadyProtectedError as e:
        print(e)  # ... pass force=True (CLI: --force) if you really mean it
    ```
    """

    docs_page = "docs/releases.md"


def make_record(cfg: SpecDefConfig, results: Sequence[Any], deviation: float | None) -> dict[str, Any] | None:
    """Record of a protection at ``cfg.record`` detail (``None`` for ``record="none"``)."""
    if cfg.record == "none":
        return None
    rec: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "library_version": __version__,
        "config": {k: v for k, v in cfg.to_dict().items() if k != "site_map"},
        "sites": sorted({r.pair.site for r in results}),
        "layers": sorted({r.pair.layer for r in results}),
        "num_pairs": len(results),
        "modes": sorted({r.mode for r in results}),
        # the factors actually applied (alpha as requested may be rounded, e.g. 1000 -> 1024 in axis mode)
        "factors": sorted({float(r.deformation.factor) for r in results}),
        "hot_modules": sorted({m for r in results for m in r.pair.hot_modules}),
        "max_relative_deviation": deviation,
        "precision": precision.summary(cfg, results),
    }
    if cfg.record == "full":
        rec["pairs"] = [r.to_dict(full=True) for r in results]
    return rec


def component_record(cfg: SpecDefConfig, local: Sequence[Any], pipeline: Sequence[Any], prefix: str,
                     deviation: float | None) -> dict[str, Any] | None:
    """Record of one pipeline component: its own pairs ``local`` (names relative to it) plus, when ``pipeline``
    holds cross-component pairs (names prefixed by component, e.g. ``"unet."``), a ``"pipeline"`` entry with the
    modules of this component (``prefix``) they touch."""
    rec = make_record(cfg, local, deviation)
    if rec is None or not pipeline:
        return rec

    def modules(hot: bool) -> list[str]:
        mods = {m for r in pipeline for m in (r.pair.hot_modules if hot else r.pair.cold_modules)}
        return sorted(m[len(prefix):] for m in mods if m.startswith(prefix))

    rec["pipeline"] = {
        "note": "pipeline-level norm site: the text encoder's final norm is folded into every cross-attention "
                "to_k/to_v of the denoiser; only the composed pipeline keeps its function",
        "num_pairs": len(pipeline),
        "hot_modules": modules(hot=True),
        "cold_modules": modules(hot=False),
    }
    if cfg.record == "full":
        rec["pipeline"]["pairs"] = [r.to_dict(full=True) for r in pipeline]
    rec["hot_modules"] = sorted(set(rec["hot_modules"]) | set(rec["pipeline"]["hot_modules"]))
    rec["precision"] = precision.summary(cfg, list(local) + list(pipeline))  # the folded pair counts too
    if not local:
        rec["sites"] = []
    return rec


def _config(obj: Any) -> Any:
    return getattr(obj, "config", None)


def record_key(config: Mapping[str, Any]) -> str:
    """The key of the record in a config.json dict: ``"_specdef"`` for a diffusers model, else ``"specdef"``."""
    return DIFFUSERS_CONFIG_KEY if "_class_name" in config or "_diffusers_version" in config else CONFIG_KEY


def get_record(model_or_config: Any) -> dict[str, Any] | None:
    """The record on a transformers/diffusers model or config (object or dict), if any (under either key)."""
    cfg = _config(model_or_config) if hasattr(model_or_config, "config") else model_or_config
    if cfg is None:
        return None
    if isinstance(cfg, Mapping):
        return cfg.get(CONFIG_KEY) or cfg.get(DIFFUSERS_CONFIG_KEY)
    return getattr(cfg, CONFIG_KEY, None)


def set_record(model: Any, record: dict[str, Any] | None) -> None:
    """Store ``record`` in the model's config so that ``save_pretrained`` writes it to config.json."""
    if hasattr(model, "register_to_config"):  # diffusers ModelMixin: FrozenDict config, private key
        internal = model._internal_dict
        if CONFIG_KEY in internal:  # a record under the public key (written by hand or by an earlier version): replaced
            model._internal_dict = type(internal)({k: v for k, v in internal.items() if k != CONFIG_KEY})
        model.register_to_config(**{DIFFUSERS_CONFIG_KEY: record})
    else:
        setattr(model.config, CONFIG_KEY, record)


def factors_text(rec: Mapping[str, Any]) -> str:
    """The factors a record says were applied (older records: the requested alpha, named as such)."""
    factors = rec.get("factors")
    if factors:
        return "factors " + ", ".join(f"{f:g}" for f in factors)
    return f"requested alpha {rec.get('config', {}).get('alpha')}"


def check_not_protected(model: Any, force: bool) -> None:
    rec = get_record(model)
    if rec and not force:
        raise AlreadyProtectedError(
            f"this model is already protected (record {rec.get('format')}: sites={rec.get('sites')}, "
            f"{factors_text(rec)}). Protecting twice compounds the deformation and the "
            "precision error; pass force=True (CLI: --force) if you really mean it."
        )
