"""Publish a SpecDef-protected model to the Hugging Face Hub with a generated model card.

``publish(model, repo_id, cfg)`` runs the publisher's whole path:

1. **protect** the checkpoint folder shard by shard (:func:`hf_specdef.protect_checkpoint`), into a temporary
   directory next to the destination (:mod:`.publishing.protected_folder`);
2. **verify**: load the original and the protected checkpoint with *stock* transformers / diffusers and compare
   them on probe inputs (max relative deviation, storage dtype), then check with :func:`hf_specdef.inspect_model`
   that every matrix the protection claims to have deformed is visibly deformed (a publisher who forgot
   to protect must not ship an "unprotected protected" model). Nothing is published if either check fails
   (:mod:`.publishing.checks`);
   The verified deviation is written into each protected component's record, and the release is measured
   quantized in the formats people convert to (:data:`~hf_specdef.publishing.checks.DEFAULT_QUANTIZE`, transformers
   models; ``quantize=()`` turns it off): a format that breaks the release goes on the card as such; only the formats
   of ``cfg.quantization_safe`` are promises that refuse the publication when broken;
3. **render the model card** (``README.md``) from the Jinja template ``model_cards/specdef_model_card.md``
   through :class:`huggingface_hub.ModelCard` / :class:`~huggingface_hub.ModelCardData` (:mod:`.publishing.card`):
   it states what was done (the mode and the factors the records say were applied) and what was measured on this
   release, and nothing measured elsewhere unless labelled so;
4. **push** with :class:`huggingface_hub.HfApi` (``create_repo`` + ``upload_folder``), or with ``dry_run=True``
   only write the folder (:mod:`.publishing.hub`).

The Hub token comes from ``token=``, ``HF_TOKEN`` or the ``huggingface_hub`` login; it is never printed,
logged or written, and is scrubbed from any error message.

This module runs those steps in order and reports what it did (:class:`PublishResult`); the steps live in
:mod:`hf_specdef.publishing` (the source and its metadata: :mod:`.publishing.source`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_specdef import __version__
from hf_specdef.analysis import release_dtypes
from hf_specdef.config import SpecDefConfig
from hf_specdef.errors import require_extra
from hf_specdef.publishing.card import format_factor, protection_summary, render_card, template_path  # noqa: F401 (re-exported)
from hf_specdef.publishing.checks import (
    DEFAULT_QUANTIZE,
    ComponentCheck,
    _fmt,
    _refuse_if_bad,
    _refuse_if_bad_quantized,
    quantization_checks,
    record_deviations,
    verify_folder,
    verify_pipeline,
)
from hf_specdef.publishing.errors import PublishError
from hf_specdef.publishing.hub import _hub_offline, push_folder, resolve_token
from hf_specdef.publishing.protected_folder import protect_folder
from hf_specdef.publishing.resistance import MeasureConfig, ResistanceError, measure_resistance, redteam_measure  # noqa: F401 (re-exported)
from hf_specdef.publishing.source import SourceInfo, check_hub_id, default_repo_name, describe_source, resolve_source
from hf_specdef.storage.staging import StagingError, commit_staging, make_staging, remove_tree

logger = logging.getLogger("hf_specdef")

_CAUSAL_LM = ("ForCausalLM", "LMHeadModel")


@dataclass
class PublishResult:
    """What :func:`publish` did: where the folder is, what protection was applied, the figures it verified and
    measured, whether it pushed.

    ``config`` is the protection *requested*; ``modes``, ``factors`` and ``sites`` are what the records say was *applied*
    (``alpha=1000`` on a bfloat16 checkpoint: axis mode, factor 1024). Both are empty at record level ``none``.
    ``quantization`` holds the rows measured quantized (:func:`~hf_specdef.publishing.checks.quantization_checks`).

    Attributes:
        repo_id (`str`): the destination Hub repository (``owner/name``; derived from the source for a dry run
            without one).
        folder (`str` or `None`): the published folder kept on disk (``None`` when a push used a temporary one).
        dry_run (`bool`): whether only the folder was written.
        pushed (`bool`): whether the folder was pushed to the Hub.
        base_model (`str`): the source, as named on the card.
        library_name (`str`): ``"transformers"`` or ``"diffusers"``.
        config (`dict`): the protection requested (``SpecDefConfig.to_dict()``).
        checks (`list[ComponentCheck]`): per protected component, the verified deviation, dtype and deformation
            coverage.
        pipeline_check (`ComponentCheck` or `None`): the check of a pipeline's composed function.
        measure (`dict` or `None`): the resistance measured (quick measurement or red-team results), if any.
        downcast (`dict[str, float]`): per 16-bit dtype, the deviation of the release loaded in it.
        commit_message (`str` or `None`): the upload's commit message.
        url (`str` or `None`): the commit URL when pushed.
        notes (`list[str]`): what the protection skipped or noted.
        modes (`list[str]`): the modes applied (from the records).
        factors (`list[float]`): the factors applied (from the records).
        sites (`list[str]`): the site types deformed (from the records).
        quantization (`list[dict]`): per format measured quantized: its deviation and whether the release stays
            intact.
        max_relative_deviation (`float`): the largest verified deviation over the checks.

    Example:

    ```python
    from hf_specdef import publish

    result = publish("./my-model", None, dry_run=True)
    print(result.protection_text(), result.max_relative_deviation)
    print(result.to_json())
    ```
    """

    repo_id: str
    folder: str | None
    dry_run: bool
    pushed: bool
    base_model: str
    library_name: str
    config: dict[str, Any]
    checks: list[ComponentCheck]
    pipeline_check: ComponentCheck | None = None
    measure: dict[str, Any] | None = None
    downcast: dict[str, float] = field(default_factory=dict)  # dtype -> deviation of the release loaded in it
    commit_message: str | None = None
    url: str | None = None
    notes: list[str] = field(default_factory=list)  # what the protection skipped or noted
    modes: list[str] = field(default_factory=list)  # the modes used (from the records)
    factors: list[float] = field(default_factory=list)  # the factors applied (from the records)
    sites: list[str] = field(default_factory=list)  # the site types deformed (from the records)
    quantization: list[dict[str, Any]] = field(default_factory=list)  # measured quantized, per format

    @property
    def max_relative_deviation(self) -> float:
        checks = self.checks + ([self.pipeline_check] if self.pipeline_check else [])
        return max(c.max_relative_deviation for c in checks)

    def protection_text(self) -> str:
        """One line on the protection applied: modes and factors used, beside the alpha requested."""
        alpha = self.config.get("alpha")
        requested = f"alpha {format_factor(alpha)} requested" if isinstance(alpha, (int, float)) else "alpha requested"
        if not self.modes and not self.factors:
            return f"not disclosed (record level {self.config.get('record')!r}; {requested})"
        factors = ", ".join(format_factor(f) for f in self.factors) or "not recorded"
        return (f"{', '.join(self.modes) or 'unknown'} mode, factors {factors} ({requested}), sites "
                f"{', '.join(self.sites) or 'not recorded'}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_relative_deviation"] = self.max_relative_deviation
        d["protection"] = self.protection_text()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        where = f"pushed to https://huggingface.co/{self.repo_id}" if self.pushed else "dry run: nothing pushed"
        lines = [f"hf-specdef publish {self.base_model} -> {self.repo_id} ({where})"]
        if self.folder:
            lines.append(f"folder: {self.folder}")
        lines.append(f"  protection: {self.protection_text()}")
        for c in self.checks + ([self.pipeline_check] if self.pipeline_check else []):
            lines.append(
                f"  {c.component or 'model'} ({c.class_name}, {c.dtype}): max relative deviation "
                f"{_fmt(c.max_relative_deviation)} (tolerance {c.tolerance:g})"
                + (f"; deformed {c.deformed}/{c.matrices} matrices, coverage {c.coverage:.1%}, hot {c.hot_coverage:.1%}"
                   if c.matrices else "")
            )
        if self.downcast:
            lines.append("  loaded in a 16-bit dtype (against the original in the same dtype): " + ", ".join(
                f"{d} {_fmt(x)}" for d, x in self.downcast.items()))
        if self.quantization:
            lines.append("  quantized (against the original quantized the same way): " + ", ".join(
                f"{q['format']} " + (f"not measured ({q['error']})" if q.get("error") else
                                     f"{_fmt(q['deviation'])} {'intact' if q['ok'] else 'BREAKS IT'}")
                + (" (promised)" if q.get("required") else "") for q in self.quantization))
        else:
            lines.append("  quantized: not measured")
        lines += [f"  note: {n}" for n in self.notes]
        if self.measure:
            lines.append(f"measured resistance: {self.measure.get('summary', self.measure)}")
        else:
            lines.append("measured resistance: none (no red team was run on this release)")
        return "\n".join(lines)


def _default_commit_message(info: SourceInfo, cfg: SpecDefConfig, deviation: float,
                            summary: dict[str, Any] | None = None) -> str:
    """The upload's commit message: the source, the mode and factors applied (from the records), the sites and the
    verified deviation."""
    summary = summary or {}
    if cfg.record == "none" or not summary:
        what = "SpecDef protection"
    else:
        factors = ", ".join(format_factor(f) for f in summary.get("factors") or []) or "not recorded"
        what = (f"SpecDef ({', '.join(summary.get('modes') or [])} mode, factors {factors} for alpha "
                f"{format_factor(cfg.alpha)} requested, sites={','.join(summary.get('sites') or cfg.sites)})")
    return (f"Upload {what}-protected {info.base_model} with hf-specdef {__version__} "
            f"(verified: max relative deviation {_fmt(deviation)})")


def _quantize_formats(quantize: Sequence[str] | None, info: SourceInfo, cfg: SpecDefConfig
                      ) -> tuple[tuple[str, ...], str | None]:
    """The formats to measure (promised ones first) and, when none is, why (for the card)."""
    asked = tuple(DEFAULT_QUANTIZE if quantize is None else quantize)
    if info.kind != "transformers":
        if cfg.quantization_safe or quantize:
            logger.warning("hf-specdef publish: quantized checks cover transformers models; skipped for %s", info.kind)
        return (), "publish measures quantization for transformers models only"
    formats = tuple(dict.fromkeys((*cfg.quantization_safe, *asked)))
    return formats, None if formats else "the publisher turned the measurement off"


@contextmanager
def _workdir(near: Path | None) -> Iterator[Path]:
    """A staging folder next to ``near`` (the output folder; leftovers of killed runs for it are cleaned up first,
    :mod:`hf_specdef.storage.staging`), or in the system's temporary folder; removed on the way out."""
    work = make_staging(near) if near is not None else Path(tempfile.mkdtemp(prefix="specdef-publish-"))
    try:
        yield work
    finally:
        remove_tree(work)


