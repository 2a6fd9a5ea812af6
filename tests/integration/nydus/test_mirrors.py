"""Mirrors the way containerd has them: ``[remote.mirrors_config] dir`` with ``hosts.toml``.

Real parts: the origin is a ``docker-registry``; the mirror is a second one configured as
its pull-through cache, serving https with a certificate of the test's own CA and
requiring a client certificate of that CA. The registry's ``certs.d/<host>/hosts.toml``
names the mirror with ``ca``, ``client``, ``health_check_interval``, ``failure_limit`` and
``ping_url``; the snapshotter puts that into the image's daemon config.

A container's reads go to the mirror; with the mirror killed (SIGKILL) they go to the
origin and the container sees no error; once the mirror is back (same port) and its
health-check interval has passed, reads return to it. Bad mirrors (one answering 500, one
that accepts connections and never answers) cost bounded time, the daemon's log names
them, and the reads succeed from the origin. A ``hosts.toml`` with a typo fails that
registry's image at Prepare, naming the file and key, while other images still mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from pynydus.host.mount import unmount_all
from pynydus.rafs.builder import build
from pynydus.registry.client import RegistryClient
from tests.harness.pki import Pki
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import make_workdir, remove_tree, wait_until
from tests.integration.registry.servers import FaultProxy

from .support import REPO, container_rootfs, mounted_rootfs, pull_nydus_image

pytestmark = [pytest.mark.root]

FILES = 6
HEALTH_CHECK_INTERVAL = 2  # seconds


@pytest.fixture(scope="module")
def origin_image() -> Iterator[dict]:
    """An image of FILES files of 1 MiB random data (a chunk each), its blob in an origin
    registry (plain http)."""
    work = make_workdir("mirimg")
    try:
        src = work / "src"
        src.mkdir()
        sums = {}
        for i in range(FILES):
            data = os.urandom(1 << 20)
            (src / f"f{i}.bin").write_bytes(data)
            sums[f"f{i}.bin"] = hashlib.sha256(data).hexdigest()
        result = build(str(src), str(work / "image.boot"), str(work / "blobs"),
                       compressor="lz4_block")
        with Registry(work / "origin") as origin:
            with RegistryClient(origin.host, scheme="http") as client:
                for b in result.blobs:
                    client.push_blob(REPO, Path(b.path), "sha256:" + b.blob_id)
            yield {"boot": work / "image.boot", "blob_ids": [b.blob_id for b in result.blobs],
                   "ref": f"{origin.host}/{REPO}:latest", "registry": origin, "sums": sums,
                   "work": work}
    finally:
        remove_tree(work)


def host_dir(certs: Path, host: str) -> Path:
    """containerd's directory for ``host:port``: ``host_port_``."""
    name, port = host.rsplit(":", 1)
    d = certs / f"{name}_{port}_"
    d.mkdir(parents=True, exist_ok=True)
    return d


def snapshotter_with(work: Path, certs: Path, timeout: int = 5) -> Snapshotter:
    template = work / "nydusd.json"
    template.write_text(json.dumps({
        "device": {"backend": {"type": "registry",
                               "config": {"timeout": timeout, "connect_timeout": timeout,
                                          "retry_limit": 1}},
                   "cache": {"type": "blobcache", "config": {"work_dir": ""}}},
        "mode": "direct", "digest_validate": False, "enable_xattr": True,
        "amplify_io": 131072, "fs_prefetch": {"enable": False}}))
    config = work / "config.toml"
    config.write_text(f'version = 1\n[daemon]\nnydusd_config = "{template}"\n'
                      f'[remote.mirrors_config]\ndir = "{certs}"\n')
    return Snapshotter(config=config)


def read(rootfs: Path, name: str, image: dict) -> float:
    t0 = time.monotonic()
    data = (rootfs / name).read_bytes()
    took = time.monotonic() - t0
    assert hashlib.sha256(data).hexdigest() == image["sums"][name], name
    return took


