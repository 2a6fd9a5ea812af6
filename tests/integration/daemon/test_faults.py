"""Fault injection: the registry dies, hangs, lies; a chunk is corrupt; the daemon is killed.

Contract: a read that cannot get its data fails with EIO within the configured timeouts
and retries (never hangs), metadata keeps working, and reads work again as soon as the
fault is gone; a corrupt chunk (digest validation on) is EIO with a log line naming the
blob and the chunk; after kill -9 the next daemon cleans the dead mount and serves the
same mountpoint.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pynydus.rafs.read import open_bootstrap
from tests.harness.pynydusd import fuse_mounted
from tests.harness.registry import Registry
from tests.integration.registry.servers import FaultProxy

from .conftest import Image, StartFn, localfs_config, push, registry_config

REPO = "daemon/faults"
TIMEOUT = 2  # seconds, the daemon's connect and read timeouts in these tests
RETRIES = 1
# Worst case for one chunk: (1 + retries) attempts of at most a timeout each, plus the
# client's backoff between attempts and a loaded machine's scheduling (10.3 s was seen at
# load 40 against an earlier 10 s bound); far below pytest's timeout, so a hang fails.
BOUND = (1 + RETRIES) * TIMEOUT + 16


@pytest.fixture
def own_registry(full_image: Image) -> Iterator[Registry]:
    """A registry this test may stop, freeze and restart (same port, same storage)."""
    with Registry() as reg:
        push(reg.host, full_image, REPO)
        yield reg


def restart_registry(reg: Registry) -> None:
    assert reg.proc is not None
    reg.proc.start()  # same config file: same port and storage
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if reg._answers():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("registry did not come back")


def expect_eio(fn: Callable[[], object], bound: float = BOUND) -> float:
    t0 = time.monotonic()
    with pytest.raises(OSError) as err:
        fn()
    took = time.monotonic() - t0
    assert err.value.errno == errno.EIO, err.value
    assert took < bound, f"EIO after {took:.1f}s, bound {bound}s"
    return took


def read(path: Path, off: int = 0, n: int = 1 << 20) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def read_once(path: Path, off: int = 0, n: int = 4096) -> bytes:
    """Exactly one FUSE read (O_DIRECT: no page cache, so no readahead and no second,
    single-page attempt by the kernel after a failed one). ``off``, ``n``: page-aligned."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, n)  # page-aligned, as O_DIRECT wants
        with buf:
            got = os.preadv(fd, [buf], off)
            return bytes(buf[:got])
    finally:
        os.close(fd)


def wait_inflight_reads(d: object, n: int, timeout: float = 30) -> None:
    """Until the daemon reports ``n`` FUSE reads waiting for the backend."""
    deadline = time.monotonic() + timeout
    while True:
        _status, body = d.api("GET", "/api/v1/metrics/inflight")  # type: ignore[attr-defined]
        reads = [r for r in (body or []) if r["opcode"] == "read"]
        if len(reads) >= n:
            return
        assert time.monotonic() < deadline, f"{len(reads)} of {n} reads in flight: {body}"
        time.sleep(0.01)


def digest_failures(d: object) -> float:
    prom = d.api("GET", "/metrics")[1].decode()  # type: ignore[attr-defined]
    (value,) = [float(ln.split()[1]) for ln in prom.splitlines()
                if ln.startswith("nydusd_digest_failures_total ")]
    return value


def src_bytes(image: Image, rel: str, off: int = 0, n: int = 1 << 20) -> bytes:
    return (image.src / rel).read_bytes()[off:off + n]


def test_registry_stopped_mid_read_is_eio_then_recovers(
        full_image: Image, own_registry: Registry, start_daemon: StartFn,
        workdir: Path) -> None:
    # amplify_io 0: a miss fetches only its own chunks, so chunk 2 is surely not cached
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=registry_config(own_registry.host, REPO, workdir / "cache",
                                            timeout=TIMEOUT, retry_limit=RETRIES,
                                            amplify_io=0))
    f = d.mountpoint / "files/multi-chunk"
    assert read(f, 0, 4096) == src_bytes(full_image, "files/multi-chunk", 0, 4096)
    assert own_registry.proc is not None
    own_registry.proc.stop()  # mid-file: chunk 0 is cached, chunks 1.. are not
    expect_eio(lambda: read(f, 2 << 20, 4096))
    assert read(f, 0, 4096) == src_bytes(full_image, "files/multi-chunk", 0, 4096)  # cached
    assert (d.mountpoint / "wide").is_dir()
    restart_registry(own_registry)
    assert read(f, 2 << 20, 4096) == src_bytes(full_image, "files/multi-chunk", 2 << 20, 4096)
    assert d.backend_metrics()["read_errors"] >= 1


