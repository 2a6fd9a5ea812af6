"""Disk usage of a directory tree, the way containerd's fs.DiskUsage counts it."""

from __future__ import annotations

import os
import stat


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes allocated, inodes) under ``path``, each inode counted once (hardlinks).

    Bytes are st_blocks * 512, as ``du`` reports; the top directory itself counts.
    Files that vanish while walking are skipped.
    """
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            continue
        seen.add(ident)
        size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(current) as it:
                    stack.extend(entry.path for entry in it)
            except (FileNotFoundError, NotADirectoryError):
                continue
    return size, len(seen)
