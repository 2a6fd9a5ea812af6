"""RAFS v5 bootstrap decoder (the pre-EROFS format nydusd still serves).

Layout: an 8 KiB superblock, an inode table mapping inode number ``i`` to
``table[i - 1] * 8`` (the inode's byte offset), the blob table, an optional
extended blob table (sizes, chunk counts, features) and a prefetch table of inode
numbers.  Each inode record (128 B) is followed by its name and symlink target
(each padded to 8), its xattr table when flagged, and for regular files its
80-byte chunk records.  A directory's children are the inode-table entries
``child_index .. child_index + child_count - 1``, sorted by name, so lookup is a
binary search.  Every inode is decoded on demand, with the checks nydusd applies
(``OndiskInodeWrapper::validate``).
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Iterator

from pynydus.errors import InvalidArgument, NotFound
from pynydus.rafs.format import Compressor, Digester, FileType, RafsChunkInfo
from pynydus.rafs.format.layout import (
    RAFS_MAX_CHUNK_SIZE,
    RAFS_MAX_NAME,
    SUPER_FLAGS_COMPRESSION_MASK,
    SUPER_FLAGS_HASH_MASK,
    SUPER_FLAGS_KNOWN,
    align_up,
    compressor_from_flags,
    digester_from_flags,
    file_type_of_mode,
    format_error,
    need,
    unpack_u32_array,
)
from pynydus.rafs.format.layout_v5 import (
    RAFS_MAX_METADATA_SIZE,
    RAFS_V5_ALIGNMENT,
    RAFS_V5_EXT_BLOB_ENTRY_SIZE,
    RAFS_V5_INODE_SIZE,
    RAFS_V5_ROOT_INODE,
    RAFS_V5_SUPER_VERSION,
    RAFS_V5_SUPERBLOCK_SIZE,
    RafsV5ExtBlobEntry,
    RafsV5Inode,
    RafsV5SuperBlock,
    V5InodeFlags,
    unpack_v5_blob_table,
    unpack_v5_xattrs,
)
from pynydus.rafs.read.bootstrap import BlobInfo, Bootstrap, Buffer, DirEntry, FileChunk, Stat

_U32 = struct.Struct("<I")
#: nydusd rejects inode-table offsets at or beyond 2^29 * 8.
_MAX_TABLE_OFFSET = 1 << 29


class BootstrapV5(Bootstrap):
    """A RAFS v5 bootstrap; inode numbers are the builder's (root = 1).  See :class:`Bootstrap`."""

    version = 5

    def __init__(self, buf: Buffer) -> None:
        super().__init__(buf)
        n = len(self._buf)
        if n <= RAFS_V5_SUPERBLOCK_SIZE or n > RAFS_MAX_METADATA_SIZE or n % RAFS_V5_ALIGNMENT:
            raise format_error("bootstrap size", 0, f"{n} bytes is not a valid RAFS v5 size")
        sb = RafsV5SuperBlock.unpack(self._buf, 0)
        self.superblock = sb
        if sb.fs_version != RAFS_V5_SUPER_VERSION:
            raise format_error("superblock s_fs_version", 4, f"0x{sb.fs_version:x}, expected 0x500")
        if sb.sb_size != RAFS_V5_SUPERBLOCK_SIZE:
            raise format_error("superblock s_sb_size", 8, f"{sb.sb_size}, expected 8192")
        cs = sb.block_size
        if cs & (cs - 1) or not 0x1000 <= cs <= RAFS_MAX_CHUNK_SIZE:
            raise format_error("superblock s_block_size", 12, f"chunk size {cs} invalid")
        if sb.flags & ~SUPER_FLAGS_KNOWN:
            raise format_error("superblock s_flags", 16, f"unknown bits in 0x{sb.flags:x}")
        # v5 images may carry no compression or hash bit: nydusd then assumes none/blake3.
        comp = (
            compressor_from_flags(sb.flags)
            if sb.flags & SUPER_FLAGS_COMPRESSION_MASK
            else Compressor.NONE
        )
        dig = digester_from_flags(sb.flags) if sb.flags & SUPER_FLAGS_HASH_MASK else Digester.BLAKE3
        if comp is None or dig is None:
            raise format_error(
                "superblock s_flags", 16, f"0x{sb.flags:x} names several compressors or digesters"
            )
        self.compressor, self.digester = comp, dig
        self.flags = sb.flags
        self.chunk_size = cs
        self.block_size = cs
        self.inode_count = sb.inodes_count
        self._check_tables(sb, n)
        self._table_off = sb.inode_table_offset
        self._max_ino = sb.inode_table_entries
        self.blobs = self._load_blobs(sb)
        self.prefetch_list = self._load_prefetch(sb)
        self.root_ino = RAFS_V5_ROOT_INODE
        _, root = self._node(RAFS_V5_ROOT_INODE)
        if stat.S_IFMT(root.mode) != stat.S_IFDIR:
            raise format_error(
                "root inode i_mode", self._offset_of(1), f"0o{root.mode:o} is not a directory"
            )

    @staticmethod
    def _check_tables(sb: RafsV5SuperBlock, n: int) -> None:
        lo = RAFS_V5_SUPERBLOCK_SIZE

        def rng(what: str, field_off: int, off: int, size: int) -> tuple[int, int]:
            if off < lo or off + size > n:
                raise format_error(
                    f"superblock {what}", field_off, f"offset {off} size {size} outside {lo}..{n}"
                )
            return off, off + size

        inode_tbl = rng("inode table", 32, sb.inode_table_offset, 4 * sb.inode_table_entries)
        if sb.inodes_count > sb.inode_table_entries:
            raise format_error(
                "superblock s_inodes_count",
                24,
                f"{sb.inodes_count} > table entries {sb.inode_table_entries}",
            )
        if sb.inode_table_entries == 0:
            raise format_error("superblock s_inode_table_entries", 64, "empty inode table")
        placed = [inode_tbl]
        if sb.blob_table_size:
            placed.append(rng("blob table", 48, sb.blob_table_offset, sb.blob_table_size))
        if sb.extended_blob_table_entries:
            placed.append(
                rng(
                    "extended blob table",
                    80,
                    sb.extended_blob_table_offset,
                    RAFS_V5_EXT_BLOB_ENTRY_SIZE * sb.extended_blob_table_entries,
                )
            )
        if sb.prefetch_table_entries:
            placed.append(
                rng("prefetch table", 40, sb.prefetch_table_offset, 4 * sb.prefetch_table_entries)
            )
        for i, (a, b) in enumerate(placed):
            for c, d in placed[i + 1 :]:
                if a < d and c < b:
                    raise format_error(
                        "superblock tables", 32, f"ranges {a}..{b} and {c}..{d} overlap"
                    )

    def _load_blobs(self, sb: RafsV5SuperBlock) -> list[BlobInfo]:
        ext: list[RafsV5ExtBlobEntry] = [
            RafsV5ExtBlobEntry.unpack(
                self._buf, sb.extended_blob_table_offset + i * RAFS_V5_EXT_BLOB_ENTRY_SIZE
            )
            for i in range(sb.extended_blob_table_entries)
        ]
        entries = (
            unpack_v5_blob_table(self._buf, sb.blob_table_offset, sb.blob_table_size)
            if sb.blob_table_size
            else []
        )
        if ext and len(ext) < len(entries):
            raise format_error(
                "superblock s_extended_blob_table_entries", 72, f"{len(ext)} < {len(entries)} blobs"
            )
        out: list[BlobInfo] = []
        for i, e in enumerate(entries):
            if (
                not all(0x21 <= c < 0x7F for c in e.blob_id)
                or b"/" in e.blob_id
                or len(e.blob_id) > 256
            ):
                raise format_error(
                    "v5 blob table blob id",
                    sb.blob_table_offset,
                    f"blob {i}: unusable id {e.blob_id[:80]!r}",
                )
            x = ext[i] if ext else RafsV5ExtBlobEntry()
            out.append(
                BlobInfo(
                    index=i,
                    blob_id=e.blob_id.decode("ascii"),
                    compressor=self.compressor,
                    digester=self.digester,
                    chunk_size=self.chunk_size,
                    chunk_count=x.chunk_count,
                    compressed_size=x.compressed_size,
                    uncompressed_size=x.uncompressed_size,
                    features=x.features,
                    readahead_offset=e.readahead_offset,
                    readahead_size=e.readahead_size,
                )
            )
        return out

    def _load_prefetch(self, sb: RafsV5SuperBlock) -> list[int]:
        inos = unpack_u32_array(
            self._buf, sb.prefetch_table_offset, sb.prefetch_table_entries, "prefetch table"
        )
        out: list[int] = []
        for i, ino in enumerate(inos):
            if ino == 0:
                break
            if ino > sb.inode_table_entries:
                raise format_error(
                    "prefetch table entry",
                    sb.prefetch_table_offset + 4 * i,
                    f"inode {ino} beyond the inode table",
                )
            out.append(ino)
        return out

    # -- inodes ----------------------------------------------------------------------

    def _offset_of(self, ino: int) -> int:
        """Byte offset of inode ``ino``'s record; NotFound if the number is out of range."""
        if not 1 <= ino <= self._max_ino:
            raise NotFound(f"inode {ino}: not in 1..{self._max_ino}")
        entry_off = self._table_off + 4 * (ino - 1)
        v: int = _U32.unpack_from(self._buf, entry_off)[0]
        if v <= RAFS_V5_SUPERBLOCK_SIZE >> 3 or v >= _MAX_TABLE_OFFSET:
            raise format_error(f"inode table entry {ino}", entry_off, f"offset {v * 8} invalid")
        return v * 8

    def _node(self, ino: int) -> tuple[int, RafsV5Inode]:
        """(offset, record) of the inode stored in inode-table slot ``ino``, validated."""
        off = self._offset_of(ino)
        rec = RafsV5Inode.unpack(self._buf, off)
        what = f"inode {ino} (at table slot)"
        if rec.ino == 0 or rec.ino > self._max_ino:
            raise format_error(f"{what} i_ino", off + 40, f"{rec.ino} not in 1..{self._max_ino}")
        if rec.ino != RAFS_V5_ROOT_INODE and rec.parent == 0:
            raise format_error(f"{what} i_parent", off + 32, "0 for a non-root inode")
        if rec.nlink == 0:
            raise format_error(f"{what} i_nlink", off + 88, "0")
        # Old builders wrote the root without a name; nydusd accepts that (it only checks
        # names when inode validation is on), and a child's empty name is caught by _name().
        if rec.name_size > RAFS_MAX_NAME + 1 or (
            rec.name_size == 0 and rec.ino != RAFS_V5_ROOT_INODE
        ):
            raise format_error(f"{what} i_name_size", off + 100, f"{rec.name_size} not in 1..256")
        ftype = stat.S_IFMT(rec.mode)
        if file_type_of_mode(rec.mode) == FileType.UNKNOWN:
            raise format_error(f"{what} i_mode", off + 60, f"invalid file type in 0o{rec.mode:o}")
        hardlink = ftype == stat.S_IFREG and rec.nlink > 1
        if not hardlink and rec.parent >= rec.ino:
            raise format_error(f"{what} i_parent", off + 32, f"{rec.parent} >= i_ino {rec.ino}")
        need(len(self._buf), off, rec.body_size, f"{what} name and symlink")
        if (
            ftype == stat.S_IFDIR
            and rec.child_count
            and (
                rec.child_index <= rec.ino or rec.child_index + rec.child_count - 1 > self._max_ino
            )
        ):
            raise format_error(
                f"{what} children",
                off + 92,
                f"index {rec.child_index} count {rec.child_count} invalid for i_ino {rec.ino}",
            )
        if ftype == stat.S_IFLNK and rec.symlink_size == 0:
            raise format_error(f"{what} i_symlink_size", off + 102, "0 for a symlink")
        return off, rec

    def _xattr_size(self, off: int, rec: RafsV5Inode) -> int:
        if not rec.flags & V5InodeFlags.XATTR:
            return 0
        _, size = unpack_v5_xattrs(self._buf, off + rec.body_size)
        return size

    def stat(self, ino: int) -> Stat:
        _, rec = self._node(ino)
        rdev = rec.rdev if stat.S_IFMT(rec.mode) in (stat.S_IFCHR, stat.S_IFBLK) else 0
        return Stat(
            ino=ino,
            mode=rec.mode,
            nlink=rec.nlink,
            uid=rec.uid,
            gid=rec.gid,
            size=rec.size,
            blocks=rec.blocks,
            mtime=rec.mtime,
            mtime_nsec=rec.mtime_nsec,
            rdev=rdev,
        )

    def _inode_offset(self, ino: int) -> int:
        return self._offset_of(ino)

    def raw_inode(self, ino: int) -> RafsV5Inode:
        """The on-disk inode record in table slot ``ino`` (for inspection and tests)."""
        return self._node(ino)[1]

    def _name(self, off: int, rec: RafsV5Inode) -> bytes:
        name = bytes(self._buf[off + RAFS_V5_INODE_SIZE : off + RAFS_V5_INODE_SIZE + rec.name_size])
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise format_error(
                "inode name", off + RAFS_V5_INODE_SIZE, f"{name!r} is not a valid file name"
            )
        return name

    def _dir(self, ino: int) -> RafsV5Inode:
        _, rec = self._node(ino)
        if stat.S_IFMT(rec.mode) != stat.S_IFDIR:
            raise InvalidArgument(f"inode {ino} is not a directory")
        return rec

    def _child(self, rec: RafsV5Inode, k: int) -> tuple[bytes, int, int]:
        off, child = self._node(rec.child_index + k)
        return self._name(off, child), child.ino, child.mode

    def readdir(self, ino: int) -> Iterator[DirEntry]:
        rec = self._dir(ino)
        return self._iter_dir(ino, rec)

    def _iter_dir(self, ino: int, rec: RafsV5Inode) -> Iterator[DirEntry]:
        yield DirEntry(b".", ino, FileType.DIR)
        yield DirEntry(b"..", ino if ino == RAFS_V5_ROOT_INODE else rec.parent, FileType.DIR)
        prev = b""
        for k in range(rec.child_count):
            name, child_ino, mode = self._child(rec, k)
            if name <= prev:
                raise format_error(
                    f"directory {ino} children order",
                    self._offset_of(rec.child_index + k),
                    f"{name!r} after {prev!r}",
                )
            prev = name
            yield DirEntry(name, child_ino, file_type_of_mode(mode))

    def _claim_dir_storage(self, ino: int, claimed: set[int]) -> None:
        rec = self._dir(ino)
        # Children are inode-table slots; each slot belongs to one directory.
        first = rec.child_index
        for k in range(rec.child_count):
            if first + k in claimed:
                raise format_error(
                    f"directory {ino} children",
                    self._offset_of(ino),
                    "share inode-table slots with another directory",
                )
            claimed.add(first + k)

    def lookup(self, parent: int, name: bytes) -> int:
        rec = self._dir(parent)
        if name == b".":
            return parent
        if name == b"..":
            return parent if parent == RAFS_V5_ROOT_INODE else rec.parent
        a, b = 0, rec.child_count
        while a < b:
            mid = (a + b) // 2
            cname, cino, _ = self._child(rec, mid)
            if cname == name:
                return cino
            if cname < name:
                a = mid + 1
            else:
                b = mid
        raise NotFound(f"lookup {name!r} in directory {parent}: no such entry")

    def readlink(self, ino: int) -> bytes:
        off, rec = self._node(ino)
        if stat.S_IFMT(rec.mode) != stat.S_IFLNK:
            raise InvalidArgument(f"inode {ino} is not a symlink")
        start = off + RAFS_V5_INODE_SIZE + align_up(rec.name_size, RAFS_V5_ALIGNMENT)
        return bytes(self._buf[start : start + rec.symlink_size])

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        off, rec = self._node(ino)
        if not rec.flags & V5InodeFlags.XATTR:
            return []
        pairs, _ = unpack_v5_xattrs(self._buf, off + rec.body_size)
        return pairs

    def chunks(self, ino: int) -> list[FileChunk]:
        off, rec = self._node(ino)
        if stat.S_IFMT(rec.mode) != stat.S_IFREG or rec.child_count == 0:
            return []
        start = off + rec.body_size + self._xattr_size(off, rec)
        need(
            len(self._buf),
            start,
            rec.child_count * RafsChunkInfo.SIZE,
            f"inode {ino} chunk records",
        )
        holes = bool(rec.flags & V5InodeFlags.HAS_HOLE)
        out: list[FileChunk] = []
        for i in range(rec.child_count):
            coff = start + i * RafsChunkInfo.SIZE
            c = RafsChunkInfo.unpack(self._buf, coff)
            if c.blob_index >= len(self.blobs):
                raise format_error(
                    f"inode {ino} chunk {i} blob_index",
                    coff + 32,
                    f"{c.blob_index} >= {len(self.blobs)} blobs",
                )
            blob = self.blobs[c.blob_index]
            if blob.chunk_count and c.index >= blob.chunk_count:
                raise format_error(
                    f"inode {ino} chunk {i} index",
                    coff + 72,
                    f"{c.index} >= blob chunk count {blob.chunk_count}",
                )
            if not 0 < c.uncompressed_size <= self.chunk_size:
                raise format_error(
                    f"inode {ino} chunk {i} uncompressed_size",
                    coff + 44,
                    f"{c.uncompressed_size} invalid",
                )
            file_off = c.file_offset if holes else i * self.chunk_size
            out.append(
                FileChunk(
                    file_off,
                    c.blob_index,
                    blob.blob_id,
                    c.index,
                    c.uncompressed_offset,
                    c.uncompressed_size,
                    c.compressed_offset,
                    c.compressed_size,
                    c.digest,
                    c.is_compressed,
                    blob.compressor,
                    c.flags,
                    c.crc32,
                )
            )
        return out
