"""One layer on the layers below it: the whiteout, opaque and implicit-directory rules.

Every way of putting layers together goes through :func:`overlay_layer`: ``image
merge`` on records (a layer scanned from its bootstrap by
:func:`pynydus.rafs.merge.skeleton.scan_layer`) and on trees (v5, tarfs, the
converter's merge), and a build on a parent bootstrap (a :class:`Tree` turned into a
layer by :func:`layer_of_tree`). The rules, as overlayfs and extracting the layers
in order give them:

* a whiteout hides what is *below* its layer and is not itself in the result: an
  OCI ``.wh.NAME`` or an overlayfs char device 0/0 named NAME removes NAME; an OCI
  ``.wh..wh..opq`` or ``trusted.overlay.opaque=y`` makes the directory opaque, hiding
  the lower directory's content (:mod:`pynydus.rafs.format.whiteout`); the opaque
  xattr is dropped once applied;
* a directory over a directory merges their children; its metadata is the upper's,
  unless the upper one is only implied by its children's paths (then the lower keeps
  its own); a directory over anything else starts empty;
* anything else replaces the lower entry whole;
* a hardlink our builder left for a lower target (``LOWER_HARDLINK_XATTR``) becomes
  that target, found in what lies below the layer: FormatError if it is missing there
  or is a directory, as extracting the layers would fail.

The model is a skeleton: directories are decoded (:class:`LayerDir`,
:class:`MergedDir`), every other entry is a *leaf*, a value the overlay only moves
around: an int naming an inode in its layer's bootstrap for the record merge, an
:class:`Inode` for trees. Sans-I/O: values in, values out.
"""

from __future__ import annotations

import stat
from collections.abc import Hashable
from dataclasses import dataclass, field

from pynydus.errors import FormatError
from pynydus.rafs.builder.tree import Inode, Node, Tree
from pynydus.rafs.format import (
    LOWER_HARDLINK_XATTR,
    OCI_WHITEOUT_OPAQUE,
    OCI_WHITEOUT_PREFIX,
    OVERLAY_OPAQUE_XATTR,
    is_overlay_whiteout,
)

__all__ = [
    "IMPLICIT_META",
    "LayerDir",
    "LayerSkeleton",
    "Leaf",
    "MergedDir",
    "MergedTree",
    "Meta",
    "find",
    "layer_of_tree",
    "looks_implicit",
    "merged_of_tree",
    "overlay_layer",
    "tree_of_merged",
]

# Directory metadata: (mode, uid, gid, mtime, mtime_nsec).
Meta = tuple[int, int, int, int, int]
#: What our builder gives a directory a layer only implies (no entry of its own).
IMPLICIT_META: Meta = (stat.S_IFDIR | 0o755, 0, 0, 0, 0)
# A non-directory entry: an int key (record merge) or an Inode (trees); hashable.
Leaf = Hashable


def looks_implicit(meta: Meta, has_xattrs: bool) -> bool:
    """True for a directory read back from a bootstrap with exactly the placeholder
    metadata of an implied directory: 0755, root, mtime 0, no xattrs.

    A bootstrap cannot record implicitness, so a merge recognises the placeholder and
    keeps the lower layer's metadata for it; a real directory with exactly these
    attributes loses nothing but its (epoch) mtime.
    """
    return meta == IMPLICIT_META and not has_xattrs


@dataclass(slots=True, eq=False)
class LayerDir:
    """A directory of one layer: its metadata and entries (name, LayerDir | leaf).

    ``whiteouts``: names (``.wh.`` stripped) and overlay-form whiteouts, which hide
    lower entries; ``opaque``: the directory hides the lower directory's content.
    """

    meta: Meta
    xattrs: list[tuple[bytes, bytes]]
    implicit: bool
    opaque: bool = False
    whiteouts: list[bytes] = field(default_factory=list)
    entries: list[tuple[bytes, LayerDir | Leaf]] = field(default_factory=list)

    def add(self, name: bytes, entry: LayerDir | Leaf, overlay_whiteout: bool = False) -> bool:
        """Add directory entry ``name``: an OCI whiteout or opaque marker (told by the
        name), an overlay-form whiteout (``overlay_whiteout``: the caller saw a char
        device 0/0), or else an entry of the layer, and then return True."""
        if name.startswith(OCI_WHITEOUT_PREFIX):
            if name == OCI_WHITEOUT_OPAQUE:
                self.opaque = True
            else:
                self.whiteouts.append(name[len(OCI_WHITEOUT_PREFIX) :])
            return False
        if overlay_whiteout:
            self.whiteouts.append(name)
            return False
        self.entries.append((name, entry))
        return True


@dataclass(slots=True, eq=False)
class MergedDir:
    """A directory of the merged image: children name -> MergedDir | leaf."""

    meta: Meta
    xattrs: list[tuple[bytes, bytes]]
    implicit: bool
    children: dict[bytes, MergedDir | Leaf] = field(default_factory=dict)
    nid: int = -1  # assigned by the record writer

    @classmethod
    def empty_root(cls) -> MergedDir:
        return cls(IMPLICIT_META, [], implicit=True)


@dataclass(slots=True, eq=False)
class MergedTree:
    """The merged image: its root and the leaves some layer hardlinked into from above
    (a lower-layer hardlink bound by :func:`overlay_layer`), which may now have more
    names than their layer gave them."""

    root: MergedDir = field(default_factory=MergedDir.empty_root)
    linked: set[Leaf] = field(default_factory=set)