def _move_into_place(src: Path, dst: Path, overwrite: bool) -> None:
    if os.path.lexists(dst) and not overwrite:
        raise PublishError(f"output_dir {dst} already exists; choose another folder or pass overwrite=True (--overwrite)")
    try:
        commit_staging(src, dst, overwrite)
    except StagingError as e:
        raise PublishError(str(e)) from None


def publish(
    model: str | os.PathLike,
    repo_id: str | None,
    cfg: SpecDefConfig | None = None,
    *,
    private: bool = False,
    dry_run: bool = False,
    output_dir: str | os.PathLike | None = None,
    measure: bool | MeasureConfig = False,
    token: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    revision: str | None = None,
    template: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    quantize: Sequence[str] | None = None,
    redteam: str | os.PathLike | dict[str, Any] | None = None,
) -> PublishResult:
    """Protect ``model``, verify it, write a model card and push it to ``repo_id`` (or only write it: ``dry_run``).

    Args:
        model: a local checkpoint folder (transformers model, diffusers pipeline or diffusers model) or a Hub id.
        repo_id: destination Hub repository (``owner/name``), validated with
            :func:`huggingface_hub.utils.validate_repo_id`. Optional with ``dry_run``: then the folder is named
            ``<name>-specdef`` and the card's usage snippet says ``<owner>/<name>-specdef``.
        cfg: the protection; default :class:`SpecDefConfig()`.
        private: create the repository as private.
        dry_run: write the folder (``output_dir``) and stop: no token, no network.
        output_dir: where the published folder is kept. Without it, a dry run writes ``./<repo name>`` and a push
            uses a temporary folder that is removed afterwards. Must not exist unless ``overwrite``.
        measure: also run a quick resistance measurement (evaluation harness) and put it in the card; a
            :class:`MeasureConfig` sets its budget.
        redteam: the ``results.json`` of ``hf-specdef redteam`` on this model and configuration (path or dict): its
            worst case and per-attack slowdowns go into the card instead of the quick measurement (checked first:
            results of another protection are refused).
        token: Hub token; default ``HF_TOKEN`` or the ``huggingface_hub`` login. Never printed, logged or written.
        commit_message: default names the source, the mode and factors applied, the sites and the verified deviation.
        base_model: the source's Hub id (``owner/name``) for the card metadata when ``model`` is a local folder;
            validated like ``repo_id``. Without it (and without a Hub id in the source's config), the card names the
            local folder, escaped, and carries no ``base_model`` metadata.
        overwrite: replace an existing ``output_dir``.
        force: protect even if the source already carries a protection record.
        revision: the revision of a Hub source to download (default: the main branch).
        template: a custom Jinja card template (default: the packaged ``specdef_model_card.md``).
        device: where the protection's deformations are computed (default ``None``: the CPU).
        progress: show progress bars (default True).
        quantize: quantization formats to measure on the release for the card (transformers models): ``None``
            (default) measures :data:`~hf_specdef.publishing.checks.DEFAULT_QUANTIZE` (``q8_0``, ``q4_0``: what
            GGUF users convert to), a sequence measures those, ``()`` none. A measured format that breaks the release
            does not refuse the publication: the card says "breaks it" with its figure. The formats of
            ``cfg.quantization_safe`` are always measured and must keep the model intact (they are promises).

    Returns:
        The :class:`PublishResult`: the folder, the protection applied (modes, factors), the verified and measured
        figures, the commit message and URL when pushed.

    Raises:
        ValueError: an invalid ``repo_id`` / ``base_model`` (not a Hub id), an unknown quantization format, no
            ``repo_id`` for a push, or an ``output_dir`` overlapping the source.
        MissingExtraError: Jinja2 is not installed (``pip install 'hf-specdef[publish]'``).
        AlreadyProtectedError: the source carries a protection record and ``force`` is False.
        PublishError: verification failed, the claimed sites are not deformed, a promised quantization breaks, no
            token, or the push failed. Nothing is pushed and no partial ``output_dir`` is left.

    Example:

    ```python
    from hf_specdef import SpecDefConfig, publish

    result = publish("./SmolLM2-135M-Instruct", None, SpecDefConfig(), dry_run=True,
                     base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    print(result.modes, result.factors)  # bfloat16 checkpoint: ['axis'] [1024.0] (alpha 1000 rounded to 1024)
    print(result.folder)  # README.md (the card), config.json (the record), model.safetensors
    ```
    """
    require_extra("jinja2", "publish", "publish (the model card template)")
    cfg = cfg or SpecDefConfig()
    if repo_id:
        check_hub_id(repo_id, "repo_id", "Pass the destination as owner/name (e.g. me/my-model-specdef).")
    if base_model is not None:
        check_hub_id(base_model, "base_model", "Pass the source's Hub id (owner/name), or leave it out for a local "
                                               "folder.")
    if isinstance(quantize, str):  # "q8_0,q4_0"
        quantize = tuple(x.strip() for x in quantize.split(",") if x.strip())
    if quantize is not None:
        from hf_specdef.quantization import get_format

        for f in quantize:
            get_format(f)  # an unknown format fails before any work
    if not dry_run:
        if not repo_id:
            raise ValueError("repo_id is required to push (owner/name); use dry_run=True to only write the folder")
        if _hub_offline():
            raise PublishError("HF_HUB_OFFLINE is set, so nothing can be pushed; use dry_run=True (--dry-run) to "
                               "write the folder only, or unset HF_HUB_OFFLINE")
        token = resolve_token(token)
        if not token:
            raise PublishError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (the token is "
                               "never printed or written)")
    src, hub_id = resolve_source(model, token=token if not dry_run else None, revision=revision)
    info = describe_source(src, hub_id, base_model)
    repo_id_given = bool(repo_id)
    repo_id = repo_id or default_repo_name(info.base_model)
    out = Path(output_dir).expanduser().resolve() if output_dir else None
    if out is None and dry_run:
        out = Path.cwd() / repo_id.rsplit("/", 1)[-1]
    if out is not None and out.exists() and not overwrite:
        raise PublishError(f"output_dir {out} already exists; choose another folder or pass overwrite=True (--overwrite)")
    if out is not None and (out == src or src in out.parents or out in src.parents):
        raise ValueError(f"output_dir {out} overlaps the source {src}; the source is never modified, choose another folder")
    red_team = redteam_measure(redteam, cfg) if redteam is not None else None  # checked before any work
    if measure and not (info.kind == "transformers" and info.class_name.endswith(_CAUSAL_LM)):
        raise PublishError(f"measure=True supports causal language models (...ForCausalLM) in this build, not "
                           f"{info.class_name}; for diffusion models run scripts/convergence_bench.py instead")

    with _workdir(out) as work:
        staged = work / "model"
        report = protect_folder(src, staged, cfg, force=force, progress=progress, device=device)
        pipeline_check = verify_pipeline(src, staged, info, cfg) if info.is_pipeline else None
        checks = verify_folder(src, staged, info, cfg, report, composed=pipeline_check)
        _refuse_if_bad(checks + ([pipeline_check] if pipeline_check else []))
        record_deviations(staged, checks)  # the records carry the deviation verified here (streaming may leave null)
        downcast = release_dtypes.measure_downcast(src, staged, cfg.tolerance)  # what a downcasting user sees
        release_dtypes.annotate_records(staged, downcast)
        safety = release_dtypes.folder_safety(staged) or getattr(report, "precision", None)
        formats, not_measured = _quantize_formats(quantize, info, cfg)
        quantized = quantization_checks(src, staged, info, cfg, formats)
        _refuse_if_bad_quantized(quantized)  # only the promised formats refuse; the others go on the card
        measured = red_team
        if measure and measured is None:
            mc = measure if isinstance(measure, MeasureConfig) else None
            measured = measure_resistance(src, staged, info, cfg, mc, progress=progress)
        card = render_card(info, repo_id, cfg, checks, staged, pipeline_check=pipeline_check, measure=measured,
                           template=template, release_dtypes=release_dtypes.card_paragraph(safety, downcast),
                           quantization=quantized, quantization_note=not_measured, safety=safety,
                           repo_id_given=repo_id_given)
        card.save(staged / "README.md")
        summary = protection_summary(info, staged)
        result = PublishResult(repo_id, str(out) if out else None, dry_run, False, info.base_model, info.library_name,
                               cfg.to_dict(), checks, pipeline_check, measured, downcast,
                               modes=list(summary.get("modes") or []), factors=list(summary.get("factors") or []),
                               sites=list(summary.get("sites") or []),
                               quantization=quantized)
        result.notes = [f"skipped {x}" for x in getattr(report, "skipped", [])] + list(getattr(report, "notes", []))
        result.commit_message = commit_message or _default_commit_message(info, cfg, result.max_relative_deviation,
                                                                          summary)
        folder = staged
        if out is not None:
            _move_into_place(staged, out, overwrite)
            folder = out
        if not dry_run:
            logger.info("hf-specdef publish: pushing %s to %s", folder, repo_id)
            result.url = push_folder(folder, repo_id, private=private, token=token, commit_message=result.commit_message)
            result.pushed = True
    return result
