"""Pure tensor math of SpecDef (no Hugging Face imports).

A deformation is ``M = I + U diag(f - 1) U^T`` on a ``d``-dimensional block, with ``U`` orthonormal
(``d x k``). Spectral mode takes ``U`` = the top-k left singular vectors of the producer block; axis
mode takes ``U`` = k coordinate axes, stored as ``indices`` and applied by exact scaling. ``M`` is
symmetric, so ``M^-T = M^-1 = I + U diag(1/f - 1) U^T``.

A *producer* tensor gets ``X <- M X`` along one axis; a *consumer* tensor gets ``X <- X M^-1`` along
one axis (for a torch ``Linear`` consumer that is the input axis 1). Work is done in float64 (float32
where the device has no float64) on the tensor's own device and cast back.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

# Gram-matrix eigendecomposition is exact and cheap when the short side is at most this.
_GRAM_LIMIT = 1024


@dataclass
class Deformation:
    """``M = I + U diag(factor - 1) U^T`` on a block of size ``size``.

    Exactly one of ``basis`` (``size x k``, orthonormal columns; spectral) and ``indices``
    (``k`` coordinate indices; axis) is set.
    """

    size: int
    factor: float
    basis: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.basis.shape[1]) if self.basis is not None else int(self.indices.numel())

    @property
    def is_axis(self) -> bool:
        return self.indices is not None

    def dense(self, inverse: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``size x size`` matrix ``M`` (or ``M^-1``); for tests and small blocks only."""
        f = 1.0 / self.factor if inverse else self.factor
        if self.is_axis:
            diag = torch.ones(self.size, dtype=dtype, device=self.indices.device)
            diag[self.indices] = f
            return torch.diag(diag)
        u = self.basis.to(dtype)
        return torch.eye(self.size, dtype=dtype, device=u.device) + (f - 1.0) * u @ u.T

    def to_record(self) -> dict:
        """JSON-able form (for the ``full`` protection record)."""
        if self.is_axis:
            return {"factor": self.factor, "indices": self.indices.tolist()}
        return {"factor": self.factor, "basis": self.basis.T.tolist()}

    @classmethod
    def from_record(cls, size: int, record: dict, device: torch.device | str | None = None) -> Deformation:
        if "indices" in record:
            return cls(size, record["factor"], indices=torch.tensor(record["indices"], dtype=torch.long, device=device))
        basis = torch.tensor(record["basis"], dtype=torch.float64, device=device).T
        return cls(size, record["factor"], basis=basis)


