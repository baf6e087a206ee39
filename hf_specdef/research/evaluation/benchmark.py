"""The convergence benchmark: steps-to-target of unprotected, protected, undone and bypassing attacks (see docs/redteam.md).

For a scenario (a model pretrained on one task, fine-tuned by the attacker on another), every *variant*
is attacked with SGD and Adam over a learning-rate grid and the best learning rate is kept:

==================  ========  ==========================================================================
variant             alpha     trained parameters
==================  ========  ==========================================================================
unprotected         --        the parameters the protection would deform ("sites"), full fine-tuning
protected-a{A}      A         the deformed parameters, full fine-tuning
unprotected-lora    --        LoRA adapters on every projection
protected-lora      max       LoRA adapters on every projection
specundo            max       SpecUndo adapters (blind: the attacker has only the weights)
merge-undo          max       the deformed parameters, after a blind in-place undo (``hf_specdef.undo.merge``)
bypass              max       only the parameters protection leaves alone (embeddings, head, final norm)
==================  ========  ==========================================================================

The target loss is set from the unprotected model: the best unprotected Adam run over the first
``budget / 20`` steps improves the evaluation loss from ``L0`` to ``Lmin``; the target is
``L0 - fraction * (L0 - Lmin)``. So the unprotected model reaches it within ``budget / 20`` steps by
construction, and the budget is at least 20 times its steps-to-target: a run that never reaches the target
counts as ``budget + 1`` steps, and a 10x slowdown is provable.

Learning rates are tried from the largest down, and each run stops once it has used as many steps as the
best run so far needed (:func:`~hf_specdef.research.evaluation.runner.sweep` with ``prune=True``): the best learning
rate and its steps-to-target are exact; the other runs' entries say where they were stopped (``pruned_at``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_specdef.config import SpecDefConfig
from hf_specdef.protection.in_memory import protect
from hf_specdef.research.evaluation.runner import (
    AttackConfig,
    RunResult,
    UndoUnavailableError,
    best_run,
    site_parameter_names,
    sweep,
)

logger = logging.getLogger("hf_specdef")

ADAM_LRS = (1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2)
SGD_LRS = (1e-7, 1e-5, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class Variant:
    """One attacked configuration: a protection strength (None = unprotected) and what is trained."""

    name: str
    alpha: float | None
    train: str
    knowledge: str = "blind"
    merge_undo: bool = False  # attack a copy whose weights hf_specdef.undo.merge.undo_in_place rewrote back


@dataclass
class BenchConfig:
    """Settings of one benchmark run (see :func:`run_benchmark`)."""

    scenario: str = "text"
    alphas: tuple[float, ...] = (10.0, 100.0, 1000.0)
    optimizers: tuple[str, ...] = ("adam", "sgd")
    adam_lrs: tuple[float, ...] = ADAM_LRS
    sgd_lrs: tuple[float, ...] = SGD_LRS
    reference_steps: int = 15
    budget_factor: int = 20
    fraction: float = 0.8
    divergence: float = 1.5
    r: int = 8
    seed: int = 0
    sgd_variants: tuple[str, ...] | None = None  # None: all variants
    variant_names: tuple[str, ...] | None = None  # None: all variants (see variants())
    sites: tuple[str, ...] = ("attn.vo", "attn.qk", "mlp", "norm")
    mode: str = "spectral"
    scenario_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def budget(self) -> int:
        return self.reference_steps * self.budget_factor

    def __post_init__(self) -> None:
        if self.budget_factor < 20:
            raise ValueError(f"BenchConfig.budget_factor={self.budget_factor} is too small: use >= 20 so that a "
                             "10x slowdown is provable.")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"BenchConfig.fraction={self.fraction} is invalid: use 0 < fraction <= 1.")
        for name in ("adam_lrs", "sgd_lrs"):
            if len(getattr(self, name)) < 6:
                raise ValueError(f"BenchConfig.{name} has {len(getattr(self, name))} learning rates: use >= 6.")

    @classmethod
    def preset(cls, name: str, **kw: Any) -> BenchConfig:
        """``"quick"`` (<= 10 min on 2 CPU cores), ``"full"``, or ``"tiny"`` (a smoke test of seconds)."""
        if name == "quick":
            base: dict[str, Any] = dict(reference_steps=15, sgd_variants=("unprotected", "protected-a1000",
                                                                           "unprotected-lora", "specundo", "bypass"))
        elif name == "full":
            base = dict(reference_steps=25, adam_lrs=(1e-7, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
                        sgd_lrs=(1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.3, 1.0),
                        scenario_kwargs=dict(pretrain_steps=800))
        elif name == "demo":
            base = dict(reference_steps=15, alphas=(1000.0,), optimizers=("adam",),
                        variant_names=("unprotected", "protected-a1000", "unprotected-lora", "specundo", "merge-undo",
                                       "bypass"))
        elif name == "tiny":
            base = dict(reference_steps=2, alphas=(1000.0,), sgd_variants=("unprotected", "protected-a1000"),
                        scenario_kwargs=dict(pretrain_steps=20, attack_batches=4, batch_size=4, seq_len=32, eval_windows=4,
                                             model_kwargs=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)))
        else:
            raise ValueError(f"unknown benchmark preset {name!r}: use 'quick', 'full', 'demo' or 'tiny'.")
        base.update(kw)
        return cls(**base)

    def variants(self) -> list[Variant]:
        top = max(self.alphas)
        v = [Variant("unprotected", None, "sites")]
        v += [Variant(f"protected-a{a:g}", a, "sites") for a in sorted(self.alphas)]
        v += [Variant("unprotected-lora", None, "lora"), Variant("protected-lora", top, "lora"),
              Variant("specundo", top, "specundo", "blind"), Variant("merge-undo", top, "sites", "blind", True),
              Variant("bypass", top, "bypass")]
        if self.variant_names is not None:
            unknown = sorted(set(self.variant_names) - {x.name for x in v})
            if unknown:
                raise ValueError(f"BenchConfig.variant_names has unknown variants {unknown}; known: {[x.name for x in v]}.")
            v = [x for x in v if x.name in self.variant_names]
        if not v or v[0].name != "unprotected":
            raise ValueError("BenchConfig.variant_names must include 'unprotected' (it sets the target).")
        return v

    def to_dict(self) -> dict[str, Any]:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        d["budget"] = self.budget
        return d


def make_scenario(name: str, **kw: Any) -> Any:
    """The scenario object for ``name`` (``"text"`` or ``"digits"``)."""
    if name == "text":
        from hf_specdef.research.evaluation.scenarios.text import TextScenario

        return TextScenario(**kw)
    if name == "digits":
        from hf_specdef.research.evaluation.scenarios.digits import DigitsScenario

        return DigitsScenario(**kw)
    raise ValueError(f"unknown scenario {name!r}: use 'text' or 'digits'.")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    level = logger.level
    if level <= logging.INFO:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _lrs(cfg: BenchConfig, opt: str) -> tuple[float, ...]:
    return cfg.adam_lrs if opt == "adam" else cfg.sgd_lrs


def _summ(r: RunResult) -> dict[str, Any]:
    return {"lr": r.lr, "steps_to_target": r.steps_to_target, "reached": r.reached, "diverged": r.diverged,
            "final_loss": r.curve[-1] if r.curve else None, "steps_run": len(r.curve),
            "trainable_params": r.trainable_params, "seconds": round(r.seconds, 2),
            "pruned_at": r.extra.get("pruned_at")}


def run_benchmark(cfg: BenchConfig, out: str | os.PathLike, *, progress: bool = True,
                  base: torch.nn.Module | None = None) -> dict[str, Any]:
    """Run the benchmark, write ``results.json``, ``results.md`` and PNG plots into ``out``; return the results.

    ``base`` is the pretrained (unprotected) model; by default the scenario builds it.
    """
    from hf_specdef.research.evaluation import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scenario = make_scenario(cfg.scenario, seed=cfg.seed, **cfg.scenario_kwargs)
    logger.info("benchmark: scenario %s (%s), budget %d steps", cfg.scenario, scenario.description, cfg.budget)
    base = base if base is not None else scenario.build_model(progress=progress)
    t_pretrain = time.perf_counter() - start

    # Protect one copy per alpha (verification on the scenario's own probe batch).
    models: dict[float | str | None, torch.nn.Module] = {None: base}
    protection: dict[str, Any] = {}
    for a in sorted(cfg.alphas):
        pm = copy.deepcopy(base)
        spec_cfg = SpecDefConfig(alpha=a, sites=cfg.sites, mode=cfg.mode, record="full")
        report = protect(pm, spec_cfg, inputs=scenario.probe_inputs(pm), progress=False)
        models[a] = pm
        protection[f"{a:g}"] = {"max_relative_deviation": report.deviation, "sites": report.sites,
                                "hot_modules": len(report.hot_modules), "cold_only_modules": len(report.cold_modules),
                                "sigma_after_max": max(r.sigma_after for r in report.results)}
        logger.info("benchmark: protected at alpha=%g, %d pairs, deviation %.2e", a, len(report.results), report.deviation)
    variants = cfg.variants()
    skipped: dict[str, str] = {}
    if any(v.merge_undo for v in variants):
        try:
            from hf_specdef.undo.merge import undo_in_place

            merged = copy.deepcopy(models[max(cfg.alphas)])
            with _quiet():
                undone = undo_in_place(merged, "blind", progress=False)
            models["merge"] = merged
            protection["merge_undo"] = {"sites_undone": undone.num_sites}
        except ImportError as e:
            skipped["merge-undo"] = f"hf_specdef.undo.merge is not available in this build ({e})"
    site_names = site_parameter_names(models[max(cfg.alphas)])
    n_params = sum(p.numel() for p in base.parameters())
    n_sites = sum(p.numel() for n, p in base.named_parameters() if n in set(site_names))

    def attack(variant: Variant, opt: str, budget: int, target: float | None) -> list[RunResult]:
        ac = AttackConfig(train=variant.train, optimizer=opt, steps=budget, seed=cfg.seed, site_names=site_names,
                          target_modules=scenario.lora_targets, r=cfg.r, knowledge=variant.knowledge, target=target,
                          stop_at_target=target is not None, divergence=cfg.divergence)
        prune = target is not None
        with _quiet():  # adapters log per model; one line per run would drown the progress bars
            model = models["merge" if variant.merge_undo else variant.alpha]
            return sweep(model, scenario.loss, scenario.batches, ac, sorted(_lrs(cfg, opt), reverse=True),
                         eval_fn=scenario.eval_loss, label=f"{variant.name}/{opt}", progress=progress, prune=prune)

    # 1. The target, from the unprotected model's best Adam run over the reference window.
    ref_opt = "adam" if "adam" in cfg.optimizers else cfg.optimizers[0]
    reference = attack(variants[0], ref_opt, cfg.reference_steps, None)
    l0 = scenario.eval_loss(base)
    lmin = min(min(r.curve) for r in reference if r.curve)
    if not lmin < l0:
        raise RuntimeError(f"the unprotected model did not improve in {cfg.reference_steps} reference steps "
                           f"(eval loss {l0:.4f} -> {lmin:.4f}); raise reference_steps or the learning rates.")
    target = l0 - cfg.fraction * (l0 - lmin)
    logger.info("benchmark: initial eval loss %.4f, reference best %.4f, target %.4f", l0, lmin, target)

    # 2. Every variant x optimizer x learning rate, stopping at the target (or the budget).
    runs: dict[str, dict[str, list[RunResult]]] = {}
    jobs = [(v, o) for o in cfg.optimizers for v in variants if v.name not in skipped
            and (o == "adam" or cfg.sgd_variants is None or v.name in cfg.sgd_variants)]
    for v, opt in tqdm(jobs, desc="benchmark", unit="variant", disable=not progress):
        if v.name == "unprotected" and opt == ref_opt:  # the reference runs: the best reached within the window
            done = [r.with_target(target) for r in reference]
            for r in done:
                if not r.reached and not r.diverged:
                    r.extra["pruned_at"] = cfg.reference_steps
                r.budget = cfg.budget
                r.steps_to_target = r.steps_to_target if r.reached else cfg.budget + 1
            runs.setdefault(v.name, {})[opt] = done
            continue
        try:
            runs.setdefault(v.name, {})[opt] = attack(v, opt, cfg.budget, target)
        except UndoUnavailableError as e:
            skipped[v.name] = str(e)
            logger.warning("benchmark: %s skipped: %s", v.name, e)
            runs.pop(v.name, None)

    results = _collect(cfg, variants, runs, skipped, target, l0, lmin, protection)
    results["timing"] = {"total_seconds": round(time.perf_counter() - start, 1), "pretrain_seconds": round(t_pretrain, 1),
                         "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                         "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                         "platform": platform.platform(), "device": str(next(base.parameters()).device)}
    results["model"] = {"parameters": n_params, "site_parameters": n_sites, "site_tensors": len(site_names),
                        "scenario": cfg.scenario, "description": scenario.description}
    results = _finite(results)
    results["plots"] = plots.write_plots(results, out)
    results["table_markdown"] = markdown_table(results)
    (out / "results.md").write_text(results["table_markdown"] + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    return results


def _finite(o: Any) -> Any:
    """JSON-safe copy: non-finite floats (diverged runs) become None, tuples lists, other objects strings."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if o is None or isinstance(o, (str, int, bool)):
        return o
    return str(o)


