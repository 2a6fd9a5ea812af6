"""RAFS v6 bootstrap writer: lay out a :class:`~pynydus.rafs.builder.tree.Tree` as an EROFS image.

The output is an EROFS image with chunk-based regular files and a device table,
plus the RAFS tables nydusd needs (ext superblock, blob table, prefetch table,
chunk table), in the file map of spec §1.1::

    0      zero | 1024 EROFS sb | 1152 RAFS ext sb | 1408 device slots
    4 KiB  blob table | prefetch table            (4 KiB aligned)
    meta   4 KiB left empty (so the root nid is 128) | inodes ...   (s_meta_blkaddr)
           full directory / symlink blocks
           chunk table (80 B per distinct (digest, blob))
           padding to 4 KiB

Layout runs in two passes. Pass 1 places every inode (32-byte slots; inode +
inline xattrs + inline tail never cross a 4 KiB block, which EROFS requires for
inline data) in breadth-first directory order: a directory's inode, then its
non-directory children, then the next directory. It also reserves the full dirent
blocks and long-symlink blocks in a data area after the inodes. Dirent block
*sizes* depend only on names, so nothing in pass 1 needs a nid. Pass 1 also
encodes every inode whose bytes are known once it is placed (regular files,
inline symlinks, special files: the bulk of an image), so each is visited once.
Pass 2 knows every nid and encodes the directories (their dirents name children
placed later) and the block symlinks. Regular-file chunk index arrays follow the
inode (8-byte aligned) and may span blocks; the kernel reads each 8-byte index on
its own. The hot paths pack with the layout structs' precompiled codecs instead
of building a value per inode or chunk.

Inodes are extended (64 B) by default: a compact inode has no mtime, and nydusd
reports rdev 0 and its own clock for it (spec §1.8, §9). ``compact_inodes=True``
uses a compact inode only where that loses nothing for the kernel: ids/nlink fit in
16 bits, size in 32 bits, no rdev, and the mtime equals the superblock build time
(chosen as the most common mtime of the tree).
"""

from __future__ import annotations

import collections
import os
import stat
import struct
import tempfile
from bisect import insort
from collections.abc import Callable
from dataclasses import dataclass

from pynydus.errors import InvalidArgument
from pynydus.rafs.builder.blobwriter import BlobDesc, ChunkDesc
from pynydus.rafs.builder.tree import Inode, Node, Tree
from pynydus.rafs.format import Compressor, Digester
from pynydus.rafs.format import layout as L

__all__ = [
    "ALIGN",
    "BootstrapInfo",
    "HeadLayout",
    "V6Options",
    "atomic_write",
    "dir_block_sizes",
    "write_bootstrap",
    "write_heads",
]

ALIGN = 4096  # tables and the meta area stay 4 KiB aligned for every block size
_SEG_ALIGN = 512 * 1024  # mapped_blkaddr alignment of HEAD builders (spec §1.4)


@dataclass(frozen=True)
class V6Options:
    """Knobs of the bootstrap that are not in the tree.

    ``prefetch`` lists normalized paths (``b""`` = root = "prefetch everything");
    unknown paths are ignored, as upstream does for ``--prefetch-policy fs``.
    """

    chunk_size: int = L.RAFS_DEFAULT_CHUNK_SIZE
    compressor: Compressor = Compressor.NONE
    digester: Digester = Digester.BLAKE3
    explicit_uidgid: bool = True
    compact_inodes: bool = False
    prefetch: tuple[bytes, ...] = ()
    # 512 for tarfs (the blob is the raw tar, addressed in tar records), else 4096.
    block_size: int = L.EROFS_BLOCK_SIZE_4096
    tarfs: bool = False


@dataclass(frozen=True)
class BootstrapInfo:
    """What was written: sizes and counts for the build report."""

    size: int
    inodes: int
    root_nid: int
    meta_blkaddr: int
    chunk_table_entries: int
    blob_ids: tuple[str, ...]
    prefetch_nids: tuple[int, ...]


