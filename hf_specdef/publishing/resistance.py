"""Resistance figures for a model card: the quick toy measurement of ``publish(measure=True)``, and the worst case of
a red team on real weights (:mod:`hf_specdef.research.redteam`) read from its ``results.json`` (``publish(redteam=...)``).

Both give the card's ``measure`` block: ``{"description", "rows": [{"variant", "steps", "slowdown", "best_lr"}],
"summary"}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_specdef.config import SpecDefConfig
from hf_specdef.errors import SpecDefError

_CAUSAL_LM = ("ForCausalLM", "LMHeadModel")
_COMPARED = ("alpha", "mode", "sites", "top_k", "layers")


class ResistanceError(SpecDefError, ValueError):
    """The resistance figures cannot be produced or do not belong to this release."""

    docs_page = "docs/redteam.md"


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


MEASURE_ENTRY_POINTS = "hf_specdef.resistance_measures"


def measure_resistance(original: Path, protected: Path, info: Any, cfg: SpecDefConfig,
                       mc: MeasureConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """The quick toy resistance measurement of ``publish(measure=True)``, run by the research harness (the ``quick``
    entry point of the ``hf_specdef.resistance_measures`` group: :mod:`hf_specdef.research.evaluation.quick_measure`).

    Returns ``{"description", "rows": [{"variant", "steps", "slowdown"}], "summary", "target", "config"}``.

    Raises:
        ResistanceError: the model is not a causal LM, or the research harness is not installed.
    """
    from importlib.metadata import entry_points

    if info.kind != "transformers" or not info.class_name.endswith(_CAUSAL_LM):
        raise ResistanceError(f"measure=True supports causal language models (...ForCausalLM) in this build, not "
                              f"{info.class_name}; for diffusion models run scripts/convergence_bench.py instead")
    found = [ep for ep in entry_points(group=MEASURE_ENTRY_POINTS) if ep.name == "quick"]
    try:
        measure = found[0].load() if found else None
    except ModuleNotFoundError as e:
        raise ResistanceError(f"measure=True needs the research harness, and {e.name} is missing: pip install "
                              "'hf-specdef[demo]', or publish without --measure") from None
    if measure is None:
        raise ResistanceError("measure=True needs the research harness (hf_specdef.research), which this install does "
                              "not register: pip install 'hf-specdef[demo]', or publish without --measure")
    return measure(original, protected, info, cfg, mc or MeasureConfig(), progress=progress)


def redteam_measure(results: dict[str, Any] | str | os.PathLike, cfg: SpecDefConfig | None = None) -> dict[str, Any]:
    """The card's ``measure`` block from a red-team ``results.json`` (worst case first, then every attack).

    With ``cfg``, the measured variant must be the protection being published (same alpha, mode, sites, top_k,
    layers); otherwise :class:`ResistanceError`: a card must not quote figures of another protection.
    """
    from hf_specdef.publishing.redteam_results import fmt_ratio, headline

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
