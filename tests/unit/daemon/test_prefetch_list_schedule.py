"""How pynydusd fetches a prefetch list: in the list's order, never on the wire while the
image's foreground has a request there, skipping what a miss already fetches, going on
from where the workload is, and stopping when the workload's reads show the list stale."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from pynydus.daemon import prefetch
from pynydus.daemon.blobcache import LocalFsBackend
from pynydus.daemon.config import parse_daemon_config
from pynydus.daemon.instance import RafsInstance
from pynydus.daemon.metrics import CacheStats
from pynydus.daemon.prefetch import ListPrefetch, Prefetcher, WireGate
from pynydus.daemon.prefetchlist import PrefetchList
from pynydus.rafs.builder import build

FILES = 48
SIZE = 64 << 10  # one chunk a file; four chunks make a piece (256 KiB)


class SlowBackend(LocalFsBackend):
    """Records each request (start, end, background?, offset); those of the prefetch
    workers take ``bg_delay`` s, the others wait for ``fg_release`` when it is set up."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.log: list[tuple[float, float, bool, int]] = []
        self.bg_started = 0
        self.fg_waiting = threading.Event()
        self.fg_release: threading.Event | None = None
        self.bg_delay = 0.0
        self.lock = threading.Lock()

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        bg = threading.current_thread().name.startswith("prefetch-")
        t0 = time.monotonic()
        if bg:
            with self.lock:
                self.bg_started += 1
            time.sleep(self.bg_delay)
        elif self.fg_release is not None:
            self.fg_waiting.set()
            assert self.fg_release.wait(30)
        data = super().read_range(blob_id, offset, length)
        with self.lock:
            self.log.append((t0, time.monotonic(), bg, offset))
        return data


@pytest.fixture
def image(tmp_path: Path) -> tuple[RafsInstance, SlowBackend]:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(FILES):
        (src / f"f{i:02d}").write_bytes(os.urandom(SIZE))
    (tmp_path / "blobs").mkdir()
    build(str(src), str(tmp_path / "image.boot"), str(tmp_path / "blobs"), compressor="lz4_block")
    text = json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(tmp_path / "blobs")}},
                                  "cache": {"type": "blobcache",
                                            "config": {"work_dir": str(tmp_path / "cache")}}},
                       "amplify_io": 0})
    cfg, _ = parse_daemon_config(text)
    backend = SlowBackend(str(tmp_path / "blobs"))
    inst = RafsInstance(str(tmp_path / "image.boot"), cfg, WireGate(backend), CacheStats())
    yield inst, backend
    inst.close()


def ino(inst: RafsInstance, i: int) -> int:
    return inst.bs.lookup_path(f"/f{i:02d}")


def chunk(inst: RafsInstance, i: int) -> int:
    (c,) = list(inst.bs.chunks(ino(inst, i)))
    return c.index


def plist_of(inst: RafsInstance, files: list[int]) -> PrefetchList:
    """A list whose runs are the files' chunks in this order."""
    blob = inst.bs.blobs[0]
    ranges = []
    for i in files:
        (c,) = list(inst.bs.chunks(ino(inst, i)))
        ranges.append((0, c.index, 1, c.compressed_offset or 0, c.compressed_size or 0))
    return PrefetchList((blob.blob_id,), tuple(ranges), ())


def ready(inst: RafsInstance, i: int) -> bool:
    return inst.cache(0).chunk_map.is_ready(chunk(inst, i))


def run_list(inst: RafsInstance, plist: PrefetchList, timeout: float = 20) -> ListPrefetch:
    p = Prefetcher(4, 0, busy=lambda: False)
    try:
        job = p.submit_list(inst, plist)
        assert job.done.wait(timeout)
        return job
    finally:
        p.stop()


