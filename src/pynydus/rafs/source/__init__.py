"""What a build reads: filesystem entries of an OCI layer tar or a local directory.

Both sources yield ``(Entry, DataReader | None)`` one entry at a time
(:mod:`~pynydus.rafs.source.entry`). :class:`TarSource` reads a plain, gzip or
zstd layer through :class:`pynydus.rafs.decoder.LayerStream`.
"""

from pynydus.rafs.source.dirsource import DirSource
from pynydus.rafs.source.entry import DataReader, Entry, EntryType, Whiteout, normalize_path
from pynydus.rafs.source.tarsource import TarSource

__all__ = [
    "DataReader",
    "DirSource",
    "Entry",
    "EntryType",
    "TarSource",
    "Whiteout",
    "normalize_path",
]
