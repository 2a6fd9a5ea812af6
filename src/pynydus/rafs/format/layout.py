"""RAFS on-disk structures shared by v5 and v6, and the RAFS v6 (EROFS) ones; sans-I/O.

The legacy v5 structures live in :mod:`pynydus.rafs.format.layout_v5`.


Theory of operation: every structure is a frozen dataclass whose fields, in
declaration order, are exactly the non-padding fields of one precompiled
little-endian ``struct.Struct``.  ``pack()`` turns the value into its on-disk
bytes (reserved areas written as zeros); ``unpack(buf, offset)`` reads it back
after checking that the whole structure lies inside ``buf``.  Unpacking checks
only *size*; the semantic checks that upstream nydusd applies (magic, versions,
alignment, bounds) live in the reader (``pynydus.rafs.read.v6`` / ``v5``), because a
builder must be able to construct a value before it is valid.  A builder checks
its output by opening it with the reader.

Everything here is bytes in, values out: no files, no mmap.  Offsets in the
comments are byte offsets inside the structure.  Field names follow upstream
(``s_``/``i_`` prefixes dropped) so that the spec (``rafs-nydusd-spec.md``
§1, §2) can be read side by side.

Malformed input raises :class:`pynydus.errors.FormatError` whose message
names the structure or field and the absolute byte offset.
"""

from __future__ import annotations

import enum
import mmap
import operator
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar, Self

from pynydus.errors import FormatError

#: Anything the decoders read from: bytes, a bytearray, a memoryview or an mmap.
ReadableBuffer = bytes | bytearray | memoryview | mmap.mmap

# ---------------------------------------------------------------------------
# Errors


def format_error(what: str, offset: int, detail: str) -> FormatError:
    """Build the one error shape used for malformed images.

    ``what`` names the structure or field, ``offset`` the absolute byte offset
    in the bootstrap (or blob) where it was found.
    """
    return FormatError(f"{what} at offset {offset} (0x{offset:x}): {detail}")


def need(buf_len: int, offset: int, size: int, what: str) -> None:
    """Raise FormatError unless ``[offset, offset+size)`` lies inside a buffer of ``buf_len``."""
    if offset < 0 or size < 0 or offset + size > buf_len:
        raise format_error(what, offset, f"needs {size} bytes but the buffer ends at {buf_len}")


# ---------------------------------------------------------------------------
# Algorithms and flags


class Compressor(enum.IntEnum):
    """Chunk / chunk-info compression (``utils/src/compress``); values as stored in v6 blob entries."""

    NONE = 0
    LZ4_BLOCK = 1
    GZIP = 2
    ZSTD = 3


class Digester(enum.IntEnum):
    """Chunk digest algorithm; values as stored in v6 blob entries."""

    BLAKE3 = 0
    SHA256 = 1


class CipherAlgo(enum.IntEnum):
    """Chunk data encryption algorithm of a v6 blob entry."""

    NONE = 0
    AES128XTS = 1
    AES256XTS = 2
    AES256GCM = 3


class SuperFlags(enum.IntFlag):
    """``RafsSuperFlags``: ext-superblock (v6) / superblock (v5) ``flags`` bits."""

    COMPRESSION_NONE = 0x0000_0001
    COMPRESSION_LZ4 = 0x0000_0002
    HASH_BLAKE3 = 0x0000_0004
    HASH_SHA256 = 0x0000_0008
    EXPLICIT_UID_GID = 0x0000_0010
    HAS_XATTR = 0x0000_0020
    COMPRESSION_GZIP = 0x0000_0040
    COMPRESSION_ZSTD = 0x0000_0080
    INLINED_CHUNK_DIGEST = 0x0000_0100
    TARTFS_MODE = 0x0000_0200
    ENCRYPTION_NONE = 0x0100_0000
    ENCRYPTION_ASE_128_XTS = 0x0200_0000
    PRESERVED_COMPAT_5 = 0x0400_0000
    PRESERVED_COMPAT_4 = 0x0800_0000
    PRESERVED_COMPAT_3 = 0x1000_0000
    PRESERVED_COMPAT_2 = 0x2000_0000
    PRESERVED_COMPAT_1 = 0x4000_0000
    PRESERVED_COMPAT_0 = 0x8000_0000


SUPER_FLAGS_KNOWN = 0
for _flag in SuperFlags:
    SUPER_FLAGS_KNOWN |= int(_flag)
