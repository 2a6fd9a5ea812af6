"""File data of an image from blob files in a directory (``--blob-dir``).

Used by ``image check`` (verify every chunk) and ``image unpack`` (write a tar):
each chunk is read at its compressed extent, decoded and, when asked, checked
against the digest the bootstrap records for it. A chunk of a ZRAN or batch blob is
a slice of a decoded span instead (:mod:`pynydus.rafs.read.spans`); the last spans
decoded are kept, as neighbouring chunks share them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Self

from pynydus.errors import FormatError, NotFound, NotImplementedFeature
from pynydus.rafs.format import Compressor, decode_chunk
from pynydus.rafs.read.bootstrap import Bootstrap, FileChunk
from pynydus.rafs.read.spans import Span, SpanCache, has_spans, load_span_map


class BlobFiles:
    """Open blob files of one image by blob id; close() releases them."""

    def __init__(self, bs: Bootstrap, blob_dir: str) -> None:
        self.bs = bs
        self.blob_dir = blob_dir
        self._fds: dict[str, int] = {}
        self._spans: dict[int, SpanCache] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fd(self, blob_id: str) -> int:
        fd = self._fds.get(blob_id)
        if fd is None:
            path = os.path.join(self.blob_dir, blob_id)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError as err:
                raise NotFound(f"blob {blob_id} is not in {self.blob_dir}") from err
            self._fds[blob_id] = fd
        return fd

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        raw = os.pread(self._fd(blob_id), length, offset)
        if len(raw) != length:
            raise FormatError(f"blob {blob_id} is truncated (wanted {length} bytes at offset "
                              f"{offset}, got {len(raw)})")
        return raw

    def _span_cache(self, blob_index: int) -> SpanCache:
        cache = self._spans.get(blob_index)
        if cache is None:
            info = self.bs.blobs[blob_index]
            spans = load_span_map(info, self.read_range)

            def read_span(span: Span) -> bytes:
                return self.read_range(info.blob_id, span.offset, span.size)

            cache = self._spans[blob_index] = SpanCache(spans, read_span)
        return cache

    def chunk_data(self, c: FileChunk, *, verify: bool = False) -> bytes:
        """The uncompressed bytes of chunk ``c``; FormatError if they are wrong."""
        where = f"blob {c.blob_id} chunk {c.index}"
        info = self.bs.blobs[c.blob_index]
        if has_spans(info):
            cache = self._span_cache(c.blob_index)
            at = cache.spans.locate(c.index)
            if at is not None:
                data = cache.chunk(at[0], at[1], c.uncompressed_size)
                return decode_chunk(
                    data, compressed=False, compressor=Compressor.NONE,
                    uncompressed_size=c.uncompressed_size,
                    expected_digest=(c.digest or b"") if verify else b"",
                    digester=info.digester, what=f"{where} ({at[0].kind} {at[0].index})")
        if c.compressed_offset is None or c.compressed_size is None:
            raise NotImplementedFeature(f"blob {c.blob_id} chunk {c.index}: no chunk record in the bootstrap")
        raw = os.pread(self._fd(c.blob_id), c.compressed_size, c.compressed_offset)
        if len(raw) != c.compressed_size:
            raise FormatError(
                f"blob {c.blob_id} chunk {c.index}: blob is truncated (wanted {c.compressed_size} bytes "
                f"at offset {c.compressed_offset}, got {len(raw)})"
            )
        where += f" at offset {c.compressed_offset}"
        return decode_chunk(
            raw, compressed=bool(c.compressed), compressor=c.compressor,
            uncompressed_size=c.uncompressed_size,
            expected_digest=(c.digest or b"") if verify else b"",
            digester=self.bs.blobs[c.blob_index].digester, what=where,
        )

    def file_data(self, ino: int) -> Iterator[bytes]:
        """The bytes of regular file ``ino``, chunk by chunk (holes as zeros)."""
        size = self.bs.stat(ino).size
        pos = 0
        for r in self.bs.map_read(ino, 0, size):
            start = r.chunk.file_offset + r.offset
            if start > pos:
                yield bytes(start - pos)
                pos = start
            data = self.chunk_data(r.chunk)[r.offset:r.offset + r.length]
            yield data
            pos += len(data)
        if pos < size:
            yield bytes(size - pos)
