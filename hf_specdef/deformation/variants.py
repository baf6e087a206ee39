"""Deformation variants: how a pair's ``M`` is decided, turned into steps, and checked (no Hugging Face imports).

Every path -- in memory pair by pair, in memory batched, streaming -- runs the same three stages per pair, and the
variant of the pair's plan (``Plan.variant``) supplies each of them:

1. **plan**: :func:`hf_specdef.deformation.engine.plan_pairs` (or
   :func:`hf_specdef.deformation.quantization_safe.plan_safe`) picks the variant of every pair;
2. **build**: ``variant.build`` decides ``M`` and sigma_1 before and after from the current weights. Variants
   that batch (:class:`SpectralVariant`, :class:`AxisVariant`) decide a single pair as a batch of one
   (``build_batch``), so the batched engine, which decides many equal blocks at once, gives the same bits;
3. **apply**: ``variant.steps`` turns ``M`` into :class:`~hf_specdef.deformation.tensor_ops.TensorOp` steps, which
   in-memory protection applies at once (:func:`~hf_specdef.deformation.tensor_ops.apply_steps`) and the streaming
   path records and applies chunk by chunk, with the same kernels;
4. **verify**: ``variant.before_apply`` / ``variant.check`` bracket the application (the quantization-safe variant
   checks the quantized round trips there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import precision
from hf_specdef.deformation.blocks import EXACT_SIDE, Region, Tensors, producer_block, sigma_max
from hf_specdef.deformation.tensor_ops import TensorOp, apply_steps, steps_by_tensor
from hf_specdef.sites.base import TensorBlock
from hf_specdef.tensor_math import exact_scaling, linalg
from hf_specdef.tensor_math.linalg import Deformation

if TYPE_CHECKING:
    from hf_specdef.deformation.engine import Plan

Decision = tuple[Deformation, float, float]  # (M, sigma_1 before, sigma_1 after)

__all__ = ["AxisVariant", "Decision", "DeformationVariant", "SpectralVariant", "VariantBase", "variant_for"]


@runtime_checkable
class DeformationVariant(Protocol):
    """How one kind of deformation is decided, applied and checked (as PEFT puts LoRA variants behind one protocol).

    Attributes:
        name: ``"spectral"``, ``"axis"`` or ``"quantization-safe"``.
        batchable: whether the batched engine may decide and apply the variant's pairs wave by wave.
        skipped: why the variant left its pair out (``build`` returned ``None``), or ``None``.
        note: a remark for the report (e.g. a bounded factor), or ``None``.
    """

    name: str
    batchable: bool
    skipped: str | None
    note: str | None

    def reads(self, plan: Plan) -> Sequence[TensorBlock]:
        """The blocks ``build`` reads (the batched engine orders waves by them)."""

    def batch_key(self, plan: Plan, block: torch.Tensor, cfg: SpecDefConfig) -> tuple | None:
        """The batch the pair's decision can join (equal keys: one ``build_batch`` call), ``None``: decided alone."""

    def build(self, plan: Plan, tensors: Tensors, cfg: SpecDefConfig, region: Region | None = None) -> Decision | None:
        """``(M, sigma_before, sigma_after)`` from the current weights, or ``None`` when the variant skips the pair."""

    def build_batch(self, plans: Sequence[Plan], blocks: Sequence[torch.Tensor], cfg: SpecDefConfig) -> list[Decision]:
        """The decisions of pairs with one ``batch_key``, from their producer blocks."""

    def steps(self, plan: Plan, m: Deformation) -> list[TensorOp]:
        """The steps that apply ``M`` to the pair's producers and ``M^-1`` to its consumers."""

    def apply(self, plan: Plan, m: Deformation, tensors: Tensors) -> None:
        """Apply the steps in place."""

    def before_apply(self, plan: Plan, m: Deformation, tensors: Mapping[str, torch.Tensor]) -> None:
        """Called right before the pair's steps are applied."""

    def check(self, plan: Plan, m: Deformation, tensors: Mapping[str, torch.Tensor]) -> None:
        """Called right after; raises when the applied deformation is not what was decided."""


