"""RAFS v5 on-disk structures (the pre-EROFS format), sans-I/O.

Same conventions as :mod:`pynydus.rafs.format.layout`: frozen dataclasses packed with one
precompiled little-endian struct, ``unpack`` checks only that the bytes are there,
the reader (:mod:`pynydus.rafs.read.v5`) applies nydusd's semantic checks.  The 80-byte
chunk record is shared with v6 and defined in ``layout`` (``RafsChunkInfo``).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from pynydus.rafs.format.layout import (
    RAFS_DEFAULT_CHUNK_SIZE,
    PackedStruct,
    ReadableBuffer,
    align_up,
    format_error,
    le_struct,
    need,
)

_U32 = struct.Struct("<I")


class V5InodeFlags(enum.IntFlag):
    """``RafsInodeFlags`` of a v5 inode."""

    SYMLINK = 0x1
    HARDLINK = 0x2
    XATTR = 0x4
    HAS_HOLE = 0x8


RAFS_V5_SUPER_MAGIC = 0x5241_4653  # "RAFS" read as a little-endian u32
RAFS_V5_SUPER_VERSION = 0x500
RAFS_V5_SUPER_VERSION_V4 = 0x400
RAFS_V5_SUPERBLOCK_SIZE = 8192
RAFS_V5_ALIGNMENT = 8
RAFS_V5_INODE_SIZE = 128
RAFS_V5_EXT_BLOB_ENTRY_SIZE = 64
RAFS_V5_ROOT_INODE = 1
#: nydusd refuses v5 bootstraps larger than this (``RAFS_MAX_METADATA_SIZE``).
RAFS_MAX_METADATA_SIZE = 0x8000_0000


@dataclass(frozen=True, slots=True)
class RafsV5SuperBlock(PackedStruct):
    """RAFS v5 superblock, 8192 B at offset 0."""

    _FMT: ClassVar[struct.Struct] = le_struct("IIIIQQQQQIIIIQ8112x", 8192)
    SIZE: ClassVar[int] = 8192

    magic: int = RAFS_V5_SUPER_MAGIC
    fs_version: int = RAFS_V5_SUPER_VERSION
    sb_size: int = RAFS_V5_SUPERBLOCK_SIZE
    block_size: int = RAFS_DEFAULT_CHUNK_SIZE  # = chunk size
    flags: int = 0
    inodes_count: int = 0
    inode_table_offset: int = 0
    prefetch_table_offset: int = 0
    blob_table_offset: int = 0
    inode_table_entries: int = 0
    prefetch_table_entries: int = 0
    blob_table_size: int = 0
    extended_blob_table_entries: int = 0
    extended_blob_table_offset: int = 0


@dataclass(frozen=True, slots=True)
class RafsV5Inode(PackedStruct):
    """128-byte v5 inode; followed by name and symlink target, each padded to 8, then
    (if XATTR) the xattr table, then (regular files) ``child_count`` 80-byte chunk infos.
    """

    _FMT: ClassVar[struct.Struct] = le_struct("32sQQIIIIQQQIIIHHIIQ8x", 128)
    SIZE: ClassVar[int] = 128

    digest: bytes = bytes(32)
    parent: int = 0
    ino: int = 0
    uid: int = 0
    gid: int = 0
    projid: int = 0
    mode: int = 0
    size: int = 0
    blocks: int = 0
    flags: int = 0
    nlink: int = 0
    child_index: int = 0
    child_count: int = 0
    name_size: int = 0
    symlink_size: int = 0
    rdev: int = 0
    mtime_nsec: int = 0
    mtime: int = 0

    @property
    def body_size(self) -> int:
        """Inode + padded name + padded symlink target (start of the xattr table)."""
        return (
            RAFS_V5_INODE_SIZE
            + align_up(self.name_size, RAFS_V5_ALIGNMENT)
            + align_up(self.symlink_size, RAFS_V5_ALIGNMENT)
        )


@dataclass(frozen=True, slots=True)
class RafsV5ExtBlobEntry(PackedStruct):
    """64-byte extended blob table entry (v5)."""

    _FMT: ClassVar[struct.Struct] = le_struct("IIQQ40x", 64)
    SIZE: ClassVar[int] = 64

    chunk_count: int = 0
    features: int = 0
    uncompressed_size: int = 0
    compressed_size: int = 0


@dataclass(frozen=True, slots=True)
class RafsV5BlobEntry:
    """One entry of the v5 blob table: readahead hint and blob id (variable length)."""

    readahead_offset: int
    readahead_size: int
    blob_id: bytes


def pack_v5_blob_table(entries: Sequence[RafsV5BlobEntry]) -> bytes:
    """v5 blob table: ``u32 ra_off, u32 ra_size, id`` joined by NUL, padded to 8."""
    parts = [
        _U32.pack(e.readahead_offset) + _U32.pack(e.readahead_size) + e.blob_id for e in entries
    ]
    data = b"\0".join(parts)
    return data + bytes(-len(data) % RAFS_V5_ALIGNMENT)


def unpack_v5_blob_table(buf: ReadableBuffer, offset: int, size: int) -> list[RafsV5BlobEntry]:
    """Decode a v5 blob table of ``size`` bytes at ``offset`` (trailing padding ignored).

    Each blob id must be non-empty valid ASCII without NUL.
    """
    need(len(buf), offset, size, "v5 blob table")
    data = bytes(buf[offset : offset + size])
    out: list[RafsV5BlobEntry] = []
    pos = 0
    while len(data) - pos > 8:
        ra_off, ra_size = struct.unpack_from("<II", data, pos)
        end = data.find(b"\0", pos + 8)
        if end < 0:
            end = len(data)
        blob_id = data[pos + 8 : end]
        if not blob_id or not blob_id.isascii():
            raise format_error("v5 blob table blob id", offset + pos + 8, f"invalid id {blob_id!r}")
        out.append(RafsV5BlobEntry(ra_off, ra_size, blob_id))
        pos = end + 1
    return out


def pack_v5_xattrs(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """v5 xattr table: u64 content size, then ``u32 pair size, name, NUL, value``; padded to 8.

    Returns b"" when there are no pairs (then the inode has no XATTR flag).
    """
    body = bytearray()
    for name, value in pairs:
        body += _U32.pack(len(name) + 1 + len(value)) + name + b"\0" + value
    if not body:
        return b""
    data = struct.pack("<Q", len(body)) + bytes(body)
    return data + bytes(-len(data) % RAFS_V5_ALIGNMENT)


def unpack_v5_xattrs(buf: ReadableBuffer, offset: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """Decode the v5 xattr table at ``offset``; returns (pairs, padded table size)."""
    need(len(buf), offset, 8, "v5 xattr table size")
    (size,) = struct.unpack_from("<Q", buf, offset)
    need(len(buf), offset + 8, size, "v5 xattr table")
    pairs: list[tuple[bytes, bytes]] = []
    pos = offset + 8
    end = pos + size
    while pos < end:
        if end - pos < 4:
            raise format_error("v5 xattr pair size", pos, "truncated")
        (pair_size,) = _U32.unpack_from(buf, pos)
        pos += 4
        if pair_size > end - pos:
            raise format_error("v5 xattr pair", pos, f"size {pair_size} runs past the table")
        pair = bytes(buf[pos : pos + pair_size])
        nul = pair.find(b"\0")
        if nul <= 0:
            raise format_error("v5 xattr pair", pos, "name missing or not NUL terminated")
        pairs.append((pair[:nul], pair[nul + 1 :]))
        pos += pair_size
    return pairs, align_up(8 + size, RAFS_V5_ALIGNMENT)
