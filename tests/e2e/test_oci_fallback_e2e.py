"""Automatic fallback to OCI: an image that has OCI layers (here a ZRAN image, whose data
layers name the original gzip layers) and cannot be served lazily still runs: the
snapshotter unpacks its OCI layers, logs the cause, counts it and labels the layers
(``containerd.io/snapshot/nydus-oci-fallback``, visible in ``ctr snapshot info``).

Causes provoked: the daemon does not start (``daemon.nydusd_path`` is a program that
exits), the bootstrap is corrupt (a bootstrap layer whose ``image.boot`` is garbage),
the registry refuses ranged reads (a proxy in front of it answers every Range GET
403), and the cache disk is full (the cache directory on a full tmpfs). The decision
survives a restart of the snapshotter (the labels are in its metadata store): the
image keeps running from its OCI layers, no daemon is started for it.
``snapshot.oci_fallback = false`` turns it off: the container fails, naming the
cause. Runs against containerd 1.6 and 2.x.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pytest

from pynydus.convert.converter import ConvertOptions, convert
from pynydus.convert.layer import BuildOptions
from pynydus.registry import RegistryClient
from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.cri import CriImages
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter

SNAP = "nydus"
NS = "k8s.io"
FALLBACK = "containerd.io/snapshot/nydus-oci-fallback"


class RangeRefusingProxy:
    """Forwards to the registry; a blob GET with a Range header gets 403."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.refused = 0
        proxy = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                if "/blobs/" in self.path and self.headers.get("Range"):
                    proxy.refused += 1
                    body = b'{"errors":[{"code":"DENIED","message":"ranged reads refused"}]}'
                    self.send_response(403)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n) if n else None
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def zran_images(registry: Registry, layouts: Path) -> dict[str, str]:
    """ZRAN images, each of its own layers (containerd reuses snapshots by chain id):
    "good", "corrupt" (bootstrap layer replaced by garbage), "ranged", "nofallback"."""
    refs = {}
    for name in ("good", "corrupt", "ranged", "nofallback", "daemon", "restart", "full"):
        image = images.layered_image()
        image.layers.append(oci.Layer(name).file(f"etc/fb-{name}", f"{name}\n"))
        src = registry.ref(f"e2e/fb-{name}", "oci")
        oci.push(image.write_layout(layouts / f"fb-{name}"), src)
        dst = registry.ref(f"e2e/fb-{name}", "zran")
        convert(ConvertOptions(source=src, target=dst, source_insecure=True,
                               target_insecure=True, build=BuildOptions(oci_ref=True)))
        refs[name] = dst
    _corrupt_bootstrap(registry, "e2e/fb-corrupt", "zran")
    return refs


def _corrupt_bootstrap(registry: Registry, repo: str, tag: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        garbage = b"\x00not a bootstrap" * 512
        ti = tarfile.TarInfo("image/image.boot")
        ti.size = len(garbage)
        tf.addfile(ti, io.BytesIO(garbage))
    layer = buf.getvalue()

    def sha(b: bytes) -> str:
        return "sha256:" + hashlib.sha256(b).hexdigest()

    with RegistryClient(registry.host, scheme="http") as c:
        m = c.get_manifest(repo, tag)
        doc = json.loads(m.data)
        c.push_blob(repo, io.BytesIO(layer), sha(layer), size=len(layer))
        doc["layers"][-1].update(digest=sha(layer), size=len(layer))
        config = json.loads(b"".join(c.get_blob(repo, doc["config"]["digest"])))
        config["rootfs"]["diff_ids"][-1] = sha(gzip.decompress(layer))
        cbytes = json.dumps(config).encode()
        c.push_blob(repo, io.BytesIO(cbytes), sha(cbytes), size=len(cbytes))
        doc["config"].update(digest=sha(cbytes), size=len(cbytes))
        c.put_manifest(repo, tag, m.media_type, json.dumps(doc).encode())


def _env(registry: Registry, version: str, tmp: Path, toml: str,
         hosts: list[str]) -> tuple[Snapshotter, Containerd]:
    config = tmp / "config.toml"
    config.write_text("version = 1\n" + toml)
    snap = Snapshotter(config=config)
    return snap, Containerd(snap.socket, registry_hosts=hosts, cri=True, namespace=NS,
                            version=version)


@pytest.fixture(scope="module")
def proxy(registry: Registry) -> Iterator[RangeRefusingProxy]:
    with RangeRefusingProxy(registry.host) as p:
        yield p


@pytest.fixture(scope="module")
def fb_env(registry: Registry, proxy: RangeRefusingProxy, containerd_version: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Snapshotter, Containerd]]:
    snap, ctrd = _env(registry, containerd_version, tmp_path_factory.mktemp("fb"), "",
                      [registry.host, proxy.host])
    with snap, ctrd:
        yield snap, ctrd


def _run(ctrd: Containerd, ref: str, cid: str, name: str, check: bool = True
         ) -> subprocess.CompletedProcess[str]:
    script = images.CHECK_SCRIPT + f"\necho fb=$(cat /etc/fb-{name})\n"
    try:
        return ctrd.ctr("run", "--rm", "--snapshotter", SNAP, ref, cid, "sh", "-c", script,
                        timeout=180, check=check)
    finally:
        ctrd.ctr("tasks", "rm", "-f", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)


