"""Staging folders: a release is written next to its destination and renamed into place, never left half-done.

Every writer (streaming ``protect_checkpoint``, ``save_protected``, ``publish``) writes into a hidden
sibling of the destination, ``.<name>.specdef-tmp-<pid>-<random>``, and renames it into place once
everything is verified. An existing destination that is replaced is first moved aside to
``.<name>.specdef-old-<pid>-<random>`` and removed after the rename (put back if the rename fails).

A run that is killed (SIGKILL, power loss) cannot clean up after itself. The next run for the same
destination recognises such leftovers by the process id in their name: a staging folder whose process
no longer runs (on this machine) is removed, and a moved-aside destination whose process died between
the two renames is put back where it was (when the destination is absent) before anything else
happens. Folders of a process that still runs are left alone, and named.

Cleanup never hides an error: a folder that cannot be removed is named in a warning (and the error
that stopped the run is the one raised).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from hf_specdef.errors import SpecDefError

logger = logging.getLogger("hf_specdef")

TMP_TAG = "specdef-tmp"
OLD_TAG = "specdef-old"


class StagingError(SpecDefError, OSError):
    """A staging folder cannot be created, renamed into place or removed."""

    docs_page = "docs/releases.md"


def _pattern(dst: Path, tag: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(dst.name)}\.{tag}-(\d+)-[0-9a-f]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True
    return True


def remove_tree(path: Path) -> bool:
    """Remove the folder (or link) ``path``; on failure warn naming it and what is left. Returns success."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except OSError as e:
        logger.warning("hf-specdef: could not remove %s (%s); remove it by hand", path, e)
        return False
    return True


def sweep_stale(dst: Path) -> list[str]:
    """Clean up after killed runs for ``dst``: put back a destination moved aside by a run that died between its
    two renames (if ``dst`` is absent), and remove the staging folders of runs that no longer run.

    Args:
        dst: the destination folder (absolute, its parent resolved).

    Returns:
        One note per leftover found (removed, restored or left because its process still runs).
    """
    parent = dst.parent
    if not parent.is_dir():
        return []
    notes = []
    olds = sorted(p for p in parent.iterdir() if (m := _pattern(dst, OLD_TAG).match(p.name)) and not _alive(int(m[1])))
    if olds and not os.path.lexists(dst):
        newest = max(olds, key=lambda p: p.lstat().st_mtime)
        os.rename(newest, dst)
        olds.remove(newest)
        notes.append(f"put back {dst} (moved aside by an earlier run that was killed before it finished replacing it)")
    for p in olds:
        if remove_tree(p):
            notes.append(f"removed {p.name} (a replaced destination left by an earlier, killed run)")
    for p in sorted(parent.iterdir()):
        m = _pattern(dst, TMP_TAG).match(p.name)
        if not m:
            continue
        if _alive(int(m[1])):
            notes.append(f"left {p.name}: process {m[1]} that is writing it still runs")
        elif remove_tree(p):
            notes.append(f"removed {p.name} (the unfinished output of an earlier run that was killed)")
    for n in notes:
        logger.warning("hf-specdef: %s", n)
    return notes


def make_staging(dst: Path) -> Path:
    """A new, empty staging folder next to ``dst`` (same file system, so that :func:`commit_staging` is a rename),
    after :func:`sweep_stale`.

    Raises:
        StagingError: the parent folder cannot be created or written.
    """
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(dst)
        tmp = dst.parent / f".{dst.name}.{TMP_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise StagingError(f"cannot create a temporary folder next to {dst}: {e}; check that {dst.parent} is "
                           "writable and has free space.") from None
    return tmp


def commit_staging(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``dst``; an existing ``dst`` (with ``overwrite``) is moved aside first, put back if the
    rename fails, and removed after it succeeds.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        StagingError: a rename failed (the previous ``dst`` is back in place).
    """
    if os.path.lexists(dst):
        if not overwrite:
            raise FileExistsError(f"destination {dst} appeared while protecting; nothing was written to it.")
        old = dst.parent / f".{dst.name}.{OLD_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(dst, old)
        except OSError as e:
            raise StagingError(f"cannot replace {dst}: {e}") from None
        try:
            os.rename(tmp, dst)
        except OSError as e:
            os.rename(old, dst)  # put the previous destination back
            raise StagingError(f"cannot rename {tmp} to {dst}: {e}") from None
        remove_tree(old)
    else:
        try:
            os.rename(tmp, dst)
        except OSError as e:
            raise StagingError(f"cannot rename {tmp} to {dst}: {e}") from None
