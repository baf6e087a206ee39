"""The deformation driver: plan -> build -> apply -> verify, wave by wave (batched) or pair by pair.

:func:`engine.deform_pair`-style processing decides and applies one pair at a time: a few dozen small operations and
several host round trips per pair (on a GPU, thousands of kernel launches and device-to-host copies for a 100M
model). Here the planned pairs are cut into *waves* and each wave is done in batched steps:

1. **build**: the producer blocks of the wave are grouped by their variant's ``batch_key``; each group is decided by
   one ``variant.build_batch`` call (one Gram product, one eigensolver call or one norm-and-sort, one transfer of
   its sigmas); the other pairs by ``variant.build``;
2. **back up**: per tensor and axis, the rows/columns the wave changes are copied once (exact restore);
3. **apply**: per tensor, the wave's steps (``variant.steps``) through
   :func:`~hf_specdef.deformation.tensor_ops.apply_steps`, which keeps the order of the steps on every entry;
4. **verify**: ``variant.before_apply`` / ``variant.check`` around the application.

A pair goes into the first wave after every earlier pair that writes what it reads (``variant.reads``), and never
before an earlier pair it conflicts with, so each decision sees exactly the state the one-by-one order gives.
With ``batch=False`` every pair is its own wave: the pair-by-pair engine (:func:`engine.deform`). A variant decides
one pair as a batch of one and the kernels compute each block alike in a batch of any size, so both give the same
bits (``tests/test_batched.py``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, MutableMapping, Sequence

import torch

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import engine
from hf_specdef.deformation.engine import PairResult, Plan
from hf_specdef.deformation.tensor_ops import TensorOp, apply_steps
from hf_specdef.deformation.tensor_ops import overlap as _overlap
from hf_specdef.deformation.variants import Decision
from hf_specdef.sites.base import TensorBlock

Tensors = MutableMapping[str, torch.Tensor]
Saver = Callable[[str, int, torch.Tensor, torch.Tensor], None]  # (name, axis, rows, old values on the CPU)
Step = TensorOp  # the step of a wave is the step of every path

__all__ = ["Step", "deform", "supports", "waves"]


def supports(plans: Sequence[Plan]) -> bool:
    """Whether every plan's variant may be decided and applied wave by wave (not the quantization-safe one, whose
    per-pair round-trip checks run pair by pair).

    Args:
        plans: the plans.

    Returns:
        ``True`` when :func:`deform` may batch them.
    """
    return all(p.variant.batchable for p in plans)


# --------------------------------------------------------------------------------------------
# Waves
# --------------------------------------------------------------------------------------------


def waves(plans: Sequence[Plan]) -> list[list[int]]:
    """Indices of ``plans`` by wave: a pair comes after every earlier pair that writes the blocks it reads
    (``variant.reads``: read after write), and not before any earlier pair it conflicts with (write after read or
    write).

    Args:
        plans: the plans, in order.

    Returns:
        The waves, each a list of indices into ``plans``.
    """
    reads: dict[str, list[tuple[TensorBlock, int]]] = defaultdict(list)
    writes: dict[str, list[tuple[TensorBlock, int]]] = defaultdict(list)
    level: list[int] = []
    for plan in plans:
        p = plan.pair
        mine_r, mine_w = tuple(plan.variant.reads(plan)), p.producers + p.consumers
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
# Build
# --------------------------------------------------------------------------------------------


def _kind(plan: Plan, block: torch.Tensor, cfg: SpecDefConfig) -> tuple | None:
    """The batch a pair's decision can join (None: decided alone): its variant's ``batch_key``."""
    return plan.variant.batch_key(plan, block, cfg)


def _explain(plans: Sequence[Plan], tensors: Tensors) -> None:
    """Raise :func:`engine.overflow_error` for the first of ``plans`` whose producers hold values too large to
    deform (a batched decision failed or gave a non-finite sigma_1); return when none does."""
    def read(b: TensorBlock) -> torch.Tensor:
        return tensors[b.name].narrow(b.axis, b.start, b.stop - b.start)

    for p in plans:
        err = engine.overflow_error(p, read)
        if err is not None:
            raise err


def _decide_checked(plans: list[Plan], tensors: Tensors, cfg: SpecDefConfig) -> list[Decision | None]:
    """:func:`_decide`, with a failure of its arithmetic explained as in :func:`engine.checked_build`."""
    try:
        decided = _decide(plans, tensors, cfg)
    except RuntimeError:  # e.g. a batched solver failing on an inf Gram matrix
        try:
            _explain(plans, tensors)
        except engine.DeformationError as err:
            raise err from None
        raise
    bad = [i for i, d in enumerate(decided) if d is not None and not (math.isfinite(d[1]) and math.isfinite(d[2]))]
    if bad:
        _explain([plans[i] for i in bad], tensors)
        raise engine.not_finite_error(plans[bad[0]], decided[bad[0]][1], decided[bad[0]][2])
    return decided


def _decide(plans: list[Plan], tensors: Tensors, cfg: SpecDefConfig) -> list[Decision | None]:
    out: list[Decision | None] = [None] * len(plans)
    groups: dict[tuple, list[int]] = defaultdict(list)
    blocks: dict[int, torch.Tensor] = {}
    for i, p in enumerate(plans):
        key = None
        if p.variant.batchable:
            blocks[i] = engine.producer_block(p.pair, tensors)
            key = _kind(p, blocks[i], cfg)
        if key is None:
            out[i] = p.variant.build(p, tensors, cfg)
        else:
            groups[(type(p.variant), *key)].append(i)
    for members in groups.values():
        variant = plans[members[0]].variant
        decided = variant.build_batch([plans[i] for i in members], [blocks[i] for i in members], cfg)
        for i, r in zip(members, decided, strict=True):
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


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def deform(plans: Sequence[Plan], tensors: Tensors, cfg: SpecDefConfig, save: Saver | None = None,
           done: Callable[[int], None] | None = None, batch: bool = True) -> list[PairResult]:
    """Deform every planned pair in place, wave by wave (see the module docstring).

    Args:
        plans: the plans (:func:`engine.plan_pairs` / :func:`~hf_specdef.deformation.quantization_safe.plan_safe`).
        tensors: ``name -> tensor``, changed in place.
        cfg: the configuration.
        save: ``save(name, axis, rows, old)`` receives, before a wave changes a tensor, the exact CPU copy of the
            rows/columns it changes (``index_copy_`` them back, last first, to restore).
        done: called after each wave with the number of pairs it handled.
        batch: ``False``: one pair per wave (the pair-by-pair engine, same bits); a plan whose variant is not
            ``batchable`` always is.

    Returns:
        The results of the pairs not skipped by their variant, in plan order.

    Raises:
        DeformationError: a producer value too large to deform or a non-finite sigma_1; a variant's check may
            raise too. Nothing is restored (``save`` has the values to).
    """
    results: list[PairResult | None] = [None] * len(plans)
    batch = batch and supports(plans)
    for wave in (waves(plans) if batch else [[i] for i in range(len(plans))]):
        chosen = [plans[i] for i in wave]
        decided = _decide_checked(chosen, tensors, cfg)
        steps: dict[str, list[Step]] = defaultdict(list)
        applied: list[tuple[Plan, engine.Deformation]] = []
        for i, plan, d in zip(wave, chosen, decided, strict=True):
            if d is None:  # skipped by its variant (its ``skipped`` says why)
                continue
            m, s0, s1 = d
            results[i] = engine.result_of(plan, m, s0, s1)
            applied.append((plan, m))
            for op in plan.variant.steps(plan, m):
                steps[op.block.name].append(op)
        if save is not None:
            _save(steps, tensors, save)
        for plan, m in applied:
            plan.variant.before_apply(plan, m, tensors)
        for name, ss in steps.items():
            apply_steps(tensors[name], ss)
        for plan, m in applied:
            plan.variant.check(plan, m, tensors)
        if done is not None:
            done(len(wave))
    return [r for r in results if r is not None]
