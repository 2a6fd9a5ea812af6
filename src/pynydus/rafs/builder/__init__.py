"""Build RAFS v6 images: ``image build`` and the pieces a merge reuses.

:func:`build` streams a source (:mod:`pynydus.rafs.source`) through the
:class:`BlobWriter` (chunks, dedup, compression: the data blob) into a
:class:`Tree` (metadata only), which :func:`write_bootstrap` lays out as the
bootstrap. :func:`load_bootstrap` reads a bootstrap back into a tree, for a parent
image, a chunk dict or a tree merge; :func:`overlay_layer` puts one layer on the
layers below it with the whiteout rules (:mod:`~pynydus.rafs.builder.overlay`), for a
build on a parent and for every merge.
"""

from typing import TYPE_CHECKING, Any

from pynydus.rafs.builder.blobwriter import (
    DEFAULT_CHUNK_SIZE,
    BlobDesc,
    BlobStats,
    BlobWriter,
    ChunkDesc,
    ChunkDict,
)
from pynydus.rafs.builder.create import BlobReport, BuildProgress, BuildResult, SourceType, build
from pynydus.rafs.builder.tree import Inode, Node, Tree, iter_nodes
from pynydus.rafs.builder.v6writer import BootstrapInfo, V6Options, write_bootstrap

# The loader (it reads bootstraps: all of pynydus.rafs.read), the overlay and ZRAN
# (the layer decoders) load when one of their names is first asked for: ``image
# build`` of a directory uses none of them.
_LAZY = {
    "pynydus.rafs.builder.load": (
        "LoadedImage", "blob_descs", "bootstrap_compressor", "bootstrap_digester",
        "chunk_dict_from_bootstrap", "chunk_dict_from_tree", "load_bootstrap",
    ),
    "pynydus.rafs.builder.overlay": (
        "LayerDir", "LayerSkeleton", "Leaf", "MergedDir", "MergedTree", "find",
        "layer_of_tree", "looks_implicit", "merged_of_tree", "overlay_layer",
        "tree_of_merged",
    ),
}
_MODULE_OF = {name: (module, name) for module, names in _LAZY.items() for name in names}
_MODULE_OF["ZRAN_CONTEXT_SIZE"] = ("pynydus.rafs.builder.zranblob", "DEFAULT_CONTEXT_SIZE")

if TYPE_CHECKING:
    from pynydus.rafs.builder.load import (
        LoadedImage,
        blob_descs,
        bootstrap_compressor,
        bootstrap_digester,
        chunk_dict_from_bootstrap,
        chunk_dict_from_tree,
        load_bootstrap,
    )
    from pynydus.rafs.builder.overlay import (
        LayerDir,
        LayerSkeleton,
        Leaf,
        MergedDir,
        MergedTree,
        find,
        layer_of_tree,
        looks_implicit,
        merged_of_tree,
        overlay_layer,
        tree_of_merged,
    )
    from pynydus.rafs.builder.zranblob import DEFAULT_CONTEXT_SIZE as ZRAN_CONTEXT_SIZE


def __getattr__(name: str) -> Any:
    where = _MODULE_OF.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where[0]), where[1])
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ZRAN_CONTEXT_SIZE",
    "BlobDesc",
    "BlobReport",
    "BlobStats",
    "BlobWriter",
    "BootstrapInfo",
    "BuildProgress",
    "BuildResult",
    "ChunkDesc",
    "ChunkDict",
    "Inode",
    "LayerDir",
    "LayerSkeleton",
    "Leaf",
    "LoadedImage",
    "MergedDir",
    "MergedTree",
    "Node",
    "SourceType",
    "Tree",
    "V6Options",
    "blob_descs",
    "bootstrap_compressor",
    "bootstrap_digester",
    "build",
    "chunk_dict_from_bootstrap",
    "chunk_dict_from_tree",
    "find",
    "iter_nodes",
    "layer_of_tree",
    "load_bootstrap",
    "looks_implicit",
    "merged_of_tree",
    "overlay_layer",
    "tree_of_merged",
    "write_bootstrap",
]
