"""Write a merged skeleton (:mod:`pynydus.rafs.merge.skeleton`) as one RAFS v6 bootstrap.

The layout is exactly :func:`pynydus.rafs.builder.v6writer.write_bootstrap`'s (breadth first:
a directory's inode, then its non-directory children in name order; extended
inodes in 32-byte slots; inline tails kept in their block; full dirent blocks and
long symlinks after the inodes; then the chunk table), so for layers made by our
builder a merged image is byte for byte what the tree-based merge writes.

What is new is how leaves get there: a non-directory inode is *copied* from its
layer's bootstrap (inode, inline xattrs, chunk index array) and only the fields a
merge changes are rewritten in place: ``i_ino``, ``i_nlink``, ``i_u`` and, with one
``bytes.translate`` per file, the device id byte of each chunk index entry.
Directories, few next to files, are encoded from the skeleton once every nid is
known. A compact source inode is widened to an extended one. The image is built in
a single bytearray of its final size.
"""

from __future__ import annotations

import os
import stat
import struct
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pynydus.errors import InvalidArgument
from pynydus.rafs.builder import (
    BlobDesc,
    BootstrapInfo,
    Leaf,
    MergedDir,
    MergedTree,
    V6Options,
    find,
)
from pynydus.rafs.builder.v6writer import (
    ALIGN,
    HeadLayout,
    atomic_write,
    dir_block_sizes,
    write_heads,
)
from pynydus.rafs.format import layout as L
from pynydus.rafs.merge.chunktable import ChunkTable, LayerSource
from pynydus.rafs.read import BootstrapV6

__all__ = ["write_merged"]

_HEAD = struct.Struct("<HHH")  # i_format, i_xattr_icount, i_mode
# i_format, i_xattr_icount, i_mode, i_size, i_nlink of an extended inode
_REG_HEAD = struct.Struct("<HHH2xQ28xI")
_EXT_CHUNKED = L.inode_format(True, L.EROFS_INODE_CHUNK_BASED)
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_U_INO = struct.Struct("<II")  # i_u, i_ino at offset 16 of an extended inode
_EXT = L.RafsV6InodeExtended.SIZE
_S_IFMT, _S_IFREG, _S_IFLNK = 0o170000, stat.S_IFREG, stat.S_IFLNK
_FTYPE = {
    stat.S_IFREG: int(L.FileType.REG),
    stat.S_IFLNK: int(L.FileType.SYMLINK),
    stat.S_IFCHR: int(L.FileType.CHRDEV),
    stat.S_IFBLK: int(L.FileType.BLKDEV),
    stat.S_IFIFO: int(L.FileType.FIFO),
    stat.S_IFSOCK: int(L.FileType.SOCK),
}
_DIR_FT = int(L.FileType.DIR)
_REG_FT = int(L.FileType.REG)


@dataclass(slots=True, eq=False)
class _DirSlot:
    d: MergedDir
    parent: MergedDir
    offset: int
    ino: int
    xattrs: bytes
    layout: int
    inline_size: int
    data_first: int
    size: int
    names: list[bytes]  # sorted, without . and ..
    nids: array[int]  # per name: the leaf's nid, -1 for a subdirectory
    ftypes: bytearray  # per name: dirent file type


