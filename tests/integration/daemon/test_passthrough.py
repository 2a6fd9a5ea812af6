"""FUSE passthrough through the kernel: a file read whole is materialized in the cache
dir, and later opens of it read that copy in the kernel (``daemon/materialize.py``,
``daemon/iomode.py``).

Contract: bytes through passthrough are the file's; cached and passthrough opens of one
inode never fail each other (EIO); a daemon killed with SIGKILL while files are open in
both modes is succeeded, and every open file and every new open keeps reading; the
materialized copy goes with its blob; overlayfs above the mount still mounts and reads.
Which mode an open got is seen in /proc/self/maps: a passthrough file's mapping is its
backing file (the copy), a cached one's is the FUSE file.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pynydus.manager.filesystem import remove_unused
from pynydus.manager.supervisor import Supervisor
from tests.harness.pynydusd import Pynydusd

from .conftest import Image, StartFn, build_image, localfs_config
from .test_takeover import _successor, _supervised, _take_over, supervisor  # noqa: F401

MiB = 1 << 20
FILES = {"one.bin": 6 * MiB, "two.bin": 3 * MiB, "small.bin": 64 << 10}


@pytest.fixture
def image(workdir: Path) -> Image:
    src = workdir / "src"
    src.mkdir()
    for i, (name, size) in enumerate(FILES.items()):
        (src / name).write_bytes(os.urandom(size // 2) * 2 if i else bytes(range(256)) * (size // 256))
    return build_image(src, workdir / "img")


def _start(start_daemon: StartFn, image: Image, workdir: Path, **kw: object) -> Pynydusd:
    return start_daemon(bootstrap=image.bootstrap,
                        config=localfs_config(image.blob_dir, workdir / "cache"), **kw)


def _read_whole(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _materialized(d: Pynydusd, count: int) -> list[Path]:
    """Wait for ``count`` files materialized and nothing pending; the copies."""
    deadline = time.monotonic() + 60
    while True:
        m = d.get("/api/v1/metrics/blobcache")
        if m["materialize_pending"] == 0 and m["materialized_files"] >= count:
            break
        assert time.monotonic() < deadline, (m, d.log_text()[-3000:])
        time.sleep(0.05)
    return sorted((d.workdir / "cache").glob("*.file.*"))


def _is_passthrough(d: Pynydusd, fd: int) -> bool:
    """Whether ``fd`` was opened in passthrough mode: its page cache dropped, a read of it
    reaches daemon ``d`` only if it is a cached open (a passthrough open reads the
    materialized copy in the kernel). /proc/self/maps cannot tell: it names a backing
    file's mapping by the FUSE file's path and inode."""
    before = d.get("/api/v1/metrics")["data_read"]
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert len(os.pread(fd, 4096, 0)) == 4096
    return bool(d.get("/api/v1/metrics")["data_read"] == before)


def _open_passthrough(d: Pynydusd, path: Path) -> int:
    """An fd of ``path`` opened passthrough, once the daemon has seen the RELEASEs of its
    cached opens (the kernel sends them after close() returns)."""
    deadline = time.monotonic() + 20
    while True:
        fd = os.open(path, os.O_RDONLY)
        if _is_passthrough(d, fd):
            return fd
        os.close(fd)
        assert time.monotonic() < deadline, f"{path} is not opened passthrough"
        time.sleep(0.05)


def test_a_file_read_whole_is_then_read_by_the_kernel_from_its_copy(
        image: Image, start_daemon: StartFn, workdir: Path) -> None:
    d = _start(start_daemon, image, workdir)
    for name in FILES:
        assert _read_whole(d.mountpoint / name) == (image.src / name).read_bytes()
    copies = _materialized(d, 2)
    assert len(copies) == 2 and all(c.name.startswith(image.blob_id) for c in copies)
    subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"], check=True)
    for name in ("one.bin", "two.bin"):
        fd = os.open(d.mountpoint / name, os.O_RDONLY)
        try:
            assert _is_passthrough(d, fd), name
            got = b"".join(iter(lambda fd=fd: os.read(fd, MiB), b""))  # type: ignore[misc]
            assert got == (image.src / name).read_bytes()
        finally:
            os.close(fd)
    fd = os.open(d.mountpoint / "small.bin", os.O_RDONLY)  # below the floor: as before
    try:
        assert not _is_passthrough(d, fd)
    finally:
        os.close(fd)


def test_cached_and_passthrough_opens_of_one_file_never_fail_each_other(
        image: Image, start_daemon: StartFn, workdir: Path) -> None:
    d = _start(start_daemon, image, workdir)
    path = d.mountpoint / "one.bin"
    want = (image.src / "one.bin").read_bytes()
    held = os.open(path, os.O_RDONLY)  # a cached open that outlives the copy
    assert _read_whole(path) == want
    _materialized(d, 1)
    second = os.open(path, os.O_RDONLY)  # must stay cached while "held" is open
    assert not _is_passthrough(d, second) and os.pread(second, 4096, MiB) == want[MiB:MiB + 4096]
    os.close(second)
    os.close(held)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(20):
                assert _read_whole(path) == want
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    os.close(_open_passthrough(d, path))
    for t in threads:
        t.join()
    assert errors == []


def test_kill9_with_opens_of_both_kinds_alive_keeps_every_read_working(
        image: Image, start_daemon: StartFn, supervisor: Supervisor,  # noqa: F811
        workdir: Path) -> None:
    d = _supervised(start_daemon, supervisor, bootstrap=image.bootstrap,
                    config=localfs_config(image.blob_dir, workdir / "cache"))
    one, two = d.mountpoint / "one.bin", d.mountpoint / "two.bin"
    want_one, want_two = (image.src / "one.bin").read_bytes(), (image.src / "two.bin").read_bytes()
    cached = os.open(one, os.O_RDONLY)  # open cached before either is copied, kept
    assert _read_whole(one) == want_one and _read_whole(two) == want_two
    _materialized(d, 2)
    through = os.open(two, os.O_RDONLY)
    assert _is_passthrough(d, through) and not _is_passthrough(d, cached)
    d.kill9()
    assert os.pread(through, 4096, 0) == want_two[:4096]  # the kernel reads it: no daemon
    s = _successor(workdir, d.mountpoint)
    try:
        _take_over(s, supervisor, one_call=True)
        assert os.pread(cached, MiB, 2 * MiB) == want_one[2 * MiB:3 * MiB]
        again = os.open(one, os.O_RDONLY)  # "cached" is still open: cached again
        assert not _is_passthrough(s, again) and _read_whole(one) == want_one
        os.close(again)
        also = os.open(two, os.O_RDONLY)  # the predecessor's backing id, reused
        assert _is_passthrough(s, also) and _read_whole(two) == want_two
        os.close(also)
        os.close(cached)
        fd = _open_passthrough(s, one)  # the last cached open went: passthrough now
        try:
            assert b"".join(iter(lambda: os.read(fd, MiB), b"")) == want_one
        finally:
            os.close(fd)
        assert "Input/output error" not in s.log_text()
    finally:
        os.close(through)
        s.stop()


def test_overlayfs_above_the_mount_reads_passthrough_files(
        image: Image, start_daemon: StartFn, workdir: Path) -> None:
    d = _start(start_daemon, image, workdir)
    assert _read_whole(d.mountpoint / "one.bin") == (image.src / "one.bin").read_bytes()
    _materialized(d, 1)
    upper, work, merged = (workdir / n for n in ("upper", "work", "merged"))
    for p in (upper, work, merged):
        p.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={d.mountpoint},upperdir={upper},workdir={work}", str(merged)],
                   check=True)
    try:
        assert _read_whole(merged / "one.bin") == (image.src / "one.bin").read_bytes()
        assert _read_whole(merged / "small.bin") == (image.src / "small.bin").read_bytes()
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_cache_gc_removes_the_copies_with_their_blob(
        image: Image, start_daemon: StartFn, workdir: Path) -> None:
    d = _start(start_daemon, image, workdir)
    assert _read_whole(d.mountpoint / "one.bin") == (image.src / "one.bin").read_bytes()
    copies = _materialized(d, 1)
    assert remove_unused(str(workdir / "cache"), {image.blob_id}) == [] and copies[0].exists()
    d.stop()
    assert remove_unused(str(workdir / "cache"), set()) == [image.blob_id]
    assert not list((workdir / "cache").glob("*.file.*"))
