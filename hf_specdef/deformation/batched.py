"""Batched in-memory deformation (load-time protection): the pairs of a model in a few large steps.

:func:`engine.deform_pair` decides and applies one pair at a time: a few dozen small operations and several
host round trips per pair (on a GPU, thousands of kernel launches and device-to-host copies for a 100M
model). Here the planned pairs are cut into *waves* and each wave is done in three batched steps:

1. **decide**: the producer blocks of the wave are grouped by shape and kind; each group gets one Gram
   product, one eigensolver call (or one norm-and-sort for axis pairs) and one transfer of its sigmas;
2. **back up**: per tensor and axis, the rows/columns the wave changes are copied once (exact restore);
3. **apply**: per tensor, the wave's steps in one pass: equal-sized spectral steps on disjoint blocks of
   one axis as one batched update on a float64 copy of the region (written back once), the axis steps
   of one axis as one gather-scale-scatter.

A pair goes into the first wave after every earlier pair that writes what it reads (its producer block),
and never before an earlier pair it conflicts with, so each decision sees exactly the state the one-by-one
engine would; steps on different axes of a tensor (left and right products) commute. The result equals
:func:`engine.deform`'s to float rounding (a region is rounded to its dtype once, not after every step).
Pairs outside the batched shapes (large axis blocks, long spectral blocks) are decided one by one with
:func:`engine.build_deformation`, inside the same waves.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass

import torch

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import engine
from hf_specdef.deformation.engine import PairResult, Plan
from hf_specdef.sites.base import TensorBlock
from hf_specdef.tensor_math import linalg
from hf_specdef.tensor_math.linalg import Deformation

Tensors = MutableMapping[str, torch.Tensor]
Saver = Callable[[str, int, torch.Tensor, torch.Tensor], None]  # (name, axis, rows, old values on the CPU)

__all__ = ["Step", "deform", "supports", "waves"]


def supports(plans: Sequence[Plan]) -> bool:
    """Whether every plan is of a kind this engine decides and applies exactly as :func:`engine.deform_pair` does:
    no guard (quantization-safe planning), no float16-exact policy, no inverted factor, no offset block (``1 + w``
    norms), no rotary layout but Llama's ``"half"``."""
    return all(p.guard is None and p.policy != "axis-float16" and p.factor >= 1
               and p.pair.rotary in ("", "half", False, True)
               and not any(getattr(b, "offset", 0) for b in p.pair.producers + p.pair.consumers) for p in plans)


@dataclass(frozen=True)
class Step:
    """``Y <- Y + (g - 1) U U^T Y`` (spectral) or ``Y[idx] *= g`` (axis), with ``Y`` the block's rows along its axis."""

    block: TensorBlock
    m: Deformation
    gain: float  # factor for a producer, 1 / factor for a consumer


# --------------------------------------------------------------------------------------------
# Waves
# --------------------------------------------------------------------------------------------


def _overlap(a: TensorBlock, b: TensorBlock) -> bool:
    return a.name == b.name and (a.axis != b.axis or (a.start < b.stop and b.start < a.stop))


def waves(plans: Sequence[Plan]) -> list[list[int]]:
    """Indices of ``plans`` by wave: a pair comes after every earlier pair that writes its producer blocks
    (read after write), and not before any earlier pair it conflicts with (write after read or write)."""
    reads: dict[str, list[tuple[TensorBlock, int]]] = defaultdict(list)
    writes: dict[str, list[tuple[TensorBlock, int]]] = defaultdict(list)
    level: list[int] = []
    for plan in plans:
        p = plan.pair
        mine_r, mine_w = p.producers, p.producers + p.consumers
        lvl = 0
        for r in mine_r:
            lvl = max([lvl] + [lv + 1 for w, lv in writes[r.name] if _overlap(w, r)])
        for w in mine_w:
            lvl = max([lvl] + [lv for o, lv in reads[w.name] + writes[w.name] if _overlap(o, w)])
        level.append(lvl)
        for r in mine_r:
            reads[r.name].append((r, lvl))
        for w in mine_w:
            writes[w.name].append((w, lvl))
    out: list[list[int]] = [[] for _ in range(max(level, default=-1) + 1)]
    for i, lv in enumerate(level):
        out[lv].append(i)
    return out


