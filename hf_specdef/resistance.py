"""Resistance figures for a model card: the quick toy measurement of ``publish(measure=True)``, and the worst case of
a red team on real weights (:mod:`hf_specdef.redteam`) read from its ``results.json`` (``publish(redteam=...)``).

Both give the card's ``measure`` block: ``{"description", "rows": [{"variant", "steps", "slowdown", "best_lr"}],
"summary"}``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import SpecDefConfig
from .errors import SpecDefError

_CAUSAL_LM = ("ForCausalLM", "LMHeadModel")
_COMPARED = ("alpha", "mode", "sites", "top_k", "layers")


class ResistanceError(SpecDefError, ValueError):
    """The resistance figures cannot be produced or do not belong to this release."""


@dataclass
class MeasureConfig:
    """The quick resistance measurement of ``publish(measure=...)`` (causal language models).

    A synthetic next-token task (a fixed random map on ``vocab`` tokens: learnable by any causal LM) is
    fine-tuned with Adam at each of ``lrs`` for ``steps`` steps, on the original and on the protected model,
    training the deformed parameters (``sites``) and, honestly, everything else (``bypass``, not slowed). The
    target loss is halfway between the initial loss and the best loss the original reaches; the best learning
    rate per variant counts.
    """

    steps: int = 100
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    batch_size: int = 8
    seq_len: int = 32
    vocab: int = 64
    num_batches: int = 16
    seed: int = 0
    bypass: bool = True


def _synthetic_batches(vocab_size: int, mc: MeasureConfig) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(mc.seed)
    v = min(mc.vocab, vocab_size)
    nxt = torch.randperm(v, generator=g)  # token t is always followed by nxt[t]
    out = []
    for _ in range(mc.num_batches):
        seq = [torch.randint(0, v, (mc.batch_size,), generator=g)]
        for _ in range(mc.seq_len - 1):
            seq.append(nxt[seq[-1]])
        out.append(torch.stack(seq, dim=1))
    return out


def measure_resistance(original: Path, protected: Path, info: Any, cfg: SpecDefConfig,
                       mc: MeasureConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Quick resistance measurement with the evaluation harness (:mod:`hf_specdef.evaluation.runner`).

    Returns ``{"description", "rows": [{"variant", "steps", "slowdown"}], "summary", "target", "config"}``.
    """
    mc = mc or MeasureConfig()
    if info.kind != "transformers" or not info.class_name.endswith(_CAUSAL_LM):
        raise ResistanceError(f"measure=True supports causal language models (...ForCausalLM) in this build, not "
                           f"{info.class_name}; for diffusion models run scripts/convergence_bench.py instead")
    try:
        from .evaluation import runner
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("hf_specdef"):
            raise
        raise ResistanceError("measure=True needs the evaluation harness (hf_specdef.evaluation), which is not available "
                           "in this build; publish without --measure") from None
    import transformers

    cls = getattr(transformers, info.class_name)
    models = {k: cls.from_pretrained(p, dtype=torch.float32) for k, p in (("original", original), ("protected", protected))}
    batches = _synthetic_batches(models["original"].config.vocab_size, mc)
    device = next(models["original"].parameters()).device
    names = runner.site_parameter_names(models["original"], cfg)

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device)
        return model(input_ids=batch, labels=batch).loss

    modes = ("sites", "bypass") if mc.bypass else ("sites",)
    runs: dict[tuple[str, str], list[Any]] = {}
    for train in modes:
        for which, model in models.items():
            ac = runner.AttackConfig(train=train, optimizer="adam", steps=mc.steps, seed=mc.seed, site_names=names)
            runs[which, train] = runner.sweep(model, loss_fn, lambda s: runner.cycle(batches, s), ac, mc.lrs,
                                              label=f"{which}/{train}", progress=progress)
    ref = runs["original", "sites"]
    start = max(r.curve[0] for r in ref if r.curve)
    best = min((v for r in ref for v in r.curve if math.isfinite(v)), default=start)
    target = start - 0.5 * (start - best)
    rows, summary = [], {}
    for train in modes:
        steps = {w: runner.best_run(runs[w, train], target) for w in models}
        base = steps["original"].steps_to_target
        for which, r in steps.items():
            n, reached = r.steps_to_target, r.steps_to_target <= mc.steps
            slow = n / base if base else float("nan")
            rows.append({
                "variant": f"{which}, training the {'deformed' if train == 'sites' else 'other (undeformed)'} parameters",
                "steps": n if reached else f"> {mc.steps} (not reached)",
                "slowdown": f"{slow:.1f}x" + ("" if reached else " (lower bound)"),
                "best_lr": r.lr,
            })
            summary[f"{which}_{train}_steps"] = n
        summary[f"slowdown_{train}"] = steps["protected"].steps_to_target / max(base, 1)
    description = (
        f"Quick measurement (Adam, best of {len(mc.lrs)} learning rates {', '.join(f'{x:g}' for x in mc.lrs)}, "
        f"{mc.steps} steps) on a synthetic next-token task over {min(mc.vocab, models['original'].config.vocab_size)} "
        f"tokens: steps until the loss falls halfway from its start ({start:.3g}) to the best loss the original reaches "
        f"({best:.3g}), i.e. target {target:.3g}. A run that never reaches it counts as {mc.steps + 1}. This is an "
        "indication on a toy task, not a guarantee; an informed attacker undoes the deformation (see below)."
    )
    return {"description": description, "rows": rows, "summary": summary, "target": target, "config": asdict(mc)}


