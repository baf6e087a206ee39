"""The ``hf-specdef`` command line: ``protect``, ``inspect``, ``verify``, ``publish``, ``bench``, ``demo``, ``redteam``.

Each subcommand lives in ``hf_specdef/commands/<name>.py`` and provides ``add_arguments(parser)``
and ``run(args) -> int``. Errors print as one line (no traceback) unless ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

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
    received: list[int] = []
    previous = _stop_on_sigterm(received)
    try:
        return int(importlib.import_module(f"hf_specdef.commands.{args.command}").run(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: the command's own cleanup (temporary folders) has run on the way up
        print(f"hf-specdef {args.command}: {'terminated (SIGTERM)' if received else 'interrupted'}", file=sys.stderr)
        return 128 + (received[0] if received else signal.SIGINT)
    except Exception as e:  # one clear line, no traceback
        if args.debug:
            raise
        print(f"hf-specdef {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; an error that is not one of ours (nor a bad value or an OS error) is a bug
    in hf-specdef, and says so."""
    from .errors import SpecDefError

    text = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, (SpecDefError, ValueError, OSError, ImportError)):
        text += f" (unexpected {type(e).__name__}: a bug in hf-specdef; rerun with --debug and report the traceback)"
    return text


def _stop_on_sigterm(received: list[int]) -> Any:
    """SIGTERM (``kill``, a scheduler's time limit) stops a command like Ctrl-C does, so that it cleans up; returns
    the previous handler (``None`` where signals cannot be set: not the main thread)."""

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
