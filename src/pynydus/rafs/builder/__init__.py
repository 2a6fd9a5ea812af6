"""Build RAFS v6 images: ``image build`` and the pieces a merge reuses.

:func:`build` streams a source (:mod:`pynydus.rafs.source`) through the
:class:`BlobWriter` (chunks, dedup, compression: the data blob) into a
:class:`Tree` (metadata only), which :func:`write_bootstrap` lays out as the
bootstrap. :func:`load_bootstrap` reads a bootstrap back into a tree, for a parent
image, a chunk dict or a tree merge; :func:`overlay` puts one layer's tree on
another with the whiteout rules.
"""

from pynydus.rafs.builder.blobwriter import (
    DEFAULT_CHUNK_SIZE,
    BlobDesc,
    BlobStats,
    BlobWriter,
    ChunkDesc,
    ChunkDict,
)
from pynydus.rafs.builder.create import BlobReport, BuildProgress, BuildResult, SourceType, build
from pynydus.rafs.builder.load import (
    LoadedImage,
    blob_descs,
    bootstrap_compressor,
    bootstrap_digester,
    chunk_dict_from_bootstrap,
    chunk_dict_from_tree,
    load_bootstrap,
)
from pynydus.rafs.builder.tree import Inode, Node, Tree, bind_lower_links, iter_nodes, overlay
from pynydus.rafs.builder.v6writer import BootstrapInfo, V6Options, write_bootstrap

__all__ = [
    "DEFAULT_CHUNK_SIZE",
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
    "LoadedImage",
    "Node",
    "SourceType",
    "Tree",
    "V6Options",
    "bind_lower_links",
    "blob_descs",
    "bootstrap_compressor",
    "bootstrap_digester",
    "build",
    "chunk_dict_from_bootstrap",
    "chunk_dict_from_tree",
    "iter_nodes",
    "load_bootstrap",
    "overlay",
    "write_bootstrap",
]
