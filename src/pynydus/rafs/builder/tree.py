"""In-memory filesystem tree of one RAFS image: metadata and chunk references only.

A :class:`Node` is a name in a directory; an :class:`Inode` is the object it names.
Hardlinked regular files are several nodes sharing one Inode, which the bootstrap
writer turns into one EROFS inode (one nid). Other hardlinked types (symlinks,
devices) get a copy per name, as upstream does, because nydusd and the kernel do not
expect shared non-regular inodes.

Entries are applied in stream order with tar semantics: a later entry for the same
path replaces the earlier one (a directory replacing a directory keeps its children),
missing parent directories are created implicitly (0755, root-owned, mtime 0) and may
be filled in by a later entry.

OCI whiteouts are handled per ``whiteout_spec``:

* ``overlayfs`` (default): ``.wh.NAME`` becomes a char device 0/0 named NAME and
  ``.wh..wh..opq`` becomes ``trusted.overlay.opaque=y`` on its directory, the form an
  overlayfs lower layer uses, so a mounted layer can sit under overlayfs as-is.
* ``oci``: whiteouts are dropped (nothing below a single layer to hide).
* ``none``: whiteout files are kept verbatim, as upstream's per-layer builds for
  registry images do (``--whiteout-spec none``), leaving the merge to apply them.

A hardlink whose target is not in the layer (it is in a lower layer, as layers
made by some build tools have) cannot be resolved by the layer alone. It becomes
an empty regular file carrying ``trusted.pynydus.lower-hardlink`` = target path;
:func:`pynydus.rafs.builder.overlay.overlay_layer` turns it into the lower target when
the layer is put on top of its lower layers (merge, parent bootstrap). Upstream's
builder rejects such a layer (docs/decisions.md).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from pynydus.errors import FormatError, InvalidArgument
from pynydus.rafs.builder.blobwriter import ChunkDesc
from pynydus.rafs.format import (
    LOWER_HARDLINK_XATTR,
    OCI_WHITEOUT_PREFIX,
    OVERLAY_OPAQUE_XATTR,
    encode_rdev,
    is_overlay_whiteout,
)
from pynydus.rafs.source import Entry, EntryType, Whiteout

__all__ = [
    "WHITEOUT_SPECS",
    "Inode",
    "Node",
    "Tree",
    "iter_nodes",
]

WHITEOUT_SPECS = ("overlayfs", "oci", "none")


def _is_overlay_whiteout(inode: Inode) -> bool:
    return is_overlay_whiteout(inode.mode, inode.rdev)


@dataclass(slots=True, eq=False)
class Inode:
    """File metadata plus, for regular files, the chunk list; identity = one EROFS inode."""

    mode: int  # full st_mode
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    rdev: int = 0  # new_encode_dev form
    link: bytes = b""  # symlink target
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[ChunkDesc] = field(default_factory=list)
    nlink: int = 1
    # Created for a missing parent, not from an entry: a merge keeps the lower
    # layer's metadata for it instead of this placeholder's.
    implicit: bool = False
    # Assigned by the bootstrap writer / reader.
    nid: int = -1
    ino: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def copy(self) -> Inode:
        """A detached copy (new identity) with the same metadata and chunks."""
        return Inode(
            mode=self.mode,
            uid=self.uid,
            gid=self.gid,
            mtime=self.mtime,
            mtime_nsec=self.mtime_nsec,
            size=self.size,
            rdev=self.rdev,
            link=self.link,
            xattrs=dict(self.xattrs),
            chunks=list(self.chunks),
        )


@dataclass(slots=True, eq=False)
class Node:
    """A directory entry: ``name`` in its parent, naming ``inode``; dirs have ``children``."""

    name: bytes
    inode: Inode
    children: dict[bytes, Node] | None = None

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    def sorted_children(self) -> list[Node]:
        """Children in raw byte order of their names (the on-disk dirent order)."""
        assert self.children is not None
        return [self.children[k] for k in sorted(self.children)]


def _new_dir(name: bytes) -> Node:
    return Node(name, Inode(mode=stat.S_IFDIR | 0o755, implicit=True), {})


class Tree:
    """A mutable filesystem tree rooted at ``root`` (name ``b"/"``)."""

    def __init__(self, whiteout_spec: str = "overlayfs") -> None:
        if whiteout_spec not in WHITEOUT_SPECS:
            raise InvalidArgument(
                f"whiteout spec {whiteout_spec!r}: expected one of {', '.join(WHITEOUT_SPECS)}"
            )
        self.whiteout_spec = whiteout_spec
        self.root = _new_dir(b"/")
        # The directory the last entry went into, by path: a tar lists a directory's
        # entries together, so most entries find their parent here without a walk.
        # Dropped whenever an entry replaces a node (which may be that directory or
        # one above it).
        self._last_dir: tuple[bytes, Node] = (b"", self.root)
        self.skipped_xattrs: list[tuple[bytes, bytes]] = []
        # (path, target) of hardlinks left for a lower layer to resolve
        self.lower_links: list[tuple[bytes, bytes]] = []

    # ------------------------------------------------------------------ lookup
    def lookup(self, path: bytes) -> Node | None:
        """The node at normalized ``path`` (``b""`` = root), or None."""
        return _lookup(self.root, path)

    def _dir_for(self, path: bytes) -> Node:
        """The directory at ``path``, creating missing directories on the way."""
        last = self._last_dir
        if last[0] == path:
            return last[1]
        node = self.root
        if not path:
            return node
        for part in path.split(b"/"):
            assert node.children is not None
            nxt = node.children.get(part)
            if nxt is None or nxt.children is None:
                # A non-directory in the way is replaced, as extracting the tar would;
                # replacing this layer's whiteout makes the directory opaque instead.
                was_whiteout = nxt is not None and _is_overlay_whiteout(nxt.inode)
                nxt = _new_dir(part)
                if was_whiteout:
                    nxt.inode.xattrs[OVERLAY_OPAQUE_XATTR] = b"y"
                node.children[part] = nxt
            node = nxt
        self._last_dir = (path, node)
        return node

    # ------------------------------------------------------------------ apply
    def apply(self, entry: Entry, chunks: list[ChunkDesc] | None = None) -> None:
        """Apply one layer entry (with the chunks of its data, for regular files)."""
        # (the name test first: most entries are no whiteout, and it costs no call)
        if OCI_WHITEOUT_PREFIX in entry.path and self.whiteout_spec != "none":
            wh = entry.whiteout
            if wh is not None:
                self._apply_whiteout(entry, wh)
                return
        if not entry.path:
            if entry.type != EntryType.DIR:
                raise FormatError("layer root entry is not a directory")
            self._set_meta(self.root.inode, entry)
            self.root.inode.mode = entry.st_mode
            return
        parent_path, _, name = entry.path.rpartition(b"/")
        parent = self._dir_for(parent_path)
        children = parent.children
        assert children is not None
        if len(name) > 255:
            raise FormatError(f"entry {entry.path!r}: name longer than 255 bytes")
        old = children.get(name)
        etype = entry.type
        if old is None and etype is not EntryType.HARDLINK:
            # The common case: a new name (no replacement, no whiteout below it).
            xattrs = self._storable(entry) if entry.xattrs else {}
            if etype is EntryType.REG:
                children[name] = Node(name, Inode(
                    stat.S_IFREG | (entry.mode & 0o7777), entry.uid, entry.gid, entry.mtime,
                    entry.mtime_nsec, entry.size, 0, b"", xattrs, chunks or []))
                return
            inode = Inode(entry.st_mode, entry.uid, entry.gid, entry.mtime, entry.mtime_nsec,
                          0, 0, b"", xattrs)
            if etype is EntryType.SYMLINK:
                inode.link = entry.link
                inode.size = len(entry.link)
            elif etype is EntryType.CHAR or etype is EntryType.BLOCK:
                inode.rdev = encode_rdev(entry.rdev_major, entry.rdev_minor)
            children[name] = Node(name, inode, {} if etype is EntryType.DIR else None)
            return
        if old is not None:
            self._last_dir = (b"", self.root)  # ``old`` may be a cached directory
        if entry.type == EntryType.HARDLINK:
            target = self.lookup(entry.link)
            if target is None:
                # The target lives in a lower layer: keep the link for the merge to bind.
                children[name] = Node(name, self._lower_link(entry))
                return
            if target.is_dir:
                raise FormatError(f"hardlink {entry.path!r}: target {entry.link!r} is a directory")
            if target is old:
                return
            inode = target.inode if target.inode.is_reg else target.inode.copy()
            children[name] = Node(name, inode)
            return
        if entry.type == EntryType.DIR and old is not None and old.is_dir:
            self._set_meta(old.inode, entry)
            return
        inode = Inode(mode=entry.st_mode)
        self._set_meta(inode, entry)
        if entry.type == EntryType.DIR and old is not None and _is_overlay_whiteout(old.inode):
            # A directory created over a whiteout hides the lower directory's content,
            # exactly what overlayfs does when a directory replaces a whiteout.
            inode.xattrs[OVERLAY_OPAQUE_XATTR] = b"y"
        if entry.type == EntryType.REG:
            inode.size = entry.size
            inode.chunks = chunks or []
        elif entry.type == EntryType.SYMLINK:
            inode.link = entry.link
            inode.size = len(entry.link)
        elif entry.type in (EntryType.CHAR, EntryType.BLOCK):
            inode.rdev = encode_rdev(entry.rdev_major, entry.rdev_minor)
        children[name] = Node(name, inode, {} if entry.type == EntryType.DIR else None)

    def _lower_link(self, entry: Entry) -> Inode:
        """Placeholder for a hardlink whose target is not in this layer (see module doc)."""
        inode = Inode(mode=stat.S_IFREG | (entry.mode & 0o7777))
        self._set_meta(inode, entry)
        inode.xattrs[LOWER_HARDLINK_XATTR] = entry.link
        self.lower_links.append((entry.path, entry.link))
        return inode

    def _set_meta(self, inode: Inode, e: Entry) -> None:
        # An opaque marker set by this layer's whiteouts outlives a later dir entry.
        opaque = inode.xattrs.get(OVERLAY_OPAQUE_XATTR)
        inode.implicit = False
        inode.mode = (inode.mode & ~0o7777) | (e.mode & 0o7777)
        inode.uid, inode.gid = e.uid, e.gid
        inode.mtime, inode.mtime_nsec = e.mtime, e.mtime_nsec
        inode.xattrs = self._storable(e)
        if opaque is not None:
            inode.xattrs.setdefault(OVERLAY_OPAQUE_XATTR, opaque)

    def _storable(self, e: Entry) -> dict[bytes, bytes]:
        """The xattrs of ``e`` RAFS v6 can store; the others are noted as skipped."""
        out = {}
        for k, v in e.xattrs.items():
            if _storable_xattr(k):
                out[k] = v
            else:
                self.skipped_xattrs.append((e.path, k))
        return out

    def _apply_whiteout(self, entry: Entry, wh: Whiteout) -> None:
        # Every spec keeps the directories a whiteout's path implies.
        parent = self._dir_for(entry.parent)
        assert parent.children is not None
        if self.whiteout_spec == "oci":
            return
        if wh == Whiteout.OPAQUE:
            parent.inode.xattrs[OVERLAY_OPAQUE_XATTR] = b"y"
            return
        name = entry.name[len(OCI_WHITEOUT_PREFIX) :]
        same_layer = parent.children.get(name)
        if same_layer is not None:
            # The layer's own entry stays; the whiteout still hides what is below it,
            # which for a directory means: make it opaque.
            if same_layer.children is not None:
                same_layer.inode.xattrs[OVERLAY_OPAQUE_XATTR] = b"y"
            return
        inode = Inode(mode=stat.S_IFCHR | (entry.mode & 0o7777))
        self._set_meta(inode, entry)
        inode.mode = stat.S_IFCHR | (entry.mode & 0o7777)
        parent.children[name] = Node(name, inode)

    # ------------------------------------------------------------------ traversal
    def walk(self) -> Iterator[tuple[bytes, Node]]:
        """(path, node) for every node, parents before children, children sorted."""
        stack: list[tuple[bytes, Node]] = [(b"", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                kids = node.sorted_children()
                for child in reversed(kids):
                    stack.append((path + b"/" + child.name if path else child.name, child))

    def finalize(self) -> None:
        """Compute nlink for every inode (dirs: 2 + subdirs; files: number of names)."""
        self.root.inode.nlink = 2
        nodes = list(iter_nodes(self.root))  # two passes, no sorting
        for _, node in nodes:
            node.inode.nlink = 2 if node.children is not None else 0
        for parent, node in nodes:
            if node.children is not None:
                parent.inode.nlink += 1
            else:
                node.inode.nlink += 1


def iter_nodes(root: Node) -> Iterator[tuple[Node, Node]]:
    """(parent, node) for every node below ``root``, in no particular order (cheap)."""
    stack = [root]
    while stack:
        d = stack.pop()
        assert d.children is not None
        for child in d.children.values():
            yield d, child
            if child.children is not None:
                stack.append(child)


def _lookup(root: Node, path: bytes) -> Node | None:
    node = root
    for part in path.split(b"/") if path else ():
        if node.children is None:
            return None
        nxt = node.children.get(part)
        if nxt is None:
            return None
        node = nxt
    return node


_XATTR_PREFIXES = (b"user.", b"trusted.", b"security.")
_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")


def _storable_xattr(name: bytes) -> bool:
    """True if RAFS v6 has a name index for ``name`` (others are skipped, and reported)."""
    if name in _ACL_NAMES:
        return True
    return any(name.startswith(p) and len(name) > len(p) for p in _XATTR_PREFIXES)
