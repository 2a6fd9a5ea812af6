"""RAFS v6 bootstrap decoder (EROFS with chunk-based files and a device table).

Opening checks the superblock, the RAFS extended superblock, the device slots and
the blob table the way nydusd does (``RafsV6SuperBlock::validate``,
``RafsV6SuperBlockExt::validate``, ``RafsV6Blob::validate``), then stops.  An
inode is decoded when it is asked for: ``offset = meta_blkaddr * block + nid * 32``.
Directories are EROFS dirent blocks whose names are sorted over the whole
directory, so lookup is a binary search over blocks and then inside one block.
Regular files carry an array of 8-byte chunk addresses (blob index + 1, chunk-info
index, uncompressed block address); compressed locations and digests come from the
bootstrap chunk table, indexed on first use (:mod:`pynydus.rafs.read.chunkindex`).
"""

from __future__ import annotations

import operator
import stat
import struct
import threading
from collections.abc import Iterable, Iterator

from pynydus.errors import InvalidArgument, NotFound
from pynydus.rafs.format import FileType, RafsChunkInfo
from pynydus.rafs.format.layout import (
    EROFS_BLOCK_SIZE_4096,
    EROFS_CHUNK_FORMAT_INDEXES,
    EROFS_CHUNK_INDEX_SIZE,
    EROFS_DEVT_SLOT_SIZE,
    EROFS_DIRENT_SIZE,
    EROFS_I_FORMAT_MASK,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_INODE_SLOT_SIZE,
    EROFS_NAME_LEN,
    EROFS_SUPER_OFFSET,
    EROFS_XATTR_ENTRY_SIZE,
    EROFS_XATTR_IBODY_HEADER_SIZE,
    RAFS_MAX_SYMLINK,
    RAFS_V6_CHUNK_INFO_SIZE,
    RAFS_V6_DEVTABLE_OFFSET,
    RAFS_V6_EXT_SUPER_OFFSET,
    XATTR_PREFIXES,
    ChunkFlags,
    RafsV6Inode,
    RafsV6SuperBlock,
    RafsV6SuperBlockExt,
    align_up,
    compressor_from_flags,
    digester_from_flags,
    file_type_of_mode,
    format_error,
    need,
    unpack_v6_inode,
    xattr_ibody_size,
)
from pynydus.rafs.read.bootstrap import Bootstrap, Buffer, DirEntry, FileChunk, Stat
from pynydus.rafs.read.chunkindex import BlobLayout, ChunkIndex, blob_layout
from pynydus.rafs.read.v6headers import (
    check_ext,
    check_superblock,
    load_blobs,
    load_devices,
    load_prefetch,
)

_DIRENT = struct.Struct("<QHBx")
# what stat() needs of an extended / a compact inode, for stat_fields
_STAT_EXT = struct.Struct("<HHH2xQIIIIQII")
_STAT_CMP = struct.Struct("<HHHHIIIIHH")
_FILE_TYPES = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                         stat.S_IFIFO, stat.S_IFSOCK})
_DEVICES = (stat.S_IFCHR, stat.S_IFBLK)
_LAYOUTS = (EROFS_INODE_FLAT_PLAIN, EROFS_INODE_FLAT_INLINE, EROFS_INODE_CHUNK_BASED)
_CHUNK_ADDR = struct.Struct("<HHI")
_NAMEOFF = struct.Struct("<H")


class _Node:
    """A decoded v6 inode plus where its parts are."""

    __slots__ = ("isize", "layout", "mode", "nid", "off", "raw", "size", "xsize")

    def __init__(self, nid: int, off: int, raw: RafsV6Inode) -> None:
        self.nid = nid
        self.off = off
        self.raw = raw
        self.layout = (raw.format >> 1) & 0x7
        self.isize = raw.SIZE
        self.xsize = xattr_ibody_size(raw.xattr_icount)
        self.mode = raw.mode
        self.size = raw.size


