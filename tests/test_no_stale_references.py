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


def test_every_library_error_links_the_docs_page_that_explains_it():
    """Each SpecDefError subclass names an existing docs page, and its message ends with it."""
    import importlib
    import pkgutil

    import hf_specdef
    from hf_specdef.errors import SpecDefError

    for info in pkgutil.walk_packages(hf_specdef.__path__, "hf_specdef."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional dependency this install lacks
            continue

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    errors = {c for c in subclasses(SpecDefError) if c.__module__.startswith("hf_specdef")}
    assert len(errors) >= 15
    missing = sorted(c.__qualname__ for c in errors if not c.docs_page)
    assert not missing, f"errors without a docs page: {missing}"
    for cls in errors:
        assert (ROOT / cls.docs_page).is_file(), (cls, cls.docs_page)
    e = SpecDefError("x")
    e.docs_page = "docs/precision.md"
    assert str(e) == "x (see docs/precision.md)"
