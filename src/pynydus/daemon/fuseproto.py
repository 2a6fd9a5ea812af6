"""The FUSE kernel protocol as values: parse requests, build replies, negotiate INIT.

Sans-I/O, as h11 is for HTTP: bytes in, values out, and values in, bytes out. The
session (``fuseloop``) reads ``/dev/fuse`` and writes what this module builds; nothing
here touches a file descriptor, so every message can be unit-tested and fuzzed.

Only what a read-only filesystem needs is decoded: INIT, LOOKUP, FORGET/BATCH_FORGET,
GETATTR, OPEN/OPENDIR, READ, READDIR/READDIRPLUS, READLINK, GETXATTR/LISTXATTR,
STATFS, RELEASE/RELEASEDIR, FLUSH, ACCESS, INTERRUPT and DESTROY. Everything else is
a ``Request`` whose ``arg`` is None; the session answers it with an error.

The negotiated INIT parameters (``InitParams``) are a plain value the daemon can save
and hand to a successor, which then serves the same kernel connection without a second
INIT (the kernel sends INIT once per connection): this is what libfuse could not offer
(docs/failover.md). Layouts follow ``include/uapi/linux/fuse.h`` (protocol 7.x);
requests carry their own lengths, so older and newer kernels parse alike.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import asdict, dataclass
from typing import Any

from pynydus.daemon.fusetypes import Attr, GetxattrIn, InitIn, ReadIn, Request

# --- protocol constants (include/uapi/linux/fuse.h) ----------------------------------

KERNEL_VERSION = 7
# The newest minor this module knows the layouts of; a newer kernel speaks ours.
KERNEL_MINOR = 44
# Oldest minor whose INIT reply layout (and 64-bit attr timeouts etc.) we build.
MIN_MINOR = 23
ROOT_ID = 1

LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51
STATX = 52

OPCODE_NAMES = {v: k.lower() for k, v in dict(globals()).items()
                if k.isupper() and isinstance(v, int) and k not in
                ("KERNEL_VERSION", "KERNEL_MINOR", "MIN_MINOR", "ROOT_ID")}

# Requests the kernel sends without waiting for a reply.
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})
# Requests that would change the image: a read-only filesystem answers EROFS.
MODIFYING = frozenset({SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, WRITE,
                       SETXATTR, REMOVEXATTR, CREATE, FALLOCATE, RENAME2, COPY_FILE_RANGE,
                       TMPFILE})

# INIT flags (flags | flags2 << 32)
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
ALLOW_IDMAP = 1 << 40
OVER_IO_URING = 1 << 41

# open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# notify codes (server -> kernel, unique 0, error = code)
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_STORE = 4
NOTIFY_RESEND = 7

# The kernel marks a request it resends after FUSE_NOTIFY_RESEND with this bit of
# ``unique`` (and an interrupt with bit 0); a reply echoes ``unique`` as it came.
UNIQUE_RESEND = 1 << 63
INT_REQ_BIT = 1

# Device ioctls: _IOR(229, 0, u32) clone; _IOW(229, 1, fuse_backing_map) backing open;
# _IOW(229, 2, u32) backing close.
DEV_IOC_CLONE = 0x8004E500
DEV_IOC_BACKING_OPEN = 0x4010E501
DEV_IOC_BACKING_CLOSE = 0x4004E502

MIN_READ_BUFFER = 8192

# --- structures -----------------------------------------------------------------------

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
_INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ... flags2 max_stack_depth unused[6]
_INIT_OUT_COMPAT_22 = 24
# ino size blocks atime mtime ctime | atimensec mtimensec ctimensec mode nlink uid gid
# rdev blksize flags
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
_ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR.format[1:])
_ATTR_OUT = struct.Struct("<QII" + _ATTR.format[1:])
_OPEN_IN = struct.Struct("<II")
_OPEN_OUT = struct.Struct("<QIi")
_READ_IN = struct.Struct("<QQII")  # fh offset size read_flags (lock_owner flags follow)
_RELEASE_IN = struct.Struct("<QII")
_GETXATTR_IN = struct.Struct("<II")
_GETXATTR_OUT = struct.Struct("<II")
_ACCESS_IN = struct.Struct("<II")
_BATCH_FORGET_IN = struct.Struct("<II")
_FORGET_ONE = struct.Struct("<QQ")
_GETATTR_IN = struct.Struct("<IIQ")
_STATFS_OUT = struct.Struct("<QQQQQIIII24x")
_DIRENT = struct.Struct("<QQII")
_NOTIFY_INVAL_ENTRY = struct.Struct("<QII")
_NOTIFY_INVAL_INODE = struct.Struct("<Qqq")
_NOTIFY_STORE = struct.Struct("<QQII")
_BACKING_MAP = struct.Struct("<iIQ")

ENTRY_OUT_SIZE = _ENTRY_OUT.size
HEADER_SIZE = OUT_HEADER.size
DIRENT_SIZE = _DIRENT.size


class ProtocolError(Exception):
    """A message from the kernel that does not parse (a bug on one side or the other)."""


# --- requests -------------------------------------------------------------------------


def _cstr(body: bytes | memoryview, what: str) -> bytes:
    raw = bytes(body)
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolError(f"{what}: name is not NUL-terminated")
    return raw[:end]


def parse_request(buf: bytes | bytearray | memoryview) -> Request:
    """Decode one message read from ``/dev/fuse`` (exactly what one read() returned)."""
    if len(buf) < IN_HEADER.size:
        raise ProtocolError(f"request of {len(buf)} bytes is shorter than its header")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(buf)
    if length != len(buf):
        raise ProtocolError(f"request says {length} bytes, read returned {len(buf)}")
    # Extensions (security context, supplementary groups) sit at the end, 8-byte units.
    end = length - extlen * 8
    off = IN_HEADER.size
    if end < off:
        raise ProtocolError(f"opcode {opcode}: extension length {extlen * 8} exceeds the request")
    arg: Any = None
    try:
        if opcode == READ or opcode == READDIR or opcode == READDIRPLUS:
            fh, offset, size, _ = _READ_IN.unpack_from(buf, off)
            arg = ReadIn(fh, offset, size)
        elif opcode == LOOKUP:
            arg = _cstr(memoryview(buf)[off:end], "lookup")
        elif opcode == GETATTR:
            if end - off >= _GETATTR_IN.size:
                flags, _, fh = _GETATTR_IN.unpack_from(buf, off)
                arg = fh if flags & 1 else None
        elif opcode == OPEN or opcode == OPENDIR:
            arg = _OPEN_IN.unpack_from(buf, off)[0]
        elif opcode in (RELEASE, RELEASEDIR, FLUSH):
            arg = _U64.unpack_from(buf, off)[0]
        elif opcode == GETXATTR:
            size, _ = _GETXATTR_IN.unpack_from(buf, off)
            arg = GetxattrIn(size, _cstr(memoryview(buf)[off + _GETXATTR_IN.size:end], "getxattr"))
        elif opcode == LISTXATTR:
            arg = _GETXATTR_IN.unpack_from(buf, off)[0]
        elif opcode == ACCESS:
            arg = _ACCESS_IN.unpack_from(buf, off)[0]
        elif opcode == FORGET:
            arg = [(nodeid, _U64.unpack_from(buf, off)[0])]
        elif opcode == BATCH_FORGET:
            count, _ = _BATCH_FORGET_IN.unpack_from(buf, off)
            base = off + _BATCH_FORGET_IN.size
            if base + count * _FORGET_ONE.size > end:
                raise ProtocolError(f"batch_forget of {count} entries overruns the request")
            arg = [_FORGET_ONE.unpack_from(buf, base + i * _FORGET_ONE.size) for i in range(count)]
        elif opcode == INTERRUPT:
            arg = _U64.unpack_from(buf, off)[0]
        elif opcode == INIT:
            major, minor, max_ra, flags = _INIT_IN.unpack_from(buf, off)
            if flags & INIT_EXT and end - off >= _INIT_IN.size + 4:
                flags |= _U32.unpack_from(buf, off + _INIT_IN.size)[0] << 32
            arg = InitIn(major, minor, max_ra, flags)
    except struct.error as err:
        raise ProtocolError(f"opcode {opcode}: body of {end - off} bytes is too short") from err
    return Request(opcode, unique, nodeid, uid, gid, pid, arg)


# --- INIT -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitParams:
    """What one FUSE connection negotiated; fixed for the connection's life.

    ``flags`` are the capabilities both sides agreed on (the reply's flags). A successor
    daemon restores this value instead of seeing INIT again; ``to_dict``/``from_dict``
    are its serialised form in the takeover state."""

    major: int
    minor: int
    flags: int
    max_readahead: int
    max_write: int
    max_pages: int
    time_gran: int = 1
    max_background: int = 0
    congestion_threshold: int = 0
    max_stack_depth: int = 0
    kernel_flags: int = 0  # what the kernel offered (e.g. HAS_RESEND)

    @property
    def buffer_size(self) -> int:
        """The read buffer the kernel demands: a whole WRITE fits (fuse_dev_do_read)."""
        return max(MIN_READ_BUFFER, IN_HEADER.size + 40 + self.max_write, self.max_pages * 4096 + 4096)

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InitParams:
        fields = {k: int(data[k]) for k in ("major", "minor", "flags", "max_readahead",
                                            "max_write", "max_pages")}
        opt = {k: int(data.get(k, 0)) for k in ("time_gran", "max_background",
                                                "congestion_threshold", "max_stack_depth",
                                                "kernel_flags")}
        params = cls(**fields, **opt)
        if params.major != KERNEL_VERSION or params.minor < MIN_MINOR:
            raise ValueError(f"protocol {params.major}.{params.minor} is not one we serve")
        if not 0 < params.max_pages <= 1024 or not 4096 <= params.max_write <= 1 << 24:
            raise ValueError(f"max_pages {params.max_pages} / max_write {params.max_write} "
                             f"out of range")
        return params


@dataclass(frozen=True)
class InitWants:
    """What the filesystem asks for at INIT (the kernel may offer less)."""

    # READDIRPLUS always, not READDIRPLUS_AUTO: AUTO makes only a listing's first call
    # "plus", and every entry of the later calls costs the walker a LOOKUP round trip
    # AUTO_INVAL_DATA: a directory whose mtime moved loses its cached listing (only the
    # shared-mode root's ever moves; image attributes are cached forever, never asked)
    flags: int = (ASYNC_READ | EXPORT_SUPPORT | DO_READDIRPLUS | ASYNC_DIO | AUTO_INVAL_DATA
                  | PARALLEL_DIROPS | CACHE_SYMLINKS | MAX_PAGES | INIT_EXT)
    # 1 MiB reads (the kernel's readahead window is raised to match after INIT)
    max_pages: int = 256
    # nothing is written; the kernel still sizes the read buffer by it
    max_write: int = 128 << 10
    max_background: int = 0  # 0: the kernel's default
    congestion_threshold: int = 0
    # passthrough only: backing files (the materialized copies on the cache disk) are
    # no stacked filesystem's, and overlayfs above the mount stays within the kernel's
    # stack depth of 2 (FILESYSTEM_MAX_STACK_DEPTH)
    max_stack_depth: int = 1


# what RafsServer asks when passthrough is on: the blob-file mount does not (an EROFS
# over its files, and containerd's overlay over that EROFS, would exceed the depth)
PASSTHROUGH_WANTS = InitWants(flags=InitWants.flags | PASSTHROUGH)


def negotiate(req: InitIn, wants: InitWants) -> tuple[InitParams, bytes]:
    """The parameters both sides agree on and the INIT reply body (without header).

    Raises ProtocolError for a kernel whose major is not 7 or whose minor is too old."""
    if req.major != KERNEL_VERSION:
        raise ProtocolError(f"kernel FUSE protocol {req.major}.{req.minor}: only major 7 is served")
    if req.minor < MIN_MINOR:
        raise ProtocolError(f"kernel FUSE protocol 7.{req.minor} is older than 7.{MIN_MINOR}")
    flags = req.flags & wants.flags
    if not req.flags & INIT_EXT:
        flags &= 0xFFFFFFFF
    minor = min(req.minor, KERNEL_MINOR)
    max_pages = wants.max_pages if flags & MAX_PAGES else 32
    params = InitParams(
        major=KERNEL_VERSION, minor=minor, flags=flags, max_readahead=req.max_readahead,
        max_write=wants.max_write, max_pages=max_pages, time_gran=1,
        max_background=wants.max_background, congestion_threshold=wants.congestion_threshold,
        max_stack_depth=wants.max_stack_depth if flags & PASSTHROUGH else 0,
        kernel_flags=req.flags,
    )
    body = _INIT_OUT.pack(KERNEL_VERSION, minor, params.max_readahead, flags & 0xFFFFFFFF,
                          params.max_background, params.congestion_threshold, params.max_write,
                          params.time_gran, max_pages, 0, flags >> 32, params.max_stack_depth)
    return params, body


# --- replies ------------------------------------------------------------------------------


def _attr_fields(a: Attr) -> tuple[int, ...]:
    sec, nsec = divmod(a.time_ns, 1_000_000_000)
    return (a.ino, a.size, a.blocks, sec, sec, sec, nsec, nsec, nsec, a.mode, a.nlink, a.uid,
            a.gid, a.rdev & 0xFFFFFFFF, a.blksize, 0)


def _timeout(seconds: float) -> tuple[int, int]:
    sec = int(seconds)
    return sec, int((seconds - sec) * 1e9)


# fuse_direntplus in one pack: entry_out, then the dirent's header (the name follows)
_DIRENTPLUS = struct.Struct(_ENTRY_OUT.format + "QQII")


def header(unique: int, body_len: int, error: int = 0) -> bytes:
    return OUT_HEADER.pack(HEADER_SIZE + body_len, error, unique)


def reply(unique: int, body: bytes = b"") -> bytes:
    """A successful reply carrying ``body``."""
    return OUT_HEADER.pack(HEADER_SIZE + len(body), 0, unique) + body


def reply_error(unique: int, err: int) -> bytes:
    """An error reply; ``err`` is a positive errno."""
    if not 0 < err < 4096:
        err = errno.EIO
    return OUT_HEADER.pack(HEADER_SIZE, -err, unique)


def entry_body(nodeid: int, attr: Attr | None, entry_timeout: float, attr_timeout: float) -> bytes:
    """``fuse_entry_out``; a nodeid of 0 with no attr is a negative entry (cached for
    ``entry_timeout``)."""
    es, ens = _timeout(entry_timeout)
    if attr is None:
        return _ENTRY_OUT.pack(0, 0, es, 0, ens, 0, *((0,) * 16))
    as_, ans = _timeout(attr_timeout)
    return _ENTRY_OUT.pack(nodeid, 0, es, as_, ens, ans, *_attr_fields(attr))


def attr_body(attr: Attr, timeout: float) -> bytes:
    s, ns = _timeout(timeout)
    return _ATTR_OUT.pack(s, ns, 0, *_attr_fields(attr))


def open_body(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    return _OPEN_OUT.pack(fh, open_flags, backing_id)


def xattr_size_body(size: int) -> bytes:
    return _GETXATTR_OUT.pack(size, 0)


def statfs_body(*, blocks: int = 0, bfree: int = 0, bavail: int = 0, files: int = 0,
                ffree: int = 0, bsize: int = 512, namelen: int = 255, frsize: int = 512) -> bytes:
    return _STATFS_OUT.pack(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, 0)


def dirent_size(name: bytes, plus: bool) -> int:
    n = DIRENT_SIZE + len(name)
    n = (n + 7) & ~7
    return n + ENTRY_OUT_SIZE if plus else n


def pack_dirent(ino: int, next_off: int, dtype: int, name: bytes) -> bytes:
    """One ``fuse_dirent``, padded to 8 bytes; ``next_off`` is where a later READDIR resumes."""
    raw = _DIRENT.pack(ino, next_off, len(name), dtype) + name
    return raw + b"\0" * (-len(raw) & 7)


def pack_direntplus(entry: bytes, ino: int, next_off: int, dtype: int, name: bytes) -> bytes:
    """One ``fuse_direntplus``: an entry_out body then the dirent."""
    return entry + pack_dirent(ino, next_off, dtype, name)


DIRENTPLUS_HEAD = _DIRENTPLUS.size  # a direntplus: this, then its name padded to 8 bytes
# its packer, for loops that build hundreds of them: (nodeid, generation, entry valid s,
# attr valid s, entry valid ns, attr valid ns, ino, size, blocks, atime, mtime, ctime,
# atime ns, mtime ns, ctime ns, mode, nlink, uid, gid, rdev, blksize, flags; ino, next
# offset, name length, DT_ type), then the name, then PAD8[len(name) & 7]
DIRENTPLUS = _DIRENTPLUS
FOREVER_S = 1 << 32  # a timeout of 2**32 s: "forever"
PAD8 = tuple(b"\0" * (-n & 7) for n in range(8))


def direntplus(attr: Attr, timeout: float, next_off: int, dtype: int, name: bytes) -> bytes:
    """``pack_direntplus(entry_body(attr.ino, attr, timeout, timeout), attr.ino, ...)``
    in one pack: a READDIRPLUS reply holds one per entry."""
    s, ns = _timeout(timeout)
    raw = _DIRENTPLUS.pack(attr.ino, 0, s, s, ns, ns, *_attr_fields(attr), attr.ino, next_off,
                           len(name), dtype) + name
    return raw + b"\0" * (-len(raw) & 7)


# --- notifications (server -> kernel) -----------------------------------------------------


def notify_inval_entry(parent: int, name: bytes, flags: int = 0) -> bytes:
    """Drop the kernel's dentry ``name`` under ``parent`` (an unmounted image)."""
    body = _NOTIFY_INVAL_ENTRY.pack(parent, len(name), flags) + name + b"\0"
    return OUT_HEADER.pack(HEADER_SIZE + len(body), NOTIFY_INVAL_ENTRY, 0) + body


def notify_inval_inode(nodeid: int, offset: int = 0, length: int = 0) -> bytes:
    body = _NOTIFY_INVAL_INODE.pack(nodeid, offset, length)
    return OUT_HEADER.pack(HEADER_SIZE + len(body), NOTIFY_INVAL_INODE, 0) + body


def notify_store(nodeid: int, offset: int, size: int) -> bytes:
    """The head of a FUSE_NOTIFY_STORE: the ``size`` bytes that follow it (the caller's
    next buffer in the same writev) go into inode ``nodeid``'s page cache at ``offset``.
    The kernel grows its idea of the file's size to cover them, so they must lie within
    the file; it waits for the pages' locks, which reads in flight hold."""
    body = _NOTIFY_STORE.pack(nodeid, offset, size, 0)
    return OUT_HEADER.pack(HEADER_SIZE + len(body) + size, NOTIFY_STORE, 0) + body


def notify_resend() -> bytes:
    """Ask the kernel to queue again every request a (dead) reader took but never
    answered (Linux >= 6.9, HAS_RESEND); they come back with UNIQUE_RESEND set."""
    return OUT_HEADER.pack(HEADER_SIZE, NOTIFY_RESEND, 0)


def backing_map(fd: int) -> bytes:
    """The argument of FUSE_DEV_IOC_BACKING_OPEN for ``fd`` (passthrough)."""
    return _BACKING_MAP.pack(fd, 0, 0)


def backing_id(backing: int) -> bytes:
    """The argument of FUSE_DEV_IOC_BACKING_CLOSE."""
    return _U32.pack(backing)


def opcode_name(opcode: int) -> str:
    return OPCODE_NAMES.get(opcode, f"opcode{opcode}")


# --- the kernel's side (tests, fuzzing, a takeover's self-check) ----------------------------


def encode_request(opcode: int, unique: int, nodeid: int, body: bytes = b"", *,
                   uid: int = 0, gid: int = 0, pid: int = 0) -> bytes:
    """A request as the kernel would write it."""
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid, pid,
                          0, 0) + body


