"""``hf-specdef inspect PATH``: spectral report and protection coverage of a checkpoint, from its files.

Tensors are read shard by shard from the memory-mapped safetensors files, each once, several at a time; the
model is never built.

Example::

    hf-specdef inspect ./Llama-3.2-1B-specdef --json
"""

from __future__ import annotations

import argparse

from hf_specdef.config import INSPECT_THRESHOLD as DEFAULT_THRESHOLD  # not ..inspection: argparse set-up imports no torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-specdef inspect``."""
    parser.add_argument("path", metavar="PATH", help="checkpoint folder, diffusers pipeline folder or .safetensors file")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="a matrix counts as deformed when its deciding evidence (the 'evidence' column) reaches "
                             "this ratio: for an architecture in the site registry, the largest per-block statistic "
                             "of the site blocks it belongs to (row/column-norm max/median or median/min per head or "
                             "channel block, spectral gaps of a head block); otherwise the largest matrix-level "
                             "statistic (top singular-value gap, row/column-norm ratios). A finite number > 1 "
                             f"(default {DEFAULT_THRESHOLD:g})")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the inspection report. Exit code 0 when the files could be read."""
    import math

    if not (math.isfinite(args.threshold) and args.threshold > 1):
        from hf_specdef.analysis.inspection import InspectionError

        raise InspectionError(f"--threshold {args.threshold:g}: use a finite ratio > 1 (valid range 1 < threshold < inf; "
                              f"default {DEFAULT_THRESHOLD:g}; a protection at alpha >= 100 gives ratios around alpha).")
    from hf_specdef.analysis.inspection import inspect_model

    report = inspect_model(args.path, threshold=args.threshold)
    print(report.to_json() if args.json else report)
    return 0
