"""``protect_checkpoint``: SpecDef protection of safetensors checkpoint files, shard by shard (SPEC §4, §6, §7).

The pairs come from the same site registry and engine as in-memory :func:`hf_specdef.protect`
(``pairs_for`` on the header shapes, ``engine.plan_pairs`` / ``engine.build_deformation``), and the
recorded steps are applied with the same kernels, so the written tensors equal the ones in-memory
protection computes (to float64 rounding of the spectral steps), and the pairs are reported in the
same order.

Nothing but a chunk is held in memory, whatever the model size. Pairs that share a tensor form a
*component* (in practice one layer); components are independent of each other, and within one the
pairs run in registry order. *Deciding* a pair reads only its producer blocks (the source slice, with
the steps recorded so far applied when there are any) and records the step of every tensor it touches
(:class:`~hf_specdef.tensor_ops.TensorOp`); no tensor is deformed in memory. *Writing* a shard copies
each tensor from the memory-mapped source: tensors without steps byte for byte, the others in row
chunks with their steps applied on the way (:func:`~hf_specdef.tensor_ops.row_chunks` never cuts a
spectral block). Shards are written in parallel, one per thread (as many threads as cores, at most
4); the thread that first reaches a tensor of an undecided component decides it, reading from
whichever shards hold its tensors (so a pair may span shards), and another thread that needs it
waits for that decision. In a diffusers pipeline folder the pipeline-level ``norm`` pair
(:mod:`~hf_specdef.pipeline_fold`) is decided first and its steps are recorded on the denoiser's
``to_k``/``to_v`` before the denoiser's own pairs; the text encoder is then streamed with its final norm's
steps, and small pipelines get a forward check of text encoder and denoiser together.

Reliability (SPEC §7): everything is written to a temporary folder next to the destination and
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
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import engine, linalg, precision
from .checkpoint import (
    CONFIG_NAME,
    FLOAT_DTYPES,
    TORCH_TO_ST,
    Checkpoint,
    CheckpointError,
    drop_mapped_range,
    open_checkpoint,
    read_header,
)
from .config import CONFIG_KEY, DIFFUSERS_CONFIG_KEY, SpecDefConfig
from .engine import PairResult, Plan
from .pipeline_fold import TEXT_ENCODER, Fold, plan_fold, text_encoder_config
from .protection import VerificationError, require_inflated
from .record import check_not_protected, component_record, make_record, record_key
from .report import ProtectionReport
from .sites import NoSitesError, Pair, TensorBlock, absent_sites, drop_inexact, pairs_for, select_pairs
from .tensor_ops import TensorOp, apply_ops, merge_axis_steps, row_chunks

logger = logging.getLogger("hf_specdef")

# Checkpoints up to this size also get a forward-pass check with stock transformers/diffusers.
FORWARD_CHECK_MAX_BYTES = 64 << 20
# Weight files in other formats are never copied next to protected safetensors (they would ship unprotected weights).
UNPROTECTED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_CHUNK = 16 << 20  # bytes per write of an untouched tensor
_STEP_CHUNK = 2 << 20  # bytes per row chunk of a tensor whose steps are applied on the way (fits a core's L2 cache)


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

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        d = super().to_dict(full=full)
        d.update(source=self.source, destination=self.destination, component=self.component, device=self.device,
                 shards=self.shards, bytes_written=self.bytes_written, peak_cached_bytes=self.peak_cached_bytes,
                 tensor_error=self.tensor_error)
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


# ------------------------------------------------------------------------------------------
# Planning: pairs, plans, components (nothing is read but headers; nothing is written)
# ------------------------------------------------------------------------------------------

@dataclass
class StreamPlan:
    """What a streaming run will do, decided from the headers before anything is read or written."""

    pairs: list[Pair]
    plans: list[Plan]
    components: list[list[int]]  # pair indices, in registry order; components in order of their first pair
    out_dtype: dict[str, torch.dtype]  # tensors whose stored dtype changes (precision="float32")
    skipped: list[str]
    notes: list[str]


def _components(pairs: Sequence[Pair]) -> list[list[int]]:
    """Group pairs that (transitively) share a tensor; such pairs must run in registry order."""
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, p in enumerate(pairs):
        for name in p.names():
            if name in owner:
                parent[find(i)] = find(owner[name])
            else:
                owner[name] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(pairs)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def plan_checkpoint(ckpt: Checkpoint, cfg: SpecDefConfig) -> StreamPlan:
    """Pairs and plans of a checkpoint from its headers; raises ``NoSitesError`` / ``PrecisionBudgetError``."""
    shapes = ckpt.shapes()
    all_pairs = pairs_for(ckpt.config, shapes, cfg, ckpt.class_name)
    dtypes = ckpt.dtypes()
    pairs, inexact = drop_inexact(select_pairs(all_pairs, cfg), dtypes.__getitem__)
    skipped = absent_sites(cfg, all_pairs, ckpt.config, ckpt.class_name) + inexact
    if not pairs:
        raise NoSitesError(f"every selected pair was skipped: {skipped}")
    # the engine plans from dtypes only: empty stand-ins (the weights themselves are checked when read)
    stand_ins = {n: torch.empty(0, dtype=dtypes[n]) for p in pairs for n in p.names()}
    plans = engine.plan_pairs(pairs, stand_ins, cfg, skipped)
    pairs = [plan.pair for plan in plans]  # without the pairs the precision policy left out
    out_dtype: dict[str, torch.dtype] = {}
    if any(plan.dtype == torch.float32 != dtypes[plan.pair.producers[0].name] for plan in plans):
        # precision="float32": like in-memory protection, the whole model is stored in float32
        out_dtype = {n: torch.float32 for n, dt in dtypes.items() if dt.is_floating_point and dt != torch.float32}
    notes = sorted({n for p in plans for n in p.notes})
    return StreamPlan(pairs, plans, _components(pairs), out_dtype, skipped, notes)


# ------------------------------------------------------------------------------------------
# Writing safetensors shards tensor by tensor
# ------------------------------------------------------------------------------------------

class ShardWriter:
    """Writes one safetensors file tensor by tensor, in a fixed order, without holding the shard in memory."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, str, tuple[int, ...], int]],
                 metadata: Mapping[str, str] | None) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self.sizes: list[tuple[str, int]] = []
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.sizes.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.path, self.total, self.pos, self.written = path, offset, 0, 0
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        # sized in full up front: what is written can be mapped and read back (verified) while the rest follows
        self.file.truncate(8 + len(raw) + offset)

    def write(self, name: str, data: Any) -> None:
        """Append (part of) the bytes of the current tensor ``name``."""
        expected, size = self.sizes[self.pos]
        if name != expected:
            raise RuntimeError(f"ShardWriter {self.path}: got tensor {name!r}, expected {expected!r}")
        n = memoryview(data).nbytes
        self.file.write(data)
        self.written += n
        if self.written == size:
            self.pos, self.written = self.pos + 1, 0
        elif self.written > size:
            raise RuntimeError(f"ShardWriter {self.path}: tensor {name!r} got {self.written} bytes, expected {size}")

    def close(self) -> None:
        self.file.close()
        if self.pos != len(self.sizes):
            raise RuntimeError(f"ShardWriter {self.path}: only {self.pos}/{len(self.sizes)} tensors written")


