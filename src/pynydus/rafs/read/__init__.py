"""Read RAFS bootstraps (v5 and v6) and the blob files beside them.

:func:`open_bootstrap` maps a bootstrap file and returns its reader
(:class:`BootstrapV5` or :class:`BootstrapV6`, both a :class:`Bootstrap`); inodes,
directories and chunk maps are decoded on demand. :class:`BlobFiles` reads chunk
data from blob files; :func:`inspect_bootstrap`, :func:`check_image` and
:func:`unpack_image` are ``image inspect``, ``check`` and ``unpack``. A blob whose
chunks are slices of decoded spans (ZRAN, batch) is read through its :class:`SpanMap`
(:func:`has_spans`, :func:`load_span_map`).

The names below are imported from their modules when first used (PEP 562): pynydusd
imports this package for the reader and would otherwise carry ``unpack``'s tarfile,
``inspect`` and the span (ZRAN) code in every process.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pynydus.rafs.read.blobfiles import BlobFiles
    from pynydus.rafs.read.bootstrap import (
        BlobInfo,
        Bootstrap,
        ChunkRead,
        DirEntry,
        FileChunk,
        Stat,
    )
    from pynydus.rafs.read.chunkindex import ChunkIndex
    from pynydus.rafs.read.inspect import describe, inspect_bootstrap
    from pynydus.rafs.read.open import bootstrap_from_bytes, open_bootstrap
    from pynydus.rafs.read.spans import Span, SpanMap, has_spans, load_span_map
    from pynydus.rafs.read.unpack import CheckReport, check_image, unpack_image
    from pynydus.rafs.read.v5 import BootstrapV5
    from pynydus.rafs.read.v6 import BootstrapV6

# public name -> the module that defines it
_WHERE = {
    "BlobFiles": "blobfiles",
    **dict.fromkeys(("BlobInfo", "Bootstrap", "ChunkRead", "DirEntry", "FileChunk", "Stat"),
                    "bootstrap"),
    "ChunkIndex": "chunkindex",
    "describe": "inspect", "inspect_bootstrap": "inspect",
    "bootstrap_from_bytes": "open", "open_bootstrap": "open",
    **dict.fromkeys(("Span", "SpanMap", "has_spans", "load_span_map"), "spans"),
    "CheckReport": "unpack", "check_image": "unpack", "unpack_image": "unpack",
    "BootstrapV5": "v5",
    "BootstrapV6": "v6",
}

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
    "Span",
    "SpanMap",
    "Stat",
    "bootstrap_from_bytes",
    "check_image",
    "describe",
    "has_spans",
    "inspect_bootstrap",
    "load_span_map",
    "open_bootstrap",
    "unpack_image",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value  # the next lookup is a plain global
    return value
