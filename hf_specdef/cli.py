"""The ``hf-specdef`` command line: ``protect``, ``inspect``, ``verify``, ``publish``, ``bench``, ``demo``, ``redteam``.

Each subcommand lives in ``hf_specdef/commands/<name>.py`` and provides ``add_arguments(parser)``
and ``run(args) -> int``. Errors print as one line (no traceback) unless ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMANDS: dict[str, str] = {
    "protect": "Protect a checkpoint folder (streaming, shard by shard).",
    "inspect": "Spectral report and coverage of a checkpoint folder, from files.",
    "verify": "Compare a protected checkpoint with its original on probe inputs.",
    "publish": "Protect, verify, write a model card and push to the Hub (or --dry-run).",
    "bench": "Run the convergence benchmark (original vs protected vs undo).",
    "demo": "End-to-end demo on an embedded tiny default: protect, verify, attack, undo.",
    "redteam": "Fine-tune a real model, unprotected and protected, with a suite of attacks; report the worst case.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-specdef", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        try:
            importlib.import_module(f"hf_specdef.commands.{name}").add_arguments(p)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("hf_specdef.commands"):
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    if getattr(args, "_missing", False):
        print(f"hf-specdef: error: the '{args.command}' command is not available in this build", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(f"hf_specdef.commands.{args.command}").run(args) or 0)
    except KeyboardInterrupt:
        print("hf-specdef: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, no traceback
        if args.debug:
            raise
        print(f"hf-specdef {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
