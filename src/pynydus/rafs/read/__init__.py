"""Read RAFS bootstraps (v5 and v6) and the blob files beside them.

:func:`open_bootstrap` maps a bootstrap file and returns its reader
(:class:`BootstrapV5` or :class:`BootstrapV6`, both a :class:`Bootstrap`); inodes,
directories and chunk maps are decoded on demand. :class:`BlobFiles` reads chunk
data from blob files; :func:`inspect_bootstrap`, :func:`check_image` and
:func:`unpack_image` are ``image inspect``, ``check`` and ``unpack``.
"""

from pynydus.rafs.read.blobfiles import BlobFiles
from pynydus.rafs.read.bootstrap import BlobInfo, Bootstrap, ChunkRead, DirEntry, FileChunk, Stat
from pynydus.rafs.read.chunkindex import ChunkIndex
from pynydus.rafs.read.inspect import describe, inspect_bootstrap
from pynydus.rafs.read.open import bootstrap_from_bytes, open_bootstrap
from pynydus.rafs.read.unpack import CheckReport, check_image, unpack_image
from pynydus.rafs.read.v5 import BootstrapV5
from pynydus.rafs.read.v6 import BootstrapV6

__all__ = [
    "BlobFiles",
    "BlobInfo",
    "Bootstrap",
    "BootstrapV5",
    "BootstrapV6",
    "CheckReport",
    "ChunkIndex",
    "ChunkRead",
    "DirEntry",
    "FileChunk",
    "Stat",
    "bootstrap_from_bytes",
    "check_image",
    "describe",
    "inspect_bootstrap",
    "open_bootstrap",
    "unpack_image",
]
