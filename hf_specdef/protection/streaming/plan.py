"""The plan of a streaming run: pairs, plans and components, decided from the checkpoint's headers alone.

Nothing is read but headers and nothing is written. Pairs that (transitively) share a tensor form a
*component* (in practice one layer); components are independent of each other, and within one the pairs
run in registry order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import engine
from hf_specdef.deformation.engine import Plan
from hf_specdef.sites import (
    ModelConfigError,
    NoSitesError,
    Pair,
    TensorShapeError,
    absent_sites,
    drop_inexact,
    pairs_for,
    select_pairs,
)
from hf_specdef.storage.checkpoint import CONFIG_NAME, Checkpoint


@dataclass
class StreamPlan:
    """What a streaming run will do, decided from the headers before anything is read or written."""

    pairs: list[Pair]
    plans: list[Plan]
    components: list[list[int]]  # pair indices, in registry order; components in order of their first pair
    out_dtype: dict[str, torch.dtype]  # tensors whose stored dtype changes (precision="float32")
    skipped: list[str]
    notes: list[str]


def _components(pairs: Sequence[Pair]) -> list[list[int]]:
    """Group pairs that (transitively) share a tensor; such pairs must run in registry order."""
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, p in enumerate(pairs):
        for name in p.names():
            if name in owner:
                parent[find(i)] = find(owner[name])
            else:
                owner[name] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(pairs)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def checkpoint_pairs(ckpt: Checkpoint, cfg: SpecDefConfig) -> list[Pair]:
    """Every pair of a checkpoint from its headers (:func:`~hf_specdef.sites.pairs_for`), with a config or shape
    error naming the checkpoint's ``config.json`` / the shard file holding the tensor."""
    try:
        return pairs_for(ckpt.config, ckpt.shapes(), cfg, ckpt.class_name)
    except ModelConfigError as e:
        raise e.at(str(ckpt.root / CONFIG_NAME)) from None
    except TensorShapeError as e:
        info = ckpt.infos.get(e.tensor)
        raise (e.at(str(info.file)) if info is not None and not e.source else e) from None


def plan_checkpoint(ckpt: Checkpoint, cfg: SpecDefConfig) -> StreamPlan:
    """Pairs and plans of a checkpoint from its headers; raises ``NoSitesError`` / ``PrecisionBudgetError``, and
    ``ModelConfigError`` / ``TensorShapeError`` (before anything is read) for a config the sites cannot be read from
    or a tensor whose shape does not match its site."""
    all_pairs = checkpoint_pairs(ckpt, cfg)
    dtypes = ckpt.dtypes()
    pairs, inexact = drop_inexact(select_pairs(all_pairs, cfg), dtypes.__getitem__)
    skipped = absent_sites(cfg, all_pairs, ckpt.config, ckpt.class_name) + inexact
    if not pairs:
        raise NoSitesError(f"every selected pair was skipped: {skipped}")
    # the engine plans from dtypes only: empty stand-ins (the weights themselves are checked when read)
    stand_ins = {n: torch.empty(0, dtype=dtypes[n]) for p in pairs for n in p.names()}
    plans = engine.plan_pairs(pairs, stand_ins, cfg, skipped)
    pairs = [plan.pair for plan in plans]  # without the pairs the precision policy left out
    out_dtype: dict[str, torch.dtype] = {}
    if any(plan.dtype == torch.float32 != dtypes[plan.pair.producers[0].name] for plan in plans):
        # precision="float32": like in-memory protection, the whole model is stored in float32
        out_dtype = {n: torch.float32 for n, dt in dtypes.items() if dt.is_floating_point and dt != torch.float32}
    notes = sorted({n for p in plans for n in p.notes})
    return StreamPlan(pairs, plans, _components(pairs), out_dtype, skipped, notes)
