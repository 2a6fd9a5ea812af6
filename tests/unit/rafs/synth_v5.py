"""A small, independent RAFS v5 bootstrap writer for reader tests.

Covers what the v5 fixture lacks: xattrs, special files, hard links as extra
inode-table slots, files with holes.  Inode numbers are assigned breadth first so
every directory's children are consecutive table slots sorted by name, as the
upstream builder does.
"""

from __future__ import annotations

import hashlib
import stat
from collections import deque
from dataclasses import dataclass, field

from pynydus.rafs.format import layout as L
from pynydus.rafs.format import layout_v5 as L5


@dataclass
class Node:
    mode: int
    data_size: int = 0
    target: bytes = b""
    rdev: int = 0
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    children: dict[bytes, Node] = field(default_factory=dict)
    #: (file_offset, size) of each chunk; default: dense chunks covering data_size
    chunk_spans: list[tuple[int, int]] | None = None
    ino: int = 0
    nlink: int = 1


def build(root: Node, chunk_size: int = 1 << 20) -> tuple[bytes, dict[bytes, int]]:
    """Bootstrap bytes and {path: expected ino}."""
    # Breadth-first slots: (name, node, parent slot); a node seen again is a hard link.
    slots: list[tuple[bytes, Node, int]] = [(b"/", root, 0)]
    child_range: dict[int, tuple[int, int]] = {}
    paths: dict[bytes, int] = {b"/": 1}
    path_of = {1: b""}
    canonical: dict[int, int] = {}
    queue = deque([1])
    while queue:
        slot = queue.popleft()
        _, node, _ = slots[slot - 1]
        if not stat.S_ISDIR(node.mode):
            continue
        first = len(slots) + 1
        for name in sorted(node.children):
            child = node.children[name]
            slots.append((name, child, slot))
            idx = len(slots)
            path_of[idx] = path_of[slot] + b"/" + name
            if id(child) in canonical:
                child.nlink += 1
            else:
                canonical[id(child)] = idx
                child.ino = idx
                if stat.S_ISDIR(child.mode):
                    queue.append(idx)
            paths[path_of[idx]] = canonical[id(child)]
        child_range[slot] = (first, len(node.children))
    root.ino = 1
    for _, n, _ in slots:
        if stat.S_ISDIR(n.mode):
            n.nlink = 2 + sum(1 for c in n.children.values() if stat.S_ISDIR(c.mode))

    n_slots = len(slots)
    blob_id = hashlib.sha256(b"v5 blob").hexdigest().encode()
    blob_table = L5.pack_v5_blob_table([L5.RafsV5BlobEntry(0, 0, blob_id)])
    table_off = L5.RAFS_V5_SUPERBLOCK_SIZE
    table_size = L.align_up(4 * n_slots, 8)
    blob_off = table_off + table_size
    ext_off = blob_off + len(blob_table)
    pos = ext_off + 64
    records = bytearray()
    offsets: list[int] = []
    ci = 0
    c_off = 0
    u_off = 0
    for slot, (name, node, parent) in enumerate(slots, start=1):
        offsets.append(pos + len(records))
        flags = 0
        body = name.ljust(L.align_up(len(name), 8), b"\0") if slot != 1 else b"/".ljust(8, b"\0")
        if stat.S_ISLNK(node.mode):
            flags |= L5.V5InodeFlags.SYMLINK
            body += node.target.ljust(L.align_up(len(node.target), 8), b"\0")
        xb = L5.pack_v5_xattrs(node.xattrs)
        if xb:
            flags |= L5.V5InodeFlags.XATTR
        chunks = b""
        count = 0
        if stat.S_ISREG(node.mode):
            spans = node.chunk_spans
            if spans is None:
                spans = [
                    (o, min(chunk_size, node.data_size - o))
                    for o in range(0, node.data_size, chunk_size)
                ]
            else:
                flags |= L5.V5InodeFlags.HAS_HOLE
            for fo, sz in spans:
                digest = hashlib.sha256(b"%d:%d" % (node.ino, fo)).digest()
                chunks += L.RafsChunkInfo(digest, 0, 0, sz, sz, c_off, u_off, fo, ci, 0).pack()
                ci += 1
                c_off += sz
                u_off += sz
            count = len(spans)
        if node.nlink > 1 and stat.S_ISREG(node.mode):
            flags |= L5.V5InodeFlags.HARDLINK
        first, nchild = child_range.get(slot, (0, 0))
        if stat.S_ISDIR(node.mode):
            count = nchild
        rec = L5.RafsV5Inode(
            parent=parent,
            ino=node.ino,
            mode=node.mode,
            size=node.data_size if stat.S_ISREG(node.mode) else len(node.target),
            blocks=(node.data_size + 511) // 512,
            flags=int(flags),
            nlink=node.nlink,
            child_index=first,
            child_count=count,
            name_size=len(name) if slot != 1 else 1,
            symlink_size=len(node.target),
            rdev=node.rdev,
            mtime=1_700_000_000 + slot,
        )
        records += rec.pack() + body + xb + chunks
    table = L.pack_u32_array([o >> 3 for o in offsets]).ljust(table_size, b"\0")
    sb = L5.RafsV5SuperBlock(
        block_size=chunk_size,
        flags=int(
            L.SuperFlags.COMPRESSION_NONE | L.SuperFlags.HASH_SHA256 | L.SuperFlags.HAS_XATTR
        ),
        inodes_count=len(canonical) + 1,
        inode_table_offset=table_off,
        prefetch_table_offset=0,
        blob_table_offset=blob_off,
        inode_table_entries=n_slots,
        blob_table_size=len(blob_table),
        extended_blob_table_entries=1,
        extended_blob_table_offset=ext_off,
    )
    ext = L5.RafsV5ExtBlobEntry(ci, 0, u_off, c_off)
    data = sb.pack() + table + blob_table + ext.pack() + bytes(records)
    return data + bytes(-len(data) % 8), paths