def write_merged(
    tree: MergedTree,
    layers: Sequence[LayerSource],
    blobs: list[BlobDesc],
    out_path: str | os.PathLike[str],
    opts: V6Options,
) -> tuple[BootstrapInfo, set[int]]:
    """Lay out and write the merged image (atomically, via rename); also returns the
    merged blob indexes that some chunk references.

    ``opts.block_size`` must be 4096, as every layer's. Raises InvalidArgument for a
    chunk without a chunk-table record (as the tree merge does) or an image RAFS v6
    cannot describe; FormatError for a malformed leaf inode.
    """
    bs = opts.block_size
    if bs != L.EROFS_BLOCK_SIZE_4096:
        raise InvalidArgument(f"merge on records writes 4096-byte blocks, not {bs}")
    root = tree.root
    prefetch = _prefetch_targets(root, opts.prefetch)
    heads = HeadLayout.of(len(blobs), len(prefetch))
    chunks = ChunkTable(opts.chunk_size)
    w = _Writer(layers, heads.meta_base, bs, opts.chunk_size, chunks, tree.linked)
    w.place_tree(root)
    img = w.img
    # Data area: full dirent blocks and long symlinks, right after the meta area.
    data_base = L.align_up(len(img), bs)
    data_blk0 = data_base // bs
    img += bytes(data_base - len(img) + w.data_blocks * bs)
    for slot in w.dirs:
        _encode_dir(img, slot, data_base, data_blk0, bs)
    for pos, first, link in w.long_links:
        _U32.pack_into(img, pos + 16, data_blk0 + first)
        img[data_base + first * bs : data_base + first * bs + len(link)] = link
    chunk_tbl_off = 0
    n_records = len(chunks)
    if n_records:
        chunk_tbl_off = L.align_up(len(img), ALIGN)
        img += bytes(chunk_tbl_off - len(img))
        chunks.emit(img)
    chunk_tbl_size = n_records * L.RAFS_V6_CHUNK_INFO_SIZE
    img += bytes(L.align_up(len(img), ALIGN) - len(img))
    pf_nids = _prefetch_nids(prefetch, w.dirs)
    img[heads.prefetch_offset : heads.prefetch_offset + heads.prefetch_size] = L.pack_u32_array(
        pf_nids
    )
    if root.nid > 0xFFFF:
        raise InvalidArgument(f"root nid {root.nid} does not fit the superblock")
    write_heads(
        img,
        blobs,
        opts,
        heads,
        root_nid=root.nid,
        inos=w.ino,
        build_time=(0, 0),
        chunk_table=(chunk_tbl_off, chunk_tbl_size),
        has_xattr=w.has_xattr,
    )
    atomic_write(os.fspath(out_path), img)
    info = BootstrapInfo(
        size=len(img),
        inodes=w.ino,
        root_nid=root.nid,
        meta_blkaddr=heads.meta_base // bs,
        chunk_table_entries=n_records,
        blob_ids=tuple(b.blob_id for b in blobs),
        prefetch_nids=tuple(pf_nids),
    )
    return info, chunks.used_blobs


