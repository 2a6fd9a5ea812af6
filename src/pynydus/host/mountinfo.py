"""Reading the kernel's mount table (/proc/self/mountinfo)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str
    device: str = ""  # "major:minor" of the mounted filesystem


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            lf = left.split()
            rf = right.split()
            if len(lf) < 6 or len(rf) < 3:
                continue
            entries.append(
                MountEntry(int(lf[0]), int(lf[1]), _unescape(lf[4]), rf[0], _unescape(rf[1]),
                           lf[5] + "," + rf[2], lf[2])
            )
    return entries


def mountpoints_under(path: str) -> list[str]:
    """Mountpoints equal to ``path`` or below it, deepest first (the order to unmount)."""
    base = os.path.realpath(path).rstrip("/")
    hits = [
        e.mountpoint
        for e in read_mountinfo()
        if e.mountpoint == base or e.mountpoint.startswith(base + "/")
    ]
    return sorted(set(hits), key=lambda p: (-p.count("/"), p))


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    return any(e.mountpoint == real for e in read_mountinfo())