def cpu_count() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run with torch's intra-op thread count lowered to ``threads`` (restored afterwards; never raised).

    The streaming stages already run on their own threads. Each of them entering torch's OpenMP pool
    (one team per calling thread, spinning between ops) would put several times more busy threads
    than cores on the CPUs: on 2 cores that took 1.6-2x the CPU time of the same run with one
    intra-op thread. The setting is process-wide while it lasts.
    """
    before = torch.get_num_threads()
    if threads >= before:
        yield
        return
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_malloc_trim() -> Any:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed chunks below its dynamic mmap threshold,
    up to 32 MiB each, which would otherwise pile up as resident memory over a streaming pass)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def all_finite(t: torch.Tensor) -> bool:
    """True when no entry is NaN or inf. A sum is checked first (one fast pass); only when it is not
    finite (NaN/inf, or an overflow of a finite sum) is every entry checked."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


# ------------------------------------------------------------------------------------------
# Verification of what was written (per component, right after its last shard is written)
# ------------------------------------------------------------------------------------------

_SKETCH_COLUMNS = 4
_SMALL = 1 << 16  # tensors up to this many entries are checked in full


def uses_sketch(shape: Sequence[int], ops: Sequence[TensorOp]) -> bool:
    """Whether :func:`check_tensor` checks a tensor on a sketch (large matrices) rather than in full."""
    return len(shape) == 2 and math.prod(shape) > _SMALL and all(op.block.axis <= 1 for op in ops)