def test_a_list_is_fetched_in_its_order_in_pieces(image: tuple[RafsInstance, SlowBackend]) -> None:
    inst, be = image
    order = list(range(20, 40)) + list(range(4))
    be.bg_delay = 0.01
    job = run_list(inst, plist_of(inst, order))
    assert not job.stopped
    assert all(ready(inst, i) for i in order)
    assert not any(ready(inst, i) for i in set(range(FILES)) - set(order))
    assert len(job.pieces) == 6 and job.requests <= 7  # 24 chunks, four to a 256 KiB piece
    # at most two pieces in flight: the last piece starts after the first ones ended
    starts = sorted(t0 for t0, _, bg, _ in be.log if bg)
    ends = sorted(t1 for _, t1, bg, _ in be.log if bg)
    assert starts[-1] >= ends[0]


def test_the_foreground_goes_first_on_the_wire(image: tuple[RafsInstance, SlowBackend]) -> None:
    inst, be = image
    be.fg_release = threading.Event()
    reader = threading.Thread(target=inst.read, args=(ino(inst, 47), 0, SIZE))
    reader.start()
    assert be.fg_waiting.wait(10)  # the reader's miss is on the wire
    p = Prefetcher(4, 0, busy=lambda: False)
    try:
        job = p.submit_list(inst, plist_of(inst, list(range(16))))
        time.sleep(0.3)
        assert be.bg_started == 0  # the list waits while the miss is on the wire
        be.fg_release.set()
        reader.join()
        assert job.done.wait(20)
    finally:
        p.stop()
    fg = [t1 for _, t1, bg, _ in be.log if not bg]
    bg = [t0 for t0, _, is_bg, _ in be.log if is_bg]
    assert len(fg) == 1 and bg and job.requests == len(bg) and min(bg) >= fg[0]
    assert all(ready(inst, i) for i in range(16))


def test_what_a_miss_fetches_is_not_fetched_again(image: tuple[RafsInstance, SlowBackend]) -> None:
    inst, be = image
    be.fg_release = threading.Event()
    reader = threading.Thread(target=inst.read, args=(ino(inst, 0), 0, SIZE))
    reader.start()
    assert be.fg_waiting.wait(10)  # the miss has claimed file 0's chunk and is on the wire
    refs = inst.chunk_refs(0, [chunk(inst, 0), chunk(inst, 1)])
    worker = threading.Thread(target=inst.prefetch_refs, args=(0, refs), name="prefetch-t")
    worker.start()  # takes file 1's chunk, leaves file 0's to the miss
    worker.join(10)
    assert not worker.is_alive() and reader.is_alive()  # it did not wait for the miss
    be.fg_release.set()
    reader.join()
    assert sum(1 for _, _, _, off in be.log if off == refs[0].c_off) == 1
    deadline = time.monotonic() + 10  # the miss's chunk is written after its answer
    while not ready(inst, 0):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert ready(inst, 1)


def test_the_list_goes_on_from_where_the_workload_is(image: tuple[RafsInstance, SlowBackend]) -> None:
    inst, _ = image
    job = ListPrefetch(inst, plist_of(inst, list(range(32))), Prefetcher(1, 0, lambda: False))
    job._plan()
    assert [job._next()] == [0]
    inst.read(ino(inst, 21), 0, SIZE)  # the workload is at piece 5 (chunks 20-23)
    job._observe()
    assert job.frontier == 5
    order = []
    while (i := job._next()) is not None:
        job.issued[i] = True
        order.append(i)
    assert order == [5, 6, 7, 0, 1, 2, 3, 4]  # ahead of it first, then what it passed over


