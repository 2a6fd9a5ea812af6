"""A node learns a prefetch list from an image's first container: the daemon's trace once
the image's reads have gone quiet, saved under the root (and pushed when configured); an
image that has a list, or that is unmounted before anything reads it, is left alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from pynydus.daemon import prefetchlist
from pynydus.daemon.prefetchlist import PrefetchList
from pynydus.manager import prefetchrecord
from pynydus.manager.prefetchlookup import PrefetchListLookup
from pynydus.manager.prefetchrecord import ListRecorder

TRACE = {"truncated": False,
         "files": [{"ino": 2, "path": "/bin/sh"}, {"ino": 3, "path": "/app/run"}],
         "chunks": [{"blob_id": "b1", "index": 0, "offset": 0, "size": 10},
                    {"blob_id": "b1", "index": 1, "offset": 10, "size": 5}]}
DIGEST = "sha256:" + "d" * 64


class FakeDaemon:
    """Files read grow for ``reads`` polls, then stay; the trace is TRACE."""

    def __init__(self, reads: int) -> None:
        self.polls = 0
        self.reads = reads
        self.asked: list[tuple[str, str]] = []

    def metrics(self, kind: str, sid: str | None = None) -> Any:
        self.asked.append((kind, sid or ""))
        if kind == "pattern":
            self.polls += 1
            return [{"ino": i} for i in range(min(self.polls, self.reads))]
        assert kind == "trace"
        return TRACE


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefetchrecord, "_POLL", 0.02)
    monkeypatch.setattr(prefetchrecord, "_QUIET", 0.2)


def _found(value: PrefetchList | None) -> Future[PrefetchList | None]:
    fut: Future[PrefetchList | None] = Future()
    fut.set_result(value)
    return fut


def _wait(cond: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_the_first_containers_start_up_becomes_the_list(tmp_path: Path) -> None:
    lookup = PrefetchListLookup()
    rec = ListRecorder(str(tmp_path), lookup, push=False, timeout=30)
    daemon = FakeDaemon(reads=5)
    try:
        rec.after_lookup(_found(None), "reg/app:1", {"containerd.io/snapshot/cri.manifest-digest":
                                                     DIGEST}, {}, lambda: (daemon, "/7"))
        _wait(lambda: rec.recorded)
    finally:
        rec.close()
        lookup.close()
    (image, plist), = rec.recorded
    assert image == "reg/app:1" and plist == prefetchlist.from_trace(TRACE)
    assert daemon.polls > 5  # the trace was taken once the reads had stopped growing
    assert all(sid == "/7" for _, sid in daemon.asked) and daemon.asked[-1][0] == "trace"
    saved = tmp_path / "prefetch-lists" / ("sha256_" + "d" * 64 + ".json")
    assert prefetchlist.parse(saved.read_bytes()) == plist


def test_a_start_up_that_never_goes_quiet_is_cut_at_the_timeout(tmp_path: Path) -> None:
    lookup = PrefetchListLookup()
    rec = ListRecorder(str(tmp_path), lookup, push=False, timeout=0.3)
    daemon = FakeDaemon(reads=10 ** 9)
    try:
        rec.after_lookup(_found(None), "reg/app:1", {}, {}, lambda: (daemon, "/"))
        _wait(lambda: rec.recorded)
    finally:
        rec.close()
        lookup.close()
    assert (tmp_path / "prefetch-lists" / "reg_app_1.json").exists()


def test_images_with_a_list_or_unmounted_are_left_alone(tmp_path: Path) -> None:
    lookup = PrefetchListLookup()
    rec = ListRecorder(str(tmp_path), lookup, push=False, timeout=30)
    daemon = FakeDaemon(reads=3)
    gone = threading.Event()
    try:
        rec.after_lookup(_found(PrefetchList(("b",), ((0, 0, 1, 0, 1),), ())), "reg/a:1", {}, {},
                         lambda: (daemon, "/"))
        rec.after_lookup(_found(None), "reg/b:1", {}, {},
                         lambda: (gone.set(), None)[1])
        _wait(gone.is_set)
        time.sleep(0.3)
    finally:
        rec.close()
        lookup.close()
    assert not rec.recorded and daemon.polls == 0
    assert not (tmp_path / "prefetch-lists").exists()
