"""A FUSE filesystem that holds a caller inside a system call until the test says go.

``python -m tests.harness.gatefs MOUNTPOINT CONTROL_DIR`` mounts an empty directory.
While ``CONTROL_DIR/armed`` exists, an ``opendir`` of its root writes
``CONTROL_DIR/entered`` and does not answer until ``CONTROL_DIR/release`` exists.

Tests use it to create an interleaving for certain instead of hoping a sleep produces
it: a server call that walks a directory holding this mount is provably in flight from
the moment ``entered`` appears until the test creates ``release``.
Unmount with ``fusermount3 -u MOUNTPOINT`` (the process then exits).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio


class GateFS(pyfuse3.Operations):  # type: ignore[misc]
    def __init__(self, control: Path) -> None:
        super().__init__()
        self.control = control

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2
        a.st_size = 0
        a.st_blocks = 0
        a.attr_timeout = 0
        a.entry_timeout = 0
        return a

    async def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if (self.control / "armed").exists():
            (self.control / "entered").write_text(f"{ctx.pid}\n")
            while not (self.control / "release").exists():
                await trio.sleep(0.01)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        return None

    async def releasedir(self, fh: int) -> None:
        return None


def main(argv: list[str]) -> int:
    mountpoint, control = argv
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=gatefs", "allow_other"}
    pyfuse3.init(GateFS(Path(control)), mountpoint, options)
    (Path(control) / "mounted").write_text(f"{os.getpid()}\n")
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