# --------------------------------------------------------------------------------------------
# Decide
# --------------------------------------------------------------------------------------------


def _kind(plan: Plan, block: torch.Tensor, cfg: SpecDefConfig) -> tuple | None:
    """The batch a pair's decision can join (None: decided alone)."""
    d, n = block.shape
    key = (block.dtype, block.device, d, n, plan.factor)
    if not plan.axis:
        return ("spectral", *key) if d <= linalg._GRAM_LIMIT and cfg.top_k <= min(d, n) else None
    if n == 1 or d <= min(n, engine._EXACT_SIDE):
        return ("axis", plan.pair.rotary, *key)
    if min(d, n) > engine._EXACT_SIDE:
        return ("axis-large", plan.pair.rotary, *key)
    return None


def _decide_spectral(plans: list[Plan], blocks: list[torch.Tensor], cfg: SpecDefConfig) -> list[tuple]:
    """As :func:`linalg.top_left_singular` (Gram of the rows, eigh), for a batch of equal blocks."""
    a = torch.stack(blocks).to(linalg.compute_dtype(blocks[0].device))
    evals, evecs = linalg.eigh(a @ a.mT)
    order = torch.argsort(evals, dim=-1, descending=True)[:, :cfg.top_k]
    u = torch.gather(evecs, 2, order[:, None, :].expand(-1, evecs.shape[1], -1))
    s0 = torch.gather(evals, 1, order[:, :1]).clamp_min(0).sqrt()[:, 0].tolist()  # one host transfer per batch
    return [(Deformation(a.shape[1], p.factor, basis=u[i]), s0[i], p.factor * s0[i]) for i, p in enumerate(plans)]


def _top_rows(a: torch.Tensor, k: int, rotary: bool) -> torch.Tensor | None:
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


def _decide_axis(plans: list[Plan], blocks: list[torch.Tensor], cfg: SpecDefConfig) -> list[tuple]:
    """As :func:`engine.build_deformation` for axis pairs (top rows; exact sigma_1 before and after), batched."""
    a = torch.stack(blocks)
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    idx = _top_rows(a, cfg.top_k, plans[0].pair.rotary)
    if idx is None:  # the per-pair path raises the clear error
        return [engine.build_deformation(p, b, cfg) for p, b in zip(plans, blocks, strict=True)]
    d, n = a.shape[1:]
    scale = torch.ones(a.shape[:2], dtype=a.dtype, device=a.device).scatter_(1, idx, plans[0].factor)
    if n == 1:  # 1-D producers (norm weights): sigma_1 is the vector norm
        sig = torch.stack([a[:, :, 0].norm(dim=1), (a[:, :, 0] * scale).norm(dim=1)], dim=1)
    else:  # d x d Gram G; after M: D G D
        gram = a @ a.mT
        lam = linalg.eigvalsh(torch.cat([gram, gram * scale[:, :, None] * scale[:, None, :]]))[:, -1]
        sig = lam.clamp_min(0).sqrt().view(2, -1).T
    s = sig.tolist()  # one host transfer per batch
    return [(Deformation(d, p.factor, indices=idx[i]), s[i][0], s[i][1]) for i, p in enumerate(plans)]


def _decide_axis_large(plans: list[Plan], blocks: list[torch.Tensor], cfg: SpecDefConfig) -> list[tuple]:
    """Axis pairs whose blocks are large on both sides (no copy of them stacked): per block the rows of
    :func:`linalg.top_rows` and :func:`engine.sigma_max`'s power iterations, with the sigmas of all blocks
    brought to the host at once (``engine.build_deformation`` takes one round trip per value)."""
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


_DECIDERS = {"spectral": _decide_spectral, "axis": _decide_axis, "axis-large": _decide_axis_large}


def _explain(plans: Sequence[Plan], tensors: Tensors) -> None:
    """Raise :func:`engine.overflow_error` for the first of ``plans`` whose producers hold values too large to
    deform (a batched decision failed or gave a non-finite sigma_1); return when none does."""
    def read(b: TensorBlock) -> torch.Tensor:
        return tensors[b.name].narrow(b.axis, b.start, b.stop - b.start)

    for p in plans:
        err = engine.overflow_error(p, read)
        if err is not None:
            raise err


