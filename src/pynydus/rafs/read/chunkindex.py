"""The chunk table of a RAFS v6 bootstrap, indexed by (blob index, chunk index), and
a blob's chunks by uncompressed offset.

A v6 regular file names each of its chunks by (blob, chunk index, block address) in
its chunk index array; the chunk's compressed extent, digest and flags are in the
bootstrap's chunk table, one 80-byte :class:`~pynydus.rafs.format.RafsChunkInfo`
record per chunk, sorted by digest. Reading a file, amplifying a read in the daemon
and copying a file's chunks in a merge all ask for a chunk's record by (blob, chunk
index): :class:`ChunkIndex` answers, built in one pass over the table that decodes
three fields of each record (``struct.iter_unpack``: ~10 ms for 50,000 records;
decoding whole records into objects took 0.3-0.4 s).

Per blob, the record offsets (and the uncompressed offsets the records give) are an
array by chunk index when the blob has about as many records as chunks (a layer's
own blob), a dict when the table holds a few chunks of a big blob (a chunk dict's),
so a large ``chunk_count`` costs nothing and a corrupt one cannot exhaust memory.
The first record of a chunk wins, as in nydusd. A table with two records for one
chunk at different uncompressed offsets (no builder we know writes one) keeps the
later ones aside, so that a lookup by the file's offset still finds its record.

A blob read as its flat uncompressed address space (pynydusd's blob files) asks the other
way round, which chunks cover a range of the blob: :func:`blob_layout` lists a blob's
chunks sorted by uncompressed offset, decoded the same way, and where files begin in it
(a record at file offset 0 starts a file's data): the blob does not say where files end,
but a reader of the blob can tell a file's end from the next file's start.
"""

from __future__ import annotations

import operator
import struct
import sys
from array import array
from collections import namedtuple
from collections.abc import Sequence
from itertools import compress, islice
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

from pynydus.rafs.format.layout import RAFS_V6_CHUNK_INFO_SIZE, ReadableBuffer

__all__ = ["BlobLayout", "ChunkIndex", "PerChunk", "blob_layout"]

# blob_index, uncompressed_offset and index of an 80-byte chunk record
_KEY = struct.Struct("<32xI12x8xQ8xI4x")
# blob_index, uncompressed_size, uncompressed_offset, file_offset and index of an 80-byte
# chunk record
_ROW = struct.Struct("<32xI8xI8xQQI4x")
_MAX_OFFSET = (1 << 63) - 1
_NO_OFFSET = -2  # stands for an offset beyond int64 in the arrays: no file has it
#: chunk index -> value; an array (-1: none) when dense, a dict when sparse
PerChunk: TypeAlias = "array[int] | dict[int, int]"


