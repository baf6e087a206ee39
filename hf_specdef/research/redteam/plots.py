"""Red-team PNGs: loss curves of the worst-case attack, and slowdown per attack (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hf_specdef.research.evaluation.plots import _pyplot


def _curve(run: dict[str, Any]) -> tuple[list[int], list[float]]:
    xs = [int(s) for s, _ in run["curve"]]
    ys = [math.nan if v is None else float(v) for _, v in run["curve"]]
    return xs, ys


def write_plots(results: dict[str, Any], out: str | Path) -> list[str]:
    """``worst_attack_loss.png`` and ``slowdown_<variant>.png``; returns the paths written."""
    plt = _pyplot()
    out = Path(out)
    paths: list[str] = []
    s = results["summary"]
    variant = results["variants"][s["variant"]]
    worst = s.get("worst_case_attack")
    if worst:
        e = variant["attacks"][worst]
        base = results["unprotected"][worst]
        seed = str(results["settings"]["seeds"][0])
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(*_curve(base["seed_runs"][seed]), color="tab:blue", label=f"unprotected (lr {base['best_lr']:g})")
        ax.plot(*_curve(e["seed_runs"][seed]), color="tab:red", label=f"{s['variant']} (lr {e['best_lr']:g})")
        ax.axhline(e["target"], color="gray", ls=":", label="target")
        ax.set(xlabel="optimizer step", ylabel="held-out loss", title=f"worst-case attack: {worst}")
        ax.legend()
        fig.tight_layout()
        paths.append(str(out / "worst_attack_loss.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    for name, v in results["variants"].items():
        measured = [(a, e["median"]) for a, e in v["attacks"].items() if e.get("median")]
        if not measured:
            continue
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(measured) + 1.5))
        labels = [a for a, _ in measured]
        ratios = [m["ratio"] for _, m in measured]
        colors = ["tab:green" if v["attacks"][a]["attack"]["informed"] else
                  "tab:orange" if m["lower_bound"] else "tab:red" for a, m in measured]
        ax.barh(labels, ratios, color=colors)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.axvline(10.0, color="gray", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set(xlabel="slowdown (steps protected / unprotected, median over seeds; orange: lower bound, green: "
                      "informed)", title=f"red team, variant {name}")
        ax.invert_yaxis()
        fig.tight_layout()
        paths.append(str(out / f"slowdown_{name}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
