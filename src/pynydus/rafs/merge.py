"""Merge per-layer RAFS bootstraps into one image; load bootstraps back into trees.

``merge()`` is upstream's ``nydus-image merge``: the bootstraps of an image's layers,
lowest first, are overlaid with whiteouts applied in layer order, and the result is
one bootstrap whose blob table holds every layer's blobs (each blob once, lowest
layer first). No data is read or copied: chunk references keep pointing into the
layer blobs.

Whiteouts are recognised in both forms a layer can carry:

* OCI names: ``.wh.NAME`` removes NAME from the layers below, ``.wh..wh..opq`` in a
  directory hides everything the layers below put in it;
* overlayfs form (our builder's default): a char device 0/0 named NAME removes NAME,
  ``trusted.overlay.opaque=y`` on a directory hides the lower directory's content.

A whiteout hides only what is *below* its layer and never appears in the merged
image; the opaque xattr is dropped once applied. A directory over a directory merges
their children (upper metadata wins); anything else replaces the lower entry whole.

Two ways to the same image. ``merge()`` works on the layers' records when they are
all RAFS v6 with 4 KiB blocks: :mod:`~pynydus.rafs.layerscan` decodes directories
only and overlays them by name, :mod:`~pynydus.rafs.mergewrite` copies every other
inode's bytes with renumbered fields (a few microseconds per inode, no Python object
per file). :func:`merge_trees` loads each layer into a :class:`Tree` (~40 us per
inode) and serves everything else (v5, tarfs); for builder-made layers both write
byte-identical bootstraps, which the tests check.

The tree machinery also gives ``build(parent_bootstrap=…)`` its parent tree and
``build(chunk_dict=<bootstrap>)`` its chunk dict.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

from pynydus.errors import InvalidArgument
from pynydus.rafs import layout as L
from pynydus.rafs.chunker import BlobDesc, ChunkDict, ChunkRef
from pynydus.rafs.compress import Compressor, Digester
from pynydus.rafs.layerscan import MergedTree, overlay_layer, scan_layer
from pynydus.rafs.layout import compressor_from_flags, digester_from_flags
from pynydus.rafs.mergechunks import LayerSource
from pynydus.rafs.mergewrite import write_merged
from pynydus.rafs.reader import Bootstrap
from pynydus.rafs.tarstream import OCI_WHITEOUT_OPAQUE, OCI_WHITEOUT_PREFIX, normalize_path
from pynydus.rafs.tree import OVERLAY_OPAQUE_XATTR, Inode, Node, Tree, bind_lower_links
from pynydus.rafs.v6 import BootstrapV6
from pynydus.rafs.v6writer import BootstrapInfo, V6Options, write_bootstrap

__all__ = [
    "LoadedImage",
    "MergeResult",
    "chunk_dict_from_bootstrap",
    "load_bootstrap",
    "merge",
    "merge_trees",
    "overlay",
]


@dataclass
class LoadedImage:
    """A bootstrap turned back into a builder tree plus its blob table."""

    tree: Tree
    blobs: list[BlobDesc]
    chunk_size: int
    compressor: Compressor
    digester: Digester
    version: int


def blob_descs(bs: Bootstrap) -> list[BlobDesc]:
    """The blob table of an open bootstrap as :class:`BlobDesc` records, in order."""
    return [
        BlobDesc(
            blob_id=b.blob_id,
            chunk_size=b.chunk_size,
            compressor=Compressor(b.compressor),
            digester=Digester(b.digester),
            chunk_count=b.chunk_count,
            features=b.features,
            compressed_size=b.compressed_size,
            uncompressed_size=b.uncompressed_size,
            blob_toc_size=b.blob_toc_size,
            blob_toc_digest=b.blob_toc_digest,
            ci_compressor=Compressor(b.ci_compressor),
            ci_offset=b.ci_offset,
            ci_compressed_size=b.ci_compressed_size,
            ci_uncompressed_size=b.ci_uncompressed_size,
            blob_meta_digest=b.blob_meta_digest,
            blob_meta_size=b.blob_meta_size,
            cipher_algo=b.cipher_algo,
        )
        for b in bs.blobs
    ]


def load_bootstrap(path: str | os.PathLike[str]) -> LoadedImage:
    """Read a RAFS bootstrap (v5 or v6) into a :class:`Tree` and :class:`BlobDesc` list.

    Hardlinked regular files come back sharing one Inode. Chunk records missing
    compressed location or digest (possible in upstream v6 images without a chunk
    table entry) raise :class:`InvalidArgument`, as they cannot be re-referenced.
    """
    with Bootstrap.open(path) as bs:
        blobs = blob_descs(bs)
        tree = Tree("none")
        regs: dict[int, Inode] = {}
        # nydus-image writes one v6 inode record per name of a hardlinked file, all
        # with the same i_ino: that, not the nid, is the file's identity.
        by_i_ino: dict[int, Inode] = {}
        dirs: dict[bytes, Node] = {b"/": tree.root}
        for fs_path, ino in bs.walk():
            inode = regs.get(ino) or _load_inode(bs, ino, blobs)
            if inode.is_reg:
                if inode.nlink > 1 and isinstance(bs, BootstrapV6):
                    inode = by_i_ino.setdefault(bs.raw_inode(ino).ino, inode)
                regs[ino] = inode
            if fs_path == b"/":
                tree.root.inode = inode
                continue
            parent_path, _, name = fs_path.rpartition(b"/")
            parent = dirs[parent_path or b"/"]
            node = Node(name, inode, {} if inode.is_dir else None)
            assert parent.children is not None
            parent.children[name] = node
            if inode.is_dir:
                dirs[fs_path] = node
        return LoadedImage(
            tree=tree,
            blobs=blobs,
            chunk_size=bs.chunk_size,
            compressor=_compressor(bs),
            digester=_digester(bs),
            version=bs.version,
        )


def _load_inode(bs: Bootstrap, ino: int, blobs: list[BlobDesc]) -> Inode:
    st = bs.stat(ino)
    inode = Inode(
        mode=st.mode,
        uid=st.uid,
        gid=st.gid,
        mtime=st.mtime,
        mtime_nsec=st.mtime_nsec,
        size=0 if st.is_dir else st.size,
        rdev=st.rdev,
        xattrs=dict(bs.xattrs(ino)),
        nlink=st.nlink,  # recounted when written; here it flags hardlinked files
    )
    if st.is_dir and _looks_implicit(inode):
        inode.implicit = True
    if st.is_symlink:
        inode.link = bs.readlink(ino)
    elif st.is_reg:
        for c in bs.chunks(ino):
            if c.compressed_offset is None or c.compressed_size is None or c.digest is None:
                raise InvalidArgument(
                    f"inode {ino}: chunk {c.index} of blob {c.blob_id} has no chunk record"
                )
            inode.chunks.append(
                ChunkRef(
                    digest=c.digest,
                    blob=blobs[c.blob_index],
                    ci_index=c.index,
                    compressed_offset=c.compressed_offset,
                    compressed_size=c.compressed_size,
                    uncompressed_offset=c.uncompressed_offset,
                    uncompressed_size=c.uncompressed_size,
                    compressed=bool(c.compressed),
                    file_offset=c.file_offset,
                )
            )
    return inode


def _looks_implicit(inode: Inode) -> bool:
    """True for the placeholder metadata our builder gives directories that a layer only
    implies (no entry of their own, e.g. a tar without ``./``): 0755, root, mtime 0.

    A bootstrap cannot record implicitness, so a merge recognises the placeholder and
    keeps the lower layer's metadata for it; a real directory with exactly these
    attributes loses nothing but its (epoch) mtime.
    """
    return (
        inode.mode == stat.S_IFDIR | 0o755
        and inode.uid == 0
        and inode.gid == 0
        and inode.mtime == 0
        and inode.mtime_nsec == 0
        and not inode.xattrs
    )


def chunk_dict_from_bootstrap(path: str | os.PathLike[str]) -> ChunkDict:
    """Every chunk a bootstrap references, keyed by digest (first occurrence wins)."""
    return chunk_dict_from_tree(load_bootstrap(path).tree)


def chunk_dict_from_tree(tree: Tree) -> ChunkDict:
    """Every chunk of ``tree``, keyed by digest (first occurrence in walk order wins)."""
    out: ChunkDict = {}
    for _, node in tree.walk():
        for c in node.inode.chunks:
            out.setdefault(c.digest, c)
    return out


# --------------------------------------------------------------------------- overlay


def _is_overlay_whiteout(node: Node) -> bool:
    return stat.S_ISCHR(node.inode.mode) and node.inode.rdev == 0


def overlay(lower: Node, upper: Node) -> None:
    """Apply directory ``upper`` (one layer) on top of directory ``lower``, in place.

    ``lower`` takes ``upper``'s metadata (unless upper's directory was only implied
    by its children's paths); whiteouts in ``upper`` hide lower entries
    and are not copied; other upper entries are added or replace/merge into lower.
    Upper nodes are reused (not copied), so ``upper`` must not be used afterwards.
    """
    assert lower.children is not None and upper.children is not None
    if upper.inode.xattrs.get(OVERLAY_OPAQUE_XATTR) == b"y":
        lower.children.clear()  # an opaque upper directory hides everything below it
    if not upper.inode.implicit or lower.inode.implicit:
        lower.inode = upper.inode
    lower.inode.xattrs.pop(OVERLAY_OPAQUE_XATTR, None)
    kept: list[Node] = []
    for name, u in upper.children.items():
        if name == OCI_WHITEOUT_OPAQUE:
            lower.children.clear()
        elif name.startswith(OCI_WHITEOUT_PREFIX):
            lower.children.pop(name[len(OCI_WHITEOUT_PREFIX) :], None)
        elif _is_overlay_whiteout(u):
            lower.children.pop(name, None)
        else:
            kept.append(u)
    for u in kept:
        old = lower.children.get(u.name)
        if u.is_dir and old is not None and old.is_dir:
            overlay(old, u)
        elif u.is_dir:
            fresh = Node(u.name, Inode(mode=u.inode.mode), {})
            overlay(fresh, u)  # strips whiteouts at the lowest layer, too
            lower.children[u.name] = fresh
        else:
            lower.children[u.name] = u


# --------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    """Outcome of :func:`merge`; ``to_json()`` is the ``--output-json`` document."""

    bootstrap: str
    bootstrap_size: int
    blob_ids: list[str]
    inodes: int
    chunk_count: int
    elapsed_seconds: float
    layers: int
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def merge(
    bootstraps: Sequence[str | os.PathLike[str]],
    bootstrap_out: str | os.PathLike[str],
    *,
    prefetch_files: Iterable[str | bytes] | None = None,
    output_json: str | os.PathLike[str] | None = None,
) -> MergeResult:
    """Overlay ``bootstraps`` (lowest layer first) into one RAFS v6 ``bootstrap_out``.

    All layers must share chunk size and digester (InvalidArgument otherwise).
    The blob table lists each layer's blobs in layer order, each blob id once; a
    chunk whose blob id repeats points at the first entry. Reads only metadata;
    deterministic for the same inputs; the output is written atomically.

    Layers that are all RAFS v6 with 4 KiB blocks (what builders emit) merge on
    their records (:mod:`~pynydus.rafs.layerscan`, :mod:`~pynydus.rafs.mergewrite`):
    directories are decoded, other inodes copied with renumbered fields, so the cost
    is a few microseconds per inode. Anything else (v5, tarfs' 512-byte blocks)
    goes through :func:`merge_trees`; both give the same image.
    """
    t0 = time.monotonic()
    if not bootstraps:
        raise InvalidArgument("merge: no bootstraps given")
    with ExitStack() as stack:
        opened = [stack.enter_context(Bootstrap.open(p)) for p in bootstraps]
        if not all(
            isinstance(b, BootstrapV6) and b.block_size == L.EROFS_BLOCK_SIZE_4096 for b in opened
        ):
            stack.close()
            return merge_trees(
                bootstraps, bootstrap_out, prefetch_files=prefetch_files, output_json=output_json
            )
        v6 = [b for b in opened if isinstance(b, BootstrapV6)]
        layer_blobs = [blob_descs(b) for b in v6]
        _check_layers(bootstraps, [(b.chunk_size, _digester(b)) for b in v6])
        blobs, _ = _blob_table(layer_blobs)
        index = {b.blob_id: i for i, b in enumerate(blobs)}
        merged = MergedTree()
        for k, b in enumerate(v6):
            overlay_layer(merged, scan_layer(b, k, len(v6)))
        sources = [
            LayerSource(b, [index[d.blob_id] for d in descs]) for b, descs in zip(v6, layer_blobs)
        ]
        info, used = write_merged(
            merged, sources, blobs, bootstrap_out, _options(v6[0], v6[-1], prefetch_files)
        )
    return _result(
        bootstrap_out, info, blobs, {blobs[i].blob_id for i in used}, len(v6), t0, output_json
    )


def _compressor(bs: Bootstrap) -> Compressor:
    comp = compressor_from_flags(bs.flags)
    return Compressor(comp if comp is not None else Compressor.NONE)


def _digester(bs: Bootstrap) -> Digester:
    dig = digester_from_flags(bs.flags)
    return Digester(dig if dig is not None else Digester.BLAKE3)


def _options(
    first: Bootstrap, last: Bootstrap, prefetch_files: Iterable[str | bytes] | None
) -> V6Options:
    return V6Options(
        chunk_size=first.chunk_size,
        compressor=_compressor(last),
        digester=_digester(first),
        prefetch=tuple(normalize_path(os.fsencode(p)) for p in (prefetch_files or ())),
    )


def _check_layers(
    paths: Sequence[str | os.PathLike[str]], geometry: Sequence[tuple[int, Digester]]
) -> None:
    chunk_size, digester = geometry[0]
    for p, (cs, dig) in zip(paths, geometry):
        if cs != chunk_size:
            raise InvalidArgument(
                f"merge: {os.fspath(p)!r} has chunk size {cs:#x}, first layer {chunk_size:#x}"
            )
        if dig != digester:
            raise InvalidArgument(f"merge: {os.fspath(p)!r} uses digester {dig.name}")


def _blob_table(layers: Sequence[list[BlobDesc]]) -> tuple[list[BlobDesc], dict[str, BlobDesc]]:
    """Every layer's blobs in layer order, each blob id once (the first entry wins)."""
    blobs: list[BlobDesc] = []
    by_id: dict[str, BlobDesc] = {}
    for layer in layers:
        for b in layer:
            if b.blob_id not in by_id:
                by_id[b.blob_id] = b
                blobs.append(b)
    return blobs, by_id


def _result(
    bootstrap_out: str | os.PathLike[str],
    info: BootstrapInfo,
    blobs: list[BlobDesc],
    used: set[str],
    layers: int,
    t0: float,
    output_json: str | os.PathLike[str] | None,
) -> MergeResult:
    result = MergeResult(
        bootstrap=os.fspath(bootstrap_out),
        bootstrap_size=info.size,
        blob_ids=list(info.blob_ids),
        inodes=info.inodes,
        chunk_count=info.chunk_table_entries,
        elapsed_seconds=time.monotonic() - t0,
        layers=layers,
        warnings=[
            f"blob {b.blob_id} is not referenced by any file"
            for b in blobs
            if b.blob_id not in used
        ],
    )
    if output_json is not None:
        with open(output_json, "w") as f:
            json.dump(result.to_json(), f, indent=2)
    return result


def merge_trees(
    bootstraps: Sequence[str | os.PathLike[str]],
    bootstrap_out: str | os.PathLike[str],
    *,
    prefetch_files: Iterable[str | bytes] | None = None,
    output_json: str | os.PathLike[str] | None = None,
) -> MergeResult:
    """:func:`merge` by loading every layer into a :class:`Tree` (any RAFS version).

    Costs ~40 us and a few hundred bytes per inode of every layer; :func:`merge`
    uses it only for layers its record-level path does not take.
    """
    t0 = time.monotonic()
    if not bootstraps:
        raise InvalidArgument("merge: no bootstraps given")
    images = [load_bootstrap(p) for p in bootstraps]
    _check_layers(bootstraps, [(img.chunk_size, img.digester) for img in images])
    blobs, by_id = _blob_table([img.blobs for img in images])
    merged = Tree("none")
    for img in images:
        bind_lower_links(merged.root, img.tree.root)  # tree.py: links into lower layers
        overlay(merged.root, img.tree.root)
    # Chunks of a repeated blob id must reference the table's single entry.
    for _, node in merged.walk():
        for c in node.inode.chunks:
            c.blob = by_id[c.blob.blob_id]
    used = {c.blob.blob_id for _, n in merged.walk() for c in n.inode.chunks}
    first, last = images[0], images[-1]
    prefetch = tuple(normalize_path(os.fsencode(p)) for p in (prefetch_files or ()))
    info = write_bootstrap(
        merged,
        blobs,
        bootstrap_out,
        V6Options(
            chunk_size=first.chunk_size,
            compressor=last.compressor,
            digester=first.digester,
            prefetch=prefetch,
        ),
    )
    return _result(bootstrap_out, info, blobs, used, len(images), t0, output_json)
