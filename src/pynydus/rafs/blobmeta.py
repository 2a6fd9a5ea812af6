"""Blob-side RAFS structures: chunk-info arrays, their header, the TOC, section headers.

A Nydus data blob is written front to back as ``section | tar header | section |
tar header | …`` and parsed back to front (spec §2.2): each 512-byte GNU tar header
names and sizes the section *before* it.  The chunk-info array ("ci", spec §2.3)
tells where every chunk of the blob lives, compressed and uncompressed; it is
followed by a 4096-byte header.  The TOC (spec §2.6) at the very end lists the
sections with their sha256.

Sans-I/O like :mod:`pynydus.rafs.layout`: bytes in, values out; malformed input
raises :class:`pynydus.errors.FormatError` naming the field and byte offset
(offsets are relative to the buffer the caller passed).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Sequence

from pynydus.rafs.layout import (
    BlobFeatures,
    le_struct,
    PackedStruct,
    format_error,
    need,
)

BLOB_CCT_MAGIC = 0xB10B_B10B
BLOB_CCT_HEADER_SIZE = 4096
#: Largest chunk a chunk-info entry can describe (sizes are 24-bit, stored minus one).
BLOB_CCT_MAX_CHUNK_SIZE = 1 << 24
BLOB_CHUNK_INFO_V1_SIZE = 16
BLOB_CHUNK_INFO_V2_SIZE = 24
TAR_BLOCK_SIZE = 512

# Section names in the TOC and in the trailing tar headers.
TOC_ENTRY_BLOB_RAW = "image.blob"
TOC_ENTRY_BOOTSTRAP = "image.boot"
TOC_ENTRY_BLOB_META = "blob.meta"
TOC_ENTRY_BLOB_META_HEADER = "blob.meta.header"
TOC_ENTRY_BLOB_DIGEST = "blob.digest"
TOC_ENTRY_BLOB_TOC = "rafs.blob.toc"


@dataclass(frozen=True, slots=True)
class BlobCompressionContextHeader(PackedStruct):
    """4096-byte header that follows the (compressed) chunk-info array (spec §2.3).

    Valid for a blob iff both magics match and entries/compressor/offset/sizes
    equal the blob table entry.
    """

    _FMT: ClassVar[struct.Struct] = le_struct("IIIIQQQQQI4032xI", 4096)
    SIZE: ClassVar[int] = 4096

    magic: int = BLOB_CCT_MAGIC
    features: int = 0
    ci_compressor: int = 0
    ci_entries: int = 0
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    ci_zran_offset: int = 0
    ci_zran_size: int = 0
    ci_zran_count: int = 0
    magic2: int = BLOB_CCT_MAGIC


class ChunkInfoFlags(enum.IntFlag):
    """Flags of a V2 chunk-info entry (top byte of ``uncomp_info``)."""

    COMPRESSED = 0x01
    ZRAN = 0x02
    BATCH = 0x04
    ENCRYPTED = 0x08
    HAS_CRC32 = 0x10


CHUNK_INFO_V2_FLAGS_KNOWN = 0x1F


@dataclass(frozen=True, slots=True)
class BlobChunkInfo:
    """Decoded chunk-info entry (either on-disk version).

    ``data`` (V2 only) holds ``zran_index << 32 | offset`` for ZRAN chunks,
    ``batch_index << 32 | offset`` for batch members, else the CRC32C in the low
    32 bits when HAS_CRC32.  For V1 ``flags`` has only COMPRESSED, derived from
    ``compressed_size != uncompressed_size``.
    """

    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    flags: int = 0
    data: int = 0

    @property
    def is_compressed(self) -> bool:
        return bool(self.flags & ChunkInfoFlags.COMPRESSED)

    @property
    def compressed_end(self) -> int:
        return self.compressed_offset + self.compressed_size

    @property
    def uncompressed_end(self) -> int:
        return self.uncompressed_offset + self.uncompressed_size


_U64X2 = struct.Struct("<QQ")
_U64X3 = struct.Struct("<QQQ")
_MASK40 = (1 << 40) - 1
_V1_UNCOMP_OFFSET_MASK = 0xFFF_FFFF_F000


def pack_chunk_info_v1(ci: BlobChunkInfo) -> bytes:
    """16-byte V1 entry.  ValueError if a field does not fit V1 (or has V2-only flags)."""
    if ci.flags & ~ChunkInfoFlags.COMPRESSED or ci.data:
        raise ValueError("V1 chunk info carries no flags or data")
    if ci.is_compressed == (ci.compressed_size == ci.uncompressed_size):
        raise ValueError("V1 chunk info: compressed iff sizes differ")
    _check_sizes(ci)
    if ci.uncompressed_offset & ~_V1_UNCOMP_OFFSET_MASK:
        raise ValueError(f"V1 uncompressed offset {ci.uncompressed_offset} not 4 KiB aligned or too big")
    u = ci.uncompressed_size - 1
    c = ci.compressed_size - 1
    uncomp = ((u & 0xF_FFFF) << 44) | ci.uncompressed_offset | ((u >> 20) << 8)
    comp = ((c & 0xF_FFFF) << 44) | ((c >> 20) << 40) | ci.compressed_offset
    return _U64X2.pack(uncomp, comp)


def unpack_chunk_info_v1(buf: bytes | bytearray | memoryview, offset: int) -> BlobChunkInfo:
    """Decode a 16-byte V1 entry at ``offset``."""
    need(len(buf), offset, BLOB_CHUNK_INFO_V1_SIZE, "chunk info v1")
    uncomp, comp = _U64X2.unpack_from(buf, offset)
    u_size = ((uncomp >> 44) | (((uncomp >> 8) & 0xF) << 20)) + 1
    c_size = ((comp >> 44) | (((comp >> 40) & 0xF) << 20)) + 1
    flags = ChunkInfoFlags.COMPRESSED if c_size != u_size else 0
    return BlobChunkInfo(comp & _MASK40, c_size, uncomp & _V1_UNCOMP_OFFSET_MASK, u_size, int(flags))


def pack_chunk_info_v2(ci: BlobChunkInfo) -> bytes:
    """24-byte V2 entry.  ValueError if a field does not fit V2."""
    if ci.flags & ~CHUNK_INFO_V2_FLAGS_KNOWN:
        raise ValueError(f"unknown V2 chunk flags 0x{ci.flags:x}")
    if not 0 < ci.uncompressed_size <= BLOB_CCT_MAX_CHUNK_SIZE:
        raise ValueError(f"uncompressed size {ci.uncompressed_size} out of range")
    if not 0 <= ci.compressed_size < BLOB_CCT_MAX_CHUNK_SIZE:
        raise ValueError(f"compressed size {ci.compressed_size} out of range")
    if ci.uncompressed_offset & 0xFFF or ci.uncompressed_offset >> 44:
        raise ValueError(f"V2 uncompressed offset {ci.uncompressed_offset} not 4 KiB aligned or too big")
    if ci.compressed_offset > _MASK40:
        raise ValueError(f"compressed offset {ci.compressed_offset} too big")
    uncomp = (ci.flags << 56) | ((ci.uncompressed_size - 1) << 32) | (ci.uncompressed_offset >> 12)
    comp = (ci.compressed_size << 40) | ci.compressed_offset
    return _U64X3.pack(uncomp, comp, ci.data)


def unpack_chunk_info_v2(buf: bytes | bytearray | memoryview, offset: int) -> BlobChunkInfo:
    """Decode a 24-byte V2 entry at ``offset``; FormatError on unknown flag bits."""
    need(len(buf), offset, BLOB_CHUNK_INFO_V2_SIZE, "chunk info v2")
    uncomp, comp, data = _U64X3.unpack_from(buf, offset)
    flags = uncomp >> 56
    if flags & ~CHUNK_INFO_V2_FLAGS_KNOWN:
        raise format_error("chunk info v2 flags", offset, f"unknown bits 0x{flags:x}")
    return BlobChunkInfo(
        comp & _MASK40,
        comp >> 40,
        (uncomp & 0xFFFF_FFFF) << 12,
        ((uncomp >> 32) & 0xFF_FFFF) + 1,
        flags,
        data,
    )


def _check_sizes(ci: BlobChunkInfo) -> None:
    for what, v in (("uncompressed", ci.uncompressed_size), ("compressed", ci.compressed_size)):
        if not 0 < v <= BLOB_CCT_MAX_CHUNK_SIZE:
            raise ValueError(f"{what} size {v} out of range 1..{BLOB_CCT_MAX_CHUNK_SIZE}")
    if ci.compressed_offset > _MASK40:
        raise ValueError(f"compressed offset {ci.compressed_offset} too big")


def pack_chunk_info_array(entries: Sequence[BlobChunkInfo], v2: bool) -> bytes:
    """The uncompressed chunk-info array (V1 or V2 entries, in ci-index order)."""
    pack = pack_chunk_info_v2 if v2 else pack_chunk_info_v1
    return b"".join(pack(e) for e in entries)


class ChunkInfoArray:
    """Lazy view over an uncompressed chunk-info array: ``arr[i]`` decodes entry i.

    ``count`` must be bounded by the caller (it is checked against ``len(buf)``).
    """

    __slots__ = ("_buf", "_count", "_size", "_unpack")

    def __init__(self, buf: bytes | bytearray | memoryview, count: int, v2: bool) -> None:
        self._size = BLOB_CHUNK_INFO_V2_SIZE if v2 else BLOB_CHUNK_INFO_V1_SIZE
        need(len(buf), 0, count * self._size, "chunk info array")
        self._buf = buf
        self._count = count
        self._unpack = unpack_chunk_info_v2 if v2 else unpack_chunk_info_v1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> BlobChunkInfo:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._unpack(self._buf, index * self._size)


def expected_ci_uncompressed_size(chunk_count: int, features: int) -> int | None:
    """ci_uncompressed_size upstream requires for plain blobs; None when not fixed
    (batch/zran/encrypted contexts follow the entries, tarfs has no array)."""
    f = BlobFeatures(features & 0xFFFF_FFFF)
    if f & (BlobFeatures.BATCH | BlobFeatures.ZRAN | BlobFeatures.ENCRYPTED | BlobFeatures.TARFS):
        return None
    if f & BlobFeatures.IS_CHUNKDICT_GENERATED:
        return None
    size = BLOB_CHUNK_INFO_V2_SIZE if f & BlobFeatures.CHUNK_INFO_V2 else BLOB_CHUNK_INFO_V1_SIZE
    return chunk_count * size


@dataclass(frozen=True, slots=True)
class ZranContext(PackedStruct):
    """40-byte ZRAN inflate context (spec §2.5)."""

    _FMT: ClassVar[struct.Struct] = le_struct("QQQIIIBB2x", 40)
    SIZE: ClassVar[int] = 40

    in_offset: int = 0
    out_offset: int = 0
    dict_offset: int = 0
    in_len: int = 0
    out_len: int = 0
    dict_size: int = 0
    ctx_byte: int = 0
    ctx_bits: int = 0


@dataclass(frozen=True, slots=True)
class BatchContext(PackedStruct):
    """40-byte batch context (spec §2.4)."""

    _FMT: ClassVar[struct.Struct] = le_struct("II32x", 40)
    SIZE: ClassVar[int] = 40

    compressed_size: int = 0
    uncompressed_batch_size: int = 0


class TocFlags(enum.IntFlag):
    """Compression of a TOC entry's content."""

    COMPRESSION_NONE = 0x1
    COMPRESSION_ZSTD = 0x2
    COMPRESSION_LZ4_BLOCK = 0x4


