"""The C library's calls that ``os`` does not offer (writeback, malloc tuning), via ctypes.

The library is the process's own (``dlopen(NULL)``): ``ctypes.util.find_library``
runs ``ldconfig`` in a child process, ~20 ms of every build's start. ``LIBC`` is
None where it cannot be loaded; every caller treats its call as optional.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["LIBC", "keep_freed_buffers", "limit_malloc_arenas"]

LIBC: ctypes.CDLL | None
try:
    LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - no dynamic loader
    LIBC = None

_M_TRIM_THRESHOLD = -1
_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
_MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_buffers(keep: int = 64 << 20) -> bool:
    """Make glibc's malloc keep freed large buffers for reuse; True if it took both settings.

    A build reads, compresses and writes its data in buffers of one chunk (1-16
    MiB). With glibc's defaults such a buffer is mmap'ed, or trimmed off the heap
    when freed, so the next one faults its pages in again: 115,000 page faults and
    ~0.3 s of system time for an lz4_block build of 420 MB (upstream's nydus-image:
    1,200). Buffers up to 32 MiB then come from the heap, and up to ``keep`` bytes
    of free heap stay mapped. For batch processes (a build's CLI): a daemon would
    keep that memory resident while idle. Process-wide and not undone.
    """
    mallopt = getattr(LIBC, "mallopt", None)
    if mallopt is None:
        return False
    # Setting either one turns off glibc's dynamic thresholds; both are needed.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, keep)
    )


def limit_malloc_arenas(n: int) -> bool:
    """Let glibc's malloc keep at most ``n`` arenas (its default is eight per CPU: a
    thread that finds every arena busy makes another, and each keeps its pages). For a
    daemon whose threads allocate almost only under the GIL, so they hardly ever contend
    for one: more arenas were 1 MB of an idle pynydusd's RSS after a tree walk
    (docs/benchmarks.md, "Lean start"). Run before the threads start; ``MALLOC_ARENA_MAX``
    in the environment wins. Whether the limit was set (False without glibc's mallopt)."""
    mallopt = getattr(LIBC, "mallopt", None)
    if mallopt is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(mallopt(_M_ARENA_MAX, n))
