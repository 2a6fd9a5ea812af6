"""Prefetch lists: made from a trace (runs of consecutive chunks, first-read order), read
back with every field checked, mapped onto an image's blobs."""

from __future__ import annotations

import json

import pytest

from pynydus.daemon.prefetchlist import PrefetchList, chunks_in_order, from_trace, parse
from pynydus.errors import FormatError


def _chunk(blob: str, index: int, offset: int, size: int = 10) -> dict[str, object]:
    return {"blob_id": blob, "index": index, "offset": offset, "size": size,
            "uncompressed_size": 100, "first_read_nanos": 1}


def test_runs_follow_first_read_order() -> None:
    trace = {"files": [{"path": "/bin/sh"}, {"path": "/etc/passwd"}],
             "chunks": [_chunk("b1", 4, 40), _chunk("b1", 5, 50), _chunk("b1", 6, 60),
                        _chunk("b2", 0, 0), _chunk("b1", 2, 20), _chunk("b1", 3, 30)]}
    plist = from_trace(trace)
    assert plist.blobs == ("b1", "b2")
    assert plist.ranges == ((0, 4, 3, 40, 30), (1, 0, 1, 0, 10), (0, 2, 2, 20, 20))
    assert plist.files == ("/bin/sh", "/etc/passwd")
    assert plist.compressed_bytes == 60
    assert parse(plist.to_json()) == plist


def test_an_empty_trace_makes_an_empty_list() -> None:
    assert not from_trace({"files": [], "chunks": []})
    assert not PrefetchList()


@pytest.mark.parametrize("doc", [
    {"version": 2},
    {"version": 1, "blobs": [""]},
    {"version": 1, "blobs": ["b"], "ranges": [[1, 0, 1, 0, 1]]},  # no blob 1
    {"version": 1, "blobs": ["b"], "ranges": [[0, 0, 0, 0, 1]]},  # empty run
    {"version": 1, "blobs": ["b"], "ranges": [[0, -1, 1, 0, 1]]},
    {"version": 1, "blobs": ["b"], "ranges": [[0, True, 1, 0, 1]]},
    {"version": 1, "files": ["relative/path"]},
    [1, 2],
])
def test_malformed_lists_are_refused(doc: object) -> None:
    with pytest.raises(FormatError, match="prefetch list"):
        parse(json.dumps(doc).encode())


def test_not_json_is_refused() -> None:
    with pytest.raises(FormatError, match="not JSON"):
        parse(b"\xff{")


def test_runs_of_blobs_the_image_lacks_are_left_out() -> None:
    plist = PrefetchList(("old", "kept"), ((0, 0, 2, 0, 20), (1, 7, 2, 70, 20)), ())
    assert chunks_in_order(plist, {"kept": 3}) == [(3, [7, 8])]
