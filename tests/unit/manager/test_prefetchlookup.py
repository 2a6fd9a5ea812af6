"""The snapshotter's prefetch-list lookup: never in a mount's way, quiet when there is no
list, the list's document handed over once found."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from pynydus.daemon.prefetchlist import PrefetchList
from pynydus.manager.prefetchlookup import PrefetchListLookup

LOCALFS = {"device": {"backend": {"type": "localfs", "config": {"dir": "/nowhere"}},
                      "cache": {"type": "blobcache", "config": {"work_dir": "/tmp"}}}}
UNREACHABLE = {"device": {"backend": {"type": "registry", "config": {
    "scheme": "http", "host": "127.0.0.1:9", "repo": "a/b", "timeout": 1,
    "connect_timeout": 1, "retry_limit": 0}},
    "cache": {"type": "blobcache", "config": {"work_dir": "/tmp"}}}}


def test_no_registry_backend_and_unreachable_registries_find_nothing() -> None:
    lookup = PrefetchListLookup()
    try:
        assert lookup.start("127.0.0.1:9/a/b:1", {}, LOCALFS).result(10) is None
        assert lookup.start("127.0.0.1:9/a/b:1", {}, UNREACHABLE).result(30) is None
    finally:
        lookup.close()
    assert lookup.start("127.0.0.1:9/a/b:1", {}, UNREACHABLE).result(10) is None  # closed


def test_deliver_sends_a_found_list_and_nothing_else() -> None:
    sent: list[dict[str, Any]] = []
    for result in (None, PrefetchList(), PrefetchList(("b",), ((0, 1, 2, 0, 9),), ("/x",))):
        fut: Future[PrefetchList | None] = Future()
        PrefetchListLookup.deliver(fut, sent.append, "image")
        fut.set_result(result)
    assert sent == [{"version": 1, "blobs": ["b"], "ranges": [[0, 1, 2, 0, 9]], "files": ["/x"]}]


def test_the_lookup_a_pull_starts_at_prepare_is_taken_by_its_mount() -> None:
    lookup = PrefetchListLookup()
    made: list[int] = []

    def cfg() -> dict[str, Any]:
        made.append(1)
        return LOCALFS

    try:
        labels = {"containerd.io/snapshot/cri.manifest-digest": "sha256:" + "a" * 64}
        early = lookup.start("127.0.0.1:9/a/b:1", labels, cfg)  # the first Prepare
        assert lookup.start("127.0.0.1:9/a/b:1", labels, LOCALFS) is early  # the mount
        assert early.result(10) is None and made == [1]
        other = lookup.start("127.0.0.1:9/a/b:2", labels, LOCALFS)  # another image
        assert other is not early
        lookup.forget("127.0.0.1:9/a/b:1", labels)  # a failed mount: the next one asks again
        assert lookup.start("127.0.0.1:9/a/b:1", labels, LOCALFS) is not early
    finally:
        lookup.close()


def test_a_config_that_cannot_be_made_finds_nothing() -> None:
    lookup = PrefetchListLookup()

    def broken() -> dict[str, Any]:
        raise ValueError("no credentials")

    try:
        assert lookup.start("127.0.0.1:9/a/b:1", {}, broken).result(10) is None
    finally:
        lookup.close()


def test_a_list_already_found_is_sent_off_the_callers_thread() -> None:
    import threading

    sent: list[str] = []
    done = threading.Event()

    def send(doc: dict[str, Any]) -> None:
        sent.append(threading.current_thread().name)
        done.set()

    fut: Future[PrefetchList | None] = Future()
    fut.set_result(PrefetchList(("b",), ((0, 1, 2, 0, 9),), ("/x",)))
    PrefetchListLookup.deliver(fut, send, "image")
    assert done.wait(10) and sent == ["prefetch-list-send"]
