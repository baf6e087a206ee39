"""Deformation steps on tensors -- the one representation every path applies (no Hugging Face imports).

A pair's variant (:mod:`hf_specdef.deformation.variants`) turns its ``M`` into steps (:class:`TensorOp`): ``M`` on
each producer block, ``M^-1`` on each consumer block. In-memory protection applies the steps of a tensor at once
(:func:`apply_steps`: one pair's steps, or a whole wave's in the batched path, with the same kernels); the streaming
path *records* them and applies them later, one row chunk at a time, while the tensor is copied from the source
shard to the output shard (:func:`apply_ops`). A step acts along one axis of the tensor, on the block
``[start, stop)`` of that axis:

* a step along *another* axis than the slice's acts on each index of the slice independently, so it applies to
  the slice as it is;
* a step along the slice's own axis applies to the part of its block inside the slice: an axis step (a diagonal
  ``M``) row by row, so a block may be cut anywhere; a spectral step (a dense ``M``) only when its whole block lies
  inside the slice (:func:`row_chunks` never cuts one).

The kernels copy the blocks of a run of spectral steps once to float64 (float32 where the device has no float64) and
update each block with its own matrix product (a batched product may round a block differently with the batch
size); axis steps are one gather-scale-scatter per run; the steps on every entry keep their recorded order. So one
pair's steps and a wave's steps give the same bits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from hf_specdef.sites.base import TensorBlock
from hf_specdef.tensor_math import linalg
from hf_specdef.tensor_math.linalg import Deformation

__all__ = ["TensorOp", "apply_ops", "apply_steps", "merge_axis_steps", "overlap", "row_chunks"]


@dataclass(frozen=True)
class TensorOp:
    """One step on one tensor: the ``producer`` side of a pair gets ``M``, the consumer side ``M^-1``.

    Args:
        block: the rows/columns ``[start, stop)`` along ``axis`` of tensor ``name`` the step acts on.
        m: the pair's deformation.
        producer: ``True`` for ``X <- M X``, ``False`` for ``X <- X M^-1``.
    """

    block: TensorBlock
    m: Deformation
    producer: bool

    @property
    def spectral(self) -> bool:
        """Whether ``M`` is dense (spectral mode) rather than diagonal (axis mode)."""
        return not self.m.is_axis

    def gain(self, inverse: bool = False) -> float:
        """The factor the step multiplies its deformed directions by (``M``'s for a producer, ``M^-1``'s for a
        consumer; the inverse step's with ``inverse``)."""
        g = self.m.factor if self.producer else 1.0 / self.m.factor
        return 1.0 / g if inverse else g

    def apply_to_slice(self, piece: torch.Tensor, axis: int, begin: int, end: int, inverse: bool = False) -> None:
        """Apply the step in place to ``piece``, the tensor's indices ``[begin, end)`` along ``axis``.

        Raises:
            ValueError: the slice cuts the block of a spectral step along its axis.
        """
        b = self.block
        if b.axis != axis:
            apply_steps(piece, [self], inverse)
            return
        lo, hi = max(b.start, begin), min(b.stop, end)
        if lo >= hi:
            return  # the block lies outside this slice
        if lo == b.start and hi == b.stop:
            apply_steps(piece, [TensorOp(TensorBlock(b.name, axis, lo - begin, hi - begin, b.offset), self.m,
                                         self.producer)], inverse)
            return
        if self.spectral:
            raise ValueError(f"a slice [{begin}, {end}) cuts the spectral block [{b.start}, {b.stop}) of {b.name!r}")
        idx = self.m.indices
        keep = idx[(idx >= lo - b.start) & (idx < hi - b.start)] - (lo - b.start)
        if keep.numel():
            part = Deformation(hi - lo, self.m.factor, indices=keep)
            apply_steps(piece, [TensorOp(TensorBlock(b.name, axis, lo - begin, hi - begin, b.offset), part,
                                         self.producer)], inverse)


def overlap(a: TensorBlock, b: TensorBlock) -> bool:
    """Whether two blocks share entries: same tensor, and other axes (a row block meets every column block) or
    overlapping ranges of one axis."""
    return a.name == b.name and (a.axis != b.axis or (a.start < b.stop and b.start < a.stop))


def _joins(run: list[TensorOp], s: TensorOp) -> bool:
    first = run[0]
    return (first.block.axis == s.block.axis and first.spectral == s.spectral and first.block.offset == s.block.offset
            and (not s.spectral or first.block.stop - first.block.start == s.block.stop - s.block.start)
            and not any(overlap(o.block, s.block) for o in run))


def runs(ops: Sequence[TensorOp]) -> list[list[TensorOp]]:
    """``ops`` of one tensor grouped into runs that one batched operation can do (same axis, kind and offset,
    disjoint blocks, for spectral steps the same block size), in an order that keeps, for every entry, the
    order of the steps that touch it: a step joins the latest run it fits only past runs it shares no entry with."""
    out: list[list[TensorOp]] = []
    for s in ops:
        for run in reversed(out):
            if _joins(run, s):
                run.append(s)
                break
            if any(overlap(o.block, s.block) for o in run):
                out.append([s])
                break
        else:
            out.append([s])
    return out


def _apply_axis(t: torch.Tensor, run: list[TensorOp], inverse: bool) -> None:
    axis, offset = run[0].block.axis, run[0].block.offset
    idx = torch.cat([s.m.indices.to(t.device) + s.block.start for s in run])
    gains = torch.tensor([s.gain(inverse) for s in run for _ in range(s.m.indices.numel())], dtype=torch.float64)
    dt = linalg.compute_dtype(t.device)
    shape = [1] * t.dim()
    shape[axis] = -1
    g = gains.to(t.device, dt).view(shape)
    x = t.index_select(axis, idx).to(dt)
    t.index_copy_(axis, idx, ((x + offset) * g - offset if offset else x * g).to(t.dtype))


def _regular(run: list[TensorOp]) -> bool:
    """Whether the blocks of a run tile one range in order of their starts (then one view covers them)."""
    size = run[0].block.stop - run[0].block.start
    starts = sorted(s.block.start for s in run)
    return all(b - a == size for a, b in zip(starts, starts[1:], strict=False))


def _update(t: torch.Tensor, axis: int, start: int, count: int, size: int, u: torch.Tensor, gain: torch.Tensor,
            dt: torch.dtype) -> None:
    """``Y <- Y + (g - 1) U U^T Y`` on ``count`` consecutive blocks of ``size`` rows along ``axis`` from ``start``."""
    split = t.narrow(axis, start, size * count).unflatten(axis, (count, size))
    y = split.movedim((axis, axis + 1), (0, 1)).to(dt, copy=True, memory_format=torch.contiguous_format)
    y2 = y.view(count, size, -1)
    for i in range(count):  # one product per block (not one bmm): the same bits in a batch of any size
        y2[i].addmm_(u[i] * gain[i], u[i].mT @ y2[i])
    split.copy_(y.movedim((0, 1), (axis, axis + 1)))


def _apply_spectral(t: torch.Tensor, run: list[TensorOp], inverse: bool) -> None:
    axis, size = run[0].block.axis, run[0].block.stop - run[0].block.start
    if run[0].block.offset:
        raise ValueError(f"a spectral deformation cannot act on an offset block (offset={run[0].block.offset:g}); "
                         "use an axis one.")
    dt = linalg.compute_dtype(t.device)
    run = sorted(run, key=lambda s: s.block.start)
    u = torch.stack([s.m.basis for s in run]).to(t.device, dt)  # (B, d, k)
    gain = torch.tensor([s.gain(inverse) - 1.0 for s in run], dtype=dt).to(t.device)[:, None, None]
    if _regular(run):  # one view (..., B, d, ...) -> (B, d, rest): copied once, written back once
        _update(t, axis, run[0].block.start, len(run), size, u, gain, dt)
        return
    for i, s in enumerate(run):  # blocks spread out: the same update, one block at a time
        _update(t, axis, s.block.start, 1, size, u[i:i + 1], gain[i:i + 1], dt)


def apply_steps(t: torch.Tensor, ops: Sequence[TensorOp], inverse: bool = False) -> None:
    """Apply the steps of one tensor in place, in order (their inverses last first, with ``inverse``).

    The per-pair and the batched in-memory paths and the streaming path all apply steps through this function, so
    a tensor gets the same bits whichever path deforms it.

    Args:
        t: the tensor (or a slice of it whose indices the blocks of ``ops`` already refer to).
        ops: its steps, in the order the pairs were decided.
        inverse: undo the steps instead.
    """
    ordered = list(reversed(ops)) if inverse else list(ops)
    for run in runs(ordered):
        (_apply_spectral if run[0].spectral else _apply_axis)(t, run, inverse)


def steps_by_tensor(ops: Sequence[TensorOp]) -> dict[str, list[TensorOp]]:
    """``ops`` grouped by tensor name, in order."""
    out: dict[str, list[TensorOp]] = defaultdict(list)
    for op in ops:
        out[op.block.name].append(op)
    return out


def apply_ops(piece: torch.Tensor, ops: Sequence[TensorOp], axis: int = 0, begin: int = 0, end: int | None = None,
              inverse: bool = False) -> None:
    """Apply ``ops`` in order (their inverses last first, with ``inverse``) to a slice of their tensor.

    Args:
        piece: the slice, indices ``[begin, end)`` of the tensor along ``axis``.
        ops: the tensor's steps.
        axis, begin, end: where ``piece`` lies in the tensor (default: the whole tensor).
        inverse: undo the steps instead.
    """
    end = piece.shape[axis] if end is None else end
    if begin == 0 and end == piece.shape[axis] and all(op.block.stop <= end for op in ops if op.block.axis == axis):
        apply_steps(piece, ops, inverse)  # the whole tensor (or every block inside the slice): one pass
        return
    for op in (reversed(ops) if inverse else ops):
        op.apply_to_slice(piece, axis, begin, end, inverse)


def merge_axis_steps(ops: Sequence[TensorOp]) -> list[TensorOp]:
    """``ops`` with each run of consecutive axis steps of the same side, axis and factor on disjoint blocks merged
    into one step (e.g. the per-head steps of an ``attn.qk`` site): the same scaling of the same entries, in
    the same order relative to every other step, but one call instead of one per head."""
    merged: list[TensorOp] = []
    for op in ops:
        prev = merged[-1] if merged else None
        if (prev is not None and not op.spectral and not prev.spectral and prev.producer == op.producer
                and prev.block.axis == op.block.axis and prev.m.factor == op.m.factor
                and prev.block.offset == op.block.offset
                and (op.block.start >= prev.block.stop or op.block.stop <= prev.block.start)):
            start, stop = min(prev.block.start, op.block.start), max(prev.block.stop, op.block.stop)
            idx = torch.cat([prev.m.indices + (prev.block.start - start), op.m.indices.to(prev.m.indices.device)
                             + (op.block.start - start)])
            block = TensorBlock(op.block.name, op.block.axis, start, stop, op.block.offset)
            merged[-1] = TensorOp(block, Deformation(stop - start, op.m.factor, indices=torch.sort(idx).values), op.producer)
        else:
            merged.append(op)
    return merged


def row_chunks(rows: int, ops: Sequence[TensorOp], target_rows: int) -> Iterator[tuple[int, int]]:
    """Split ``[0, rows)`` into ranges of about ``target_rows`` rows that never cut a spectral block on axis 0."""
    spans = [(op.block.start, op.block.stop) for op in ops if op.block.axis == 0 and op.spectral]
    begin = 0
    while begin < rows:
        end, grown = min(rows, begin + max(1, target_rows)), True
        while grown:  # extend past every spectral block the cut would fall into
            grown = False
            for s, e in spans:
                if s < end < e:
                    end, grown = e, True
        yield begin, end
        begin = end
