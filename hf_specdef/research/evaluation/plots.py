"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

STYLE = {
    "unprotected": ("tab:blue", "-"),
    "protected-a10": ("tab:olive", "--"),
    "protected-a100": ("tab:orange", "--"),
    "protected-a1000": ("tab:red", "-"),
    "unprotected-lora": ("tab:cyan", "-"),
    "protected-lora": ("tab:pink", "-"),
    "specundo": ("tab:green", "-"),
    "merge-undo": ("tab:purple", "-."),
    "bypass": ("tab:gray", ":"),
}


def _nan(values: list[float | None]) -> list[float]:
    """Curves come from JSON, where a non-finite loss is stored as None."""
    return [float("nan") if v is None else float(v) for v in values]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: dict[str, Any], out: str | Path) -> list[str]:
    """Write ``loss_<optimizer>.png`` (best run of each variant) and ``sweep_<optimizer>.png``; return the paths."""
    plt = _pyplot()
    out = Path(out)
    s = results["summary"]
    paths: list[str] = []
    opts = sorted({o for per in results["table"].values() for o in per})
    for opt in opts:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, per in results["table"].items():
            if opt not in per:
                continue
            best_lr = per[opt]["lr"]
            run = next(c for c in results["curves"][name][opt] if c["lr"] == best_lr)
            color, ls = STYLE.get(name, (None, "-"))
            steps = range(1, len(run["curve"]) + 1)
            n = per[opt]["steps_to_target"]
            label = f"{name} (lr {best_lr:.0e}, {n if per[opt]['reached'] else 'never'})"
            ax.plot(steps, _nan(run["curve"]), color=color, linestyle=ls, label=label, linewidth=1.4)
        ax.axhline(s["target_loss"], color="black", linewidth=0.8, linestyle="--", label=f"target {s['target_loss']:.3f}")
        ax.set_xscale("log")
        ax.set_xlim(1, s["budget"])
        low = min(s["reference_best_loss"], s["target_loss"])
        high = max([s["initial_loss"]] + [v for ln in ax.get_lines() for v in ln.get_ydata() if math.isfinite(v)])
        high = min(high, s["initial_loss"] + 3 * (s["initial_loss"] - low))  # keep the target region readable
        pad = 0.05 * (high - low)
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel("step")
        ax.set_ylabel("evaluation loss")
        ax.set_title(f"{results['model']['scenario']}: best learning rate per variant, {opt}")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        p = out / f"loss_{opt}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))

        fig, ax = plt.subplots(figsize=(8, 5))
        for name, per in results["table"].items():
            if opt not in per:
                continue
            color, ls = STYLE.get(name, (None, "-"))
            sweep = sorted(per[opt]["sweep"], key=lambda r: r["lr"])
            full = [r for r in sweep if not r.get("pruned_at")]
            ax.plot([r["lr"] for r in full], [r["steps_to_target"] for r in full], marker="o", color=color,
                    linestyle=ls, label=name)
            cut = [r for r in sweep if r.get("pruned_at")]
            ax.scatter([r["lr"] for r in cut], [max(r["pruned_at"], 1) for r in cut], marker="x", color=color, s=18)
        ax.axhline(s["budget"] + 1, color="black", linewidth=0.8, linestyle="--", label="never (budget+1)")
        ax.scatter([], [], marker="x", color="gray", label="x: stopped there (no better than the best)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("steps to target")
        ax.set_title(f"{results['model']['scenario']}: learning-rate sweep, {opt}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"sweep_{opt}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


