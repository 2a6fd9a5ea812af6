"""Which FUSE inodes are opened in passthrough mode, in a table that outlives the daemon.

The kernel keeps one I/O mode per FUSE inode: while a file is open *cached* (reads come
to the daemon, pages in the FUSE page cache), an open answered with FOPEN_PASSTHROUGH
fails with EIO, and the reverse (fs/fuse/iomode.c); two passthrough opens of one inode
must also name the same backing file (one backing id). The daemon sees every OPEN and
RELEASE, so it counts cached opens per inode and lets an inode become *eligible* for
passthrough only when it has none; from then on every open of it is passthrough, with
the one backing id registered for it. Only inodes that may ever be passthrough (files
at or above the materializing floor) are tracked.

The counts must survive the daemon: a successor taking the connection over (failover,
hot upgrade) inherits the kernel's open files of both kinds and the backing ids, which
belong to the connection. So the table lives in a memfd that travels with the
``/dev/fuse`` fd to the supervisor, which holds it while no daemon runs; a daemon killed
with SIGKILL leaves every count it wrote there. Each change is written before the reply
that makes it true (a cached open is counted before its reply, a backing id stored
before the passthrough reply), and a RELEASE reaches us after the kernel dropped the
open, so the table never undercounts cached opens. Two daemons may serve one connection
for a moment during a hot upgrade: changes take an ``flock`` on the table (each daemon
opens the memfd afresh, so the locks exclude each other).

A table that cannot account for every inode any more (full, or a successor that got no
table) is marked ``blind``: inodes already eligible stay so, no inode becomes newly
eligible.

Layout: a 64-byte header (magic, version, flags, capacity), then ``capacity`` entries of
(node id u64, cached opens i32, backing id i32), open addressing, node id 0 = empty,
all ones = removed (an unmounted image's; never reused, so that no change moves an
entry another daemon or a successor may be reading).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Callable

_MAGIC = 0x50594E49  # "PYNI"
_VERSION = 1
_HEADER = struct.Struct("<IIII")  # magic version flags capacity
_HEADER_SIZE = 64
_ENTRY = struct.Struct("<Qii")
_BLIND = 1
_REMOVED = (1 << 64) - 1
# inodes of files at or above the floor that were ever opened while the daemon ran; a
# full table turns blind (no new passthrough), never wrong. 1 MiB of memfd, touched
# pages only.
CAPACITY = 1 << 16


class IoModes:
    """The open-mode table of one FUSE connection (thread-safe)."""

    def __init__(self, fd: int, *, create: bool = False, capacity: int = CAPACITY) -> None:
        """Map the table in ``fd`` (owned by this object from now on); ``create``
        writes a new empty table of ``capacity`` entries (a power of two)."""
        self.fd = fd
        size = _HEADER_SIZE + capacity * _ENTRY.size
        if create:
            os.ftruncate(fd, size)
        else:
            size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size)
        if create:
            _HEADER.pack_into(self._map, 0, _MAGIC, _VERSION, 0, capacity)
        magic, version, _, cap = _HEADER.unpack_from(self._map, 0)
        if magic != _MAGIC or version != _VERSION or cap <= 0 or cap & (cap - 1) \
                or _HEADER_SIZE + cap * _ENTRY.size > size:
            self._map.close()
            raise ValueError(f"not an open-mode table (magic {magic:#x}, version {version}, "
                             f"capacity {cap}, {size} bytes)")
        self.capacity = cap
        self._lock = threading.Lock()

    @classmethod
    def new(cls, capacity: int = CAPACITY) -> IoModes:
        """A fresh table in a new memfd (a new connection: nothing is open yet)."""
        return cls(os.memfd_create("pynydusd-iomodes", os.MFD_CLOEXEC), create=True,
                   capacity=capacity)

    @classmethod
    def adopt(cls, fd: int) -> IoModes:
        """The table a predecessor left in ``fd`` (from the supervisor; closed here).
        Reopened through /proc: a lock of ours must exclude the predecessor's, which
        holds another open of the same memfd."""
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        finally:
            os.close(fd)
        try:
            return cls(own)
        except BaseException:
            os.close(own)
            raise

    @classmethod
    def blind_table(cls) -> IoModes:
        """A successor's table when its predecessor left none: it cannot tell which
        inodes are open cached, so it makes none newly eligible."""
        table = cls.new()
        table.mark_blind()
        return table

    def close(self) -> None:
        if self.fd >= 0:
            self._map.close()
            os.close(self.fd)
            self.fd = -1

    # --- header --------------------------------------------------------------------------

    @property
    def blind(self) -> bool:
        return bool(_HEADER.unpack_from(self._map, 0)[2] & _BLIND)

    def mark_blind(self) -> None:
        magic, version, flags, cap = _HEADER.unpack_from(self._map, 0)
        _HEADER.pack_into(self._map, 0, magic, version, flags | _BLIND, cap)

    # --- entries -----------------------------------------------------------------------------

    def _slot(self, nodeid: int, insert: bool) -> int:
        """The entry offset of ``nodeid`` (a new one if ``insert``), or -1."""
        mask = self.capacity - 1
        i = (nodeid * 0x9E3779B97F4A7C15 >> 16) & mask
        for _ in range(self.capacity):
            off = _HEADER_SIZE + i * _ENTRY.size
            found = _ENTRY.unpack_from(self._map, off)[0]
            if found == nodeid:
                return off
            if found == 0:
                if not insert:
                    return -1
                _ENTRY.pack_into(self._map, off, nodeid, 0, 0)
                return off
            i = (i + 1) & mask
        return -1

    def entry(self, nodeid: int) -> tuple[int, int]:
        """(cached opens, backing id or 0) of ``nodeid``."""
        with self._lock:
            off = self._slot(nodeid, insert=False)
            if off < 0:
                return 0, 0
            _, cached, backing = _ENTRY.unpack_from(self._map, off)
            return cached, backing

    def open(self, nodeid: int, backing: Callable[[], int] | None) -> int:
        """An open of ``nodeid``: the backing id to answer it with in passthrough mode,
        or 0 for a cached open (counted). ``backing`` (None: the file is not
        materialized) registers the inode's backing file and returns its id; it is
        called only when the inode becomes eligible (no cached open, table not blind)
        and may return 0 (the open is then cached)."""
        with self._lock, _Flock(self.fd):
            off = self._slot(nodeid, insert=True)
            if off < 0:  # full: from now on nobody can tell
                self.mark_blind()
                return 0
            _, cached, bid = _ENTRY.unpack_from(self._map, off)
            if bid > 0:
                return int(bid)
            if cached == 0 and backing is not None and not self.blind:
                bid = backing()
                if bid > 0:
                    _ENTRY.pack_into(self._map, off, nodeid, 0, bid)
                    return bid
            _ENTRY.pack_into(self._map, off, nodeid, cached + 1, 0)
            return 0

    def release(self, nodeid: int) -> None:
        """A cached open of ``nodeid`` ended (passthrough releases change nothing)."""
        with self._lock, _Flock(self.fd):
            off = self._slot(nodeid, insert=False)
            if off < 0:
                return
            _, cached, bid = _ENTRY.unpack_from(self._map, off)
            if cached > 0:
                _ENTRY.pack_into(self._map, off, nodeid, cached - 1, bid)

    def forget(self, drop: Callable[[int], bool]) -> list[int]:
        """Remove the entries whose node id ``drop`` accepts (an unmounted image's: its
        slot may serve another image later); their backing ids, for closing."""
        dropped = []
        with self._lock, _Flock(self.fd):
            for i in range(self.capacity):
                off = _HEADER_SIZE + i * _ENTRY.size
                nodeid, _, bid = _ENTRY.unpack_from(self._map, off)
                if nodeid and nodeid != _REMOVED and drop(nodeid):
                    _ENTRY.pack_into(self._map, off, _REMOVED, 0, 0)
                    if bid > 0:
                        dropped.append(bid)
        return dropped


class _Flock:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
