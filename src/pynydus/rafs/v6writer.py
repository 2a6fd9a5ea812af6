"""RAFS v6 bootstrap writer: lay out a :class:`~pynydus.rafs.tree.Tree` as an EROFS image.

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
*sizes* depend only on names, so nothing in pass 1 needs a nid. Pass 2 knows every
nid and encodes the bytes. Regular-file chunk index arrays follow the inode
(8-byte aligned) and may span blocks; the kernel reads each 8-byte index on its own.

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
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pynydus.errors import InvalidArgument
from pynydus.rafs import layout as L
from pynydus.rafs.chunker import BlobDesc, ChunkRef
from pynydus.rafs.compress import Compressor, Digester
from pynydus.rafs.tree import Inode, Node, Tree

__all__ = ["BootstrapInfo", "HeadLayout", "V6Options", "write_bootstrap", "write_heads"]

ALIGN = 4096  # tables and the meta area stay 4 KiB aligned for every block size
_SEG_ALIGN = 512 * 1024  # mapped_blkaddr alignment of HEAD builders (spec §1.4)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


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


@dataclass(slots=True, eq=False)
class _Slot:
    inode: Inode
    node: Node
    offset: int = 0  # relative to the meta area start
    extended: bool = True
    xattrs: bytes = b""
    layout: int = L.EROFS_INODE_FLAT_PLAIN
    inline_size: int = 0
    data_blocks: int = 0  # full blocks in the data area
    data_first: int = 0  # index into the data area
    dir_size: int = 0
    parent: Node | None = None  # directories only

    @property
    def isize(self) -> int:
        return L.RafsV6InodeExtended.SIZE if self.extended else L.RafsV6InodeCompact.SIZE


def _dir_names(node: Node) -> list[bytes]:
    assert node.children is not None
    return sorted([b".", b"..", *node.children])


def _dir_block_sizes(names: list[bytes], bs: int) -> list[int]:
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


class _Planner:
    def __init__(self, tree: Tree, opts: V6Options) -> None:
        self.tree = tree
        self.opts = opts
        self.slots: list[_Slot] = []
        self.by_inode: dict[int, _Slot] = {}
        self.bs = opts.block_size
        self.pos = ALIGN  # first 4 KiB of the meta area stays empty: root nid 128
        self.data_blocks = 0
        self.build_time = (0, 0)
        if opts.compact_inodes:
            counts = collections.Counter(
                (n.inode.mtime, n.inode.mtime_nsec) for _, n in tree.walk()
            )
            self.build_time = counts.most_common(1)[0][0]

    def plan(self) -> None:
        queue: deque[tuple[Node, Node]] = deque([(self.tree.root, self.tree.root)])
        while queue:
            d, parent = queue.popleft()
            self._place(d, parent)
            for child in d.sorted_children():
                if child.is_dir:
                    queue.append((child, d))
                elif id(child.inode) not in self.by_inode:
                    self._place(child)

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

    def _place(self, node: Node, parent: Node | None = None) -> None:
        inode = node.inode
        s = _Slot(inode, node, extended=not self._compact_ok(inode), parent=parent)
        s.xattrs = L.pack_v6_xattrs(sorted(inode.xattrs.items()))
        head = s.isize + len(s.xattrs)
        if len(s.xattrs) > L.xattr_ibody_size(0xFFFF):
            raise InvalidArgument(f"inode with {len(s.xattrs)} bytes of xattrs (max ~256 KiB)")
        tail_bytes = 0  # bytes that must sit in the inode's block
        extra = 0  # bytes after the inode that may run on (chunk indexes)
        if node.is_dir:
            sizes = _dir_block_sizes(_dir_names(node), self.bs)
            s.dir_size = (len(sizes) - 1) * self.bs + sizes[-1]
            tail = s.dir_size % self.bs
            if tail and head + tail <= self.bs:
                s.layout = L.EROFS_INODE_FLAT_INLINE
                s.inline_size = tail
                s.data_blocks = s.dir_size // self.bs
            else:
                s.layout = L.EROFS_INODE_FLAT_PLAIN
                s.data_blocks = _align(s.dir_size, self.bs) // self.bs
            tail_bytes = s.inline_size
        elif stat.S_ISLNK(inode.mode):
            n = len(inode.link)
            if not 0 < n <= L.RAFS_MAX_SYMLINK:
                raise InvalidArgument(f"symlink target of {n} bytes (must be 1..4096)")
            if head + n <= self.bs:
                s.layout = L.EROFS_INODE_FLAT_INLINE
                s.inline_size = n
            else:
                s.layout = L.EROFS_INODE_FLAT_PLAIN
                s.data_blocks = -(-n // self.bs)  # several blocks with 512-byte blocks
            tail_bytes = s.inline_size
        elif stat.S_ISREG(inode.mode):
            s.layout = L.EROFS_INODE_CHUNK_BASED
            n_chunks = -(-inode.size // self.opts.chunk_size)
            if n_chunks != len(inode.chunks):
                raise InvalidArgument(
                    f"regular file of {inode.size} bytes has {len(inode.chunks)} chunks"
                )
            extra = (_align(head, 8) - head) + 8 * n_chunks
        # Inline data must end in the inode's block (the kernel rejects a tail that
        # crosses); we also keep inode + xattrs in one block whenever they fit one.
        pos = _align(self.pos, L.EROFS_INODE_SLOT_SIZE)
        if pos % self.bs + head + tail_bytes > self.bs and head + tail_bytes <= self.bs:
            pos = _align(pos, self.bs)
        s.offset = pos
        self.pos = pos + head + tail_bytes + extra
        if s.data_blocks:
            s.data_first = self.data_blocks
            self.data_blocks += s.data_blocks
        self.slots.append(s)
        self.by_inode[id(inode)] = s


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
        blob_tbl_off = _align(devt_end, ALIGN)
        blob_tbl_size = n_blobs * L.RAFS_V6_BLOB_ENTRY_SIZE
        pf_off = blob_tbl_off + blob_tbl_size
        pf_size = 4 * n_prefetch
        return cls(blob_tbl_off, blob_tbl_size, pf_off, pf_size, _align(pf_off + pf_size, ALIGN))


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
        maddr = _align(mapped, _SEG_ALIGN) // bs
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
    of them (by identity or blob id). Assigns ``nid``/``ino`` on the tree's inodes.
    Raises :class:`InvalidArgument` when the tree cannot be represented.
    """
    tree.finalize()
    blob_index: dict[int, int] = {id(b): i for i, b in enumerate(blobs)}
    by_id: dict[str, int] = {b.blob_id: i for i, b in enumerate(blobs)}
    if len(by_id) != len(blobs):
        raise InvalidArgument("blob table has duplicate blob ids")
    if len(blobs) > 254:
        raise InvalidArgument(f"{len(blobs)} blobs: RAFS v6 supports at most 254")

    def index_of(c: ChunkRef) -> int:
        i = blob_index.get(id(c.blob))
        if i is None:
            i = by_id.get(c.blob.blob_id)
        if i is None:
            raise InvalidArgument(f"chunk references blob {c.blob.blob_id!r} not in blob table")
        return i

    planner = _Planner(tree, opts)
    planner.plan()
    slots = planner.slots

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
    data_base = _align(meta_base + planner.pos, bs)
    data_blk0 = data_base // bs

    for ino, s in enumerate(slots, start=1):
        s.inode.nid = s.offset // L.EROFS_INODE_SLOT_SIZE
        s.inode.ino = ino
    root_nid = tree.root.inode.nid
    if root_nid > 0xFFFF:
        raise InvalidArgument(f"root nid {root_nid} does not fit the superblock")

    # Chunk table: one record per distinct (digest, blob), sorted like upstream.
    table: dict[tuple[bytes, int, int], ChunkRef] = {}
    for s in slots:
        for c in s.inode.chunks:
            # (digest, blob) is unique for deduplicated blobs; tarfs repeats digests.
            table.setdefault((c.digest, index_of(c), c.ci_index), c)
    chunk_keys = sorted(table)
    chunk_tbl_off = _align(data_base + planner.data_blocks * bs, ALIGN)
    chunk_tbl_size = len(chunk_keys) * L.RAFS_V6_CHUNK_INFO_SIZE
    total = _align(chunk_tbl_off + chunk_tbl_size, ALIGN)
    if not chunk_keys:
        chunk_tbl_off = 0
        total = _align(data_base + planner.data_blocks * bs, ALIGN)

    buf = bytearray(total)
    blkszbits = bs.bit_length() - 1
    chunk_fmt = L.chunk_format(opts.chunk_size.bit_length() - 1, blkszbits)
    has_xattr = False
    for s in slots:
        has_xattr |= bool(s.xattrs)
        _write_inode(buf, s, meta_base, data_blk0, chunk_fmt, bs, index_of)

    # Chunk table.
    pos = chunk_tbl_off
    for key in chunk_keys:
        c = table[key]
        buf[pos : pos + L.RAFS_V6_CHUNK_INFO_SIZE] = L.RafsChunkInfo(
            digest=c.digest,
            blob_index=key[1],
            flags=int(L.ChunkFlags.COMPRESSED) if c.compressed else 0,
            compressed_size=c.compressed_size,
            uncompressed_size=c.uncompressed_size,
            compressed_offset=c.compressed_offset,
            uncompressed_offset=c.uncompressed_offset,
            file_offset=c.file_offset,
            index=c.ci_index,
        ).pack()
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
        inos=len(slots),
        build_time=planner.build_time,
        chunk_table=(chunk_tbl_off, chunk_tbl_size),
        has_xattr=has_xattr,
    )

    _atomic_write(os.fspath(out_path), buf)
    return BootstrapInfo(
        size=total,
        inodes=len(slots),
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


def _write_inode(
    buf: bytearray,
    s: _Slot,
    meta_base: int,
    data_blk0: int,
    chunk_fmt: int,
    bs: int,
    index_of: Callable[[ChunkRef], int],
) -> None:
    inode = s.inode
    off = meta_base + s.offset
    u = 0
    size = inode.size
    inline = b""
    if s.node.is_dir:
        size = s.dir_size
        node = s.node
        assert node.children is not None
        parent_nid = s.parent.inode.nid if s.parent is not None else inode.nid
        entries: list[tuple[bytes, int, int]] = []
        for name in _dir_names(node):
            if name == b".":
                entries.append((name, inode.nid, L.FileType.DIR))
            elif name == b"..":
                entries.append((name, parent_nid, L.FileType.DIR))
            else:
                child = node.children[name].inode
                entries.append((name, child.nid, L.file_type_of_mode(child.mode)))
        blocks = L.pack_dir_blocks(entries, bs)
        assert (len(blocks) - 1) * bs + len(blocks[-1]) == size, "dirent sizing drift"
        full = blocks[:-1] if s.inline_size else blocks
        if s.inline_size:
            inline = blocks[-1]
        if full:
            u = data_blk0 + s.data_first
            p = u * bs
            for blk in full:
                buf[p : p + len(blk)] = blk
                p += bs
    elif stat.S_ISLNK(inode.mode):
        if s.inline_size:
            inline = inode.link
        else:
            u = data_blk0 + s.data_first
            buf[u * bs : u * bs + len(inode.link)] = inode.link
    elif stat.S_ISREG(inode.mode):
        u = chunk_fmt
    elif stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode):
        u = inode.rdev
    fmt = L.inode_format(s.extended, s.layout)
    icount = L.xattr_icount_for(len(s.xattrs))
    if s.extended:
        raw = L.RafsV6InodeExtended(
            format=fmt,
            xattr_icount=icount,
            mode=inode.mode,
            size=size,
            u=u,
            ino=inode.ino,
            uid=inode.uid,
            gid=inode.gid,
            mtime=inode.mtime,
            mtime_nsec=inode.mtime_nsec,
            nlink=inode.nlink,
        ).pack()
    else:
        raw = L.RafsV6InodeCompact(
            format=fmt,
            xattr_icount=icount,
            mode=inode.mode,
            nlink=inode.nlink,
            size=size,
            u=u,
            ino=inode.ino,
            uid=inode.uid,
            gid=inode.gid,
        ).pack()
    body = raw + s.xattrs + inline
    buf[off : off + len(body)] = body
    if inode.chunks:
        p = off + _align(len(raw) + len(s.xattrs), 8)
        for c in inode.chunks:
            buf[p : p + 8] = L.RafsV6InodeChunkAddr.of(
                index_of(c),
                c.ci_index,
                c.uncompressed_offset // bs,
            ).pack()
            p += 8


def _atomic_write(path: str, data: bytes | bytearray) -> None:
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