def settled(count: Callable[[], int], quiet: float = 1.0) -> int:
    """``count()`` once it has not changed for ``quiet`` seconds (distribution writes a
    request's log line when its answer is done; at most 10 s)."""
    last, since, deadline = count(), time.monotonic(), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def daemon_logs(snap: Snapshotter) -> str:
    return "".join(p.read_text(errors="replace") for p in snap.workdir.rglob("nydusd.log"))


def test_pull_through_mirror_with_tls_fails_over_and_back(origin_image: dict,
                                                          tmp_path: Path) -> None:
    origin: Registry = origin_image["registry"]
    blob = "sha256:" + origin_image["blob_ids"][0]
    # distribution's pull-through cache answers a range with the whole blob (200) and
    # logs 500 when the reader hangs up after its range: count every GET at the mirror
    work = make_workdir("mirror")
    try:
        pki = Pki(work / "pki")
        server_cert, server_key = pki.server("mirror")
        client_cert, client_key = pki.client("node")
        with Registry(work / "mirror", tls=(server_cert, server_key), client_ca=pki.ca,
                      ca=pki.ca, client=(client_cert, client_key),
                      proxy_remote=origin.url) as mirror:
            certs = work / "certs.d"
            (host_dir(certs, origin.host) / "hosts.toml").write_text(
                f'[host."https://{mirror.host}"]\n'
                '  capabilities = ["pull", "resolve"]\n'
                f'  ca = "{pki.ca}"\n'
                f'  client = [["{client_cert}", "{client_key}"]]\n'
                f'  health_check_interval = {HEALTH_CHECK_INTERVAL}\n'
                '  failure_limit = 1\n'
                f'  ping_url = "https://{mirror.host}/v2/"\n')
            with snapshotter_with(work, certs) as snap:
                top = pull_nydus_image(snap, origin_image)
                rootfs = tmp_path / "rootfs"
                container_rootfs(snap, top, "default/9/c", rootfs)
                try:
                    cfg = json.loads(next((snap.root / "config").rglob("config.json"))
                                     .read_text())
                    mirrors = cfg["device"]["backend"]["config"]["mirrors"]
                    assert [m["host"] for m in mirrors] == [f"https://{mirror.host}"]
                    assert mirrors[0]["client_cert"] == str(client_cert)
                    # 1. through the mirror (TLS, client certificate)
                    m0 = mirror.blob_gets(blob, ok_only=False)
                    read(rootfs, "f0.bin", origin_image)
                    # (distribution logs a request when its answer is done: wait for it)
                    wait_until(lambda: mirror.blob_gets(blob, ok_only=False) > m0, 10,
                               "the read to show at the mirror")
                    # 2. mirror killed: the origin answers, the container sees no error
                    mirror.kill()
                    o1 = origin.blob_gets(blob)
                    took = read(rootfs, "f1.bin", origin_image)
                    read(rootfs, "f2.bin", origin_image)
                    wait_until(lambda: origin.blob_gets(blob) >= o1 + 2, 10,
                               "the reads to show at the origin")
                    assert took < 10, f"fall-back took {took:.1f} s"
                    assert f"registry mirror https://{mirror.host} failed" in daemon_logs(snap)
                    # 3. mirror back: after its interval (and a ping) reads return to it
                    mirror.restart()
                    m2 = mirror.blob_gets(blob, ok_only=False)
                    time.sleep(HEALTH_CHECK_INTERVAL + 0.5)
                    read(rootfs, "f3.bin", origin_image)
                    wait_until(lambda: mirror.blob_gets(blob, ok_only=False) > m2, 10,
                               "reads to return to the mirror")
                    assert "answers again" in daemon_logs(snap)
                    # (reads racing the ping went to the origin meanwhile, by design);
                    # once back, reads go to the mirror, which has the blob cached: the
                    # origin sees none of them
                    o3 = settled(lambda: origin.blob_gets(blob))
                    m3 = mirror.blob_gets(blob, ok_only=False)
                    read(rootfs, "f4.bin", origin_image)
                    read(rootfs, "f5.bin", origin_image)
                    wait_until(lambda: mirror.blob_gets(blob, ok_only=False) >= m3 + 2, 10,
                               "the reads to show at the mirror")
                    assert settled(lambda: origin.blob_gets(blob)) == o3, \
                        "reads went to the origin with the mirror back"
                finally:
                    unmount_all(str(rootfs))
    finally:
        remove_tree(work)


