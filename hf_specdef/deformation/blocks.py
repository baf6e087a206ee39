"""The matrices a pair's deformation is decided on, and their sigma_1 (no Hugging Face imports)."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

import torch

from hf_specdef.sites.base import Pair, TensorBlock
from hf_specdef.tensor_math import linalg

Tensors = MutableMapping[str, torch.Tensor]
Region = Callable[[TensorBlock], torch.Tensor]

EXACT_SIDE = 256  # blocks whose short side is at most this get an exact sigma_1 in the report


def producer_block(pair: Pair, tensors: Tensors, region: Region | None = None) -> torch.Tensor:
    """The ``d x n`` matrix whose spectrum the pair deforms: its weight producers side by side.

    1-D producers (norm weights) are used only when there is no weight matrix. With a single producer the result
    may be a view of the weight (no copy): read it, do not modify it. A block with an ``offset`` (Gemma's norm
    weight ``w`` in ``x_hat * (1 + w)``) contributes ``offset + w``, the values ``M`` scales.

    Args:
        pair: the pair.
        tensors: ``name -> tensor`` (may be empty when ``region`` is given).
        region: gives the slice of one producer (default: ``tensors[b.name]`` narrowed to the block); the
            streaming path passes one that reads the slice from a checkpoint.

    Returns:
        The ``d x n`` block (``d`` = the pair's size).
    """
    if region is None:
        def region(b: TensorBlock) -> torch.Tensor:
            return tensors[b.name].narrow(b.axis, b.start, b.stop - b.start)
    regions = [(b, _with_offset(region(b), b.offset)) for b in pair.producers]
    mats = [(b, r) for b, r in regions if r.dim() >= 2] or regions
    parts = [linalg.as_rows(r, b.axis) for b, r in mats]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p.to(parts[0].device) for p in parts], dim=1)


def _with_offset(t: torch.Tensor, offset: float) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32)) + offset if offset else t


def spectrum_block(pair: Pair, tensors: Tensors, factor: float) -> torch.Tensor:
    """The block whose spectrum a deformation with ``factor`` inflates.

    Args:
        pair: the pair.
        tensors: ``name -> tensor``.
        factor: the deformation's factor: ``>= 1`` gives the producers' block, ``< 1`` (an inverted pair: producer
            shrunk, consumers' channels grown) the consumers' weight matrices, rows along the pair axis.

    Raises:
        ValueError: an inverted pair without a weight-matrix consumer.
    """
    if factor >= 1:
        return producer_block(pair, tensors)
    parts = [linalg.as_rows(tensors[b.name].narrow(b.axis, b.start, b.stop - b.start), b.axis)
             for b in pair.consumers if tensors[b.name].dim() >= 2]
    if not parts:
        raise ValueError(f"pair {pair.key}: an inverted deformation needs a weight-matrix consumer.")
    return torch.cat([p.to(parts[0].device) for p in parts], dim=1)


def sigma_max(block: torch.Tensor, iters: int = 4) -> float:
    """Largest singular value of a block, for the report.

    Args:
        block: a 2-D tensor.
        iters: power iterations for a large block.

    Returns:
        sigma_1, exact (to float32) when the short side is <= 256, else after ``iters`` float32 power iterations
        warm-started at the largest row (a lower bound, close for the weight blocks here).
    """
    if min(block.shape) <= EXACT_SIDE:  # eigenvalues of the small float32 Gram matrix (relative error ~1e-7)
        a = block.to(torch.promote_types(block.dtype, torch.float32))
        gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
        return float(linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())
    a = block.float()
    v = a[a.norm(dim=1).argmax()].clone()
    for _ in range(iters):
        v = a.T @ (a @ v)
        v = v / v.norm().clamp_min(torch.finfo(a.dtype).tiny)
    return float((a @ v).norm())
