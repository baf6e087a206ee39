"""Checks of one written tensor against its source: the recorded steps undone must give the source back.

Small or non-2-D tensors are undone in full in float64; large matrices are compared on a random
Gaussian sketch (``T X`` from the source, ``L^-1 T' R^-1 X`` from the written tensor), so that a check
is one pass over the written tensor with no copies. Also :func:`all_finite`, the NaN/inf scan of source and
deformed chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hf_specdef.deformation.tensor_ops import TensorOp, apply_ops
from hf_specdef.tensor_math import linalg

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


def all_finite(t: torch.Tensor) -> bool:
    """True when no entry is NaN or inf. A sum is checked first (one fast pass); only when it is not
    finite (NaN/inf, or an overflow of a finite sum) is every entry checked."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())
