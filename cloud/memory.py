"""The worker's heap: fewer glibc malloc arenas, and freed memory given back to the OS
when the worker goes idle.

A flood of large requests (hundreds of KB each) leaves glibc's heap holding what they
freed: RSS stays at its peak long after the load is gone, which looks like a leak to an
operator and to a memory limit. Two remedies, both glibc-only (elsewhere they do nothing):
`limit_malloc_arenas` caps the arenas the request threads scatter over, and
`trim_when_idle` calls `malloc_trim(0)` once the worker has been idle for a while after
serving (no cost while it is busy, about a millisecond when it runs).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any, Callable

__all__ = ["limit_malloc_arenas", "trim_heap", "trim_when_idle"]

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """At most `arenas` glibc malloc arenas for the threads this process starts from now on
    (gRPC's, the compute threads'), unless MALLOC_ARENA_MAX is set. glibc gives threads up
    to 8 arenas per core, and a flood of large requests scattered over them is never given
    back. Measured under 8x overload (bench faults, reference tail, 16-row requests of
    512 KB), the worker's peak RSS (from about 325 MB idle) reached 552, 772 and 1,130 MB
    in three runs with glibc's default, and 540, 565 and 573 MB in three with 2 arenas.
    True when the limit was set (a glibc Linux), False otherwise."""
    libc = _libc()
    if os.environ.get("MALLOC_ARENA_MAX") or libc is None:
        return False
    try:
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except AttributeError:  # not glibc (musl has no mallopt)
        return False


def trim_heap() -> bool:
    """Give the heap's free memory back to the OS (glibc's malloc_trim); True if any was."""
    libc = _libc()
    try:
        return bool(libc.malloc_trim(0)) if libc is not None else False
    except AttributeError:
        return False


async def trim_when_idle(calls: Callable[[], int], idle: Callable[[], bool], *, interval_s: float = 1.0) -> None:
    """Every `interval_s`: when the worker is idle (`idle()`) and has served since the last
    trim (`calls()` moved), trim the heap in a thread. Runs until cancelled."""
    loop = asyncio.get_running_loop()
    trimmed_at = calls()
    while True:
        await asyncio.sleep(interval_s)
        seen = calls()
        if seen != trimmed_at and idle():
            trimmed_at = seen
            await loop.run_in_executor(None, trim_heap)
