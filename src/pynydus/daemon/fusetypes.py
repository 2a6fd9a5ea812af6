"""The FUSE requests' and replies' value types: tuples (a request parsed, an inode's
attributes) that ``fuseproto`` builds and the operations read.

Not under PEP 563 (no ``from __future__ import annotations``), unlike the rest of the
package: ``typing.NamedTuple`` turns each string annotation into a ForwardRef, which
compiles it, and the first ``compile()`` of a process builds the ast module's node
classes (0.2 MB of resident memory a daemon that never compiles does without; exec and
eval, which dataclasses and namedtuple use, do not build them).
"""

from typing import Any, NamedTuple


class InitIn(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32


class ReadIn(NamedTuple):
    fh: int
    offset: int
    size: int


class GetxattrIn(NamedTuple):
    size: int
    name: bytes


class Request(NamedTuple):
    """One kernel request. ``arg`` by opcode: LOOKUP the name (bytes); OPEN/OPENDIR the
    open flags (int); READ/READDIR/READDIRPLUS a ReadIn; GETXATTR a GetxattrIn; LISTXATTR
    the buffer size (int); ACCESS the mask (int); RELEASE/RELEASEDIR/FLUSH the fh (int);
    FORGET/BATCH_FORGET a list of (nodeid, nlookup); INTERRUPT the unique interrupted;
    INIT an InitIn; GETATTR the fh or None; otherwise None."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    arg: Any


class Attr(NamedTuple):
    """An inode's attributes as the kernel caches them (``fuse_attr``). A tuple, not a
    frozen dataclass: a READDIRPLUS builds one per entry, and a frozen dataclass's
    ``__init__`` cost more than packing it."""

    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    size: int = 0
    blocks: int = 0
    rdev: int = 0
    blksize: int = 4096
    time_ns: int = 0  # atime = mtime = ctime (an image has one time per inode)