class _Writer:
    """Pass 1: place every inode (breadth first) and copy the leaves into ``img``."""

    def __init__(
        self,
        layers: Sequence[LayerSource],
        meta_base: int,
        bs: int,
        chunk_size: int,
        chunks: ChunkTable,
        linked: set[Leaf],
    ) -> None:
        self.layers = layers
        self.n_layers = len(layers)
        self.meta_base = meta_base
        self.bs = bs
        self.chunk_size = chunk_size
        self.chunk_fmt = L.chunk_format(chunk_size.bit_length() - 1, bs.bit_length() - 1)
        self.chunks = chunks
        self.linked = linked
        # Everything before the meta area, plus its first 4 KiB left empty: root nid 128.
        self.img = bytearray(meta_base + ALIGN)
        self.dirs: list[_DirSlot] = []
        # Regular files that may have several names: leaf key -> nid, and nid -> names.
        self.reg_nid: dict[int, int] = {}
        self.links: dict[int, int] = {}
        self.i_ino_nid: dict[tuple[int, int], int] = {}  # (layer, i_ino) -> nid
        self.long_links: list[tuple[int, int, bytes]] = []  # (offset, data block, target)
        self.data_blocks = 0
        self.has_xattr = False
        self.ino = 0

    def place_tree(self, root: MergedDir) -> None:
        queue: deque[tuple[MergedDir, MergedDir]] = deque([(root, root)])
        reg_nid = self.reg_nid
        links = self.links
        copy_leaf = self._copy_leaf
        while queue:
            d, parent = queue.popleft()
            children = d.children
            names = sorted(children)
            slot = self._place_dir(d, parent, names)
            nids, ftypes = slot.nids, slot.ftypes
            for i, name in enumerate(names):
                c = children[name]
                if type(c) is MergedDir:
                    queue.append((c, d))
                    ftypes[i] = _DIR_FT
                    continue
                assert isinstance(c, int)
                nid = reg_nid.get(c)
                if nid is not None:  # another name of a regular file already placed
                    links[nid] += 1
                    nids[i], ftypes[i] = nid, _REG_FT
                else:
                    nids[i], ftypes[i] = copy_leaf(c, name)
        for nid, n in links.items():
            if n > 1:
                _U32.pack_into(self.img, self.meta_base + nid * 32 + 44, n)

    def _slot(self, head: int, tail: int) -> int:
        """Offset for an inode of ``head`` bytes (+ ``tail`` inline bytes), as the
        tree writer places it: 32-byte slots, not crossing a block if it fits one."""
        bs = self.bs
        pos = L.align_up(len(self.img), 32)
        if pos % bs + head + tail > bs and head + tail <= bs:
            pos = L.align_up(pos, bs)
        self.img += bytes(pos - len(self.img))
        self.ino += 1
        return pos

    def _place_dir(self, d: MergedDir, parent: MergedDir, names: list[bytes]) -> _DirSlot:
        bs = self.bs
        xattrs = L.pack_v6_xattrs(sorted(d.xattrs)) if d.xattrs else b""
        self.has_xattr |= bool(xattrs)
        head = _EXT + len(xattrs)
        sizes = dir_block_sizes(sorted([b".", b"..", *names]), bs)
        dir_size = (len(sizes) - 1) * bs + sizes[-1]
        tail = dir_size % bs
        if tail and head + tail <= bs:
            layout, inline, nblk = L.EROFS_INODE_FLAT_INLINE, tail, dir_size // bs
        else:
            layout, inline, nblk = L.EROFS_INODE_FLAT_PLAIN, 0, -(-dir_size // bs)
        pos = self._slot(head, inline)
        d.nid = (pos - self.meta_base) // 32
        self.img += bytes(head + inline)  # encoded once every nid is known
        slot = _DirSlot(
            d,
            parent,
            pos,
            self.ino,
            xattrs,
            layout,
            inline,
            self.data_blocks,
            dir_size,
            names,
            array("q", [-1]) * len(names),
            bytearray(len(names)),
        )
        self.dirs.append(slot)
        self.data_blocks += nblk
        return slot

    def _copy_leaf(self, key: int, name: bytes) -> tuple[int, int]:
        """Copy non-directory ``key`` into the image; (its nid, its dirent file type).

        The common case, an extended chunk-based regular file, is written here with
        as few Python operations as possible; anything else goes to ``_copy_other``.
        """
        n_layers = self.n_layers
        layer = key % n_layers
        src = self.layers[layer]
        buf = src.buf
        off = src.meta_base + (key // n_layers) * 32
        try:
            fmt, icount, mode, size, src_links = _REG_HEAD.unpack_from(buf, off)
        except struct.error:  # too near the end for an extended inode: checked there
            return self._copy_other(key, name)
        if fmt != _EXT_CHUNKED or mode & _S_IFMT != _S_IFREG:
            return self._copy_other(key, name)
        xsize = 12 + 4 * (icount - 1) if icount else 0
        head = _EXT + xsize
        if off + head > len(buf):
            raise L.format_error(f"file {name!r}", off, "inode runs past the bootstrap")
        i_ino = None
        if src_links > 1:
            i_ino = (layer, _U32.unpack_from(buf, off + 20)[0])
            same = self._placed_file(key, i_ino)
            if same is not None:
                return same, _REG_FT
        img = self.img
        end = len(img)
        pos = (end + 31) & ~31
        if (pos & 4095) + head > 4096 and head <= 4096:  # as _slot does, for 4 KiB blocks
            pos = (pos + 4095) & ~4095
        if pos != end:
            img += bytes(pos - end)
        self.ino += 1
        img += buf[off : off + head]
        _U_INO.pack_into(img, pos + 16, self.chunk_fmt, self.ino)
        _U32.pack_into(img, pos + 44, 1)  # i_nlink; further names are counted at the end
        nid = (pos - self.meta_base) >> 5
        if icount:
            self.has_xattr = True
        if i_ino is not None or key in self.linked:
            self.reg_nid[key] = nid
            self.links[nid] = 1
            if i_ino is not None:
                self.i_ino_nid[i_ino] = nid
        n = (size + self.chunk_size - 1) // self.chunk_size
        if n:
            self._copy_chunks(src, off + ((head + 7) & ~7), n, name)
        return nid, _REG_FT

    def _placed_file(self, key: int, i_ino: tuple[int, int]) -> int | None:
        """The nid of the regular file ``i_ino`` (layer, i_ino) if it is placed
        already, counting ``key`` as one more of its names; else None.

        nydus-image writes one record per name of a hardlinked file, all with its
        i_ino; our builder shares one record. Either way: one file.
        """
        same = self.i_ino_nid.get(i_ino)
        if same is not None:
            self.reg_nid[key] = same
            self.links[same] += 1
        return same

    def _copy_chunks(self, src: LayerSource, q: int, n: int, name: bytes) -> None:
        """Append file ``name``'s ``n``-entry chunk index array (at ``q`` in ``src``'s
        bootstrap) 8-byte aligned, its device ids mapped, and record its chunks."""
        buf = src.buf
        if q + 8 * n > len(buf):
            raise L.format_error(f"file {name!r} chunk array", q, "runs past the end")
        img = self.img
        img += bytes(-len(img) & 7)
        a = len(img)
        img += buf[q : q + 8 * n]
        # Device id byte of every 8-byte entry: layer blob index -> merged index.
        img[a + 2 :: 8] = img[a + 2 :: 8].translate(src.dev_table)
        self.chunks.add_file(src, q, n)

    def _copy_other(self, key: int, name: bytes) -> tuple[int, int]:
        """``_copy_leaf`` for compact inodes, symlinks, devices, fifos and sockets."""
        n_layers = self.n_layers
        src = self.layers[key % n_layers]
        src_nid = key // n_layers
        buf = src.buf
        off = src.meta_base + src_nid * 32
        fmt, icount, mode = _HEAD.unpack_from(buf, off)
        xsize = 12 + 4 * (icount - 1) if icount else 0
        extended = fmt & 1
        isize = _EXT if extended else 32
        typ = mode & _S_IFMT
        ftype = _FTYPE.get(typ)
        if ftype is None or off + isize + xsize > len(buf):
            raise L.format_error(f"entry {name!r}", off, f"bad non-directory inode (0o{mode:o})")
        self.has_xattr |= bool(icount)
        head = _EXT + xsize
        link = b""
        tail = n = 0
        if typ == _S_IFREG:
            if (fmt >> 1) & 7 != L.EROFS_INODE_CHUNK_BASED:
                raise L.format_error(f"regular file {name!r}", off, "is not chunk-based")
            n = -(-(_U64 if extended else _U32).unpack_from(buf, off + 8)[0] // self.chunk_size)
            # compact: its nlink is 16 bits, assume it may have more names
            i_ino = (key % n_layers, _U32.unpack_from(buf, off + 20)[0])
            same = self._placed_file(key, i_ino)
            if same is not None:
                return same, ftype
        elif typ == _S_IFLNK:
            link = src.bs.readlink(src_nid)
            if head + len(link) <= self.bs:
                tail = len(link)
        pos = self._slot(head, tail)
        img = self.img
        if extended:
            img += buf[off : off + _EXT + xsize]
        else:
            img += _widen(src.bs, src_nid) + buf[off + 32 : off + 32 + xsize]
        _U32.pack_into(img, pos + 44, 1)
        nid = (pos - self.meta_base) // 32
        if typ == _S_IFREG:
            _U_INO.pack_into(img, pos + 16, self.chunk_fmt, self.ino)
            self.reg_nid[key] = nid
            self.links[nid] = 1
            self.i_ino_nid[i_ino] = nid
            if n:
                self._copy_chunks(src, off + L.align_up(isize + xsize, 8), n, name)
            return nid, ftype
        u = _U32.unpack_from(img, pos + 16)[0] if typ in (stat.S_IFCHR, stat.S_IFBLK) else 0
        layout = L.EROFS_INODE_FLAT_PLAIN
        if typ == _S_IFLNK:
            if tail:
                layout = L.EROFS_INODE_FLAT_INLINE
                img += link
            else:
                self.long_links.append((pos, self.data_blocks, link))
                self.data_blocks += -(-len(link) // self.bs)
        _U16.pack_into(img, pos, L.inode_format(True, layout))
        _U_INO.pack_into(img, pos + 16, u, self.ino)
        return nid, ftype


def _widen(bs: BootstrapV6, nid: int) -> bytes:
    """An extended inode with a compact inode's fields (mtime 0, as the reader says)."""
    raw = bs.raw_inode(nid)
    return L.RafsV6InodeExtended(
        format=L.inode_format(True, (raw.format >> 1) & 0x7),
        xattr_icount=raw.xattr_icount,
        mode=raw.mode,
        size=raw.size,
        u=raw.u,
        uid=raw.uid,
        gid=raw.gid,
        nlink=1,
    ).pack()


def _encode_dir(img: bytearray, s: _DirSlot, data_base: int, data_blk0: int, bs: int) -> None:
    d = s.d
    ents = [(b".", d.nid, _DIR_FT), (b"..", s.parent.nid, _DIR_FT)]
    subdirs = 0
    children = d.children
    for name, nid, ft in zip(s.names, s.nids, s.ftypes):
        if nid < 0:
            subdirs += 1
            sub = children[name]
            assert isinstance(sub, MergedDir)
            nid = sub.nid
        ents.append((name, nid, ft))
    ents.sort()
    blocks = _pack_dir_blocks(ents, bs)
    assert (len(blocks) - 1) * bs + len(blocks[-1]) == s.size, "dirent sizing drift"
    full = blocks[:-1] if s.inline_size else blocks
    u = 0
    if full:
        u = data_blk0 + s.data_first
        p = data_base + s.data_first * bs
        for blk in full:
            img[p : p + len(blk)] = blk
            p += bs
    mode, uid, gid, mtime, mtime_nsec = d.meta
    raw = L.RafsV6InodeExtended(
        format=L.inode_format(True, s.layout),
        xattr_icount=L.xattr_icount_for(len(s.xattrs)),
        mode=mode,
        size=s.size,
        u=u,
        ino=s.ino,
        uid=uid,
        gid=gid,
        mtime=mtime,
        mtime_nsec=mtime_nsec,
        nlink=2 + subdirs,
    ).pack()
    body = raw + s.xattrs + (blocks[-1] if s.inline_size else b"")
    img[s.offset : s.offset + len(body)] = body


def _pack_dir_blocks(ents: list[tuple[bytes, int, int]], bs: int) -> list[bytes]:
    """``layout.pack_dir_blocks`` with one ``struct.pack`` per block (names come from
    validated dirents, so they are not checked again)."""
    blocks: list[bytes] = []
    i, n = 0, len(ents)
    while i < n:
        used, j = 0, i
        while j < n and used + 12 + len(ents[j][0]) <= bs:
            used += 12 + len(ents[j][0])
            j += 1
        noff = 12 * (j - i)
        fields: list[int] = []
        for name, nid, ftype in ents[i:j]:
            fields += (nid, noff, ftype)
            noff += len(name)
        blk = struct.pack("<" + "QHBx" * (j - i), *fields) + b"".join(e[0] for e in ents[i:j])
        blocks.append(blk if j == n else blk.ljust(bs, b"\0"))
        i = j
    return blocks


Target = MergedDir | tuple[MergedDir, bytes]  # a directory, or (parent, name) of a leaf


def _prefetch_targets(root: MergedDir, paths: tuple[bytes, ...]) -> list[Target]:
    """What the prefetch paths name in the merged tree; missing ones are skipped and
    each node is listed once (first wins), as the tree writer does."""
    out: list[Target] = []
    seen: set[tuple[int, bytes]] = set()
    for p in paths:
        found = find(root, p)
        if found is None:
            continue
        parent, name, node = found
        ident = (id(node), b"") if isinstance(node, MergedDir) else (id(parent), name)
        if ident not in seen:
            seen.add(ident)
            out.append(node if isinstance(node, MergedDir) else (parent, name))
    return out


def _prefetch_nids(targets: list[Target], dirs: list[_DirSlot]) -> list[int]:
    by_dir = {id(s.d): s for s in dirs} if targets else {}
    out: list[int] = []
    for t in targets:
        if isinstance(t, MergedDir):
            out.append(t.nid)
            continue
        parent, name = t
        slot = by_dir[id(parent)]
        out.append(slot.nids[slot.names.index(name)])
    return out
