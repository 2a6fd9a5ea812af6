"""Per-layer RAFS v6 bootstraps scanned into directory skeletons, for a fast merge.

A merge spends nearly all its time on regular files, yet it only needs to know
*where* each one is: its bytes can be carried over from the layer's bootstrap with
a few fields rewritten (see :mod:`pynydus.rafs.merge.writer`). So a layer is scanned
into a :class:`~pynydus.rafs.builder.overlay.LayerSkeleton`: every directory is
decoded (metadata, xattrs, entries), every other entry stays a *leaf key*, one int
naming (layer, nid), and no inode object is built for it. Dirent blocks are decoded
a block at a time with ``struct.iter_unpack``. The skeletons are then put on each
other by :func:`pynydus.rafs.builder.overlay_layer`, the one place the whiteout rules
live.

Everything here takes values (a decoded bootstrap) and returns values; no I/O.
"""

from __future__ import annotations

import struct
from itertools import pairwise

from pynydus.rafs.builder import LayerDir, LayerSkeleton, Leaf, looks_implicit
from pynydus.rafs.format import (
    LOWER_HARDLINK_XATTR,
    OVERLAY_OPAQUE_XATTR,
    FileType,
    SuperFlags,
    is_overlay_whiteout,
)
from pynydus.rafs.format.layout import (
    EROFS_DIRENT_SIZE,
    EROFS_INODE_SLOT_SIZE,
    EROFS_NAME_LEN,
    format_error,
)
from pynydus.rafs.read import BootstrapV6

__all__ = ["scan_layer"]

_DIRENT = struct.Struct("<QHBx")
_NAMEOFF = struct.Struct("<H")
_MODE_U = struct.Struct("<4xH10xI")  # i_mode, i_u (same offsets in compact and extended)
_ICOUNT = struct.Struct("<2xH")
_DIR, _REG, _CHR = int(FileType.DIR), int(FileType.REG), int(FileType.CHRDEV)

# A non-directory entry is a *leaf key*: ``nid * n_layers + layer``, one int naming
# the inode in its layer's bootstrap (hardlinks in a layer share it).


def scan_layer(bs: BootstrapV6, layer: int, n_layers: int) -> LayerSkeleton:
    """Decode the directories of layer ``layer`` (a v6 bootstrap) into a skeleton.

    Costs one pass over the dirents plus one small read per regular file (does it
    carry xattrs?) and per char device (is it a whiteout?). FormatError for a
    malformed directory (bad dirent, unsorted names, a directory reachable twice).
    """
    buf = bs.buffer
    meta_base = bs.superblock.meta_blkaddr * bs.block_size
    max_nid = (len(buf) - meta_base - 32) // EROFS_INODE_SLOT_SIZE
    seen: set[int] = set()
    lower_links: dict[Leaf, bytes] = {}
    # Without the superblock's xattr flag no file can be a lower-layer hardlink.
    has_xattr = bool(bs.flags & SuperFlags.HAS_XATTR)

    def load_dir(nid: int) -> LayerDir:
        if nid in seen:
            raise format_error(
                "directory tree",
                meta_base + nid * EROFS_INODE_SLOT_SIZE,
                f"directory nid {nid} is reachable twice (loop or directory hard link)",
            )
        seen.add(nid)
        st = bs.stat(nid)
        if not st.is_dir:
            raise format_error(
                "directory entry",
                meta_base + nid * EROFS_INODE_SLOT_SIZE,
                f"typed as a directory but nid {nid} is not one",
            )
        xattrs = bs.xattrs(nid) if _ICOUNT.unpack_from(buf, meta_base + nid * 32)[0] else []
        meta = (st.mode, st.uid, st.gid, st.mtime, st.mtime_nsec)
        d = LayerDir(meta, [], implicit=looks_implicit(meta, bool(xattrs)))
        for k, v in xattrs:
            if k == OVERLAY_OPAQUE_XATTR:
                d.opaque |= v == b"y"
            else:
                d.xattrs.append((k, v))
        entries = d.entries
        add = d.add
        names, nids, ftypes = _dirents(bs, nid, max_nid)
        for name, child, ftype in zip(names, nids, ftypes):
            if name[0] == 46 and (name == b"." or name == b".."):
                continue
            if ftype == _DIR:
                if add(name, -1):  # loaded once this directory is done
                    pending.append((entries, len(entries) - 1, child))
                continue
            key = child * n_layers + layer
            if ftype == _CHR:
                mode, u = _MODE_U.unpack_from(buf, meta_base + child * 32)
                add(name, key, is_overlay_whiteout(mode, u))
            elif (
                add(name, key)
                and has_xattr
                and ftype == _REG
                and _ICOUNT.unpack_from(buf, meta_base + child * 32)[0]
                and key not in lower_links
            ):
                for k, v in bs.xattrs(child):
                    if k == LOWER_HARDLINK_XATTR:
                        lower_links[key] = v
        return d

    # Subdirectories met in a listing: (that listing, position, nid), loaded depth first.
    pending: list[tuple[list[tuple[bytes, LayerDir | Leaf]], int, int]] = []
    root = load_dir(bs.root_ino)
    while pending:
        ents, i, nid = pending.pop()
        ents[i] = (ents[i][0], load_dir(nid))
    return LayerSkeleton(root, lower_links)


def _dirents(bs: BootstrapV6, nid: int, max_nid: int) -> tuple[list[bytes], list[int], list[int]]:
    """Names, child nids and file types of directory ``nid``, ``.`` and ``..`` included.

    Checks, a block at a time, what the reader's ``readdir`` checks entry by entry:
    name spans, strictly increasing names, no ``/`` or NUL in a name, known file
    types, nids inside the bootstrap.
    """
    buf = bs.buffer
    names: list[bytes] = []
    nids: list[int] = []
    ftypes: list[int] = []
    for boff, blen in bs.dir_blocks(nid):
        if blen < EROFS_DIRENT_SIZE:
            raise format_error(f"directory {nid} block", boff, f"{blen} bytes hold no dirent")
        block = bytes(buf[boff : boff + blen])
        (first,) = _NAMEOFF.unpack_from(block, 8)
        if first < EROFS_DIRENT_SIZE or first % EROFS_DIRENT_SIZE or first >= blen:
            raise format_error(
                f"directory {nid} dirent e_nameoff", boff + 8, f"{first} invalid in {blen} bytes"
            )
        b_nids, starts, b_types = zip(*_DIRENT.iter_unpack(block[:first]))
        end = block.find(b"\0", starts[-1])
        ends = [*starts[1:], blen if end < 0 else end]
        # Names are packed back to back from ``first``: increasing offsets, each
        # name 1..255 bytes, and no separator or NUL anywhere in the name area.
        spans = [e - s for s, e in zip(starts, ends)]
        area = block[first : ends[-1]]
        if (
            starts[0] != first
            or ends[-1] > blen
            or min(spans) < 1
            or max(spans) > EROFS_NAME_LEN
            or b"/" in area
            or b"\0" in area
        ):
            raise format_error(f"directory {nid} dirent names", boff, "bad name spans or bytes")
        if max(b_types) > 7 or max(b_nids) > max_nid:
            raise format_error(f"directory {nid} dirent", boff, "file type or nid out of range")
        b_names = [block[s:e] for s, e in zip(starts, ends)]
        if names and b_names[0] <= names[-1] or any(a >= b for a, b in pairwise(b_names)):
            raise format_error(f"directory {nid} dirent order", boff, "names not increasing")
        names += b_names
        nids += b_nids
        ftypes += b_types
    return names, nids, ftypes
