"""Directory skeleton of per-layer RAFS v6 bootstraps and their overlay, for a fast merge.

A merge spends nearly all its time on regular files, yet it only needs to know
*where* each one is: its bytes can be carried over from the layer's bootstrap with
a few fields rewritten (see :mod:`pynydus.rafs.merge.writer`). So a layer is scanned
into a skeleton: every directory is decoded (metadata, xattrs, entries), every other
entry stays a *leaf key*, one int naming (layer, nid), and no inode object is built
for it. Dirent blocks are decoded a block at a time with ``struct.iter_unpack``.

:func:`overlay_layer` then applies one layer skeleton on the merged skeleton with
the same rules as :func:`pynydus.rafs.builder.overlay` (whiteouts of both forms hide
lower entries only, opaque directories, implicit directories keep lower metadata, a
directory over a directory merges, anything else replaces), and binds the hardlinks
our builder left for a lower layer (``LOWER_HARDLINK_XATTR``) as
:func:`pynydus.rafs.builder.tree.bind_lower_links` does. Only directories that two layers
both have are merged name by name; a subtree present in one layer is adopted whole.

Everything here takes values (a decoded bootstrap) and returns values; no I/O.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field
from itertools import pairwise

from pynydus.errors import FormatError
from pynydus.rafs.format import (
    LOWER_HARDLINK_XATTR,
    OCI_WHITEOUT_OPAQUE,
    OCI_WHITEOUT_PREFIX,
    OVERLAY_OPAQUE_XATTR,
    FileType,
    SuperFlags,
)
from pynydus.rafs.format.layout import (
    EROFS_DIRENT_SIZE,
    EROFS_INODE_SLOT_SIZE,
    EROFS_NAME_LEN,
    format_error,
)
from pynydus.rafs.read import BootstrapV6

__all__ = [
    "LayerDir",
    "MergedDir",
    "MergedTree",
    "find",
    "overlay_layer",
    "scan_layer",
]

_DIRENT = struct.Struct("<QHBx")
_NAMEOFF = struct.Struct("<H")
_MODE_U = struct.Struct("<4xH10xI")  # i_mode, i_u (same offsets in compact and extended)
_ICOUNT = struct.Struct("<2xH")
_DIR, _REG, _CHR = int(FileType.DIR), int(FileType.REG), int(FileType.CHRDEV)
_WH_LEN = len(OCI_WHITEOUT_PREFIX)

# Directory metadata: (mode, uid, gid, mtime, mtime_nsec).
Meta = tuple[int, int, int, int, int]
_IMPLICIT_META: Meta = (stat.S_IFDIR | 0o755, 0, 0, 0, 0)


# A non-directory entry is a *leaf key*: ``nid * n_layers + layer``, one int naming
# the inode in its layer's bootstrap (hardlinks in a layer share it).


@dataclass(slots=True, eq=False)
class LayerDir:
    """A directory of one layer: its metadata and entries (name, LayerDir | leaf key).

    ``whiteouts``: names (``.wh.`` stripped) and overlay-form whiteouts, which hide
    lower entries; ``opaque``: the directory hides the lower directory's content.
    """

    meta: Meta
    xattrs: list[tuple[bytes, bytes]]
    implicit: bool
    opaque: bool = False
    whiteouts: list[bytes] = field(default_factory=list)
    entries: list[tuple[bytes, LayerDir | int]] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class MergedDir:
    """A directory of the merged image: children name -> MergedDir | leaf key."""

    meta: Meta
    xattrs: list[tuple[bytes, bytes]]
    implicit: bool
    children: dict[bytes, MergedDir | int] = field(default_factory=dict)
    nid: int = -1  # assigned by the writer

    @classmethod
    def empty_root(cls) -> MergedDir:
        return cls(_IMPLICIT_META, [], implicit=True)


@dataclass(slots=True, eq=False)
class MergedTree:
    """The merged image: its root and the leaf keys some layer hardlinked into from
    above (a lower-layer hardlink bound by :func:`overlay_layer`), which may now
    have more names than their layer gave them."""

    root: MergedDir = field(default_factory=MergedDir.empty_root)
    linked: set[int] = field(default_factory=set)


@dataclass(slots=True)
class LayerSkeleton:
    """A scanned layer: its root and the hardlinks waiting for a lower target."""

    root: LayerDir
    # leaf key of a placeholder -> target path (normalized, no leading slash)
    lower_links: dict[int, bytes]


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
    lower_links: dict[int, bytes] = {}
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
        d = LayerDir(meta, [], implicit=meta == _IMPLICIT_META and not xattrs)
        for k, v in xattrs:
            if k == OVERLAY_OPAQUE_XATTR:
                d.opaque |= v == b"y"
            else:
                d.xattrs.append((k, v))
        entries = d.entries
        whiteouts = d.whiteouts
        names, nids, ftypes = _dirents(bs, nid, max_nid)
        for name, child, ftype in zip(names, nids, ftypes):
            if name[0] == 46:  # "."
                if name == b"." or name == b"..":
                    continue
                if name.startswith(OCI_WHITEOUT_PREFIX):
                    if name == OCI_WHITEOUT_OPAQUE:
                        d.opaque = True
                    else:
                        whiteouts.append(name[_WH_LEN:])
                    continue
            if ftype == _DIR:
                pending.append((entries, len(entries), child))  # loaded once this dir is done
                entries.append((name, -1))
                continue
            if ftype == _CHR:
                mode, u = _MODE_U.unpack_from(buf, meta_base + child * 32)
                if stat.S_ISCHR(mode) and u == 0:
                    whiteouts.append(name)
                    continue
            key = child * n_layers + layer
            if (
                has_xattr
                and ftype == _REG
                and _ICOUNT.unpack_from(buf, meta_base + child * 32)[0]
                and key not in lower_links
            ):
                for k, v in bs.xattrs(child):
                    if k == LOWER_HARDLINK_XATTR:
                        lower_links[key] = v
            entries.append((name, key))
        return d

    # Subdirectories met in a listing: (that listing, position, nid), loaded depth first.
    pending: list[tuple[list[tuple[bytes, LayerDir | int]], int, int]] = []
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


# --------------------------------------------------------------------------- overlay


def find(root: MergedDir, path: bytes) -> tuple[MergedDir, bytes, MergedDir | int] | None:
    """(parent, name, node) of normalized ``path`` in the merged tree (``b""``: the
    root, as ``(root, b"", root)``); None if some component is missing."""
    parent, name = root, b""
    node: MergedDir | int = root
    for part in path.split(b"/") if path else ():
        if not isinstance(node, MergedDir):
            return None
        nxt = node.children.get(part)
        if nxt is None:
            return None
        parent, name, node = node, part, nxt
    return parent, name, node


def overlay_layer(merged: MergedTree, layer: LayerSkeleton) -> None:
    """Apply one layer skeleton on top of ``merged`` (everything below it), in place.

    Hardlinks waiting for a lower target are bound first, against the tree below
    the layer, as extracting the layers would: FormatError if the target is in no
    lower layer or is a directory. Costs one dict update per entry of the layer.
    """
    bound: dict[int, int] = {}
    for key, path in layer.lower_links.items():
        found = find(merged.root, path.strip(b"/"))
        target = None if found is None else found[2]
        if not isinstance(target, int):
            what = "is in no lower layer" if target is None else "is a directory"
            raise FormatError(f"hardlink to {path!r}: target {what}")
        bound[key] = target
        merged.linked.add(target)
    stack = [(merged.root, layer.root)]
    while stack:
        low, up = stack.pop()
        children = low.children
        if up.opaque:
            children.clear()
        if not up.implicit or low.implicit:
            low.meta, low.xattrs, low.implicit = up.meta, up.xattrs, up.implicit
        for name in up.whiteouts:
            children.pop(name, None)
        for name, v in up.entries:
            if type(v) is int:
                children[name] = bound.get(v, v) if bound else v
                continue
            assert isinstance(v, LayerDir)
            old = children.get(name)
            if not isinstance(old, MergedDir):
                # A fresh directory takes the upper's metadata unless that is implied.
                old = MergedDir((v.meta[0], 0, 0, 0, 0), [], implicit=False)
                children[name] = old
            stack.append((old, v))
