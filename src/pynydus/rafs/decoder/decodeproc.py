"""The decoder process of :class:`pynydus.rafs.decoder.layerstream.LayerStream` (run with ``-m``).

``python -m pynydus.rafs.decoder.decodeproc CODEC OFFSET`` reads a compressed layer from
standard input (a regular file, read with pread from OFFSET, so the parent's file
offset is left alone), decodes it with the same code the in-process decoder uses
and writes the uncompressed tar to standard output. A malformed stream ends it with
status 3 and ``KIND\\0MESSAGE`` on standard error (KIND is the exception's class
name), which the parent raises again as the same exception. A parent that stopped
reading (its end of the socket closed) ends it quietly.
"""

from __future__ import annotations

import os
import sys

from pynydus.rafs.decoder.layerstream import DECODE_ERRORS, DECODERS, _pread_inputs

# What ends the child with a report the parent raises again.
_REPORTED: tuple[type[BaseException], ...] = (EOFError, *DECODE_ERRORS)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: list[str]) -> int:
    codec, offset = argv[0], int(argv[1])
    decode = DECODERS[codec]
    try:
        for block in decode(_pread_inputs(0, offset)):
            _write_all(1, block)
    except BrokenPipeError:
        return 0  # the consumer stopped early; nothing to report
    except _REPORTED as err:
        sys.stderr.write(f"{type(err).__name__}\0{err}")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
