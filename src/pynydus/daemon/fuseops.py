"""The read-only RAFS filesystem as answers to FUSE requests.

``RafsServer.handle(request)`` takes a parsed kernel request (``fuseproto.Request``)
and returns the reply as a list of buffers (for one writev), or None for requests the
kernel expects no answer to. It holds no per-open state: a file or directory handle is
the node id itself and directory listings are recomputed (and cached by node id), so a
successor daemon can answer requests about handles its predecessor gave out. The only
connection state is the negotiated ``InitParams``; a successor restores it instead of
seeing INIT again.

Images never change, so the kernel may cache everything: entries and attributes get
huge timeouts, opens keep the page cache, directories are cached by the kernel too,
and misses in an image are cached negatively. The shared-mode pseudo root changes as
images come and go; its own attributes and entries are never cached, and an unmounted
image's entry is invalidated by the daemon.

Each request resolves its inode once and is counted once in its image's ``FsStats``
(a hit or an error); a read is planned once and served from that plan.

Passthrough (when INIT negotiated it and the server has ``iomodes``): an open of a file
that has a materialized copy (``materialize``) is answered FOPEN_PASSTHROUGH with the
copy's backing id once its inode is eligible (``iomode``: no cached open of it); the
kernel then reads the copy itself. Those opens carry fh 0, cached ones their node id,
so a RELEASE tells which kind ended: the one piece of per-open state, kept in the
table that a successor inherits.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from pynydus.daemon import fuseproto as P
from pynydus.daemon.instance import Fresh, RafsInstance, ReadPlan
from pynydus.daemon.iomode import IoModes
from pynydus.daemon.materialize import Materializer, is_candidate
from pynydus.daemon.metrics import FsStats
from pynydus.daemon.vfs import ROOT_ID, SLOT_SHIFT, Resolved, Vfs
from pynydus.errors import NotFound, NydusError

log = logging.getLogger(__name__)

FOREVER = float(1 << 32)  # the image is immutable: cache entries and attributes "forever"
# Listings of directories being read in several READDIR calls, kept between the calls
# (by node id), at most this many entries in all (~140 bytes each); a listing answered
# in one call is not kept, only its length (the kernel's next call asks past the end).
_DIR_CACHE_ENTRIES = 16384
_DIR_ENDS = 4096
# DT_ type by EROFS file type (FileType: UNKNOWN, REG, DIR, CHRDEV, BLKDEV, FIFO, SOCK, SYMLINK;
# the on-disk type is one byte: any other value is DT_UNKNOWN)
_DTYPE = bytes((0, 8, 4, 2, 6, 1, 12, 10)).ljust(256, b"\0")
_DT_DIR = 4
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND

Reply = list[Any]  # buffers for one writev; the first is the out header
T = TypeVar("T")
# a directory entry as listed: name, FUSE node id, DT_ type, inode in its image
Listed = tuple[bytes, int, int, int]


class FuseError(Exception):
    """Answer the request with ``errno``."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


