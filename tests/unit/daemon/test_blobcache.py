"""Blob cache over a real localfs blob: fetch once, persist, merge, verify."""

import os
import threading
from pathlib import Path

import pytest

from pynydus.daemon.blobcache import BlobCache, ChunkRef, LocalFsBackend, plan_ranges
from pynydus.daemon.chunkmap import HEADER_SIZE, ChunkMap
from pynydus.errors import FormatError, Unavailable
from pynydus.rafs.format import Compressor, Digester, compress, decompress, digest
from pynydus.rafs.read import BlobInfo
from tests.harness.counting import CountingBackend

CHUNK = 64 << 10
BLOB_ID = "ab" * 32



def make_blob(tmp: Path, n: int = 8, algo: Compressor = Compressor.LZ4_BLOCK):
    data = [bytes([i % 251]) * (CHUNK // 2) + os.urandom(CHUNK // 2) for i in range(n)]
    blob = bytearray()
    chunks = []
    for i, d in enumerate(data):
        payload, compressed = compress(d, algo)
        chunks.append(ChunkRef(i, len(blob), len(payload), i * CHUNK, len(d), compressed,
                               digest(d, Digester.BLAKE3)))
        blob += payload
    (tmp / "blobs").mkdir(exist_ok=True)
    (tmp / "blobs" / BLOB_ID).write_bytes(blob)
    ref = BlobInfo(index=0, blob_id=BLOB_ID, compressor=algo, digester=Digester.BLAKE3,
                   chunk_size=CHUNK, chunk_count=n, compressed_size=len(blob),
                   uncompressed_size=n * CHUNK)
    return data, chunks, ref


def cache(tmp: Path, ref: BlobInfo, chunks, backend, **kw) -> BlobCache:
    return BlobCache(str(tmp / "cache"), ref, backend, lambda i: chunks[i] if i < len(chunks) else None, **kw)


def test_read_fetches_once_and_persists(tmp_path: Path) -> None:
    data, chunks, ref = make_blob(tmp_path)
    be = CountingBackend(str(tmp_path / "blobs"))
    bc = cache(tmp_path, ref, chunks, be, amplify_io=0)
    assert bc.read([(chunks[2], 100, 1000)]) == data[2][100:1100]
    assert len(be.requests) == 1
    assert bc.read([(chunks[2], 0, CHUNK)]) == data[2]
    assert len(be.requests) == 1  # second read: from the cache
    bc.close()
    # A new cache over the same work dir (daemon restart) reuses the chunk.
    bc2 = cache(tmp_path, ref, chunks, be, amplify_io=0)
    assert bc2.chunk_map.is_ready(2) and not bc2.chunk_map.is_ready(1)
    assert bc2.read([(chunks[2], 5, 5)]) == data[2][5:10]
    assert len(be.requests) == 1
    size = os.path.getsize(tmp_path / "cache" / f"{BLOB_ID}.blob.data.chunk_map")
    assert size == HEADER_SIZE + 1


def test_amplification_merges_following_chunks(tmp_path: Path) -> None:
    _data, chunks, ref = make_blob(tmp_path)
    be = CountingBackend(str(tmp_path / "blobs"))
    bc = cache(tmp_path, ref, chunks, be, amplify_io=4 * CHUNK)
    bc.read([(chunks[0], 0, 10)])
    assert len(be.requests) == 1
    ready = [i for i in range(8) if bc.chunk_map.is_ready(i)]
    assert ready[0] == 0 and len(ready) > 1
    bc.read([(chunks[i], 0, CHUNK) for i in ready])
    assert len(be.requests) == 1


def test_amplification_window_adapts_to_whether_neighbours_are_read(tmp_path: Path) -> None:
    """Misses whose amplified neighbours nobody reads halve the window down to a probe;
    once a probe's neighbour is read, the window grows back."""
    _data, chunks, ref = make_blob(tmp_path, n=96, algo=Compressor.NONE)
    be = CountingBackend(str(tmp_path / "blobs"))
    bc = cache(tmp_path, ref, chunks, be, amplify_io=8 * CHUNK)

    def miss(i: int) -> int:
        """Read chunk i (a miss); how many chunks the request brought."""
        before = len(be.requests)
        bc.read([(chunks[i], 0, 10)])
        assert len(be.requests) == before + 1
        return be.requests[-1][1] // CHUNK

    assert miss(0) == 8  # the full window: 0 and 7 neighbours
    # random reads far apart: the neighbours are never read, the window shrinks
    sizes = [miss(i) for i in (10, 20, 30, 40)]
    assert sizes == [4, 2, 2, 2], sizes  # halved each time; the probe still brings one
    # now read sequentially: each probe's neighbour is read, the window grows again
    grown = []
    i = 50
    while i < 96:
        n = miss(i)
        grown.append(n)
        for j in range(i + 1, min(i + n, 96)):
            bc.read([(chunks[j], 0, 10)])  # cache hits on the neighbours
        i += n
    assert grown[0] == 2 and max(grown) == 8, grown  # back to the full window
    bc.close()


def test_concurrent_misses_fetch_once(tmp_path: Path) -> None:
    data, chunks, ref = make_blob(tmp_path)
    be = CountingBackend(str(tmp_path / "blobs"))
    bc = cache(tmp_path, ref, chunks, be, amplify_io=0)
    results: list[bytes] = []
    barrier = threading.Barrier(8)

    def reader() -> None:
        barrier.wait()
        results.append(bc.read([(chunks[5], 0, CHUNK)]))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data[5]] * 8
    assert be.requests.count((chunks[5].c_off, chunks[5].c_size)) == 1


def test_corrupt_chunk_refetched_then_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, chunks, ref = make_blob(tmp_path, algo=Compressor.NONE)
    blob = tmp_path / "blobs" / BLOB_ID
    raw = bytearray(blob.read_bytes())
    raw[chunks[3].c_off + 7] ^= 0xFF
    blob.write_bytes(raw)
    be = CountingBackend(str(tmp_path / "blobs"))
    bc = cache(tmp_path, ref, chunks, be, validate=True, amplify_io=0)
    with pytest.raises(FormatError, match="chunk 3: digest mismatch"):
        bc.read([(chunks[3], 0, 10)])
    assert len(be.requests) == 2 and bc.stats.digest_failures == 2
    assert not bc.chunk_map.is_ready(3)
    assert f"blob {BLOB_ID} chunk 3" in caplog.text
    assert bc.read([(chunks[4], 0, 10)]) == data[4][:10]  # others still fine


def test_truncated_blob_is_an_error_not_a_hole(tmp_path: Path) -> None:
    data, chunks, ref = make_blob(tmp_path)
    blob = tmp_path / "blobs" / BLOB_ID
    blob.write_bytes(blob.read_bytes()[: chunks[6].c_off + 10])
    bc = cache(tmp_path, ref, chunks, LocalFsBackend(str(tmp_path / "blobs")), amplify_io=0)
    with pytest.raises(Unavailable, match="backend returned"):
        bc.read([(chunks[6], 0, 10)])
    assert not bc.chunk_map.is_ready(6)
    assert bc.read([(chunks[1], 0, 10)]) == data[1][:10]


def test_corrupt_chunk_map_is_reset(tmp_path: Path) -> None:
    path = str(tmp_path / "m")
    m = ChunkMap(path, 20)
    m.set_ready([0, 19])
    m.close()
    with open(path, "r+b") as f:
        f.write(b"junk")
    m2 = ChunkMap(path, 20)
    assert m2.ready_count == 0
    m2.set_ready(list(range(20)))
    assert m2.all_ready
    m2.close()
    assert ChunkMap(path, 20).all_ready


def test_plan_ranges_bridges_small_gaps_only() -> None:
    c = [ChunkRef(i, off, 100, 0, 100, False) for i, off in enumerate([0, 100, 300, 200000])]
    groups = plan_ranges(c, 1 << 20)
    assert [[x.index for x in g] for g in groups] == [[0, 1, 2], [3]]
    assert [[x.index for x in g] for g in plan_ranges(c, 250)] == [[0, 1], [2], [3]]


def test_span_is_fetched_and_decoded_once_for_all_its_chunks(tmp_path: Path) -> None:
    """Batch/ZRAN chunks: one request for the span; decoding it stores its other chunks
    too (unless chunks are validated: their digests are not at hand)."""
    from pynydus.rafs.read.spans import BATCH, Span

    members = [os.urandom(1000), b"m" * 3000, b"tail"]
    buf = b"".join(members)
    packed, _ = compress(buf, Compressor.ZSTD)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / BLOB_ID).write_bytes(b"\0" * 100 + bytes(packed))
    span = Span(BATCH, 0, 100, len(packed), len(buf))
    offs = [0, 1000, 4000]
    refs = [ChunkRef(i, span.offset, span.size, i * 4096, len(m), True,
                     digest(m, Digester.BLAKE3), span, o)
            for i, (m, o) in enumerate(zip(members, offs))]
    ref = BlobInfo(index=0, blob_id=BLOB_ID, compressor=Compressor.ZSTD,
                   digester=Digester.BLAKE3, chunk_size=CHUNK, chunk_count=3,
                   compressed_size=100 + len(packed), uncompressed_size=3 * 4096)
    decodes: list[Span] = []

    class Decoder:
        def resume(self, s: Span, out_from: int) -> None:
            return None

        def decode_from(self, s: Span, raw: bytes | memoryview, want: int,
                        stream: object = None) -> tuple[int, bytes]:
            decodes.append(s)
            return 0, decompress(raw, Compressor.ZSTD, len(buf))

    for validate, stored in ((False, [True, True, True]), (True, [False, True, False])):
        work = tmp_path / f"v{validate}"
        be = CountingBackend(str(tmp_path / "blobs"))
        bc = BlobCache(str(work), ref, be, lambda i: None, spans=Decoder(),
                       span_members=lambda s: refs, validate=validate)
        decodes.clear()
        assert bc.read([(refs[1], 10, 100)]) == members[1][10:110]
        assert be.requests == [(100, len(packed))] and len(decodes) == 1
        assert [bc.chunk_map.is_ready(i) for i in range(3)] == stored
        assert bc.read([(refs[2], 0, 4)]) == b"tail"
        assert bc.read([(refs[0], 0, 1000)]) == members[0]
        bc.close()
    # Two chunks of one span in one read: one request, one decode.
    be = CountingBackend(str(tmp_path / "blobs"))
    bc = BlobCache(str(tmp_path / "both"), ref, be, lambda i: None, spans=Decoder())
    decodes.clear()
    assert bc.read([(refs[0], 0, 1000), (refs[1], 0, 3000)]) == members[0] + members[1]
    assert len(be.requests) == 1 and len(decodes) == 1
    bc.close()
