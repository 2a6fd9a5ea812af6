"""Read RAFS bootstraps (v5 and v6): the filesystem tree, attributes and chunk maps.

Theory of operation: a bootstrap is the metadata half of a Nydus image.  Opening
one parses only the fixed headers (superblocks, blob table, prefetch table); every
inode, directory block and chunk index is decoded on demand straight from the
buffer (an ``mmap`` for files), the way nydusd's ``direct`` mode does.  So opening
costs the same for 10 or 100,000 files, and each operation touches only the bytes
it needs: a lookup is a binary search over sorted names.

Inode numbers ("ino") are what nydusd and the kernel report: the nid for v6
(``inode offset / 32`` inside the meta area), the builder's inode number for v5.
Names and symlink targets are ``bytes`` (they need not be UTF-8).

Every check upstream applies to untrusted metadata is applied here too: malformed
input raises :class:`pynydus.errors.FormatError` naming the field and byte offset,
never another exception, a hang, or an allocation sized by the input alone.  Asking
for an inode number that cannot exist raises :class:`pynydus.errors.NotFound`;
asking a non-directory for its entries raises :class:`pynydus.errors.InvalidArgument`.

The version-specific decoders live in :mod:`pynydus.rafs.read.v6` and
:mod:`pynydus.rafs.read.v5`; this module holds the value types and the common
algorithms (path lookup, tree walk, read mapping); :mod:`pynydus.rafs.read.open`
tells the versions apart.
"""

from __future__ import annotations

import mmap
import os
import stat as _stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Self

from pynydus.errors import InvalidArgument, NotFound
from pynydus.rafs.format import (
    BlobFeatures,
    Compressor,
    Digester,
    FileType,
    RafsChunkInfo,
    SuperFlags,
)
from pynydus.rafs.format.layout import format_error

Buffer = bytes | bytearray | memoryview | mmap.mmap

#: Longest path lookup_path() accepts, in components (a symlink-free path deeper
#: than this cannot come from a real tree and would only cost time).
MAX_PATH_COMPONENTS = 4096


@dataclass(frozen=True, slots=True)
class Stat:
    """Attributes of one inode, as nydusd reports them (before uid/gid substitution).

    ``blocks`` is in 512-byte units.  ``rdev`` is only meaningful for character and
    block devices (0 otherwise).  When the image lacks EXPLICIT_UID_GID
    (``Bootstrap.explicit_uidgid`` is False) nydusd reports its own euid/egid
    instead of ``uid``/``gid``; that substitution is the daemon's job.
    """

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    mtime: int
    mtime_nsec: int
    rdev: int

    @property
    def is_dir(self) -> bool:
        return _stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return _stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return _stat.S_ISLNK(self.mode)


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One directory entry: raw name, inode number and EROFS file type."""

    name: bytes
    ino: int
    file_type: FileType


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One data blob referenced by the bootstrap (v6 blob table + devslot, or v5 tables).

    The blob table entry as read: immutable, ``index`` is its place in the table.
    The blob of an image being written is a :class:`pynydus.rafs.builder.BlobDesc`.
    Sizes that an old image does not record are 0.  ``features`` are
    :class:`BlobFeatures` bits.  ``ci_*`` locate the chunk-info array inside the blob
    (v6 only).  ``mapped_blkaddr``/``blocks`` come from the v6 device slot.
    """

    index: int
    blob_id: str
    compressor: Compressor
    digester: Digester
    chunk_size: int
    chunk_count: int
    compressed_size: int
    uncompressed_size: int
    features: int = 0
    ci_compressor: Compressor = Compressor.NONE
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_size: int = 0
    blob_toc_digest: bytes = bytes(32)
    blob_meta_digest: bytes = bytes(32)
    blob_meta_size: int = 0
    cipher_algo: int = 0
    mapped_blkaddr: int = 0
    blocks: int = 0
    readahead_offset: int = 0
    readahead_size: int = 0

    @property
    def compressed_data_size(self) -> int:
        """The chunk data of the blob file without the metadata after it (upstream's
        ``BlobInfo::compressed_data_size``): with a TOC (2.2+ builders) the data ends where
        the chunk-info array (or, without one, the metadata) starts, less the tar header
        before it; a SEPARATE blob holds data only."""
        if self.features & BlobFeatures.SEPARATE:
            return self.compressed_size
        if self.features & BlobFeatures.CAP_TAR_TOC:
            tar_header = 0x200 if self.features & BlobFeatures.HAS_TAR_HEADER else 0
            if self.ci_compressed_size and self.ci_uncompressed_size:
                return self.ci_offset - tar_header
            return self.compressed_size - tar_header
        return self.compressed_size