SUPER_FLAGS_COMPRESSION_MASK = int(
    SuperFlags.COMPRESSION_NONE
    | SuperFlags.COMPRESSION_LZ4
    | SuperFlags.COMPRESSION_GZIP
    | SuperFlags.COMPRESSION_ZSTD
)
SUPER_FLAGS_HASH_MASK = int(SuperFlags.HASH_BLAKE3 | SuperFlags.HASH_SHA256)

_COMPRESSOR_FLAG = {
    Compressor.NONE: SuperFlags.COMPRESSION_NONE,
    Compressor.LZ4_BLOCK: SuperFlags.COMPRESSION_LZ4,
    Compressor.GZIP: SuperFlags.COMPRESSION_GZIP,
    Compressor.ZSTD: SuperFlags.COMPRESSION_ZSTD,
}
_DIGESTER_FLAG = {Digester.BLAKE3: SuperFlags.HASH_BLAKE3, Digester.SHA256: SuperFlags.HASH_SHA256}


def compressor_flag(c: Compressor) -> int:
    """The superblock flag bit that announces compressor ``c``."""
    return int(_COMPRESSOR_FLAG[c])


def digester_flag(d: Digester) -> int:
    """The superblock flag bit that announces digester ``d``."""
    return int(_DIGESTER_FLAG[d])


def compressor_from_flags(flags: int) -> Compressor | None:
    """Compressor named by exactly one compression bit of ``flags``; None if zero or several."""
    found = [c for c, f in _COMPRESSOR_FLAG.items() if flags & f]
    return found[0] if len(found) == 1 else None


def digester_from_flags(flags: int) -> Digester | None:
    """Digester named by exactly one hash bit of ``flags``; None if zero or several."""
    found = [d for d, f in _DIGESTER_FLAG.items() if flags & f]
    return found[0] if len(found) == 1 else None


class BlobFeatures(enum.IntFlag):
    """``BlobFeatures`` of a blob table entry / blob-meta header (``storage/src/device.rs``)."""

    ALIGNED = 0x0000_0001
    INLINED_FS_META = 0x0000_0002
    CHUNK_INFO_V2 = 0x0000_0004
    ZRAN = 0x0000_0008
    SEPARATE = 0x0000_0010
    INLINED_CHUNK_DIGEST = 0x0000_0020
    TARFS = 0x0000_0040
    BATCH = 0x0000_0080
    ENCRYPTED = 0x0000_0100
    IS_CHUNKDICT_GENERATED = 0x0000_0200
    IS_SEPARATED_WITH_PREFETCH_FILES = 0x0000_0400
    EXTERNAL = 0x0000_0800
    HAS_TAR_HEADER = 0x1000_0000
    HAS_TOC = 0x2000_0000
    CAP_TAR_TOC = 0x4000_0000
    V5_NO_EXT_BLOB_TABLE = 0x8000_0000  # in-memory only; never valid on disk


#: Bits that no reader may accept on disk (upstream's incompatible-feature mask and the
#: in-memory-only v5 marker).
BLOB_FEATURES_INCOMPAT_MASK = 0x0000_F000 | 0x8000_0000
BLOB_FEATURES_KNOWN = 0x0000_0FFF | 0x7000_0000


class ChunkFlags(enum.IntFlag):
    """Flags of an 80-byte chunk info record (``BlobChunkFlags``)."""

    COMPRESSED = 0x1
    HOLECHUNK = 0x2
    ENCRYPTED = 0x4
    BATCH = 0x8
    HAS_CRC32 = 0x10


# ---------------------------------------------------------------------------
# Sizes and limits shared by v5 and v6

RAFS_DEFAULT_CHUNK_SIZE = 1 << 20
RAFS_MAX_CHUNK_SIZE = 16 << 20
RAFS_MAX_CHUNKS_PER_BLOB = 1 << 24
RAFS_MAX_NAME = 255
#: nydusd refuses symlink targets longer than this.
RAFS_MAX_SYMLINK = 4096
BLOB_ID_LEN = 64
BLOB_MAX_SIZE_UNCOMPRESSED = 1 << 44
BLOB_MAX_SIZE_COMPRESSED = 1 << 40
DIGEST_LEN = 32

# ---------------------------------------------------------------------------
# RAFS v6 / EROFS constants

EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC_V1 = 0xE0F5_E1E2
EROFS_SUPER_BLOCK_SIZE = 128
RAFS_V6_EXT_SUPER_OFFSET = EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK_SIZE  # 1152
RAFS_V6_EXT_SUPER_BLOCK_SIZE = 256
EROFS_DEVT_SLOT_SIZE = 128
#: ``s_devt_slotoff`` RAFS always writes: the device table starts right after the
#: ext superblock, at 11 * 128 = 1408.
RAFS_V6_DEVT_SLOTOFF = (
    RAFS_V6_EXT_SUPER_OFFSET + RAFS_V6_EXT_SUPER_BLOCK_SIZE
) // EROFS_DEVT_SLOT_SIZE
RAFS_V6_DEVTABLE_OFFSET = RAFS_V6_DEVT_SLOTOFF * EROFS_DEVT_SLOT_SIZE

EROFS_BLOCK_BITS_12 = 12
EROFS_BLOCK_BITS_9 = 9  # tarfs mode only
EROFS_BLOCK_SIZE_4096 = 4096
EROFS_BLOCK_SIZE_512 = 512

EROFS_FEATURE_COMPAT_SB_CHKSUM = 0x0000_0001
EROFS_FEATURE_COMPAT_RAFS_V6 = 0x4000_0000
EROFS_FEATURE_INCOMPAT_CHUNKED_FILE = 0x0000_0004
EROFS_FEATURE_INCOMPAT_DEVICE_TABLE = 0x0000_0008
#: A RAFS v6 image announces exactly these incompat features, nothing more.
RAFS_V6_FEATURE_INCOMPAT = EROFS_FEATURE_INCOMPAT_CHUNKED_FILE | EROFS_FEATURE_INCOMPAT_DEVICE_TABLE

EROFS_INODE_SLOT_BITS = 5
EROFS_INODE_SLOT_SIZE = 1 << EROFS_INODE_SLOT_BITS  # nid * 32 = inode offset in the meta area
EROFS_INODE_LAYOUT_COMPACT = 0
EROFS_INODE_LAYOUT_EXTENDED = 1
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_CHUNK_BASED = 4
#: i_format bits a RAFS inode may use: version bit 0 and data layout bits 1..3.
EROFS_I_FORMAT_MASK = 0x000F

EROFS_CHUNK_FORMAT_INDEXES = 0x0020
EROFS_CHUNK_FORMAT_BLKBITS_MASK = 0x001F
EROFS_CHUNK_INDEX_SIZE = 8

EROFS_DIRENT_SIZE = 12
EROFS_NAME_LEN = 255


class FileType(enum.IntEnum):
    """EROFS dirent ``e_file_type`` (the kernel's ``FT_*`` numbering, not ``DT_*``)."""

    UNKNOWN = 0
    REG = 1
    DIR = 2
    CHRDEV = 3
    BLKDEV = 4
    FIFO = 5
    SOCK = 6
    SYMLINK = 7


_S_IFMT = 0o170000
_MODE_TO_FTYPE = {
    0o100000: FileType.REG,
    0o040000: FileType.DIR,
    0o020000: FileType.CHRDEV,
    0o060000: FileType.BLKDEV,
    0o010000: FileType.FIFO,
    0o140000: FileType.SOCK,
    0o120000: FileType.SYMLINK,
}


def file_type_of_mode(mode: int) -> FileType:
    """Dirent file type for an ``st_mode`` value (UNKNOWN for an invalid type)."""
    return _MODE_TO_FTYPE.get(mode & _S_IFMT, FileType.UNKNOWN)


# xattr name indexes RAFS v6 can store (``RAFSV6_XATTR_TYPES``); 5 (lustre) is not used.
EROFS_XATTR_INDEX_USER = 1
EROFS_XATTR_INDEX_POSIX_ACL_ACCESS = 2
EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT = 3
EROFS_XATTR_INDEX_TRUSTED = 4
EROFS_XATTR_INDEX_SECURITY = 6
XATTR_PREFIXES: dict[int, bytes] = {
    EROFS_XATTR_INDEX_USER: b"user.",
    EROFS_XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    EROFS_XATTR_INDEX_TRUSTED: b"trusted.",
    EROFS_XATTR_INDEX_SECURITY: b"security.",
}
EROFS_XATTR_IBODY_HEADER_SIZE = 12
EROFS_XATTR_ENTRY_SIZE = 4

RAFS_V6_CHUNK_INFO_SIZE = 80  # same record as v5 (RafsV5ChunkInfo)
RAFS_V6_BLOB_ENTRY_SIZE = 256


