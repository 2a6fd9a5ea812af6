"""Struct definitions: sizes, round trips, bounds checks, bit packing (layout.py, blobmeta.py)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynydus.errors import FormatError
from pynydus.rafs.format import blobmeta as M
from pynydus.rafs.format import compress
from pynydus.rafs.format import layout as L
from pynydus.rafs.format import layout_v5 as L5
from pynydus.rafs.read import BlobInfo

FIXED = [
    (L.RafsV6SuperBlock, 128),
    (L.RafsV6SuperBlockExt, 256),
    (L.RafsV6Device, 128),
    (L.RafsV6Blob, 256),
    (L.RafsV6InodeCompact, 32),
    (L.RafsV6InodeExtended, 64),
    (L.RafsV6Dirent, 12),
    (L.XattrIbodyHeader, 12),
    (L.XattrEntry, 4),
    (L.RafsV6InodeChunkAddr, 8),
    (L.RafsChunkInfo, 80),
    (L5.RafsV5SuperBlock, 8192),
    (L5.RafsV5Inode, 128),
    (L5.RafsV5ExtBlobEntry, 64),
    (M.BlobCompressionContextHeader, 4096),
    (M.TocEntry, 128),
    (M.ZranContext, 40),
    (M.BatchContext, 40),
]


@pytest.mark.parametrize("cls,size", FIXED, ids=[c.__name__ for c, _ in FIXED])
def test_struct_sizes_and_default_round_trip(cls: type[L.PackedStruct], size: int) -> None:
    assert cls.SIZE == size
    value = cls()  # type: ignore[call-arg]
    raw = value.pack()
    assert len(raw) == size
    assert cls.unpack(raw) == value
    assert cls.unpack(b"\xaa" * 3 + raw, 3) == value


@pytest.mark.parametrize("cls,size", FIXED, ids=[c.__name__ for c, _ in FIXED])
def test_unpack_past_the_end_is_a_format_error_naming_struct_and_offset(
    cls: type[L.PackedStruct], size: int
) -> None:
    with pytest.raises(FormatError, match=rf"{cls.__name__} at offset 5 "):
        cls.unpack(bytes(size + 4), 5)
    with pytest.raises(FormatError):
        cls.unpack(bytes(size), -1)


def test_every_field_round_trips_with_distinct_values() -> None:
    for cls, _ in FIXED:
        kwargs = {}
        for i, f in enumerate(dataclasses.fields(cls)):
            default = f.default
            kwargs[f.name] = (
                bytes([i + 1]) * len(default) if isinstance(default, bytes) else (i + 1)
            )
        value = cls(**kwargs)  # type: ignore[arg-type]
        assert cls.unpack(value.pack()) == value, cls.__name__


def test_v6_superblock_defaults_are_what_rafs_requires() -> None:
    sb = L.RafsV6SuperBlock()
    raw = sb.pack()
    assert raw[:4] == bytes.fromhex("e2e1f5e0")
    assert (sb.feature_incompat, sb.devt_slotoff, sb.block_size) == (0xC, 11, 4096)
    assert L.RAFS_V6_DEVTABLE_OFFSET == 1408 and L.RAFS_V6_EXT_SUPER_OFFSET == 1152


def test_inode_format_and_unpack_dispatch() -> None:
    ext = L.RafsV6InodeExtended(
        format=L.inode_format(True, L.EROFS_INODE_CHUNK_BASED), mode=0o100644, size=5
    )
    comp = L.RafsV6InodeCompact(
        format=L.inode_format(False, L.EROFS_INODE_FLAT_INLINE), mode=0o40755, size=7
    )
    assert ext.format == 9 and comp.format == 4
    assert L.unpack_v6_inode(ext.pack(), 0) == ext
    assert L.unpack_v6_inode(comp.pack() + bytes(32), 0) == comp
    assert L.inode_datalayout(ext) == L.EROFS_INODE_CHUNK_BASED
    for bad in (0x3, 0x6, 0xB, 0x10, 0x8001):
        with pytest.raises(FormatError, match="i_format at offset 0"):
            L.unpack_v6_inode(bad.to_bytes(2, "little") + bytes(62), 0)


def test_chunk_address_packs_blob_and_24_bit_index() -> None:
    a = L.RafsV6InodeChunkAddr.of(blob_index=3, ci_index=0x12_3456, blkaddr=77)
    assert (a.blob_addr_lo, a.blob_addr_hi, a.blk_addr) == (0x3456, 0x1204, 77)
    assert (a.blob_index, a.ci_index, a.device_id) == (3, 0x12_3456, 4)
    assert L.RafsV6InodeChunkAddr.unpack(a.pack()) == a
    with pytest.raises(ValueError):
        L.RafsV6InodeChunkAddr.of(255, 0, 0)
    with pytest.raises(ValueError):
        L.RafsV6InodeChunkAddr.of(0, 1 << 24, 0)
    assert L.chunk_format(20) == 0x28


def test_flag_helpers() -> None:
    assert L.compressor_from_flags(0x194) == L.Compressor.ZSTD
    assert L.digester_from_flags(0x194) == L.Digester.BLAKE3
    assert L.compressor_from_flags(0x3) is None and L.compressor_from_flags(0x10) is None
    assert L.digester_from_flags(0xC) is None
    assert (
        L.compressor_flag(L.Compressor.LZ4_BLOCK) == 0x2
        and L.digester_flag(L.Digester.SHA256) == 0x8
    )
    assert L.SUPER_FLAGS_KNOWN & 0x0300_03FF == 0x0300_03FF and not L.SUPER_FLAGS_KNOWN & 0x400
    assert L.file_type_of_mode(0o120777) == L.FileType.SYMLINK
    assert L.file_type_of_mode(0o170000) == L.FileType.UNKNOWN


def test_xattr_names_split_into_index_and_suffix() -> None:
    assert L.split_xattr_name(b"user.a") == (1, b"a")
    assert L.split_xattr_name(b"system.posix_acl_access") == (2, b"")
    assert L.split_xattr_name(b"system.posix_acl_default") == (3, b"")
    assert L.split_xattr_name(b"trusted.overlay.opaque") == (4, b"overlay.opaque")
    assert L.split_xattr_name(b"security.capability") == (6, b"capability")
    for bad in (b"system.other", b"user.", b"foo.bar"):
        with pytest.raises(ValueError):
            L.split_xattr_name(bad)
    area = L.pack_v6_xattrs([(b"user.a", b"xyz"), (b"trusted.b", b"")])
    assert len(area) == L.xattr_ibody_size(L.xattr_icount_for(len(area)))
    assert L.pack_v6_xattrs([]) == b"" and L.xattr_icount_for(0) == 0


def test_dir_blocks_never_split_an_entry_and_trim_the_last_block() -> None:
    names = sorted([b".", b".."] + [b"n%03d" % i + b"x" * 200 for i in range(40)])
    blocks = L.pack_dir_blocks([(n, i, 1) for i, n in enumerate(names)], 4096)
    assert len(blocks) > 1 and all(len(b) == 4096 for b in blocks[:-1]) and len(blocks[-1]) < 4096
    decoded = []
    for blk in blocks:
        first = L.RafsV6Dirent.unpack(blk, 0)
        count = first.nameoff // 12
        offs = [L.RafsV6Dirent.unpack(blk, 12 * j).nameoff for j in range(count)]
        for j, start in enumerate(offs):
            end = (
                offs[j + 1]
                if j + 1 < count
                else (blk.find(b"\0", start) if b"\0" in blk[start:] else len(blk))
            )
            decoded.append(blk[start:end])
    assert decoded == names
    with pytest.raises(ValueError):
        L.pack_dir_blocks([(b"a\0b", 1, 1)], 4096)


def test_v5_blob_table_and_xattrs_round_trip() -> None:
    entries = [L5.RafsV5BlobEntry(0, 0, b"a" * 64), L5.RafsV5BlobEntry(5, 6, b"b" * 64)]
    raw = L5.pack_v5_blob_table(entries)
    assert len(raw) % 8 == 0
    assert L5.unpack_v5_blob_table(raw, 0, len(raw)) == entries
    pairs = [(b"user.x", b"1"), (b"security.selinux", b"\0\1")]
    raw = L5.pack_v5_xattrs(pairs)
    assert L5.unpack_v5_xattrs(raw, 0) == (pairs, len(raw))
    with pytest.raises(FormatError, match="v5 xattr"):
        L5.unpack_v5_xattrs(b"\xff" + bytes(7), 0)


# -- blob side ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    c_off=st.integers(0, (1 << 40) - 1),
    c_size=st.integers(1, 1 << 24),
    u_blk=st.integers(0, (1 << 32) - 1),
    u_size=st.integers(1, 1 << 24),
)
def test_chunk_info_v1_round_trips(c_off: int, c_size: int, u_blk: int, u_size: int) -> None:
    ci = M.BlobChunkInfo(
        c_off,
        c_size,
        u_blk << 12,
        u_size,
        int(M.ChunkInfoFlags.COMPRESSED) if c_size != u_size else 0,
    )
    raw = M.pack_chunk_info_v1(ci)
    assert len(raw) == 16 and M.unpack_chunk_info_v1(raw, 0) == ci


@settings(max_examples=300, deadline=None)
@given(
    c_off=st.integers(0, (1 << 40) - 1),
    c_size=st.integers(0, (1 << 24) - 1),
    u_blk=st.integers(0, (1 << 32) - 1),
    u_size=st.integers(1, 1 << 24),
    flags=st.integers(0, 0x1F),
    data=st.integers(0, (1 << 64) - 1),
)
def test_chunk_info_v2_round_trips(
    c_off: int, c_size: int, u_blk: int, u_size: int, flags: int, data: int
) -> None:
    ci = M.BlobChunkInfo(c_off, c_size, u_blk << 12, u_size, flags, data)
    raw = M.pack_chunk_info_v2(ci)
    assert len(raw) == 24 and M.unpack_chunk_info_v2(raw, 0) == ci


def test_chunk_info_v2_rejects_unknown_flags_on_read() -> None:
    raw = bytearray(M.pack_chunk_info_v2(M.BlobChunkInfo(0, 1, 0, 1)))
    raw[7] = 0x20
    with pytest.raises(FormatError, match="flags at offset 0"):
        M.unpack_chunk_info_v2(bytes(raw), 0)


def test_chunk_info_array_is_bounded_by_its_buffer() -> None:
    arr = M.ChunkInfoArray(bytes(32), 2, v2=False)
    assert len(arr) == 2 and arr[1] == M.BlobChunkInfo(0, 1, 0, 1, 0)
    with pytest.raises(IndexError):
        arr[2]
    with pytest.raises(FormatError):
        M.ChunkInfoArray(bytes(32), 3, v2=False)
    assert M.expected_ci_uncompressed_size(10, int(L.BlobFeatures.ALIGNED)) == 160
    assert M.expected_ci_uncompressed_size(10, int(L.BlobFeatures.CHUNK_INFO_V2)) == 240
    assert (
        M.expected_ci_uncompressed_size(
            10, int(L.BlobFeatures.CHUNK_INFO_V2 | L.BlobFeatures.BATCH)
        )
        is None
    )


# The 512-byte trailer of upstream's test blob be7d77…fef (nydus tests/texture/blobs),
# as written by Rust tar::Header::new_gnu: only these bytes are non-zero.
UPSTREAM_TOC_HEADER_NONZERO = {
    0: b"rafs.blob.toc",
    124: b"00000001000",
    136: b"00000000000",
    148: b"0006255",
    156: b"0",
    257: b"ustar ",
    263: b" ",
}


def test_section_header_matches_upstream_bytes() -> None:
    want = bytearray(512)
    for off, raw in UPSTREAM_TOC_HEADER_NONZERO.items():
        want[off : off + len(raw)] = raw
    got = M.pack_section_header(M.TOC_ENTRY_BLOB_TOC, 512)
    assert got == bytes(want)
    assert M.unpack_section_header(got, 0) == (M.TOC_ENTRY_BLOB_TOC, 512)
    bad = bytearray(got)
    bad[0] ^= 1
    with pytest.raises(FormatError, match="checksum at offset 148"):
        M.unpack_section_header(bytes(bad), 0)


def test_toc_round_trip_from_a_blob_tail() -> None:
    entries = [
        M.TocEntry(
            int(M.TocFlags.COMPRESSION_NONE),
            name.encode().ljust(16, b"\0"),
            hashlib.sha256(name.encode()).digest(),
            i * 100,
            100,
            100,
        )
        for i, name in enumerate(
            [
                M.TOC_ENTRY_BLOB_RAW,
                M.TOC_ENTRY_BLOB_META,
                M.TOC_ENTRY_BLOB_META_HEADER,
                M.TOC_ENTRY_BLOB_DIGEST,
            ]
        )
    ]
    body = b"".join(e.pack() for e in entries)
    tail = b"junk" * 100 + body + M.pack_section_header(M.TOC_ENTRY_BLOB_TOC, len(body))
    got = M.unpack_toc(tail)
    assert got == entries and got[2].entry_name == "blob.meta.header"
    with pytest.raises(FormatError):
        M.unpack_toc(tail[:-1])
    with pytest.raises(FormatError, match="name"):
        M.unpack_toc(body + M.pack_section_header("image.boot", len(body)))


def test_blob_meta_header_defaults() -> None:
    h = M.BlobCompressionContextHeader(ci_entries=2)
    raw = h.pack()
    assert raw[:4] == raw[-4:] == (0xB10BB10B).to_bytes(4, "little")


def _blob_with_meta(compressor: L.Compressor) -> tuple[bytes, BlobInfo]:
    entries = [
        M.BlobChunkInfo(0, 100, 0, 5000, int(M.ChunkInfoFlags.COMPRESSED)),
        M.BlobChunkInfo(100, 4096, 8192, 4096, 0),
    ]
    ci = M.pack_chunk_info_array(entries, v2=False)
    packed, was_compressed = compress(ci, compressor)
    ci_comp = compressor if was_compressed else L.Compressor.NONE
    blob = BlobInfo(
        0,
        "b" * 64,
        L.Compressor.ZSTD,
        L.Digester.BLAKE3,
        1 << 20,
        2,
        4196,
        12288,
        features=int(L.BlobFeatures.ALIGNED),
        ci_compressor=ci_comp,
        ci_offset=4196,
        ci_compressed_size=len(packed),
        ci_uncompressed_size=len(ci),
    )
    header = M.BlobCompressionContextHeader(
        features=blob.features,
        ci_compressor=ci_comp,
        ci_entries=2,
        ci_offset=4196,
        ci_compressed_size=len(packed),
        ci_uncompressed_size=len(ci),
    )
    return packed + header.pack(), blob


@pytest.mark.parametrize(
    "compressor", [L.Compressor.NONE, L.Compressor.ZSTD, L.Compressor.LZ4_BLOCK]
)
def test_blob_meta_parses_validates_and_caches(compressor: L.Compressor) -> None:
    raw, blob = _blob_with_meta(compressor)
    meta = M.parse_blob_meta(raw, blob)
    assert meta.chunk(0) == M.BlobChunkInfo(0, 100, 0, 5000, int(M.ChunkInfoFlags.COMPRESSED))
    assert meta.chunk(1).uncompressed_offset == 8192 and meta.contexts() == []
    with pytest.raises(IndexError):
        meta.chunk(2)
    cached = M.pack_cached_blob_meta(meta.header, meta.data)
    assert len(cached) == 4096 + 4096
    assert M.parse_cached_blob_meta(cached, blob).chunk(1) == meta.chunk(1)
    with pytest.raises(FormatError, match="ci_entries"):
        M.parse_blob_meta(raw, dataclasses.replace(blob, chunk_count=3))
    with pytest.raises(FormatError, match="chunk info 1"):
        M.parse_blob_meta(raw, dataclasses.replace(blob, uncompressed_size=8192)).chunk(1)
    with pytest.raises(FormatError):
        M.parse_blob_meta(raw[:-1], blob)
    with pytest.raises(FormatError):
        M.parse_cached_blob_meta(cached + b"\0", blob)


def test_blob_meta_with_corrupt_compressed_array_is_a_format_error() -> None:
    entries = [M.BlobChunkInfo(i * 4096, 4096, i * 4096, 4096, 0) for i in range(200)]
    ci = M.pack_chunk_info_array(entries, v2=False)
    packed, was_compressed = compress(ci, L.Compressor.ZSTD)
    assert was_compressed
    blob = BlobInfo(
        0,
        "c" * 64,
        L.Compressor.ZSTD,
        L.Digester.BLAKE3,
        1 << 20,
        200,
        200 * 4096,
        200 * 4096,
        features=int(L.BlobFeatures.ALIGNED),
        ci_compressor=L.Compressor.ZSTD,
        ci_offset=200 * 4096,
        ci_compressed_size=len(packed),
        ci_uncompressed_size=len(ci),
    )
    header = M.BlobCompressionContextHeader(
        features=blob.features,
        ci_compressor=L.Compressor.ZSTD,
        ci_entries=200,
        ci_offset=blob.ci_offset,
        ci_compressed_size=len(packed),
        ci_uncompressed_size=len(ci),
    )
    assert (
        M.parse_blob_meta(packed + header.pack(), blob).chunk(199).compressed_offset == 199 * 4096
    )
    with pytest.raises(FormatError, match="chunk-info array at offset 0"):
        M.parse_blob_meta(b"\xff" * len(packed) + header.pack(), blob)


def test_section_header_sizes_beyond_8_gib_use_gnu_base_256() -> None:
    big = 9 << 30
    h = M.pack_section_header(M.TOC_ENTRY_BLOB_RAW, big)
    assert h[124] == 0x80
    assert M.unpack_section_header(h, 0) == (M.TOC_ENTRY_BLOB_RAW, big)
