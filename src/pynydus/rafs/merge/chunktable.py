"""Layer sources and the merged chunk table, for :mod:`pynydus.rafs.merge.writer`.

A merged regular file keeps its layer's chunk index array; only the device id byte
of each entry changes (layer blob index -> merged blob table index). The merged
chunk table holds one 80-byte record per distinct (digest, merged blob, chunk
index) used by a surviving file, sorted, taken from the layers' own records, with
the fields the tree writer sets: the COMPRESSED flag only, ``file_offset`` of the
first file (in slot order) that uses the chunk, crc32 zero.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

from pynydus.errors import FormatError
from pynydus.rafs.format import layout as L
from pynydus.rafs.read import BootstrapV6

__all__ = ["ChunkTable", "LayerSource"]

_ADDR = L.RafsV6InodeChunkAddr.codec()
_CHUNK = L.RafsChunkInfo.codec()
_COMPRESSED = int(L.ChunkFlags.COMPRESSED)  # the only chunk flag a merged record keeps
# Sort key prefix of a pending record (after the digest): merged blob, chunk index.
_ORDER = struct.Struct(">BI")
_TAIL = struct.Struct("<IIIIQQQII")  # a record after its digest
_KEY_LEN = 32 + _ORDER.size


@dataclass
class LayerSource:
    """One layer's bootstrap and where its blobs went in the merged blob table."""

    bs: BootstrapV6
    blob_map: list[int]  # local blob index -> merged blob index

    def __post_init__(self) -> None:
        buf = self.bs.buffer
        # Digest slices must be bytes: an mmap or bytes, never a bytearray.
        self.buf: bytes | mmap.mmap = bytes(buf) if isinstance(buf, bytearray) else buf
        self.meta_base = self.bs.superblock.meta_blkaddr * self.bs.block_size
        tbl = bytearray(range(256))
        for local, merged in enumerate(self.blob_map):
            tbl[local + 1] = merged + 1
        # bytes.translate table for the device id byte of a chunk index entry
        self.dev_table = bytes(tbl)
        self.chunks = self.bs.chunk_index()


class ChunkTable:
    """The merged chunk table, filled file by file in slot order."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._seen: set[int] = set()  # (merged blob << 24) | chunk index
        self._records: list[bytes] = []
        self.used_blobs: set[int] = set()

    def add_file(self, src: LayerSource, array_off: int, count: int) -> None:
        """Record the chunks of one file: its ``count``-entry chunk index array at
        ``array_off`` in ``src``'s bootstrap. FormatError for a chunk without a
        chunk-table record, as the tree merge raises."""
        buf = src.buf
        records, u_offsets = src.chunks.records, src.chunks.u_offsets
        blob_map = src.blob_map
        seen = self._seen
        unpack_addr = _ADDR.unpack_from
        for i in range(count):
            lo, hi, blk = unpack_addr(buf, array_off + 8 * i)
            dev = hi & 0xFF
            ci = ((hi >> 8) << 16) | lo
            try:  # the reader's lookup, inlined: this runs once per chunk of the image
                rec = records[dev - 1][ci] if dev and u_offsets[dev - 1][ci] == blk << 12 else -1
            except (IndexError, KeyError):  # no such index, or no record for it
                rec = -1
            if rec < 0 and dev:  # a chunk the table holds twice, at other offsets
                rec = src.chunks.find(dev - 1, ci, blk << 12)
            if rec < 0:
                raise FormatError(f"chunk {ci} of blob {dev - 1} has no chunk record")
            # (blob, chunk index) names one chunk, so it stands for (digest, blob, index).
            gblob = blob_map[dev - 1]
            key = (gblob << 24) | ci
            if key in seen:
                continue
            seen.add(key)
            self.used_blobs.add(gblob)
            dig, _, flags, cs, us, co, uo, _, idx, _ = _CHUNK.unpack_from(buf, rec)
            self._records.append(
                dig
                + _ORDER.pack(gblob, ci)
                + _TAIL.pack(
                    gblob, flags & _COMPRESSED, cs, us, co, uo, i * self.chunk_size, idx, 0
                )
            )

    def __len__(self) -> int:
        return len(self._records)

    def emit(self, out: bytearray) -> None:
        """Append the records to ``out``, sorted by (digest, blob, chunk index);
        the table is empty afterwards."""
        recs = self._records
        recs.sort()  # each item starts with its sort key: digest, blob, index (big-endian)
        for r in recs:
            out += r[:32]
            out += r[_KEY_LEN:]
        recs.clear()
