"""RAFS v6 headers: EROFS superblock, RAFS ext superblock, device slots, blob and
prefetch tables, checked the way nydusd checks them before it mounts an image.

Everything here runs once when a bootstrap is opened and costs O(blobs + prefetch
entries); the tree itself is decoded lazily by :mod:`pynydus.rafs.read.v6`.
"""

from __future__ import annotations

from pynydus.rafs.format import BlobFeatures, Compressor, Digester, SuperFlags
from pynydus.rafs.format.layout import (
    BLOB_FEATURES_INCOMPAT_MASK,
    BLOB_ID_LEN,
    BLOB_MAX_SIZE_COMPRESSED,
    BLOB_MAX_SIZE_UNCOMPRESSED,
    EROFS_BLOCK_BITS_9,
    EROFS_BLOCK_BITS_12,
    EROFS_BLOCK_SIZE_4096,
    EROFS_DEVT_SLOT_SIZE,
    EROFS_FEATURE_COMPAT_RAFS_V6,
    EROFS_INODE_SLOT_SIZE,
    EROFS_SUPER_OFFSET,
    RAFS_MAX_CHUNK_SIZE,
    RAFS_MAX_CHUNKS_PER_BLOB,
    RAFS_V6_BLOB_ENTRY_SIZE,
    RAFS_V6_CHUNK_INFO_SIZE,
    RAFS_V6_DEVT_SLOTOFF,
    RAFS_V6_DEVTABLE_OFFSET,
    RAFS_V6_EXT_SUPER_OFFSET,
    RAFS_V6_FEATURE_INCOMPAT,
    SUPER_FLAGS_KNOWN,
    CipherAlgo,
    RafsV6Blob,
    RafsV6Device,
    RafsV6SuperBlock,
    RafsV6SuperBlockExt,
    ReadableBuffer,
    compressor_from_flags,
    digester_from_flags,
    format_error,
    unpack_u32_array,
)
from pynydus.rafs.read.bootstrap import BlobInfo


def check_superblock(sb: RafsV6SuperBlock, n: int) -> None:
    """The superblock checks of nydusd (``RafsV6SuperBlock::validate``) and spec §9.5."""
    base = EROFS_SUPER_OFFSET
    if sb.checksum != 0:
        raise format_error("superblock s_checksum", base + 4, f"0x{sb.checksum:x}, RAFS writes 0")
    if not sb.feature_compat & EROFS_FEATURE_COMPAT_RAFS_V6:
        raise format_error(
            "superblock s_feature_compat",
            base + 8,
            f"0x{sb.feature_compat:x} lacks the RAFS v6 bit",
        )
    if sb.blkszbits not in (EROFS_BLOCK_BITS_12, EROFS_BLOCK_BITS_9):
        raise format_error("superblock s_blkszbits", base + 12, f"{sb.blkszbits}, expected 12 or 9")
    bs = 1 << sb.blkszbits
    if n % bs:
        raise format_error("bootstrap size", 0, f"{n} is not a multiple of the block size {bs}")
    if sb.extslots != 0:
        raise format_error("superblock s_extslots", base + 13, f"{sb.extslots}, expected 0")
    if sb.inos == 0:
        raise format_error("superblock s_inos", base + 16, "0 inodes")
    if sb.xattr_blkaddr != 0:
        raise format_error(
            "superblock s_xattr_blkaddr", base + 44, "shared xattrs are not used by RAFS"
        )
    if sb.feature_incompat != RAFS_V6_FEATURE_INCOMPAT:
        raise format_error(
            "superblock s_feature_incompat",
            base + 80,
            f"0x{sb.feature_incompat:x}, expected 0xc",
        )
    if sb.u != 0:
        raise format_error("superblock s_u", base + 84, f"{sb.u}, expected 0")
    if sb.devt_slotoff != RAFS_V6_DEVT_SLOTOFF:
        raise format_error(
            "superblock s_devt_slotoff", base + 88, f"{sb.devt_slotoff}, expected 11"
        )
    if sb.extra_devices == 0 and sb.blocks not in (0, 4096):
        raise format_error("superblock s_blocks", base + 36, f"{sb.blocks} with no extra devices")
    if sb.meta_blkaddr * bs > n:
        raise format_error(
            "superblock s_meta_blkaddr",
            base + 40,
            f"block {sb.meta_blkaddr} is beyond the {n}-byte file",
        )