def compute_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device supports it (MPS does not), else float32."""
    return torch.float32 if device.type == "mps" else torch.float64


_SOLVERS_LOADED: set[str] = set()
_SOLVERS_LOCK = threading.Lock()


def load_solvers(device: torch.device | str) -> None:
    """Load the ``torch.linalg`` backend of an accelerator now, from the calling thread (once per device type).

    PyTorch loads its CUDA solvers lazily on the first ``torch.linalg`` call, and that first call is not
    thread-safe: two threads making it at once fail with "lazy wrapper should be called at most once"
    (pytorch/pytorch#90613). Call this before starting threads that use ``torch.linalg`` on ``device``.
    """
    device = torch.device(device)
    if device.type == "cpu":  # LAPACK is linked in, nothing is loaded lazily (and its first call is thread-safe)
        return
    with _SOLVERS_LOCK:
        if device.type in _SOLVERS_LOADED:
            return
        torch.linalg.eigvalsh(torch.eye(2, device=device, dtype=torch.float32))
        _SOLVERS_LOADED.add(device.type)


# Symmetric eigenproblems up to this side go to the CPU when the matrix sits on an accelerator. On an H200,
# torch.linalg.eigh/eigvalsh of the 64 x 64 Gram matrices of a 125M Llama took ~0.8 ms of host time per call
# (cuSOLVER's many small launches and its result check; 40% of in-memory protect's time, torch.profiler). LAPACK
# on one core of a shared VM takes 0.29 ms at 64, 1.2 ms at 128 and 5.4 ms at 256 (float64 eigh): it wins only
# on the small side.
_HOST_EIG_SIDE = 96


def _on_host(a: torch.Tensor) -> bool:
    """Whether the symmetric eigenproblem ``a`` (on an accelerator, and small) is better solved on the CPU."""
    return a.device.type != "cpu" and a.shape[-1] <= _HOST_EIG_SIDE


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a (batch of) symmetric matrix, solved on the CPU when small (see
    ``_HOST_EIG_SIDE``); the results are on ``a``'s device."""
    if not _on_host(a):
        return torch.linalg.eigh(a)
    w, v = torch.linalg.eigh(a.cpu())
    return w.to(a.device), v.to(a.device)


def eigvalsh(a: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.eigvalsh``, solved on the CPU when small (see :func:`eigh`); ascending, on ``a``'s device."""
    if not _on_host(a):
        return torch.linalg.eigvalsh(a)
    return torch.linalg.eigvalsh(a.cpu()).to(a.device)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u = eps / 2`` of a floating dtype."""
    return torch.finfo(dtype).eps / 2


def is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(float(x))[0] == 0.5


def nearest_power_of_two(x: float) -> float:
    return float(2.0 ** round(math.log2(x)))


def as_rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    """View ``t`` as a 2-D matrix whose rows run along ``axis`` (1-D tensors become a column)."""
    if t.dim() == 1:
        return t.unsqueeze(1)
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def top_left_singular(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` left singular vectors (``d x k``) and values of ``block`` (``d x n``), float64/32.

    No full SVD: for a short side up to 1024 the ``d x d`` Gram matrix is eigendecomposed
    (O(d^2 n)); otherwise ``torch.svd_lowrank`` is used (O(k d n)).
    """
    dt = compute_dtype(block.device)
    a = block.to(dt)
    d, n = a.shape
    if k > min(d, n):
        raise ValueError(f"top_k={k} exceeds the block size {tuple(a.shape)}; choose top_k <= {min(d, n)}.")
    if d <= _GRAM_LIMIT:
        evals, evecs = eigh(a @ a.T)
        order = torch.argsort(evals, descending=True)[:k]
        return evecs[:, order], evals[order].clamp_min(0).sqrt()
    if n <= _GRAM_LIMIT:
        evals, evecs = eigh(a.T @ a)
        order = torch.argsort(evals, descending=True)[:k]
        s = evals[order].clamp_min(0).sqrt()
        u = (a @ evecs[:, order]) / s.clamp_min(torch.finfo(dt).tiny)
        return u, s
    u, s, _ = torch.svd_lowrank(a, q=min(k + 10, d, n), niter=6)
    return u[:, :k], s[:k]


def gram_of_short_side(matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``A A^T`` or ``A^T A`` of a 2-D tensor, whichever is smaller, computed in ``dtype``."""
    a = matrix.to(dtype)
    return a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a


def top_singular_values(matrix: torch.Tensor, k: int, rtol: float | None = None) -> torch.Tensor:
    """Top-``k`` singular values of a 2-D tensor, descending (float64, or float32 where the device has no float64).

    No SVD and no eigenvectors: the eigenvalues of the Gram matrix of the short side (``d x d``, O(d^2 n) to
    form, one symmetric eigenvalue solve). With ``rtol=None`` everything is computed in float64. With
    ``rtol``, the Gram product and the solve are first done in float32 (about three times faster); the
    result is kept when its estimated relative error ``sqrt(d) u32 sigma_1^2 / sigma_k^2`` (u32 the float32
    unit roundoff: the solver's backward error on the Gram matrix, relative to ``sigma_k^2``) is at most
    ``rtol``, and recomputed in float64 otherwise -- which a deformed matrix, with ``sigma_1 / sigma_k``
    near alpha, always is.
    """
    k = min(k, min(matrix.shape))
    dt = compute_dtype(matrix.device)
    if k <= 0:
        return torch.zeros(0, dtype=dt, device=matrix.device)
    if rtol is not None and dt != torch.float32:
        g = gram_of_short_side(matrix, torch.float32)
        lam = eigvalsh(g).flip(0)[:k].to(dt)
        if bool(lam[-1] > 0) and math.sqrt(g.shape[0]) * unit_roundoff(torch.float32) * float(lam[0] / lam[-1]) <= rtol:
            return lam.sqrt()
    return eigvalsh(gram_of_short_side(matrix, dt)).flip(0)[:k].clamp_min(0).sqrt()


def _check_layout(d: int, rotary: str) -> None:
    if rotary not in ("half", "adjacent"):
        raise ValueError(f"unknown rotary layout {rotary!r}; use 'half' or 'adjacent'.")
    if d % 2:
        raise ValueError(f"rotary pairing needs an even head dim, got {d}.")


def pair_halves(x: torch.Tensor, rotary: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two dims of every rotary pair of a ``d``-vector ``x``, as two views of length ``d/2`` (pair ``j`` at ``j``).
    Layouts: ``"half"``: pair ``j`` is ``(j, j + d/2)`` (Llama's ``rotate_half``); ``"adjacent"``: ``(2j, 2j + 1)``
    (Flux, GPT-J)."""
    d = x.numel()
    _check_layout(d, rotary)
    return (x[: d // 2], x[d // 2:]) if rotary == "half" else (x[0::2], x[1::2])


def pair_scores(scores: torch.Tensor, rotary: str) -> torch.Tensor:
    """Per rotary pair (see :func:`pair_halves`), the sum of the per-dim ``scores`` of its two dims."""
    first, second = pair_halves(scores, rotary)
    return first + second


def pair_indices(pairs: torch.Tensor, d: int, rotary: str) -> torch.Tensor:
    """The ``2k`` dims (sorted) of the rotary pairs numbered ``pairs`` (as in :func:`pair_halves`) of a ``d``-dim block."""
    _check_layout(d, rotary)
    dims = torch.cat([pairs, pairs + d // 2]) if rotary == "half" else torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()
    return torch.sort(dims).values


def top_rows(block: torch.Tensor, k: int, rotary: str = "") -> torch.Tensor:
    """Indices of the ``k`` rows of largest norm; with a ``rotary`` layout (``"half"`` / ``"adjacent"``, see
    :func:`pair_halves`), of the ``k`` rotary pairs of largest joint norm, returned as the ``2k`` row indices."""
    # accumulated in float32 (float64 for float64 weights): a ranking needs no more, and it is ten times faster
    norms = torch.linalg.vector_norm(block, dim=1, dtype=torch.promote_types(block.dtype, torch.float32)).pow(2)
    d = norms.numel()
    if rotary:
        pair = pair_scores(norms, rotary)
        if k > d // 2:
            raise ValueError(f"top_k={k} exceeds the {d // 2} rotary pairs of a head; choose top_k <= {d // 2}.")
        return pair_indices(torch.argsort(pair, descending=True, stable=True)[:k], d, rotary)
    if k > d:
        raise ValueError(f"top_k={k} exceeds the block size {d}; choose top_k <= {d}.")
    return torch.sort(torch.argsort(norms, descending=True, stable=True)[:k]).values


def spectral_deformation(block: torch.Tensor, k: int, alpha: float) -> Deformation:
    """Deformation that multiplies the top-k singular values of ``block`` by ``alpha``."""
    u, _ = top_left_singular(block, k)
    return Deformation(size=block.shape[0], factor=float(alpha), basis=u)


def axis_deformation(block: torch.Tensor, k: int, alpha: float, rotary: str = "") -> Deformation:
    """Deformation that scales the ``k`` largest rows (or rotary pairs, see :func:`top_rows`) of ``block`` by ``alpha``."""
    return Deformation(size=block.shape[0], factor=float(alpha), indices=top_rows(block, k, rotary))


def _apply(t: torch.Tensor, axis: int, start: int, stop: int, m: Deformation, side: str, inverse: bool,
           offset: float = 0.0) -> None:
    """In place: ``X <- M X`` (side='left') or ``X <- X M^-1`` (side='right') on ``t[start:stop]`` along ``axis``;
    with ``offset``, on ``offset + X`` (``X <- M (offset + X) - offset``; axis deformations only)."""
    f = m.factor
    f = (1.0 / f if side == "right" else f) if not inverse else (f if side == "right" else 1.0 / f)
    view = t.narrow(axis, start, stop - start)
    if m.is_axis:  # scale the k rows/columns (one gather and one scatter: O(k lines))
        idx = m.indices.to(t.device)
        x = view.index_select(axis, idx).to(compute_dtype(t.device))
        view.index_copy_(axis, idx, ((x + offset) * f - offset if offset else x * f).to(t.dtype))
        return
    if offset:
        raise ValueError(f"a spectral deformation cannot act on an offset block (offset={offset:g}); use an axis one.")
    dt = compute_dtype(t.device)
    u = m.basis.to(device=t.device, dtype=dt)
    if axis == t.dim() - 1 and t.dim() > 1:  # a block of columns: rows stay contiguous, X <- X + (f - 1) (X U) U^T
        x = view.reshape(-1, view.shape[-1]).to(dt, copy=True)  # always a copy: updated, then written back
        x.addmm_(x @ u, u.T, alpha=f - 1.0)
        view.copy_(x.reshape(view.shape))
        return
    x = view.movedim(axis, 0).to(dt, copy=True, memory_format=torch.contiguous_format)  # (d, ...): updated, written back
    x2 = x.view(x.shape[0], -1)
    x2.addmm_(u, u.T @ x2, alpha=f - 1.0)  # X <- X + (f - 1) U (U^T X)
    view.copy_(x.movedim(0, axis))


def apply_producer(t: torch.Tensor, axis: int, start: int, stop: int, m: Deformation, inverse: bool = False,
                   offset: float = 0.0) -> None:
    """In place ``P <- M P`` on the block ``t[start:stop]`` along ``axis`` (``M^-1 P`` if ``inverse``); with
    ``offset`` the block stands for ``offset + P`` (see :func:`_apply`)."""
    _apply(t, axis, start, stop, m, "left", inverse, offset)


def apply_consumer(t: torch.Tensor, axis: int, start: int, stop: int, m: Deformation, inverse: bool = False,
                   offset: float = 0.0) -> None:
    """In place ``C <- C M^-1`` on the block ``t[start:stop]`` along ``axis`` (``C M`` if ``inverse``; ``offset``
    as for :func:`apply_producer`).

    For a consumer whose block axis is its *row* axis (the key of an ``attn.qk`` pair) this is
    ``K <- M^-T K``, which is what keeps ``q^T k`` unchanged.
    """
    _apply(t, axis, start, stop, m, "right", inverse, offset)


def spectral_budget(mode_is_axis: bool, alpha: float, dtype: torch.dtype) -> float:
    """Expected relative output error of storing a deformation in ``dtype`` (see docs/design.md).

    Spectral: ~ alpha * u (rounding of the consumer's other directions is amplified by alpha).
    Axis with a power-of-two alpha: 0 (exact) in formats with a wide exponent range (bf16, fp32, fp64).
    Axis otherwise: ~ 2u (one rounding on each side). float16 counts as "otherwise" even for a power
    of two: its narrow range makes ``C / alpha`` subnormal (measured at alpha=1024 on tiny models:
    5.5e-4 to over 1e-3), so verification has the last word there.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"cannot deform a tensor of dtype {dtype}; only floating-point weights are supported.")
    u = unit_roundoff(dtype)
    if mode_is_axis:
        wide_range = torch.finfo(dtype).max > 1e38
        return 0.0 if is_power_of_two(alpha) and wide_range else 2.0 * u
    return alpha * u
