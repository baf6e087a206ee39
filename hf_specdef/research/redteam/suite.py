"""Run the red team: every attack on the unprotected model and on each protected variant, at its best learning rate.

How the target is set (per uninformed attack): the unprotected model is attacked for ``reference_steps`` steps over
a learning-rate search; with ``L0`` the held-out loss before training and ``L_R`` the best held-out loss after
``reference_steps`` steps, the target is ``L0 - fraction * (L0 - L_R)`` (80% of the gain by default). So the
unprotected model reaches it within ``reference_steps`` by construction, not in its first step, and each attack is
judged against what that same attack achieves on the unprotected model. Informed attacks use the target of their
baseline attack. A protected run that never reaches the target within ``budget`` steps counts as ``budget + 1``
and its slowdown is reported as a lower bound (``>=``).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_specdef.deformation.record import get_record
from hf_specdef.research.redteam.attacks import Attack, get_attacks
from hf_specdef.research.redteam.config import RedTeamConfig
from hf_specdef.research.redteam.data import AttackData, build_attack_data
from hf_specdef.research.redteam.errors import RedTeamError
from hf_specdef.research.redteam.journal import RunJournal, journal_path, run_key
from hf_specdef.research.redteam.prepare import MEASURES, prepare_model, undone_copy
from hf_specdef.research.redteam.reuse import RUN_SETTINGS, EarlierRuns, read_results, settings_differ
from hf_specdef.research.redteam.search import Search, loss_at_key, search_lr, steps_key
from hf_specdef.research.redteam.training import Run, RunSettings, eval_loss, is_main_process, run_attack
from hf_specdef.research.redteam.variants import changed_parameter_names, given_variant, protect_variant, storage_dtype

__all__ = ["RedTeamError", "run_redteam", "protect_variant", "given_variant"]

logger = logging.getLogger("hf_specdef")


@dataclass
class Baseline:
    """An uninformed attack on the unprotected model: its target and steps per seed."""

    attack: Attack
    target: float
    initial_loss: float
    reference_loss: float
    best_lr: float
    steps: dict[int, int | None]
    search: Search
    seed_runs: dict[int, Run]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "initial_loss": self.initial_loss, "reference_loss": self.reference_loss,
                "best_lr": self.best_lr, "steps": self.steps, "search": self.search.to_dict(),
                "seed_runs": {s: r.to_dict() for s, r in self.seed_runs.items()}}

    @classmethod
    def from_dict(cls, attack: Attack, d: dict[str, Any]) -> Baseline:
        """A baseline read back from a ``results.json``."""
        runs = {float(r["lr"]): Run.from_dict(r) for r in d["search"]["runs"]}
        best = runs.get(float(d["search"]["best_lr"])) if d["search"]["best_lr"] is not None else None
        return cls(attack, d["target"], d["initial_loss"], d["reference_loss"], d["best_lr"],
                   {int(k): v for k, v in d["steps"].items()}, Search(runs, best),
                   {int(k): Run.from_dict(r) for k, r in d["seed_runs"].items()})


def load_model(model: Any, tokenizer: Any = None) -> tuple[torch.nn.Module, Any, str]:
    """The unprotected causal LM (float32) and its tokenizer, from a folder or as given."""
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise RedTeamError("run_redteam(model=<module>) needs tokenizer=...: the attack data are tokenized with it.")
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    else:
        path = Path(os.fspath(model))
        if not (path / "config.json").is_file():
            raise RedTeamError(f"{str(path)!r} is not a model folder (no config.json); pass the folder of an unprotected "
                               "causal language model saved with save_pretrained.")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as e:
                raise RedTeamError(f"no usable tokenizer in {str(path)!r} ({e}); the red team tokenizes its attack data "
                                   "with the model's tokenizer: save it next to the model.") from None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        name = str(path)
    if get_record(model):
        raise RedTeamError(f"{name!r} is already protected (its config has a SpecDef record); the red team needs the "
                           "unprotected original: it protects copies itself (variants) and compares.")
    return model.float().eval(), tokenizer, name


class RedTeam:
    """Runs the searches of one red team (see :func:`run_redteam`)."""

    def __init__(self, model: torch.nn.Module, data: AttackData, cfg: RedTeamConfig, progress: bool,
                 journal: RunJournal | None = None, earlier: EarlierRuns | None = None) -> None:
        self.model, self.data, self.cfg, self.journal = model, data, cfg, journal
        self.earlier = earlier or EarlierRuns()
        self.settings = RunSettings(batch_size=cfg.batch_size, eval_every=cfg.eval_every, divergence=cfg.divergence)
        self.progress = progress and is_main_process()
        self.seconds = 0.0  # training in this process
        self.resumed_seconds = 0.0  # training of the runs taken from the journal or from earlier red teams
        self.measured: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {kind: MEASURES result}

    def run(self, model: torch.nn.Module, attack: Attack, lr: float, seed: int, *, target: float | None,
            stop_after: int | None, frozen: tuple[str, ...] = (), label: str = "") -> Run:
        key = run_key(label, attack.name, lr, seed, target, stop_after)
        r, origin = (self.journal.get(key) if self.journal else None), "the journal"
        if r is None:
            r = self.earlier.take(label, attack.name, lr, seed, target, stop_after, self.cfg.budget)
            origin = "an earlier red team"
            if r is not None and self.journal:
                self.journal.add(key, r, write=is_main_process())
        if r is not None:
            self.resumed_seconds += r.seconds
        else:
            origin = ""
            first = self.data.train[: self.cfg.batch_size]
            measured = None
            if attack.train in MEASURES:  # one forward/backward per model and kind, not per run
                per_kind = self.measured.setdefault(model, {})
                if attack.train not in per_kind:
                    per_kind[attack.train] = MEASURES[attack.train][0](model, first)
                measured = per_kind[attack.train]
            work = prepare_model(model, attack, seed, frozen=frozen, first_batch=first, measured=measured)
            r = run_attack(work, attack, self.data, lr=lr, seed=seed, budget=self.cfg.budget, target=target,
                           stop_after=stop_after, settings=self.settings)
            del work
            if self.journal:
                self.journal.add(key, r, write=is_main_process())
            self.seconds += r.seconds
        outcome = f"{r.steps_to_target} steps" if r.reached else "diverged" if r.diverged else \
            f"not reached in {r.stopped_at} (loss {r.curve[-1][1]:.3f})"
        logger.info("red team: %-20s %-18s lr=%-9g seed=%d  %s  (%.0f s%s)", attack.name, label, lr, seed, outcome,
                    r.seconds, f", from {origin}" if origin else "")
        return r

    def reference(self, attack: Attack) -> Baseline:
        """Search the unprotected model's best learning rate for ``attack`` and set its target."""
        cfg, seed0, horizon = self.cfg, self.cfg.seeds[0], self.cfg.reference_steps
        search = search_lr(lambda lr, stop: self.run(self.model, attack, lr, seed0, target=None, stop_after=horizon,
                                                     label="unprotected/ref"),
                           attack.lr_start, loss_at_key(horizon), per_decade=cfg.per_decade, max_runs=cfg.max_runs)
        l0, lr_ref = search.best.curve[0][1], search.best.loss_at(horizon)
        if not (math.isfinite(lr_ref) and lr_ref < l0):
            raise RedTeamError(
                f"attack {attack.name!r}: the unprotected model does not improve its held-out loss ({l0:.4f}) within "
                f"reference_steps={horizon} steps at any learning rate tried ({search.grid}); raise reference_steps, "
                "or check the attack data.")
        target = l0 - cfg.fraction * (l0 - lr_ref)
        best = min((r.with_target(target) for r in search.runs.values()), key=steps_key)
        steps: dict[int, int | None] = {seed0: best.steps_to_target}
        seed_runs = {seed0: best}
        for s in cfg.seeds[1:]:
            seed_runs[s] = self.run(self.model, attack, best.lr, s, target=target, stop_after=None,
                                    label="unprotected")
            steps[s] = seed_runs[s].steps_to_target
        return Baseline(attack, target, l0, lr_ref, best.lr, steps, search, seed_runs)

    def measure(self, model: torch.nn.Module, attack: Attack, base: Baseline, variant: str,
                frozen: tuple[str, ...] = ()) -> dict[str, Any]:
        """Search ``attack``'s best learning rate on the protected ``model``; steps and slowdown per seed."""
        cfg, seed0 = self.cfg, self.cfg.seeds[0]
        start = base.best_lr if attack.informed else base.best_lr / 10
        label = f"{variant}"
        search = search_lr(lambda lr, stop: self.run(model, attack, lr, seed0, target=base.target, stop_after=stop,
                                                     frozen=frozen, label=label),
                           start, steps_key, per_decade=cfg.per_decade, prune=True, max_runs=cfg.max_runs)
        runs = {seed0: search.best}
        for s in cfg.seeds[1:]:
            runs[s] = self.run(model, attack, search.best.lr, s, target=base.target, stop_after=None, frozen=frozen,
                               label=label)
        per_seed = {s: slowdown(r.steps_to_target, base.steps.get(s), cfg.budget) for s, r in runs.items()}
        return {"attack": attack.to_dict(), "target": base.target, "best_lr": search.best.lr,
                "unprotected_best_lr": base.best_lr,
                "steps": {s: r.steps_to_target for s, r in runs.items()},
                "unprotected_steps": base.steps, "slowdown": per_seed, "median": median_slowdown(per_seed.values()),
                "search": search.to_dict(), "seed_runs": {s: r.to_dict() for s, r in runs.items()}}