def check_ext(ext: RafsV6SuperBlockExt, n: int, devslot_end: int, ndev: int) -> None:
    """The extended-superblock checks (``RafsV6SuperBlockExt::validate``): flags, chunk
    size, and blob/chunk/prefetch tables inside the file, aligned, not overlapping."""
    base = RAFS_V6_EXT_SUPER_OFFSET
    if ext.flags & ~SUPER_FLAGS_KNOWN:
        raise format_error("ext superblock s_flags", base, f"unknown bits in 0x{ext.flags:x}")
    if compressor_from_flags(ext.flags) is None:
        raise format_error(
            "ext superblock s_flags", base, f"0x{ext.flags:x}: not exactly one compressor"
        )
    if digester_from_flags(ext.flags) is None:
        raise format_error(
            "ext superblock s_flags", base, f"0x{ext.flags:x}: not exactly one digester"
        )
    cs = ext.chunk_size
    if cs & (cs - 1) or not EROFS_BLOCK_SIZE_4096 <= cs <= RAFS_MAX_CHUNK_SIZE:
        raise format_error(
            "ext superblock s_chunk_size",
            base + 20,
            f"{cs} is not a power of two in 4 KiB..16 MiB",
        )
    bo, bsz = ext.blob_table_offset, ext.blob_table_size
    if (
        bo % EROFS_BLOCK_SIZE_4096
        or bo < EROFS_BLOCK_SIZE_4096
        or bo < devslot_end
        or bsz % RAFS_V6_BLOB_ENTRY_SIZE
        or bo + bsz > n
    ):
        raise format_error(
            "ext superblock blob table",
            base + 8,
            f"offset {bo} size {bsz} invalid for a {n}-byte file",
        )
    if bsz // RAFS_V6_BLOB_ENTRY_SIZE != ndev:
        raise format_error(
            "ext superblock s_blob_table_size",
            base + 16,
            f"{bsz // RAFS_V6_BLOB_ENTRY_SIZE} blobs but {ndev} device slots",
        )
    ranges = [(bo, bo + bsz)]
    co, csz = ext.chunk_table_offset, ext.chunk_table_size
    if csz:
        if (
            co % EROFS_BLOCK_SIZE_4096
            or co < EROFS_BLOCK_SIZE_4096
            or co < devslot_end
            or csz % RAFS_V6_CHUNK_INFO_SIZE
            or co + csz > n
        ):
            raise format_error(
                "ext superblock chunk table",
                base + 24,
                f"offset {co} size {csz} invalid for a {n}-byte file",
            )
        if co < bo + bsz and bo < co + csz:
            raise format_error("ext superblock chunk table", base + 24, "overlaps the blob table")
        ranges.append((co, co + csz))
    po, psz = ext.prefetch_table_offset, ext.prefetch_table_size
    if psz and po:  # legacy images may record a size with offset 0: no table
        if po < EROFS_BLOCK_SIZE_4096 or psz % 4 or po < devslot_end or po + psz > n:
            raise format_error(
                "ext superblock prefetch table",
                base + 40,
                f"offset {po} size {psz} invalid for a {n}-byte file",
            )
        for a, b in ranges:
            if po < b and a < po + psz:
                raise format_error(
                    "ext superblock prefetch table",
                    base + 40,
                    "overlaps the blob or chunk table",
                )


def load_devices(buf: ReadableBuffer, count: int) -> list[RafsV6Device]:
    """Device slots: 64-character ids, non-zero size, no duplicates."""
    out: list[RafsV6Device] = []
    seen: set[bytes] = set()
    for i in range(count):
        off = RAFS_V6_DEVTABLE_OFFSET + i * EROFS_DEVT_SLOT_SIZE
        dev = RafsV6Device.unpack(buf, off)
        _check_blob_id(dev.blob_id, off, "device slot blob id")
        if dev.blocks == 0:
            raise format_error("device slot blocks", off + 64, "0 blocks")
        if dev.blob_id in seen:
            raise format_error(
                "device slot blob id", off, f"duplicate blob id {dev.blob_id.decode()}"
            )
        seen.add(dev.blob_id)
        out.append(dev)
    return out


