"""The access trace through a real FUSE mount: /api/v1/metrics/files, /pattern, /trace.

Contract: the files a reader reads are listed once each, in the order of their first read,
with their paths and read counts; the chunks too, each naming its blob; upstream's
``/pattern`` records carry the same order; ``files?latest=true`` gives the inodes read
since the previous such query and then none; prefetch does not count as a read; with
several images the query names one (``?id=``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pynydus.rafs.read import open_bootstrap

from .conftest import Image, StartFn, localfs_config

ORDER = ["files/odd-size", "files/tiny", "files/multi-chunk", "files/one-chunk"]


def test_reads_are_listed_in_first_read_order(full_image: Image, start_daemon: StartFn,
                                              workdir: Path) -> None:
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=localfs_config(full_image.blob_dir, workdir / "cache"))
    assert d.get("/api/v1/metrics/files") == []
    for name in ORDER:
        assert (d.mountpoint / name).read_bytes() == (full_image.src / name).read_bytes()
        time.sleep(0.01)  # distinct first-read times
    (d.mountpoint / ORDER[0]).read_bytes()  # a second read (page cache): no new entry
    with open_bootstrap(str(full_image.bootstrap)) as bs:
        inos = [bs.lookup_path("/" + n) for n in ORDER]
        chunks = {n: [(c.blob_id, c.index) for c in bs.chunks(ino)]
                  for n, ino in zip(ORDER, inos, strict=True)}

    files = d.get("/api/v1/metrics/files")
    assert [f["path"] for f in files] == ["/" + n for n in ORDER]
    assert [f["ino"] for f in files] == inos
    assert all(f["nr_read"] >= 1 for f in files)
    assert files[2]["data_read"] == (full_image.src / ORDER[2]).stat().st_size
    times = [f["first_read_nanos"] for f in files]
    assert times == sorted(times) and times[0] > 0

    pattern = d.get("/api/v1/metrics/pattern")
    assert [p["ino"] for p in pattern] == inos
    assert set(pattern[0]) == {"ino", "nr_read", "first_access_time_secs",
                               "first_access_time_nanos"}
    assert abs(pattern[0]["first_access_time_secs"] - time.time()) < 600

    trace = d.get("/api/v1/metrics/trace")
    assert trace["truncated"] is False
    assert [f["path"] for f in trace["files"]] == ["/" + n for n in ORDER]
    got = [(c["blob_id"], c["index"]) for c in trace["chunks"]]
    assert len(got) == len(set(got))
    seen: set[tuple[str, int]] = set()
    for n in ORDER:  # each file's new chunks, in file order (the kernel may split a file's
        new = {c for c in chunks[n] if c not in seen}  # read into concurrent pieces)
        assert set(got[len(seen):len(seen) + len(new)]) == new, n
        seen |= new
    assert len(got) == len(seen)
    assert all(c["size"] > 0 for c in trace["chunks"])

    latest = d.get("/api/v1/metrics/files?latest=true")
    assert sorted(i for lo, hi in latest for i in range(lo, hi + 1)) == sorted(inos)
    assert d.get("/api/v1/metrics/files?latest=true") == []


def test_prefetch_is_not_a_read(full_image: Image, start_daemon: StartFn,
                                workdir: Path) -> None:
    cfg = localfs_config(full_image.blob_dir, workdir / "cache",
                         fs_prefetch={"enable": True, "prefetch_all": True})
    d = start_daemon(bootstrap=full_image.bootstrap, config=cfg)
    deadline = time.monotonic() + 20
    while not d.get("/api/v1/metrics/blobcache")["data_all_ready"]:
        assert time.monotonic() < deadline, "prefetch did not finish"
        time.sleep(0.05)
    assert d.get("/api/v1/metrics/trace")["chunks"] == []
    (d.mountpoint / "files/tiny").read_bytes()
    assert [f["path"] for f in d.get("/api/v1/metrics/files")] == ["/files/tiny"]


def test_shared_daemon_traces_each_image(full_image: Image, start_daemon: StartFn,
                                         workdir: Path) -> None:
    d = start_daemon()
    cfg = json.dumps(localfs_config(full_image.blob_dir, workdir / "cache"))
    for mp in ("/a", "/b"):
        assert d.api("POST", f"/api/v1/mount?mountpoint={mp}",
                     {"source": str(full_image.bootstrap), "fs_type": "rafs",
                      "config": cfg}) == (204, None)
    (d.mountpoint / "a/files/tiny").read_bytes()
    (d.mountpoint / "b/files/one-chunk").read_bytes()
    status, body = d.api("GET", "/api/v1/metrics/files")
    assert status == 400 and "?id=" in body["message"]
    assert [f["path"] for f in d.get("/api/v1/metrics/files?id=/a")] == ["/files/tiny"]
    assert [f["path"] for f in d.get("/api/v1/metrics/files?id=/b")] == ["/files/one-chunk"]


def test_a_list_from_one_daemons_trace_prefetches_another_in_order(
        full_image: Image, start_daemon: StartFn, workdir: Path) -> None:
    """Daemon A's trace becomes a list; daemon B (empty cache) is handed it after its
    mount (PUT /api/v1/prefetch) and fetches those chunks before anything reads them:
    reading A's files on B then costs no backend request."""
    from pynydus.daemon import prefetchlist

    a = start_daemon("a", bootstrap=full_image.bootstrap,
                     config=localfs_config(full_image.blob_dir, workdir / "cache-a"))
    for name in ORDER:
        (a.mountpoint / name).read_bytes()
    plist = prefetchlist.from_trace(a.get("/api/v1/metrics/trace"))
    assert plist.files == tuple("/" + n for n in ORDER)
    assert plist.ranges and plist.blobs == (full_image.blob_id,)

    b = start_daemon("b", bootstrap=full_image.bootstrap,
                     config=localfs_config(full_image.blob_dir, workdir / "cache-b"))
    assert b.get("/api/v1/metrics/blobcache")["prefetch_data_amount"] == 0  # no list: none
    status, body = b.api("PUT", "/api/v1/prefetch?mountpoint=/", {"version": 9})
    assert status == 400 and "prefetch list" in body["message"]
    assert b.api("PUT", "/api/v1/prefetch?mountpoint=/",
                 json.loads(plist.to_json())) == (204, None)
    deadline = time.monotonic() + 20
    while b.get("/api/v1/metrics/blobcache")["prefetch_data_amount"] < plist.compressed_bytes:
        assert time.monotonic() < deadline, "the list was not prefetched"
        time.sleep(0.05)
    before = b.get("/api/v1/metrics/backend")["read_count"]
    for name in ORDER:
        assert (b.mountpoint / name).read_bytes() == (full_image.src / name).read_bytes()
    assert b.get("/api/v1/metrics/backend")["read_count"] == before
    assert b.get("/api/v1/metrics/trace")["chunks"]  # B's own reads are traced as usual
