"""Faster misses in the blob cache: answered before the chunk is persisted (delayed
persist), concurrent neighbouring misses gathered into one request while the blob's
backend is busy."""

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pynydus.daemon import blobcache
from pynydus.daemon.blobcache import BlobCache, ChunkRef, LocalFsBackend
from pynydus.rafs.format import Compressor, Digester, compress, digest
from pynydus.rafs.read import BlobInfo
from tests.harness.counting import CountingBackend

CHUNK = 64 << 10
BLOB_ID = "cd" * 32



def make_blob(tmp: Path, n: int = 8) -> tuple[list[bytes], list[ChunkRef], BlobInfo]:
    data = [bytes([i % 251]) * (CHUNK // 2) + os.urandom(CHUNK // 2) for i in range(n)]
    blob = bytearray()
    chunks = []
    for i, d in enumerate(data):
        payload, compressed = compress(d, Compressor.LZ4_BLOCK)
        chunks.append(ChunkRef(i, len(blob), len(payload), i * CHUNK, len(d), compressed,
                               digest(d, Digester.BLAKE3)))
        blob += payload
    (tmp / "blobs").mkdir(exist_ok=True)
    (tmp / "blobs" / BLOB_ID).write_bytes(blob)
    ref = BlobInfo(index=0, blob_id=BLOB_ID, compressor=Compressor.LZ4_BLOCK,
                   digester=Digester.BLAKE3, chunk_size=CHUNK, chunk_count=n,
                   compressed_size=len(blob), uncompressed_size=n * CHUNK)
    return data, chunks, ref


def cache(tmp: Path, ref: BlobInfo, chunks: list[ChunkRef], backend: LocalFsBackend,
          **kw: Any) -> BlobCache:
    return BlobCache(str(tmp / "cache"), ref, backend,
                     lambda i: chunks[i] if i < len(chunks) else None, **kw)


class HeldPersist:
    """A persist queue the test runs by hand."""

    def __init__(self, accept: bool = True) -> None:
        self.jobs: list[Callable[[], None]] = []
        self.accept = accept

    def __call__(self, job: Callable[[], None], nbytes: int) -> bool:
        if self.accept:
            self.jobs.append(job)
        return self.accept

    def run(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()


def test_a_miss_is_answered_before_its_chunk_is_written(tmp_path: Path) -> None:
    data, chunks, ref = make_blob(tmp_path)
    be = CountingBackend(str(tmp_path / "blobs"))
    held = HeldPersist()
    bc = cache(tmp_path, ref, chunks, be, amplify_io=0, persist=held)
    assert bc.read([(chunks[3], 10, 100), (chunks[4], 0, CHUNK)]) == data[3][10:110] + data[4]
    assert len(be.requests) == 1 and held.jobs
    assert not bc.chunk_map.is_ready(3)  # not written yet
    assert bc.read_cached([(chunks[3], 0, 10)]) is None
    # another reader meanwhile takes the decoded bytes, no second request
    assert bc.read([(chunks[3], 0, CHUNK)]) == data[3]
    assert len(be.requests) == 1
    held.run()
    assert bc.chunk_map.is_ready(3) and bc.chunk_map.is_ready(4)
    assert bc.read_cached([(chunks[3], 0, CHUNK)]) == data[3]
    assert len(be.requests) == 1
    bc.close()


def test_background_work_waits_for_a_delayed_write(tmp_path: Path) -> None:
    _data, chunks, ref = make_blob(tmp_path)
    be = CountingBackend(str(tmp_path / "blobs"))
    held = HeldPersist()
    bc = cache(tmp_path, ref, chunks, be, amplify_io=0, persist=held)
    bc.read([(chunks[1], 0, 1)])
    threading.Timer(0.05, held.run).start()
    assert bc.ensure([chunks[1]], amplify=False) == 0  # prefetch: waits for the write
    assert bc.chunk_map.is_ready(1) and len(be.requests) == 1
    bc.close()


def test_a_failed_delayed_write_leaves_the_chunk_to_fetch_again(tmp_path: Path) -> None:
    data, chunks, ref = make_blob(tmp_path)
    be = CountingBackend(str(tmp_path / "blobs"))
    held = HeldPersist()
    bc = cache(tmp_path, ref, chunks, be, amplify_io=0, persist=held)
    assert bc.read([(chunks[2], 0, CHUNK)]) == data[2]
    fd, bc._fd = bc._fd, -1  # the write fails: the cache is closed under it
    held.run()
    bc._fd = fd
    assert not bc.chunk_map.is_ready(2)
    assert bc.read([(chunks[2], 0, CHUNK)]) == data[2]
    assert len(be.requests) == 2
    bc.close()


def test_a_full_persist_queue_writes_at_once(tmp_path: Path) -> None:
    data, chunks, ref = make_blob(tmp_path)
    be = CountingBackend(str(tmp_path / "blobs"))
    bc = cache(tmp_path, ref, chunks, be, amplify_io=0, persist=HeldPersist(accept=False))
    assert bc.read([(chunks[0], 0, CHUNK)]) == data[0]
    assert bc.chunk_map.is_ready(0)
    bc.close()


class SlowFirstBackend(CountingBackend):
    """Holds its first request until released: the blob's backend is busy."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.first = threading.Event()
        self.release = threading.Event()

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        if not self.first.is_set():
            self.first.set()
            self.release.wait(5)
        return super().read_range(blob_id, offset, length)


class GatherGate:
    """Stands in for blobcache's ``time``: the leader's gathering wait
    (``time.sleep(_GATHER_SECONDS)``) lasts until the test opens the gate, so the
    neighbours join the batch however loaded the machine is; every other call is
    ``time``'s own."""

    WINDOW = 1234.5  # the _GATHER_SECONDS the gate recognises

    def __init__(self) -> None:
        self.open = threading.Event()

    def sleep(self, seconds: float) -> None:
        if seconds == self.WINDOW:
            assert self.open.wait(60), "the test never opened the gathering window"
        else:
            time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_concurrent_neighbouring_misses_share_one_request_while_busy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = GatherGate()
    monkeypatch.setattr(blobcache, "_GATHER_SECONDS", GatherGate.WINDOW)
    monkeypatch.setattr(blobcache, "time", gate)
    data, chunks, ref = make_blob(tmp_path, n=12)
    be = SlowFirstBackend(str(tmp_path / "blobs"))
    bc = cache(tmp_path, ref, chunks, be, amplify_io=0)
    results: dict[int, bytes] = {}

    def read(i: int) -> None:
        results[i] = bytes(bc.read([(chunks[i], 0, CHUNK)]))

    first = threading.Thread(target=read, args=(0,))
    first.start()
    assert be.first.wait(5)  # chunk 0's request is in flight
    readers = [threading.Thread(target=read, args=(i,)) for i in (5, 6, 7)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + 60
    while (batch := bc._batch) is None or len(batch.chunks) < 3:  # all three gathered
        assert time.monotonic() < deadline, "the three misses did not gather"
        time.sleep(0.01)
    gate.open.set()
    be.release.set()
    for t in [first, *readers]:
        t.join(5)
    assert results == {i: data[i] for i in (0, 5, 6, 7)}
    # chunk 0, then 5-7 together (gathered while chunk 0's request was out)
    assert sorted(be.requests) == [
        (0, chunks[0].c_size),
        (chunks[5].c_off, chunks[7].c_off + chunks[7].c_size - chunks[5].c_off)]
    bc.close()


def test_a_miss_on_an_idle_blob_does_not_wait(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blobcache, "_GATHER_SECONDS", 5.0)  # a wait would show
    _data, chunks, ref = make_blob(tmp_path)
    be = CountingBackend(str(tmp_path / "blobs"))
    bc = cache(tmp_path, ref, chunks, be, amplify_io=0)
    t0 = time.perf_counter()
    for i in range(8):
        bc.read([(chunks[i], 0, 1)])
    assert len(be.requests) == 8
    assert time.perf_counter() - t0 < 5.0  # no gathering wait on the way
    bc.close()