class ChunkIndex:
    """Where the record of each chunk is in a bootstrap's chunk table.

    ``records[blob][index]`` is the byte offset of the record of chunk ``index`` of
    blob ``blob`` in the bootstrap, ``u_offsets[blob][index]`` the uncompressed offset
    it gives (-1, or missing from a dict, when the table has no record for the chunk).
    Records naming a blob or chunk index outside ``chunk_counts`` are left out.
    Read-only once built; safe to share between threads.
    """

    __slots__ = ("_aside", "_exact", "records", "u_offsets")

    def __init__(
        self, buf: ReadableBuffer, start: int, size: int, chunk_counts: Sequence[int]
    ) -> None:
        rows = list(_KEY.iter_unpack(bytes(buf[start : start + size])))
        n_blobs = len(chunk_counts)
        self.records: list[PerChunk] = []
        self.u_offsets: list[PerChunk] = []
        for n in chunk_counts:
            dense = n <= 4 * len(rows) + 4096
            self.records.append(array("q", [-1]) * n if dense else {})
            self.u_offsets.append(array("q", [-1]) * n if dense else {})
        # Backwards, so that the first record of a chunk is the one left standing.
        kept = 0
        for pos in range(len(rows) - 1, -1, -1):
            blob, u_off, index = rows[pos]
            if blob < n_blobs and index < chunk_counts[blob]:
                self.records[blob][index] = start + pos * RAFS_V6_CHUNK_INFO_SIZE
                self.u_offsets[blob][index] = u_off if u_off <= _MAX_OFFSET else _NO_OFFSET
                kept += 1
        self._aside: dict[tuple[int, int, int], int] = {}
        chunks = sum(_count(r) for r in self.records)
        if kept != chunks:
            self._set_aside(rows, start, chunk_counts)
        self._exact = chunks == len(rows)  # each record the only one of its chunk

    def _set_aside(
        self, rows: list[tuple[int, int, int]], start: int, counts: Sequence[int]
    ) -> None:
        """Keep the records of chunks that the table holds more than once, at an
        uncompressed offset their first record does not give (first one wins)."""
        for pos, (blob, u_off, index) in enumerate(rows):
            if blob < len(counts) and index < counts[blob] and self._first(blob, index)[1] != u_off:
                self._aside.setdefault((blob, index, u_off), start + pos * RAFS_V6_CHUNK_INFO_SIZE)

    def _first(self, blob: int, index: int) -> tuple[int, int]:
        recs, u_offs = self.records[blob], self.u_offsets[blob]
        if isinstance(recs, dict):
            return recs.get(index, -1), u_offs.get(index, -1)  # type: ignore[union-attr]
        return recs[index], u_offs[index]

    def layout(self, buf: ReadableBuffer, start: int, size: int, blob: int) -> BlobLayout | None:
        """Blob ``blob``'s layout, as :func:`blob_layout` gives it, from this index and the
        table it indexes (``buf[start:start + size]``), when every chunk of the blob has
        one record and their uncompressed offsets rise with their index (a builder
        writes a blob's chunks in order): no sort, ~10 ms of CPU for 50,000 chunks
        against ~60 ms. None otherwise."""
        offs, recs = self.u_offsets[blob], self.records[blob]
        if not self._exact or isinstance(offs, dict) or isinstance(recs, dict) or not offs \
                or offs[0] < 0 or sys.byteorder != "little" \
                or not all(map(operator.lt, offs, islice(offs, 1, None))):
            return None
        raw = memoryview(bytes(buf[start : start + size - size % RAFS_V6_CHUNK_INFO_SIZE]))
        words, longs = raw.cast("I"), raw.cast("Q")  # the records' fields, little-endian
        at = [(r - start) // RAFS_V6_CHUNK_INFO_SIZE for r in recs]  # record numbers
        sizes = array("q", map(words[11::20].__getitem__, at))  # uncompressed_size
        firsts = map(longs[8::10].__getitem__, at)  # file_offset
        return BlobLayout(array("q", offs), sizes, array("q", range(len(offs))),
                          array("q", compress(offs, map(operator.not_, firsts))))

    def find(self, blob: int, index: int, u_off: int | None = None) -> int:
        """Offset of the record of chunk ``index`` of blob ``blob``, -1 if there is none;
        with ``u_off``, of a record that puts the chunk at that uncompressed offset."""
        if not 0 <= blob < len(self.records) or index < 0:
            return -1
        try:
            rec, at = self._first(blob, index)
        except IndexError:
            return -1
        if u_off is None or at == u_off:
            return rec
        return self._aside.get((blob, index, u_off), -1)


def _count(per_chunk: PerChunk) -> int:
    """Chunks with a record."""
    return len(per_chunk) if isinstance(per_chunk, dict) else len(per_chunk) - per_chunk.count(-1)


if TYPE_CHECKING:
    class BlobLayout(NamedTuple):
        """A blob's chunks by uncompressed offset (``starts``, ``sizes`` and chunk
        ``indexes``, one entry per offset) and the offsets where a file's data begins."""

        starts: array[int]
        sizes: array[int]
        indexes: array[int]
        file_starts: array[int]
else:
    # the same tuple without typing.NamedTuple, which compiles each string annotation (PEP
    # 563), and the first compile() of a daemon builds the ast module's node classes
    # (0.2 MB of its resident memory; daemon/fusetypes.py)
    BlobLayout = namedtuple("BlobLayout", "starts sizes indexes file_starts")


def blob_layout(buf: ReadableBuffer, start: int, size: int, blob: int) -> BlobLayout:
    """Blob ``blob``'s layout from the chunk table at ``buf[start:start + size]``: its
    chunks sorted by uncompressed offset, then size, then chunk index (of records that
    start at the same offset, one chunk named twice, the first in that order is kept),
    and where a file's data begins (records at file offset 0; a chunk two files share
    is a start if any of its records is one). One pass over the table: ~60 ms of CPU for
    a blob of 50,000 chunks, ~15 ms for a small blob beside it."""
    rows = sorted((u_off, u_size, index, file_off) for b, u_size, u_off, file_off, index
                  in _ROW.iter_unpack(bytes(buf[start : start + size])) if b == blob)
    if not rows:
        return BlobLayout(array("q"), array("q"), array("q"), array("q"))
    offs, sizes, indexes, firsts = zip(*rows)
    file_starts = array("q", dict.fromkeys(compress(offs, map(operator.not_, firsts))))
    if len(set(offs)) == len(offs):
        return BlobLayout(array("q", offs), array("q", sizes), array("q", indexes), file_starts)
    kept = [i for i in range(len(offs)) if i == 0 or offs[i] != offs[i - 1]]
    return BlobLayout(array("q", (offs[i] for i in kept)), array("q", (sizes[i] for i in kept)),
                      array("q", (indexes[i] for i in kept)), file_starts)
