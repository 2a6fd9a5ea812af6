"""Merge per-layer RAFS bootstraps into one image.

``merge()`` is upstream's ``nydus-image merge``: the bootstraps of an image's layers,
lowest first, are overlaid with whiteouts applied in layer order, and the result is
one bootstrap whose blob table holds every layer's blobs (each blob once, lowest
layer first). No data is read or copied: chunk references keep pointing into the
layer blobs.

Whiteouts are recognised in both forms a layer can carry
(:mod:`pynydus.rafs.format.whiteout`). A whiteout hides only what is *below* its
layer and never appears in the merged image; the opaque xattr is dropped once
applied. A directory over a directory merges their children (upper metadata wins);
anything else replaces the lower entry whole.

Two ways to the same image. ``merge()`` works on the layers' records when they are
all RAFS v6 with 4 KiB blocks: :mod:`~pynydus.rafs.merge.skeleton` decodes directories
only and overlays them by name, :mod:`~pynydus.rafs.merge.writer` copies every other
inode's bytes with renumbered fields (a few microseconds per inode, no Python object
per file). :func:`merge_trees` loads each layer into a :class:`Tree` (~40 us per
inode, :func:`pynydus.rafs.builder.load_bootstrap`) and serves everything else (v5,
tarfs); for builder-made layers both write byte-identical bootstraps, which the tests
check.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from pynydus.errors import InvalidArgument
from pynydus.rafs.builder import (
    BlobDesc,
    BootstrapInfo,
    MergedTree,
    Tree,
    V6Options,
    blob_descs,
    bootstrap_compressor,
    bootstrap_digester,
    iter_nodes,
    layer_of_tree,
    load_bootstrap,
    overlay_layer,
    tree_of_merged,
    write_bootstrap,
)
from pynydus.rafs.format import Compressor, Digester
from pynydus.rafs.format import layout as L
from pynydus.rafs.merge.chunktable import LayerSource
from pynydus.rafs.merge.skeleton import scan_layer
from pynydus.rafs.merge.writer import write_merged
from pynydus.rafs.read import BootstrapV6, open_bootstrap
from pynydus.rafs.source import normalize_path

__all__ = ["ChunkRedirect", "MergeResult", "merge", "merge_trees"]

_RECORD_BLOCK = L.EROFS_BLOCK_SIZE_4096  # the block size of layers merged on their records


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


class ChunkRedirect(Protocol):
    """A merge's hook on chunk references: may point a layer's chunks at other copies of
    the same data (the converter shares chunks across layers this way)."""

    def layer(self, tree: Tree) -> None:
        """Called once per layer, lowest first, with the layer's tree before it is put
        on the layers below; every chunk's ``blob`` is an entry of the merged blob
        table. May replace items of any ``inode.chunks`` list."""


def merge(
    bootstraps: Sequence[str | os.PathLike[str]],
    bootstrap_out: str | os.PathLike[str],
    *,
    prefetch_files: Iterable[str | bytes] | None = None,
    output_json: str | os.PathLike[str] | None = None,
    redirect: ChunkRedirect | None = None,
) -> MergeResult:
    """Overlay ``bootstraps`` (lowest layer first) into one RAFS v6 ``bootstrap_out``.

    All layers must share chunk size and digester (InvalidArgument otherwise).
    The blob table lists each layer's blobs in layer order, each blob id once; a
    chunk whose blob id repeats points at the first entry. Reads only metadata;
    deterministic for the same inputs; the output is written atomically.

    Layers that are all RAFS v6 with 4 KiB blocks (what builders emit) merge on
    their records (:mod:`~pynydus.rafs.merge.skeleton`, :mod:`~pynydus.rafs.merge.writer`):
    directories are decoded, other inodes copied with renumbered fields, so the cost
    is a few microseconds per inode. Anything else (v5, tarfs' 512-byte blocks), and a
    merge with a ``redirect`` hook, goes through :func:`merge_trees`; both give the
    same image.
    """
    t0 = time.monotonic()
    if not bootstraps:
        raise InvalidArgument("merge: no bootstraps given")
    with ExitStack() as stack:
        opened = [stack.enter_context(open_bootstrap(p)) for p in bootstraps]
        v6 = [b for b in opened if isinstance(b, BootstrapV6) and b.block_size == _RECORD_BLOCK]
        if redirect is not None or len(v6) < len(opened):
            stack.close()
            return merge_trees(
                bootstraps,
                bootstrap_out,
                prefetch_files=prefetch_files,
                output_json=output_json,
                redirect=redirect,
            )
        layer_blobs = [blob_descs(b) for b in v6]
        _check_layers(bootstraps, [(b.chunk_size, bootstrap_digester(b)) for b in v6])
        blobs, _ = _blob_table(layer_blobs)
        index = {b.blob_id: i for i, b in enumerate(blobs)}
        merged = MergedTree()
        for k, b in enumerate(v6):
            overlay_layer(merged, scan_layer(b, k, len(v6)))
        sources = [
            LayerSource(b, [index[d.blob_id] for d in descs]) for b, descs in zip(v6, layer_blobs)
        ]
        first, last = v6[0], v6[-1]
        options = _options(
            first.chunk_size, bootstrap_compressor(last), bootstrap_digester(first), prefetch_files
        )
        info, used = write_merged(merged, sources, blobs, bootstrap_out, options)
    return _result(
        bootstrap_out, info, blobs, {blobs[i].blob_id for i in used}, len(v6), t0, output_json
    )


def _options(
    chunk_size: int,
    compressor: Compressor,
    digester: Digester,
    prefetch_files: Iterable[str | bytes] | None,
) -> V6Options:
    """The merged image's: the first layer's chunk size and digester, the last one's
    compressor (as upstream)."""
    return V6Options(
        chunk_size=chunk_size,
        compressor=compressor,
        digester=digester,
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
    redirect: ChunkRedirect | None = None,
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
    merged = MergedTree()
    for img in images:
        # Chunks of a repeated blob id must reference the table's single entry.
        for _, node in iter_nodes(img.tree.root):
            for c in node.inode.chunks:
                c.blob = by_id[c.blob.blob_id]
        if redirect is not None:
            redirect.layer(img.tree)
        overlay_layer(merged, layer_of_tree(img.tree))
    tree = tree_of_merged(merged)
    used = {c.blob.blob_id for _, n in iter_nodes(tree.root) for c in n.inode.chunks}
    first, last = images[0], images[-1]
    options = _options(first.chunk_size, last.compressor, first.digester, prefetch_files)
    if any(img.tarfs for img in images):
        # Tarfs layers stay tarfs: their blobs are tars addressed in 512-byte blocks.
        if not all(img.tarfs for img in images):
            raise InvalidArgument("merge: tarfs layers cannot be merged with other layers")
        options = replace(options, block_size=first.block_size, tarfs=True)
    info = write_bootstrap(tree, blobs, bootstrap_out, options)
    return _result(bootstrap_out, info, blobs, used, len(images), t0, output_json)
