"""Red-team output: ``results.json``, ``results.md`` and PNG plots, written all at once or not at all."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hf_specdef.publishing.redteam_results import SCALE_INVARIANT_ATTACK, fmt_ratio, headline, rescaling_caveat  # noqa: F401
from hf_specdef.research.redteam.errors import RedTeamError


def check_out_dir(out: str | os.PathLike) -> Path:
    """``out`` must not exist (or be an empty folder), and its parent must be writable."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RedTeamError(f"--out {str(out)!r} already exists and is not an empty folder; pass a new folder (nothing "
                           "is overwritten).")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise RedTeamError(f"cannot write into {str(parent)!r} (missing or read-only); pass --out in a writable folder.")
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(results: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write the results into a temporary folder beside ``out`` and rename it into place when complete."""
    out = check_out_dir(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))
    try:
        safe = _json_safe(results)
        (tmp / "results.json").write_text(json.dumps(safe, indent=1) + "\n", encoding="utf-8")
        (tmp / "results.md").write_text(markdown(safe), encoding="utf-8")
        from hf_specdef.research.redteam.plots import write_plots

        write_plots(safe, tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def describe_protection(variant: dict[str, Any]) -> str:
    """What protected this variant: the resolved precision when this red team protected it, else the record's."""
    conf = variant.get("config") or {}
    what = {k: conf[k] for k in ("alpha", "mode", "sites", "top_k", "quantization_safe") if conf.get(k) is not None}
    text = json.dumps(what) if what else "a given checkpoint without a SpecDef record"
    if variant.get("precision"):
        from hf_specdef.deformation.precision import describe

        text += f" ({describe(variant['precision'])})"
    return text + (f", {variant['pairs']} pairs" if variant.get("pairs") else "")


def _steps(steps: dict[str, Any]) -> str:
    return ", ".join("never" if v is None else str(v) for v in steps.values())


def summary_line(s: dict[str, Any]) -> str:
    """Worst uninformed and largest informed slowdown of one variant."""
    worst = "n/a"
    if "worst_case_slowdown" in s:
        worst = f"{fmt_ratio({'ratio': s['worst_case_slowdown'], 'lower_bound': s['worst_case_lower_bound']})} " \
                f"({s['worst_case_attack']})"
    informed = f"{s['undo_slowdown']:.2f}x ({s['undo_attack']})" if "undo_slowdown" in s else "n/a"
    return f"Worst uninformed: {worst}; largest informed: {informed}."


def _range(m: dict[str, Any]) -> str:
    """The seeds' range; an end that is a lower bound (never reached within the budget) is marked ``>=``."""
    if not m:
        return ""
    lo, hi = (">=" if m.get(f"{end}_lower_bound") else "" for end in ("min", "max"))
    return f"{lo}{m['min']:.2f} to {hi}{m['max']:.2f}"


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: the headline, how the target was set, and per variant a table of attacks."""
    st = results["settings"]
    lines = [
        f"# Red team: {results['model']}", "", f"**{headline(results)}**", "",
        f"Preset `{st['preset']}`; data: {results['data']['source']} ({results['data']['train_windows']} training "
        f"windows of {results['data']['seq_len']} tokens, {results['data']['eval_windows']} held out); global batch "
        f"{st['batch_size']}; budget {st['budget']} steps; learning rates searched on a grid of {st['per_decade']} "
        f"per decade around each optimum; seeds {st['seeds']}; {results['environment']['device']}.", "",
        f"Target per attack: the held-out loss L0 minus {st['fraction']:g} x the gain the unprotected model makes in "
        f"{st['reference_steps']} steps at its best learning rate (1 x: the loss it reaches in those steps). "
        f"A protected run that never reaches it counts as "
        f"{st['budget'] + 1} steps (slowdown shown as a lower bound, `>=`).", "",
    ]
    for name, v in results["variants"].items():
        lines += [f"## Variant `{name}`", "",
                  f"Protection: {describe_protection(v)}; deviation float32 {v['deviation_float32']}, bfloat16 "
                  f"{v['deviation_bfloat16']:.3g} ({'bf16-exact' if v['bf16_exact'] else 'NOT exact in bf16'}).", "",
                  "| attack | informed | best lr unprotected -> protected | steps unprotected | steps protected "
                  "| slowdown (median) | range |", "|---|---|---|---|---|---|---|"]
        for a, e in v["attacks"].items():
            if "skipped" in e:
                lines.append(f"| {a} | | skipped: {e['skipped']} | | | | |")
                continue
            m = e["median"] or {}
            rng = _range(m)
            lines.append(f"| {a} | {'yes' if e['attack']['informed'] else ''} | {e['unprotected_best_lr']:g} -> "
                         f"{e['best_lr']:g} | {_steps(e['unprotected_steps'])} | {_steps(e['steps'])} | "
                         f"{fmt_ratio(m)} | {rng} |")
        lines += ["", summary_line(v["summary"]), ""]
    resumed = results.get("resumed_train_seconds") or 0.0
    more = f"; plus {resumed / 60:.1f} min of runs resumed from the journal or taken from earlier red teams" \
        if resumed else ""
    lines += [f"Wall time {results['wall_seconds'] / 60:.1f} min (training {results['train_seconds'] / 60:.1f} min{more}).",
              ""]
    return "\n".join(lines)
