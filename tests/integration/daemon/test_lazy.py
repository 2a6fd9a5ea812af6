"""Lazy pulling: the daemon fetches the chunks a read needs, once, and keeps them.

Contract (checked by two independent witnesses, the daemon's backend metrics and the
registry's own access log): reading one 1 MiB file of a ≈200 MB image fetches about
that file's chunks; reading it again fetches nothing (blob cache, not only the page
cache: the file's pages are dropped in between); a restarted daemon with the same
cache ``work_dir`` fetches nothing for chunks it already has.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.registry import Registry

from .conftest import TARGET, Image, StartFn, push, registry_config, settled_gets

REPO = "daemon/big"
MiB = 1 << 20


@pytest.fixture(scope="module")
def big_registry(big_image: Image) -> Iterator[Registry]:
    with Registry() as reg:
        push(reg.host, big_image, REPO)
        yield reg


def drop_file_pages(path: Path) -> None:
    """Evict one file's pages from the kernel page cache (not the whole machine's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_one_file_fetches_its_chunks_once_and_survives_restart(
        big_image: Image, big_registry: Registry, start_daemon: StartFn,
        workdir: Path) -> None:
    digest = f"sha256:{big_image.blob_id}"
    # without passthrough: the 1 MiB file read whole is copied for passthrough once its
    # open ends, and a later open reads the copy, not the blob cache this test counts
    cfg = registry_config(big_registry.host, REPO, workdir / "cache", passthrough=False)
    want = (big_image.src / TARGET).read_bytes()
    gets0 = big_registry.blob_gets(digest)

    d = start_daemon(bootstrap=big_image.bootstrap, config=cfg)
    assert len(list((d.mountpoint / "data").iterdir())) == 190  # metadata: no fetch
    assert d.backend_metrics()["read_count"] == 0
    assert (d.mountpoint / TARGET).read_bytes() == want
    m = d.backend_metrics()
    # about that file's chunks: 1 MiB, at most one more amplify_io window (1 MiB)
    assert MiB <= m["read_amount_total"] <= 2 * MiB + 64 * 1024, m
    assert 1 <= m["read_count"] <= 3, m
    gets1 = settled_gets(big_registry, digest, gets0 + m["read_count"])
    assert gets1 - gets0 == m["read_count"]  # the registry saw exactly those requests
    total = big_image.result.blobs[-1].compressed_size
    assert total > 190 * MiB and m["read_amount_total"] < total / 50

    # again, with the file's page cache dropped: served from the blob cache
    hits = d.get("/api/v1/metrics/blobcache")["whole_hits"]
    drop_file_pages(d.mountpoint / TARGET)
    assert (d.mountpoint / TARGET).read_bytes() == want
    assert d.backend_metrics()["read_count"] == m["read_count"]
    assert d.get("/api/v1/metrics/blobcache")["whole_hits"] > hits
    assert big_registry.blob_gets(digest) == gets1

    # restart: a new process, same cache work_dir
    d.stop()
    d2 = start_daemon("again", bootstrap=big_image.bootstrap, config=cfg)
    assert (d2.mountpoint / TARGET).read_bytes() == want
    assert d2.backend_metrics()["read_count"] == 0
    assert big_registry.blob_gets(digest) == gets1
    # ... while a file never read is still fetched (the backend is live)
    assert (d2.mountpoint / "data/f007").read_bytes() == \
        (big_image.src / "data/f007").read_bytes()
    assert d2.backend_metrics()["read_count"] >= 1
    assert settled_gets(big_registry, digest, gets1 + 1) > gets1


def test_concurrent_readers_of_one_file_fetch_it_once(
        big_image: Image, big_registry: Registry, start_daemon: StartFn,
        workdir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    d = start_daemon(bootstrap=big_image.bootstrap,
                     config=registry_config(big_registry.host, REPO, workdir / "cache"))
    path = d.mountpoint / "apps/large.bin"
    want = (big_image.src / "apps/large.bin").read_bytes()

    def read_at(off: int) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, MiB, off)
        finally:
            os.close(fd)

    offsets = [(i % 8) * MiB for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(read_at, offsets))
    assert all(g == want[o:o + MiB] for g, o in zip(got, offsets))
    m = d.backend_metrics()
    assert m["read_amount_total"] <= 8 * MiB + 64 * 1024, m  # each chunk fetched once