def align_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of the power-of-two ``alignment``."""
    return (value + alignment - 1) & ~(alignment - 1)


# ---------------------------------------------------------------------------
# Struct machinery


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_FIELD_GETTERS: dict[type, Callable[[object], tuple[object, ...]]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _field_getter(cls: type) -> Callable[[object], tuple[object, ...]]:
    # One attrgetter call reads every field in C; pack() runs per inode and per chunk.
    names = _field_names(cls)
    if len(names) == 1:
        get1 = operator.attrgetter(names[0])
        getter: Callable[[object], tuple[object, ...]] = lambda v: (get1(v),)
    else:
        getter = operator.attrgetter(*names)
    _FIELD_GETTERS[cls] = getter
    return getter


class PackedStruct:
    """Base of every fixed-size structure: dataclass fields map 1:1, in order, onto the
    non-pad items of ``_FMT``; pad items (``x``) are the reserved areas."""

    __slots__ = ()
    _FMT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]

    def pack(self) -> bytes:
        """On-disk bytes of this value (exactly ``SIZE`` bytes, reserved areas zero)."""
        cls = type(self)
        get = _FIELD_GETTERS.get(cls) or _field_getter(cls)
        try:
            return self._FMT.pack(*get(self))
        except struct.error as err:
            raise ValueError(f"{cls.__name__}: cannot pack {self!r}: {err}") from err

    @classmethod
    def codec(cls) -> struct.Struct:
        """The precompiled struct behind ``pack``/``unpack``: its ``pack`` takes the
        fields positionally, in declaration order, without building a value first.
        For writers that encode one structure per inode or chunk; like ``pack``, it
        raises ``struct.error`` for a field out of range."""
        return cls._FMT

    @classmethod
    def unpack(cls, buf: ReadableBuffer, offset: int = 0) -> Self:
        """Decode one structure at ``offset``; FormatError if it does not fit in ``buf``."""
        need(len(buf), offset, cls.SIZE, cls.__name__)
        return cls(*cls._FMT.unpack_from(buf, offset))


def le_struct(spec: str, size: int) -> struct.Struct:
    """Little-endian, unaligned ``struct.Struct`` for ``spec``, asserted to be ``size`` bytes."""
    s = struct.Struct("<" + spec)
    assert s.size == size, (spec, s.size, size)
    return s


# ---------------------------------------------------------------------------
# RAFS v6 structures


@dataclass(frozen=True, slots=True)
class RafsV6SuperBlock(PackedStruct):
    """EROFS superblock, 128 B at file offset 1024 (spec §1.2)."""

    _FMT: ClassVar[struct.Struct] = le_struct("IIIBBHQQIII I16s16sIHHH38x", 128)
    SIZE: ClassVar[int] = 128

    magic: int = EROFS_SUPER_MAGIC_V1
    checksum: int = 0
    feature_compat: int = EROFS_FEATURE_COMPAT_RAFS_V6
    blkszbits: int = EROFS_BLOCK_BITS_12
    extslots: int = 0
    root_nid: int = 0
    inos: int = 0
    build_time: int = 0
    build_time_nsec: int = 0
    blocks: int = 0
    meta_blkaddr: int = 0
    xattr_blkaddr: int = 0
    uuid: bytes = bytes(16)
    volume_name: bytes = bytes(16)
    feature_incompat: int = RAFS_V6_FEATURE_INCOMPAT
    u: int = 0
    extra_devices: int = 0
    devt_slotoff: int = RAFS_V6_DEVT_SLOTOFF

    @property
    def block_size(self) -> int:
        return 1 << self.blkszbits if self.blkszbits < 32 else 0


@dataclass(frozen=True, slots=True)
class RafsV6SuperBlockExt(PackedStruct):
    """RAFS extended superblock, 256 B at file offset 1152 (spec §1.3)."""

    _FMT: ClassVar[struct.Struct] = le_struct("QQIIQQQII200x", 256)
    SIZE: ClassVar[int] = 256

    flags: int = 0
    blob_table_offset: int = 0
    blob_table_size: int = 0
    chunk_size: int = RAFS_DEFAULT_CHUNK_SIZE
    chunk_table_offset: int = 0
    chunk_table_size: int = 0
    prefetch_table_offset: int = 0
    prefetch_table_size: int = 0
    padding: int = 0


@dataclass(frozen=True, slots=True)
class RafsV6Device(PackedStruct):
    """Device slot (EROFS ``erofs_deviceslot``), 128 B each from offset 1408 (spec §1.4)."""

    _FMT: ClassVar[struct.Struct] = le_struct("64sII56x", 128)
    SIZE: ClassVar[int] = 128

    blob_id: bytes = bytes(64)
    blocks: int = 0
    mapped_blkaddr: int = 0


@dataclass(frozen=True, slots=True)
class RafsV6Blob(PackedStruct):
    """Blob table entry, 256 B (spec §1.5)."""

    _FMT: ClassVar[struct.Struct] = le_struct("64sIIIIIIQQIIQQQ32s32sQ8sI36x", 256)
    SIZE: ClassVar[int] = 256

    blob_id: bytes = bytes(64)
    blob_index: int = 0
    chunk_size: int = RAFS_DEFAULT_CHUNK_SIZE
    chunk_count: int = 0
    compression_algo: int = Compressor.ZSTD
    digest_algo: int = Digester.BLAKE3
    features: int = 0
    compressed_size: int = 0
    uncompressed_size: int = 0
    blob_toc_size: int = 0
    ci_compressor: int = Compressor.NONE
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_digest: bytes = bytes(32)
    blob_meta_digest: bytes = bytes(32)
    blob_meta_size: int = 0
    cipher_iv: bytes = bytes(8)
    cipher_algo: int = CipherAlgo.NONE


@dataclass(frozen=True, slots=True)
class RafsV6InodeCompact(PackedStruct):
    """Compact (32 B) EROFS inode (spec §1.8).  RAFS writers should emit extended inodes."""

    _FMT: ClassVar[struct.Struct] = le_struct("HHHHIIIIHH4x", 32)
    SIZE: ClassVar[int] = 32

    format: int = EROFS_INODE_LAYOUT_COMPACT
    xattr_icount: int = 0
    mode: int = 0
    nlink: int = 0
    size: int = 0
    reserved: int = 0
    u: int = 0
    ino: int = 0
    uid: int = 0
    gid: int = 0

    # A compact inode has no timestamp; nydusd/kernel report 0 (or their own start time).
    mtime: ClassVar[int] = 0
    mtime_nsec: ClassVar[int] = 0


@dataclass(frozen=True, slots=True)
class RafsV6InodeExtended(PackedStruct):
    """Extended (64 B) EROFS inode (spec §1.8)."""

    _FMT: ClassVar[struct.Struct] = le_struct("HHH2xQIIIIQII16x", 64)
    SIZE: ClassVar[int] = 64

    format: int = EROFS_INODE_LAYOUT_EXTENDED
    xattr_icount: int = 0
    mode: int = 0
    size: int = 0
    u: int = 0
    ino: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    nlink: int = 0


RafsV6Inode = RafsV6InodeCompact | RafsV6InodeExtended


def inode_format(extended: bool, datalayout: int) -> int:
    """``i_format`` value for the given inode version and data layout."""
    return (EROFS_INODE_LAYOUT_EXTENDED if extended else EROFS_INODE_LAYOUT_COMPACT) | (
        datalayout << 1
    )


def unpack_v6_inode(buf: ReadableBuffer, offset: int) -> RafsV6Inode:
    """Decode the compact or extended inode at ``offset``, chosen by bit 0 of ``i_format``.

    Raises FormatError if ``i_format`` has bits RAFS never uses (compressed layouts
    1/3, layouts > 4, or anything above bit 3) or the inode does not fit.
    """
    need(len(buf), offset, 2, "inode i_format")
    (fmt,) = struct.unpack_from("<H", buf, offset)
    layout = (fmt >> 1) & 0x7
    if fmt & ~EROFS_I_FORMAT_MASK or layout not in (
        EROFS_INODE_FLAT_PLAIN,
        EROFS_INODE_FLAT_INLINE,
        EROFS_INODE_CHUNK_BASED,
    ):
        raise format_error("inode i_format", offset, f"unsupported value 0x{fmt:x}")
    if fmt & 1:
        return RafsV6InodeExtended.unpack(buf, offset)
    return RafsV6InodeCompact.unpack(buf, offset)


def inode_datalayout(inode: RafsV6Inode) -> int:
    """Data layout (FLAT_PLAIN / FLAT_INLINE / CHUNK_BASED) of a v6 inode."""
    return (inode.format >> 1) & 0x7


def xattr_ibody_size(xattr_icount: int) -> int:
    """Bytes of inline xattr area following the inode (0 when ``icount`` is 0)."""
    if xattr_icount == 0:
        return 0
    return EROFS_XATTR_IBODY_HEADER_SIZE + 4 * (xattr_icount - 1)


def xattr_icount_for(size: int) -> int:
    """``i_xattr_icount`` for an xattr area of ``size`` bytes (header included, 4-aligned)."""
    if size == 0:
        return 0
    assert size >= EROFS_XATTR_IBODY_HEADER_SIZE and size % 4 == 0
    return (size - EROFS_XATTR_IBODY_HEADER_SIZE) // 4 + 1


def chunk_format(chunk_bits: int, blkszbits: int = EROFS_BLOCK_BITS_12) -> int:
    """``i_u`` of a chunk-based regular file: INDEXES flag plus log2(chunk)/block."""
    assert chunk_bits >= blkszbits and chunk_bits - blkszbits <= EROFS_CHUNK_FORMAT_BLKBITS_MASK
    return EROFS_CHUNK_FORMAT_INDEXES | (chunk_bits - blkszbits)


@dataclass(frozen=True, slots=True)
class RafsV6Dirent(PackedStruct):
    """12-byte EROFS dirent; names follow all dirents of a block, unterminated (spec §1.9)."""

    _FMT: ClassVar[struct.Struct] = le_struct("QHBx", 12)
    SIZE: ClassVar[int] = 12

    nid: int = 0
    nameoff: int = 0
    file_type: int = FileType.UNKNOWN


@dataclass(frozen=True, slots=True)
class XattrIbodyHeader(PackedStruct):
    """12-byte header of an inline xattr area (spec §1.10); RAFS never shares xattrs."""

    _FMT: ClassVar[struct.Struct] = le_struct("IB7x", 12)
    SIZE: ClassVar[int] = 12

    name_filter: int = 0
    shared_count: int = 0


@dataclass(frozen=True, slots=True)
class XattrEntry(PackedStruct):
    """4-byte xattr entry header, followed by name suffix and value, padded to 4."""

    _FMT: ClassVar[struct.Struct] = le_struct("BBH", 4)
    SIZE: ClassVar[int] = 4

    name_len: int = 0
    name_index: int = 0
    value_size: int = 0


def split_xattr_name(name: bytes) -> tuple[int, bytes]:
    """(name_index, suffix) for a full xattr name; ValueError for an unstorable prefix.

    The two POSIX ACL names are stored with an empty suffix, as upstream does.
    """
    for index in (EROFS_XATTR_INDEX_POSIX_ACL_ACCESS, EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT):
        if name == XATTR_PREFIXES[index]:
            return index, b""
    for index in (EROFS_XATTR_INDEX_USER, EROFS_XATTR_INDEX_TRUSTED, EROFS_XATTR_INDEX_SECURITY):
        prefix = XATTR_PREFIXES[index]
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix) :]
    raise ValueError(f"xattr name {name!r} has no prefix RAFS v6 can store")


def pack_v6_xattrs(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Inline xattr area (header + entries, each padded to 4) for ``pairs``; b"" if none.

    Its length is ``xattr_ibody_size(xattr_icount_for(len(result)))``.
    """
    body = bytearray()
    for name, value in pairs:
        index, suffix = split_xattr_name(name)
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise ValueError(f"xattr {name!r} too long for RAFS v6")
        body += XattrEntry(len(suffix), index, len(value)).pack() + suffix + value
        body += bytes(-len(body) % 4)
    if not body:
        return b""
    return XattrIbodyHeader().pack() + bytes(body)