def sketch_dtype(dtype: torch.dtype, ops: Sequence[TensorOp], device: torch.device) -> torch.dtype:
    """A spectral step makes ``T' x`` cancel ~alpha-sized terms: multiply in float64 then; axis steps are exact
    in float32."""
    return linalg.compute_dtype(device) if any(op.spectral for op in ops) else torch.promote_types(dtype, torch.float32)


def sketch_columns(name: str, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """The Gaussian ``X`` (``shape[1] x 4``) of a tensor's sketch, the same for every call with this name and shape."""
    seed = sum(name.encode()) + shape[0]
    dt = linalg.compute_dtype(device)
    return torch.randn(shape[1], _SKETCH_COLUMNS, dtype=dt, generator=torch.Generator().manual_seed(seed)).to(device)


def sketch_reference(name: str, original: torch.Tensor, device: torch.device, x: torch.Tensor | None = None) -> torch.Tensor:
    """``T X`` for the sketch check of ``original`` (or of a row chunk of it, given the full tensor's ``x``).

    Multiplied in float32 at least: unlike ``T' X``, it sums no alpha-sized terms that cancel."""
    x = sketch_columns(name, original.shape, device) if x is None else x
    return _product(original, x, torch.promote_types(original.dtype, torch.float32))


def _product(t: torch.Tensor, x: torch.Tensor, mm: torch.dtype) -> torch.Tensor:
    """``t @ x`` multiplied in ``mm`` and returned in ``x``'s dtype; ``t`` is converted 1 MB of rows at a time
    (never a converted copy of a whole tensor)."""
    xm = x.to(mm)
    if t.dtype == mm and t.device == x.device:
        return (t @ xm).to(x.dtype)
    out = torch.empty(t.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    step = max(1, (1 << 20) // max(1, t.shape[1] * mm.itemsize))
    for b in range(0, t.shape[0], step):
        out[b:b + step] = t[b:b + step].to(device=x.device, dtype=mm) @ xm
    return out


def check_tensor(name: str, deformed: torch.Tensor, original: torch.Tensor | None, ops: Sequence[TensorOp],
                 device: torch.device, sketch: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """Relative error between ``original`` and ``deformed`` with ``ops`` (applied in order) undone.

    Small or non-2-D tensors are undone in full in float64. Larger matrices are checked on a random
    sketch, in one pass over ``deformed`` and no copies: with ``T' = L T R`` (``L`` = the row-axis
    steps, ``R`` = the column-axis steps), compare ``L^-1 T' (R^-1 X)`` with ``T X`` for a Gaussian
    ``X`` of a few columns (any wrong entry shows with probability one). ``sketch`` is ``(X, T X)`` when
    given (the writer computes ``T X`` from the source chunks it copies), else both are computed here.
    """
    dt = linalg.compute_dtype(device)
    if not uses_sketch(deformed.shape, ops):
        d = deformed.to(device=device, dtype=dt, copy=True)
        apply_ops(d, ops, inverse=True)
        o = original.to(device=device, dtype=dt)
        return float((d - o).norm() / o.norm().clamp_min(torch.finfo(dt).tiny))
    x = sketch_columns(name, deformed.shape, device) if sketch is None else sketch[0]
    w = x.T.contiguous()  # rows along the tensor's column axis
    for op in ops:  # R^-1 x: the column steps' inverses, in forward order (each step is symmetric)
        if op.block.axis == 1:
            op.apply_to_slice(w, 0, 0, w.shape[0], inverse=True)
    y = _product(deformed, w.T, sketch_dtype(deformed.dtype, ops, device))
    for op in reversed(ops):  # L^-1 y: the row steps' inverses, last first
        if op.block.axis == 0:
            op.apply_to_slice(y, 0, 0, y.shape[0], inverse=True)
    ref = sketch_reference(name, original, device, x) if sketch is None else sketch[1]
    return float((y - ref).norm() / ref.norm().clamp_min(torch.finfo(dt).tiny))


# ------------------------------------------------------------------------------------------
# The streaming pass
# ------------------------------------------------------------------------------------------

class _Streamer:
    """Writes the shards in parallel, deciding each component when a writer first needs it, verifying each tensor
    right after it is written.

    Deciding a pair reads only its producer blocks and records the steps (:class:`TensorOp`) of every
    tensor it touches; nothing is deformed in memory. Writing a shard copies each tensor from the
    memory-mapped source in row chunks, applying the tensor's recorded steps to each chunk on the way.
    """

    def __init__(self, ckpt: Checkpoint, sp: StreamPlan, cfg: SpecDefConfig, device: torch.device, progress: bool,
                 verify: bool, initial_ops: Mapping[str, Sequence[TensorOp]] | None = None) -> None:
        self.ckpt, self.sp, self.cfg, self.device, self.progress, self.verify = ckpt, sp, cfg, device, progress, verify
        self.results: list[PairResult | None] = [None] * len(sp.pairs)
        # steps decided before this checkpoint's own pairs (the pipeline-level pair): applied first, verified too
        self.ops: dict[str, list[TensorOp]] = {n: list(ops) for n, ops in (initial_ops or {}).items()}
        self.peak_cached = 0
        self.bytes_written = 0
        self.worst_error = 0.0
        self.threshold = max(cfg.tolerance, 4 * max((p.budget for p in sp.plans), default=0.0))
        self.out: dict[Path, tuple[dict[str, Any], mmap.mmap]] = {}
        self.failed = False
        self.error: BaseException | None = None  # the first error of a writer (the one reported)
        self.local = threading.local()  # each writer thread's chunk buffer
        self.lock = threading.Lock()
        self.comp_of = {n: ci for ci, comp in enumerate(sp.components) for i in comp for n in sp.pairs[i].names()}
        self.decisions: dict[int, Future] = {}  # component -> its decision, made by the first writer that needs it
        # one thread per core, at most 4 (each holds one chunk and one component's decision)
        self.threads = max(1, min(4, cpu_count(), len(ckpt.files)))

    def _note_cached(self, t: torch.Tensor) -> None:
        self.peak_cached = max(self.peak_cached, t.numel() * t.element_size())

    def _broken(self, name: str) -> CheckpointError:
        return CheckpointError(f"{self.ckpt.infos[name].file}: tensor {name!r} has NaN or inf values; "
                               "refusing to protect a broken checkpoint.")

    # -- decide ---------------------------------------------------------------------------
    def _region(self, b: TensorBlock) -> torch.Tensor:
        """The current values of a block (a producer's; a consumer's too for float16-exact pairs): the source slice
        with the steps recorded so far applied (a read-only view of the source when there are none)."""
        src = self.ckpt.view(b.name).narrow(b.axis, b.start, b.stop - b.start)
        ops = self.ops.get(b.name, [])
        dtype = self.sp.out_dtype.get(b.name, src.dtype)
        if not ops and dtype == src.dtype and src.device == self.device:
            return src
        piece = src.to(device=self.device, dtype=dtype, copy=True)
        apply_ops(piece, ops, b.axis, b.start, b.stop)
        self._note_cached(piece)
        return piece

    def _check_producers(self, pair: Pair) -> None:
        """Producer weights are checked for NaN/inf only when a decision on them fails (and in full as written)."""
        for b in pair.producers:
            if not all_finite(self.ckpt.view(b.name)):
                raise self._broken(b.name) from None

    def _decide_component(self, comp: list[int]) -> None:
        if self.failed:
            return
        with torch.no_grad():
            for i in comp:
                plan = self.sp.plans[i]
                block = engine.producer_block(plan.pair, {}, region=self._region)
                try:
                    m, s0, s1 = engine.build_deformation(plan, block, self.cfg, region=self._region)
                except RuntimeError:  # e.g. a decomposition failing on NaN/inf
                    self._check_producers(plan.pair)
                    raise
                if not (math.isfinite(s0) and math.isfinite(s1)):
                    self._check_producers(plan.pair)
                    raise CheckpointError(f"pair {plan.pair.key}: sigma_1 {s0:g} -> {s1:g} is not finite.")
                del block
                for b in plan.pair.producers:
                    self.ops.setdefault(b.name, []).append(TensorOp(b, m, True))
                for b in plan.pair.consumers:
                    self.ops.setdefault(b.name, []).append(TensorOp(b, m, False))
                require_inflated(plan.pair.key, s0, s1)
                self.results[i] = engine.result_of(plan, m, s0, s1)
            # producers may sit in a shard another thread writes later: their pages need not stay mapped until then
            for name in {b.name for i in comp for b in self.sp.pairs[i].producers}:
                self.ckpt.drop_pages(name)

    def _decided(self, name: str) -> None:
        """Make sure the component touching ``name`` (if any) is decided: here, or by the thread already deciding it."""
        ci = self.comp_of.get(name)
        if ci is None:
            return
        with self.lock:
            fut = self.decisions.get(ci)
            mine = fut is None
            if mine:
                fut = self.decisions[ci] = Future()
        if not mine:
            fut.result()
            return
        try:
            self._decide_component(self.sp.components[ci])
        except BaseException as e:
            fut.set_exception(e)
            raise
        fut.set_result(None)

    def run(self, out_root: Path) -> list[PairResult]:
        bar = tqdm(total=self.ckpt.total_bytes, unit="B", unit_scale=True, desc="SpecDef protect (streaming)",
                   disable=not self.progress, leave=False)
        # Shards on threads of their own (torch and file I/O release the GIL), each deciding, writing and verifying;
        # few threads that never wait on each other's stages keep the cores busy with little hand-over of the GIL.
        linalg.load_solvers(self.device)  # before the threads: the first linalg call is not thread-safe on CUDA
        try:
            with bar, intra_op_threads(cpu_count() // self.threads), \
                    ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="specdef-shard") as pool:
                writes = [pool.submit(self._write_shard, f, out_root / f.name, bar) for f in self.ckpt.files]
                try:
                    wait(writes, return_when=FIRST_EXCEPTION)
                    if self.error is not None:  # the first error (a later one may follow from it)
                        raise self.error
                    for fut in writes:
                        fut.result()
                except BaseException:
                    self.failed = True  # queued shards return at once
                    raise
        finally:
            for p in list(self.out):
                self._release_out(p)
        return [r for r in self.results if r is not None]

    def _write_shard(self, src: Path, dst: Path, bar: tqdm) -> None:
        if self.failed:
            return
        try:
            self._write_and_verify(src, dst, bar)
        except BaseException as e:
            with self.lock:
                self.error = self.error or e
            self.failed = True  # the other writers stop at their next tensor
            raise

    def _write_and_verify(self, src: Path, dst: Path, bar: tqdm) -> None:
        ckpt = self.ckpt
        names = ckpt.keys_of(src)
        entries = []
        for n in names:
            info = ckpt.infos[n]
            if n in self.sp.out_dtype:
                dt = self.sp.out_dtype[n]
                entries.append((n, TORCH_TO_ST[dt], info.shape, info.nbytes // info.torch_dtype.itemsize * dt.itemsize))
            else:
                entries.append((n, info.dtype, info.shape, info.nbytes))
        try:
            writer = ShardWriter(dst, entries, ckpt.file_metadata.get(src))
            try:
                with torch.no_grad():
                    for n in names:
                        if self.failed:
                            return
                        self._decided(n)  # its steps are all recorded
                        if n in self.ops or n in self.sp.out_dtype:
                            sketch = self._transform_tensor(n, writer)
                            if self.verify and n in self.ops:
                                writer.file.flush()
                                self._verify_tensor(n, dst, sketch)
                        else:  # untouched: the source bytes as they are, checked and written chunk by chunk
                            self._copy_tensor(n, writer)
                        bar.update(ckpt.infos[n].nbytes)
            finally:
                writer.file.close()
                self._release_out(dst)
            writer.close()
        except OSError as e:
            raise CheckpointError(f"cannot write {dst}: {e}") from None
        if self.verify:
            self._check_reader(dst)
        # every component touching this shard is decided (the loop above saw to each): its mapping can go
        ckpt.release(src)
        return_freed_memory()
        with self.lock:
            self.bytes_written += dst.stat().st_size

    def _transform_tensor(self, name: str, writer: ShardWriter) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Write ``name`` with its recorded steps applied (and/or upcast), one row chunk at a time.

        Returns the sketch ``(X, T X)`` of the source for the check after the write, when it uses one."""
        src = self.ckpt.view(name)
        src = src.reshape(1) if src.dim() == 0 else src
        ops = merge_axis_steps(self.ops.get(name, []))
        if ops:
            self.ops[name] = ops  # decided and merged once: the check after the write uses the same list
        dtype = self.sp.out_dtype.get(name, src.dtype)
        row_bytes = max(1, src[0].numel() * src.element_size()) if src.numel() else 1
        sketch = self.verify and uses_sketch(src.shape, ops)
        if sketch:  # T X for the check after the write, from the chunks while they are in cache
            x = sketch_columns(name, src.shape, self.device)
            reference = torch.empty(src.shape[0], x.shape[1], dtype=x.dtype, device=self.device)
        for begin, end in row_chunks(src.shape[0], ops, _STEP_CHUNK // row_bytes):
            piece = self._chunk_buffer(src[begin:end].shape, dtype)
            piece.copy_(src[begin:end])
            if sketch:
                reference[begin:end] = sketch_reference(name, piece, self.device, x)  # the source chunk, on device
            apply_ops(piece, ops, 0, begin, end)
            if not sketch and not all_finite(piece):  # with a sketch, NaN/inf shows in _verify_tensor
                self._raise_not_finite(name, dtype)
            self._note_cached(piece)
            writer.write(name, _tensor_bytes(piece))
            self.ckpt.drop_pages(name, begin * row_bytes, end * row_bytes)
        if src.numel() == 0:
            writer.write(name, b"")
        return (x, reference) if sketch else None

    def _raise_not_finite(self, name: str, dtype: torch.dtype) -> None:
        """A deformed tensor has NaN/inf: the source's (a broken checkpoint) or an overflow of its dtype."""
        if not all_finite(self.ckpt.view(name)):
            raise self._broken(name)
        raise CheckpointError(f"deforming tensor {name!r} (from {self.ckpt.infos[name].file}) overflowed its "
                              f"dtype {dtype} (inf/NaN); lower alpha or use precision='float32'.")

    def _chunk_buffer(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` over the writer's reused buffer (fresh memory for every chunk costs page faults)."""
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = getattr(self.local, "buffer", None)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.local.buffer = torch.empty(max(nbytes, _STEP_CHUNK), dtype=torch.uint8, device=self.device)
        return buffer[:nbytes].view(dtype).view(shape)

    def _copy_tensor(self, name: str, writer: ShardWriter) -> None:
        ckpt, info = self.ckpt, self.ckpt.infos[name]
        raw = ckpt.raw(name)
        flat = ckpt.view(name).reshape(-1) if info.dtype in FLOAT_DTYPES else None
        step = _CHUNK - _CHUNK % 8
        for off in range(0, info.nbytes, step):
            stop = min(off + step, info.nbytes)
            # written first, then checked (a NaN still fails the run, and nothing is committed): the kernel copies
            # pages this process has not mapped yet ~3x faster than pages it has just read (measured on a VM)
            writer.write(name, raw[off:stop])
            if flat is not None:
                size = flat.element_size()
                if not all_finite(flat[off // size:stop // size]):
                    raise self._broken(name)
            ckpt.drop_pages(name, off, stop)
        if info.nbytes == 0:
            writer.write(name, b"")

    # -- verify ---------------------------------------------------------------------------
    def _out_view(self, path: Path, name: str) -> torch.Tensor:
        """A read-only view of tensor ``name`` in the shard being written at ``path`` (sized in full up front)."""
        if path not in self.out:
            infos, _ = read_header(path)  # our own parser: offsets and sizes
            with open(path, "rb") as fh:
                self.out[path] = (infos, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        infos, m = self.out[path]
        info = infos.get(name)
        if info is None or info.shape != self.ckpt.infos[name].shape:
            raise VerificationError(f"{path}: tensor {name!r} is missing or has the wrong shape")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            t = torch.frombuffer(m, dtype=info.torch_dtype, count=info.nbytes // info.torch_dtype.itemsize, offset=info.begin)
        return t.reshape(info.shape)

    def _release_out(self, path: Path) -> None:
        entry = self.out.pop(path, None)
        if entry is not None:
            try:
                entry[1].close()
            except BufferError:
                pass

    @staticmethod
    def _check_reader(path: Path) -> None:
        """The reference reader accepts the written shard and reads the tensors our own parser does."""
        from safetensors import safe_open

        infos, _ = read_header(path)
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != set(infos):
                raise VerificationError(f"{path}: safetensors reads other tensors than were written")

    def _verify_tensor(self, name: str, path: Path, sketch: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """The written ``name`` (in the shard ``path``) with its recorded steps undone must give back the source tensor
        (``sketch``: the writer's ``(X, T X)``, else computed from the source)."""
        err = check_tensor(name, self._out_view(path, name), self.ckpt.view(name), self.ops[name], self.device, sketch)
        if sketch is None:  # the full check read the source again
            self.ckpt.drop_pages(name)
        infos, m = self.out[path]
        drop_mapped_range(m, infos[name].begin, infos[name].end)
        with self.lock:
            self.worst_error = max(self.worst_error, err)
        if not math.isfinite(err):  # NaN/inf in the source or an overflow: say which
            self._raise_not_finite(name, infos[name].torch_dtype)
        if not err <= self.threshold:
            raise VerificationError(
                f"{path.name}: tensor {name!r} does not hold the claimed deformation of the source (relative error "
                f"{err:.3g} after undoing it > {self.threshold:.3g}); nothing was written.")


def _stream(ckpt: Checkpoint, sp: StreamPlan, out_root: Path, cfg: SpecDefConfig, device: torch.device, progress: bool,
            verify: bool, initial_ops: Mapping[str, Sequence[TensorOp]] | None) -> tuple[_Streamer, list[PairResult]]:
    """Write ``ckpt``'s shards and index into ``out_root`` with the steps of ``sp`` (and ``initial_ops``) applied;
    with ``verify``, every deformed tensor and the written headers/index are checked."""
    out_root.mkdir(parents=True, exist_ok=True)
    streamer = _Streamer(ckpt, sp, cfg, device, progress, verify, initial_ops)
    results = streamer.run(out_root)
    _write_index(ckpt, out_root, sp)
    if verify:
        check_written_index(ckpt, out_root)
    return streamer, results


def check_written_index(ckpt: Checkpoint, out_root: Path) -> None:
    """The written folder opens as a checkpoint (headers, index) with the source's tensor names and shapes."""
    with open_checkpoint(out_root) as out:
        if set(out.infos) != set(ckpt.infos):
            diff = sorted(set(out.infos) ^ set(ckpt.infos))
            raise VerificationError(f"written checkpoint {out_root} differs from the source in tensors {diff[:3]}")
        for n, info in out.infos.items():
            if info.shape != ckpt.infos[n].shape:
                raise VerificationError(f"{info.file}: tensor {n!r} has shape {info.shape}, source {ckpt.infos[n].shape}")


def forward_check(src_root: Path, out_root: Path, config: Mapping[str, Any], tolerance: float) -> tuple[float | None, str]:
    """Load both checkpoints with the stock class (float32) and compare outputs on a probe batch."""
    from .stock import load_stock, stock_class
    from .verification import verify

    cls = stock_class(config)
    if cls is None:
        return None, "forward check skipped: model class not found in transformers/diffusers"
    ref, prot = load_stock(src_root), load_stock(out_root)
    try:
        res = verify(ref, prot, tolerance=tolerance)
    except ValueError as e:  # no probe for this model kind
        return None, f"forward check skipped: {e}"
    if not res.ok:
        raise VerificationError(
            f"the protected checkpoint's outputs deviate by {res.max_relative_deviation:.3g} (max relative) from the "
            f"source's > tolerance={tolerance:g}; nothing was written.")
    dev = res.max_relative_deviation
    return dev, f"forward check ({cls.__name__}, float32): max relative deviation {dev:.2e}"


# ------------------------------------------------------------------------------------------
# Files: temp folder, copies, config record, commit
# ------------------------------------------------------------------------------------------

def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise CheckpointError(f"{src}: source checkpoint folder does not exist.")
    if dst == src or src in dst.parents:
        raise ValueError(f"destination {dst} is inside the source {src}; the source is never modified — choose another folder.")
    if dst in src.parents:
        raise ValueError(f"destination {dst} contains the source {src}; choose another folder.")
    if dst.exists():
        if not dst.is_dir():
            raise FileExistsError(f"destination {dst} exists and is not a folder.")
        if not overwrite:
            raise FileExistsError(f"destination {dst} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")


def _make_tmp(dst: Path) -> Path:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.specdef-tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"cannot create a temporary folder next to {dst}: {e}") from None
    return tmp


def _copy_others(src: Path, tmp: Path, ckpts: Sequence[Checkpoint]) -> list[str]:
    """Copy every file of ``src`` except the shards, indexes and configs of ``ckpts`` (written by the caller); returns notes."""
    skip = set()
    for ckpt in ckpts:
        skip |= {p.resolve() for p in ckpt.files} | {(ckpt.root / CONFIG_NAME).resolve()}
        if ckpt.index_path is not None:
            skip.add(ckpt.index_path.resolve())
    notes = []
    roots = {ckpt.root.resolve() for ckpt in ckpts}
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        d = Path(dirpath)
        dirnames[:] = [x for x in dirnames if not x.startswith(".specdef-tmp")]
        for fn in filenames:
            p = d / fn
            if p.resolve() in skip:
                continue
            rel = p.relative_to(src)
            if p.parent.resolve() in roots and fn.endswith(UNPROTECTED_WEIGHT_SUFFIXES + (".safetensors",)):
                notes.append(f"not copied: {rel} (weights outside the protected checkpoint would ship unprotected)")
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(p, target)
            except OSError as e:
                raise CheckpointError(f"cannot copy {p} to {target}: {e}") from None
    for n in notes:
        logger.warning("hf-specdef: %s", n)
    return notes


def _write_index(ckpt: Checkpoint, out_root: Path, sp: StreamPlan) -> None:
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


def _write_records(ckpt: Checkpoint, out_root: Path, fold: Fold | None, te_root: Path | None, cfg: SpecDefConfig,
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


def forward_check_pipeline(src: Path, tmp: Path, component: str, cfg: SpecDefConfig) -> tuple[float, str]:
    """Text encoder then denoiser, from the source and from the written folders (float32), on one probe batch."""
    from . import probe
    from .stock import composed_pipeline_output

    ref, got = (composed_pipeline_output(root, component, cfg.seed)[0] for root in (src, tmp))
    dev = probe.max_relative_deviation(ref, got)
    if not dev <= cfg.tolerance:
        raise VerificationError(
            f"the protected pipeline's outputs (text encoder -> {component}) deviate by {dev:.3g} (max relative) from the "
            f"source's > tolerance={cfg.tolerance:g}; nothing was written.")
    return dev, f"forward check (text encoder -> {component}, float32): max relative deviation {dev:.2e}"


def _commit(tmp: Path, dst: Path, overwrite: bool) -> None:
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"destination {dst} appeared while protecting; nothing was written to it.")
        old = dst.parent / f".{dst.name}.specdef-old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(dst, old)
        except OSError as e:
            raise CheckpointError(f"cannot replace {dst}: {e}") from None
        try:
            os.rename(tmp, dst)
        except OSError as e:
            os.rename(old, dst)  # put the previous destination back
            raise CheckpointError(f"cannot rename {tmp} to {dst}: {e}") from None
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(tmp, dst)
        except OSError as e:
            raise CheckpointError(f"cannot rename {tmp} to {dst}: {e}") from None


# ------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------

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
        A :class:`CheckpointReport` (per pair: site, layer, sigma_1 before/after; the tensor-check
        error; the forward-check deviation for small models).

    Raises:
        CheckpointError: missing/truncated/corrupted shards, NaN/inf weights, unwritable destination.
        FileExistsError: ``dst_dir`` exists and ``overwrite`` is False.
        AlreadyProtectedError, NoSitesError, PrecisionBudgetError, VerificationError.
    """
    start = time.perf_counter()
    cfg = cfg or SpecDefConfig()
    src, dst = Path(src_dir).absolute(), Path(dst_dir).absolute()
    _check_paths(src.resolve(), dst.parent.resolve() / dst.name, overwrite)
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
        tmp = _make_tmp(dst)
        try:
            notes += _copy_others(src, tmp, [ckpt] + ([fold.text_encoder] if fold else []))
            out_root = tmp / ckpt.root.relative_to(src) if ckpt.root != src else tmp
            streamer, own = _stream(ckpt, sp, out_root, cfg, dev, progress, verify, fold.denoiser_ops if fold else None)
            streamers, te_root = [streamer], None
            if fold:  # the text encoder: every tensor copied, its final norm with the pair's steps
                te_root = tmp / fold.text_encoder.root.relative_to(src)
                streamers.append(_stream(fold.text_encoder, StreamPlan([], [], [], {}, [], []), te_root, cfg, dev,
                                         progress, verify, fold.te_ops)[0])
            results = ([fold.result] if fold else []) + own
            _write_records(ckpt, out_root, fold, te_root, cfg, own, None, bool(sp.out_dtype))
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
            _write_records(ckpt, out_root, fold, te_root, cfg, own, deviation, bool(sp.out_dtype))
            _commit(tmp, dst, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
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
