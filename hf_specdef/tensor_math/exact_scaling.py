"""Power-of-two axis factors that stay exact in a narrow float format (no Hugging Face imports).

Axis mode scales ``k`` producer channels by a factor ``f`` and divides the matching consumer lines by ``f``.
With ``f`` a power of two this is exact as long as every scaled value is representable: in bfloat16 and
float32 (8 exponent bits) it always is, in float16 (5 exponent bits, normal numbers from 2^-14) it is not --
``C / 1024`` turns most consumer entries below 0.0625 into subnormals, which drop low bits. This module
finds, per channel, the largest ``j`` such that dividing every consumer entry of the channel by ``2**j``
is exact and multiplying every producer entry by ``2**j`` stays finite, and builds an axis deformation on
the channels that allow the largest factor.

Exact weights are what this guarantees. The inflated activation (``2**j`` times the producer's output)
must also stay below the format's maximum (65504 in float16): verification on a probe batch checks it,
no weight-only rule can.
"""

from __future__ import annotations

import torch

from hf_specdef.tensor_math import linalg
from hf_specdef.tensor_math.linalg import Deformation


def exact_division_log2(lines: torch.Tensor, dtype: torch.dtype, max_log2: int) -> torch.Tensor:
    """Per row of ``lines`` (``d x n``), the largest ``j`` in ``[0, max_log2]`` such that every entry divided by
    ``2**j`` is exactly representable in ``dtype``.

    Exactness is monotone in ``j`` (a value exact at ``2**j`` is exact at every smaller power), so ``j`` counts the
    leading powers that pass. ``lines`` must hold values of ``dtype`` (in that dtype or wider).
    """
    x = lines.to(torch.float32) if lines.dtype != torch.float64 else lines
    best = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    alive = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for j in range(1, max_log2 + 1):
        f = float(2**j)
        ok = ((x / f).to(dtype).to(x.dtype) * f == x).all(dim=1) if x.shape[1] else alive
        alive &= ok
        if not bool(alive.any()):
            break
        best[alive] = j
    return best


def in_range_log2(lines: torch.Tensor, dtype: torch.dtype, max_log2: int) -> torch.Tensor:
    """Per row of ``lines``, the largest ``j`` in ``[0, max_log2]`` such that every entry times ``2**j`` stays within
    the finite range of ``dtype`` (scaling up by a power of two is otherwise exact, subnormals included)."""
    limit = torch.finfo(dtype).max
    peak = lines.abs().amax(dim=1).to(torch.float64) if lines.shape[1] else torch.zeros(lines.shape[0], dtype=torch.float64)
    j = torch.floor(torch.log2(limit / peak.clamp_min(torch.finfo(torch.float64).tiny)))
    return j.clamp(0, max_log2).to(torch.long)


def channel_log2(producers: list[torch.Tensor], consumers: list[torch.Tensor], dtype: torch.dtype,
                 max_log2: int) -> torch.Tensor:
    """Per channel (row of each ``d x n`` line matrix), the largest exact power-of-two exponent: the minimum over
    the consumer lines (exact division) and the producer lines (no overflow)."""
    parts = [exact_division_log2(c, dtype, max_log2) for c in consumers]
    parts += [in_range_log2(p, dtype, max_log2) for p in producers]
    return torch.stack([p.to(parts[0].device) for p in parts]).amin(dim=0)


def exact_axis_deformation(norms: torch.Tensor, log2: torch.Tensor, k: int, rotary: str = "") -> Deformation:
    """Axis deformation on the ``k`` channels (or rotary pairs, ``rotary`` = ``"half"`` / ``"adjacent"``: see
    :func:`hf_specdef.tensor_math.linalg.pair_halves`) with the largest exact exponent (``log2``, per channel), ties broken by the
    larger ``norms`` (squared row norms); its factor is ``2**j`` for the smallest ``j`` among the chosen channels (one
    factor per deformation)."""
    d = norms.numel()
    if rotary:
        norms, log2 = linalg.pair_scores(norms, rotary), torch.minimum(*linalg.pair_halves(log2, rotary))
    if k > norms.numel():
        raise ValueError(f"top_k={k} exceeds the {norms.numel()} channels of the block; choose a smaller top_k.")
    by_norm = torch.argsort(norms.to(torch.float64), descending=True, stable=True)
    order = by_norm[torch.argsort(log2[by_norm], descending=True, stable=True)]
    chosen = torch.sort(order[:k]).values
    j = int(log2[chosen].min())
    idx = linalg.pair_indices(chosen, d, rotary) if rotary else chosen
    return Deformation(size=d, factor=float(2**j), indices=idx)
