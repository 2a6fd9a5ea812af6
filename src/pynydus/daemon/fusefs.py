"""The FUSE filesystem through pyfuse3 (libfuse3): the older of the two FUSE sessions.

One FUSE mount serves either a single image at its root (dedicated mode,
``--bootstrap``), or a pseudo root directory whose subdirectories are images
mounted through the API (shared mode, ``POST /api/v1/mount?mountpoint=/<id>``).

Inode numbers are the image's own (nid for v6), as nydusd reports them. In shared
mode the instance's slot (1..255) sits in the top 8 bits, as upstream does. FUSE's
root node id is 1, so in dedicated mode the image root's nid and nid 1 swap places.

Images never change, so the kernel may cache everything: entries and attributes
get huge timeouts, opens keep the page cache, and misses are cached negatively.
Bootstrap lookups are in-memory and answered on the trio thread; file reads may
wait for the network and run in worker threads.

Each request resolves its inode once and is counted once in its image's ``FsStats``
(a hit or an error); a read is planned once and served from that plan, on the loop when
its bytes are warm, else on a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from pynydus.daemon.instance import RafsInstance
from pynydus.daemon.metrics import FsStats
from pynydus.daemon.vfs import Resolved, Vfs
from pynydus.errors import NotFound, NydusError
from pynydus.rafs.read import Stat

log = logging.getLogger(__name__)

_FOREVER = float(1 << 32)  # the image is immutable: cache entries/attrs "forever"
_ROOT = pyfuse3.ROOT_INODE

T = TypeVar("T")


class RafsFs(pyfuse3.Operations):  # type: ignore[misc]
    """pyfuse3 operations over a Vfs. Errors become errno; nothing here writes."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: Vfs, *, thread_num: int = 4, enable_xattr: bool = True) -> None:
        super().__init__()
        self.vfs = vfs
        self.enable_xattr = enable_xattr
        self.limiter = trio.CapacityLimiter(max(thread_num, 4) * 4)
        self.start_ns = time.time_ns()
        self.uid, self.gid = os.geteuid(), os.getegid()
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1
        self.inflight: dict[int, tuple[int, str, float]] = {}

    # --- helpers ----------------------------------------------------------------------

    def _attr(self, slot: int, inst: RafsInstance, st: Stat) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.vfs.to_fuse(slot, inst, st.ino)
        a.generation = 0
        a.entry_timeout = _FOREVER
        a.attr_timeout = _FOREVER
        mode = st.mode
        if st.ino == inst.bs.root_ino:
            mode = (mode & ~0o7777) | 0o755  # as nydusd: the image root is always 0755
        a.st_mode = mode
        a.st_nlink = st.nlink
        if inst.bs.explicit_uidgid:
            a.st_uid, a.st_gid = st.uid, st.gid
        else:  # images built without ownership belong to whoever runs the daemon
            a.st_uid, a.st_gid = self.uid, self.gid
        a.st_rdev = st.rdev
        a.st_size = st.size
        a.st_blksize = 4096
        a.st_blocks = st.blocks
        mtime = st.mtime * 1_000_000_000 + st.mtime_nsec if st.mtime else self.start_ns
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        return a

    def _pseudo_root_attr(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = _ROOT
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2 + len(self.vfs.slots)
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.start_ns
        return a

    def _run(self, op: str, ino: int, body: Callable[[Resolved], T]) -> T:
        """Resolve ``ino`` once, run ``body`` with it and count the request once."""
        stats: FsStats | None = None
        try:
            resolved = self.vfs.resolve(ino)
            stats = resolved[1].fs_stats if resolved else None
            out = body(resolved)
        except Exception as err:
            fuse_err = self._failed(op, ino, stats, err)
            if fuse_err is err:
                raise
            raise fuse_err from err
        if stats is not None:
            stats.record(op)
        return out

    @staticmethod
    def _failed(op: str, ino: int, stats: FsStats | None, err: Exception) -> pyfuse3.FUSEError:
        """The FUSE error a failed request answers with; counts it as an error."""
        if stats is not None:
            stats.record(op, error=True)
        if isinstance(err, pyfuse3.FUSEError):
            return err
        if isinstance(err, NydusError):
            if not isinstance(err, NotFound):
                log.warning("%s inode %d: %s", op, ino, err)
            return pyfuse3.FUSEError(err.errno)
        log.exception("%s inode %d: internal error", op, ino, exc_info=err)
        return pyfuse3.FUSEError(errno.EIO)

    # --- operations ---------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        def body(resolved: Resolved) -> pyfuse3.EntryAttributes:
            if resolved is None:  # shared-mode pseudo root: one entry per mounted image
                if name in (b".", b".."):
                    return self._pseudo_root_attr()
                hit = self.vfs.slot_by_name(name)
                if hit is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                slot, inst = hit
                return self._attr(slot, inst, inst.bs.stat(inst.bs.root_ino))
            slot, inst, nid = resolved
            if slot and nid == inst.bs.root_ino and name == b"..":
                return self._pseudo_root_attr()
            try:
                child = inst.bs.lookup(nid, name)
            except NotFound:
                neg = pyfuse3.EntryAttributes()
                neg.st_ino = 0  # a negative entry, cached by the kernel
                neg.entry_timeout = _FOREVER
                return neg
            return self._attr(slot, inst, inst.bs.stat(child))

        return self._run("lookup", parent_inode, body)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        def body(resolved: Resolved) -> pyfuse3.EntryAttributes:
            if resolved is None:
                return self._pseudo_root_attr()
            slot, inst, nid = resolved
            return self._attr(slot, inst, inst.bs.stat(nid))

        return self._run("getattr", inode, body)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        def body(resolved: Resolved) -> bytes:
            if resolved is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            target: bytes = resolved[1].bs.readlink(resolved[2])
            return target

        return self._run("readlink", inode, body)

    async def opendir(self, inode: int, ctx: Any) -> int:
        def body(resolved: Resolved) -> int:
            if resolved is None:
                entries = [(b".", _ROOT), (b"..", _ROOT)]
                entries += [(name, self.vfs.to_fuse(slot, inst, inst.bs.root_ino))
                            for slot, (name, inst) in sorted(self.vfs.slots.items())]
            else:
                slot, inst, nid = resolved
                entries = [(e.name, self.vfs.to_fuse(slot, inst, e.ino)) for e in inst.bs.readdir(nid)]
            fh = self._next_fh
            self._next_fh += 1
            self._dirs[fh] = entries
            return fh

        return self._run("opendir", inode, body)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if name in (b".", b".."):
                continue  # the kernel synthesises these
            attr = await self.getattr(ino)
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        def body(resolved: Resolved) -> pyfuse3.FileInfo:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            if resolved is None:
                raise pyfuse3.FUSEError(errno.EISDIR)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

        return self._run("open", inode, body)

    # pyfuse3 sends any buffer; its stub says bytes
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:  # type: ignore[override]
        t0 = time.perf_counter_ns()
        stats: FsStats | None = None
        try:
            resolved = self.vfs.resolve(fh)
            if resolved is None:
                raise pyfuse3.FUSEError(errno.EISDIR)
            _, inst, nid = resolved
            stats = inst.fs_stats
            plan = inst.plan_read(nid, off, size)
            # Warm data is answered right here: a thread hand-off costs more than the read.
            data = inst.read_cached(plan)
            if data is None:
                key = id(trio.lowlevel.current_task())
                self.inflight[key] = (fh, "read", time.time())
                try:
                    data = await trio.to_thread.run_sync(inst.read_planned, plan,
                                                         limiter=self.limiter)
                finally:
                    self.inflight.pop(key, None)
        except Exception as err:  # trio's Cancelled is a BaseException and passes
            fuse_err = self._failed("read", fh, stats, err)
            if fuse_err is err:
                raise
            raise fuse_err from err
        inst.fs_stats.record("read", size=len(data), latency_us=(time.perf_counter_ns() - t0) // 1000)
        return data

    async def release(self, fh: int) -> None:
        try:
            resolved = self.vfs.resolve(fh)
        except NydusError:  # the image was unmounted while the file was open
            return
        if resolved is not None:
            resolved[1].fs_stats.record("release")

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        def body(resolved: Resolved) -> bytes:
            if resolved is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            if not self.enable_xattr and not resolved[1].bs.has_xattr:
                raise pyfuse3.FUSEError(errno.ENOSYS)
            value = resolved[1].bs.getxattr(resolved[2], name)
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value

        return self._run("getxattr", inode, body)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        def body(resolved: Resolved) -> list[bytes]:
            if resolved is None:
                return []
            if not self.enable_xattr and not resolved[1].bs.has_xattr:
                raise pyfuse3.FUSEError(errno.ENOSYS)
            names: list[bytes] = resolved[1].bs.listxattr(resolved[2])
            return names

        return self._run("listxattr", inode, body)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 512
        s.f_frsize = 512
        s.f_namemax = 255
        s.f_files = sum(inst.bs.inode_count for inst in self.vfs.instances())
        return s

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return not mode & os.W_OK

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None