def slowdown(protected_steps: int | None, unprotected_steps: int | None, budget: int) -> dict[str, Any] | None:
    """Steps ratio; a protected run that never reached the target counts as ``budget + 1`` (a lower bound)."""
    if not unprotected_steps:
        return None
    if protected_steps is None:
        return {"ratio": (budget + 1) / unprotected_steps, "lower_bound": True}
    return {"ratio": protected_steps / unprotected_steps, "lower_bound": False}


def median_slowdown(values: Any) -> dict[str, Any] | None:
    """The lower median over seeds (conservative for the defence), and the range."""
    vals = sorted((v for v in values if v), key=lambda v: v["ratio"])
    if not vals:
        return None
    mid = vals[(len(vals) - 1) // 2]
    return {**mid, "min": vals[0]["ratio"], "max": vals[-1]["ratio"], "min_lower_bound": vals[0]["lower_bound"],
            "max_lower_bound": vals[-1]["lower_bound"], "seeds": len(vals)}


def run_variant(team: RedTeam, name: str, protected: torch.nn.Module, info: dict[str, Any], attacks: list[Attack],
                baselines: dict[str, Baseline]) -> dict[str, Any]:
    """Every attack on one protected model, and its summary."""
    frozen = changed_parameter_names(team.model, protected)
    team.earlier.check_variant(name, info.get("config"))
    has_recipe = bool((get_record(protected) or {}).get("pairs"))
    undone = undone_copy(protected) if any(a.train == "merge-undo" for a in attacks) else None
    entries: dict[str, Any] = {}
    bar = tqdm(attacks, desc=f"red team {name}", unit="attack", disable=not team.progress)
    for attack in bar:
        bar.set_postfix(attack=attack.name)
        reason = skip_reason(attack, info, has_recipe)
        if reason:
            entries[attack.name] = {"attack": attack.to_dict(), "skipped": reason}
            continue
        target_model = undone if attack.train == "merge-undo" else protected
        entries[attack.name] = team.measure(target_model, attack, baselines[attack.baseline or attack.name], name,
                                            frozen=frozen if attack.train == "bypass" else ())
    return {**info, "frozen_by_bypass": len(frozen), "attacks": entries, "summary": summarize(entries)}


def skip_reason(attack: Attack, info: dict[str, Any], has_recipe: bool) -> str | None:
    """Why ``attack`` cannot be run on this protected model (None: it can)."""
    if attack.bf16 and not info["bf16_exact"]:
        return (f"the protection is not exact in bfloat16 (deviation {info['deviation_bfloat16']:.3g}); a bf16 "
                "mixed-precision attacker would train a broken model")
    if attack.knowledge == "recipe" and attack.informed and not has_recipe:
        return "the protected model carries no full protection record (record='full'): there is no recipe to use"
    return None


def summarize(entries: dict[str, Any]) -> dict[str, Any]:
    """Worst case over the uninformed attacks (smallest median slowdown), largest over the informed ones."""
    measured = {n: e for n, e in entries.items() if e.get("median")}
    uninformed = {n: e for n, e in measured.items() if not e["attack"]["informed"]}
    informed = {n: e for n, e in measured.items() if e["attack"]["informed"]}
    out: dict[str, Any] = {"uninformed_attacks": len(uninformed), "informed_attacks": len(informed),
                           "skipped": sorted(n for n, e in entries.items() if "skipped" in e)}
    if uninformed:
        worst = min(uninformed, key=lambda n: uninformed[n]["median"]["ratio"])
        m = uninformed[worst]["median"]
        out.update(worst_case_slowdown=m["ratio"], worst_case_attack=worst, worst_case_lower_bound=m["lower_bound"],
                   worst_case_range=[m["min"], m["max"]])
    if informed:
        undo = max(informed, key=lambda n: informed[n]["median"]["ratio"])
        m = informed[undo]["median"]
        out.update(undo_slowdown=m["ratio"], undo_attack=undo, undo_range=[m["min"], m["max"]])
    return out


def environment() -> dict[str, Any]:
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "device": dev,
            "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None, "threads": torch.get_num_threads(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), "python": platform.python_version()}


def run_redteam(model: Any, out: str | os.PathLike | None = None, config: RedTeamConfig | None = None, *,
                tokenizer: Any = None, protected: dict[str, Any] | None = None,
                reuse_unprotected: str | os.PathLike | dict[str, Any] | None = None,
                reuse_runs: Any = None, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Fine-tune copies of ``model``, unprotected and protected, with the red-team suite; return (and write) results.

    Args:
        model: folder of an unprotected causal LM (with its tokenizer), or the model itself (then pass ``tokenizer``).
        out: folder for ``results.json``, ``results.md`` and PNG plots (written only when the run completes; it must
            not exist yet). ``None``: write nothing.
        config: :class:`RedTeamConfig` (default: its defaults, the full suite on the default protection).
        protected: name -> an already protected copy of ``model`` (a module or a folder), attacked as given in
            addition to ``config.variants`` (e.g. a checkpoint you are about to publish, or your own protection).
        reuse_unprotected: the ``results.json`` (path or dict) of an earlier run on the same model, data and settings:
            its unprotected baselines (targets, steps, learning rates) are reused instead of re-run.
        reuse_runs: ``results.json`` files (paths, folders or dicts; one or a list) of earlier red teams on the same
            model, data and settings, seeds aside: their runs are taken instead of trained wherever they are the runs
            asked for (:mod:`hf_specdef.research.redteam.reuse`), e.g. to add seeds, attacks or variants to an earlier run.
        resume: reuse the finished runs journalled by an interrupted red team with the same ``out`` and settings
            (``<out>.runs.jsonl``, see :mod:`hf_specdef.research.redteam.journal`); without it an existing journal is an error.
    """
    from hf_specdef.research.redteam.report import check_out_dir, write_results

    cfg = config or RedTeamConfig()
    if not cfg.variants and not protected:
        raise RedTeamError("nothing to attack: RedTeamConfig.variants is empty and no protected model was given.")
    if out is not None:
        check_out_dir(out)
    start = time.perf_counter()
    storage = storage_dtype(model)
    model, tokenizer, name = load_model(model, tokenizer)
    data = build_attack_data(tokenizer, cfg.data, seq_len=cfg.seq_len, eval_windows=cfg.eval_windows,
                             min_train_windows=cfg.batch_size * 4, text_field=cfg.text_field)
    logger.info("red team: %s on %s (%d training windows, %d held out)", name, data.source, len(data.train),
                len(data.eval))
    attacks = get_attacks(cfg.attacks)
    if cfg.attacks is not None:  # a baseline added only for an informed attack is not itself run on the variants
        baseline_only = [a.name for a in attacks if a.name not in cfg.attacks]
        if baseline_only:
            logger.info("red team: %s run on the unprotected model only (the baseline of an informed attack)",
                        ", ".join(baseline_only))
    earlier = EarlierRuns.load(reuse_runs, cfg, data.describe())
    journal = None
    if out is not None:
        header = {"model": name, "data": data.describe(), "settings": cfg.to_dict(), "protected": sorted(protected or {})}
        journal = RunJournal(journal_path(out), header, resume=resume)
    try:
        team = RedTeam(model, data, cfg, progress, journal, earlier)
        results = _attack_all(team, name, data, cfg, storage, attacks, protected, reuse_unprotected)
    except BaseException:
        if journal is not None and journal.runs and is_main_process():
            logger.error("red team: stopped; its %d finished runs are kept in %s: run the same command with --resume "
                         "to continue from them", len(journal.runs), journal.path)
        raise
    results["wall_seconds"] = time.perf_counter() - start
    if out is not None and is_main_process():
        write_results(results, out)
        journal.remove()
    return results


def _attack_all(team: RedTeam, name: str, data: AttackData, cfg: RedTeamConfig, storage: torch.dtype,
                attacks: list[Attack], protected: dict[str, Any] | None, reuse_unprotected: Any) -> dict[str, Any]:
    """The baselines, then every attack on every variant; the results dict (without its wall time)."""
    model = team.model
    given = {n: given_variant(model, p, data.eval) for n, p in (protected or {}).items()}
    reused = reused_baselines(reuse_unprotected, cfg, data, attacks)
    baselines = {a.name: reused.get(a.name) or team.reference(a) for a in tqdm(
        [a for a in attacks if not a.informed], desc="red team unprotected", unit="attack", disable=not team.progress)}
    attacked = [a for a in attacks if cfg.attacks is None or a.name in cfg.attacks]
    variants = {}
    for v in cfg.variants:
        variants[v] = run_variant(team, v, *protect_variant(model, v, cfg, data.eval, storage), attacked, baselines)
    for v, (pm, info) in given.items():
        variants[v] = run_variant(team, v, pm, info, attacked, baselines)
    head = next(iter(variants))
    return {
        "model": name, "data": data.describe(), "settings": {**cfg.to_dict(), "budget": cfg.budget},
        "environment": environment(), "initial_eval_loss": eval_loss(model, data.eval),
        "unprotected": {n: b.to_dict() for n, b in baselines.items()}, "reused_unprotected": sorted(reused),
        "variants": variants, "summary": {"variant": head, **variants[head]["summary"], "seeds": len(cfg.seeds),
                                          "preset": cfg.preset},
        "train_seconds": team.seconds, "resumed_train_seconds": team.resumed_seconds,
        "reused_runs": team.earlier.describe(),
    }


SAME_SETTINGS = ("seeds", "fraction", *RUN_SETTINGS)  # baselines: also the same seeds and target rule


def reused_baselines(source: Any, cfg: RedTeamConfig, data: AttackData, attacks: list[Attack]) -> dict[str, Baseline]:
    """Baselines from an earlier ``results.json`` with the same settings and data (empty without a source)."""
    if source is None:
        return {}
    old = read_results(source)
    differ = settings_differ(old, cfg, data.describe(), SAME_SETTINGS)
    if differ:
        raise RedTeamError(f"reuse_unprotected: the earlier run differs in {differ}; its baselines would "
                           "not be comparable. Run without reuse, or with the same settings.")
    return {a.name: Baseline.from_dict(a, old["unprotected"][a.name]) for a in attacks
            if not a.informed and a.name in old["unprotected"]}
