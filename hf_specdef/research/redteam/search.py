"""Learning-rate search on a log grid: each attack is judged at its own best learning rate.

A coarse grid flatters a defence (the protected optimum is often between two decades), so the search hill-climbs
on a grid of ``per_decade`` points per decade: first in steps of a decade from the starting point, then in single
grid steps, until the best point's two neighbours (a third of a decade away with the default 3 per decade) have
been run and are worse. The optimum is then bracketed by >= 3 points per decade.

Runs are compared by ``key``; a run may be stopped early by ``run(lr, stop_after)`` once it has used as many steps
as the best run so far needed (it cannot win any more): the best learning rate and its steps are exact, the
other runs are only known to be no better.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hf_specdef.research.redteam.training import Run

logger = logging.getLogger("hf_specdef")

LR_MIN, LR_MAX = 1e-12, 1e4  # wide: a deformation can move the optimum by many decades either way


def steps_key(run: Run) -> tuple[float, float, float, float]:
    """Fewest steps to the target first; then not diverged; then the lowest held-out loss; among diverged runs
    the lower learning rate (divergence says the rate is too high: the search must move down, not stop)."""
    return (run.steps_to_target if run.reached else math.inf, float(run.diverged), run.best_loss,
            run.lr if run.diverged else 0.0)


def loss_at_key(step: int) -> Callable[[Run], tuple[float, float, float]]:
    """Lowest held-out loss after ``step`` steps (diverged runs last, the lower learning rate first among them)."""
    def key(run: Run) -> tuple[float, float, float]:
        value = run.loss_at(step)
        bad = run.diverged or not math.isfinite(value)
        return (float(bad), math.inf if bad else value, run.lr if bad else 0.0)
    return key


@dataclass
class Search:
    """The runs of one learning-rate search and the best of them."""

    runs: dict[float, Run] = field(default_factory=dict)
    best: Run | None = None

    @property
    def grid(self) -> list[float]:
        return sorted(self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {"best_lr": self.best.lr if self.best else None, "grid": self.grid,
                "runs": [self.runs[lr].to_dict() for lr in self.grid]}


def grid_lr(start: float, index: int, per_decade: int) -> float:
    """The ``index``-th grid point from ``start`` (rounded to 3 significant digits, so grids are readable)."""
    value = start * 10 ** (index / per_decade)
    return float(f"{value:.3g}")


def search_lr(run: Callable[[float, int | None], Run], start: float, key: Callable[[Run], Any], *,
              per_decade: int = 3, prune: bool = False, max_runs: int = 14) -> Search:
    """Hill-climb the log grid from ``start`` and return every run and the best one.

    ``run(lr, stop_after)`` trains one run; with ``prune=True`` ``stop_after`` is the best run's steps to the
    target (``None`` until a run reaches it).
    """
    found = Search()
    by_index: dict[int, Run] = {}

    def evaluate(i: int) -> Run | None:
        if i in by_index:
            return by_index[i]
        lr = grid_lr(start, i, per_decade)
        if not LR_MIN <= lr <= LR_MAX or len(by_index) >= max_runs:
            return None
        best = found.best
        stop = best.steps_to_target if prune and best is not None and best.reached else None
        r = by_index[i] = found.runs[lr] = run(lr, stop)
        if found.best is None or key(r) < key(found.best):
            found.best = r
        return r

    b, direction = 0, 1
    evaluate(b)
    for step in (per_decade, 1):
        if step == 1:
            direction = promising_side(by_index, b, per_decade, key)
        moved = True
        while moved:
            moved = False
            for j in (b + direction * step, b - direction * step):
                r = evaluate(j)
                if r is not None and key(r) < key(by_index[b]):
                    b, moved, direction = j, True, 1 if j > b else -1
                    break
    if len(by_index) >= max_runs:
        logger.warning("red team: learning-rate search stopped after %d runs (best lr %g)", max_runs, found.best.lr)
    return found


def promising_side(by_index: dict[int, Run], b: int, per_decade: int, key: Callable[[Run], Any]) -> int:
    """Where the fine steps look first: towards the better of the best point's decade neighbours (+1: up). With
    pruning, the better run found first stops the others sooner (the rates that are too high often run the whole
    budget without diverging); on a unimodal landscape the best run is the same."""
    up, down = by_index.get(b + per_decade), by_index.get(b - per_decade)
    if up is None:
        return 1 if down is None else -1
    return -1 if down is not None and key(down) < key(up) else 1
