"""No references to documents that are not in the repository, and a plain-text ``hf-specdef --help``.

The specification's sections ("SPEC §n") and the tracker's issues ("issue N") are not in the repository; code,
scripts and docs point at the docs page that holds the matter instead (``docs/<page>.md``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STALE = re.compile(r"SPEC\s*§|\bissue \d+")

# files allowed to hold such references (none)
BEING_EDITED: frozenset[str] = frozenset()


def _checked_files() -> list[Path]:
    files = [*sorted((ROOT / "hf_specdef").rglob("*.py")), *sorted((ROOT / "scripts").glob("*.py")),
             ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


def _stale_lines(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT).as_posix()}:{n}: {line.strip()}"
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if STALE.search(line)]


def test_no_spec_or_issue_references() -> None:
    found = [hit for f in _checked_files() if f.relative_to(ROOT).as_posix() not in BEING_EDITED
             for hit in _stale_lines(f)]
    assert not found, "references to documents not in the repository (point at docs/<page>.md):\n" + "\n".join(found)


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    from hf_specdef.cli import build_parser

    parser = build_parser()
    out = [("hf-specdef", parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out += [(f"hf-specdef {name}", sub) for name, sub in action.choices.items()]
    return out


def test_help_is_plain_text() -> None:
    bad = [name for name, parser in _parsers() if "``" in parser.format_help() or STALE.search(parser.format_help())]
    assert len(_parsers()) > 1
    assert not bad, f"--help shows reST markup or a stale reference: {bad}"