def _ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> float | None:
    """Steps ratio; None when either side is missing or the reference never reached the target (undefined)."""
    if not num or not den or not den.get("steps_to_target") or not den.get("reached"):
        return None
    return num["steps_to_target"] / den["steps_to_target"]


def _collect(cfg: BenchConfig, variants: list[Variant], runs: dict[str, dict[str, list[RunResult]]],
             skipped: dict[str, str], target: float, l0: float, lmin: float, protection: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for v in variants:
        for opt, rs in runs.get(v.name, {}).items():
            b = best_run(rs, target)
            table.setdefault(v.name, {})[opt] = {**_summ(b), "alpha": v.alpha, "train": v.train,
                                                 "sweep": [_summ(r) for r in rs]}
            curves.setdefault(v.name, {})[opt] = [{"lr": r.lr, "curve": r.curve, "train_loss": r.losses} for r in rs]
    top = f"protected-a{max(cfg.alphas):g}"

    def get(name: str, opt: str) -> dict[str, Any] | None:
        return table.get(name, {}).get(opt)

    summary: dict[str, Any] = {"target_loss": target, "initial_loss": l0, "reference_best_loss": lmin,
                               "budget": cfg.budget, "alpha": max(cfg.alphas)}
    for opt, suffix in (("adam", ""), ("sgd", "_sgd")):
        summary[f"slowdown_protected{suffix}"] = _ratio(get(top, opt), get("unprotected", opt))
        summary[f"slowdown_undo{suffix}"] = _ratio(get("specundo", opt), get("unprotected-lora", opt))
        summary[f"slowdown_undo_vs_full{suffix}"] = _ratio(get("specundo", opt), get("unprotected", opt))
        summary[f"slowdown_protected_lora{suffix}"] = _ratio(get("protected-lora", opt), get("unprotected-lora", opt))
        summary[f"slowdown_bypass{suffix}"] = _ratio(get("bypass", opt), get("unprotected", opt))
        summary[f"slowdown_merge_undo{suffix}"] = _ratio(get("merge-undo", opt), get("unprotected", opt))
        for a in cfg.alphas:
            summary[f"slowdown_protected_a{a:g}{suffix}"] = _ratio(get(f"protected-a{a:g}", opt), get("unprotected", opt))
        summary[f"protected_reached{suffix}"] = bool(get(top, opt) and get(top, opt)["reached"])
        u = get("unprotected", opt)
        summary[f"unprotected_steps{suffix}"] = u["steps_to_target"] if u else None
    sp, su = summary["slowdown_protected"], summary["slowdown_undo"]
    summary["meets_target_protected"] = None if sp is None else sp >= 10
    summary["meets_target_undo"] = None if su is None else su <= 1.5
    u = get("unprotected", "adam")
    summary["budget_ok"] = bool(u and u["reached"] and cfg.budget >= 20 * u["steps_to_target"])
    notes = [
        "slowdown = best steps-to-target of the variant / best steps-to-target of its unprotected counterpart "
        "(full fine-tuning of the same parameters for protected-a*/bypass, LoRA of the same rank and modules for "
        "protected-lora/specundo); the best of the learning-rate sweep is taken per variant; a run that never "
        "reaches the target counts as budget+1, so such ratios are lower bounds.",
        f"a run whose evaluation loss exceeds {cfg.divergence}x its first value is stopped as diverged.",
    ]
    notes += [f"{k} skipped: {m}" for k, m in skipped.items()]
    return {"config": cfg.to_dict(), "summary": summary, "table": table, "curves": curves,
            "protection": protection, "skipped": skipped, "notes": notes}


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown table (one row per variant and optimizer) plus the summary line."""
    s = results["summary"]
    budget = s["budget"]
    lines = [f"Target loss {s['target_loss']:.4f} (initial {s['initial_loss']:.4f}); budget {budget} steps; "
             f"never reached = {budget + 1}.", "",
             "| variant | optimizer | trained | best lr | steps to target | slowdown | final loss | params trained |",
             "|---|---|---|---|---|---|---|---|"]
    base_for = {"unprotected": "unprotected", "unprotected-lora": "unprotected-lora", "protected-lora": "unprotected-lora",
                "specundo": "unprotected-lora"}
    for name, per_opt in results["table"].items():
        for opt, row in per_opt.items():
            ref = results["table"].get(base_for.get(name, "unprotected"), {}).get(opt)
            ratio = _ratio(row, ref)
            steps = f"{row['steps_to_target']}" if row["reached"] else f">{budget} (never)"
            rtxt = "-" if ratio is None else (f"{ratio:.2f}x" if row["reached"] else f">={ratio:.1f}x")
            final = "nan" if row["final_loss"] is None else f"{row['final_loss']:.4f}"
            lines.append(f"| {name} | {opt} | {row['train']} | {row['lr']:.0e} | {steps} | {rtxt} | "
                         f"{final} | {row['trainable_params']:,} |")
    for name in results.get("skipped", {}):
        lines.append(f"| {name} | - | skipped | - | - | - | - | - |")
    lines.append("")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines.append(f"**slowdown_protected** (Adam, alpha={s['alpha']:g}) = {fmt(s['slowdown_protected'])}"
                 f"{' (lower bound: never reached)' if not s['protected_reached'] else ''}; "
                 f"**slowdown_undo** (Adam) = {fmt(s['slowdown_undo'])}; SGD: protected {fmt(s['slowdown_protected_sgd'])}, "
                 f"undo {fmt(s['slowdown_undo_sgd'])}; bypass: Adam {fmt(s['slowdown_bypass'])}, "
                 f"SGD {fmt(s['slowdown_bypass_sgd'])}.")
    return "\n".join(lines)
