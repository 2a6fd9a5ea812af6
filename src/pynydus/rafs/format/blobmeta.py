"""Blob-side RAFS structures: chunk-info arrays, their header, the TOC, section headers.

A Nydus data blob is written front to back as ``section | tar header | section |
tar header | …`` and parsed back to front (spec §2.2): each 512-byte GNU tar header
names and sizes the section *before* it.  The chunk-info array ("ci", spec §2.3)
tells where every chunk of the blob lives, compressed and uncompressed; it is
followed by a 4096-byte header.  The TOC (spec §2.6) at the very end lists the
sections with their sha256.

Sans-I/O like :mod:`pynydus.rafs.format.layout`: bytes in, values out; malformed input
raises :class:`pynydus.errors.FormatError` naming the field and byte offset
(offsets are relative to the buffer the caller passed).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from pynydus.errors import FormatError
from pynydus.rafs.format.compress import decompress_frames
from pynydus.rafs.format.layout import (
    RAFS_MAX_CHUNKS_PER_BLOB,
    BlobFeatures,
    Compressor,
    PackedStruct,
    ReadableBuffer,
    format_error,
    le_struct,
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
        raise ValueError(
            f"V1 uncompressed offset {ci.uncompressed_offset} not 4 KiB aligned or too big"
        )
    u = ci.uncompressed_size - 1
    c = ci.compressed_size - 1
    uncomp = ((u & 0xF_FFFF) << 44) | ci.uncompressed_offset | ((u >> 20) << 8)
    comp = ((c & 0xF_FFFF) << 44) | ((c >> 20) << 40) | ci.compressed_offset
    return _U64X2.pack(uncomp, comp)


def unpack_chunk_info_v1(buf: ReadableBuffer, offset: int) -> BlobChunkInfo:
    """Decode a 16-byte V1 entry at ``offset``."""
    need(len(buf), offset, BLOB_CHUNK_INFO_V1_SIZE, "chunk info v1")
    uncomp, comp = _U64X2.unpack_from(buf, offset)
    u_size = ((uncomp >> 44) | (((uncomp >> 8) & 0xF) << 20)) + 1
    c_size = ((comp >> 44) | (((comp >> 40) & 0xF) << 20)) + 1
    flags = ChunkInfoFlags.COMPRESSED if c_size != u_size else 0
    return BlobChunkInfo(
        comp & _MASK40, c_size, uncomp & _V1_UNCOMP_OFFSET_MASK, u_size, int(flags)
    )


def pack_chunk_info_v2(ci: BlobChunkInfo) -> bytes:
    """24-byte V2 entry.  ValueError if a field does not fit V2."""
    if ci.flags & ~CHUNK_INFO_V2_FLAGS_KNOWN:
        raise ValueError(f"unknown V2 chunk flags 0x{ci.flags:x}")
    if not 0 < ci.uncompressed_size <= BLOB_CCT_MAX_CHUNK_SIZE:
        raise ValueError(f"uncompressed size {ci.uncompressed_size} out of range")
    if not 0 <= ci.compressed_size < BLOB_CCT_MAX_CHUNK_SIZE:
        raise ValueError(f"compressed size {ci.compressed_size} out of range")
    if ci.uncompressed_offset & 0xFFF or ci.uncompressed_offset >> 44:
        raise ValueError(
            f"V2 uncompressed offset {ci.uncompressed_offset} not 4 KiB aligned or too big"
        )
    if ci.compressed_offset > _MASK40:
        raise ValueError(f"compressed offset {ci.compressed_offset} too big")
    uncomp = (ci.flags << 56) | ((ci.uncompressed_size - 1) << 32) | (ci.uncompressed_offset >> 12)
    comp = (ci.compressed_size << 40) | ci.compressed_offset
    return _U64X3.pack(uncomp, comp, ci.data)


def unpack_chunk_info_v2(buf: ReadableBuffer, offset: int) -> BlobChunkInfo:
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

    def __init__(self, buf: ReadableBuffer, count: int, v2: bool) -> None:
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
    if size < 8**11:
        h[124:136] = b"%011o\0" % size
    else:  # GNU base-256, as tar-rs writes sizes that do not fit 11 octal digits
        h[124:136] = b"\x80" + size.to_bytes(11, "big")
    h[136:148] = b"%011o\0" % 0
    h[156] = ord("0")
    h[257:263] = b"ustar "
    h[263:265] = b" \0"
    h[148:156] = b" " * 8
    h[148:156] = b"%07o\0" % sum(h)
    return bytes(h)


def _octal(field: bytes, offset: int, what: str) -> int:
    """A tar numeric field: octal digits padded with spaces or NULs (no sign), or GNU
    base-256 (first byte 0x80) for sizes of 8 GiB and more."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.replace(b"\0", b" ").strip()
    if not digits or not all(0x30 <= c <= 0x37 for c in digits):
        raise format_error(f"section tar header {what}", offset, f"{field!r} is not octal")
    return int(digits, 8)