class RafsServer:
    """Answers FUSE requests for the images of a ``Vfs``. Thread-safe: the session calls
    ``handle`` from several threads at once."""

    def __init__(self, vfs: Vfs, *, enable_xattr: bool = True,
                 wants: P.InitWants | None = None, params: P.InitParams | None = None) -> None:
        self.vfs = vfs
        self.enable_xattr = enable_xattr
        self.wants = wants or P.InitWants()
        self.params = params  # None until INIT is answered (or a predecessor's is restored)
        self.initialized = threading.Event()
        if params is not None:
            self.initialized.set()
        self.destroyed = False
        # failover policy "flush": fail requests a dead predecessor had taken (the kernel
        # resends them marked) instead of serving them again
        self.fail_resent = False
        self.start_ns = time.time_ns()
        self.uid, self.gid = os.geteuid(), os.getegid()
        # requests waiting for the backend: unique -> (node id, op, since); the
        # API's inflight metrics and the prefetcher's "busy" read it
        self.inflight: dict[int, tuple[int, str, float]] = {}
        # set by a session that pushes the rest of a missed chunk into the kernel's
        # page cache (FUSE_NOTIFY_STORE): called with (node id, image, plan, the decoded
        # chunks the read fetched) after a read that had to wait for the backend
        self.store: Callable[[int, RafsInstance, ReadPlan, Fresh], None] | None = None
        # passthrough: the open-mode table, the materializer, and the session's
        # registration of a backing file (path -> backing id, 0 when refused)
        self.iomodes: IoModes | None = None
        self.materializer: Materializer | None = None
        self.backing_open: Callable[[str], int] | None = None
        self._dirs: OrderedDict[int, list[Listed]] = OrderedDict()
        self._dirs_entries = 0
        self._dir_ends: OrderedDict[int, int] = OrderedDict()
        self._dirs_lock = threading.Lock()
        self._ops: dict[int, Callable[[P.Request], Reply | None]] = {
            P.LOOKUP: self._lookup, P.GETATTR: self._getattr, P.READLINK: self._readlink,
            P.OPEN: self._open, P.OPENDIR: self._opendir, P.READ: self._read,
            P.READDIR: self._readdir, P.READDIRPLUS: self._readdir,
            P.RELEASE: self._release, P.RELEASEDIR: self._ok, P.FLUSH: self._ok,
            P.GETXATTR: self._getxattr, P.LISTXATTR: self._listxattr, P.STATFS: self._statfs,
            P.ACCESS: self._access, P.FORGET: self._none, P.BATCH_FORGET: self._none,
            P.INTERRUPT: self._none, P.INIT: self._init, P.DESTROY: self._destroy,
        }

    # --- dispatch ----------------------------------------------------------------------------

    def handle(self, req: P.Request) -> Reply | None:
        """The reply to ``req`` (None when the kernel expects none). Never raises."""
        op = self._ops.get(req.opcode)
        if op is None:
            if req.opcode in P.NO_REPLY:
                return None
            return [P.reply_error(req.unique, errno.EROFS if req.opcode in P.MODIFYING
                                  else errno.ENOSYS)]
        if self.params is None and req.opcode != P.INIT:
            return [P.reply_error(req.unique, errno.EIO)]  # as libfuse: nothing before INIT
        if self.fail_resent and req.unique & P.UNIQUE_RESEND:
            log.info("failing %s of inode %d that the previous daemon had taken (failover "
                     "policy flush)", P.opcode_name(req.opcode), req.nodeid)
            return [P.reply_error(req.unique, errno.EIO)]
        try:
            return op(req)
        except FuseError as err:
            return [P.reply_error(req.unique, err.errno)]
        except NydusError as err:
            if not isinstance(err, NotFound):
                log.warning("%s inode %d: %s", P.opcode_name(req.opcode), req.nodeid, err)
            return [P.reply_error(req.unique, err.errno)]
        except Exception:
            log.exception("%s inode %d: internal error", P.opcode_name(req.opcode), req.nodeid)
            return [P.reply_error(req.unique, errno.EIO)]

    def _run(self, op: str, ino: int, body: Callable[[Resolved], T]) -> T:
        """Resolve ``ino`` once, run ``body`` with it and count the request once (a hit,
        or an error)."""
        stats: FsStats | None = None
        try:
            resolved = self.vfs.resolve(ino)
            stats = resolved[1].fs_stats if resolved else None
            out = body(resolved)
        except Exception:
            if stats is not None:
                stats.record(op, error=True)
            raise
        if stats is not None:
            stats.record(op)
        return out

    # --- attributes --------------------------------------------------------------------------

    def attr(self, slot: int, inst: RafsInstance, nid: int, ino: int = 0) -> P.Attr:
        """The attributes of the image's inode ``nid`` as FUSE node ``ino`` (computed from
        ``slot`` when 0). From ``stat_fields``: no object per inode but the answer."""
        mode, nlink, uid, gid, size, blocks, mtime, mtime_nsec, rdev = inst.bs.stat_fields(nid)
        if nid == inst.bs.root_ino:
            mode = (mode & ~0o7777) | 0o755  # as nydusd: the image root is always 0755
        if not inst.explicit_uidgid:  # images built without ownership belong to whoever
            uid, gid = self.uid, self.gid  # runs the daemon
        t = mtime * 1_000_000_000 + mtime_nsec if mtime else self.start_ns
        return P.Attr(ino or self.vfs.to_fuse(slot, inst, nid), mode, nlink, uid, gid, size,
                      blocks, rdev, 4096, t)

    def pseudo_root_attr(self) -> P.Attr:
        return P.Attr(ino=ROOT_ID, mode=stat.S_IFDIR | 0o755, nlink=2 + len(self.vfs.slots),
                      uid=self.uid, gid=self.gid, time_ns=self.vfs.changed_ns)

    def _entry(self, slot: int, inst: RafsInstance, nid: int) -> bytes:
        a = self.attr(slot, inst, nid)
        return P.entry_body(a.ino, a, FOREVER, FOREVER)

    @property
    def zero_message_opendir(self) -> bool:
        """The kernel opens directories without asking (we answer OPENDIR with ENOSYS)."""
        params = self.params
        return params is not None and bool(params.kernel_flags & P.NO_OPENDIR_SUPPORT)

    # --- operations --------------------------------------------------------------------------

    def _init(self, req: P.Request) -> Reply:
        if self.params is not None:
            raise P.ProtocolError("second INIT on one connection")
        params, body = P.negotiate(req.arg, self.wants)
        self.params = params
        self.initialized.set()
        log.info("FUSE INIT: kernel protocol %d.%d, serving 7.%d, flags %#x, max_pages %d",
                 req.arg.major, req.arg.minor, params.minor, params.flags, params.max_pages)
        return [P.reply(req.unique, body)]

    def _destroy(self, req: P.Request) -> Reply:
        self.destroyed = True
        return [P.reply(req.unique)]

    def _none(self, req: P.Request) -> None:
        return None

    def _ok(self, req: P.Request) -> Reply:
        return [P.reply(req.unique)]

    def _lookup(self, req: P.Request) -> Reply:
        name: bytes = req.arg

        def body(resolved: Resolved) -> bytes:
            if resolved is None:  # shared-mode pseudo root: one entry per mounted image
                if name in (b".", b".."):
                    return P.entry_body(ROOT_ID, self.pseudo_root_attr(), 0, 0)
                hit = self.vfs.slot_by_name(name)
                if hit is None:
                    raise FuseError(errno.ENOENT)  # not cached: the image may come later
                slot, inst = hit
                return self._entry(slot, inst, inst.bs.root_ino)
            slot, inst, nid = resolved
            if slot and nid == inst.bs.root_ino and name == b"..":
                return P.entry_body(ROOT_ID, self.pseudo_root_attr(), 0, 0)
            try:
                child = inst.bs.lookup(nid, name)
            except NotFound:
                return P.entry_body(0, None, FOREVER, 0)  # negative, cached by the kernel
            return self._entry(slot, inst, child)

        return [P.reply(req.unique, self._run("lookup", req.nodeid, body))]

    def _getattr(self, req: P.Request) -> Reply:
        def body(resolved: Resolved) -> bytes:
            if resolved is None:
                return P.attr_body(self.pseudo_root_attr(), 0)
            slot, inst, nid = resolved
            return P.attr_body(self.attr(slot, inst, nid), FOREVER)

        return [P.reply(req.unique, self._run("getattr", req.nodeid, body))]

    def _readlink(self, req: P.Request) -> Reply:
        def body(resolved: Resolved) -> bytes:
            if resolved is None:
                raise FuseError(errno.EINVAL)
            target: bytes = resolved[1].bs.readlink(resolved[2])
            return target

        return [P.reply(req.unique, self._run("readlink", req.nodeid, body))]

    def _open(self, req: P.Request) -> Reply:
        def body(resolved: Resolved) -> bytes:
            if req.arg & _WRITE_FLAGS:
                raise FuseError(errno.EROFS)
            if resolved is None:
                raise FuseError(errno.EISDIR)
            if self.iomodes is not None and self._candidate(resolved):
                backing = self._backing(resolved)
                bid = self.iomodes.open(req.nodeid, backing)
                if bid:
                    return P.open_body(0, P.FOPEN_PASSTHROUGH | P.FOPEN_NOFLUSH, bid)
            # NOFLUSH: nothing to flush on a read-only image, and a close() then never
            # waits for a daemon (one being replaced, say)
            return P.open_body(req.nodeid, P.FOPEN_KEEP_CACHE | P.FOPEN_NOFLUSH)

        return [P.reply(req.unique, self._run("open", req.nodeid, body))]

    def _candidate(self, resolved: tuple[int, RafsInstance, int]) -> bool:
        """A regular file that may be opened in passthrough mode (and so is counted)."""
        params = self.params
        if params is None or not params.has(P.PASSTHROUGH):
            return False
        _slot, inst, nid = resolved
        mode, size = (f := inst.bs.stat_fields(nid))[0], f[4]
        return stat.S_ISREG(mode) and is_candidate(inst, size)

    def _backing(self, resolved: tuple[int, RafsInstance, int]) -> Callable[[], int] | None:
        """How to register the inode's materialized copy as a backing file (None when it
        has none yet)."""
        if self.materializer is None or self.backing_open is None:
            return None
        path = self.materializer.path(resolved[1], resolved[2])
        if not path:
            return None
        backing_open = self.backing_open
        return lambda: backing_open(path)

    def passthrough_refused(self) -> None:
        """The kernel refuses our backing files (e.g. a cache dir on a stacked
        filesystem such as overlayfs): copying more files would only cost disk."""
        if self.materializer is not None:
            self.materializer.close()

    def forget_image(self, slot: int, inst: RafsInstance) -> list[int]:
        """An image left its slot: drop its inodes' open modes (the slot may serve
        another image later); the backing ids to close."""
        if self.materializer is not None:
            self.materializer.forget(inst)
        if self.iomodes is None:
            return []
        return self.iomodes.forget(lambda nodeid: nodeid >> SLOT_SHIFT == slot)

    def _opendir(self, req: P.Request) -> Reply:
        if self.zero_message_opendir:
            # the kernel opens directories itself from now on, caching their listings and
            # keeping them (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR), with no OPENDIR and
            # RELEASEDIR round trips. The shared-mode root's listing changes: its
            # attributes are never cached and its mtime moves with the slot table, which
            # makes the kernel (AUTO_INVAL_DATA) drop its cached listing
            raise FuseError(errno.ENOSYS)

        def body(resolved: Resolved) -> bytes:
            if resolved is None:  # the pseudo root changes: the kernel must ask again
                return P.open_body(req.nodeid, 0)
            _slot, inst, nid = resolved
            if not inst.bs.stat(nid).is_dir:
                raise FuseError(errno.ENOTDIR)
            return P.open_body(req.nodeid, P.FOPEN_KEEP_CACHE | P.FOPEN_CACHE_DIR)

        return [P.reply(req.unique, self._run("opendir", req.nodeid, body))]

    def _release(self, req: P.Request) -> Reply:
        try:
            resolved = self.vfs.resolve(req.nodeid)
        except NydusError:  # the image was unmounted while the file was open
            resolved = None
        if resolved is not None:
            resolved[1].fs_stats.record("release")
            # fh 0: a passthrough open (nothing counted); else a cached one ended
            if req.arg and self.iomodes is not None and self._candidate(resolved):
                self.iomodes.release(req.nodeid)
                if self.materializer is not None:
                    self.materializer.released(resolved[1], resolved[2])
        return [P.reply(req.unique)]

    def _read(self, req: P.Request) -> Reply:
        t0 = time.perf_counter_ns()
        arg: P.ReadIn = req.arg
        stats: FsStats | None = None
        try:
            resolved = self.vfs.resolve(req.nodeid)
            if resolved is None:
                raise FuseError(errno.EISDIR)
            inst, nid = resolved[1], resolved[2]
            stats = inst.fs_stats
            plan = inst.plan_read(nid, arg.offset, arg.size)
            # a worker may block on the cache file's disk; only a miss waits for the
            # backend (and has the rest of its chunks stored in the page cache)
            data = inst.read_cached(plan, nowait=False)
            if data is None:
                self.inflight[req.unique] = (req.nodeid, "read", time.time())
                fresh: Fresh = {}
                try:
                    data = inst.read_planned(plan, fresh)
                finally:
                    self.inflight.pop(req.unique, None)
                if self.store is not None and inst.config.rafs.fill_page_cache:
                    self.store(req.nodeid, inst, plan, fresh)
        except Exception:
            if stats is not None:
                stats.record("read", error=True)
            raise
        stats.record("read", size=len(data), latency_us=(time.perf_counter_ns() - t0) // 1000)
        return [P.header(req.unique, len(data)), data]

    def _listing(self, nodeid: int, resolved: Resolved) -> list[Listed]:
        """(name, node id, DT_ type, image inode) of a directory's entries, ``.`` and
        ``..`` first (the pseudo root's entries have no image inode: 0)."""
        if resolved is None:
            return [(b".", ROOT_ID, _DT_DIR, 0), (b"..", ROOT_ID, _DT_DIR, 0)] + [
                (name, self.vfs.to_fuse(slot, inst, inst.bs.root_ino), _DT_DIR, 0)
                for slot, (name, inst) in sorted(self.vfs.slots.items())]
        with self._dirs_lock:
            hit = self._dirs.get(nodeid)
            if hit is not None:
                self._dirs.move_to_end(nodeid)
                return hit
        slot, inst, nid = resolved
        fields = list(inst.bs.readdir_fields(nid))
        ids = self.vfs.to_fuse_all(slot, inst, [ino for _, ino, _ in fields])
        dtype = _DTYPE
        return [(name, fid, dtype[ftype], ino) for (name, ino, ftype), fid in zip(fields, ids, strict=True)]

    def _listed(self, nodeid: int, entries: list[Listed], complete: bool) -> None:
        """Keep a listing for the next READDIR call, or (``complete``: the reply carried
        its last entry) forget it and keep its length."""
        with self._dirs_lock:
            if complete:
                dropped = self._dirs.pop(nodeid, None)
                if dropped is not None:
                    self._dirs_entries -= len(dropped)
                self._dir_ends[nodeid] = len(entries)
                self._dir_ends.move_to_end(nodeid)
                if len(self._dir_ends) > _DIR_ENDS:
                    self._dir_ends.popitem(last=False)
            elif nodeid not in self._dirs and len(entries) <= _DIR_CACHE_ENTRIES:
                self._dirs[nodeid] = entries
                self._dirs_entries += len(entries)
                while self._dirs_entries > _DIR_CACHE_ENTRIES:
                    self._dirs_entries -= len(self._dirs.popitem(last=False)[1])

    def _dirents(self, entries: list[Listed], offset: int, size: int,
                 plus: bool) -> tuple[bytearray, bool]:
        """READDIR(PLUS) of ``entries`` from ``offset`` in at most ``size`` bytes (plus:
        the shared-mode root's, whose entries are image roots); whether it ended them."""
        out = bytearray()
        for i in range(offset, len(entries)):
            name, ino, dtype, _ = entries[i]
            if name == b"." or name == b"..":
                continue  # as before: listings never carried them
            if len(out) + P.dirent_size(name, plus) > size:
                return out, False
            if not plus:
                out += P.pack_dirent(ino, i + 1, dtype, name)
                continue
            # an entry plus attributes: the kernel counts it as a lookup
            target = self.vfs.resolve(ino)
            if target is None:
                out += P.direntplus(self.pseudo_root_attr(), 0, i + 1, dtype, name)
            else:
                slot, inst, nid = target
                out += P.direntplus(self.attr(slot, inst, nid, ino), FOREVER,
                                    i + 1, dtype, name)
        return out, True

    def _direntplus(self, inst: RafsInstance, entries: list[Listed], offset: int,
                    size: int) -> tuple[bytearray, bool]:
        """READDIRPLUS of a directory of ``inst``: ``_dirents`` with ``attr``'s values
        computed inline from ``stat_fields`` (a walk of 50,000 files spends most of the
        daemon's time here)."""
        out = bytearray()
        pack, forever, pad = P.DIRENTPLUS.pack, P.FOREVER_S, P.PAD8
        root = inst.bs.root_ino
        owner = None if inst.explicit_uidgid else (self.uid, self.gid)
        start_sec, start_nsec = divmod(self.start_ns, 1_000_000_000)
        room = size - P.DIRENTPLUS_HEAD
        # the attributes of as many entries as can fit (each takes 8 bytes of name or more;
        # "." and ".." take none)
        todo = entries[offset:offset + size // (P.DIRENTPLUS_HEAD + 8) + 3]
        stats = inst.bs.stat_fields_many([e[3] for e in todo])
        for i, (name, ino, dtype, nid), fields in zip(range(offset, len(entries)), todo, stats):
            if name == b"." or name == b"..":
                continue  # as before: listings never carried them
            n = len(name)
            if len(out) + ((n + 7) & ~7) > room:
                return out, False
            mode, nlink, uid, gid, fsize, blocks, sec, nsec, rdev = fields
            if nid == root:
                mode = (mode & ~0o7777) | 0o755
            if owner is not None:
                uid, gid = owner
            if not sec:
                sec, nsec = start_sec, start_nsec
            out += pack(ino, 0, forever, forever, 0, 0, ino, fsize, blocks, sec, sec, sec, nsec,
                        nsec, nsec, mode, nlink, uid, gid, rdev & 0xFFFFFFFF, 4096, 0, ino, i + 1,
                        n, dtype)
            out += name
            out += pad[n & 7]
        return out, offset + len(todo) >= len(entries)

    def _readdir(self, req: P.Request) -> Reply:
        arg: P.ReadIn = req.arg
        plus = req.opcode == P.READDIRPLUS

        def body(resolved: Resolved) -> bytes | bytearray:
            if resolved is not None and arg.offset:
                with self._dirs_lock:
                    if self._dir_ends.get(req.nodeid) == arg.offset:
                        return b""  # the call after the last entry
            entries = self._listing(req.nodeid, resolved)
            if plus and resolved is not None:
                out, complete = self._direntplus(resolved[1], entries, arg.offset, arg.size)
            else:
                out, complete = self._dirents(entries, arg.offset, arg.size, plus)
            if resolved is not None:
                self._listed(req.nodeid, entries, complete)
            return out

        out = self._run("readdirplus" if plus else "readdir", req.nodeid, body)
        return [P.header(req.unique, len(out)), out]  # the entries as built: no copy

    def _xattrs_allowed(self, inst: RafsInstance) -> None:
        if not self.enable_xattr and not inst.bs.has_xattr:
            raise FuseError(errno.ENOSYS)

    def _getxattr(self, req: P.Request) -> Reply:
        arg: P.GetxattrIn = req.arg

        def body(resolved: Resolved) -> bytes:
            if resolved is None:
                raise FuseError(errno.ENODATA)
            self._xattrs_allowed(resolved[1])
            value = resolved[1].bs.getxattr(resolved[2], arg.name)
            if value is None:
                raise FuseError(errno.ENODATA)
            return _sized(value, arg.size)

        return [P.reply(req.unique, self._run("getxattr", req.nodeid, body))]

    def _listxattr(self, req: P.Request) -> Reply:
        def body(resolved: Resolved) -> bytes:
            if resolved is None:
                return _sized(b"", req.arg)
            self._xattrs_allowed(resolved[1])
            names = resolved[1].bs.listxattr(resolved[2])
            return _sized(b"".join(n + b"\0" for n in names), req.arg)

        return [P.reply(req.unique, self._run("listxattr", req.nodeid, body))]

    def _statfs(self, req: P.Request) -> Reply:
        files = sum(inst.bs.inode_count for inst in self.vfs.instances())
        return [P.reply(req.unique, P.statfs_body(files=files))]

    def _access(self, req: P.Request) -> Reply:
        if req.arg & os.W_OK:
            raise FuseError(errno.EACCES)
        return [P.reply(req.unique)]


def _sized(value: bytes, size: int) -> bytes:
    """getxattr/listxattr: the size when asked with 0, ERANGE when it does not fit."""
    if size == 0:
        return P.xattr_size_body(len(value))
    if len(value) > size:
        raise FuseError(errno.ERANGE)
    return value
