"""A journal of finished red-team runs, so an interrupted red team resumes where it stopped.

A quick red team on a real model is an hour of training; a crash, a reboot or a Ctrl-C must not lose it. Every
finished run is appended (one JSON line, flushed) to ``<out>.runs.jsonl`` beside the output folder, under a key that
says what was trained: variant, attack, learning rate, seed, target and early stop. The first line records the
settings, model and data; resuming with anything different is refused (the runs would not be comparable). The
learning-rate searches are deterministic given their runs, so a resumed red team asks for the same runs in the same
order and takes each finished one from the journal. The journal is removed once ``results.json`` is written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hf_specdef.errors import SpecDefError
from hf_specdef.research.redteam.training import Run

logger = logging.getLogger("hf_specdef")


class JournalError(SpecDefError, ValueError):
    """The journal cannot be used (it exists without --resume, or it records a different red team)."""

    docs_page = "docs/redteam.md"


def journal_path(out: str | os.PathLike) -> Path:
    """Where the journal of a red team writing to ``out`` lives (beside it: ``out`` is created only when done)."""
    out = Path(out)
    return out.with_name(out.name + ".runs.jsonl")


def run_key(label: str, attack: str, lr: float, seed: int, target: float | None, stop_after: int | None) -> str:
    """The identity of one run: everything that decides what it trains and when it stops."""
    return json.dumps([label, attack, float(lr), int(seed), target, stop_after])


class RunJournal:
    """Finished runs by :func:`run_key`, appended to a JSON-lines file as they finish."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], *, resume: bool) -> None:
        self.path = Path(path)
        self.runs: dict[str, Run] = {}
        self.header = json.loads(json.dumps(header, default=str))
        if self.path.exists():
            if not resume:
                raise JournalError(f"{str(self.path)!r} holds the finished runs of an interrupted red team with this "
                                   "--out; pass --resume (resume=True) to reuse them, or delete it to start over.")
            self._load()
        elif resume:
            logger.warning("red team: --resume given but there is no journal %s; starting from scratch", self.path)

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        if not lines or json.loads(lines[0]).get("header") != self.header:
            raise JournalError(f"{str(self.path)!r} records a red team with other settings, model or data; its runs "
                               "are not comparable. Delete it, or resume with the same command.")
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption: that run is simply re-run
                continue
            self.runs[entry["key"]] = Run.from_dict(entry["run"])
        logger.info("red team: resuming with %d finished runs from %s", len(self.runs), self.path)

    def get(self, key: str) -> Run | None:
        """The finished run under ``key``, or None."""
        return self.runs.get(key)

    def add(self, key: str, run: Run, *, write: bool = True) -> None:
        """Record a finished run (the file, with its header, is created on the first one); ``write=False`` (the
        other processes of a distributed run) keeps it in memory only."""
        self.runs[key] = run
        if not write:
            return
        from hf_specdef.research.redteam.report import _json_safe

        new = not self.path.exists()
        with self.path.open("a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps({"header": self.header}) + "\n")
            f.write(json.dumps({"key": key, "run": _json_safe(run.to_dict())}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        """Delete the journal (the results it fed are written)."""
        self.path.unlink(missing_ok=True)