def init_request_body(minor: int = KERNEL_MINOR, flags: int = 0, max_readahead: int = 128 << 10) -> bytes:
    return _INIT_IN.pack(KERNEL_VERSION, minor, max_readahead, flags & 0xFFFFFFFF) + \
        _U32.pack(flags >> 32) + b"\0" * 44


def read_request_body(fh: int, offset: int, size: int) -> bytes:
    return _READ_IN.pack(fh, offset, size, 0) + b"\0" * 16


def parse_reply(buf: bytes | bytearray) -> tuple[int, int, bytes]:
    """(positive errno or 0, unique, body) of a reply the server wrote."""
    length, error, unique = OUT_HEADER.unpack_from(buf)
    if length != len(buf):
        raise ProtocolError(f"reply says {length} bytes, has {len(buf)}")
    return -error, unique, bytes(buf[HEADER_SIZE:])


def parse_entry(body: bytes) -> tuple[int, float, Attr]:
    """(node id, entry timeout, attributes) of an entry_out."""
    f = _ENTRY_OUT.unpack_from(body)
    return f[0], f[2] + f[4] / 1e9, _attr_from(f[6:])


def parse_attr(body: bytes) -> tuple[float, Attr]:
    f = _ATTR_OUT.unpack_from(body)
    return f[0] + f[1] / 1e9, _attr_from(f[3:])


