"""``protect_checkpoint``: SpecDef protection of safetensors checkpoint files, shard by shard.

The pairs come from the same site registry and engine as in-memory :func:`hf_specdef.protect`
(``pairs_for`` on the header shapes, ``engine.plan_pairs`` / ``engine.build_deformation``), and the
recorded steps are applied with the same kernels, so the written tensors equal the ones in-memory
protection computes (to float64 rounding of the spectral steps), and the pairs are reported in the
same order.

Nothing but a chunk is held in memory, whatever the model size. Pairs that share a tensor form a
*component* (in practice one layer); components are independent of each other, and within one the
pairs run in registry order. *Deciding* a pair reads only its producer blocks (the source slice, with
the steps recorded so far applied when there are any) and records the step of every tensor it touches
(:class:`~hf_specdef.deformation.tensor_ops.TensorOp`); no tensor is deformed in memory. *Writing* a shard copies
each tensor from the memory-mapped source: tensors without steps byte for byte, the others in row
chunks with their steps applied on the way (:func:`~hf_specdef.deformation.tensor_ops.row_chunks` never cuts a
spectral block). Shards are written in parallel, one per thread (as many threads as cores, at most
4); the thread that first reaches a tensor of an undecided component decides it, reading from
whichever shards hold its tensors (so a pair may span shards), and another thread that needs it
waits for that decision. In a diffusers pipeline folder the pipeline-level ``norm`` pair
(:mod:`~hf_specdef.protection.pipeline_fold`) is decided first and its steps are recorded on the denoiser's
``to_k``/``to_v`` before the denoiser's own pairs; the text encoder is then streamed with its final norm's
steps, and small pipelines get a forward check of text encoder and denoiser together.

Reliability: everything is written to a temporary folder next to the destination and
renamed into place only after verification. Each deformed tensor is verified right after it is
written, while its bytes are still in cache: the written file is parsed again (and, once complete,
opened with ``safetensors``), and the recorded
deformations, undone on the written tensors, must give back the source tensors within
``max(tolerance, 4 x precision budget)`` -- in float64 in full for small tensors, on a random
Gaussian sketch for large matrices (the writer computes the reference ``T X`` from the source chunks
it copies, then makes one pass over the written tensor; NaN/inf shows there too). Small models
(``FORWARD_CHECK_MAX_BYTES``) are also loaded with stock transformers/diffusers and compared on a
probe batch. The source is only ever read. Any failure removes the temporary folder and raises one
error naming the file or tensor.

This package holds the entry point (:func:`protect_checkpoint`, :class:`CheckpointReport`,
:func:`pick_device`); its modules hold the parts: :mod:`.plan` (pairs, plans and components from the
headers), :mod:`.shards` (the parallel decide/write/verify pass), :mod:`.writer` (one safetensors file
written tensor by tensor), :mod:`.tensor_checks` (each written tensor against its source),
:mod:`.folder_checks` (the written folder's index, the forward checks), :mod:`.output_folder` (temporary
folder, copies, config records, commit) and :mod:`.resources` (threads, memory).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation.engine import PairResult
from hf_specdef.deformation.record import check_not_protected
from hf_specdef.deformation.report import ProtectionReport
from hf_specdef.deformation.tensor_ops import TensorOp
from hf_specdef.protection.pipeline_fold import plan_fold
from hf_specdef.protection.streaming.folder_checks import (
    FORWARD_CHECK_MAX_BYTES,
    check_written_index,
    forward_check,
    forward_check_pipeline,
)
from hf_specdef.protection.streaming.output_folder import check_paths, commit, copy_others, make_tmp, write_index, write_records
from hf_specdef.protection.streaming.plan import StreamPlan, plan_checkpoint
from hf_specdef.protection.streaming.shards import ShardStreamer
from hf_specdef.storage.checkpoint import Checkpoint, open_checkpoint
from hf_specdef.storage.staging import remove_tree

logger = logging.getLogger("hf_specdef")


@dataclass
class CheckpointReport(ProtectionReport):
    """A :class:`ProtectionReport` plus what the streaming run read and wrote."""

    source: str = ""
    destination: str = ""
    component: str | None = None
    device: str = ""
    shards: int = 0
    bytes_written: int = 0
    peak_cached_bytes: int = 0
    tensor_error: float | None = None
    # why the forward check did not run ("" when it did); derived when the report is built (see _no_forward_check)
    forward_check_skipped: str = ""

    def __post_init__(self) -> None:
        if self.deviation is None and not self.forward_check_skipped:
            self.forward_check_skipped = self._no_forward_check()

    def _no_forward_check(self) -> str:
        """Why ``protect_checkpoint`` measured no output deviation: verification off, a skip it noted, no config, or
        the model above ``FORWARD_CHECK_MAX_BYTES`` (read when the report is built)."""
        if self.tensor_error is None:
            return "verification skipped with verify=False / --no-verify: no tensor check and no forward check ran"
        noted = next((n for n in self.notes if n.startswith("forward check skipped")), None)
        if noted is not None:
            return noted
        root = Path(self.source) if self.source else None
        if root is not None and root.is_file():
            root = root.parent
        if root is not None and self.component:
            root = root / self.component
        size = sum(f.stat().st_size for f in root.glob("*.safetensors")) if root is not None and root.is_dir() else 0
        limit = FORWARD_CHECK_MAX_BYTES
        if size > limit:
            return f"forward check skipped: model {size / 2**20:.1f} MiB > {limit / 2**20:g} MiB"
        if root is not None and not (root / "config.json").is_file():
            return "forward check skipped: no config.json to load the model with"
        return f"forward check skipped: model (with its text encoder) > {limit / 2**20:g} MiB"

    def unmeasured_reason(self) -> str:
        why = self.forward_check_skipped or self._no_forward_check()
        if self.tensor_error is None:
            return f"not measured ({why})"
        return (f"not measured ({why}; every deformed tensor checked instead: max relative error "
                f"{self.tensor_error:.2e} after undoing its deformation)")

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        d = super().to_dict(full=full)
        d.update(source=self.source, destination=self.destination, component=self.component, device=self.device,
                 shards=self.shards, bytes_written=self.bytes_written, peak_cached_bytes=self.peak_cached_bytes,
                 tensor_error=self.tensor_error, forward_check_skipped=self.forward_check_skipped or None)
        return d

    def __str__(self) -> str:
        return (super().__str__() + f"\nwrote {self.destination} ({self.shards} shard(s), {self.bytes_written / 2**20:.1f} MiB"
                f"{', component ' + self.component if self.component else ''}) on {self.device}; "
                f"peak cached tensors {self.peak_cached_bytes / 2**20:.1f} MiB; "
                f"tensor check max relative error {_fmt(self.tensor_error)}")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def pick_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` is the CPU, also where CUDA is available.

    Streaming is a copy with light arithmetic on every chunk: with ``device="cuda"`` each deformed chunk
    goes to the GPU and back, and the run pays CUDA's start-up. On an H200 machine (16 cores), the
    402 MB benchmark (``scripts/bench_streaming.py``) ran at 0.67 of a plain copy's throughput on its
    CPU and at 0.13 with ``device="cuda"``.
    """
    return torch.device("cpu" if device is None else device)