@dataclass(frozen=True, slots=True)
class FileChunk:
    """One chunk of a regular file and where its bytes live, as read from a bootstrap
    (the writer's side is :class:`pynydus.rafs.builder.ChunkDesc`).

    ``file_offset`` is where the chunk starts in the file; ``index`` is the chunk's
    position in its blob's chunk-info array.  ``uncompressed_offset`` is inside the
    blob's uncompressed address space (the ``.blob.data`` cache file / EROFS device).
    ``compressed_offset``/``compressed_size``/``digest``/``compressed`` come from the
    bootstrap's chunk records and are None when a v6 image has no record for the
    chunk (then they must be taken from the blob's chunk-info array).
    ``compressor`` is the blob's compressor; a chunk with ``compressed == False``
    is stored raw even so.
    """

    file_offset: int
    blob_index: int
    blob_id: str
    index: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed_offset: int | None
    compressed_size: int | None
    digest: bytes | None
    compressed: bool | None
    compressor: Compressor
    flags: int = 0
    crc32: int = 0


@dataclass(frozen=True, slots=True)
class ChunkRead:
    """Part of a file read served by one chunk: bytes ``[offset, offset+length)`` of
    the chunk's uncompressed data."""

    chunk: FileChunk
    offset: int
    length: int


class Bootstrap:
    """An open RAFS bootstrap, v5 or v6: :func:`~pynydus.rafs.read.open.open_bootstrap`
    (a file) or :func:`~pynydus.rafs.read.open.bootstrap_from_bytes` (a buffer) detect
    the version and construct the subclass.

    Instances are read-only and safe to share between threads once opened.
    ``close()`` releases the mmap (idempotent); afterwards no method may be called.
    """

    version: int
    root_ino: int
    block_size: int
    chunk_size: int
    flags: int
    compressor: Compressor
    digester: Digester
    inode_count: int
    blobs: list[BlobInfo]
    prefetch_list: list[int]
    """Inode numbers from the bootstrap's prefetch table (0 terminates, absent = [])."""

    def __init__(self, buf: Buffer) -> None:
        # memoryview lacks find(); everything else is used as is (mmap is not copied).
        self._buf: bytes | bytearray | mmap.mmap = (
            buf.tobytes() if isinstance(buf, memoryview) else buf
        )
        self._mmap: mmap.mmap | None = None

    def adopt(self, mapping: mmap.mmap) -> None:
        """Make :meth:`close` release ``mapping`` (the mmap this bootstrap was parsed from)."""
        self._mmap = mapping

    def close(self) -> None:
        """Release the mapping (idempotent)."""
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- image-wide properties --------------------------------------------------------

    @property
    def size(self) -> int:
        """Bootstrap size in bytes."""
        return len(self._buf)

    @property
    def buffer(self) -> bytes | bytearray | mmap.mmap:
        """The whole bootstrap (read-only use; valid until ``close()``), for callers
        that copy records in bulk, like merge."""
        return self._buf

    @property
    def explicit_uidgid(self) -> bool:
        return bool(self.flags & SuperFlags.EXPLICIT_UID_GID)

    @property
    def has_xattr(self) -> bool:
        return bool(self.flags & SuperFlags.HAS_XATTR)

    @property
    def prefetch_all(self) -> bool:
        """True when the prefetch table means "everything" (exactly ``[root]``)."""
        return self.prefetch_list == [self.root_ino]

    # -- per-inode operations (implemented per version) --------------------------------

    def stat(self, ino: int) -> Stat:
        """Attributes of inode ``ino``.  NotFound if no inode can live there."""
        raise NotImplementedError

    def readdir(self, ino: int) -> Iterator[DirEntry]:
        """Entries of directory ``ino`` in on-disk (sorted) order, ``.`` and ``..`` included.

        InvalidArgument if ``ino`` is not a directory.  The iterator decodes lazily.
        """
        raise NotImplementedError

    def stat_fields(self, ino: int) -> tuple[int, int, int, int, int, int, int, int, int]:
        """``stat(ino)`` as a plain tuple ``(mode, nlink, uid, gid, size, blocks, mtime,
        mtime_nsec, rdev)``, same values and errors: for callers that build thousands of
        attributes (a FUSE READDIRPLUS) and need no object per inode."""
        st = self.stat(ino)
        return (st.mode, st.nlink, st.uid, st.gid, st.size, st.blocks, st.mtime, st.mtime_nsec,
                st.rdev)

    def stat_fields_many(self, inos: list[int]) -> list[tuple[int, int, int, int, int, int, int,
                                                               int, int]]:
        """``stat_fields`` of each of ``inos``, in order (a directory listing's worth)."""
        return [self.stat_fields(ino) for ino in inos]

    def readdir_fields(self, ino: int) -> Iterator[tuple[bytes, int, int]]:
        """``readdir(ino)`` as ``(name, ino, EROFS file type)`` tuples."""
        return ((e.name, e.ino, int(e.file_type)) for e in self.readdir(ino))

    def lookup(self, parent: int, name: bytes) -> int:
        """Inode number of ``name`` in directory ``parent`` (binary search).

        NotFound if absent; ``.``/``..`` resolve as stored (root's ``..`` is root).
        """
        raise NotImplementedError

    def readlink(self, ino: int) -> bytes:
        """Target of symlink ``ino``.  InvalidArgument if it is not a symlink."""
        raise NotImplementedError

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        """All extended attributes of ``ino`` as (full name, value), in on-disk order."""
        raise NotImplementedError

    def chunks(self, ino: int) -> list[FileChunk]:
        """Chunks of regular file ``ino`` in file order ([] for other types or empty files)."""
        raise NotImplementedError

    def chunk_record(self, blob_index: int, index: int) -> RafsChunkInfo | None:
        """The bootstrap chunk-table record of chunk ``index`` of blob ``blob_index`` (the
        first, if the table repeats it), or None: no such record, or no chunk table
        (v5 keeps chunk records in its inodes only)."""
        return None

    # -- common algorithms -------------------------------------------------------------

    def listxattr(self, ino: int) -> list[bytes]:
        """Names of the extended attributes of ``ino``."""
        return [name for name, _ in self.xattrs(ino)]

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        """Value of xattr ``name`` of ``ino``, None if it has none by that name."""
        for n, v in self.xattrs(ino):
            if n == name:
                return v
        return None

    def lookup_path(self, path: bytes | str) -> int:
        """Inode number of absolute or root-relative ``path`` (symlinks not followed).

        NotFound if a component is missing; InvalidArgument if an intermediate
        component is not a directory.
        """
        raw = os.fsencode(path)
        parts = [p for p in raw.split(b"/") if p and p != b"."]
        if len(parts) > MAX_PATH_COMPONENTS:
            raise InvalidArgument(
                f"path {raw[:64]!r}... has more than {MAX_PATH_COMPONENTS} components"
            )
        ino = self.root_ino
        for part in parts:
            try:
                ino = self.lookup(ino, part)
            except NotFound:
                raise NotFound(f"path {raw!r}: component {part!r} not found") from None
        return ino

    def walk(self) -> Iterator[tuple[bytes, int]]:
        """Every (path, ino) of the tree, depth first, children in directory order.

        The root is ``b"/"``.  FormatError if a directory is reachable twice
        (a loop, or a directory hard link), so the walk always terminates.
        """
        yield b"/", self.root_ino
        seen = {self.root_ino}
        claimed: set[int] = set()
        self._claim_dir_storage(self.root_ino, claimed)
        stack: list[tuple[bytes, Iterator[DirEntry]]] = [(b"", self.readdir(self.root_ino))]
        while stack:
            prefix, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                stack.pop()
                continue
            if entry.name in (b".", b".."):
                continue
            path = prefix + b"/" + entry.name
            yield path, entry.ino
            if entry.file_type == FileType.DIR:
                if entry.ino in seen:
                    raise format_error(
                        f"directory tree at {path!r}",
                        self._inode_offset(entry.ino),
                        f"directory ino {entry.ino} is reachable twice (loop or directory hard link)",
                    )
                seen.add(entry.ino)
                if not self.stat(entry.ino).is_dir:
                    raise format_error(
                        f"directory entry {path!r}",
                        self._inode_offset(entry.ino),
                        f"typed as a directory but ino {entry.ino} is not one",
                    )
                self._claim_dir_storage(entry.ino, claimed)
                stack.append((path, self.readdir(entry.ino)))

    def _inode_offset(self, ino: int) -> int:
        """Byte offset of inode ``ino``'s record, for error messages."""
        raise NotImplementedError

    def _claim_dir_storage(self, ino: int, claimed: set[int]) -> None:
        """Record where directory ``ino`` keeps its entries; FormatError if another
        directory of this walk already used that storage.

        Without this, distinct directories sharing entry storage would make a walk
        cost (directories x entries) instead of O(bootstrap size).
        """

    def map_read(self, ino: int, offset: int, size: int) -> list[ChunkRead]:
        """Chunk reads that serve ``read(ino, offset, size)``, clamped to the file size.

        Each item says which chunk, and which bytes of its uncompressed data, to
        copy to file position ``chunk.file_offset + offset``; in file order they cover
        ``[offset, min(offset+size, file size))``, except the holes of a v5 file
        flagged HAS_HOLE, which read as zeros.  Costs O(chunks in the range) for v6.
        """
        if offset < 0 or size < 0:
            raise InvalidArgument(f"read of inode {ino}: negative offset {offset} or size {size}")
        st = self.stat(ino)
        if not st.is_reg:
            raise InvalidArgument(f"read of inode {ino}: not a regular file")
        end = min(offset + size, st.size)
        out: list[ChunkRead] = []
        if offset >= end:
            return out
        for chunk in self._chunks_in_range(ino, offset, end):
            c_start = max(offset, chunk.file_offset)
            c_end = min(end, chunk.file_offset + chunk.uncompressed_size)
            if c_start < c_end:
                out.append(ChunkRead(chunk, c_start - chunk.file_offset, c_end - c_start))
        return out

    def _chunks_in_range(self, ino: int, start: int, end: int) -> list[FileChunk]:
        """Chunks overlapping ``[start, end)``; versions override to avoid a full decode."""
        return [
            c
            for c in self.chunks(ino)
            if c.file_offset < end and c.file_offset + c.uncompressed_size > start
        ]
