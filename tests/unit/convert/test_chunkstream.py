"""check-image's blob streaming: windows planned from chunk extents, file digests from
chunks delivered in blob order, a corrupt chunk named, and the memory bound."""

from __future__ import annotations

import hashlib

import pytest
import zstandard

from pynydus.convert.chunkstream import (
    FileDigests,
    file_digest,
    plan_windows,
    stream_digests,
)
from pynydus.errors import FormatError
from pynydus.rafs.format import Compressor, Digester, digest
from pynydus.rafs.read import FileChunk


class Blobs:
    """Blobs made of zstd chunks; counts the fetches."""

    def __init__(self) -> None:
        self.data: dict[str, bytearray] = {}
        self.fetches: list[tuple[str, int, int]] = []

    def chunk(self, blob: str, payload: bytes, file_offset: int = 0) -> FileChunk:
        buf = self.data.setdefault(blob, bytearray())
        raw = zstandard.ZstdCompressor().compress(payload)
        c = FileChunk(file_offset=file_offset, blob_index=0, blob_id=blob, index=len(buf),
                      uncompressed_offset=0, uncompressed_size=len(payload),
                      compressed_offset=len(buf), compressed_size=len(raw),
                      digest=digest(payload, Digester.BLAKE3), compressed=True,
                      compressor=Compressor.ZSTD)
        buf += raw
        return c

    def fetch(self, blob: str, offset: int, length: int) -> bytes:
        self.fetches.append((blob, offset, length))
        return bytes(self.data[blob][offset:offset + length])


def at(c: FileChunk, file_offset: int) -> FileChunk:
    """The same extent used at another file offset."""
    return FileChunk(file_offset, c.blob_index, c.blob_id, c.index, c.uncompressed_offset,
                     c.uncompressed_size, c.compressed_offset, c.compressed_size, c.digest,
                     c.compressed, c.compressor)


def blake3(_: FileChunk) -> Digester:
    return Digester.BLAKE3


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_windows_cover_each_extent_once_in_offset_order_and_split_at_gaps_and_size() -> None:
    b = Blobs()
    chunks = [b.chunk("a", bytes([i]) * 5000) for i in range(6)]
    b.data["a"] += bytes(3 << 20)  # a gap wider than MAX_GAP before the last chunk
    far = b.chunk("a", b"far" * 1000)
    other = b.chunk("b", b"other")
    wins = plan_windows([far, *reversed(chunks), chunks[0], other])
    assert [(w.blob_id, len(w.chunks)) for w in wins] == [("a", 6), ("a", 1), ("b", 1)]
    assert wins[0].start == 0 and wins[0].end == chunks[-1].compressed_offset + \
        chunks[-1].compressed_size  # type: ignore[operator]
    small = plan_windows(chunks, max_window=2 * (chunks[0].compressed_size or 0))
    assert all(len(w.chunks) <= 2 for w in small) and sum(len(w.chunks) for w in small) == 6


def test_two_records_of_one_offset_with_different_sizes_are_a_format_error() -> None:
    b = Blobs()
    c = b.chunk("a", b"x" * 100)
    bad = FileChunk(0, 0, "a", 0, 0, 100, 0, (c.compressed_size or 0) + 1, c.digest, True,
                    Compressor.ZSTD)
    with pytest.raises(FormatError, match="two chunk records at offset 0"):
        plan_windows([c, bad])


def test_files_hash_in_file_order_whatever_the_blob_order_and_shared_chunks() -> None:
    b = Blobs()
    second = b.chunk("a", b"B" * 4096)  # stored before the file's first chunk
    first = b.chunk("a", b"A" * 4096)
    shared = b.chunk("a", b"S" * 100)
    files = FileDigests()
    files.add(1, [first, at(second, 4096)], 8192)
    files.add(2, [shared], 100)
    files.add(3, [at(shared, 0)], 100)
    files.add(4, [], 0)
    files.add(5, [at(second, 0), at(second, 4096), at(first, 8192)], 3 * 4096)
    stats = stream_digests(files, [first, second, shared], b.fetch, blake3)
    assert stats.chunks == 3 and len(b.fetches) == 1
    got = files.digests()
    assert got[1] == sha(b"A" * 4096 + b"B" * 4096)
    assert got[2] == got[3] == sha(b"S" * 100)
    assert got[4] == sha(b"")
    assert got[5] == sha(b"B" * 8192 + b"A" * 4096)
    assert files.deferred() == []


def test_a_file_whose_chunks_do_not_cover_it_is_refused() -> None:
    b = Blobs()
    c = b.chunk("a", b"x" * 10)
    with pytest.raises(FormatError, match="chunks cover 10 bytes, inode size 11"):
        FileDigests().add(1, [c], 11)
    with pytest.raises(FormatError, match="at file offset 20, expected 10"):
        FileDigests().add(1, [c, at(c, 20)], 30)


def test_a_corrupt_chunk_is_named_by_blob_and_offset() -> None:
    b = Blobs()
    good = b.chunk("a", b"g" * 1000)
    bad = b.chunk("a", b"h" * 1000)
    b.data["a"][bad.compressed_offset + 5] ^= 0xFF  # type: ignore[operator]
    files = FileDigests()
    files.add(1, [good], 1000)
    files.add(2, [bad], 1000)
    with pytest.raises(FormatError, match=f"chunk {bad.index} of blob a at offset "
                                          f"{bad.compressed_offset}"):
        stream_digests(files, [good, bad], b.fetch, blake3)


def test_a_chunk_whose_data_does_not_match_its_digest_is_refused() -> None:
    b = Blobs()
    c = b.chunk("a", b"g" * 1000)
    lying = FileChunk(0, 0, "a", 0, 0, 1000, c.compressed_offset, c.compressed_size,
                      digest(b"other", Digester.BLAKE3), True, Compressor.ZSTD)
    files = FileDigests()
    files.add(1, [lying], 1000)
    with pytest.raises(FormatError, match="digest mismatch"):
        stream_digests(files, [lying], b.fetch, blake3)


def test_past_the_memory_bound_a_waiting_file_is_deferred_and_read_on_its_own() -> None:
    b = Blobs()
    parts = [b.chunk("a", bytes([65 + i]) * 1000) for i in range(4)]
    backwards = [at(c, 1000 * k) for k, c in enumerate(reversed(parts))]
    files = FileDigests(max_waiting=1500)
    files.add(7, backwards, 4000)
    files.add(8, [parts[2]], 1000)
    stream_digests(files, [*parts], b.fetch, blake3)
    assert files.deferred() == [7]
    assert files.digests() == {8: sha(bytes([67]) * 1000)}
    want = sha(b"".join(bytes([65 + i]) * 1000 for i in reversed(range(4))))
    assert file_digest(backwards, b.fetch, blake3) == want