class _Silent:
    """A TCP listener that never accepts: connections complete in the kernel's backlog
    and requests are never answered."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


def test_bad_mirrors_cost_bounded_time_and_are_named(origin_image: dict,
                                                     tmp_path: Path) -> None:
    origin: Registry = origin_image["registry"]
    work = make_workdir("badmir")
    failing = FaultProxy(origin.host)
    silent = _Silent()
    try:
        failing.fail(1000, 500)
        certs = work / "certs.d"
        (host_dir(certs, origin.host) / "hosts.toml").write_text(
            f'[host."http://{failing.host}"]\n'
            f'[host."http://{silent.host}"]\n'
            '  failure_limit = 1\n'
            '  health_check_interval = 60\n')
        with snapshotter_with(work, certs, timeout=2) as snap:
            top = pull_nydus_image(snap, origin_image)
            rootfs = tmp_path / "rootfs"
            container_rootfs(snap, top, "default/9/c", rootfs)
            try:
                first = read(rootfs, "f0.bin", origin_image)
                # one 500 and one read timeout (2 s, plus one retry) at most, then the origin
                assert first < 10, f"first read took {first:.1f} s"
                timeouts = daemon_logs(snap).count(f"registry mirror http://{silent.host} failed")
                assert timeouts >= 1
                later = [read(rootfs, f"f{i}.bin", origin_image) for i in range(1, FILES)]
                # the silent mirror is skipped for its interval: no more timeouts (counted
                # in the log; the times only as a loose bound, the machine may be loaded)
                logs = daemon_logs(snap)
                assert logs.count(f"registry mirror http://{silent.host} failed") == timeouts, \
                    later
                assert max(later) < 10, later
                assert f"registry mirror http://{silent.host} failed (ReadTimeout" in logs
                assert f"registry mirror http://{failing.host} failed (HTTP 500" in logs
            finally:
                unmount_all(str(rootfs))
    finally:
        failing.stop()
        silent.close()
        remove_tree(work)


def test_hosts_toml_typo_fails_only_that_registrys_images(origin_image: dict,
                                                          tmp_path: Path) -> None:
    origin: Registry = origin_image["registry"]
    work = make_workdir("typomir")
    try:
        certs = work / "certs.d"
        bad = host_dir(certs, origin.host) / "hosts.toml"
        bad.write_text('[host."http://127.0.0.1:1"]\n  capabilites = ["pull"]\n')
        with snapshotter_with(work, certs) as snap:
            assert f"{bad}: host.\"http://127.0.0.1:1\": unknown key \"capabilites\"" in \
                snap.proc.log_tail(200)  # reported at start-up
            top = pull_nydus_image(snap, origin_image)
            with pytest.raises(grpc.RpcError) as err:
                container_rootfs(snap, top, "default/9/c", tmp_path / "r1")
            assert str(bad) in err.value.details() and '"capabilities"' in err.value.details()
            # the same image under a name whose registry has no entry mounts and reads
            other = dict(origin_image, ref=origin_image["ref"].replace("127.0.0.1", "localhost"))
            top2 = pull_nydus_image(snap, other, "ns2")
            with mounted_rootfs(snap, top2, "ns2/9/c", tmp_path / "r2") as rootfs:
                read(rootfs, "f0.bin", origin_image)
            # fixed, the next image of that registry mounts without a restart
            bad.write_text('[host."http://127.0.0.1:1"]\n  capabilities = ["pull"]\n')
            top3 = pull_nydus_image(snap, origin_image, "ns3")
            with mounted_rootfs(snap, top3, "ns3/9/c", tmp_path / "r3") as rootfs:
                read(rootfs, "f1.bin", origin_image)
    finally:
        remove_tree(work)