@dataclass(frozen=True, slots=True)
class RafsV6InodeChunkAddr(PackedStruct):
    """8-byte chunk index entry of a chunk-based file (spec §1.11).

    ``blob_addr_hi`` low byte = blob index + 1 (EROFS device id), high byte =
    bits 16..23 of the chunk's index in the blob chunk-info array; ``blob_addr_lo``
    = bits 0..15 of that index; ``blk_addr`` = uncompressed offset / block size.
    """

    _FMT: ClassVar[struct.Struct] = le_struct("HHI", 8)
    SIZE: ClassVar[int] = 8

    blob_addr_lo: int = 0
    blob_addr_hi: int = 0
    blk_addr: int = 0

    @classmethod
    def of(cls, blob_index: int, ci_index: int, blkaddr: int) -> RafsV6InodeChunkAddr:
        """Encode (blob index, chunk-info index, block address)."""
        if not 0 <= blob_index < 255:
            raise ValueError(f"blob index {blob_index} out of range 0..254")
        if not 0 <= ci_index < RAFS_MAX_CHUNKS_PER_BLOB:
            raise ValueError(f"chunk index {ci_index} out of range")
        return cls(ci_index & 0xFFFF, ((ci_index >> 16) << 8) | (blob_index + 1), blkaddr)

    @property
    def device_id(self) -> int:
        """EROFS device id (0 is invalid in RAFS)."""
        return self.blob_addr_hi & 0xFF

    @property
    def blob_index(self) -> int:
        """Blob index; -1 when the device id is 0 (invalid)."""
        return (self.blob_addr_hi & 0xFF) - 1

    @property
    def ci_index(self) -> int:
        return ((self.blob_addr_hi >> 8) << 16) | self.blob_addr_lo


