"""Recorded steps applied chunk by chunk give exactly the whole-tensor result (the streaming path relies on it)."""

from __future__ import annotations

import pytest
import torch

from hf_specdef.deformation.tensor_ops import TensorOp, apply_ops, merge_axis_steps, row_chunks
from hf_specdef.sites.base import TensorBlock
from hf_specdef.tensor_math import linalg
from hf_specdef.tensor_math.linalg import Deformation


def _spectral(d: int, seed: int, factor: float = 1000.0) -> Deformation:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, 2, dtype=torch.float64, generator=g)).Q
    return Deformation(d, factor, basis=u)


def _axis(d: int, idx: list[int], factor: float = 1000.0) -> Deformation:
    return Deformation(d, factor, indices=torch.tensor(idx))


def _ops(name: str = "w") -> list[TensorOp]:
    """A mix like a Llama q/v/o weight gets: a column step, per-head row steps (axis and spectral), column blocks."""
    return [
        TensorOp(TensorBlock(name, 1, 0, 48), _axis(48, [5]), producer=False),
        TensorOp(TensorBlock(name, 0, 0, 16), _axis(16, [1, 9]), producer=True),
        TensorOp(TensorBlock(name, 0, 16, 32), _axis(16, [0, 8]), producer=True),
        TensorOp(TensorBlock(name, 0, 32, 48), _spectral(16, 1), producer=True),
        TensorOp(TensorBlock(name, 1, 16, 32), _spectral(16, 2), producer=False),
        TensorOp(TensorBlock(name, 0, 48, 64), _axis(16, [3]), producer=False),
    ]


def _whole(t: torch.Tensor, ops: list[TensorOp]) -> torch.Tensor:
    """The in-memory way: each step on the whole tensor with the linalg kernels."""
    out = t.clone()
    for op in ops:
        fn = linalg.apply_producer if op.producer else linalg.apply_consumer
        fn(out, op.block.axis, op.block.start, op.block.stop, op.m)
    return out


@pytest.mark.parametrize("target_rows", [1, 5, 16, 23, 64])
def test_chunks_equal_whole_tensor(target_rows):
    t = torch.randn(64, 48)
    ops = _ops()
    expected = _whole(t, ops)
    out = torch.empty_like(t)
    chunks = list(row_chunks(64, ops, target_rows))
    assert chunks[0][0] == 0 and chunks[-1][1] == 64 and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
    for begin, end in chunks:
        assert begin >= 48 or end <= 32 or (begin <= 32 and end >= 48)  # the spectral row block [32, 48) is never cut
        piece = t[begin:end].clone()
        apply_ops(piece, ops, 0, begin, end)
        out[begin:end] = piece
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    assert not torch.equal(out, t)


def test_cutting_a_spectral_block_is_refused():
    op = _ops()[3]
    with pytest.raises(ValueError, match="cuts the spectral block"):
        op.apply_to_slice(torch.randn(8, 48), 0, 36, 44)


def test_inverse_undoes_and_merge_keeps_the_result():
    t = torch.randn(64, 48, dtype=torch.float64)
    ops = _ops()
    merged = merge_axis_steps(ops)
    assert len(merged) == len(ops) - 1  # the two per-head axis row steps became one
    assert merged[1].block == TensorBlock("w", 0, 0, 32) and merged[1].m.indices.tolist() == [1, 9, 16, 24]
    a, b = t.clone(), t.clone()
    apply_ops(a, ops)
    apply_ops(b, merged)
    assert torch.equal(a, b)
    apply_ops(a, ops, inverse=True)
    torch.testing.assert_close(a, t, rtol=1e-9, atol=1e-9)  # float64, alpha=1000


def test_column_block_step_on_a_non_contiguous_float64_view():
    """The column-block kernel must write back even when the tensor is float64 and its rows do not merge into a view."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 6, 10, dtype=torch.float64, generator=g)[:, :3, :]  # (3, 3, 10), strides (60, 10, 1)
    m = _spectral(4, 3, factor=10.0)
    expected = t.clone()
    expected[..., 2:6] = expected[..., 2:6] @ m.dense(inverse=True)
    linalg.apply_consumer(t, 2, 2, 6, m)
    torch.testing.assert_close(t, expected, rtol=1e-12, atol=1e-12)


def test_offset_blocks_scale_offset_plus_w_and_are_merged_only_with_their_offset():
    """A Gemma norm weight w acts as 1 + w: an axis step stores alpha (1 + w) - 1, on whole tensors and on slices."""
    w = torch.randn(8, dtype=torch.float64)
    m = Deformation(4, 4.0, indices=torch.tensor([1]))
    ops = [TensorOp(TensorBlock("w", 0, 0, 4, 1.0), m, True), TensorOp(TensorBlock("w", 0, 4, 8, 1.0), m, True)]
    merged = merge_axis_steps(ops)
    assert len(merged) == 1 and merged[0].block.offset == 1.0
    assert len(merge_axis_steps([ops[0], TensorOp(TensorBlock("w", 0, 4, 8), m, True)])) == 2
    whole, sliced = w.clone(), w.clone()
    apply_ops(whole, merged)
    apply_ops(sliced[:5], ops, 0, 0, 5)
    apply_ops(sliced[5:], ops, 0, 5, 8)
    expected = w.clone()
    expected[[1, 5]] = 4.0 * (1.0 + w[[1, 5]]) - 1.0
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(sliced, expected)