def load_blobs(
    buf: ReadableBuffer, ext: RafsV6SuperBlockExt, devices: list[RafsV6Device]
) -> list[BlobInfo]:
    """Blob table entries checked like ``RafsV6Blob::validate``, joined with their slots."""
    tarfs = bool(ext.flags & SuperFlags.TARTFS_MODE)
    out: list[BlobInfo] = []
    for i in range(ext.blob_table_size // RAFS_V6_BLOB_ENTRY_SIZE):
        off = ext.blob_table_offset + i * RAFS_V6_BLOB_ENTRY_SIZE
        b = RafsV6Blob.unpack(buf, off)
        blob_id = _check_blob_id(b.blob_id, off, "blob table blob id")
        if b.blob_index != i:
            raise format_error("blob table blob_index", off + 64, f"{b.blob_index} at position {i}")
        if b.chunk_size != ext.chunk_size:
            raise format_error(
                "blob table chunk_size",
                off + 68,
                f"{b.chunk_size} != superblock {ext.chunk_size}",
            )
        if b.chunk_count > RAFS_MAX_CHUNKS_PER_BLOB:
            raise format_error("blob table chunk_count", off + 72, f"{b.chunk_count} > 2^24")
        for field, rel, value, enum_t in (
            ("compression_algo", 76, b.compression_algo, Compressor),
            ("digest_algo", 80, b.digest_algo, Digester),
            ("ci_compressor", 108, b.ci_compressor, Compressor),
            ("cipher_algo", 216, b.cipher_algo, CipherAlgo),
        ):
            if value not in enum_t._value2member_map_:
                raise format_error(f"blob table {field}", off + rel, f"unknown value {value}")
        if b.uncompressed_size > BLOB_MAX_SIZE_UNCOMPRESSED:
            raise format_error(
                "blob table uncompressed_size", off + 96, f"{b.uncompressed_size} > 2^44"
            )
        if b.compressed_size > BLOB_MAX_SIZE_COMPRESSED:
            raise format_error(
                "blob table compressed_size", off + 88, f"{b.compressed_size} > 2^40"
            )
        f = b.features
        if f & BLOB_FEATURES_INCOMPAT_MASK:
            raise format_error("blob table features", off + 84, f"incompatible bits in 0x{f:x}")
        aligned = bool(f & BlobFeatures.ALIGNED)
        if aligned == tarfs:
            raise format_error(
                "blob table features",
                off + 84,
                f"0x{f:x}: ALIGNED must be set exactly when not in tarfs mode",
            )
        _check_ci_sizes(b, off, tarfs)
        dev = devices[i]
        out.append(
            BlobInfo(
                index=i,
                blob_id=blob_id,
                compressor=Compressor(b.compression_algo),
                digester=Digester(b.digest_algo),
                chunk_size=b.chunk_size,
                chunk_count=b.chunk_count,
                compressed_size=b.compressed_size,
                uncompressed_size=b.uncompressed_size,
                features=f,
                ci_compressor=Compressor(b.ci_compressor),
                ci_offset=b.ci_offset,
                ci_compressed_size=b.ci_compressed_size,
                ci_uncompressed_size=b.ci_uncompressed_size,
                blob_toc_size=b.blob_toc_size,
                blob_toc_digest=b.blob_toc_digest,
                blob_meta_digest=b.blob_meta_digest,
                blob_meta_size=b.blob_meta_size,
                cipher_algo=b.cipher_algo,
                mapped_blkaddr=dev.mapped_blkaddr,
                blocks=dev.blocks,
            )
        )
    return out


def load_prefetch(buf: ReadableBuffer, ext: RafsV6SuperBlockExt, meta_base: int) -> list[int]:
    """Prefetch nids up to the first 0; each must address an inode slot in the file."""
    if not ext.prefetch_table_size or not ext.prefetch_table_offset:
        return []
    nids = unpack_u32_array(
        buf, ext.prefetch_table_offset, ext.prefetch_table_size // 4, "prefetch table"
    )
    out: list[int] = []
    for i, nid in enumerate(nids):
        if nid == 0:
            break
        if meta_base + (nid + 1) * EROFS_INODE_SLOT_SIZE > len(buf):
            raise format_error(
                "prefetch table entry",
                ext.prefetch_table_offset + 4 * i,
                f"nid {nid} beyond the bootstrap",
            )
        out.append(nid)
    return out


def _check_blob_id(raw: bytes, off: int, what: str) -> str:
    if len(raw) != BLOB_ID_LEN or not raw.isascii() or b"\0" in raw or not raw.isalnum():
        raise format_error(what, off, f"{raw[:64]!r} is not a 64-character id")
    return raw.decode("ascii")


def _check_ci_sizes(b: RafsV6Blob, off: int, tarfs: bool) -> None:
    f = b.features
    if b.ci_compressed_size > b.ci_uncompressed_size:
        raise format_error(
            "blob table ci_compressed_size",
            off + 120,
            f"{b.ci_compressed_size} > ci_uncompressed_size {b.ci_uncompressed_size}",
        )
    special = f & (BlobFeatures.BATCH | BlobFeatures.ZRAN | BlobFeatures.ENCRYPTED)
    if f & BlobFeatures.CHUNK_INFO_V2:
        if special:
            ok = b.ci_uncompressed_size >= b.chunk_count * 24
        else:
            ok = b.ci_uncompressed_size == b.chunk_count * 24
    elif special:
        raise format_error(
            "blob table features", off + 84, f"0x{f:x}: batch/zran/encrypted need CHUNK_INFO_V2"
        )
    else:
        ok = (
            bool(f & BlobFeatures.IS_CHUNKDICT_GENERATED)
            or tarfs
            or b.ci_uncompressed_size == b.chunk_count * 16
        )
    if not ok:
        raise format_error(
            "blob table ci_uncompressed_size",
            off + 128,
            f"{b.ci_uncompressed_size} for {b.chunk_count} chunks",
        )