_S_IFMT = 0o170000
_S_IFREG = stat.S_IFREG
_CHUNK_BASED = L.EROFS_INODE_CHUNK_BASED
_EXT = L.RafsV6InodeExtended.codec()
_COMPACT = L.RafsV6InodeCompact.codec()
_DIRENT = L.RafsV6Dirent.codec()
_CHUNK_ADDR = L.RafsV6InodeChunkAddr.codec()
_CHUNK_INFO = L.RafsChunkInfo.codec()
_DIR_FT = int(L.FileType.DIR)
_FILE_TYPE = {
    m: int(L.file_type_of_mode(m))
    for m in (
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
    )
}
_MAX_XATTRS = L.xattr_ibody_size(0xFFFF)
# The chunk table's key and order: digest (as the record stores it, 32 bytes), blob
# index, chunk index, big-endian, so that sorting the keys as bytes (several times
# faster than sorting tuples of them) gives the table's order; byte 32 is the blob index.
_TABLE_KEY = struct.Struct(">32sBI")


@dataclass(slots=True, eq=False)
class _Deferred:
    """An inode pass 1 placed but could not encode: a directory (its dirents need
    nids placed later) or a symlink stored in data blocks (it needs the data area's
    block address)."""

    inode: Inode
    parent: Inode  # of a directory; a symlink's own inode
    offset: int  # relative to the meta area start
    extended: bool
    xattrs: bytes
    layout: int
    size: int  # i_size: dirent bytes, or the symlink target length
    inline_size: int = 0
    data_blocks: int = 0  # full blocks in the data area
    data_first: int = 0  # index into the data area
    children: dict[bytes, Node] | None = None  # of a directory
    names: list[bytes] | None = None  # dirent names, ``.`` and ``..`` included
    block_ends: list[int] | None = None  # index in ``names`` where each dirent block ends


def dir_block_sizes(names: list[bytes], bs: int) -> list[int]:
    """Used bytes per dirent block, splitting exactly like ``layout.pack_dir_blocks``."""
    sizes: list[int] = []
    used = 0
    for name in names:
        need = L.EROFS_DIRENT_SIZE + len(name)
        if used + need > bs:
            sizes.append(used)
            used = 0
        used += need
    sizes.append(used)
    return sizes


def _link_counts(tree: Tree) -> list[tuple[Node, Node, list[Node]]]:
    """Set every inode's nlink (as :meth:`Tree.finalize` does) and return the
    directories breadth first as (dir, parent, children sorted by name).

    One walk serves both, so the writer sorts each directory once.
    """
    root = tree.root
    root.inode.nlink = 2
    order: list[tuple[Node, Node, list[Node]]] = []
    leaves: list[Inode] = []
    queue: list[tuple[Node, Node]] = [(root, root)]
    for d, parent in queue:  # grows while it is read: breadth first
        kids = d.children
        assert kids is not None
        ordered = [kids[k] for k in sorted(kids)]
        order.append((d, parent, ordered))
        for c in ordered:
            if c.children is not None:
                c.inode.nlink = 2
                queue.append((c, d))
            else:
                leaves.append(c.inode)
    # Counting starts only after every inode was reset: an inode may have several names.
    for inode in leaves:
        inode.nlink = 0
    for _, parent, _ in order[1:]:
        parent.inode.nlink += 1
    for inode in leaves:
        inode.nlink += 1
    return order


