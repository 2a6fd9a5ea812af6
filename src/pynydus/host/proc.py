"""A process as ``/proc`` shows it: alive, and what its ``status`` says.

``is_live`` is how the manager and the daemon template tell a daemon (or the template)
that still runs from a pid of a process that ended (a zombie not reaped yet) or that was
used again by another program. ``proc_status`` is read by the snapshotter's metrics (its
own RSS and threads, each daemon's RSS), the system controller (``memory_rss_kb`` of
each daemon) and pynydusd (its RSS after a memory trim).
"""

from __future__ import annotations

__all__ = ["is_live", "proc_status", "rss_kib"]


def is_live(pid: int, cmdline_has: str) -> bool:
    """Is ``pid`` a live (non-zombie) process whose command line contains ``cmdline_has``
    (a daemon's API socket, the template's control socket)?"""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        if stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"Z":
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return cmdline_has.encode() in f.read()
    except (OSError, ValueError):
        return False


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
