"""Publish a SpecDef-protected model to the Hugging Face Hub with a generated model card (SPEC §1, §4, §7).

``publish(model, repo_id, cfg)`` runs the publisher's whole path:

1. **protect** the checkpoint folder shard by shard (:func:`hf_specdef.protect_checkpoint`), into a temporary
   directory next to the destination (:mod:`.publishing.protect`);
2. **verify**: load the original and the protected checkpoint with *stock* transformers / diffusers and compare
   them on probe inputs (max relative deviation, storage dtype), then check with :func:`hf_specdef.inspect_model`
   that every matrix the protection claims to have deformed is visibly deformed (SPEC §7: a publisher who forgot
   to protect must not ship an "unprotected protected" model). Nothing is published if either check fails
   (:mod:`.publishing.checks`);
3. **render the model card** (``README.md``) from the Jinja template ``model_cards/specdef_model_card.md``
   through :class:`huggingface_hub.ModelCard` / :class:`~huggingface_hub.ModelCardData` (:mod:`.publishing.card`);
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
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__, release_dtypes
from .config import SpecDefConfig
from .publishing.card import render_card, template_path  # noqa: F401 (template_path re-exported)
from .publishing.checks import (
    ComponentCheck,
    _fmt,
    _refuse_if_bad,
    _refuse_if_bad_quantized,
    quantization_checks,
    verify_folder,
    verify_pipeline,
)
from .publishing.errors import PublishError
from .publishing.hub import _hub_offline, push_folder, resolve_token
from .publishing.protect import protect_folder
from .publishing.source import SourceInfo, describe_source, resolve_source
from .resistance import MeasureConfig, ResistanceError, measure_resistance, redteam_measure  # noqa: F401 (re-exported)

logger = logging.getLogger("hf_specdef")

_CAUSAL_LM = ("ForCausalLM", "LMHeadModel")


@dataclass
class PublishResult:
    """What :func:`publish` did: where the folder is, the figures it verified, whether it pushed."""

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

    @property
    def max_relative_deviation(self) -> float:
        checks = self.checks + ([self.pipeline_check] if self.pipeline_check else [])
        return max(c.max_relative_deviation for c in checks)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_relative_deviation"] = self.max_relative_deviation
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        where = f"pushed to https://huggingface.co/{self.repo_id}" if self.pushed else "dry run: nothing pushed"
        lines = [f"hf-specdef publish {self.base_model} -> {self.repo_id} ({where})"]
        if self.folder:
            lines.append(f"folder: {self.folder}")
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
        lines += [f"  note: {n}" for n in self.notes]
        if self.measure:
            lines.append(f"measured resistance: {self.measure.get('summary', self.measure)}")
        return "\n".join(lines)


def _default_commit_message(info: SourceInfo, cfg: SpecDefConfig, deviation: float) -> str:
    what = "SpecDef protection" if cfg.record == "none" else f"SpecDef (alpha={cfg.alpha:g}, sites={','.join(cfg.sites)})"
    return (f"Upload {what}-protected {info.base_model} with hf-specdef {__version__} "
            f"(verified: max relative deviation {_fmt(deviation)})")



@contextmanager
def _workdir(near: Path | None) -> Iterator[Path]:
    parent = near.parent if near is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".specdef-publish-", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _move_into_place(src: Path, dst: Path, work: Path, overwrite: bool) -> None:
    if dst.exists():
        if not overwrite:
            raise PublishError(f"output_dir {dst} already exists; choose another folder or pass overwrite=True (--overwrite)")
        os.replace(dst, work / "previous")
    os.replace(src, dst)


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
    quantize: tuple[str, ...] | list[str] = (),
    redteam: str | os.PathLike | dict[str, Any] | None = None,
) -> PublishResult:
    """Protect ``model``, verify it, write a model card and push it to ``repo_id`` (or only write it: ``dry_run``).

    Args:
        model: a local checkpoint folder (transformers model, diffusers pipeline or diffusers model) or a Hub id.
        repo_id: destination Hub repository (``owner/name``). Optional with ``dry_run`` (then ``<folder>-specdef``).
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
        commit_message: default names the source, alpha, sites and the verified deviation.
        base_model: the source's Hub id for the card metadata when ``model`` is a local folder.
        overwrite: replace an existing ``output_dir``.
        force: protect even if the source already carries a protection record.
        template: a custom Jinja card template (default: the packaged ``specdef_model_card.md``).
        quantize: quantization formats to measure for the card besides ``cfg.quantization_safe`` (which are always
            measured and must keep the model intact); transformers models only.

    Raises:
        PublishError: verification failed, the claimed sites are not deformed, no token, or the push failed.
            Nothing is pushed and no partial ``output_dir`` is left.
    """
    cfg = cfg or SpecDefConfig()
    if repo_id:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise ValueError(f"repo_id={repo_id!r} is not a valid Hub repository id (owner/name): {e}") from None
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
    repo_id = repo_id or f"{info.base_model.rsplit('/', 1)[-1]}-specdef"
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
        downcast = release_dtypes.measure_downcast(src, staged, cfg.tolerance)  # what a downcasting user sees
        release_dtypes.annotate_records(staged, downcast)
        safety = release_dtypes.folder_safety(staged) or getattr(report, "precision", None)
        quantized = quantization_checks(src, staged, info, cfg, tuple(dict.fromkeys((*cfg.quantization_safe,
                                                                                       *quantize))))
        _refuse_if_bad_quantized(quantized)
        measured = red_team
        if measure and measured is None:
            mc = measure if isinstance(measure, MeasureConfig) else None
            measured = measure_resistance(src, staged, info, cfg, mc, progress=progress)
        card = render_card(info, repo_id, cfg, checks, staged, pipeline_check=pipeline_check, measure=measured,
                           template=template, release_dtypes=release_dtypes.card_paragraph(safety, downcast),
                           quantization=quantized)
        card.save(staged / "README.md")
        result = PublishResult(repo_id, str(out) if out else None, dry_run, False, info.base_model, info.library_name,
                               cfg.to_dict(), checks, pipeline_check, measured, downcast)
        result.notes = [f"skipped {x}" for x in getattr(report, "skipped", [])] + list(getattr(report, "notes", []))
        result.commit_message = commit_message or _default_commit_message(info, cfg, result.max_relative_deviation)
        folder = staged
        if out is not None:
            _move_into_place(staged, out, work, overwrite)
            folder = out
        if not dry_run:
            logger.info("hf-specdef publish: pushing %s to %s", folder, repo_id)
            result.url = push_folder(folder, repo_id, private=private, token=token, commit_message=result.commit_message)
            result.pushed = True
    return result