@dataclass(frozen=True, slots=True)
class RafsChunkInfo(PackedStruct):
    """80-byte chunk record of the bootstrap chunk table (v6, spec §1.12) and v5 inodes.

    Upstream name ``RafsV5ChunkInfo``.  ``digest`` is of the uncompressed data;
    ``index`` is the chunk's position in its blob's chunk-info array.
    """

    _FMT: ClassVar[struct.Struct] = le_struct("32sIIIIQQQII", 80)
    SIZE: ClassVar[int] = 80

    digest: bytes = bytes(32)
    blob_index: int = 0
    flags: int = 0
    compressed_size: int = 0
    uncompressed_size: int = 0
    compressed_offset: int = 0
    uncompressed_offset: int = 0
    file_offset: int = 0
    index: int = 0
    crc32: int = 0

    @property
    def is_compressed(self) -> bool:
        return bool(self.flags & ChunkFlags.COMPRESSED)


RafsV5ChunkInfo = RafsChunkInfo

_U32 = struct.Struct("<I")


def pack_u32_array(values: Sequence[int]) -> bytes:
    """Little-endian u32 array (prefetch tables, v5 inode table)."""
    return struct.pack(f"<{len(values)}I", *values)


def unpack_u32_array(buf: ReadableBuffer, offset: int, count: int, what: str) -> tuple[int, ...]:
    """Decode ``count`` u32 at ``offset``; FormatError if that runs past ``buf``."""
    need(len(buf), offset, 4 * count, what)
    return struct.unpack_from(f"<{count}I", buf, offset)


