"""The output folder: path checks, the temporary folder, copies of the other files, the index and config records,
and the final rename into place: nothing reaches the destination before everything is verified, and nothing but
the protected checkpoint and the files the release rule lets through (:mod:`hf_specdef.storage.release_files`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_specdef.config import CONFIG_KEY, DIFFUSERS_CONFIG_KEY, SpecDefConfig
from hf_specdef.deformation import precision
from hf_specdef.deformation.engine import PairResult
from hf_specdef.deformation.record import component_record, make_record, record_key
from hf_specdef.protection.pipeline_fold import TEXT_ENCODER, Fold, text_encoder_config
from hf_specdef.protection.streaming.plan import StreamPlan
from hf_specdef.storage.checkpoint import CONFIG_NAME, PIPELINE_INDEX, Checkpoint, CheckpointError
from hf_specdef.storage.release_files import plan_copies
from hf_specdef.storage.staging import StagingError, commit_staging, make_staging

logger = logging.getLogger("hf_specdef")

def check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse a missing source, a destination inside or around the source, a destination that is a link, and an
    existing destination (unless ``overwrite``)."""
    if src.is_file():
        raise CheckpointError(f"source {src} is a file; pass the checkpoint folder that holds it (config.json and "
                              "the .safetensors shards).")
    if not src.is_dir():
        raise CheckpointError(f"{src}: source checkpoint folder does not exist.")
    if dst == src or src in dst.parents:
        raise ValueError(f"destination {dst} is inside the source {src}; the source is never modified — choose another folder.")
    if dst in src.parents:
        raise ValueError(f"destination {dst} contains the source {src}; choose another folder.")
    if dst.is_symlink():
        raise FileExistsError(f"destination {dst} is a symbolic link (to {os.readlink(dst)}); pass the folder itself, "
                              "or remove the link.")
    if dst.exists():
        if not dst.is_dir():
            raise FileExistsError(f"destination {dst} exists and is not a folder.")
        if not overwrite:
            raise FileExistsError(f"destination {dst} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")


def make_tmp(dst: Path) -> Path:
    """A new temporary folder next to ``dst`` (on the same file system, so that :func:`commit` is a rename); the
    leftovers of earlier killed runs for ``dst`` are cleaned up first (:func:`hf_specdef.storage.staging.sweep_stale`)."""
    try:
        return make_staging(dst)
    except StagingError as e:
        raise CheckpointError(str(e)) from None


def copy_others(src: Path, tmp: Path, ckpts: Sequence[Checkpoint]) -> list[str]:
    """Copy the files of ``src`` that the release rule lets through (:mod:`hf_specdef.storage.release_files`), except the
    shards, indexes and configs of ``ckpts`` (written by the caller); returns one note per file kept out."""
    written: set[Path] = set()
    for ckpt in ckpts:
        written |= {p.resolve() for p in ckpt.files} | {(ckpt.root / CONFIG_NAME).resolve()}
        if ckpt.index_path is not None:
            written.add(ckpt.index_path.resolve())
    plan = plan_copies(src, written, _unprotected_components(src, ckpts))
    for p, rel in plan.copies:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(p, target)
        except OSError as e:
            raise CheckpointError(f"cannot copy {p} to {target}: {e}") from None
    notes = plan.notes()
    for n in notes:
        logger.warning("hf-specdef: %s", n)
    return notes


def _unprotected_components(src: Path, ckpts: Sequence[Checkpoint]) -> list[Path]:
    """In a diffusers pipeline folder, the component folders (``model_index.json``) that are copied unchanged."""
    if not (src / PIPELINE_INDEX).is_file():
        return []
    try:
        index = json.loads((src / PIPELINE_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    protected = {ckpt.root.resolve() for ckpt in ckpts}
    return [src / name for name in index if isinstance(name, str) and not name.startswith("_")
            and "/" not in name and (src / name).is_dir() and not (src / name).is_symlink()
            and (src / name).resolve() not in protected]


def write_index(ckpt: Checkpoint, out_root: Path, sp: StreamPlan) -> None:
    """The source's shard index (if it has one) with the total size of the written tensors."""
    if ckpt.index_path is None:
        return
    index = json.loads(json.dumps(ckpt.index))
    total = 0
    for n, info in ckpt.infos.items():
        total += info.nbytes // info.torch_dtype.itemsize * sp.out_dtype[n].itemsize if n in sp.out_dtype else info.nbytes
    index.setdefault("metadata", {})["total_size"] = total
    _write_json(out_root / ckpt.index_path.name, index)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e}") from None


def _write_config(ckpt: Checkpoint, out_root: Path, record: dict[str, Any] | None, float32: bool) -> None:
    """config.json with ``record``; with ``float32`` (an upcast, or a float32-only protection) its dtype is float32."""
    config = dict(ckpt.config)
    if not config and record is None:
        return
    config.pop(CONFIG_KEY, None)
    config.pop(DIFFUSERS_CONFIG_KEY, None)
    if record is not None:
        config[record_key(config)] = record
    if float32:
        # stock loaders use the config dtype ("auto"): keep the float32 tensors in float32 -- a float32-only
        # protection (spectral) is broken in bfloat16/float16, so the config never invites a downcast
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or (["dtype"] if "_class_name" not in config else [])
        for key in keys:
            config[key] = "float32"
    _write_json(out_root / CONFIG_NAME, config)


def write_records(ckpt: Checkpoint, out_root: Path, fold: Fold | None, te_root: Path | None, cfg: SpecDefConfig,
                   own: list[PairResult], deviation: float | None, upcast: bool) -> None:
    """config.json of the protected checkpoint (and, with the pipeline-level pair, of the text encoder) with records."""
    float32 = upcast or precision.summary(cfg, own)["float32_only"]
    if fold is None or te_root is None:
        _write_config(ckpt, out_root, make_record(cfg, own, deviation), float32)
        return
    pipeline = [fold.result]
    _write_config(ckpt, out_root, component_record(cfg, own, pipeline, f"{ckpt.component}.", deviation), float32)
    te_record = component_record(text_encoder_config(cfg), [], pipeline, f"{TEXT_ENCODER}.", deviation)
    _write_config(fold.text_encoder, te_root, te_record, False)


def commit(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``dst`` (:func:`hf_specdef.storage.staging.commit_staging`)."""
    try:
        commit_staging(tmp, dst, overwrite)
    except StagingError as e:
        raise CheckpointError(str(e)) from None
