"""The image bootstrap: per-layer bootstraps overlaid into one, chunks shared across layers.

Layers are converted in parallel, each deduplicated against itself and the chunk
dict only (a layer cannot wait for the layers below it without serialising the
whole conversion). This step then deduplicates *across* layers, lowest first: a
chunk of layer n whose digest a lower layer already holds is pointed at the lower
layer's copy, so the runtime fetches and caches it once. The bytes stay in layer
n's blob (rewriting blobs would change digests the cache and the registry already
know); ``shared_bytes`` reports how much was redirected.

The merge itself (whiteouts, opaque directories, layer order, one blob-table entry
per blob id) is :func:`pynydus.rafs.merge.merge`, exactly what ``image merge`` does;
the sharing is its :class:`~pynydus.rafs.merge.ChunkRedirect` hook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from pynydus.errors import InvalidArgument
from pynydus.rafs.builder import ChunkDesc, Tree
from pynydus.rafs.merge import merge
from pynydus.rafs.read import open_bootstrap

__all__ = ["LayerChunks", "MergedImage", "layer_chunks", "merge_layers"]


@dataclass(frozen=True)
class MergedImage:
    path: str
    size: int
    blob_ids: list[str]          # blob table order (layer blobs, then dict blobs)
    shared_bytes: list[int]      # per layer: chunk bytes redirected to lower layers
    shared_chunks: list[int]


class _LowerLayerChunks:
    """The merge hook that points a layer's chunks at a lower layer's copy of the same
    data (same digest and size, another blob), counting what it redirected per layer.

    The lower copy is the first one met: lowest layer first, files in walk order.
    """

    def __init__(self) -> None:
        self._lower: dict[bytes, ChunkDesc] = {}
        self.shared_bytes: list[int] = []
        self.shared_chunks: list[int] = []

    def layer(self, tree: Tree) -> None:
        n_bytes = n_chunks = 0
        mine: dict[bytes, ChunkDesc] = {}
        for _, node in tree.walk():
            chunks = node.inode.chunks
            for i, c in enumerate(chunks):
                lower = self._lower.get(c.digest)
                if lower is not None and lower.blob is not c.blob \
                        and lower.uncompressed_size == c.uncompressed_size:
                    chunks[i] = dataclasses.replace(lower, file_offset=c.file_offset)
                    n_bytes += c.uncompressed_size
                    n_chunks += 1
                else:
                    mine.setdefault(c.digest, c)
        for d, c in mine.items():
            self._lower.setdefault(d, c)
        self.shared_bytes.append(n_bytes)
        self.shared_chunks.append(n_chunks)


def merge_layers(bootstraps: Sequence[str], out: str, *,
                 prefetch_files: Sequence[str] = ("/",)) -> MergedImage:
    """Overlay per-layer ``bootstraps`` (lowest first) into ``out``.

    Deterministic for the same inputs. InvalidArgument if the layers disagree on
    chunk size or digester. Every layer's blobs stay in the blob table, also those
    whose files a later layer deleted (upstream's merged blob table lists them too).
    """
    if not bootstraps:
        raise InvalidArgument("merge: no layers")
    shared = _LowerLayerChunks()
    result = merge(bootstraps, out, prefetch_files=prefetch_files, redirect=shared)
    return MergedImage(result.bootstrap, result.bootstrap_size, result.blob_ids,
                       shared.shared_bytes, shared.shared_chunks)


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