@dataclass(slots=True)
class LayerSkeleton:
    """A layer: its root and the hardlinks waiting for a lower target."""

    root: LayerDir
    # leaf of a placeholder -> target path (normalized, no leading slash)
    lower_links: dict[Leaf, bytes]


def find(root: MergedDir, path: bytes) -> tuple[MergedDir, bytes, MergedDir | Leaf] | None:
    """(parent, name, node) of normalized ``path`` in the merged tree (``b""``: the
    root, as ``(root, b"", root)``); None if some component is missing."""
    parent, name = root, b""
    node: MergedDir | Leaf = root
    for part in path.split(b"/") if path else ():
        if not isinstance(node, MergedDir):
            return None
        nxt = node.children.get(part)
        if nxt is None:
            return None
        parent, name, node = node, part, nxt
    return parent, name, node


def overlay_layer(merged: MergedTree, layer: LayerSkeleton) -> None:
    """Apply one layer on top of ``merged`` (everything below it), in place, with the
    rules of the module docstring. Costs one dict update per entry of the layer.
    The layer's directories and leaves are taken over, not copied."""
    bound: dict[Leaf, Leaf] = {}
    for key, path in layer.lower_links.items():
        found = find(merged.root, path.strip(b"/"))
        target = None if found is None else found[2]
        if target is None or isinstance(target, MergedDir):
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
            if type(v) is not LayerDir:
                children[name] = bound.get(v, v) if bound else v
                continue
            old = children.get(name)
            if not isinstance(old, MergedDir):
                # A fresh directory takes the upper's metadata unless that is implied.
                old = MergedDir((v.meta[0], 0, 0, 0, 0), [], implicit=False)
                children[name] = old
            stack.append((old, v))


# --------------------------------------------------------------------------- trees


def _meta(inode: Inode) -> Meta:
    return inode.mode, inode.uid, inode.gid, inode.mtime, inode.mtime_nsec


def layer_of_tree(tree: Tree) -> LayerSkeleton:
    """``tree`` (one layer, as built or loaded) as a layer skeleton whose leaves are its
    Inodes (shared by a file's hardlinks). The tree must not be used afterwards."""
    lower_links: dict[Leaf, bytes] = {}

    def layer_dir(node: Node) -> LayerDir:
        inode = node.inode
        xattrs = [(k, v) for k, v in inode.xattrs.items() if k != OVERLAY_OPAQUE_XATTR]
        opaque = inode.xattrs.get(OVERLAY_OPAQUE_XATTR) == b"y"
        return LayerDir(_meta(inode), xattrs, inode.implicit, opaque)

    root = layer_dir(tree.root)
    stack = [(tree.root, root)]
    while stack:
        node, d = stack.pop()
        assert node.children is not None
        for name, child in node.children.items():
            inode = child.inode
            if child.children is not None:
                sub = layer_dir(child)
                if d.add(name, sub):
                    stack.append((child, sub))
                continue
            if d.add(name, inode, is_overlay_whiteout(inode.mode, inode.rdev)) and inode.xattrs:
                target = inode.xattrs.get(LOWER_HARDLINK_XATTR)
                if target is not None:
                    lower_links[inode] = target
    return LayerSkeleton(root, lower_links)


def merged_of_tree(tree: Tree) -> MergedTree:
    """A whole image as a merged tree to put layers on (a parent bootstrap): taken as
    it is, its own whiteouts kept. The tree must not be used afterwards."""

    def merged_dir(inode: Inode) -> MergedDir:
        return MergedDir(_meta(inode), list(inode.xattrs.items()), inode.implicit)

    root = merged_dir(tree.root.inode)
    stack = [(tree.root, root)]
    while stack:
        node, d = stack.pop()
        assert node.children is not None
        for name, child in node.children.items():
            if child.children is None:
                d.children[name] = child.inode
                continue
            sub = merged_dir(child.inode)
            d.children[name] = sub
            stack.append((child, sub))
    return MergedTree(root)


def tree_of_merged(merged: MergedTree, whiteout_spec: str = "none") -> Tree:
    """The merged image as a :class:`Tree` for the bootstrap writer. A regular file's
    Inode under several names is one file (hardlinks); any other leaf reached twice
    (a lower-layer hardlink to a symlink or device) is copied, as the tree does for
    hardlinks inside a layer."""
    tree = Tree(whiteout_spec)
    seen: set[int] = set()

    def inode_of(d: MergedDir) -> Inode:
        mode, uid, gid, mtime, mtime_nsec = d.meta
        return Inode(mode=mode, uid=uid, gid=gid, mtime=mtime, mtime_nsec=mtime_nsec,
                     xattrs=dict(d.xattrs), implicit=d.implicit)

    tree.root.inode = inode_of(merged.root)
    stack = [(merged.root, tree.root)]
    while stack:
        d, node = stack.pop()
        assert node.children is not None
        for name, child in d.children.items():
            if isinstance(child, MergedDir):
                sub = Node(name, inode_of(child), {})
                node.children[name] = sub
                stack.append((child, sub))
                continue
            assert isinstance(child, Inode)
            if id(child) in seen and not child.is_reg:
                child = child.copy()
            seen.add(id(child))
            node.children[name] = Node(name, child)
    return tree