class _Planner:
    """Pass 1: place every inode and encode the ones whose bytes need no later nid.

    Regular files, inline symlinks and special files are encoded into ``meta`` (the
    meta area, offsets relative to its start) as they are placed; directories and
    block symlinks are recorded in ``deferred`` for pass 2. Assigns ``nid``/``ino``.
    """

    def __init__(self, tree: Tree, opts: V6Options, blob_index: Callable[[ChunkDesc], int]) -> None:
        self.tree = tree
        self.opts = opts
        self.blob_index = blob_index
        self.bs = opts.block_size
        self.compact = opts.compact_inodes
        self.chunk_size = opts.chunk_size
        self.chunk_fmt = L.chunk_format(
            opts.chunk_size.bit_length() - 1, opts.block_size.bit_length() - 1
        )
        self.meta = bytearray()
        self.pos = ALIGN  # first 4 KiB of the meta area stays empty: root nid 128
        self.inodes = 0
        self.data_blocks = 0
        self.deferred: list[_Deferred] = []
        self.placed: set[int] = set()  # id() of placed inodes (hardlinks are placed once)
        # Chunk table: one record per distinct (digest, blob, chunk index), first
        # reference wins, keyed by _TABLE_KEY. (digest, blob) is unique for
        # deduplicated blobs; tarfs repeats digests.
        self.chunks: dict[bytes, ChunkDesc] = {}
        self.has_xattr = False
        self._last_blob: BlobDesc | None = None  # blob_index's last answer
        self._last_bi = 0
        self.build_time = (0, 0)
        if opts.compact_inodes:
            counts = collections.Counter(
                (n.inode.mtime, n.inode.mtime_nsec) for _, n in tree.walk()
            )
            self.build_time = counts.most_common(1)[0][0]

    def plan(self) -> None:
        placed = self.placed
        place_leaf = self._place_leaf
        # Regular files without xattrs in extended inodes, the bulk of an image, are
        # placed and encoded right here (what _place_leaf, _slot and _append_chunk_indexes
        # do for them, without the calls).
        fast = not self.compact
        bs = self.bs
        meta = self.meta
        chunk_size = self.chunk_size
        pack_ext = _EXT.pack
        layout_word = L.EROFS_INODE_LAYOUT_EXTENDED | _CHUNK_BASED << 1
        u = self.chunk_fmt
        append_indexes = self._append_chunk_indexes
        for d, parent, kids in _link_counts(self.tree):
            self._place_dir(d, parent, kids)
            for child in kids:
                if child.children is not None:
                    continue
                inode = child.inode
                key = id(inode)
                if key in placed:
                    continue
                if not fast or inode.xattrs or inode.mode & _S_IFMT != _S_IFREG:
                    place_leaf(inode)
                    continue
                chunks = inode.chunks
                size = inode.size
                if -(-size // chunk_size) != len(chunks):
                    raise InvalidArgument(
                        f"regular file of {size} bytes has {len(chunks)} chunks"
                    )
                # 64-byte inode, no tail: it crosses a block only from the block's last slot.
                pos = (self.pos + 31) & ~31
                if pos % bs + 64 > bs:
                    pos = (pos + bs - 1) // bs * bs
                self.pos = pos + 64 + 8 * len(chunks)
                self.inodes = ino = self.inodes + 1
                inode.ino = ino
                inode.nid = pos // L.EROFS_INODE_SLOT_SIZE
                placed.add(key)
                if pos > len(meta):
                    meta += bytes(pos - len(meta))
                try:
                    meta += pack_ext(layout_word, 0, inode.mode, size, u, ino, inode.uid,
                                     inode.gid, inode.mtime, inode.mtime_nsec, inode.nlink)
                except struct.error:
                    meta += _pack_inode(inode, True, _CHUNK_BASED, 0, size, u)  # raises
                if chunks:
                    append_indexes(meta, chunks)

    def _compact_ok(self, i: Inode) -> bool:
        return (
            self.opts.compact_inodes
            and i.uid <= 0xFFFF
            and i.gid <= 0xFFFF
            and i.nlink <= 0xFFFF
            and i.size <= 0xFFFF_FFFF
            and not (stat.S_ISCHR(i.mode) or stat.S_ISBLK(i.mode))
            and (i.mtime, i.mtime_nsec) == self.build_time
        )

    def _xattrs(self, inode: Inode) -> bytes:
        if not inode.xattrs:
            return b""
        xattrs = L.pack_v6_xattrs(sorted(inode.xattrs.items()))
        if len(xattrs) > _MAX_XATTRS:
            raise InvalidArgument(f"inode with {len(xattrs)} bytes of xattrs (max ~256 KiB)")
        self.has_xattr = True
        return xattrs

    def _slot(self, inode: Inode, head: int, tail: int, extra: int) -> int:
        """Reserve the next slot: ``head`` (inode + xattrs) and ``tail`` (inline data)
        in one block, ``extra`` (chunk indexes) may run on. Returns the offset."""
        # Inline data must end in the inode's block (the kernel rejects a tail that
        # crosses); we also keep inode + xattrs in one block whenever they fit one.
        bs = self.bs
        pos = (self.pos + 31) & ~31
        if pos % bs + head + tail > bs and head + tail <= bs:
            pos = L.align_up(pos, bs)
        self.pos = pos + head + tail + extra
        self.inodes += 1
        inode.ino = self.inodes
        inode.nid = pos // L.EROFS_INODE_SLOT_SIZE
        self.placed.add(id(inode))
        return pos

    def _place_dir(self, node: Node, parent: Node, kids: list[Node]) -> None:
        inode = node.inode
        bs = self.bs
        extended = not (self.opts.compact_inodes and self._compact_ok(inode))
        xattrs = self._xattrs(inode)
        head = (64 if extended else 32) + len(xattrs)
        names = [c.name for c in kids]
        insort(names, b".")
        insort(names, b"..")
        ends: list[int] = []
        used = 0
        for i, name in enumerate(names):
            n = len(name)
            if not 0 < n <= L.EROFS_NAME_LEN or b"\0" in name:
                raise ValueError(f"dirent name {name!r} is empty, too long or contains NUL")
            if used + 12 + n > bs:
                ends.append(i)
                used = 0
            used += 12 + n
        ends.append(len(names))
        size = (len(ends) - 1) * bs + used
        tail = size % bs
        if tail and head + tail <= bs:
            s = _Deferred(inode, parent.inode, 0, extended, xattrs, L.EROFS_INODE_FLAT_INLINE, size)
            s.inline_size = tail
            s.data_blocks = size // bs
        else:
            s = _Deferred(inode, parent.inode, 0, extended, xattrs, L.EROFS_INODE_FLAT_PLAIN, size)
            s.data_blocks = -(-size // bs)
        s.children, s.names, s.block_ends = node.children, names, ends
        s.offset = self._slot(inode, head, s.inline_size, 0)
        self._reserve_data(s)

    def _reserve_data(self, s: _Deferred) -> None:
        if s.data_blocks:
            s.data_first = self.data_blocks
            self.data_blocks += s.data_blocks
        self.deferred.append(s)

    def _place_leaf(self, inode: Inode) -> None:
        mode = inode.mode
        typ = mode & _S_IFMT
        extended = not (self.compact and self._compact_ok(inode))
        xattrs = self._xattrs(inode) if inode.xattrs else b""
        head = (64 if extended else 32) + len(xattrs)
        chunks = inode.chunks
        tail = b""
        pad = 0
        u = 0
        if typ == _S_IFREG:
            layout = _CHUNK_BASED
            n_chunks = -(-inode.size // self.chunk_size)
            if n_chunks != len(chunks):
                raise InvalidArgument(
                    f"regular file of {inode.size} bytes has {len(chunks)} chunks"
                )
            u = self.chunk_fmt
            pad = -head & 7  # chunk indexes are 8-byte aligned
            extra = pad + 8 * n_chunks
        else:
            if chunks:
                raise InvalidArgument(f"inode of mode 0o{mode:o} has chunks")
            layout = L.EROFS_INODE_FLAT_PLAIN
            extra = 0
            if typ == stat.S_IFLNK:
                link = inode.link
                n = len(link)
                if not 0 < n <= L.RAFS_MAX_SYMLINK:
                    raise InvalidArgument(f"symlink target of {n} bytes (must be 1..4096)")
                if head + n > self.bs:
                    s = _Deferred(inode, inode, 0, extended, xattrs, layout, inode.size)
                    s.data_blocks = -(-n // self.bs)  # several blocks with 512-byte blocks
                    s.offset = self._slot(inode, head, 0, 0)
                    self._reserve_data(s)
                    return
                layout = L.EROFS_INODE_FLAT_INLINE
                tail = link
            elif typ == stat.S_IFCHR or typ == stat.S_IFBLK:
                u = inode.rdev
        pos = self._slot(inode, head, len(tail), extra)
        meta = self.meta
        if pos > len(meta):
            meta += bytes(pos - len(meta))
        meta += _pack_inode(inode, extended, layout, len(xattrs), inode.size, u)
        meta += xattrs
        if tail:
            meta += tail
        if chunks:
            if pad:
                meta += bytes(pad)
            self._append_chunk_indexes(meta, chunks)

    def _append_chunk_indexes(self, meta: bytearray, chunks: list[ChunkDesc]) -> None:
        """Append the 8-byte chunk indexes of ``chunks`` to ``meta`` and enter each
        chunk in the chunk table."""
        table = self.chunks
        bs = self.bs
        pack_key = _TABLE_KEY.pack
        for c in chunks:
            blob = c.blob
            if blob is self._last_blob:  # most chunks of an image are in one blob
                bi = self._last_bi
            else:
                bi = self._last_bi = self.blob_index(c)
                self._last_blob = blob
            ci = c.ci_index
            if not 0 <= ci < L.RAFS_MAX_CHUNKS_PER_BLOB:
                raise ValueError(f"chunk index {ci} out of range")
            key = pack_key(c.digest, bi, ci)
            if key not in table:
                table[key] = c
            try:
                # device id = blob index + 1; bits 16..23 of the index above it
                meta += _CHUNK_ADDR.pack(
                    ci & 0xFFFF, (ci >> 16) << 8 | (bi + 1), c.uncompressed_offset // bs
                )
            except struct.error as err:
                raise ValueError(f"chunk at {c.uncompressed_offset}: cannot index: {err}") from err


def _pack_inode(
    inode: Inode, extended: bool, layout: int, xattr_len: int, size: int, u: int
) -> bytes:
    """The 64- or 32-byte EROFS inode record of ``inode``."""
    icount = (xattr_len - L.EROFS_XATTR_IBODY_HEADER_SIZE) // 4 + 1 if xattr_len else 0
    try:
        if extended:
            return _EXT.pack(
                L.EROFS_INODE_LAYOUT_EXTENDED | layout << 1,
                icount,
                inode.mode,
                size,
                u,
                inode.ino,
                inode.uid,
                inode.gid,
                inode.mtime,
                inode.mtime_nsec,
                inode.nlink,
            )
        return _COMPACT.pack(
            L.EROFS_INODE_LAYOUT_COMPACT | layout << 1,
            icount,
            inode.mode,
            inode.nlink,
            size,
            0,
            u,
            inode.ino,
            inode.uid,
            inode.gid,
        )
    except struct.error as err:
        kind = "RafsV6InodeExtended" if extended else "RafsV6InodeCompact"
        raise ValueError(
            f"{kind}: cannot pack inode {inode.ino} (mode 0o{inode.mode:o}, uid {inode.uid}, "
            f"gid {inode.gid}, size {size}, mtime {inode.mtime}): {err}"
        ) from err


@dataclass(frozen=True)
class HeadLayout:
    """Where the tables before the meta area go, given the blob and prefetch counts."""

    blob_table_offset: int
    blob_table_size: int
    prefetch_offset: int
    prefetch_size: int
    meta_base: int  # byte offset of the meta area (4 KiB aligned)

    @classmethod
    def of(cls, n_blobs: int, n_prefetch: int) -> HeadLayout:
        devt_end = L.RAFS_V6_DEVTABLE_OFFSET + n_blobs * L.EROFS_DEVT_SLOT_SIZE
        blob_tbl_off = L.align_up(devt_end, ALIGN)
        blob_tbl_size = n_blobs * L.RAFS_V6_BLOB_ENTRY_SIZE
        pf_off = blob_tbl_off + blob_tbl_size
        pf_size = 4 * n_prefetch
        return cls(blob_tbl_off, blob_tbl_size, pf_off, pf_size, L.align_up(pf_off + pf_size, ALIGN))


def write_heads(
    buf: bytearray,
    blobs: list[BlobDesc],
    opts: V6Options,
    heads: HeadLayout,
    *,
    root_nid: int,
    inos: int,
    build_time: tuple[int, int],
    chunk_table: tuple[int, int],
    has_xattr: bool,
) -> None:
    """Fill in the superblocks, device slots and blob table of a laid-out image.

    ``buf`` is the whole image (its length is where the blobs' mapped block
    addresses start); ``chunk_table`` is (offset, size), (0, 0) when empty.
    Raises InvalidArgument for a blob the device table cannot describe.
    """
    bs = opts.block_size
    mapped = len(buf)
    blocks_total = 0
    all_digest = True
    for i, b in enumerate(blobs):
        if len(b.blob_id) != L.BLOB_ID_LEN:
            raise InvalidArgument(f"blob id {b.blob_id!r} is not 64 hex characters")
        if b.uncompressed_size % bs or not b.uncompressed_size:
            raise InvalidArgument(
                f"blob {b.blob_id}: uncompressed size not a non-zero multiple of {bs}"
            )
        cnt = b.uncompressed_size // bs
        maddr = L.align_up(mapped, _SEG_ALIGN) // bs
        mapped = (maddr + cnt) * bs
        blocks_total += cnt
        all_digest &= bool(b.features & L.BlobFeatures.INLINED_CHUNK_DIGEST)
        off = L.RAFS_V6_DEVTABLE_OFFSET + i * L.EROFS_DEVT_SLOT_SIZE
        buf[off : off + L.EROFS_DEVT_SLOT_SIZE] = L.RafsV6Device(
            b.blob_id.encode(), cnt, maddr
        ).pack()
        off = heads.blob_table_offset + i * L.RAFS_V6_BLOB_ENTRY_SIZE
        buf[off : off + L.RAFS_V6_BLOB_ENTRY_SIZE] = _blob_entry(b, i).pack()

    flags = (
        L.compressor_flag(opts.compressor)
        | L.digester_flag(opts.digester)
        | int(L.SuperFlags.ENCRYPTION_NONE)
    )
    if opts.explicit_uidgid:
        flags |= int(L.SuperFlags.EXPLICIT_UID_GID)
    if has_xattr:
        flags |= int(L.SuperFlags.HAS_XATTR)
    if all_digest:
        flags |= int(L.SuperFlags.INLINED_CHUNK_DIGEST)
    if opts.tarfs:
        flags |= int(L.SuperFlags.TARTFS_MODE)

    sb = L.RafsV6SuperBlock(
        root_nid=root_nid,
        blkszbits=bs.bit_length() - 1,
        inos=inos,
        build_time=build_time[0],
        build_time_nsec=build_time[1],
        blocks=blocks_total,
        meta_blkaddr=heads.meta_base // bs,
        extra_devices=len(blobs),
    )
    buf[L.EROFS_SUPER_OFFSET : L.EROFS_SUPER_OFFSET + sb.SIZE] = sb.pack()
    ext = L.RafsV6SuperBlockExt(
        flags=flags,
        blob_table_offset=heads.blob_table_offset,
        blob_table_size=heads.blob_table_size,
        chunk_size=opts.chunk_size,
        chunk_table_offset=chunk_table[0],
        chunk_table_size=chunk_table[1],
        prefetch_table_offset=heads.prefetch_offset if heads.prefetch_size else 0,
        prefetch_table_size=heads.prefetch_size,
    )
    buf[L.RAFS_V6_EXT_SUPER_OFFSET : L.RAFS_V6_EXT_SUPER_OFFSET + ext.SIZE] = ext.pack()


def write_bootstrap(
    tree: Tree, blobs: list[BlobDesc], out_path: str | os.PathLike[str], opts: V6Options
) -> BootstrapInfo:
    """Write ``tree`` as a RAFS v6 bootstrap to ``out_path`` (atomically, via rename).

    ``blobs`` is the blob table in order; every chunk of the tree must reference one
    of them (by identity or blob id). Assigns ``nid``/``ino`` on the tree's inodes
    and sets their ``nlink`` (as :meth:`Tree.finalize`). Raises
    :class:`InvalidArgument` when the tree cannot be represented. Costs one walk
    of the tree and one encoding of each inode; the same tree and options give
    byte-identical output.
    """
    blob_ids: dict[int, int] = {id(b): i for i, b in enumerate(blobs)}
    by_id: dict[str, int] = {b.blob_id: i for i, b in enumerate(blobs)}
    if len(by_id) != len(blobs):
        raise InvalidArgument("blob table has duplicate blob ids")
    if len(blobs) > 254:
        raise InvalidArgument(f"{len(blobs)} blobs: RAFS v6 supports at most 254")

    def index_of(c: ChunkDesc) -> int:
        blob = c.blob
        i = blob_ids.get(id(blob))
        if i is None:
            i = by_id.get(blob.blob_id)
            if i is None:
                raise InvalidArgument(f"chunk references blob {blob.blob_id!r} not in blob table")
            blob_ids[id(blob)] = i  # the chunk keeps ``blob`` alive, so its id stays its own
        return i

    planner = _Planner(tree, opts, index_of)
    planner.plan()

    # Prefetch nids are known only after planning; their count is known now.
    pf_nodes: list[Node] = []
    for p in opts.prefetch:
        n = tree.lookup(p)
        if n is not None and all(n is not q for q in pf_nodes):
            pf_nodes.append(n)

    bs = opts.block_size
    heads = HeadLayout.of(len(blobs), len(pf_nodes))
    pf_off, pf_size, meta_base = heads.prefetch_offset, heads.prefetch_size, heads.meta_base
    meta_blkaddr = meta_base // bs
    data_base = L.align_up(meta_base + planner.pos, bs)

    root_nid = tree.root.inode.nid
    if root_nid > 0xFFFF:
        raise InvalidArgument(f"root nid {root_nid} does not fit the superblock")

    # Chunk table: one record per distinct (digest, blob), sorted like upstream
    # (by digest, blob index, chunk index: the order of the keys' bytes).
    table = planner.chunks
    chunk_keys = sorted(table)
    chunk_tbl_off = L.align_up(data_base + planner.data_blocks * bs, ALIGN)
    chunk_tbl_size = len(chunk_keys) * L.RAFS_V6_CHUNK_INFO_SIZE
    total = L.align_up(chunk_tbl_off + chunk_tbl_size, ALIGN)
    if not chunk_keys:
        chunk_tbl_off = 0
        total = L.align_up(data_base + planner.data_blocks * bs, ALIGN)

    buf = bytearray(meta_base)
    buf += planner.meta
    buf += bytes(total - len(buf))
    for s in planner.deferred:
        _write_deferred(buf, s, meta_base, data_base // bs, bs)

    pos = chunk_tbl_off
    pack_chunk = _CHUNK_INFO.pack_into
    flag_compressed = int(L.ChunkFlags.COMPRESSED)
    for key in chunk_keys:
        c = table[key]
        try:
            pack_chunk(
                buf,
                pos,
                c.digest,
                key[32],
                flag_compressed if c.compressed else 0,
                c.compressed_size,
                c.uncompressed_size,
                c.compressed_offset,
                c.uncompressed_offset,
                c.file_offset,
                c.ci_index,
                0,
            )
        except struct.error as err:
            raise ValueError(f"RafsChunkInfo: cannot pack {c!r}: {err}") from err
        pos += L.RAFS_V6_CHUNK_INFO_SIZE

    # Prefetch table.
    pf_nids = tuple(n.inode.nid for n in pf_nodes)
    buf[pf_off : pf_off + pf_size] = L.pack_u32_array(pf_nids)

    write_heads(
        buf,
        blobs,
        opts,
        heads,
        root_nid=root_nid,
        inos=planner.inodes,
        build_time=planner.build_time,
        chunk_table=(chunk_tbl_off, chunk_tbl_size),
        has_xattr=planner.has_xattr,
    )

    atomic_write(os.fspath(out_path), buf)
    return BootstrapInfo(
        size=total,
        inodes=planner.inodes,
        root_nid=root_nid,
        meta_blkaddr=meta_blkaddr,
        chunk_table_entries=len(chunk_keys),
        blob_ids=tuple(b.blob_id for b in blobs),
        prefetch_nids=pf_nids,
    )


def _blob_entry(b: BlobDesc, index: int) -> L.RafsV6Blob:
    return L.RafsV6Blob(
        blob_id=b.blob_id.encode(),
        blob_index=index,
        chunk_size=b.chunk_size,
        chunk_count=b.chunk_count,
        compression_algo=int(b.compressor),
        digest_algo=int(b.digester),
        features=b.features,
        compressed_size=b.compressed_size,
        uncompressed_size=b.uncompressed_size,
        blob_toc_size=b.blob_toc_size,
        ci_compressor=int(b.ci_compressor),
        ci_offset=b.ci_offset,
        ci_compressed_size=b.ci_compressed_size,
        ci_uncompressed_size=b.ci_uncompressed_size,
        blob_toc_digest=b.blob_toc_digest,
        blob_meta_digest=b.blob_meta_digest,
        blob_meta_size=b.blob_meta_size,
        cipher_iv=b.cipher_iv,
        cipher_algo=b.cipher_algo,
    )


def _write_deferred(buf: bytearray, s: _Deferred, meta_base: int, data_blk0: int, bs: int) -> None:
    """Pass 2: encode a directory (dirents, now that every nid is known) or a block
    symlink (now that the data area's address is known) into the image ``buf``."""
    inode = s.inode
    off = meta_base + s.offset
    head = (64 if s.extended else 32) + len(s.xattrs)
    u = data_blk0 + s.data_first if s.data_blocks else 0
    if s.names is None:
        buf[u * bs : u * bs + len(inode.link)] = inode.link
    else:
        _write_dirents(buf, s, u * bs if s.data_blocks else 0, off + head, bs)
    buf[off : off + head] = (
        _pack_inode(inode, s.extended, s.layout, len(s.xattrs), s.size, u) + s.xattrs
    )


def _write_dirents(buf: bytearray, s: _Deferred, data_at: int, inline_at: int, bs: int) -> None:
    """Dirent blocks of directory ``s``: full blocks from ``data_at`` on, the last one
    at ``inline_at`` when it is inline. Each block holds its 12-byte dirents, then
    their names unterminated; the rest stays zero (``buf`` comes zeroed)."""
    names, ends, kids = s.names, s.block_ends, s.children
    assert names is not None and ends is not None and kids is not None
    self_nid = s.inode.nid
    parent_nid = s.parent.nid
    file_type = _FILE_TYPE
    pack_into = _DIRENT.pack_into
    start = 0
    last = len(ends) - 1
    for k, end in enumerate(ends):
        p = inline_at if k == last and s.inline_size else data_at + k * bs
        block = names[start:end]
        nameoff = 12 * len(block)
        q = p + nameoff
        for name in block:
            if name == b".":
                pack_into(buf, p, self_nid, nameoff, _DIR_FT)
            elif name == b"..":
                pack_into(buf, p, parent_nid, nameoff, _DIR_FT)
            else:
                child = kids[name].inode
                pack_into(buf, p, child.nid, nameoff, file_type.get(child.mode & _S_IFMT, 0))
            p += 12
            nameoff += len(name)
        joined = b"".join(block)
        buf[q : q + len(joined)] = joined
        start = end
    assert last * bs + nameoff == s.size, "dirent sizing drift"


def atomic_write(path: str, data: bytes | bytearray) -> None:
    """Write ``data`` to ``path`` through a temp file in its directory, fsync and rename."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bootstrap-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
