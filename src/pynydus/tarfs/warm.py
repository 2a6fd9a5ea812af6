"""The metadata of a newly mounted tarfs layer, looked up once so that the kernel caches it.

Why: containerd's overlayfs unpack creates every file of a layer, which leaves the
layer's dentries and inodes in the kernel's caches; a container's first walk of an
unpacked image only builds overlay's own. A new EROFS mount starts with none: its first
walk also looks every name up in the directory blocks and builds every EROFS inode
(~3 us an entry here, and a direct-I/O read of each directory block from the bootstrap),
so it took 1.5x overlayfs's first walk (many-files, 50,000 entries; docs/benchmarks.md,
"Tarfs walks: where the first walk's time went"). Looking every entry up once, as the
last step of the layer's conversion (before a container waiting for the layer starts),
does what the unpack does for overlayfs: a container's first walk then finds the EROFS
side cached. Done beside the container's start instead, the lookups raced the
container's walk for the CPUs and the walk got slower under load. The cost is the walk's
CPU (~0.2-0.3 s per 50,000 entries) and the kernel memory of the cached entries (~0.9 KB
each, reclaimable, less than ext4's for the same tree).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

__all__ = ["cache_tree"]


def cache_tree(root: str, cancelled: Callable[[], bool] = lambda: False) -> int:
    """Look every entry below ``root`` up once (``lstat`` relative to its directory, no
    symlink followed, no other mount entered). Returns the entries looked up; stops at
    the next directory once ``cancelled()`` says so. Entries that vanish or cannot be read
    meanwhile are skipped: the walk only warms caches."""
    st_dev = os.lstat(root).st_dev
    n = 0
    stack = [root]
    while stack and not cancelled():
        d = stack.pop()
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            with os.scandir(fd) as it:
                for e in it:
                    try:
                        st = os.stat(e.name, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        continue
                    n += 1
                    if stat.S_ISDIR(st.st_mode) and st.st_dev == st_dev:
                        stack.append(os.path.join(d, e.name))
        except OSError:
            pass
        finally:
            os.close(fd)
    return n
