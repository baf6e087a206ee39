"""``hf-specdef inspect PATH``: spectral report and protection coverage of a checkpoint, from its files.

Tensors are read shard by shard from the memory-mapped safetensors files, each once, several at a time; the
model is never built.

Example::

    hf-specdef inspect ./Llama-3.2-1B-specdef --json
"""

from __future__ import annotations

import argparse

from ..config import INSPECT_THRESHOLD as DEFAULT_THRESHOLD  # not ..inspection: argparse set-up imports no torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-specdef inspect``."""
    parser.add_argument("path", metavar="PATH", help="checkpoint folder, diffusers pipeline folder or .safetensors file")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"outlier ratio above which a matrix counts as deformed (default {DEFAULT_THRESHOLD:g})")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the inspection report. Exit code 0 when the files could be read."""
    from ..inspection import inspect_model

    if not args.threshold > 1:
        raise ValueError(f"--threshold {args.threshold:g}: use a ratio > 1 (e.g. {DEFAULT_THRESHOLD:g}).")
    report = inspect_model(args.path, threshold=args.threshold)
    print(report.to_json() if args.json else report)
    return 0