def test_frozen_registry_times_out_instead_of_hanging(
        full_image: Image, own_registry: Registry, start_daemon: StartFn,
        workdir: Path) -> None:
    """The registry accepts connections but never answers (SIGSTOP): read timeout."""
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=registry_config(own_registry.host, REPO, workdir / "cache",
                                            timeout=TIMEOUT, retry_limit=RETRIES))
    assert own_registry.proc is not None
    pid = own_registry.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        took = expect_eio(lambda: read(d.mountpoint / "files/one-chunk"))
        assert took >= TIMEOUT * 0.9  # it did wait for the configured timeout
        # metadata and the API stay responsive while the backend is stuck
        assert d.get("/api/v1/daemon")["state"] == "RUNNING"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert read(d.mountpoint / "files/one-chunk") == src_bytes(full_image, "files/one-chunk")


@pytest.fixture
def proxied(full_image: Image, own_registry: Registry, start_daemon: StartFn,
            workdir: Path) -> Iterator[tuple[FaultProxy, Path]]:
    fp = FaultProxy(own_registry.host, match="/blobs/")
    try:
        d = start_daemon(bootstrap=full_image.bootstrap,
                         config=registry_config(fp.host, REPO, workdir / "cache",
                                                timeout=TIMEOUT, retry_limit=RETRIES))
        yield fp, d.mountpoint
    finally:
        fp.stop()


# Each case reads files nobody read before (so the blob cache cannot answer).
@pytest.mark.parametrize("status", [401, 403, 404, 500, 503])
def test_error_status_is_eio_and_clears(full_image: Image, proxied: tuple[FaultProxy, Path],
                                        status: int) -> None:
    fp, mnt = proxied
    fp.fail(100, status)
    expect_eio(lambda: read(mnt / "wide/entry-0001-x"))
    fp.clear()
    assert read(mnt / "wide/entry-0001-x") == src_bytes(full_image, "wide/entry-0001-x")


def test_one_500_is_retried_transparently(full_image: Image,
                                          proxied: tuple[FaultProxy, Path]) -> None:
    fp, mnt = proxied
    fp.fail(1, 500)
    assert read(mnt / "files/odd-size") == src_bytes(full_image, "files/odd-size")
    assert fp.count("GET", "/blobs/") == 2  # the 500, then its one retry


@pytest.mark.parametrize("kind", ["short", "cut"])
def test_truncated_body_is_eio_and_clears(full_image: Image, proxied: tuple[FaultProxy, Path],
                                          kind: str) -> None:
    fp, mnt = proxied
    getattr(fp, kind)(100, 10)  # 10 bytes of the body, then (short) EOF or (cut) close
    expect_eio(lambda: read(mnt / "hard/orig"))
    fp.clear()
    assert read(mnt / "hard/orig") == src_bytes(full_image, "hard/orig")


def test_one_truncated_body_is_retried(full_image: Image,
                                       proxied: tuple[FaultProxy, Path]) -> None:
    fp, mnt = proxied
    fp.cut(1, 10)
    assert read(mnt / "files/tiny") == src_bytes(full_image, "files/tiny")


# ------------------------------------------------------------------------- corruption

