"""The uncompressed bytes of a layer tar: gzip or zstd decoded ahead of its reader.

:class:`LayerStream` decodes on a thread, or, for a big layer in a regular file with
a second CPU free, in a child process (``python -m pynydus.rafs.decoder.decodeproc``).
The decoding path (``layerstream``, ``decodeproc``) imports nothing else of
:mod:`pynydus.rafs`, so that child starts with the decoder alone; ``gzindex`` (the
gzip index a ZRAN build makes) uses :mod:`pynydus.rafs.format`'s libz.
"""

from pynydus.rafs.decoder.layerstream import (
    DECODE_ERRORS,
    LayerStream,
    absolute_seek,
    compression_of,
    usable_cpus,
)

__all__ = ["DECODE_ERRORS", "LayerStream", "absolute_seek", "compression_of", "usable_cpus"]
