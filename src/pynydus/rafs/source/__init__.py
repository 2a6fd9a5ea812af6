"""What a build reads: filesystem entries of an OCI layer tar or a local directory.

Both sources yield ``(Entry, DataReader | None)`` one entry at a time
(:mod:`~pynydus.rafs.source.entry`). :class:`TarSource` reads a plain, gzip or
zstd layer through :class:`pynydus.rafs.decoder.LayerStream`.
"""

from typing import TYPE_CHECKING, Any

from pynydus.rafs.source.dirsource import DirSource
from pynydus.rafs.source.entry import DataReader, Entry, EntryType, Whiteout, normalize_path

if TYPE_CHECKING:
    from pynydus.rafs.source.tarsource import TarSource


def __getattr__(name: str) -> Any:
    # TarSource pulls in tarfile and the layer decoders: a directory build does without.
    if name == "TarSource":
        from pynydus.rafs.source.tarsource import TarSource

        return TarSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataReader",
    "DirSource",
    "Entry",
    "EntryType",
    "TarSource",
    "Whiteout",
    "normalize_path",
]