@pytest.mark.parametrize("amplify_io", [1 << 20, 0])
def test_a_miss_brings_following_chunks_up_to_amplify_io(start_daemon: StartFn, workdir: Path,
                                                         amplify_io: int) -> None:
    """100 files of 8 KiB incompressible data, one chunk each, stored one after the other:
    with amplify_io = 1 MiB the first miss fetches its neighbours in the same request
    (upstream's user-I/O amplification); with 0 every file costs its own request."""
    from .conftest import build_image, localfs_config

    src = workdir / "src"
    src.mkdir()
    os.chmod(src, 0o755)
    files = {f"f{i:03d}": os.urandom(8192) for i in range(100)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    img = build_image(src, workdir / "img")
    d = start_daemon(bootstrap=img.bootstrap,
                     config=localfs_config(img.blob_dir, workdir / "cache", amplify_io=amplify_io))
    for name in sorted(files)[:50]:
        assert (d.mountpoint / name).read_bytes() == files[name]
    m = d.backend_metrics()
    if amplify_io:
        assert m["read_count"] == 1, m  # 50 x 8 KiB fit in one 1 MiB window
        assert m["read_amount_total"] == 100 * 8192  # the window stops at the blob's end
    else:
        assert m["read_count"] == 50, m
        assert m["read_amount_total"] == 50 * 8192


def test_a_miss_on_a_large_file_does_not_amplify_into_its_neighbours(
        start_daemon: StartFn, workdir: Path) -> None:
    """A file of half the amplify_io window or more is fetched alone (its neighbours in
    the blob are other files it says nothing about); a small file's miss still brings
    the small files after it."""
    from .conftest import build_image, localfs_config

    src = workdir / "src"
    src.mkdir()
    os.chmod(src, 0o755)
    big = os.urandom(600 << 10)  # one chunk, above half of the 1 MiB window
    (src / "a-big").write_bytes(big)
    files = {f"f{i:03d}": os.urandom(8192) for i in range(20)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    img = build_image(src, workdir / "img")
    d = start_daemon(bootstrap=img.bootstrap,
                     config=localfs_config(img.blob_dir, workdir / "cache", amplify_io=1 << 20))
    assert (d.mountpoint / "a-big").read_bytes() == big
    m = d.backend_metrics()
    assert m["read_count"] == 1 and m["read_amount_total"] == len(big), m
    assert (d.mountpoint / "f000").read_bytes() == files["f000"]
    for name in sorted(files):
        assert (d.mountpoint / name).read_bytes() == files[name]
    m = d.backend_metrics()
    assert m["read_count"] == 2, m  # f000's miss brought the other 19
    assert m["read_amount_total"] == len(big) + 20 * 8192, m


def test_cache_data_file_lost_between_runs_is_refetched_not_zeros(
        full_image: Image, start_daemon: StartFn, workdir: Path) -> None:
    """The chunk map survives but ``<blob>.blob.data`` was removed (cache GC, an operator):
    the next daemon must fetch again, not serve the map's "ready" chunks as holes."""
    from .conftest import localfs_config

    # without passthrough: a file read whole would be read from its materialized copy,
    # which the data file's loss leaves in place (it holds the file's bytes, size-checked)
    cfg = localfs_config(full_image.blob_dir, workdir / "cache", passthrough=False)
    want = (full_image.src / "files/multi-chunk").read_bytes()
    d = start_daemon(bootstrap=full_image.bootstrap, config=cfg)
    assert (d.mountpoint / "files/multi-chunk").read_bytes() == want
    d.stop()
    data = workdir / "cache" / f"{full_image.blob_id}.blob.data"
    data.unlink()
    d2 = start_daemon("again", bootstrap=full_image.bootstrap, config=cfg)
    assert (d2.mountpoint / "files/multi-chunk").read_bytes() == want
    assert d2.backend_metrics()["read_count"] >= 1
    assert "discarding its chunk map" in d2.log_text()
