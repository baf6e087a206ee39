#!/usr/bin/env python
"""Start-up time (see docs/performance.md): ``import hf_specdef`` and ``hf-specdef --help`` against ``import torch``.

Each measurement is a fresh Python process (wall time of the whole process, interpreter start included);
the kinds are interleaved and their order rotated every round, so they see the same machine load.
Targets: ``hf-specdef --help`` <= 1.0x ``import torch``; ``import hf_specdef`` <= 1.2x ``import torch``.
``--libraries`` also times ``from transformers import AutoModelForCausalLM`` (and diffusers' UNet) with and
without ``import hf_specdef`` first: what the post-import hooks add to a user's own imports.

    python scripts/bench_startup.py --runs 5
    python scripts/bench_startup.py --runs 3 --libraries --json-out startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

KINDS = {
    "import torch": "import torch",
    "import hf_specdef": "import hf_specdef",
    "hf-specdef --help": "import sys; from hf_specdef.cli import main; sys.argv[0] = 'hf-specdef'; main(['--help'])",
}
LIBRARY_KINDS = {
    "transformers Auto": "from transformers import AutoModelForCausalLM",
    "hf_specdef + transformers Auto": "import hf_specdef; from transformers import AutoModelForCausalLM",
    "diffusers UNet": "from diffusers import UNet2DConditionModel",
    "hf_specdef + diffusers UNet": "import hf_specdef; from diffusers import UNet2DConditionModel",
}


def run_once(code: str, root: Path = ROOT) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{code!r} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="rounds (one fresh process per kind per round; default 5)")
    p.add_argument("--libraries", action="store_true", help="also time transformers/diffusers imports with the hooks")
    p.add_argument("--root", type=Path, default=ROOT, help="checkout whose hf_specdef is timed (default: this one)")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    kinds = dict(KINDS, **(LIBRARY_KINDS if args.libraries else {}))
    names = list(kinds)
    times: dict[str, list[float]] = {n: [] for n in names}
    run_once("pass", args.root)  # warm the file cache
    for r in range(args.runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(run_once(kinds[name], args.root))
    med = {n: statistics.median(t) for n, t in times.items()}
    torch_s = med["import torch"]
    result = {
        "runs": args.runs,
        "median_s": med,
        "all_s": times,
        "ratio_import_hf_specdef": med["import hf_specdef"] / torch_s,
        "ratio_help": med["hf-specdef --help"] / torch_s,
    }
    if args.libraries:
        result["hook_overhead_transformers"] = med["hf_specdef + transformers Auto"] / med["transformers Auto"]
        result["hook_overhead_diffusers"] = med["hf_specdef + diffusers UNet"] / med["diffusers UNet"]
    print(json.dumps(result, indent=2))
    print(f"import torch {torch_s:.3f} s; import hf_specdef {med['import hf_specdef']:.3f} s "
          f"({result['ratio_import_hf_specdef']:.2f}x, target <= 1.2x); hf-specdef --help "
          f"{med['hf-specdef --help']:.3f} s ({result['ratio_help']:.2f}x, target <= 1.0x); {args.runs} rounds")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
