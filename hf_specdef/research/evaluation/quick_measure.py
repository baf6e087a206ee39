"""The quick toy resistance measurement behind ``publish(measure=True)``: a few steps of Adam on the deformed
sites of the original and the protected model, on synthetic batches (registered as the ``quick`` entry point of the
``hf_specdef.resistance_measures`` group)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from hf_specdef.config import SpecDefConfig
from hf_specdef.publishing.resistance import MeasureConfig


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


def measure_quick(original: Path, protected: Path, info: Any, cfg: SpecDefConfig, mc: MeasureConfig,
                  progress: bool = True) -> dict[str, Any]:
    """Quick resistance measurement with the evaluation harness (:mod:`hf_specdef.research.evaluation.runner`).

    Args:
        original: the unprotected model folder (a causal LM).
        protected: the protected folder.
        info: the :class:`~hf_specdef.publishing.source.SourceInfo` of the source.
        cfg: the protection.
        mc: the measurement's budget.
        progress: show progress bars.

    Returns:
        ``{"description", "rows": [{"variant", "steps", "slowdown"}], "summary", "target", "config"}``.
    """
    import transformers

    from hf_specdef.research.evaluation import runner

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


