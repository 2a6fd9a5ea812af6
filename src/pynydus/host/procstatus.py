"""A process's ``/proc/<pid>/status``: its resident memory, thread count and the rest.

Read by the snapshotter's metrics (its own RSS and threads, each daemon's RSS), the
system controller (``memory_rss_kb`` of each daemon) and pynydusd (its RSS after a
memory trim).
"""

from __future__ import annotations

__all__ = ["proc_status", "rss_kib"]


def proc_status(pid: int | str) -> dict[str, int]:
    """The numeric fields of ``/proc/<pid>/status`` (``pid`` may be ``"self"``), kB values
    in KiB: ``{"VmRSS": ..., "Threads": ..., ...}``; empty when the process is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    out[key] = int(fields[0])
    except OSError:
        pass
    return out


def rss_kib(pid: int | str) -> int:
    """VmRSS of ``pid`` in KiB (0 when it is gone)."""
    return proc_status(pid).get("VmRSS", 0)