def _attr_from(f: tuple[int, ...]) -> Attr:
    return Attr(ino=f[0], size=f[1], blocks=f[2], time_ns=f[4] * 1_000_000_000 + f[7],
                mode=f[9], nlink=f[10], uid=f[11], gid=f[12], rdev=f[13], blksize=f[14])


def parse_dirents(body: bytes, plus: bool) -> list[tuple[bytes, int, int, int]]:
    """(name, ino, next offset, type) of each entry of a READDIR(PLUS) reply."""
    out = []
    pos = 0
    while pos < len(body):
        if plus:
            pos += ENTRY_OUT_SIZE
        ino, off, namelen, dtype = _DIRENT.unpack_from(body, pos)
        name = body[pos + DIRENT_SIZE:pos + DIRENT_SIZE + namelen]
        out.append((name, ino, off, dtype))
        pos += (DIRENT_SIZE + namelen + 7) & ~7
    return out


def parse_open(body: bytes) -> tuple[int, int, int]:
    """(fh, open flags, backing id) of an open_out."""
    fh, flags, backing = _OPEN_OUT.unpack_from(body)
    return fh, flags, backing


def parse_init_reply(body: bytes) -> dict[str, int]:
    f = _INIT_OUT.unpack_from(body)
    return {"major": f[0], "minor": f[1], "max_readahead": f[2], "flags": f[3] | f[10] << 32,
            "max_background": f[4], "congestion_threshold": f[5], "max_write": f[6],
            "time_gran": f[7], "max_pages": f[8], "max_stack_depth": f[11]}