def unpack_section_header(buf: ReadableBuffer, offset: int) -> tuple[str, int]:
    """Decode a section header at ``offset``: (name, section size).

    Checks the checksum and the octal size so that random bytes are not taken
    for a header.
    """
    need(len(buf), offset, TAR_BLOCK_SIZE, "section tar header")
    h = bytes(buf[offset : offset + TAR_BLOCK_SIZE])
    stored = _octal(h[148:156], offset + 148, "checksum")
    size = _octal(h[124:136], offset + 124, "size")
    computed = sum(h[:148]) + 8 * 0x20 + sum(h[156:])
    if stored != computed:
        raise format_error("section tar header checksum", offset + 148, f"{stored} != {computed}")
    name = h[0:100].split(b"\0", 1)[0].decode("latin-1")
    return name, size


def unpack_toc(tail: ReadableBuffer) -> list[TocEntry]:
    """Parse the TOC from the last bytes of a blob (read ``min(4096, blob size)``).

    The last 512 bytes must be a section header named ``rafs.blob.toc``; its
    entries precede it.  FormatError otherwise (offsets relative to ``tail``).
    """
    hdr_off = len(tail) - TAR_BLOCK_SIZE
    if hdr_off < 0:
        raise format_error("blob TOC", 0, f"tail of {len(tail)} bytes has no tar header")
    name, size = unpack_section_header(tail, hdr_off)
    if name != TOC_ENTRY_BLOB_TOC:
        raise format_error(
            "blob TOC header name", hdr_off, f"{name!r} is not {TOC_ENTRY_BLOB_TOC!r}"
        )
    if size % TocEntry.SIZE or size > hdr_off:
        raise format_error(
            "blob TOC size", hdr_off + 124, f"{size} invalid for a {hdr_off}-byte tail"
        )
    start = hdr_off - size
    return [TocEntry.unpack(tail, start + i * TocEntry.SIZE) for i in range(size // TocEntry.SIZE)]


# ---------------------------------------------------------------------------
# Loading a blob's chunk-info array (what nydusd does on first access to a v6 blob)


@dataclass(frozen=True)
class BlobMeta:
    """A validated chunk-info array of one blob.

    ``data`` is the uncompressed ci buffer: the entries, then (BATCH/ZRAN) the
    contexts at ``header.ci_zran_offset``.  ``chunk(i)`` checks entry ``i`` against
    the blob's sizes before returning it.
    """

    header: BlobCompressionContextHeader
    data: bytes
    v2: bool
    chunk_count: int
    compressed_size: int
    uncompressed_size: int

    def chunk(self, index: int) -> BlobChunkInfo:
        """Entry ``index``; IndexError if out of range, FormatError if it is inconsistent."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(index)
        size = BLOB_CHUNK_INFO_V2_SIZE if self.v2 else BLOB_CHUNK_INFO_V1_SIZE
        off = index * size
        ci = (
            unpack_chunk_info_v2(self.data, off)
            if self.v2
            else unpack_chunk_info_v1(self.data, off)
        )
        plain = not ci.flags & (
            ChunkInfoFlags.COMPRESSED | ChunkInfoFlags.ENCRYPTED | ChunkInfoFlags.BATCH
        )
        if (
            ci.uncompressed_end > self.uncompressed_size
            or (self.compressed_size and ci.compressed_end > self.compressed_size)
            or (plain and ci.compressed_size != ci.uncompressed_size)
        ):
            raise format_error(
                f"chunk info {index}",
                off,
                f"c {ci.compressed_offset}+{ci.compressed_size} u {ci.uncompressed_offset}+{ci.uncompressed_size} "
                f"inconsistent with blob sizes {self.compressed_size}/{self.uncompressed_size}",
            )
        return ci

    def contexts(self) -> list[ZranContext] | list[BatchContext]:
        """ZRAN or batch contexts stored after the entries ([] for plain blobs)."""
        h = self.header
        if not h.ci_zran_count:
            return []
        cls: type[ZranContext | BatchContext] = (
            ZranContext if h.features & BlobFeatures.ZRAN else BatchContext
        )
        need(len(self.data), h.ci_zran_offset, h.ci_zran_count * cls.SIZE, "ci contexts")
        return [
            cls.unpack(self.data, h.ci_zran_offset + i * cls.SIZE) for i in range(h.ci_zran_count)
        ]  # type: ignore[return-value]


class BlobInfoLike(Protocol):
    """What blob-meta loading needs of a blob; :class:`pynydus.rafs.read.bootstrap.BlobInfo` fits."""

    @property
    def chunk_count(self) -> int: ...
    @property
    def ci_compressor(self) -> Compressor: ...
    @property
    def ci_offset(self) -> int: ...
    @property
    def ci_compressed_size(self) -> int: ...
    @property
    def ci_uncompressed_size(self) -> int: ...
    @property
    def compressed_size(self) -> int: ...
    @property
    def uncompressed_size(self) -> int: ...
    @property
    def features(self) -> int: ...


#: Upper bound for an uncompressed chunk-info buffer: 2^24 V2 entries plus room for
#: ZRAN/batch contexts and dictionaries.  Guards the decompression allocation.
MAX_CI_UNCOMPRESSED_SIZE = RAFS_MAX_CHUNKS_PER_BLOB * BLOB_CHUNK_INFO_V2_SIZE + (256 << 20)


def check_header(header: BlobCompressionContextHeader, blob: BlobInfoLike, offset: int = 0) -> None:
    """FormatError unless ``header`` belongs to ``blob`` (upstream ``validate_header``).

    ``offset`` is where the header was found, for the message.
    """
    if header.magic != BLOB_CCT_MAGIC or header.magic2 != BLOB_CCT_MAGIC:
        raise format_error(
            "blob meta header magic", offset, f"0x{header.magic:x}/0x{header.magic2:x}"
        )
    for field, rel, got, want in (
        ("ci_entries", 12, header.ci_entries, blob.chunk_count),
        ("ci_compressor", 8, header.ci_compressor, int(blob.ci_compressor)),
        ("ci_offset", 16, header.ci_offset, blob.ci_offset),
        ("ci_compressed_size", 24, header.ci_compressed_size, blob.ci_compressed_size),
        ("ci_uncompressed_size", 32, header.ci_uncompressed_size, blob.ci_uncompressed_size),
    ):
        if got != want:
            raise format_error(
                f"blob meta header {field}", offset + rel, f"{got}, blob table says {want}"
            )


def _build_meta(header: BlobCompressionContextHeader, ci: bytes, blob: BlobInfoLike) -> BlobMeta:
    v2 = bool(blob.features & BlobFeatures.CHUNK_INFO_V2)
    size = BLOB_CHUNK_INFO_V2_SIZE if v2 else BLOB_CHUNK_INFO_V1_SIZE
    need(len(ci), 0, blob.chunk_count * size, "chunk info array")
    return BlobMeta(header, ci, v2, blob.chunk_count, blob.compressed_size, blob.uncompressed_size)


def meta_from_parts(header: BlobCompressionContextHeader, ci: bytes,
                    blob: BlobInfoLike) -> BlobMeta:
    """A BlobMeta over the first part of a chunk-info buffer (at least the entries; the
    contexts too for BATCH/ZRAN) and its header, checked by the caller
    (:func:`check_header`): framed ZRAN chunk info read without its windows."""
    return _build_meta(header, ci, blob)


def parse_blob_meta(raw: bytes, blob: BlobInfoLike) -> BlobMeta:
    """Parse ``ci_compressed_size + 4096`` bytes read at ``blob.ci_offset`` of the blob
    (or of the separate meta blob): the compressed ci array, then its header.

    Decompresses with ``blob.ci_compressor``; FormatError on any inconsistency.
    """
    if len(raw) != blob.ci_compressed_size + BLOB_CCT_HEADER_SIZE:
        raise format_error("blob meta", 0, f"{len(raw)} bytes, expected ci_compressed_size + 4096")
    header = BlobCompressionContextHeader.unpack(raw, blob.ci_compressed_size)
    check_header(header, blob, blob.ci_compressed_size)
    if blob.ci_uncompressed_size > MAX_CI_UNCOMPRESSED_SIZE:
        raise format_error(
            "blob meta ci_uncompressed_size", blob.ci_compressed_size + 32, "too large"
        )
    try:
        ci = decompress_frames(
            raw[: blob.ci_compressed_size],
            Compressor(blob.ci_compressor),
            blob.ci_uncompressed_size,
        )
    except FormatError as err:
        raise format_error("blob meta chunk-info array", 0, str(err)) from err
    return _build_meta(header, ci, blob)


def pack_cached_blob_meta(header: BlobCompressionContextHeader, ci_uncompressed: bytes) -> bytes:
    """``<blob_id>.blob.meta`` cache file: uncompressed ci padded to 4 KiB, then the header."""
    pad = -len(ci_uncompressed) % 4096
    return ci_uncompressed + bytes(pad) + header.pack()


def parse_cached_blob_meta(data: bytes, blob: BlobInfoLike) -> BlobMeta:
    """Parse a ``<blob_id>.blob.meta`` cache file (see :func:`pack_cached_blob_meta`)."""
    ci_len = blob.ci_uncompressed_size
    want = ci_len + (-ci_len % 4096) + BLOB_CCT_HEADER_SIZE
    if len(data) != want:
        raise format_error("cached blob meta", 0, f"{len(data)} bytes, expected {want}")
    header = BlobCompressionContextHeader.unpack(data, want - BLOB_CCT_HEADER_SIZE)
    check_header(header, blob, want - BLOB_CCT_HEADER_SIZE)
    return _build_meta(header, data[:ci_len], blob)
