"""``ShardStreamer``: the streaming pass over one checkpoint's shards -- decide, write, verify, in parallel.

Shards are written in parallel, one per thread (as many threads as cores, at most 4). The thread that
first reaches a tensor of an undecided component decides it, reading from whichever shards hold its
tensors (so a pair may span shards), and another thread that needs it waits for that decision. Deciding
reads only the producer blocks and records the steps (:class:`~hf_specdef.deformation.tensor_ops.TensorOp`) of every
tensor the pair touches. Writing copies each tensor from the memory-mapped source: tensors without steps
byte for byte, the others in row chunks with their steps applied on the way; each deformed tensor is
verified (:mod:`.tensor_checks`) right after it is written, while its bytes are still in cache.
"""

from __future__ import annotations

import math
import mmap
import threading
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import engine
from hf_specdef.deformation.engine import PairResult
from hf_specdef.deformation.tensor_ops import TensorOp, apply_ops, merge_axis_steps, row_chunks
from hf_specdef.protection.in_memory import VerificationError, require_inflated
from hf_specdef.protection.streaming.plan import StreamPlan
from hf_specdef.protection.streaming.resources import cpu_count, intra_op_threads, return_freed_memory
from hf_specdef.protection.streaming.tensor_checks import all_finite, check_tensor, sketch_columns, sketch_reference, uses_sketch
from hf_specdef.protection.streaming.writer import ShardWriter
from hf_specdef.sites import Pair, TensorBlock
from hf_specdef.storage.checkpoint import FLOAT_DTYPES, TORCH_TO_ST, Checkpoint, CheckpointError, drop_mapped_range, read_header
from hf_specdef.tensor_math import linalg

_CHUNK = 16 << 20  # bytes per write of an untouched tensor
_STEP_CHUNK = 2 << 20  # bytes per row chunk of a tensor whose steps are applied on the way (fits a core's L2 cache)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardStreamer:
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

                def where(name: str) -> str:
                    return f"{self.ckpt.infos[name].file}: "

                def stored(b: TensorBlock) -> torch.Tensor:
                    return self.ckpt.view(b.name).narrow(b.axis, b.start, b.stop - b.start)

                try:
                    m, s0, s1 = engine.build_deformation(plan, block, self.cfg, region=self._region)
                except RuntimeError:  # e.g. a decomposition failing on NaN/inf, or on values whose squares overflow
                    self._check_producers(plan.pair)
                    err = engine.overflow_error(plan, self._region, where, stored)
                    if err is None:
                        raise
                    raise err from None
                if not (math.isfinite(s0) and math.isfinite(s1)):
                    self._check_producers(plan.pair)
                    raise engine.overflow_error(plan, self._region, where, stored) or engine.not_finite_error(
                        plan, s0, s1, where(plan.pair.producers[0].name))
                del block
                for op in plan.variant.steps(plan, m):  # the steps in-memory protection applies, recorded
                    self.ops.setdefault(op.block.name, []).append(op)
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
        largest = float(self.ckpt.view(name).abs().max().float())
        dtype_name = str(dtype).removeprefix("torch.")
        fix = ("lower alpha or use precision='float32'" if dtype.itemsize < 4 else
               "trained weights are far smaller, so the tensor is likely corrupted: repair or re-export it, or leave "
               "its site out (SpecDefConfig(sites=...) / --sites)")
        raise CheckpointError(f"{self.ckpt.infos[name].file}: tensor {name!r} (values up to {largest:.3g}) overflows "
                              f"{dtype_name} once deformed (inf/NaN); {fix}.")

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