def test_the_list_runs_ahead_of_the_workload_only_as_far_as_it_follows(
        image: tuple[RafsInstance, SlowBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    inst, _ = image
    monkeypatch.setattr(prefetch, "_LOOKAHEAD", 256 << 10)  # one piece
    job = ListPrefetch(inst, plist_of(inst, list(range(32))), Prefetcher(1, 0, lambda: False))
    job._plan()

    def take() -> list[int]:
        out = []
        while (i := job._next()) is not None and i >= 0:
            job.issued[i] = True
            out.append(i)
        return out

    assert take() == [0, 1]  # before any read: the lead allowed (piece 1 starts at 256 KiB)
    for f in range(8):  # the workload reads pieces 0 and 1: 512 KiB of the list
        inst.read(ino(inst, f), 0, SIZE)
    job._observe()
    assert job.frontier == 1 and job.used == job._cum[2]
    assert take() == [2, 3]  # its lead is now what it has read
    for f in range(32, 40):  # then it leaves the list: no further
        inst.read(ino(inst, f), 0, SIZE)
    job._observe()
    assert take() == [] and job._next() == -1


def _list_and_reads(inst: RafsInstance, be: SlowBackend, bg_delay: float,
                    reads: list[int]) -> ListPrefetch:
    """The list of files 0-31 fetched (each request ``bg_delay`` s) while the workload
    reads ``reads``; judged in windows of 8 first reads."""
    be.bg_delay = bg_delay
    p = Prefetcher(2, 0, busy=lambda: False)
    try:
        job = p.submit_list(inst, plist_of(inst, list(range(32))))
        for i in reads:
            inst.read(ino(inst, i), 0, SIZE)
        assert job.done.wait(20)
        return job
    finally:
        p.stop()


def test_a_stale_list_is_dropped(image: tuple[RafsInstance, SlowBackend],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    inst, be = image
    monkeypatch.setattr(prefetch, "_STALE_WINDOW", 8)
    job = _list_and_reads(inst, be, 0.5, list(range(32, 41)))  # what the list does not have
    assert job.stopped.startswith("stale: 0 of 8")
    assert job.other_reads >= 8 and job.listed_reads == 0
    assert sum(job.issued) < len(job.pieces)
    assert not ready(inst, 31)


def test_a_list_the_workload_follows_is_not_stale(image: tuple[RafsInstance, SlowBackend],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    inst, be = image
    monkeypatch.setattr(prefetch, "_STALE_WINDOW", 8)
    job = _list_and_reads(inst, be, 0.05, [*range(12), 40, 41])  # mostly listed, a few others
    assert not job.stopped and job.listed_reads == 12
    assert all(ready(inst, i) for i in range(32))


def test_the_gate_counts_only_the_foreground(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"x" * 100)
    gate = WireGate(LocalFsBackend(str(tmp_path)))
    seen: list[bool] = []

    class Peek(LocalFsBackend):
        def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
            seen.append(gate.busy)
            return super().read_range(blob_id, offset, length)

    gate.backend = Peek(str(tmp_path))
    assert gate.read_range("b", 0, 10) == b"x" * 10

    def background() -> None:
        prefetch._local.background = True
        gate.read_range("b", 0, 10)

    t = threading.Thread(target=background)
    t.start()
    t.join()
    assert seen == [True, False] and not gate.busy and gate.foreground_requests == 1
    assert gate.wait_idle(threading.Event(), 0.01)


def test_the_list_stops_when_the_start_up_is_over(image: tuple[RafsInstance, SlowBackend],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    inst, be = image
    monkeypatch.setattr(prefetch, "_DONE_QUIET", 0.3)
    be.bg_delay = 0.3
    inst.read(ino(inst, 0), 0, SIZE)  # the workload read, before the list came
    job = run_list(inst, plist_of(inst, list(range(32))))
    assert "start-up is over" in job.stopped
    assert sum(job.issued) < len(job.pieces) and not ready(inst, 31)


def test_before_the_workload_reads_the_list_goes_on(image: tuple[RafsInstance, SlowBackend],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    inst, be = image
    monkeypatch.setattr(prefetch, "_DONE_QUIET", 0.05)
    be.bg_delay = 0.1
    job = run_list(inst, plist_of(inst, list(range(16))))
    assert not job.stopped and all(ready(inst, i) for i in range(16))