def _decide_checked(plans: list[Plan], tensors: Tensors, cfg: SpecDefConfig) -> list[tuple[Deformation, float, float]]:
    """:func:`_decide`, with a failure of its arithmetic explained as in :func:`engine.checked_deformation`."""
    try:
        decided = _decide(plans, tensors, cfg)
    except RuntimeError:  # e.g. a batched solver failing on an inf Gram matrix
        try:
            _explain(plans, tensors)
        except engine.DeformationError as err:
            raise err from None
        raise
    bad = [i for i, (_, s0, s1) in enumerate(decided) if not (math.isfinite(s0) and math.isfinite(s1))]
    if bad:
        _explain([plans[i] for i in bad], tensors)
        raise engine.not_finite_error(plans[bad[0]], decided[bad[0]][1], decided[bad[0]][2])
    return decided


def _decide(plans: list[Plan], tensors: Tensors, cfg: SpecDefConfig) -> list[tuple[Deformation, float, float]]:
    blocks = [engine.producer_block(p.pair, tensors) for p in plans]
    out: list = [None] * len(plans)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, b) in enumerate(zip(plans, blocks, strict=True)):
        kind = _kind(p, b, cfg)
        if kind is None:
            out[i] = engine.build_deformation(p, b, cfg)
        else:
            groups[kind].append(i)
    for kind, members in groups.items():
        for i, r in zip(members, _DECIDERS[kind[0]]([plans[i] for i in members], [blocks[i] for i in members], cfg), strict=True):
            out[i] = r
    return out


# --------------------------------------------------------------------------------------------
# Back up and apply, per tensor
# --------------------------------------------------------------------------------------------


def _rows(step: Step, device: torch.device) -> torch.Tensor:
    b = step.block
    if step.m.is_axis:
        return step.m.indices.to(device) + b.start
    return torch.arange(b.start, b.stop, device=device)


_TRANSFER_BYTES = 64 * 2**20  # backups leave an accelerator in transfers of at most this much (one per wave when less)


def _save(steps: dict[str, list[Step]], tensors: Tensors, save: Saver) -> None:
    """The rows/columns the steps change, per tensor and axis, copied to the CPU in as few transfers as fit."""
    pending: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
    for name, ss in steps.items():
        t = tensors[name]
        by_axis: dict[int, list[torch.Tensor]] = defaultdict(list)
        for s in ss:
            by_axis[s.block.axis].append(_rows(s, t.device))
        for axis, parts in by_axis.items():
            rows = torch.cat(parts) if len(parts) > 1 else parts[0]
            pending.append((name, axis, rows, t.index_select(axis, rows)))
    batch: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
    for item in pending:
        if batch and (item[3].dtype != batch[0][3].dtype or item[3].device != batch[0][3].device
                      or sum(b[3].nbytes for b in batch) + item[3].nbytes > _TRANSFER_BYTES):
            _flush(batch, save)
        batch.append(item)
    _flush(batch, save)


def _flush(batch: list[tuple[str, int, torch.Tensor, torch.Tensor]], save: Saver) -> None:
    if not batch:
        return
    flat = torch.cat([b[3].reshape(-1) for b in batch]).to("cpu")  # one device-to-host copy
    for (name, axis, rows, part), old in zip(batch, flat.split([b[3].numel() for b in batch]), strict=True):
        save(name, axis, rows, old.view(part.shape))
    batch.clear()


def _runs(steps: list[Step]) -> list[list[Step]]:
    """Consecutive steps (after a stable sort by axis) that one batched operation can do: same axis and kind,
    disjoint blocks, and for spectral steps the same block size."""
    runs: list[list[Step]] = []
    for s in sorted(steps, key=lambda s: s.block.axis):  # stable: per axis, the recorded order
        run = runs[-1] if runs else None
        if (run is not None and run[0].block.axis == s.block.axis and run[0].m.is_axis == s.m.is_axis
                and (s.m.is_axis or run[0].block.stop - run[0].block.start == s.block.stop - s.block.start)
                and not any(_overlap(o.block, s.block) for o in run)):
            run.append(s)
        else:
            runs.append([s])
    return runs


