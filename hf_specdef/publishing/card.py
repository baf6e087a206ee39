"""The model card of a published folder (``README.md``), rendered from the packaged Jinja template.

The template is ``hf_specdef/templates/specdef_model_card.md`` (package data; a copy of
``model_cards/specdef_model_card.md``), rendered through :class:`huggingface_hub.ModelCard` /
:class:`~huggingface_hub.ModelCardData` with the source's metadata, the protection records of the folder and the
figures of the checks.
"""

from __future__ import annotations

import datetime
import os
from importlib import resources
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import SpecDefConfig
from .checks import ComponentCheck, _fmt
from .components import _components, _record_of
from .source import SourceInfo, _looks_like_hub_id

TEMPLATE_NAME = "specdef_model_card.md"
TAGS = ("specdef", "spectral-deformation", "hf-specdef", "fine-tuning-resistance")
PAPER_URL = "https://arxiv.org/abs/2602.18868"
MAX_CARD_PAIRS = 64  # rows of the per-pair table in a card at record level "full"


def template_path() -> Path:
    """The packaged model-card template (a copy of ``model_cards/specdef_model_card.md``)."""
    return Path(str(resources.files("hf_specdef") / "templates" / TEMPLATE_NAME))


def _load_snippet(info: SourceInfo, repo_id: str) -> str:
    if info.kind == "transformers":
        return (f"from transformers import {info.class_name}\n\n"
                f"model = {info.class_name}.from_pretrained(\"{repo_id}\")")
    if info.is_pipeline:
        return ("from diffusers import DiffusionPipeline\n\n"
                f"pipe = DiffusionPipeline.from_pretrained(\"{repo_id}\")")
    return f"from diffusers import {info.class_name}\n\nmodel = {info.class_name}.from_pretrained(\"{repo_id}\")"


def _records(info: SourceInfo, folder: Path) -> dict[str, dict[str, Any]]:
    return {name: rec for name, _, _ in _components(info, folder)
            if (rec := _record_of(folder / name if name else folder)) is not None}


def _layer_key(layer: Any) -> tuple[str, int, str]:
    """Numeric order of layer labels: ``2`` before ``10``; ``"unet:2"`` before ``"unet:10"``."""
    text = str(layer)
    component, _, index = text.rpartition(":")
    return (component, int(index), "") if index.isdigit() else (component, -1, text)


def _merge_records(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One summary of the records of all protected components (for the card's "What was done")."""
    if not records:
        return {}
    first = next(iter(records.values()))
    conf = first.get("config", {})
    prefix = any(records)  # pipeline components (named sub-folders): prefix layers with the component
    pairs, layers, sites, modes, hot, num = [], set(), set(), set(), set(), 0
    for name, rec in records.items():
        sites.update(rec.get("sites", []))
        modes.update(rec.get("modes", []))
        layers.update(f"{name}:{x}" if prefix and name else x for x in rec.get("layers", []))
        hot.update(rec.get("hot_modules", []))
        num += int(rec.get("num_pairs", 0))
        for p in rec.get("pairs", []) or []:
            pairs.append({k: p.get(k) for k in ("layer", "site", "group", "mode", "factor", "k", "hot")}
                         | ({"layer": f"{name}:{p.get('layer')}"} if prefix and name else {}))
    return {
        "sites": sorted(sites), "modes": sorted(modes), "layers": sorted(layers, key=_layer_key), "num_pairs": num,
        "num_hot": len(hot), "alpha": conf.get("alpha"), "top_k": conf.get("top_k"), "mode": conf.get("mode"),
        "layers_selection": conf.get("layers"), "precision": conf.get("precision"), "pairs": pairs,
        "precision_used": ", ".join(sorted({str(p.get("used")) for r in records.values() if (p := r.get("precision"))}))
        or None,
        "components": sorted(name for name in records if name),
        "pipeline_fold": next((rec["pipeline"]["note"] for rec in records.values() if rec.get("pipeline")), None),
    }


def render_card(
    info: SourceInfo,
    repo_id: str,
    cfg: SpecDefConfig,
    checks: list[ComponentCheck],
    folder: Path,
    *,
    pipeline_check: ComponentCheck | None = None,
    measure: dict[str, Any] | None = None,
    template: str | os.PathLike | None = None,
    release_dtypes: str = "",
    quantization: list[dict[str, Any]] | None = None,
) -> Any:
    """Render the model card (a :class:`huggingface_hub.ModelCard`) of a protected, verified folder.

    ``release_dtypes`` is the statement of the dtypes the release is exact in and what the others do to it
    (:func:`hf_specdef.release_dtypes.card_paragraph`), ending the card's first paragraph."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=info.base_model, license=info.license, license_name=info.license_name,
        license_link=info.license_link, library_name=info.library_name, pipeline_tag=info.pipeline_tag,
        language=info.language, tags=list(TAGS) + [info.library_name],
    )
    summary = _merge_records(_records(info, folder))
    shown = summary.get("pairs", [])[:MAX_CARD_PAIRS]
    all_checks = checks + ([pipeline_check] if pipeline_check else [])
    max_dev = max(c.max_relative_deviation for c in all_checks)
    cov = ", ".join(f"{c.coverage:.1%}" + (f" ({c.component})" if c.component else "") for c in checks)
    hot = ", ".join(f"{c.hot_coverage:.1%}" + (f" ({c.component})" if c.component else "") for c in checks)
    base_url = f"https://huggingface.co/{info.base_model}" if _looks_like_hub_id(info.base_model) else None
    kwargs = dict(
        repo_id=repo_id, base_model=info.base_model, base_model_url=base_url, hf_specdef_version=__version__,
        date=datetime.date.today().isoformat(), record_level=cfg.record, is_pipeline=info.is_pipeline,
        library_name=info.library_name,
        sites=summary.get("sites", list(cfg.sites)), alpha=f"{summary.get('alpha', cfg.alpha):g}",
        top_k=summary.get("top_k", cfg.top_k), layers=summary.get("layers", []),
        layers_selection=summary.get("layers_selection", cfg.layers), mode=summary.get("mode", cfg.mode),
        modes=summary.get("modes", []), num_pairs=summary.get("num_pairs", 0), num_hot=summary.get("num_hot", 0),
        precision=summary.get("precision", cfg.precision), components=summary.get("components", []),
        precision_used=summary.get("precision_used") or "(no record)", release_dtypes=release_dtypes,
        pipeline_fold=summary.get("pipeline_fold"),
        pairs=[p | {"factor": f"{p['factor']:g}" if isinstance(p.get("factor"), (int, float)) else p.get("factor")}
               for p in shown] if cfg.record == "full" else [],
        pairs_truncated=len(summary.get("pairs", [])) > len(shown),
        checks=[c.to_dict() | {"deviation_str": _fmt(c.max_relative_deviation), "tolerance": f"{c.tolerance:g}"}
                for c in all_checks],
        inspections=[{"component": c.component, "deformed": c.deformed, "matrices": c.matrices,
                      "coverage": f"{c.coverage:.1%}", "hot_coverage": f"{c.hot_coverage:.1%}"} for c in checks],
        max_deviation_str=_fmt(max_dev), coverage_str=cov, hot_coverage_str=hot, measure=measure,
        load_snippet=_load_snippet(info, repo_id),
        quantization=quantization or [], quantization_safe=list(cfg.quantization_safe),
    )
    return ModelCard.from_template(data, template_path=str(template or template_path()), **kwargs)