def _fallback_labels(ctrd: Containerd, ref: str) -> list[str]:
    out = []
    for line in ctrd.ctr_out("snapshots", "--snapshotter", SNAP, "ls").splitlines()[1:]:
        info = json.loads(ctrd.ctr_out("snapshots", "--snapshotter", SNAP, "info",
                                       line.split()[0]))
        lb = info.get("Labels") or {}
        if lb.get("containerd.io/snapshot/cri.image-ref") == ref and FALLBACK in lb:
            out.append(lb[FALLBACK])
    return out


def _expect(name: str) -> str:
    return images.expected_check_output() + f"\nfb={name}"


def _falls_back(ctrd: Containerd, ref: str, name: str, kind: str) -> list[str]:
    """Pull ``ref`` through the CRI and run it: it runs, and its layers carry the
    fallback label with a cause of ``kind``; returns the labels' values."""
    CriImages(str(ctrd.socket)).pull(ref)
    assert _run(ctrd, ref, f"fb-{name}", name).stdout.strip() == _expect(name)
    causes = _fallback_labels(ctrd, ref)
    assert causes and all(c.startswith(f"{kind}:") for c in causes), causes
    return causes


def test_good_zran_image_is_served_lazily_without_fallback(fb_env, zran_images) -> None:
    _snap, ctrd = fb_env
    ref = zran_images["good"]
    CriImages(str(ctrd.socket)).pull(ref)
    assert _run(ctrd, ref, "fb-good", "good").stdout.strip() == _expect("good")
    assert _fallback_labels(ctrd, ref) == []


def test_corrupt_bootstrap_falls_back_to_the_oci_layers(fb_env, zran_images) -> None:
    snap, ctrd = fb_env
    _falls_back(ctrd, zran_images["corrupt"], "corrupt", "bootstrap")
    assert "cannot be served lazily" in snap.log.read_text()


def test_registry_refusing_ranged_reads_falls_back(fb_env, zran_images, registry: Registry,
                                                   proxy: RangeRefusingProxy) -> None:
    _snap, ctrd = fb_env
    ref = zran_images["ranged"].replace(registry.host, proxy.host)
    refused = proxy.refused
    _falls_back(ctrd, ref, "ranged", "ranged-read")
    assert proxy.refused > refused


def test_daemon_that_does_not_start_falls_back(registry: Registry, zran_images,
                                                containerd_version: str, tmp_path: Path) -> None:
    snap, ctrd = _env(registry, containerd_version, tmp_path,
                      '[daemon]\nnydusd_path = "/bin/false"\n', [registry.host])
    with snap, ctrd:
        _falls_back(ctrd, zran_images["daemon"], "daemon", "daemon")
        metrics = snap.log.read_text()
        assert "cannot be served lazily" in metrics


def test_fallback_survives_a_snapshotter_restart(registry: Registry, zran_images,
                                                 containerd_version: str, tmp_path: Path) -> None:
    snap, ctrd = _env(registry, containerd_version, tmp_path,
                      '[daemon]\nnydusd_path = "/bin/false"\n', [registry.host])
    with snap, ctrd:
        ref = zran_images["restart"]
        before = _falls_back(ctrd, ref, "restart", "daemon")
        # A working daemon now: the image stays what it fell back to (no remount, no
        # second unpack), and still runs.
        assert snap.config is not None
        snap.config.write_text("version = 1\n")
        snap.restart()
        ctrd.wait_snapshotter(SNAP)  # containerd redials a restarted proxy with a backoff
        assert _run(ctrd, ref, "fb-restart2", "restart").stdout.strip() == _expect("restart")
        assert _fallback_labels(ctrd, ref) == before
        assert snap.image_daemon_pids() == []
        snap.kill9()
        snap.start()
        ctrd.wait_snapshotter(SNAP)
        assert _run(ctrd, ref, "fb-restart3", "restart").stdout.strip() == _expect("restart")
        assert _fallback_labels(ctrd, ref) == before
        log = snap.log.read_text()
        assert log.count("cannot be served lazily") == 1, log


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs with no space left (a file fills it), unmounted afterwards."""
    mnt = Path(tempfile.mkdtemp(prefix="pyn-full-", dir="/var/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=64", "tmpfs", str(mnt)],
                   check=True)
    try:
        with open(mnt / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (64 << 10))
                    f.flush()
            except OSError as err:
                assert err.errno == errno.ENOSPC
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def test_full_cache_disk_falls_back(registry: Registry, zran_images, containerd_version: str,
                                    tmp_path: Path, full_disk: Path) -> None:
    """The daemon cannot store what it fetches: the first read fails, the image runs
    from its OCI layers (unpacked into the snapshotter's root, another disk) and the
    cause says the cache is full."""
    snap, ctrd = _env(registry, containerd_version, tmp_path,
                      f'[cache_manager]\ncache_dir = "{full_disk}/cache"\n', [registry.host])
    with snap, ctrd:
        _falls_back(ctrd, zran_images["full"], "full", "cache-full")


def test_fallback_off_fails_the_container_naming_the_cause(
        registry: Registry, zran_images, containerd_version: str, tmp_path: Path) -> None:
    snap, ctrd = _env(registry, containerd_version, tmp_path,
                      "[snapshot]\noci_fallback = false\n", [registry.host])
    with snap, ctrd:
        ref = zran_images["nofallback"]
        _corrupt_bootstrap(registry, "e2e/fb-nofallback", "zran")
        CriImages(str(ctrd.socket)).pull(ref)
        proc = _run(ctrd, ref, "fb-off", "nofallback", check=False)
        assert proc.returncode != 0
        assert "bootstrap" in proc.stderr, proc.stderr
        assert _fallback_labels(ctrd, ref) == []