class _FlatBlocks:
    """(offset, length) of block ``i`` of a flat inode, computed on demand so that a
    lookup in a huge directory touches O(log n) blocks and allocates nothing."""

    __slots__ = ("base", "bs", "count", "inline_off", "tail")

    def __init__(self, base: int, bs: int, count: int, tail: int, inline_off: int) -> None:
        self.base, self.bs, self.count, self.tail, self.inline_off = (
            base,
            bs,
            count,
            tail,
            inline_off,
        )

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        if i < self.count - 1:
            return self.base + i * self.bs, self.bs
        if self.inline_off >= 0:
            return self.inline_off, self.tail
        return self.base + i * self.bs, self.tail

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return (self[i] for i in range(self.count))


class BootstrapV6(Bootstrap):
    """A RAFS v6 bootstrap; inode numbers are nids.  See :class:`Bootstrap`."""

    version = 6

    def __init__(self, buf: Buffer) -> None:
        super().__init__(buf)
        n = len(buf)
        if n < EROFS_BLOCK_SIZE_4096:
            raise format_error(
                "bootstrap size", 0, f"{n} bytes, a RAFS v6 bootstrap has at least 4096"
            )
        sb = RafsV6SuperBlock.unpack(buf, EROFS_SUPER_OFFSET)
        self.superblock = sb
        check_superblock(sb, n)
        self.block_size = 1 << sb.blkszbits
        self._meta_base = sb.meta_blkaddr * self.block_size
        ext = RafsV6SuperBlockExt.unpack(buf, RAFS_V6_EXT_SUPER_OFFSET)
        self.ext_superblock = ext
        self.flags = ext.flags
        self.chunk_size = ext.chunk_size
        self.inode_count = sb.inos
        devslot_end = RAFS_V6_DEVTABLE_OFFSET + EROFS_DEVT_SLOT_SIZE * sb.extra_devices
        check_ext(ext, n, devslot_end, sb.extra_devices)
        comp = compressor_from_flags(ext.flags)
        dig = digester_from_flags(ext.flags)
        assert comp is not None and dig is not None  # checked by _check_ext
        self.compressor, self.digester = comp, dig
        self.devices = load_devices(self._buf, sb.extra_devices)
        self.blobs = load_blobs(self._buf, ext, self.devices)
        self.prefetch_list = load_prefetch(self._buf, ext, self._meta_base)
        self.root_ino = sb.root_nid
        root = self._node(sb.root_nid, "root nid", EROFS_SUPER_OFFSET + 14)
        if stat.S_IFMT(root.mode) != stat.S_IFDIR:
            raise format_error("root inode", root.off, f"mode 0o{root.mode:o} is not a directory")
        self._chunk_index: ChunkIndex | None = None
        self._chunk_index_lock = threading.Lock()  # ... and of _blob_layouts
        self._blob_layouts: dict[int, BlobLayout] = {}

    # -- inodes ----------------------------------------------------------------------

    def _node(self, nid: int, what: str = "", ref_off: int = -1) -> _Node:
        """Decode inode ``nid``.  NotFound for a caller's out-of-range nid; FormatError
        when the reference came from the image (``what``/``ref_off`` name it)."""
        off = self._meta_base + nid * EROFS_INODE_SLOT_SIZE
        if nid < 0 or off + 32 > len(self._buf):
            if what:
                raise format_error(what, ref_off, f"nid {nid} points beyond the bootstrap")
            raise NotFound(f"inode {nid}: no such nid in this bootstrap")
        raw = unpack_v6_inode(self._buf, off)
        node = _Node(nid, off, raw)
        need(len(self._buf), off, node.isize + node.xsize, f"inode {nid} with xattrs")
        if file_type_of_mode(node.mode) == FileType.UNKNOWN:
            raise format_error(
                f"inode {nid} i_mode", off + 4, f"invalid file type in 0o{node.mode:o}"
            )
        return node

    def _inode_offset(self, ino: int) -> int:
        return self._meta_base + ino * EROFS_INODE_SLOT_SIZE

    def raw_inode(self, ino: int) -> RafsV6Inode:
        """The on-disk inode record of nid ``ino`` (for inspection and tests)."""
        return self._node(ino).raw

    def stat(self, ino: int) -> Stat:
        node = self._node(ino)
        raw = node.raw
        ftype = stat.S_IFMT(node.mode)
        rdev = raw.u if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0
        return Stat(
            ino=ino,
            mode=raw.mode,
            nlink=raw.nlink,
            uid=raw.uid,
            gid=raw.gid,
            size=raw.size,
            blocks=(raw.size + 511) // 512,
            mtime=raw.mtime,
            mtime_nsec=raw.mtime_nsec,
            rdev=rdev,
        )

    def stat_fields(self, ino: int) -> tuple[int, int, int, int, int, int, int, int, int]:
        return self.stat_fields_many([ino])[0]

    def stat_fields_many(self, inos: list[int]) -> list[tuple[int, int, int, int, int, int, int,
                                                               int, int]]:
        # One unpack of each inode's bytes in one loop (a READDIRPLUS asks for a listing's
        # worth); whatever is unusual (out of range, a format or file type RAFS does not
        # use, xattrs past the end) goes to stat(), which says why.
        buf = self._buf
        n = len(buf)
        meta, slot = self._meta_base, EROFS_INODE_SLOT_SIZE
        ext, cmp_, xhead = _STAT_EXT.unpack_from, _STAT_CMP.unpack_from, EROFS_XATTR_IBODY_HEADER_SIZE
        ifmt, layouts, types, devices = stat.S_IFMT, _LAYOUTS, _FILE_TYPES, _DEVICES
        bad_fmt = ~EROFS_I_FORMAT_MASK
        out = []
        for ino in inos:
            off = meta + ino * slot
            if ino >= 0 and off + 64 <= n:
                if buf[off] & 1:
                    fmt, xcount, mode, size, u, _, uid, gid, mtime, mtime_nsec, nlink = ext(buf, off)
                    isize = 64
                else:
                    fmt, xcount, mode, nlink, size, _, u, _, uid, gid = cmp_(buf, off)
                    mtime = mtime_nsec = 0
                    isize = 32
                ftype = ifmt(mode)
                if (not fmt & bad_fmt and (fmt >> 1) & 0x7 in layouts and ftype in types
                        and off + isize + (xcount and xhead + 4 * (xcount - 1)) <= n):
                    out.append((mode, nlink, uid, gid, size, (size + 511) // 512, mtime,
                                mtime_nsec, u if ftype in devices else 0))
                    continue
            out.append(super().stat_fields(ino))
        return out

    # -- flat data (directories, symlinks) ----------------------------------------------

    def _flat_blocks(self, node: _Node) -> _FlatBlocks:
        """Data blocks of a FLAT_PLAIN / FLAT_INLINE inode, validated in O(1).

        Blocks live at ``i_u + i``; with FLAT_INLINE the last (partial) block sits
        right after the inode and its xattrs and must not cross a block boundary.
        """
        bs = self.block_size
        size = node.size
        if node.layout not in (EROFS_INODE_FLAT_PLAIN, EROFS_INODE_FLAT_INLINE):
            raise format_error(
                f"inode {node.nid} i_format", node.off, f"layout {node.layout} is not flat"
            )
        nblocks = (size + bs - 1) // bs
        n = len(self._buf)
        inline = node.layout == EROFS_INODE_FLAT_INLINE
        nfull = max(nblocks - 1, 0) if inline else nblocks
        # Every block must lie inside the file, so a huge i_size fails here, before any loop.
        if nfull and (node.raw.u + nfull) * bs > n:
            raise format_error(
                f"inode {node.nid} i_u",
                node.off + 16,
                f"data blocks {node.raw.u}+{nfull} beyond the {n}-byte file",
            )
        tail = size - (nblocks - 1) * bs
        inline_off = -1
        if inline and nblocks:
            inline_off = node.off + node.isize + node.xsize
            if (inline_off % bs) + tail > bs or inline_off + tail > n:
                raise format_error(
                    f"inode {node.nid} inline data",
                    inline_off,
                    f"{tail} bytes cross a block boundary",
                )
        return _FlatBlocks(node.raw.u * bs, bs, nblocks, tail, inline_off)

    def dir_blocks(self, ino: int) -> list[tuple[int, int]]:
        """(offset, length) of each dirent block of directory ``ino``, bounds-checked;
        for callers that decode dirents in bulk (merge). Entries are not validated."""
        return list(self._flat_blocks(self._dir_node(ino)))

    def _dir_node(self, ino: int) -> _Node:
        node = self._node(ino)
        if stat.S_IFMT(node.mode) != stat.S_IFDIR:
            raise InvalidArgument(f"inode {ino} is not a directory")
        if node.size < EROFS_DIRENT_SIZE + 1:
            raise format_error(
                f"directory {ino} i_size", node.off + 8, f"{node.size} bytes cannot hold an entry"
            )
        return node

    def _block_count(self, boff: int, blen: int, ino: int) -> int:
        need(len(self._buf), boff, EROFS_DIRENT_SIZE, f"directory {ino} block")
        nameoff0: int = _NAMEOFF.unpack_from(self._buf, boff + 8)[0]
        if nameoff0 < EROFS_DIRENT_SIZE or nameoff0 % EROFS_DIRENT_SIZE or nameoff0 >= blen:
            raise format_error(
                f"directory {ino} dirent e_nameoff",
                boff + 8,
                f"{nameoff0} invalid in a {blen}-byte block",
            )
        return nameoff0 // EROFS_DIRENT_SIZE

    def _dirent(self, boff: int, blen: int, count: int, j: int, ino: int) -> tuple[bytes, int, int]:
        buf = self._buf
        doff = boff + j * EROFS_DIRENT_SIZE
        nid, start, ftype = _DIRENT.unpack_from(buf, doff)
        if j + 1 < count:
            (end,) = _NAMEOFF.unpack_from(buf, doff + EROFS_DIRENT_SIZE + 8)
        else:
            end = buf.find(b"\0", boff + start, boff + blen) - boff if start < blen else -1
            if end < 0:
                end = blen
        if not count * EROFS_DIRENT_SIZE <= start < end <= blen or end - start > EROFS_NAME_LEN:
            raise format_error(
                f"directory {ino} dirent name",
                doff + 8,
                f"name span {start}..{end} invalid in a {blen}-byte block",
            )
        if ftype > FileType.SYMLINK:
            raise format_error(
                f"directory {ino} dirent e_file_type", doff + 10, f"unknown type {ftype}"
            )
        if self._meta_base + nid * EROFS_INODE_SLOT_SIZE + 32 > len(buf):
            raise format_error(
                f"directory {ino} dirent e_nid", doff, f"nid {nid} points beyond the bootstrap"
            )
        name = bytes(buf[boff + start : boff + end])
        # A separator or NUL inside a name would let a path built from it escape its
        # directory (image unpack joins names into host paths).
        if b"/" in name or b"\0" in name:
            raise format_error(
                f"directory {ino} dirent name", boff + start, f"{name!r} is not a file name"
            )
        return name, nid, ftype

    def readdir(self, ino: int) -> Iterator[DirEntry]:
        return (DirEntry(name, nid, FileType(ftype))
                for name, nid, ftype in self.readdir_fields(ino))

    def readdir_fields(self, ino: int) -> Iterator[tuple[bytes, int, int]]:
        node = self._dir_node(ino)
        blocks = self._flat_blocks(node)
        return self._iter_dir(ino, blocks)

    def _iter_dir(self, ino: int, blocks: _FlatBlocks) -> Iterator[tuple[bytes, int, int]]:
        prev = b""
        for boff, blen in blocks:
            count = self._block_count(boff, blen, ino)
            entries: Iterable[tuple[bytes, int, int]] | None = self._block_dirents(boff, blen,
                                                                                  count)
            if entries is None:  # something is off: entry by entry, to say what and where
                entries = (self._dirent(boff, blen, count, j, ino) for j in range(count))
            for j, (name, nid, ftype) in enumerate(entries):
                # Lookup is a binary search, so names must be strictly increasing.
                if name <= prev:
                    raise format_error(
                        f"directory {ino} dirent order",
                        boff + j * EROFS_DIRENT_SIZE,
                        f"{name!r} after {prev!r}",
                    )
                prev = name
                yield name, nid, ftype

    def _block_dirents(self, boff: int, blen: int, count: int
                       ) -> list[tuple[bytes, int, int]] | None:
        """Every entry of one dirent block as ``_dirent`` decodes them, checked all at once
        (a tree walk lists every entry of the image); None when any check of ``_dirent``
        would fail."""
        block = bytes(self._buf[boff:boff + blen])
        nids, starts, types = zip(*_DIRENT.iter_unpack(block[:count * EROFS_DIRENT_SIZE]),
                                  strict=True)
        tail = starts[-1]
        last_end = block.find(b"\0", tail) if tail < blen else -1
        ends = starts[1:] + (blen if last_end < 0 else last_end,)
        if (not count * EROFS_DIRENT_SIZE <= starts[0] or not all(map(operator.lt, starts, ends))
                or ends[-1] > blen or max(map(operator.sub, ends, starts)) > EROFS_NAME_LEN
                or max(types) > FileType.SYMLINK
                or self._meta_base + max(nids) * EROFS_INODE_SLOT_SIZE + 32 > len(self._buf)):
            return None
        names = block[starts[0]:ends[-1]]
        if b"/" in names or b"\0" in names:  # a name with a separator or a NUL in it
            return None
        return list(zip([block[a:b] for a, b in zip(starts, ends, strict=True)], nids, types,
                        strict=True))

    def _claim_dir_storage(self, ino: int, claimed: set[int]) -> None:
        for boff, _ in self._flat_blocks(self._dir_node(ino)):
            if boff in claimed:
                raise format_error(
                    f"directory {ino} data block", boff, "shared with another directory"
                )
            claimed.add(boff)

    def lookup(self, parent: int, name: bytes) -> int:
        node = self._dir_node(parent)
        blocks = self._flat_blocks(node)
        # Find the last block whose first name is <= name, then search inside it.
        lo, hi = 0, len(blocks)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            boff, blen = blocks[mid]
            count = self._block_count(boff, blen, parent)
            first = self._dirent(boff, blen, count, 0, parent)[0]
            if first <= name:
                lo = mid
            else:
                hi = mid
        boff, blen = blocks[lo]
        count = self._block_count(boff, blen, parent)
        a, b = 0, count
        while a < b:
            mid = (a + b) // 2
            ename, nid, _ = self._dirent(boff, blen, count, mid, parent)
            if ename == name:
                return nid
            if ename < name:
                a = mid + 1
            else:
                b = mid
        raise NotFound(f"lookup {name!r} in directory {parent}: no such entry")

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if stat.S_IFMT(node.mode) != stat.S_IFLNK:
            raise InvalidArgument(f"inode {ino} is not a symlink")
        if not 0 < node.size <= RAFS_MAX_SYMLINK:
            raise format_error(
                f"symlink {ino} i_size", node.off + 8, f"{node.size} not in 1..{RAFS_MAX_SYMLINK}"
            )
        return b"".join(bytes(self._buf[o : o + n]) for o, n in self._flat_blocks(node))

    # -- xattrs ------------------------------------------------------------------------

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        node = self._node(ino)
        if not node.xsize:
            return []
        buf = self._buf
        base = node.off + node.isize
        end = base + node.xsize
        shared = buf[base + 4]
        if shared:
            raise format_error(
                f"inode {ino} xattr h_shared_count",
                base + 4,
                f"{shared}: RAFS has no shared xattrs",
            )
        out: list[tuple[bytes, bytes]] = []
        pos = base + EROFS_XATTR_IBODY_HEADER_SIZE
        while pos + EROFS_XATTR_ENTRY_SIZE <= end:
            name_len, index, value_size = struct.unpack_from("<BBH", buf, pos)
            total = align_up(EROFS_XATTR_ENTRY_SIZE + name_len + value_size, 4)
            if pos + total > end:
                raise format_error(
                    f"inode {ino} xattr entry",
                    pos,
                    f"{total} bytes run past the xattr area end {end}",
                )
            prefix = XATTR_PREFIXES.get(index)
            if prefix is None:
                raise format_error(
                    f"inode {ino} xattr e_name_index", pos + 1, f"unknown prefix index {index}"
                )
            nstart = pos + EROFS_XATTR_ENTRY_SIZE
            name = prefix + bytes(buf[nstart : nstart + name_len])
            value = bytes(buf[nstart + name_len : nstart + name_len + value_size])
            out.append((name, value))
            pos += total
        return out

    # -- chunks ------------------------------------------------------------------------

    def _chunk_addrs(self, node: _Node) -> tuple[int, int]:
        """(offset of the chunk index array, number of chunks) of a regular file."""
        if node.layout != EROFS_INODE_CHUNK_BASED:
            raise format_error(
                f"inode {node.nid} i_format",
                node.off,
                f"regular file with layout {node.layout}, RAFS uses chunk-based",
            )
        if not node.raw.u & EROFS_CHUNK_FORMAT_INDEXES:
            raise format_error(
                f"inode {node.nid} chunk format",
                node.off + 16,
                f"0x{node.raw.u:x} lacks the INDEXES flag",
            )
        count = (node.size + self.chunk_size - 1) // self.chunk_size
        start = node.off + align_up(node.isize + node.xsize, 8)
        need(
            len(self._buf),
            start,
            count * EROFS_CHUNK_INDEX_SIZE,
            f"inode {node.nid} chunk index array",
        )
        return start, count

    def chunks(self, ino: int) -> list[FileChunk]:
        node = self._node(ino)
        if stat.S_IFMT(node.mode) != stat.S_IFREG:
            return []
        start, count = self._chunk_addrs(node)
        return [self._file_chunk(node, start, i) for i in range(count)]

    def _chunks_in_range(self, ino: int, start: int, end: int) -> list[FileChunk]:
        node = self._node(ino)
        arr, count = self._chunk_addrs(node)
        first = start // self.chunk_size
        last = min(count, (end + self.chunk_size - 1) // self.chunk_size)
        return [self._file_chunk(node, arr, i) for i in range(first, last)]

    def chunk_addr(self, ino: int, i: int) -> tuple[int, int, int]:
        """Raw (blob_index, ci_index, blkaddr) of chunk ``i`` of regular file ``ino``."""
        node = self._node(ino)
        arr, count = self._chunk_addrs(node)
        if not 0 <= i < count:
            raise IndexError(i)
        lo, hi, blk = _CHUNK_ADDR.unpack_from(self._buf, arr + i * EROFS_CHUNK_INDEX_SIZE)
        return (hi & 0xFF) - 1, ((hi >> 8) << 16) | lo, blk

    def _file_chunk(self, node: _Node, arr: int, i: int) -> FileChunk:
        off = arr + i * EROFS_CHUNK_INDEX_SIZE
        lo, hi, blk = _CHUNK_ADDR.unpack_from(self._buf, off)
        dev = hi & 0xFF
        if not 1 <= dev <= len(self.blobs):
            raise format_error(
                f"inode {node.nid} chunk {i} device id",
                off + 2,
                f"{dev} not in 1..{len(self.blobs)}",
            )
        blob = self.blobs[dev - 1]
        ci = ((hi >> 8) << 16) | lo
        if ci >= blob.chunk_count:
            raise format_error(
                f"inode {node.nid} chunk {i} index",
                off,
                f"{ci} >= blob chunk count {blob.chunk_count}",
            )
        file_off = i * self.chunk_size
        u_size = min(self.chunk_size, node.size - file_off)
        u_off = blk * self.block_size
        if u_off + u_size > align_up(blob.uncompressed_size, self.block_size):
            raise format_error(
                f"inode {node.nid} chunk {i} c_blk_addr",
                off + 4,
                f"{u_off}+{u_size} beyond blob size {blob.uncompressed_size}",
            )
        rec_off = self.chunk_index().find(blob.index, ci, u_off)
        if rec_off < 0:
            return FileChunk(
                file_off,
                blob.index,
                blob.blob_id,
                ci,
                u_off,
                u_size,
                None,
                None,
                None,
                None,
                blob.compressor,
            )
        info = RafsChunkInfo.unpack(self._buf, rec_off)
        if info.uncompressed_size != u_size:
            raise format_error(
                "chunk table uncompressed_size",
                rec_off + 44,
                f"{info.uncompressed_size} but file geometry says {u_size}",
            )
        compressed = info.is_compressed
        if (
            blob.compressed_size
            and info.compressed_offset + info.compressed_size > blob.compressed_size
            and not info.flags & ChunkFlags.BATCH
        ):
            raise format_error(
                "chunk table compressed range",
                rec_off + 40,
                f"ends beyond blob compressed size {blob.compressed_size}",
            )
        return FileChunk(
            file_off,
            blob.index,
            blob.blob_id,
            ci,
            u_off,
            u_size,
            info.compressed_offset,
            info.compressed_size,
            info.digest,
            compressed,
            blob.compressor,
            info.flags,
            info.crc32,
        )

    def chunk_index(self) -> ChunkIndex:
        """The chunk table indexed by (blob index, chunk index), built on first use."""
        index = self._chunk_index
        if index is None:
            with self._chunk_index_lock:
                if self._chunk_index is None:
                    ext = self.ext_superblock
                    self._chunk_index = ChunkIndex(
                        self._buf,
                        ext.chunk_table_offset,
                        ext.chunk_table_size,
                        [b.chunk_count for b in self.blobs],
                    )
                index = self._chunk_index
        return index

    def chunk_record(self, blob_index: int, index: int) -> RafsChunkInfo | None:
        off = self.chunk_index().find(blob_index, index)
        return None if off < 0 else RafsChunkInfo.unpack(self._buf, off)

    def blob_layout(self, blob_index: int) -> BlobLayout:
        """Blob ``blob_index``'s chunks by uncompressed offset and where its files begin
        (``chunkindex.blob_layout``, or the chunk index's arrays when they are in order),
        decoded at the first call for it, then kept."""
        layout = self._blob_layouts.get(blob_index)
        if layout is None:
            index = self.chunk_index()  # every read needs it: its arrays save a sort
            with self._chunk_index_lock:
                layout = self._blob_layouts.get(blob_index)
                if layout is None:
                    ext = self.ext_superblock
                    where = (self._buf, ext.chunk_table_offset, ext.chunk_table_size, blob_index)
                    layout = index.layout(*where) or blob_layout(*where)
                    self._blob_layouts[blob_index] = layout
        return layout

    def chunk_table(self) -> Iterator[RafsChunkInfo]:
        """All records of the bootstrap chunk table, in on-disk order."""
        ext = self.ext_superblock
        for i in range(ext.chunk_table_size // RAFS_V6_CHUNK_INFO_SIZE):
            yield RafsChunkInfo.unpack(
                self._buf, ext.chunk_table_offset + i * RAFS_V6_CHUNK_INFO_SIZE
            )
