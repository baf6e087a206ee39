"""The ``hf-specdef`` command line: ``protect``, ``inspect``, ``verify``, ``publish``, ``bench``, ``demo``, ``redteam``.

Each subcommand lives in ``hf_specdef/cli/<name>.py`` (the research commands in
``hf_specdef/research/cli/``, registered as entry points of the ``hf_specdef.commands`` group) and provides
``add_arguments(parser)`` and ``run(args) -> int``. Errors print as one line (no traceback) unless ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

# the plain-text description of `hf-specdef --help` (the module docstring is reST)
DESCRIPTION = "The hf-specdef command line: protect, inspect, verify, publish, bench, demo, redteam."
# the commands of this package: name -> help
COMMANDS: dict[str, str] = {
    "protect": "Protect a checkpoint folder (streaming, shard by shard).",
    "inspect": "Spectral report and coverage of a checkpoint folder, from files.",
    "verify": "Compare a protected checkpoint with its original on probe inputs.",
    "publish": "Protect, verify, write a model card and push to the Hub (or --dry-run).",
}
# commands other packages add (the research harness: bench, demo, redteam), as entry points of this group; each names a
# module with HELP, add_arguments(parser) and run(args)
ENTRY_POINT_GROUP = "hf_specdef.commands"
# the research commands, for a clear message where this build does not register them
RESEARCH_COMMANDS = ("bench", "demo", "redteam")


def _command_modules() -> dict[str, str]:
    """Command name -> module: this package's, then the registered entry points (sorted by name)."""
    from importlib.metadata import entry_points

    modules = {name: f"hf_specdef.cli.{name}" for name in COMMANDS}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        modules.setdefault(ep.name, ep.value)
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-specdef", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = _command_modules()
    for name, module_name in modules.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a research command whose extra is not installed
            help_text = f"(not available: {e.name} is not installed; pip install 'hf-specdef[redteam]')"
            p = sub.add_parser(name, help=help_text, description=help_text)
            p.set_defaults(_missing=str(e.name))
            continue
        help_text = COMMANDS.get(name) or getattr(module, "HELP", "")
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(p)
        p.set_defaults(_module=module_name)
    for name in RESEARCH_COMMANDS:
        if name not in modules:
            p = sub.add_parser(name, help="(not registered in this install)")
            p.set_defaults(_missing="the hf_specdef.commands entry points")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    if getattr(args, "_missing", None):
        print(f"hf-specdef: error: the '{args.command}' command is not available: {args._missing} is missing "
              "(pip install 'hf-specdef[redteam]', or reinstall hf-specdef)", file=sys.stderr)
        return 2
    received: list[int] = []
    previous = _stop_on_sigterm(received)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
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
    from hf_specdef.errors import SpecDefError

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
