"""Runs of earlier red teams taken as finished runs: add seeds, attacks or variants to a red team without retraining.

A red team's runs are deterministic given what they train (label, attack, learning rate, seed, target) and its
settings, and its learning-rate searches are deterministic given their runs. So the runs of an earlier
``results.json`` with the same model, data and settings (the seeds may differ) can stand for new ones: re-running
the searches with them asks for the same runs, and only what is missing is trained (e.g. seeds 1 and 2 after a
one-seed run: two runs per attack instead of a search). A run is taken only where it is conclusive for the run asked
for: it went at least as far as the new one may go (``stop_after``, else the budget), or it ended on its own earlier
(target reached or diverged); a longer run is cut to the new one's stop. A variant's runs are taken only if the
earlier run protected it with the same configuration.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from hf_specdef.research.redteam.config import RedTeamConfig
from hf_specdef.research.redteam.errors import RedTeamError
from hf_specdef.research.redteam.training import Run, _copy

logger = logging.getLogger("hf_specdef")

UNPROTECTED_LABELS = ("unprotected/ref", "unprotected")
# settings that decide what a run trains (the seeds only say which runs are asked for)
RUN_SETTINGS = ("seq_len", "batch_size", "eval_windows", "reference_steps", "budget_factor", "divergence",
                "eval_every", "data", "text_field")

Identity = tuple[str, str, float, int, "float | None"]


def identity(label: str, attack: str, lr: float, seed: int, target: float | None) -> Identity:
    return (label, attack, float(lr), int(seed), None if target is None else float(target))


def cut(run: Run, limit: int) -> Run | None:
    """``run`` as a run stopped after ``limit`` steps would have been; None if it stopped too early to tell."""
    ended = run.reached or run.diverged  # ended on its own: a longer allowance would not have changed it
    if run.stopped_at <= limit:
        return run if ended or run.stopped_at == limit else None
    curve = [(s, v) for s, v in run.curve if s <= limit]
    if curve[-1][0] != limit:  # not evaluated at the new stop (eval_every > 1)
        return None
    hit = run.steps_to_target if run.reached and run.steps_to_target <= limit else None
    return _copy(run, curve=curve, steps_to_target=hit, diverged=False, stopped_at=limit)


class EarlierRuns:
    """The runs of earlier ``results.json`` files, by what they trained."""

    def __init__(self) -> None:
        self.runs: dict[Identity, list[Run]] = defaultdict(list)
        self.configs: dict[str, Any] = {}  # variant label -> the SpecDefConfig dict it was protected with
        self.sources: list[str] = []
        self.taken = 0

    @classmethod
    def load(cls, sources: Any, cfg: RedTeamConfig, data_description: dict[str, Any]) -> EarlierRuns:
        """From ``results.json`` paths or dicts (one or a list) of red teams with the same settings and data."""
        pool = cls()
        items = sources if isinstance(sources, list | tuple) else [sources] if sources is not None else []
        for source in items:
            pool.add_results(read_results(source), cfg, data_description, str(source) if not isinstance(source, dict) else
                             "<dict>")
        return pool

    def add_results(self, old: dict[str, Any], cfg: RedTeamConfig, data_description: dict[str, Any],
                    name: str) -> None:
        differ = settings_differ(old, cfg, data_description, RUN_SETTINGS)
        if differ:
            raise RedTeamError(f"reuse_runs {name}: the earlier red team differs in {differ}; its runs "
                               "would not be the runs asked for. Reuse only runs of the same model, data and settings.")
        first_seed = (old["settings"].get("seeds") or [0])[0]
        for base in old.get("unprotected", {}).values():
            for r in base["search"]["runs"]:
                self._add("unprotected/ref", r)
            for seed, r in base.get("seed_runs", {}).items():
                if int(seed) != first_seed:  # the first seed's entry is a search run judged against the target
                    self._add("unprotected", r)
        for variant, v in old.get("variants", {}).items():
            if variant in self.configs and self.configs[variant] != v.get("config"):
                raise RedTeamError(f"reuse_runs {name}: variant {variant!r} was protected differently in two earlier "
                                   "red teams; reuse one of them.")
            self.configs[variant] = v.get("config")
            for entry in v.get("attacks", {}).values():
                for r in entry.get("search", {}).get("runs", []) + list(entry.get("seed_runs", {}).values()):
                    self._add(variant, r)
        self.sources.append(name)
        logger.info("red team: %d earlier runs from %s", sum(map(len, self.runs.values())), name)

    def _add(self, label: str, d: dict[str, Any]) -> None:
        run = Run.from_dict(d)
        key = identity(label, run.attack, run.lr, run.seed, run.target)
        if not any(r.to_dict() == run.to_dict() for r in self.runs[key]):
            self.runs[key].append(run)

    def check_variant(self, label: str, config: dict[str, Any] | None) -> None:
        """Drop ``label``'s earlier runs if they attacked a differently protected model."""
        if label in self.configs and self.configs[label] != json.loads(json.dumps(config)):
            logger.warning("red team: the earlier runs of variant %r protected it differently; they are not reused",
                           label)
            for key in [k for k in self.runs if k[0] == label]:
                del self.runs[key]
            del self.configs[label]

    def take(self, label: str, attack: str, lr: float, seed: int, target: float | None,
             stop_after: int | None, budget: int) -> Run | None:
        """An earlier run that is this run, or None."""
        if label not in UNPROTECTED_LABELS and label not in self.configs:
            return None
        limit = min(stop_after, budget) if stop_after is not None else budget
        for run in self.runs.get(identity(label, attack, lr, seed, target), []):
            if run.budget != budget:
                continue
            found = cut(run, limit)
            if found is not None:
                self.taken += 1
                return found
        return None

    def describe(self) -> dict[str, Any]:
        return {"sources": self.sources, "runs_taken": self.taken}


def settings_differ(old: dict[str, Any], cfg: RedTeamConfig, data_description: dict[str, Any],
                    keys: tuple[str, ...]) -> list[str]:
    """The ``keys`` of ``cfg`` (and ``"data"`` for the attack data) in which an earlier ``results.json`` differs."""
    mine = json.loads(json.dumps(cfg.to_dict()))
    differ = [k for k in keys if old.get("settings", {}).get(k) != mine[k]]
    return differ + (["data"] if old.get("data") != json.loads(json.dumps(data_description)) else [])


def read_results(source: Any) -> dict[str, Any]:
    """An earlier red team's results: a ``results.json`` path, its folder, or the results dict itself."""
    if isinstance(source, dict):
        from hf_specdef.research.redteam.report import _json_safe

        return json.loads(json.dumps(_json_safe(source)))
    path = Path(os.fspath(source))
    if path.is_dir():
        path = path / "results.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RedTeamError(f"cannot read the earlier red team {str(path)!r} ({e}); pass the results.json of an earlier red "
                           "team (or its folder).") from None
