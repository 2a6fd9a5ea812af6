"""The image bootstrap: per-layer bootstraps overlaid into one, chunks shared across layers.

Layers are converted in parallel, each deduplicated against itself and the chunk
dict only (a layer cannot wait for the layers below it without serialising the
whole conversion). This step then deduplicates *across* layers, lowest first: a
chunk of layer n whose digest a lower layer already holds is pointed at the lower
layer's copy, so the runtime fetches and caches it once. The bytes stay in layer
n's blob (rewriting blobs would change digests the cache and the registry already
know); ``shared_bytes`` reports how much was redirected.

The overlay itself (whiteouts, opaque directories, layer order, one blob-table entry
per blob id) is :func:`pynydus.rafs.builder.overlay`, exactly what ``merge()`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from pynydus.errors import InvalidArgument
from pynydus.rafs.builder import (
    BlobDesc,
    ChunkDesc,
    Tree,
    V6Options,
    bind_lower_links,
    load_bootstrap,
    overlay,
    write_bootstrap,
)
from pynydus.rafs.read import open_bootstrap
from pynydus.rafs.source import normalize_path

__all__ = ["LayerChunks", "MergedImage", "layer_chunks", "merge_layers"]


@dataclass(frozen=True)
class MergedImage:
    path: str
    size: int
    blob_ids: list[str]          # blob table order (layer blobs, then dict blobs)
    shared_bytes: list[int]      # per layer: chunk bytes redirected to lower layers
    shared_chunks: list[int]


def merge_layers(bootstraps: Sequence[str], out: str, *,
                 prefetch_files: Sequence[str] = ("/",)) -> MergedImage:
    """Overlay per-layer ``bootstraps`` (lowest first) into ``out``.

    Deterministic for the same inputs. InvalidArgument if the layers disagree on
    chunk size or digester.
    """
    if not bootstraps:
        raise InvalidArgument("merge: no layers")
    images = [load_bootstrap(p) for p in bootstraps]
    first = images[0]
    merged = Tree("none")
    table: list[BlobDesc] = []
    by_id: dict[str, BlobDesc] = {}
    seen: dict[bytes, ChunkDesc] = {}
    shared_bytes: list[int] = []
    shared_chunks: list[int] = []
    for path, img in zip(bootstraps, images):
        if img.chunk_size != first.chunk_size or img.digester != first.digester:
            raise InvalidArgument(
                f"merge: {os.fspath(path)!r} has chunk size {img.chunk_size:#x}/"
                f"{img.digester.name}, the first layer {first.chunk_size:#x}/{first.digester.name}")
        for b in img.blobs:
            if b.blob_id not in by_id:
                by_id[b.blob_id] = b
                table.append(b)
        n_bytes = n_chunks = 0
        mine: dict[bytes, ChunkDesc] = {}
        for _, node in img.tree.walk():
            chunks = node.inode.chunks
            for i, c in enumerate(chunks):
                c.blob = by_id[c.blob.blob_id]
                lower = seen.get(c.digest)
                if lower is not None and lower.blob is not c.blob \
                        and lower.uncompressed_size == c.uncompressed_size:
                    chunks[i] = ChunkDesc(lower.digest, lower.blob, lower.ci_index,
                                         lower.compressed_offset, lower.compressed_size,
                                         lower.uncompressed_offset, lower.uncompressed_size,
                                         lower.compressed, c.file_offset)
                    n_bytes += c.uncompressed_size
                    n_chunks += 1
                else:
                    mine.setdefault(c.digest, c)
        for d, c in mine.items():
            seen.setdefault(d, c)
        shared_bytes.append(n_bytes)
        shared_chunks.append(n_chunks)
        bind_lower_links(merged.root, img.tree.root)
        overlay(merged.root, img.tree.root)
    # Like merge(): every layer's blobs stay in the table, also those whose files a
    # later layer deleted (upstream's merged blob table lists them too).
    info = write_bootstrap(merged, table, out, V6Options(
        chunk_size=first.chunk_size, compressor=images[-1].compressor, digester=first.digester,
        prefetch=tuple(normalize_path(os.fsencode(p)) for p in prefetch_files)))
    return MergedImage(out, info.size, list(info.blob_ids), shared_bytes, shared_chunks)


@dataclass(frozen=True)
class LayerChunks:
    """Chunk digests of one per-layer bootstrap: those stored in the layer's own blob
    (with their uncompressed sizes) and every digest its files reference."""

    own: dict[bytes, int]
    referenced: frozenset[bytes]

    @property
    def own_bytes(self) -> int:
        return sum(self.own.values())

    def duplicated_bytes(self, lower: set[bytes] | frozenset[bytes]) -> int:
        """Bytes of own chunks that a lower layer already stores."""
        return sum(n for d, n in self.own.items() if d in lower)


def layer_chunks(bootstrap: str, blob_digest: str) -> LayerChunks:
    """Read the chunk digests of a per-layer bootstrap whose own blob is ``blob_digest``."""
    own_id = blob_digest.split(":", 1)[-1]
    own: dict[bytes, int] = {}
    seen: set[bytes] = set()
    with open_bootstrap(bootstrap) as bs:
        for _, ino in bs.walk():
            for c in bs.chunks(ino):
                if c.digest is None:
                    continue
                seen.add(c.digest)
                if c.blob_id == own_id:
                    own[c.digest] = c.uncompressed_size
    return LayerChunks(own, frozenset(seen))
