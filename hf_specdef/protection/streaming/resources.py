"""The process's CPU and memory while streaming: cores available, torch's intra-op threads, freed heap returned."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def cpu_count() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run with torch's intra-op thread count lowered to ``threads`` (restored afterwards; never raised).

    The streaming stages already run on their own threads. Each of them entering torch's OpenMP pool
    (one team per calling thread, spinning between ops) would put several times more busy threads
    than cores on the CPUs: on 2 cores that took 1.6-2x the CPU time of the same run with one
    intra-op thread. The setting is process-wide while it lasts.
    """
    before = torch.get_num_threads()
    if threads >= before:
        yield
        return
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_malloc_trim() -> Any:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed chunks below its dynamic mmap threshold,
    up to 32 MiB each, which would otherwise pile up as resident memory over a streaming pass)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