def _stream(ckpt: Checkpoint, sp: StreamPlan, out_root: Path, cfg: SpecDefConfig, device: torch.device, progress: bool,
            verify: bool, initial_ops: Mapping[str, Sequence[TensorOp]] | None) -> tuple[ShardStreamer, list[PairResult]]:
    """Write ``ckpt``'s shards and index into ``out_root`` with the steps of ``sp`` (and ``initial_ops``) applied;
    with ``verify``, every deformed tensor and the written headers/index are checked."""
    out_root.mkdir(parents=True, exist_ok=True)
    streamer = ShardStreamer(ckpt, sp, cfg, device, progress, verify, initial_ops)
    results = streamer.run(out_root)
    write_index(ckpt, out_root, sp)
    if verify:
        check_written_index(ckpt, out_root)
    return streamer, results


def protect_checkpoint(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    cfg: SpecDefConfig | None = None,
    *,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
    verify: bool = True,
    pipeline_norm: bool | None = None,
) -> CheckpointReport:
    """Protect a safetensors checkpoint folder into ``dst_dir``, streaming shard by shard.

    Only a chunk of a tensor is held in memory at a time, whatever the model size; the source is only ever read.
    Everything is written to a temporary folder next to the destination, checked, and renamed into place only after
    verification; any failure removes the temporary folder and raises one error naming the file or tensor. See the
    Performance page of the docs (docs/performance.md).

    Args:
        src_dir: a transformers/diffusers model folder (single ``*.safetensors`` or shards with an
            index), or a diffusers pipeline folder (``model_index.json``), whose denoiser component
            (``transformer`` or ``unet``) is protected and every other component copied.
        dst_dir: the output folder; written to a temporary sibling and renamed into place at the end.
        cfg: the protection (default ``SpecDefConfig()``).
        device: where deformations are computed and checked (``None``: the CPU; see :func:`pick_device`).
        overwrite: replace an existing ``dst_dir`` (only after everything succeeded).
        force: protect a checkpoint that already carries a protection record.
        progress: show progress bars.
        verify: re-read and check what was written before the rename (see the module docstring);
            without it the written files are not checked (not recommended).
        pipeline_norm: for a pipeline folder, fold the text encoder's final norm into every cross-attention
            ``to_k``/``to_v`` of the denoiser (the pipeline-level ``norm`` site, as in-memory ``protect(pipe)``
            does): ``None`` (default) where it applies, ``True`` to require it, ``False`` to skip it. The
            written text encoder is then correct only inside the pipeline.

    Shards are written in parallel on threads of their own; while they run, torch's intra-op thread count
    is lowered to the cores per thread (process-wide, restored afterwards) so that they do not oversubscribe
    the CPU.

    Returns:
        `CheckpointReport`: a :class:`~hf_specdef.ProtectionReport` (per pair: site, layer, sigma_1 before/after)
        plus the source, destination, shards and bytes written, the tensor-check error and, for small models, the
        forward-check deviation (or why it was not measured).

    Raises:
        CheckpointError: the source is missing or a file, shards are missing, truncated or corrupted, weights are
            NaN/inf, or the destination cannot be written.
        FileExistsError: ``dst_dir`` exists and ``overwrite`` is False (or it is a symbolic link, or not a folder).
        ValueError: ``dst_dir`` is inside the source folder or contains it.
        AlreadyProtectedError: the checkpoint carries a protection record and ``force`` is False.
        NoSitesError: no pair of the checkpoint matches the config.
        PrecisionBudgetError: the storage dtype cannot hold the deformation within ``cfg.tolerance``.
        VerificationError: a written tensor or the forward check deviates beyond the tolerance (nothing is left
            at ``dst_dir``).

    Example:

    ```python
    from hf_specdef import SpecDefConfig, protect_checkpoint

    report = protect_checkpoint("Llama-3.1-8B", "Llama-3.1-8B-specdef", SpecDefConfig(), progress=False)
    print(report)  # pairs, shards and MiB written, tensor-check error
    ```
    """
    start = time.perf_counter()
    cfg = cfg or SpecDefConfig()
    src, dst = Path(src_dir).absolute(), Path(dst_dir).absolute()
    check_paths(src.resolve(), dst.parent.resolve() / dst.name, overwrite)
    dev = pick_device(device)
    with open_checkpoint(src) as ckpt:
        check_not_protected(ckpt.config, force)
        sp = plan_checkpoint(ckpt, cfg)
        notes = list(sp.notes)
        fold = None
        if ckpt.component:
            fold, why = plan_fold(ckpt.root.parent, ckpt, cfg, pipeline_norm=pipeline_norm, force=force, device=dev)
            notes.append(f"diffusers pipeline: protected component {ckpt.component!r}" + (
                "; the text encoder's final norm folded into every cross-attention to_k/to_v (pipeline-level norm "
                "site: the written text encoder is correct only inside the pipeline)" if fold else f"; {why}")
                + "; other components copied unchanged")
        if sp.out_dtype:
            notes.append(f"precision='float32': {len(sp.out_dtype)} tensors stored in float32 (config dtype set to float32)")
        tmp = make_tmp(dst)
        try:
            notes += copy_others(src, tmp, [ckpt] + ([fold.text_encoder] if fold else []))
            out_root = tmp / ckpt.root.relative_to(src) if ckpt.root != src else tmp
            streamer, own = _stream(ckpt, sp, out_root, cfg, dev, progress, verify, fold.denoiser_ops if fold else None)
            streamers, te_root = [streamer], None
            if fold:  # the text encoder: every tensor copied, its final norm with the pair's steps
                te_root = tmp / fold.text_encoder.root.relative_to(src)
                streamers.append(_stream(fold.text_encoder, StreamPlan([], [], [], {}, [], []), te_root, cfg, dev,
                                         progress, verify, fold.te_ops)[0])
            results = ([fold.result] if fold else []) + own
            write_records(ckpt, out_root, fold, te_root, cfg, own, None, bool(sp.out_dtype))
            tensor_error = deviation = None
            if verify:
                tensor_error = max(s.worst_error for s in streamers)
                notes.append(f"tensor check: the {len(results)} deformations undone on the written files match the "
                             f"source, max relative error {tensor_error:.2e}")
                size = ckpt.total_bytes + (fold.text_encoder.total_bytes if fold else 0)
                if size <= FORWARD_CHECK_MAX_BYTES and ckpt.config:
                    if fold:
                        deviation, note = forward_check_pipeline(src, tmp, ckpt.component, cfg)
                    else:
                        deviation, note = forward_check(ckpt.root, out_root, ckpt.config, cfg.tolerance)
                    notes.append(note)
            write_records(ckpt, out_root, fold, te_root, cfg, own, deviation, bool(sp.out_dtype))
            commit(tmp, dst, overwrite)
        except BaseException:
            remove_tree(tmp)  # a failure to remove is named in a warning; the error raised is the one that stopped us
            raise
        finally:
            if fold:
                fold.text_encoder.close()
    report = CheckpointReport(
        cfg, results, deviation, sp.skipped, notes, time.perf_counter() - start,
        source=str(src), destination=str(dst), component=ckpt.component, device=str(dev), shards=len(ckpt.files),
        bytes_written=sum(s.bytes_written for s in streamers), peak_cached_bytes=max(s.peak_cached for s in streamers),
        tensor_error=tensor_error,
    )
    logger.info("hf-specdef protected %d pairs of %s into %s (%.1fs)", len(results), src, dst, report.seconds)
    return report