def redteam_measure(results: dict[str, Any] | str | os.PathLike, cfg: SpecDefConfig | None = None) -> dict[str, Any]:
    """The card's ``measure`` block from a red-team ``results.json`` (worst case first, then every attack).

    With ``cfg``, the measured variant must be the protection being published (same alpha, mode, sites, top_k,
    layers); otherwise :class:`ResistanceError`: a card must not quote figures of another protection.
    """
    from .redteam.report import fmt_ratio, headline

    if not isinstance(results, dict):
        path = Path(os.fspath(results))
        if not path.is_file():
            raise ResistanceError(f"red-team results {str(path)!r} not found; run `hf-specdef redteam MODEL --out DIR` "
                                  "and pass DIR/results.json.")
        results = json.loads(path.read_text(encoding="utf-8"))
    s = results["summary"]
    variant = results["variants"][s["variant"]]
    measured = variant.get("config", {})
    if cfg is not None and measured:
        mine = cfg.to_dict()
        differ = [k for k in _COMPARED if k in measured and _norm(measured[k]) != _norm(mine[k])]
        if differ:
            raise ResistanceError(
                f"the red-team results measured another protection ({', '.join(f'{k}={measured[k]!r}' for k in differ)}"
                f"; publishing {', '.join(f'{k}={mine[k]!r}' for k in differ)}); re-run the red team on this "
                "configuration or publish without them.")
    rows = []
    for name, e in variant["attacks"].items():
        if "skipped" in e:
            continue
        steps = ", ".join("never" if v is None else str(v) for v in e["steps"].values())
        rows.append({"variant": f"{name}{' (informed)' if e['attack']['informed'] else ''}: {e['attack']['description']}",
                     "steps": f"{steps} (unprotected {', '.join(str(v) for v in e['unprotected_steps'].values())})",
                     "slowdown": fmt_ratio(e["median"]), "best_lr": e["best_lr"]})
    st = results["settings"]
    description = (
        f"{headline(results)} Red team (`hf-specdef redteam`, preset `{st['preset']}`) on {results['model']}: "
        f"fine-tuning on {results['data']['source']}, each attack at its best learning rate (grid of "
        f"{st['per_decade']} per decade around the optimum), steps until the held-out loss reaches what the "
        f"unprotected model reaches in {st['reference_steps']} steps; budget {st['budget']} steps. The worst case is "
        "the figure to quote; an informed attacker undoes the deformation.")
    return {"description": description, "rows": rows, "summary": s, "target": None, "config": {"redteam": st}}


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