def _corrupt_copy(image: Image, rel: str, dest: Path) -> tuple[int, int]:
    """Copy the image's blob to ``dest/<blob_id>`` with one byte of ``rel``'s first chunk
    flipped. Returns (chunk index, compressed size)."""
    bs = open_bootstrap(str(image.bootstrap))
    try:
        chunk = bs.chunks(bs.lookup_path("/" + rel))[0]
    finally:
        bs.close()
    assert chunk.compressed_offset is not None and chunk.compressed_size
    data = bytearray(image.blob_path.read_bytes())
    data[chunk.compressed_offset + chunk.compressed_size // 2] ^= 0x5A
    dest.mkdir(parents=True, exist_ok=True)
    (dest / image.blob_id).write_bytes(bytes(data))
    return chunk.index, chunk.compressed_size


@pytest.mark.parametrize("how", ["cache.validate", "digest_validate"])
def test_corrupt_chunk_with_validation_is_eio_naming_blob_and_chunk(
        full_image: Image, start_daemon: StartFn, workdir: Path, how: str) -> None:
    index, _ = _corrupt_copy(full_image, "files/multi-chunk", workdir / "bad")
    cfg = localfs_config(workdir / "bad", workdir / "cache")
    if how == "cache.validate":
        cfg["device"]["cache"]["validate"] = True
    else:
        cfg["digest_validate"] = True
    d = start_daemon(bootstrap=full_image.bootstrap, config=cfg)
    expect_eio(lambda: read_once(d.mountpoint / "files/multi-chunk"))
    log = d.log_text()
    lines = [ln for ln in log.splitlines()
             if full_image.blob_id in ln and f"chunk {index}" in ln and "digest" in ln]
    assert lines, log[-3000:]
    # the rest of the image is fine
    assert read(d.mountpoint / "files/tiny") == src_bytes(full_image, "files/tiny")
    # one FUSE read: the first fetch and the one re-fetch, both corrupt
    assert digest_failures(d) == 2


def test_corrupt_chunk_refetched_once_then_good(full_image: Image, start_daemon: StartFn,
                                                workdir: Path) -> None:
    """A transient corruption (first answer bad, second good) costs one re-fetch."""
    fp_reg = Registry()
    with fp_reg:
        push(fp_reg.host, full_image, REPO)
        _corrupt_copy(full_image, "files/multi-chunk", workdir / "bad")
        bad = (workdir / "bad" / full_image.blob_id).read_bytes()
        proxy = _CorruptOnceProxy(fp_reg.host, bad)
        try:
            # amplify_io 0: the miss fetches its own chunk only
            cfg = registry_config(proxy.host, REPO, workdir / "cache", timeout=TIMEOUT,
                                  retry_limit=RETRIES, validate=True, amplify_io=0)
            d = start_daemon(bootstrap=full_image.bootstrap, config=cfg)
            assert read_once(d.mountpoint / "files/multi-chunk") == \
                src_bytes(full_image, "files/multi-chunk", 0, 4096)
            assert d.log_text().count("digest mismatch, fetching again") == 1
            assert proxy.count("GET", "/blobs/") == 2  # the bad answer, one re-fetch
            assert digest_failures(d) == 1
            # and it is cached now: no fetch more
            assert read_once(d.mountpoint / "files/multi-chunk", 8192) == \
                src_bytes(full_image, "files/multi-chunk", 8192, 4096)
            assert proxy.count("GET", "/blobs/") == 2
        finally:
            proxy.stop()


class _CorruptOnceProxy(FaultProxy):
    """Answers the first ranged blob GET from a corrupted copy of the blob."""

    def __init__(self, upstream: str, bad_blob: bytes) -> None:
        self.bad_blob = bad_blob
        self.served_bad = False
        super().__init__(upstream)
        handler = self.server.RequestHandlerClass
        proxy = self

        class _H(handler):  # type: ignore[misc,valid-type]
            def do_GET(self) -> None:
                rng = self.headers.get("Range", "")
                if "/blobs/" in self.path and rng.startswith("bytes=") and \
                        not proxy.served_bad:
                    proxy.served_bad = True
                    with proxy._lock:
                        proxy.log.append(("GET", self.path, dict(self.headers.items())))
                    start, end = (int(x) for x in rng[6:].split("-"))
                    body = proxy.bad_blob[start:end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{end}/{len(proxy.bad_blob)}")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                super().do_GET()

        self.server.RequestHandlerClass = _H


# ---------------------------------------------------------------------------- kill -9

def test_kill9_then_clean_remount_on_the_same_mountpoint(
        full_image: Image, start_daemon: StartFn, workdir: Path) -> None:
    cfg = localfs_config(full_image.blob_dir, workdir / "cache")
    d = start_daemon(bootstrap=full_image.bootstrap, config=cfg)
    assert read(d.mountpoint / "files/tiny") == src_bytes(full_image, "files/tiny")
    d.kill9()
    assert fuse_mounted(d.mountpoint)  # the mount outlives the daemon ...
    with pytest.raises(OSError) as err:
        os.listdir(d.mountpoint / "wide")  # ... dead (attrs are cached, opendir is not)
    assert err.value.errno == errno.ENOTCONN
    # a new daemon on the same mountpoint and API socket
    d2 = start_daemon(bootstrap=full_image.bootstrap, config=cfg, mountpoint=d.mountpoint,
                      apisock=d.apisock, timeout=30)
    assert "stale" in d2.log_text()
    with open("/proc/self/mountinfo") as f:
        mounts = [ln for ln in f if f" {os.path.realpath(d.mountpoint)} " in ln]
    assert len(mounts) == 1, mounts  # the dead one is gone, not stacked below
    assert read(d2.mountpoint / "files/multi-chunk") == src_bytes(full_image, "files/multi-chunk")


def test_a_read_in_flight_when_the_daemon_is_killed_fails_instead_of_hanging(
        full_image: Image, own_registry: Registry, start_daemon: StartFn,
        workdir: Path) -> None:
    """The read is surely in flight at the kill: the registry is stopped (SIGSTOP) under
    it and the daemon reports it waiting before the kill -9."""
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=registry_config(own_registry.host, REPO, workdir / "cache",
                                            timeout=TIMEOUT * 10, retry_limit=RETRIES))
    assert own_registry.proc is not None
    pid = own_registry.proc.pid
    os.kill(pid, signal.SIGSTOP)
    result: list[BaseException | bytes] = []

    def reader() -> None:
        try:
            result.append(read_once(d.mountpoint / "files/one-chunk"))
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=reader, daemon=True)
    try:
        t.start()
        wait_inflight_reads(d, 1)
        d.kill9()
        t.join(10)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert not t.is_alive() and result, "reader hung after kill -9"
    # ECONNABORTED for a request the dead daemon had already taken (ENOTCONN would be
    # one sent after the connection died, EIO a failed page read)
    assert isinstance(result[0], OSError), result[0]
    assert result[0].errno in (errno.ECONNABORTED, errno.ENOTCONN, errno.EIO), result[0]


