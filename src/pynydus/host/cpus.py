"""How many CPUs this process may use (what decides whether a build runs threads beside
it), and how much CPU a thread got and waited for (what tells a CPU-bound task from one
the machine's load holds back)."""

from __future__ import annotations

import os
import time

__all__ = ["thread_cpu_and_wait", "usable_cpus"]


def usable_cpus() -> int:
    """CPUs this process may run on (``taskset`` narrows it; os.cpu_count() does not)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def thread_cpu_and_wait() -> tuple[float, float]:
    """(seconds the calling thread ran on a CPU, seconds it was runnable but waited for
    one) since it started, from ``/proc/thread-self/schedstat``.

    The second figure is what the load costs a CPU-bound thread: a conversion that
    took 10 s with 1 s on a CPU and 8 s waiting for one was held back by the machine,
    not by its own work or its I/O. Where the kernel keeps no schedstat the wait is 0.
    """
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            on_cpu, waited = f.read().split()[:2]
        return int(on_cpu) / 1e9, int(waited) / 1e9
    except (OSError, ValueError):  # pragma: no cover - a kernel without schedstat
        return time.thread_time(), 0.0
