"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

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
            ax.plot(steps, run["curve"], color=color, linestyle=ls, label=label, linewidth=1.4)
        ax.axhline(s["target_loss"], color="black", linewidth=0.8, linestyle="--", label=f"target {s['target_loss']:.3f}")
        ax.set_xscale("log")
        ax.set_xlim(1, s["budget"])
        top = max(s["initial_loss"] * 1.5, s["target_loss"] * 1.2)
        ax.set_ylim(min(s["reference_best_loss"], s["target_loss"]) * 0.97, top)
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
            xs = [r["lr"] for r in per[opt]["sweep"]]
            ys = [r["steps_to_target"] for r in per[opt]["sweep"]]
            ax.plot(xs, ys, marker="o", color=color, linestyle=ls, label=name)
        ax.axhline(s["budget"] + 1, color="black", linewidth=0.8, linestyle="--", label="never (budget+1)")
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


