"""What a build source yields: one filesystem object of a layer, as an :class:`Entry`.

Both sources (:mod:`~pynydus.rafs.source.tarsource` for OCI layer tars,
:mod:`~pynydus.rafs.source.dirsource` for local directories) produce this model,
one entry at a time, paired with a :class:`DataReader` for regular-file data.
Nothing is unpacked to disk and no file is held in memory: the builder reads file
data in chunk-size pieces while it consumes the entry, before asking for the next
one. For a tar stream that is a hard rule (the stream cannot go back); the reader
of an entry is invalid once the iterator has advanced.

OCI whiteouts (``.wh.NAME`` removes NAME from lower layers, ``.wh..wh..opq`` makes the
directory opaque) are passed through as ordinary entries tagged with
:attr:`Entry.whiteout`; turning them into the overlayfs form (char 0/0 devices and
``trusted.overlay.opaque=y``) needs the parent directory, so the tree does it
(:mod:`pynydus.rafs.builder.tree`).
"""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass, field
from typing import Protocol

from pynydus.errors import FormatError
from pynydus.rafs.format import OCI_WHITEOUT_OPAQUE, OCI_WHITEOUT_PREFIX

__all__ = [
    "DataReader",
    "Entry",
    "EntryType",
    "Whiteout",
    "normalize_path",
]


class EntryType(enum.Enum):
    """What an entry is. HARDLINK points at an earlier path through :attr:`Entry.link`."""

    REG = "reg"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"


_S_IFMT_OF = {
    EntryType.REG: stat.S_IFREG,
    EntryType.HARDLINK: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
    EntryType.SOCKET: stat.S_IFSOCK,
}


class Whiteout(enum.Enum):
    """OCI whiteout kinds: REMOVAL for ``.wh.NAME``, OPAQUE for ``.wh..wh..opq``."""

    REMOVAL = "removal"
    OPAQUE = "opaque"


@dataclass(slots=True)
class Entry:
    """One filesystem object as found in a layer.

    ``path`` is relative, normalized, without leading ``/`` or ``./``; the root
    directory is ``b""``. ``mode`` holds only the permission bits (``0o7777``);
    the type is in ``type``. ``link`` is the symlink target (verbatim) or the
    normalized path of a hardlink's target. ``data_offset`` is the byte offset of
    the file data inside the *uncompressed* tar (tarfs needs it), else None.
    """

    path: bytes
    type: EntryType
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    link: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    data_offset: int | None = None

    @property
    def name(self) -> bytes:
        """The last path component (``b""`` for the root)."""
        return self.path.rsplit(b"/", 1)[-1]

    @property
    def parent(self) -> bytes:
        """The parent directory's path (``b""`` for top-level entries)."""
        return self.path.rsplit(b"/", 1)[0] if b"/" in self.path else b""

    @property
    def st_mode(self) -> int:
        """Full ``st_mode`` (type bits and permissions)."""
        return _S_IFMT_OF[self.type] | (self.mode & 0o7777)

    @property
    def whiteout(self) -> Whiteout | None:
        """The OCI whiteout kind this entry's name encodes, if any."""
        if OCI_WHITEOUT_PREFIX not in self.path:
            return None  # the common case, answered without splitting the path
        name = self.name
        if name == OCI_WHITEOUT_OPAQUE:
            return Whiteout.OPAQUE
        if name.startswith(OCI_WHITEOUT_PREFIX) and len(name) > len(OCI_WHITEOUT_PREFIX):
            return Whiteout.REMOVAL
        return None


class DataReader(Protocol):
    """File data of the current entry; ``read(n)`` returns at most n bytes, b"" at end.

    The result is bytes-like: a tar source hands out memoryviews of its decoded
    blocks (valid after the iterator advances, but they pin the block)."""

    def read(self, n: int = -1, /) -> bytes | memoryview: ...


def normalize_path(raw: bytes) -> bytes:
    """Normalize a layer path: strip ``/`` and ``./`` prefixes, empty and ``.`` components.

    Raises :class:`FormatError` for ``..`` components, which could escape the root.
    """
    if raw[:1] not in (b"/", b".") and b"//" not in raw and b"/." not in raw:
        # No empty, "." or ".." component, except an empty one after a trailing "/".
        return raw[:-1] if raw.endswith(b"/") else raw
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise FormatError(f"layer path {raw!r}: '..' component not allowed")
    return b"/".join(parts)
