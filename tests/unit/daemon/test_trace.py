"""The access trace: first reads kept once, in order, bounded; the API shapes built on it."""

from __future__ import annotations

from pynydus.daemon.blobcache import ChunkRef
from pynydus.daemon.trace import AccessTrace, ino_ranges, paths_of, pattern_json, trace_json


def _ref(index: int, c_off: int = 0, c_size: int = 10) -> ChunkRef:
    return ChunkRef(index=index, c_off=c_off, c_size=c_size, u_off=0, u_size=100,
                    compressed=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000

    def __call__(self) -> int:
        self.now += 5
        return self.now


def test_files_and_chunks_are_kept_in_first_read_order_once() -> None:
    t = AccessTrace(clock=Clock(), wall=lambda: 3_000_000_007)
    t.record(7, 10, [(0, 0, [(_ref(2, 200), 0, 10)])])
    t.record(5, 20, [(0, 0, [(_ref(1, 100), 0, 10), (_ref(2, 200), 0, 10)])])
    t.record(7, 30, [(1, 0, [(_ref(2, 50), 0, 10)])])  # same index, other blob: a new chunk
    files = t.files()
    assert [(f.ino, f.nr_read, f.bytes_read) for f in files] == [(7, 2, 40), (5, 1, 20)]
    assert files[0].first_ns < files[1].first_ns
    assert [(c.blob_index, c.index, c.c_off) for c in t.chunks()] == [(0, 2, 200), (0, 1, 100),
                                                                        (1, 2, 50)]
    assert not t.truncated
    assert pattern_json(t)[0] == {"ino": 7, "nr_read": 2, "first_access_time_secs": 3,
                                  "first_access_time_nanos": 7}


def test_the_trace_is_bounded_and_says_so() -> None:
    t = AccessTrace(max_files=2, max_chunks=3)
    for ino in range(10):
        t.record(ino, 1, [(0, 0, [(_ref(ino), 0, 1)])])
    assert [f.ino for f in t.files()] == [0, 1]
    assert [c.index for c in t.chunks()] == [0, 1, 2]
    assert t.truncated


def test_latest_is_taken_once_as_ranges() -> None:
    t = AccessTrace()
    for ino in (9, 3, 4, 5, 12):
        t.record(ino, 1, [])
    assert ino_ranges(t.take_latest()) == [[3, 5], [9, 9], [12, 12]]
    assert t.take_latest() == []


def test_trace_json_names_blobs_and_paths() -> None:
    t = AccessTrace()
    t.record(4, 1, [(1, 0, [(_ref(0, 4096, 77), 0, 1)])])
    walk = [(b"/", 1), (b"/a", 4), (b"/b", 4)]
    out = trace_json(t, ["blob0", "blob1"], lambda inos: paths_of(walk, inos))
    assert out["files"] == [{"ino": 4, "path": "/a", "nr_read": 1, "data_read": 1,
                             "first_read_nanos": t.files()[0].first_ns}]
    assert out["chunks"] == [{"blob_id": "blob1", "index": 0, "offset": 4096, "size": 77,
                              "uncompressed_size": 100,
                              "first_read_nanos": t.chunks()[0].first_ns}]
