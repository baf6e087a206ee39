"""Step 1 of publishing: write the protected copy of the source checkpoint folder.

Streaming, shard by shard (:func:`hf_specdef.protect_checkpoint`), or in memory for a quantization-safe protection
of a transformers model (:func:`hf_specdef.save_protected`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from hf_specdef.config import SpecDefConfig
from hf_specdef.publishing.components import _load
from hf_specdef.publishing.errors import PublishError
from hf_specdef.publishing.source import _read_json
from hf_specdef.storage.release_files import plan_copies

logger = logging.getLogger("hf_specdef")


def protect_folder(src: Path, dst: Path, cfg: SpecDefConfig, *, force: bool = False, progress: bool = True,
                   device: str | torch.device | None = None) -> Any:
    """Write the protected checkpoint of ``src`` into ``dst`` (which must not exist), streaming shard by shard
    (:func:`hf_specdef.protect_checkpoint`: bounded memory, verified before it is renamed into place).

    A quantization-safe protection (``cfg.quantization_safe``) of a transformers model is done in memory instead
    (the stock class, in the stored dtype, :func:`hf_specdef.save_protected`; streaming does not support it), and
    the other files of ``src`` (tokenizer, chat template, ...) are copied."""
    if cfg.quantization_safe:
        return _protect_in_memory(src, dst, cfg, force=force, progress=progress)
    from hf_specdef.protection.streaming import protect_checkpoint

    return protect_checkpoint(src, dst, cfg, device=device, force=force, progress=progress, verify=True)


def _protect_in_memory(src: Path, dst: Path, cfg: SpecDefConfig, *, force: bool, progress: bool) -> Any:
    from hf_specdef.protection.saving import save_protected

    config = _read_json(src / "config.json") if (src / "config.json").is_file() else {}
    archs = config.get("architectures") or []
    if "_class_name" in config or not archs:
        raise PublishError(f"quantization_safe={list(cfg.quantization_safe)} is supported for transformers models; "
                           f"{src} is not one (no 'architectures' in its config.json).")
    model = _load(src, "transformers", archs[0])
    report = save_protected(model, dst, cfg, force=force, progress=progress)
    # the loaded checkpoint (its shards, index and the files save_pretrained wrote again) is what was protected;
    # every other file goes through the release rule
    written = {f.resolve() for f in src.glob("*.safetensors")} | {f.resolve() for f in src.glob("*.safetensors.index.json")}
    written |= {f.resolve() for f in src.iterdir() if f.is_file() and (dst / f.name).exists()}
    plan = plan_copies(src, written)
    for f, rel in plan.copies:
        target = dst / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    notes = plan.notes()
    for n in notes:
        logger.warning("hf-specdef: %s", n)
    report.notes.extend(notes)
    return report