def test_concurrent_readers_after_a_failed_fetch_never_see_zeros(
        full_image: Image, own_registry: Registry, start_daemon: StartFn,
        workdir: Path) -> None:
    """Reader A's fetch of a chunk fails (500, no retries) while B and C wait for it; B
    claims the chunk again, C waits for B. C used to stop waiting and read the chunk's
    still-empty cache range: 4 KiB of zeros returned as file data.

    The interleaving is made, not hoped for: the proxy holds A's request until the daemon
    reports all three reads in flight (B and C waiting on A's claim), then answers 500."""
    fp = FaultProxy(own_registry.host, match="/blobs/")
    try:
        d = start_daemon(bootstrap=full_image.bootstrap,
                         config=registry_config(fp.host, REPO, workdir / "cache",
                                                timeout=TIMEOUT * 10, retry_limit=0,
                                                amplify_io=0))
        path = d.mountpoint / "files/one-chunk"
        want = src_bytes(full_image, "files/one-chunk")
        fp.hold(1)
        fp.fail(1, 500)
        results: dict[int, bytes | OSError] = {}

        def reader(k: int) -> None:
            try:
                results[k] = read_once(path, k * 256 * 1024)
            except OSError as err:
                results[k] = err

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
        threads[0].start()
        fp.wait_count(1, "GET", "/blobs/")  # A's fetch is at the proxy, held
        threads[1].start()
        threads[2].start()
        wait_inflight_reads(d, 3)  # B and C wait in the daemon for A's chunk
        assert fp.count("GET", "/blobs/") == 1
        fp.release()  # A's fetch: 500
        for t in threads:
            t.join(30)
        assert len(results) == 3
        assert isinstance(results[0], OSError) and results[0].errno == errno.EIO, results[0]
        for k in (1, 2):
            got = results[k]
            assert isinstance(got, bytes), (k, got)
            assert got == want[k * 256 * 1024:k * 256 * 1024 + 4096], \
                f"reader {k} got wrong bytes (zeros: {got == bytes(4096)})"
        assert fp.count("GET", "/blobs/") == 2  # A's, then one claim for B and C
        assert d.backend_metrics()["read_errors"] == 1
    finally:
        fp.stop()


def test_sigterm_during_a_stuck_backend_read_exits_and_unmounts(
        full_image: Image, own_registry: Registry, start_daemon: StartFn,
        workdir: Path) -> None:
    """The registry hangs (SIGSTOP) under a read; SIGTERM. The daemon finishes within the
    backend's own bound (timeout x attempts: it drains the read, it does not abandon it),
    exits 0 and leaves no mount behind; the reader gets an error, not a hang."""
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=registry_config(own_registry.host, REPO, workdir / "cache",
                                            timeout=TIMEOUT, retry_limit=RETRIES))
    assert own_registry.proc is not None
    pid = own_registry.proc.pid
    os.kill(pid, signal.SIGSTOP)
    errors: list[int] = []

    def reader() -> None:
        try:
            read(d.mountpoint / "files/one-chunk")
        except OSError as err:
            errors.append(err.errno or 0)

    t = threading.Thread(target=reader, daemon=True)
    try:
        t.start()
        wait_inflight_reads(d, 1)  # the read is waiting for the stuck registry
        t0 = time.monotonic()
        assert d.proc.popen is not None
        d.proc.popen.send_signal(signal.SIGTERM)
        assert d.proc.popen.wait(BOUND + 5) == 0
        assert time.monotonic() - t0 < BOUND
        assert not fuse_mounted(d.mountpoint)
        t.join(10)
        assert not t.is_alive() and errors
    finally:
        os.kill(pid, signal.SIGCONT)
