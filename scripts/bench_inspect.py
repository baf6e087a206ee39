#!/usr/bin/env python
"""``hf-specdef inspect`` against ``hf-specdef protect`` of the same checkpoint (docs/performance.md: inspect no slower).

Each run is a fresh process (wall time, start-up included); the two kinds alternate, their order rotated
every round. ``--reference OLD.json`` (an earlier ``hf-specdef inspect --json`` of the same folder) also
reports how far this inspect's numbers are from it: the largest relative difference of the top singular
values and of the evidence, and whether the same matrices are flagged.

    python scripts/bench_inspect.py /work/cache/smollm2/bf16 --runs 3
    python scripts/bench_inspect.py CKPT --runs 1 --reference old_inspect.json --protect-args="--precision axis"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hf_specdef", *args], env=env, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"hf-specdef {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed, proc.stdout


def compare(new: dict, old: dict) -> dict:
    """Largest relative differences between two inspect reports of the same checkpoint."""
    old_t = {t["name"]: t for t in old["tensors"]}
    sv = ev = 0.0
    for t in new["tensors"]:
        o = old_t[t["name"]]
        for a, b in zip(t["top_singular_values"], o["top_singular_values"], strict=True):
            sv = max(sv, abs(a - b) / max(abs(b), 1e-300))
        for k, b in o["evidence"].items():
            ev = max(ev, abs(t["evidence"][k] - b) / max(abs(b), 1e-300))
    return {"max_rel_singular_value": sv, "max_rel_evidence": ev, "same_deformed": new["deformed"] == old["deformed"],
            "coverage": [new["coverage"], old["coverage"]], "tensors": len(new["tensors"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="checkpoint folder")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--protect-args", default="--precision axis",
                   help="extra flags of the protect runs (default --precision axis: what a bfloat16 model needs)")
    p.add_argument("--reference", help="an earlier `hf-specdef inspect --json` output of the same folder")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {"inspect": [], "protect": []}
    report = None
    with tempfile.TemporaryDirectory(prefix="bench-inspect-") as tmp:
        dst = Path(tmp) / "protected"
        for r in range(args.runs):
            for kind in (["inspect", "protect"] if r % 2 == 0 else ["protect", "inspect"]):
                if kind == "inspect":
                    t, out = run_cli(["inspect", args.path, "--json"])
                    report = json.loads(out)
                else:
                    t, _ = run_cli(["protect", args.path, str(dst), "--no-progress", *shlex.split(args.protect_args)])
                    shutil.rmtree(dst)
                times[kind].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"runs": args.runs, "median_s": med, "all_s": times, "ratio_inspect_to_protect": med["inspect"] / med["protect"]}
    if args.reference:
        result["vs_reference"] = compare(report, json.loads(Path(args.reference).read_text()))
    print(json.dumps(result, indent=2))
    print(f"inspect {med['inspect']:.1f} s, protect {med['protect']:.1f} s: {result['ratio_inspect_to_protect']:.2f}x "
          f"(target <= 1.0x); {args.runs} rounds")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
