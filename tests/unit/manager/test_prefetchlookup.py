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
