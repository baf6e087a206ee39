"""Recorded deformation steps on one tensor, applied to any slice of it (no Hugging Face imports).

In-memory protection applies each pair's ``M`` to whole tensors at once. The streaming path instead
*records* the steps of every tensor (:class:`TensorOp`) and applies them later, one row chunk at a
time, while the tensor is copied from the source shard to the output shard: nothing is held but a
chunk. A step acts along one axis of the tensor, on the block ``[start, stop)`` of that axis:

* a step along *another* axis than the slice's acts on each index of the slice independently, so
  it applies to the slice as it is;
* a step along the slice's own axis applies to the part of its block inside the slice: an axis step
  (a diagonal ``M``) row by row, so a block may be cut anywhere; a spectral step (a dense ``M``) only
  when its whole block lies inside the slice (:func:`row_chunks` never cuts one).

Applied in the recorded order with the same :mod:`linalg` kernels, the slices come out identical to
the in-memory result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from hf_specdef.sites.base import TensorBlock
from hf_specdef.tensor_math import linalg
from hf_specdef.tensor_math.linalg import Deformation


@dataclass(frozen=True)
class TensorOp:
    """One step on one tensor: the ``producer`` side of a pair gets ``M``, the consumer side ``M^-1``."""

    block: TensorBlock
    m: Deformation
    producer: bool

    @property
    def spectral(self) -> bool:
        return not self.m.is_axis

    def apply_to_slice(self, piece: torch.Tensor, axis: int, begin: int, end: int, inverse: bool = False) -> None:
        """Apply the step in place to ``piece`` = the tensor's indices ``[begin, end)`` along ``axis``."""
        b = self.block
        fn = linalg.apply_producer if self.producer else linalg.apply_consumer
        if b.axis != axis:
            fn(piece, b.axis, b.start, b.stop, self.m, inverse, b.offset)
            return
        lo, hi = max(b.start, begin), min(b.stop, end)
        if lo >= hi:
            return  # the block lies outside this slice
        if lo == b.start and hi == b.stop:
            fn(piece, axis, b.start - begin, b.stop - begin, self.m, inverse, b.offset)
            return
        if self.spectral:
            raise ValueError(f"a slice [{begin}, {end}) cuts the spectral block [{b.start}, {b.stop}) of {b.name!r}")
        idx = self.m.indices
        keep = idx[(idx >= lo - b.start) & (idx < hi - b.start)] - (lo - b.start)
        if keep.numel():
            part = Deformation(hi - lo, self.m.factor, indices=keep)
            fn(piece, axis, lo - begin, hi - begin, part, inverse, b.offset)


def apply_ops(piece: torch.Tensor, ops: Sequence[TensorOp], axis: int = 0, begin: int = 0, end: int | None = None,
              inverse: bool = False) -> None:
    """Apply ``ops`` in order (their inverses last first, with ``inverse``) to a slice of their tensor."""
    end = piece.shape[axis] if end is None else end
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