@dataclass(frozen=True, slots=True)
class TocEntry(PackedStruct):
    """128-byte blob TOC entry (spec §2.6).  ``name`` is NUL padded to 16 bytes."""

    _FMT: ClassVar[struct.Struct] = le_struct("I4x16s32sQQQ48x", 128)
    SIZE: ClassVar[int] = 128

    flags: int = TocFlags.COMPRESSION_NONE
    name: bytes = bytes(16)
    uncompressed_digest: bytes = bytes(32)
    compressed_offset: int = 0
    compressed_size: int = 0
    uncompressed_size: int = 0

    @property
    def entry_name(self) -> str:
        """Name without NUL padding (latin-1, so any bytes decode)."""
        return self.name.rstrip(b"\0").decode("latin-1")


# ---------------------------------------------------------------------------
# 512-byte section headers (GNU tar headers placed *after* their section)


def pack_section_header(name: str, size: int) -> bytes:
    """GNU tar header naming the preceding section, as upstream writes it.

    Matches Rust ``tar::Header::new_gnu`` + path + regular type + size + checksum:
    mode/uid/gid stay NUL, mtime is octal 0, magic ``"ustar "`` version ``" \\0"``.
    """
    raw = name.encode()
    if not raw or len(raw) > 100:
        raise ValueError(f"section name {name!r} must be 1..100 bytes")
    h = bytearray(TAR_BLOCK_SIZE)
    h[0 : len(raw)] = raw
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % 0
    h[156] = ord("0")
    h[257:263] = b"ustar "
    h[263:265] = b" \0"
    h[148:156] = b" " * 8
    h[148:156] = b"%07o\0" % sum(h)
    return bytes(h)


