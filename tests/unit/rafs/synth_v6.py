"""A small, independent RAFS v6 bootstrap writer used only to make reader test inputs.

It covers what the real fixtures lack (xattrs, devices, fifos, non-UTF-8 names,
multi-block and inline directories, long symlinks, hard links, tens of thousands
of files) with the same layout rules as upstream (spec §1.1, §1.8-§1.12): extended
inodes, 32-byte slots, inline tails that never cross a block, one data blob.
It is not the project's builder and makes no attempt at compactness.
"""

from __future__ import annotations

import hashlib
import stat
from collections import deque
from dataclasses import dataclass, field

from pynydus.rafs.format import layout as L

BS = 4096


@dataclass
class Node:
    """One tree node.  ``data_size`` for regular files; ``target`` for symlinks."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    mtime_nsec: int = 0
    data_size: int = 0
    target: bytes = b""
    rdev: int = 0
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    children: dict[bytes, Node] = field(default_factory=dict)
    # filled in by the writer
    nid: int = 0
    nlink: int = 1


def d(mode: int = 0o755, **kw: object) -> Node:
    return Node(stat.S_IFDIR | mode, **kw)  # type: ignore[arg-type]


def f(size: int, mode: int = 0o644, **kw: object) -> Node:
    return Node(stat.S_IFREG | mode, data_size=size, **kw)  # type: ignore[arg-type]


def ln(target: bytes, **kw: object) -> Node:
    return Node(stat.S_IFLNK | 0o777, target=target, **kw)  # type: ignore[arg-type]


@dataclass
class Image:
    """Result: bootstrap bytes plus what a reader should find."""

    data: bytes
    root: Node
    chunk_size: int
    blob_id: str
    chunks: dict[int, list[tuple[int, int, int]]]  # nid -> [(ci_index, u_off, u_size)]


def build(root: Node, chunk_size: int = 1 << 20, prefetch: list[bytes] | None = None) -> Image:
    """Lay out ``root`` as a RAFS v6 bootstrap (single blob, zstd + blake3 flags)."""
    # 1. Order nodes breadth first; a node object reached twice is a hard link.
    order: list[Node] = []
    seen: dict[int, Node] = {}
    queue = deque([root])
    while queue:
        n = queue.popleft()
        if id(n) in seen:
            n.nlink += 1
            continue
        seen[id(n)] = n
        order.append(n)
        if stat.S_ISDIR(n.mode):
            for child in n.children.values():
                queue.append(child)
    for n in order:
        if stat.S_ISDIR(n.mode):
            n.nlink = 2 + sum(1 for c in n.children.values() if stat.S_ISDIR(c.mode))

    seq = {id(n): i + 1 for i, n in enumerate(order)}

    # 2. Sizes of every inode record (inode + xattrs + inline tail / chunk indexes).
    def dir_entries(n: Node, parent: Node) -> list[tuple[bytes, Node]]:
        ents = [(b".", n), (b"..", parent)] + list(n.children.items())
        return sorted(ents, key=lambda e: e[0])

    parents: dict[int, Node] = {id(root): root}
    for n in order:
        for c in n.children.values():
            parents.setdefault(id(c), n)

    def dir_size(n: Node) -> int:
        blocks = L.pack_dir_blocks([(name, 0, 0) for name, _ in dir_entries(n, parents[id(n)])], BS)
        return (len(blocks) - 1) * BS + len(blocks[-1])

    xattr_blobs = {id(n): L.pack_v6_xattrs(n.xattrs) for n in order}
    sizes: dict[int, int] = {}
    inline: dict[int, bool] = {}
    for n in order:
        base = 64 + len(xattr_blobs[id(n)])
        if stat.S_ISDIR(n.mode) or stat.S_ISLNK(n.mode):
            size = dir_size(n) if stat.S_ISDIR(n.mode) else len(n.target)
            tail = size % BS
            inline[id(n)] = tail != 0 and base + tail <= BS
            sizes[id(n)] = base + (tail if inline[id(n)] else 0)
        elif stat.S_ISREG(n.mode):
            nchunks = (n.data_size + chunk_size - 1) // chunk_size
            sizes[id(n)] = L.align_up(base, 8) + 8 * nchunks
        else:
            sizes[id(n)] = base

    # 3. Place records from meta offset 4096 (root nid 128), never crossing a block
    #    when the record has an inline tail.
    meta_blkaddr = 2
    meta_base = meta_blkaddr * BS
    pos = BS
    for n in order:
        sz = sizes[id(n)]
        if sz <= BS and pos % BS + sz > BS:
            pos = L.align_up(pos, BS)
        n.nid = pos // 32
        pos = L.align_up(pos + sz, 32)
    meta_end = meta_base + L.align_up(pos, BS)

    # 4. Data blocks (full dirent blocks, plain symlink blocks) after the meta area.
    out = bytearray(meta_end)
    data_area = bytearray()
    blocks_at: dict[int, int] = {}
    chunk_map: dict[int, list[tuple[int, int, int]]] = {}
    ci_next = 0
    u_off = 0
    records: list[L.RafsChunkInfo] = []
    c_off = 0
    for n in order:
        off = meta_base + n.nid * 32
        xb = xattr_blobs[id(n)]
        icount = L.xattr_icount_for(len(xb))
        payload = b""
        layout_ = L.EROFS_INODE_FLAT_PLAIN
        u = 0
        size = 0
        if stat.S_ISDIR(n.mode) or stat.S_ISLNK(n.mode):
            if stat.S_ISDIR(n.mode):
                ents = dir_entries(n, parents[id(n)])
                blocks = L.pack_dir_blocks(
                    [(name, c.nid, int(L.file_type_of_mode(c.mode))) for name, c in ents], BS
                )
                body = b"".join(b.ljust(BS, b"\0") for b in blocks[:-1]) + blocks[-1]
            else:
                body = n.target
            size = len(body)
            if inline[id(n)]:
                layout_ = L.EROFS_INODE_FLAT_INLINE
                full = size - size % BS
                payload = body[full:]
            else:
                full = L.align_up(size, BS)
            if full:
                u = (meta_end + len(data_area)) // BS
                data_area += body[:full].ljust(full, b"\0")
                blocks_at[n.nid] = u
        elif stat.S_ISREG(n.mode):
            layout_ = L.EROFS_INODE_CHUNK_BASED
            size = n.data_size
            u = L.chunk_format(chunk_size.bit_length() - 1)
            idx = bytearray(L.align_up(64 + len(xb), 8) - 64 - len(xb))
            lst = []
            for i in range((size + chunk_size - 1) // chunk_size):
                usz = min(chunk_size, size - i * chunk_size)
                idx += L.RafsV6InodeChunkAddr.of(0, ci_next, u_off // BS).pack()
                digest = hashlib.sha256(b"%d:%d" % (n.nid, i)).digest()
                csz = max(1, usz // 2)
                records.append(
                    L.RafsChunkInfo(
                        digest,
                        0,
                        L.ChunkFlags.COMPRESSED,
                        csz,
                        usz,
                        c_off,
                        u_off,
                        i * chunk_size,
                        ci_next,
                        0,
                    )
                )
                lst.append((ci_next, u_off, usz))
                c_off += csz
                u_off = L.align_up(u_off + usz, BS)
                ci_next += 1
            chunk_map[n.nid] = lst
            payload = bytes(idx)
        elif stat.S_ISCHR(n.mode) or stat.S_ISBLK(n.mode):
            u = n.rdev
        ino = L.RafsV6InodeExtended(
            format=L.inode_format(True, layout_),
            xattr_icount=icount,
            mode=n.mode,
            size=size,
            u=u,
            ino=seq[id(n)],
            uid=n.uid,
            gid=n.gid,
            mtime=n.mtime,
            mtime_nsec=n.mtime_nsec,
            nlink=n.nlink,
        )
        rec = ino.pack() + xb + payload
        out[off : off + len(rec)] = rec

    out += data_area
    out += bytes(-len(out) % BS)
    chunk_table_off = len(out)
    out += b"".join(r.pack() for r in sorted(records, key=lambda r: r.digest))
    out += bytes(-len(out) % BS)

    blob_id = hashlib.sha256(b"synthetic blob").hexdigest()
    u_total = L.align_up(u_off, BS) or BS
    prefetch_nids = []
    for p in prefetch or []:
        cur = root
        for part in [x for x in p.split(b"/") if x]:
            cur = cur.children[part]
        prefetch_nids.append(cur.nid)
    sb = L.RafsV6SuperBlock(
        root_nid=root.nid,
        inos=len(order),
        blocks=u_total // BS,
        meta_blkaddr=meta_blkaddr,
        extra_devices=1,
    )
    ext = L.RafsV6SuperBlockExt(
        flags=int(
            L.SuperFlags.COMPRESSION_ZSTD | L.SuperFlags.HASH_BLAKE3 | L.SuperFlags.EXPLICIT_UID_GID
        )
        | (int(L.SuperFlags.HAS_XATTR) if any(n.xattrs for n in order) else 0),
        blob_table_offset=4096,
        blob_table_size=256,
        chunk_size=chunk_size,
        chunk_table_offset=chunk_table_off if records else 0,
        chunk_table_size=80 * len(records),
        prefetch_table_offset=4096 + 256 if prefetch_nids else 0,
        prefetch_table_size=4 * len(prefetch_nids),
    )
    dev = L.RafsV6Device(blob_id.encode(), u_total // BS, 0)
    blob = L.RafsV6Blob(
        blob_id=blob_id.encode(),
        blob_index=0,
        chunk_size=chunk_size,
        chunk_count=ci_next,
        compression_algo=L.Compressor.ZSTD,
        digest_algo=L.Digester.BLAKE3,
        features=int(L.BlobFeatures.ALIGNED),
        compressed_size=c_off,
        uncompressed_size=u_total,
        ci_uncompressed_size=16 * ci_next,
        ci_compressed_size=16 * ci_next,
        ci_offset=c_off,
    )
    out[1024:1152] = sb.pack()
    out[1152:1408] = ext.pack()
    out[1408:1536] = dev.pack()
    out[4096:4352] = blob.pack()
    if prefetch_nids:
        out[4352 : 4352 + 4 * len(prefetch_nids)] = L.pack_u32_array(prefetch_nids)
    assert len(out) % BS == 0
    return Image(bytes(out), root, chunk_size, blob_id, chunk_map)