def _apply_axis(t: torch.Tensor, run: list[Step]) -> None:
    axis = run[0].block.axis
    idx = torch.cat([s.m.indices.to(t.device) + s.block.start for s in run])
    gains = torch.tensor([s.gain for s in run for _ in range(s.m.indices.numel())], dtype=torch.float64)
    dt = linalg.compute_dtype(t.device)
    shape = [1] * t.dim()
    shape[axis] = -1
    t.index_copy_(axis, idx, (t.index_select(axis, idx).to(dt) * gains.to(t.device, dt).view(shape)).to(t.dtype))


def _regular(run: list[Step]) -> bool:
    """Whether the blocks of a run tile one range in order of their starts (then one view covers them)."""
    size = run[0].block.stop - run[0].block.start
    starts = sorted(s.block.start for s in run)
    return all(b - a == size for a, b in zip(starts, starts[1:], strict=False))


def _apply_spectral(t: torch.Tensor, run: list[Step]) -> None:
    axis, size = run[0].block.axis, run[0].block.stop - run[0].block.start
    dt = linalg.compute_dtype(t.device)
    run = sorted(run, key=lambda s: s.block.start)
    u = torch.stack([s.m.basis for s in run]).to(t.device, dt)  # (B, d, k)
    gain = torch.tensor([s.gain - 1.0 for s in run], dtype=dt).to(t.device)[:, None, None]
    if _regular(run):  # one view (..., B, d, ...) -> (B, d, rest): copied once, written back once
        region = t.narrow(axis, run[0].block.start, size * len(run))
        split = region.unflatten(axis, (len(run), size))
        y = split.movedim((axis, axis + 1), (0, 1)).to(dt, copy=True, memory_format=torch.contiguous_format)
        y2 = y.view(len(run), size, -1)
        y2.baddbmm_(u * gain, u.mT @ y2)
        split.copy_(y.movedim((0, 1), (axis, axis + 1)))
        return
    for s, ui, gi in zip(run, u, gain, strict=True):  # blocks spread out: one update each
        view = t.narrow(axis, s.block.start, size)
        y = view.movedim(axis, 0).to(dt, copy=True, memory_format=torch.contiguous_format)
        y2 = y.view(size, -1)
        y2.addmm_(ui * gi[0], ui.T @ y2)
        view.copy_(y.movedim(0, axis))


def _apply_tensor(t: torch.Tensor, steps: list[Step]) -> None:
    for run in _runs(steps):
        (_apply_axis if run[0].m.is_axis else _apply_spectral)(t, run)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def deform(plans: Sequence[Plan], tensors: Tensors, cfg: SpecDefConfig, save: Saver | None = None,
           done: Callable[[int], None] | None = None) -> list[PairResult]:
    """Deform every planned pair in place, wave by wave (see the module docstring); results in plan order.

    ``save(name, axis, rows, old)`` receives, before a wave changes a tensor, the exact CPU copy of the
    rows/columns it changes (``index_copy_`` them back, last first, to restore); ``done(n)`` is called after
    each wave with the number of pairs it deformed.
    """
    results: list[PairResult | None] = [None] * len(plans)
    for wave in waves(plans):
        chosen = [plans[i] for i in wave]
        decided = _decide_checked(chosen, tensors, cfg)
        steps: dict[str, list[Step]] = defaultdict(list)
        for i, plan, (m, s0, s1) in zip(wave, chosen, decided, strict=True):
            results[i] = engine.result_of(plan, m, s0, s1)
            for b in plan.pair.producers:
                steps[b.name].append(Step(b, m, m.factor))
            for b in plan.pair.consumers:
                steps[b.name].append(Step(b, m, 1.0 / m.factor))
        if save is not None:
            _save(steps, tensors, save)
        for name, ss in steps.items():
            _apply_tensor(tensors[name], ss)
        if done is not None:
            done(len(wave))
    return results  # type: ignore[return-value]