def unpack_section_header(buf: bytes | bytearray | memoryview, offset: int) -> tuple[str, int]:
    """Decode a section header at ``offset``: (name, section size).

    Checks the checksum and the octal size so that random bytes are not taken
    for a header.
    """
    need(len(buf), offset, TAR_BLOCK_SIZE, "section tar header")
    h = bytes(buf[offset : offset + TAR_BLOCK_SIZE])
    try:
        stored = int(h[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
        size = int(h[124:136].replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError as err:
        raise format_error("section tar header", offset, "non-octal size or checksum") from err
    computed = sum(h[:148]) + 8 * 0x20 + sum(h[156:])
    if stored != computed:
        raise format_error("section tar header checksum", offset + 148, f"{stored} != {computed}")
    name = h[0:100].split(b"\0", 1)[0].decode("latin-1")
    return name, size


def unpack_toc(tail: bytes | bytearray | memoryview) -> list[TocEntry]:
    """Parse the TOC from the last bytes of a blob (read ``min(4096, blob size)``).

    The last 512 bytes must be a section header named ``rafs.blob.toc``; its
    entries precede it.  FormatError otherwise (offsets relative to ``tail``).
    """
    hdr_off = len(tail) - TAR_BLOCK_SIZE
    if hdr_off < 0:
        raise format_error("blob TOC", 0, f"tail of {len(tail)} bytes has no tar header")
    name, size = unpack_section_header(tail, hdr_off)
    if name != TOC_ENTRY_BLOB_TOC:
        raise format_error("blob TOC header name", hdr_off, f"{name!r} is not {TOC_ENTRY_BLOB_TOC!r}")
    if size % TocEntry.SIZE or size > hdr_off:
        raise format_error("blob TOC size", hdr_off + 124, f"{size} invalid for a {hdr_off}-byte tail")
    start = hdr_off - size
    return [TocEntry.unpack(tail, start + i * TocEntry.SIZE) for i in range(size // TocEntry.SIZE)]