def pack_dir_blocks(entries: Sequence[tuple[bytes, int, int]], block_size: int) -> list[bytes]:
    """Encode a directory's dirent blocks (spec §1.9).

    ``entries`` = (name, nid, file_type) including ``.`` and ``..``, already sorted
    by raw name bytes.  Returns the blocks in order; every block but the last is
    exactly ``block_size`` bytes (zero padded), the last one holds only its used
    bytes, so the directory's ``i_size = (n - 1) * block_size + len(last)``.
    An entry (12 B + name) never straddles a block.
    """
    blocks: list[bytes] = []
    cur: list[tuple[bytes, int, int]] = []
    used = 0
    for name, nid, ftype in entries:
        if not 0 < len(name) <= EROFS_NAME_LEN or b"\0" in name:
            raise ValueError(f"dirent name {name!r} is empty, too long or contains NUL")
        size = EROFS_DIRENT_SIZE + len(name)
        if used + size > block_size:
            blocks.append(_pack_one_dir_block(cur).ljust(block_size, b"\0"))
            cur, used = [], 0
        cur.append((name, nid, ftype))
        used += size
    if cur:
        blocks.append(_pack_one_dir_block(cur))
    return blocks


def _pack_one_dir_block(entries: list[tuple[bytes, int, int]]) -> bytes:
    names_off = EROFS_DIRENT_SIZE * len(entries)
    heads = bytearray()
    names = bytearray()
    for name, nid, ftype in entries:
        heads += RafsV6Dirent(nid, names_off + len(names), ftype).pack()
        names += name
    return bytes(heads + names)


def encode_rdev(major: int, minor: int) -> int:
    """Linux ``new_encode_dev``: the 32-bit device number EROFS stores in ``i_u``."""
    return (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)


def decode_rdev(rdev: int) -> tuple[int, int]:
    """(major, minor) of a device number in ``i_u`` form; inverse of :func:`encode_rdev`."""
    return (rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