class VariantBase:
    """Defaults of :class:`DeformationVariant`: reads the producers, decided alone, standard steps, no checks."""

    name = "base"
    batchable = True
    skipped: str | None = None
    note: str | None = None

    def reads(self, plan: Plan) -> Sequence[TensorBlock]:
        return plan.pair.producers

    def batch_key(self, plan: Plan, block: torch.Tensor, cfg: SpecDefConfig) -> tuple | None:
        return None

    def decide(self, plan: Plan, block: torch.Tensor, cfg: SpecDefConfig, region: Region | None = None) -> Decision:
        """The decision from the pair's producer ``block`` (``region`` reads a block's current values)."""
        raise NotImplementedError

    def build(self, plan: Plan, tensors: Tensors, cfg: SpecDefConfig, region: Region | None = None) -> Decision | None:
        if region is None:
            def region(b: TensorBlock) -> torch.Tensor:
                return tensors[b.name].narrow(b.axis, b.start, b.stop - b.start)
        return self.decide(plan, producer_block(plan.pair, tensors, region), cfg, region)

    def build_batch(self, plans: Sequence[Plan], blocks: Sequence[torch.Tensor], cfg: SpecDefConfig) -> list[Decision]:
        return [self.decide(p, b, cfg) for p, b in zip(plans, blocks, strict=True)]

    def steps(self, plan: Plan, m: Deformation) -> list[TensorOp]:
        return [TensorOp(b, m, True) for b in plan.pair.producers] + [TensorOp(b, m, False) for b in plan.pair.consumers]

    def apply(self, plan: Plan, m: Deformation, tensors: Tensors) -> None:
        for name, ops in steps_by_tensor(self.steps(plan, m)).items():
            apply_steps(tensors[name], ops)

    def before_apply(self, plan: Plan, m: Deformation, tensors: Mapping[str, torch.Tensor]) -> None:
        return None

    def check(self, plan: Plan, m: Deformation, tensors: Mapping[str, torch.Tensor]) -> None:
        return None


class SpectralVariant(VariantBase):
    """Spectral mode (see docs/design.md): ``M = I + (factor - 1) U_k U_k^T`` from the top-k left singular vectors of the
    producer block; sigma_1 after is ``factor`` x before (exact in real arithmetic)."""

    name = "spectral"

    def batch_key(self, plan: Plan, block: torch.Tensor, cfg: SpecDefConfig) -> tuple | None:
        d, n = block.shape
        if d <= linalg._GRAM_LIMIT and cfg.top_k <= min(d, n):
            return ("spectral", block.dtype, block.device, d, n, plan.factor)
        return None

    def decide(self, plan: Plan, block: torch.Tensor, cfg: SpecDefConfig, region: Region | None = None) -> Decision:
        if self.batch_key(plan, block, cfg) is not None:
            return self.build_batch([plan], [block], cfg)[0]
        u, s = linalg.top_left_singular(block, cfg.top_k)  # long blocks (svd_lowrank) or a too large top_k (raises)
        return Deformation(block.shape[0], plan.factor, basis=u), float(s[0]), plan.factor * float(s[0])

    def build_batch(self, plans: Sequence[Plan], blocks: Sequence[torch.Tensor], cfg: SpecDefConfig) -> list[Decision]:
        """As :func:`linalg.top_left_singular` (Gram of the rows, eigh), for a batch of equal blocks."""
        a = torch.stack(list(blocks)).to(linalg.compute_dtype(blocks[0].device))
        evals, evecs = linalg.eigh(gram_of_rows(a))
        order = torch.argsort(evals, dim=-1, descending=True)[:, :cfg.top_k]
        u = torch.gather(evecs, 2, order[:, None, :].expand(-1, evecs.shape[1], -1))
        s0 = torch.gather(evals, 1, order[:, :1]).clamp_min(0).sqrt()[:, 0].tolist()  # one host transfer per batch
        return [(Deformation(a.shape[1], p.factor, basis=u[i]), s0[i], p.factor * s0[i]) for i, p in enumerate(plans)]


def gram_of_rows(a: torch.Tensor) -> torch.Tensor:
    """``A A^T`` of each block of ``a`` (B x d x n), one product per block: a batched product (``a @ a.mT``) may round
    a block differently with the batch size, and a pair must get the same bits alone and in a batch. The eigensolvers
    are batch-invariant (LAPACK solves each matrix on its own)."""
    return torch.stack([x @ x.T for x in a])


