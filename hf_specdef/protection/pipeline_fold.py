"""The pipeline-level ``norm`` site of a diffusers pipeline folder, decided from its files (see docs/design.md).

In a Stable-Diffusion-style pipeline the text encoder's final layer norm feeds every cross-attention
``to_k``/``to_v`` of the denoiser. Folding a scale into that norm (``M``) and its inverse into those
columns (``M^-1``) keeps the composed pipeline's function and is the one way to heat ``to_v``.
In-memory :func:`hf_specdef.protect` applies it to pipelines by default; this module gives streaming
protection the same pair, decided from the two checkpoints' headers and the final norm's weights:
:func:`plan_fold` returns the recorded steps of both components, and the pair result named as the
in-memory report names it (``"text_encoder.…"`` / ``"unet.…"``). The pair is decided before any
denoiser pair, as in memory, so the denoiser's own pairs see its steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import engine
from hf_specdef.deformation.engine import PairResult
from hf_specdef.deformation.record import get_record
from hf_specdef.deformation.tensor_ops import TensorOp
from hf_specdef.protection.in_memory import require_inflated
from hf_specdef.sites import Pair, TensorBlock
from hf_specdef.sites.diffusers import (
    OTHER_ENCODERS,
    TEXT_ENCODER,
    pipeline_norm_pair,
    pipeline_norm_refused,
    wants_pipeline_norm,
)
from hf_specdef.storage.checkpoint import PIPELINE_INDEX, Checkpoint, CheckpointError, load_json


class _Skip(Exception):
    """The site does not apply (the reason is the message)."""


def text_encoder_config(cfg: SpecDefConfig) -> SpecDefConfig:
    """The text encoder's record config: it has no cross-attention, so ``layers="cross-attention"`` means all layers."""
    return cfg.replace(layers="all") if cfg.layers == "cross-attention" else cfg


@dataclass
class Fold:
    """The decided pipeline-level pair: steps for the text encoder's and the denoiser's tensors (local names)."""

    text_encoder: Checkpoint
    result: PairResult  # names prefixed by component, as in the in-memory report
    te_ops: dict[str, list[TensorOp]]
    denoiser_ops: dict[str, list[TensorOp]]


def _component_present(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


def _local(b: TensorBlock, prefix: str) -> TensorBlock:
    return replace(b, name=b.name[len(prefix):])


def find_fold_pair(pipeline_root: Path, denoiser: Checkpoint, te_prefix: str) -> tuple[Pair | None, Checkpoint | None, str]:
    """The pair (producers named ``te_prefix`` + text-encoder names, consumers with the denoiser's own names), the
    opened text-encoder checkpoint (the caller closes it), or ``None`` and the reason."""
    index = load_json(pipeline_root / PIPELINE_INDEX)
    te_dir = pipeline_root / TEXT_ENCODER
    if not _component_present(index, TEXT_ENCODER) or not te_dir.is_dir():
        return None, None, "the pipeline has no text encoder"
    try:
        te = Checkpoint(te_dir)
    except CheckpointError as e:
        return None, None, f"the text encoder has no readable safetensors checkpoint ({e})"
    others = [n for n in OTHER_ENCODERS if _component_present(index, n)]
    pair, why = pipeline_norm_pair(te.class_name, te.shapes(), others, denoiser.class_name, denoiser.config,
                                   denoiser.shapes(), te_prefix, "")
    if pair is None:
        te.close()
        return None, None, why
    return pair, te, ""


def plan_fold(pipeline_root: Path, denoiser: Checkpoint, cfg: SpecDefConfig, *, pipeline_norm: bool | None,
              force: bool, device: torch.device) -> tuple[Fold | None, str]:
    """Decide the pipeline-level pair of a pipeline folder, or return ``None`` and why it does not apply.

    Raises ``ValueError`` when ``pipeline_norm=True`` and the site does not apply.
    """
    fold, why = _plan(pipeline_root, denoiser, cfg, pipeline_norm, force, device)
    if fold is None and pipeline_norm:
        raise pipeline_norm_refused(why)
    return fold, why


def _plan(root: Path, denoiser: Checkpoint, cfg: SpecDefConfig, pipeline_norm: bool | None, force: bool,
          device: torch.device) -> tuple[Fold | None, str]:
    wanted, why = wants_pipeline_norm(cfg, pipeline_norm)
    if not wanted:
        return None, why
    te_prefix, d_prefix = f"{TEXT_ENCODER}.", f"{denoiser.component}."
    pair, te, why = find_fold_pair(root, denoiser, te_prefix)
    if pair is None:
        return None, f"pipeline-level norm site: {why}"
    try:
        if get_record(te.config) and not force:
            raise _Skip("the text encoder already carries a protection record (force=True folds anyway)")
        dtypes = {f"{te_prefix}{n}": dt for n, dt in te.dtypes().items()} | denoiser.dtypes()
        plan = engine.plan_pairs([pair], {n: torch.empty(0, dtype=dtypes[n]) for n in pair.names()}, cfg)[0]
        stored = dtypes[pair.producers[0].name]
        if plan.dtype != stored or any(dtypes[b.name] != stored for b in pair.consumers):
            raise _Skip(f"it would need the text encoder stored in {plan.dtype} (streaming keeps each component's "
                        "dtype); use precision='axis'")

        def region(b: TensorBlock) -> torch.Tensor:  # producers: text encoder; consumers: denoiser (float16-exact pairs)
            ckpt, name = (te, b.name[len(te_prefix):]) if b.name.startswith(te_prefix) else (denoiser, b.name)
            return ckpt.view(name).narrow(b.axis, b.start, b.stop - b.start).to(device)

        block = engine.producer_block(pair, {}, region=region)
        if not bool(torch.isfinite(block).all()):
            raise CheckpointError(f"{te.root}: the text encoder's final norm {pair.block[len(te_prefix):]!r} has NaN "
                                  "or inf values; refusing to protect a broken checkpoint.")
        m, s0, s1 = engine.build_deformation(plan, block, cfg, region=region)
        require_inflated(f"pipeline-level {pair.key}", s0, s1)
    except _Skip as e:
        te.close()
        return None, f"pipeline-level norm site: {e}"
    except BaseException:
        te.close()
        raise
    named = replace(pair, consumers=tuple(replace(b, name=d_prefix + b.name) for b in pair.consumers))
    result = engine.result_of(replace(plan, pair=named), m, s0, s1)
    ops = plan.variant.steps(plan, m)  # the pair's steps: producers in the text encoder, consumers in the denoiser
    te_ops = {op.block.name[len(te_prefix):]: [TensorOp(_local(op.block, te_prefix), op.m, op.producer)]
              for op in ops if op.producer}
    d_ops = {op.block.name: [op] for op in ops if not op.producer}
    return Fold(te, result, te_ops, d_ops), ""
