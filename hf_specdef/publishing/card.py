"""The model card of a published folder (``README.md``), rendered from the packaged Jinja template.

The template is ``hf_specdef/templates/specdef_model_card.md`` (package data; a copy of
``model_cards/specdef_model_card.md``), rendered through :class:`huggingface_hub.ModelCard` /
:class:`~huggingface_hub.ModelCardData` with the source's metadata, the protection records of the folder and the
figures of the checks.

The card claims what was done and measured on *this* release, nothing else:

* the mode and the factors are the ones the records say were applied (``"modes"``, ``"factors"``), beside the
  requested alpha (``1000 → 1024`` in axis mode);
* the headline on fine-tuning resistance is the worst case measured on this release (a red team's, or a quick toy
  measurement's, named as such), or says plainly that none was measured, with the bound that holds for any release
  that only rescales weights; figures measured on another model are labelled as such;
* the ``fine-tuning-resistance`` tag is only given for a **red-team worst case over uninformed attacks above
  1.5×** (:data:`~.claims.RESISTANCE_TAG_MIN`): a quick toy measurement (one optimizer, a synthetic task) is not a worst case,
  and without a measurement a bit-exact release is not slowed at all by a scale-invariant optimizer.

Every user-provided string (Hub ids, folder and class names from the source's files, names from the records and
from red-team results) is escaped for where it lands: Markdown text through :func:`~.escaping.escape_markdown`, the
Python usage snippet through JSON string literals (:func:`~.escaping.python_string_literal`) and identifier checks,
the YAML front matter through :class:`~huggingface_hub.ModelCardData` (``yaml.dump``).
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from hf_specdef import __version__
from hf_specdef.config import SpecDefConfig
from hf_specdef.publishing.checks import ComponentCheck, _fmt
from hf_specdef.publishing.claims import REFERENCE_MODEL, as_number, card_tags, resistance_summary
from hf_specdef.publishing.components import _components, _record_of
from hf_specdef.publishing.escaping import escape_markdown, markdown_values
from hf_specdef.publishing.snippet import load_snippet, release_dtype
from hf_specdef.publishing.source import SourceInfo

TEMPLATE_NAME = "specdef_model_card.md"
PAPER_URL = "https://arxiv.org/abs/2602.18868"
MAX_CARD_PAIRS = 64  # rows of the per-pair table in a card at record level "full"


def template_path() -> Path:
    """The packaged model-card template (a copy of ``model_cards/specdef_model_card.md``).

    Returns:
        The path of ``hf_specdef/templates/specdef_model_card.md``.

    Example:

    ```python
    >>> template_path().name
    'specdef_model_card.md'
    ```
    """
    return Path(str(resources.files("hf_specdef") / "templates" / TEMPLATE_NAME))


def format_factor(factor: float) -> str:
    """A deformation factor as the card prints it: ``1024``, ``1000``, or ``1/1024`` for an inverted site.

    Args:
        factor: the factor applied (a record's ``"factors"`` entry).

    Returns:
        The text.

    Example:

    ```python
    >>> format_factor(1024.0), format_factor(2.0**-10), format_factor(1000.0)
    ('1024', '1/1024', '1000')
    ```
    """
    f = float(factor)
    if 0 < f < 1:
        inv = 1 / f
        if abs(inv - round(inv)) < 1e-9 * inv:
            return f"1/{round(inv)}"
    if math.isfinite(f) and f == round(f):
        return str(int(round(f)))
    return f"{f:.4g}"


def _is_power_of_two(f: float) -> bool:
    m, _ = math.frexp(float(f))
    return f > 0 and m == 0.5


def _records(info: SourceInfo, folder: Path) -> dict[str, dict[str, Any]]:
    return {name: rec for name, _, _ in _components(info, folder)
            if (rec := _record_of(folder / name if name else folder)) is not None}


def _layer_key(layer: Any) -> tuple[str, int, str]:
    """Numeric order of layer labels: ``2`` before ``10``; ``"unet:2"`` before ``"unet:10"``."""
    text = str(layer)
    component, _, index = text.rpartition(":")
    return (component, int(index), "") if index.isdigit() else (component, -1, text)


def _merge_records(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One summary of the records of all protected components (for the card's "What was done").

    ``factors``: the sorted distinct factors the records say were applied (records without ``"factors"``: those of
    their pairs), ``None`` when no record says."""
    if not records:
        return {}
    first = next(iter(records.values()))
    conf = first.get("config", {})
    prefix = any(records)  # pipeline components (named sub-folders): prefix layers with the component
    pairs, layers, sites, modes, hot, num, factors = [], set(), set(), set(), set(), 0, set()
    for name, rec in records.items():
        sites.update(rec.get("sites", []))
        modes.update(rec.get("modes", []))
        layers.update(f"{name}:{x}" if prefix and name else x for x in rec.get("layers", []))
        hot.update(rec.get("hot_modules", []))
        num += int(rec.get("num_pairs", 0))
        recorded = rec.get("factors")
        all_pairs = list(rec.get("pairs", []) or []) + list((rec.get("pipeline") or {}).get("pairs", []) or [])
        if recorded is None:
            recorded = [p.get("factor") for p in all_pairs]
        factors.update(f for x in recorded or [] if (f := as_number(x)) is not None)
        for p in rec.get("pairs", []) or []:
            pairs.append({k: p.get(k) for k in ("layer", "site", "group", "mode", "factor", "k", "hot")}
                         | ({"layer": f"{name}:{p.get('layer')}"} if prefix and name else {}))
    return {
        "sites": sorted(sites), "modes": sorted(modes), "layers": sorted(layers, key=_layer_key), "num_pairs": num,
        "num_hot": len(hot), "alpha": conf.get("alpha"), "top_k": conf.get("top_k"), "mode": conf.get("mode"),
        "layers_selection": conf.get("layers"), "precision": conf.get("precision"), "pairs": pairs,
        "factors": sorted(factors) or None,
        "precision_used": ", ".join(sorted({str(p.get("used")) for r in records.values() if (p := r.get("precision"))}))
        or None,
        "components": sorted(name for name in records if name),
        "pipeline_fold": next((rec["pipeline"]["note"] for rec in records.values() if rec.get("pipeline")), None),
    }


def protection_summary(info: SourceInfo, folder: Path) -> dict[str, Any]:
    """What the records of a protected folder say was done: modes, factors, sites, pairs (merged over components).

    Args:
        info: the source (tells a pipeline's components apart).
        folder: the protected folder.

    Returns:
        The merged summary (``{}`` when no component carries a record, e.g. record level ``none``).

    Example:

    ```python
    >>> protection_summary(info, Path("./tiny-llama-specdef"))["factors"]
    [1024.0]
    ```
    """
    return _merge_records(_records(info, folder))


def _pair_row(pair: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the per-pair table: every value escaped text, ``hot`` a list of escaped module names."""
    row = {k: "" if v is None else escape_markdown(v) for k, v in pair.items() if k not in ("hot", "factor")}
    row["hot"] = [escape_markdown(m) for m in pair.get("hot") or []]
    factor = pair.get("factor")
    row["factor"] = format_factor(factor) if as_number(factor) is not None else escape_markdown(factor)
    return row


def _gguf_format(name: Any) -> bool | None:
    """Whether ``name`` is a GGUF format (``False``: an int format; ``None``: unknown)."""
    from hf_specdef.quantization import FORMATS

    fmt = FORMATS.get(name) if isinstance(name, str) else None
    return None if fmt is None else fmt.gguf_type is not None


def _quantization_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for q in rows:
        row = dict(markdown_values(dict(q)))
        row["kept_float_count"] = len(q.get("kept_float") or [])
        row["status"] = ("error" if q.get("error") else "ok" if q.get("ok") else "broken")
        out.append(row)
    return out


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
    quantization_note: str | None = None,
    safety: Mapping[str, Any] | None = None,
    repo_id_given: bool = True,
) -> Any:
    """Render the model card (a :class:`huggingface_hub.ModelCard`) of a protected, verified folder.

    Args:
        info: the source (:func:`hf_specdef.publishing.source.describe_source`).
        repo_id: the destination repository (with ``repo_id_given=False``, the repository name a dry run chose).
        cfg: the protection requested (the card reports what the folder's records say was done).
        checks: the verification figures of each component.
        folder: the protected folder (its records).
        pipeline_check: the end-to-end figures of a pipeline.
        measure: the resistance measured on this release (red team or quick measurement), if any.
        template: a custom Jinja template (default :func:`template_path`). It receives the same variables, already
            escaped; ``card_data``'s fields are passed escaped too.
        release_dtypes: the statement of the dtypes the release is exact in
            (:func:`hf_specdef.analysis.release_dtypes.card_paragraph`), ending the card's first paragraph.
        quantization: the rows of :func:`hf_specdef.publishing.checks.quantization_checks` (measured on this release).
        quantization_note: why quantization was not measured, when ``quantization`` is empty.
        safety: the release's precision summary (:func:`hf_specdef.analysis.release_dtypes.folder_safety`): the dtype of the
            usage snippet.
        repo_id_given: ``False`` when no ``repo_id`` was given (a dry run): the snippet then says ``<owner>/name``.

    Returns:
        The :class:`huggingface_hub.ModelCard`.

    Example:

    ```python
    >>> card = render_card(info, "me/tiny-llama-specdef", cfg, checks, Path("./out"))
    >>> card.save("./out/README.md")
    ```
    """
    from huggingface_hub import ModelCard, ModelCardData

    summary = _merge_records(_records(info, folder))
    modes = list(summary.get("modes", []))
    # a release that only rescales weights: axis mode only, or (record level none) exact in bfloat16, which only a
    # rescaling is
    rescaling = (bool(modes) and set(modes) == {"axis"}) or (
        not modes and "bfloat16" in ((safety or {}).get("exact_dtypes") or []))
    resistance = resistance_summary(measure, rescaling)
    data = ModelCardData(
        base_model=info.base_model if info.base_model_is_hub_id else None, license=info.license,
        license_name=info.license_name, license_link=info.license_link, library_name=info.library_name,
        pipeline_tag=info.pipeline_tag, language=info.language, tags=card_tags(modes, resistance, info.library_name),
    )
    shown = summary.get("pairs", [])[:MAX_CARD_PAIRS]
    all_checks = checks + ([pipeline_check] if pipeline_check else [])
    max_dev = max(c.max_relative_deviation for c in all_checks)
    md = escape_markdown
    cov = ", ".join(f"{c.coverage:.1%}" + (f" ({md(c.component)})" if c.component else "") for c in checks)
    hot = ", ".join(f"{c.hot_coverage:.1%}" + (f" ({md(c.component)})" if c.component else "") for c in checks)
    base_url = f"https://huggingface.co/{info.base_model}" if info.base_model_is_hub_id else None
    factors = summary.get("factors") or []
    full_id = repo_id if repo_id_given else f"<owner>/{repo_id}"
    alpha = summary.get("alpha", cfg.alpha)
    rows = _quantization_rows(quantization or [])
    kwargs = {k: markdown_values(v) for k, v in data.to_dict().items()}  # from_template also passes these: escaped
    kwargs |= dict(
        title=md(repo_id), repo_id=md(full_id), base_model=md(info.base_model), base_model_url=base_url,
        base_model_is_hub_id=info.base_model_is_hub_id, hf_specdef_version=md(__version__),
        date=datetime.date.today().isoformat(), record_level=cfg.record, is_pipeline=info.is_pipeline,
        library_name=info.library_name,
        sites=markdown_values(list(summary.get("sites", cfg.sites))),
        alpha=format_factor(alpha) if as_number(alpha) is not None else md(alpha),
        factors=[format_factor(f) for f in factors], factors_str=", ".join(format_factor(f) for f in factors),
        inverted=any(f < 1 for f in factors), powers_of_two=bool(factors) and all(_is_power_of_two(f) for f in factors),
        top_k=md(summary.get("top_k", cfg.top_k)), layers=markdown_values([str(x) for x in summary.get("layers", [])]),
        layers_selection=md(summary.get("layers_selection", cfg.layers)), mode=md(summary.get("mode", cfg.mode)),
        modes=modes, rescaling=rescaling, spectral="spectral" in modes,
        num_pairs=summary.get("num_pairs", 0), num_hot=summary.get("num_hot", 0),
        precision=md(summary.get("precision", cfg.precision)), components=markdown_values(summary.get("components", [])),
        precision_used=md(summary.get("precision_used") or "(no record)"), release_dtypes=release_dtypes,
        pipeline_fold=md(summary.get("pipeline_fold")) or None,
        pairs=[_pair_row(p) for p in shown] if cfg.record == "full" else [],
        pairs_truncated=len(summary.get("pairs", [])) > len(shown),
        checks=[markdown_values(c.to_dict()) | {"deviation_str": _fmt(c.max_relative_deviation), "tolerance": f"{c.tolerance:g}"}
                for c in all_checks],
        inspections=[{"component": md(c.component), "deformed": c.deformed, "matrices": c.matrices,
                      "coverage": f"{c.coverage:.1%}", "hot_coverage": f"{c.hot_coverage:.1%}"} for c in checks],
        max_deviation_str=_fmt(max_dev), coverage_str=cov, hot_coverage_str=hot, measure=markdown_values(measure),
        resistance=resistance, tolerance=f"{cfg.tolerance:g}",
        reference=resistance["kind"] != "redteam" and bool(modes),
        reference_same_model=REFERENCE_MODEL.lower().split("-instruct")[0] in info.base_model.lower(),
        load_snippet=load_snippet(info, full_id, folder, release_dtype(safety, folder)),
        quantization=rows, quantization_safe=list(cfg.quantization_safe), quantization_note=md(quantization_note),
        quantization_gguf=any(_gguf_format(r.get("format")) for r in rows),
        quantization_int=any(_gguf_format(r.get("format")) is False for r in rows),
        quantization_broken=[r["format"] for r in rows if r["status"] == "broken"],
        quantization_kept=[r["format"] for r in rows if r["status"] == "ok"],
    )
    return ModelCard.from_template(data, template_path=str(template or template_path()), **kwargs)