def _top_rows(a: torch.Tensor, k: int, rotary: str) -> torch.Tensor | None:
    """:func:`linalg.top_rows` of each block of ``a`` (B x d x n): B x k (2k with ``rotary``); None if k is too large."""
    norms = torch.linalg.vector_norm(a, dim=-1, dtype=a.dtype).pow(2)  # as linalg.top_rows, so the same rows win
    d = a.shape[1]
    if rotary:
        if d % 2 or k > d // 2:
            return None
        half = torch.argsort(norms[:, : d // 2] + norms[:, d // 2:], dim=1, descending=True, stable=True)[:, :k]
        pick = torch.sort(half, dim=1).values
        return torch.cat([pick, pick + d // 2], dim=1)
    if k > d:
        return None
    return torch.sort(torch.argsort(norms, dim=1, descending=True, stable=True)[:, :k], dim=1).values


class AxisVariant(VariantBase):
    """Axis mode (see docs/design.md): ``M`` diagonal, the ``k`` rows (rotary pairs) of largest norm scaled by the factor;
    sigma_1 measured (small blocks exactly, large ones by power iterations). float16-exact pairs
    (``plan.policy == "axis-float16"``) read every producer and consumer block to pick channels and factor."""

    name = "axis"

    def reads(self, plan: Plan) -> Sequence[TensorBlock]:
        return plan.pair.producers + plan.pair.consumers if plan.policy == "axis-float16" else plan.pair.producers

    def batch_key(self, plan: Plan, block: torch.Tensor, cfg: SpecDefConfig) -> tuple | None:
        if plan.policy == "axis-float16" or plan.pair.rotary not in ("", "half"):
            return None
        d, n = block.shape
        key = (block.dtype, block.device, d, n, plan.factor)
        if n == 1 or d <= min(n, EXACT_SIDE):
            return ("axis", plan.pair.rotary, *key)
        if min(d, n) > EXACT_SIDE:
            return ("axis-large", plan.pair.rotary, *key)
        return None

    def decide(self, plan: Plan, block: torch.Tensor, cfg: SpecDefConfig, region: Region | None = None) -> Decision:
        if self.batch_key(plan, block, cfg) is not None:
            return self.build_batch([plan], [block], cfg)[0]
        a = block.to(torch.promote_types(block.dtype, torch.float32))  # converted once (16-bit weights), else no copy
        if plan.policy == "axis-float16":
            m = _exact16_deformation(plan, a, cfg, region)
        else:
            m = linalg.axis_deformation(a, cfg.top_k, plan.factor, rotary=plan.pair.rotary)
        if block.shape[0] <= min(block.shape[1], EXACT_SIDE):  # d x d Gram G; after M: D G D
            gram = a @ a.T
            d = torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
            d[m.indices.to(d.device)] = m.factor
            before, after = linalg.eigvalsh(torch.stack([gram, gram * d[:, None] * d[None, :]]))[:, -1]
            return m, float(before.clamp_min(0).sqrt()), float(after.clamp_min(0).sqrt())
        return m, (s0 := sigma_max(a)), _axis_sigma_after(a, m, s0)

    def build_batch(self, plans: Sequence[Plan], blocks: Sequence[torch.Tensor], cfg: SpecDefConfig) -> list[Decision]:
        d, n = blocks[0].shape
        if n == 1 or d <= min(n, EXACT_SIDE):
            return self._small(plans, blocks, cfg)
        return self._large(plans, blocks, cfg)

    def _small(self, plans: Sequence[Plan], blocks: Sequence[torch.Tensor], cfg: SpecDefConfig) -> list[Decision]:
        """Top rows; exact sigma_1 before and after, for a batch of equal blocks."""
        a = torch.stack(list(blocks))
        a = a.to(torch.promote_types(a.dtype, torch.float32))
        idx = _top_rows(a, cfg.top_k, plans[0].pair.rotary)
        if idx is None:  # top_k too large: linalg.top_rows raises the clear error
            linalg.top_rows(a[0], cfg.top_k, plans[0].pair.rotary)
            raise ValueError(f"top_k={cfg.top_k} does not fit blocks of {tuple(a.shape[1:])}")
        d, n = a.shape[1:]
        scale = torch.ones(a.shape[:2], dtype=a.dtype, device=a.device).scatter_(1, idx, plans[0].factor)
        if n == 1:  # 1-D producers (norm weights): sigma_1 is the vector norm
            sig = torch.stack([a[:, :, 0].norm(dim=1), (a[:, :, 0] * scale).norm(dim=1)], dim=1)
        else:  # d x d Gram G; after M: D G D
            gram = gram_of_rows(a)
            lam = linalg.eigvalsh(torch.cat([gram, gram * scale[:, :, None] * scale[:, None, :]]))[:, -1]
            sig = lam.clamp_min(0).sqrt().view(2, -1).T
        s = sig.tolist()  # one host transfer per batch
        return [(Deformation(d, p.factor, indices=idx[i]), s[i][0], s[i][1]) for i, p in enumerate(plans)]

    def _large(self, plans: Sequence[Plan], blocks: Sequence[torch.Tensor], cfg: SpecDefConfig) -> list[Decision]:
        """Blocks large on both sides (no copy of them stacked): per block the rows of :func:`linalg.top_rows` and
        :func:`sigma_max`'s power iterations, with the sigmas of all blocks brought to the host at once."""
        indices, before, grams = [], [], []
        for p, block in zip(plans, blocks, strict=True):
            a = block.to(torch.promote_types(block.dtype, torch.float32))
            idx = linalg.top_rows(a, cfg.top_k, p.pair.rotary)
            v = a.index_select(0, a.norm(dim=1).argmax().view(1))[0]  # the largest row (no host round trip)
            for _ in range(4):
                v = (a @ v) @ a
                v = v / v.norm().clamp_min(torch.finfo(a.dtype).tiny)
            rows = a.index_select(0, idx).double()  # after: max(factor x sigma_1 of the k scaled rows, before)
            indices.append(idx)
            before.append((a @ v).norm().double())
            grams.append(rows @ rows.T)
        s0 = torch.stack(before)
        s1 = torch.maximum(linalg.eigvalsh(torch.stack(grams))[:, -1].clamp_min(0).sqrt() * plans[0].factor, s0)
        s = torch.stack([s0, s1], dim=1).tolist()  # one host transfer per batch
        return [(Deformation(b.shape[0], p.factor, indices=indices[i]), s[i][0], s[i][1])
                for i, (p, b) in enumerate(zip(plans, blocks, strict=True))]


def _exact16_deformation(plan: Plan, block: torch.Tensor, cfg: SpecDefConfig, region: Region | None) -> Deformation:
    """The float16-exact axis deformation of a pair (channels with the largest exact power-of-two factor), or
    :class:`PrecisionBudgetError` when that factor falls below ``alpha / 16``."""
    if region is None:
        raise ValueError(f"pair {plan.pair.key}: a float16-exact deformation needs the pair's tensors (region=...).")
    lines = {b: linalg.as_rows(region(b), b.axis) for b in plan.pair.producers + plan.pair.consumers}
    log2 = exact_scaling.channel_log2([lines[b] for b in plan.pair.producers], [lines[b] for b in plan.pair.consumers],
                                      plan.dtype, int(round(math.log2(plan.factor))))
    norms = block.pow(2).sum(dim=1)
    m = exact_scaling.exact_axis_deformation(norms, log2, cfg.top_k, rotary=plan.pair.rotary)
    if m.factor < precision.min_exact16_factor(cfg):
        raise precision.refuse_exact16(plan.pair.key, m.factor, cfg)
    return m


def _axis_sigma_after(block: torch.Tensor, m: Deformation, sigma_before: float) -> float:
    """sigma_1 of ``M @ block`` for an axis ``M`` (``block`` taken before ``M``): exact on small blocks; on large
    ones the max of sigma_1 of the ``k`` scaled rows and ``sigma_before`` (a lower bound within a factor sqrt(2),
    tight when alpha >> 1)."""
    if min(block.shape) <= EXACT_SIDE:
        after = block.clone()
        linalg.apply_producer(after, 0, 0, block.shape[0], m)
        return sigma_max(after)
    rows = block.index_select(0, m.indices.to(block.device)).to(torch.promote_types(block.dtype, torch.float32))
    return max(m.factor * float(linalg.top_singular_values(rows, 1)[0]), sigma_before)


SPECTRAL = SpectralVariant()
AXIS = AxisVariant()


def variant_for(plan: Plan) -> DeformationVariant:
    """The (stateless) variant of a planned pair: :class:`AxisVariant` for axis plans, else :class:`SpectralVariant`.

    Args:
        plan: the plan, after the precision policy (:func:`hf_specdef.deformation.precision.resolve`).

    Returns:
        The shared variant instance.
    """
    return AXIS if plan.axis else SPECTRAL
