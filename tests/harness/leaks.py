"""Where a secret must never be: logs, command lines, mount options, files others can read.

    leaks = find_leaks({b"pw": "password"}, [snap.workdir, registry.workdir])
    assert not leaks, "\\n".join(leaks)

Scans every ``/proc/*/cmdline``, ``/proc/self/mountinfo``, and the files under the given
roots: a file whose name ends in ``.log`` or lies under a ``logs`` directory must not
hold a needle at all; any other file may, only if another user cannot read it (mode
o+r with every directory above it o+x).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.harness.util import all_cmdlines


def world_readable(path: Path) -> bool:
    if not os.stat(path).st_mode & stat.S_IROTH:
        return False
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in path.parents)


def hits(data: bytes, needles: Mapping[bytes, str]) -> list[str]:
    """The names of the needles found in ``data``."""
    return [what for needle, what in needles.items() if needle in data]


def find_leaks(needles: Mapping[bytes, str], roots: Iterable[Path]) -> list[str]:
    out = []
    for pid, cmd in all_cmdlines():
        found = hits(cmd, needles)
        if found:
            shown = cmd.replace(b"\0", b" ")[:200]
            out.append(f"/proc/{pid}/cmdline {shown!r}: {found}")
    found = hits(Path("/proc/self/mountinfo").read_bytes(), needles)
    if found:
        out.append(f"/proc/self/mountinfo: {found}")
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = Path(dirpath, name)
                if not p.is_file() or p.is_symlink():
                    continue
                try:
                    found = hits(p.read_bytes(), needles)
                except OSError:
                    continue
                if not found:
                    continue
                if name.endswith(".log") or "/logs/" in str(p):
                    out.append(f"log {p}: {found}")
                if world_readable(p):
                    out.append(f"world-readable {p} ({oct(p.stat().st_mode & 0o777)}): {found}")
    return out
