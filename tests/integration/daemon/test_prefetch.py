"""Prefetch and the v2 config: the cache fills in the background, as configured.

Contract: with ``fs_prefetch.enable`` and ``prefetch_all`` the whole image reaches the
blob cache without any read (``data_all_ready`` in /api/v1/metrics/blobcache), after
which the image serves with the backend gone; ``--prefetch-files`` fetches exactly the
listed files' chunks; a v2 TOML config serves the same image as v1 JSON.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from pynydus.rafs.read import open_bootstrap

from .conftest import Image, StartFn, localfs_config
from .trees import compare_trees


def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_prefetch_all_fills_the_cache_then_serves_offline(full_image: Image,
                                                          start_daemon: StartFn,
                                                          workdir: Path) -> None:
    blobs = workdir / "blobs"
    shutil.copytree(full_image.blob_dir, blobs)
    cfg = localfs_config(blobs, workdir / "cache",
                         fs_prefetch={"enable": True, "threads_count": 2,
                                      "merging_size": 1 << 20, "prefetch_all": True})
    d = start_daemon(bootstrap=full_image.bootstrap, config=cfg)
    wait_for(lambda: d.get("/api/v1/metrics/blobcache")["data_all_ready"], 60,
             "prefetch to fill the blob cache")
    m = d.get("/api/v1/metrics/blobcache")
    assert m["prefetch_workers"] == 2
    assert m["prefetch_data_amount"] > 0 and m["prefetch_requests_count"] > 0
    assert d.get("/api/v1/metrics")["data_read"] == 0  # nobody read a byte
    d.stop()
    shutil.rmtree(blobs)  # the backend is gone: everything must come from the cache
    blobs.mkdir()
    d2 = start_daemon("offline", bootstrap=full_image.bootstrap,
                      config=localfs_config(blobs, workdir / "cache"))
    assert compare_trees(full_image.src, d2.mountpoint) == []
    assert d2.backend_metrics()["read_count"] == 0


def test_prefetch_files_fetches_only_the_listed_files(full_image: Image, start_daemon: StartFn,
                                                      workdir: Path) -> None:
    listed = ["/files/multi-chunk", "/hard"]
    lst = workdir / "prefetch.list"
    lst.write_text("\n".join(listed) + "\n/not/in/image\n")
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=localfs_config(full_image.blob_dir, workdir / "cache",
                                           fs_prefetch={"enable": True, "threads_count": 1,
                                                        "prefetch_all": False}),
                     extra_args=("--prefetch-files", str(lst)))
    bs = open_bootstrap(str(full_image.bootstrap))
    try:
        want = {c.index for p in ("/files/multi-chunk", "/hard/orig", "/hard/with-xattr")
                for c in bs.chunks(bs.lookup_path(p))}
        (blob,) = bs.blobs
        chunk_count = blob.chunk_count
    finally:
        bs.close()
    chunk_map = workdir / "cache" / f"{full_image.blob_id}.blob.data.chunk_map"

    def ready() -> set[int]:
        data = chunk_map.read_bytes()
        return {i for i in range(chunk_count) if data[4096 + i // 8] & (0x80 >> (i % 8))}

    # the prefetcher reports its end; then the cache holds exactly the listed chunks
    wait_for(lambda: d.get("/api/v1/metrics/blobcache")["prefetch_end_time_secs"] > 0, 30,
             "the prefetch to finish")
    assert ready() == want
    m = d.get("/api/v1/metrics/blobcache")
    assert m["data_all_ready"] is False and 0 < len(want) < chunk_count
    assert d.get("/api/v1/metrics")["data_read"] == 0
    assert m["prefetch_data_amount"] == compressed_sizes(full_image, want)


def compressed_sizes(image: Image, indexes: set[int]) -> int:
    """Backend bytes of these chunks (what prefetch_data_amount counts)."""
    bs = open_bootstrap(str(image.bootstrap))
    try:
        sizes = {c.index: c.compressed_size
                 for p in ("/files/multi-chunk", "/hard/orig", "/hard/with-xattr")
                 for c in bs.chunks(bs.lookup_path(p))}
        return sum(sizes[i] for i in indexes)
    finally:
        bs.close()


def test_v2_toml_config_serves_the_same_tree(full_image: Image, start_daemon: StartFn,
                                            workdir: Path) -> None:
    toml = f"""
version = 2
id = "v2-test"

[backend]
type = "localfs"

[backend.localfs]
dir = "{full_image.blob_dir}"

[cache]
type = "blobcache"
validate = true

[cache.filecache]
work_dir = "{workdir / 'cache'}"

[rafs]
mode = "direct"
enable_xattr = true
batch_size = 1048576
"""
    d = start_daemon(bootstrap=full_image.bootstrap, config_text=toml)
    assert compare_trees(full_image.src, d.mountpoint) == []
    info = d.get("/api/v1/daemon")
    assert info["backend_collection"]["/"]["config"]["cache"]["validate"] is True
    assert os.path.exists(workdir / "cache" / f"{full_image.blob_id}.blob.data")
