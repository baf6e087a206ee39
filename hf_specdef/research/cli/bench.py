"""``hf-specdef bench``: the convergence benchmark (also ``scripts/convergence_bench.py``)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence

from hf_specdef.errors import require_extra

logger = logging.getLogger("hf_specdef")


HELP = "Run the convergence benchmark (original vs protected vs undo)."

def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers (e.g. 1e-4,1e-3)") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench_out", help="output folder for results.json, results.md and PNGs")
    p.add_argument("--scenario", default="text", choices=("text", "digits"),
                   help="text: tiny Llama, docstrings -> license texts; digits: DDPM UNet, digits 0-8 -> 9")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the <=10 minute version (2 CPU cores); the default")
    size.add_argument("--full", action="store_true", help="more learning rates, longer budget, SGD on every variant")
    size.add_argument("--tiny", action="store_true", help="a smoke test of seconds (numbers are not meaningful)")
    p.add_argument("--alphas", type=_floats, default=None, help="protection strengths, e.g. 10,100,1000")
    p.add_argument("--adam-lrs", type=_floats, default=None, help=">= 6 Adam learning rates")
    p.add_argument("--sgd-lrs", type=_floats, default=None, help=">= 6 SGD learning rates")
    p.add_argument("--optimizers", default=None, help="comma-separated subset of adam,sgd")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="window in which the unprotected model sets the target; budget = 20x this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    require_extra("peft", "redteam", "hf-specdef bench")
    require_extra("matplotlib", "redteam", "hf-specdef bench")
    import torch

    from hf_specdef.research.evaluation.benchmark import BenchConfig, run_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "full" if args.full else "tiny" if args.tiny else "quick"
    kw: dict = {"scenario": args.scenario, "seed": args.seed}
    for name in ("alphas", "adam_lrs", "sgd_lrs", "reference_steps"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.optimizers:
        kw["optimizers"] = tuple(o.strip() for o in args.optimizers.split(","))
    cfg = BenchConfig.preset(preset, **kw)
    start = time.perf_counter()
    results = run_benchmark(cfg, args.out, progress=not args.no_progress)
    print(results["table_markdown"])
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, results.md and plots: {', '.join(results['plots'])}")
    print(f"took {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} torch threads "
          f"(load average at the end {results['timing']['load_average']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/convergence_bench.py``."""
    parser = argparse.ArgumentParser(prog="convergence_bench.py", description=HELP)
    parser.add_argument("--debug", action="store_true", help="debug logs")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    return run(args)
