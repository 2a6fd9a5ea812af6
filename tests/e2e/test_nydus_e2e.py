"""Lazy pulling end to end: containerd runs Nydus images through our snapshotter and pynydusd.

The layered check image is converted with ``pynydus convert`` and pulled through
containerd's CRI ImageService (as kubelet does, so the ``cri.*`` labels reach the
snapshotter). The pull downloads only the bootstrap layer; ``ctr run`` then starts
a container whose files are fetched chunk by chunk by a pynydusd process.

Every test runs against containerd 1.6 and 2.x (``containerd_version``), the module's
shared environment in both daemon modes (``dedicated``: a daemon per image; ``shared``:
one daemon for all) and with ``fs_driver = "blobfile"`` (dedicated daemons showing blob
files, the image the kernel's EROFS mount over them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.convert.converter import ConvertOptions, convert
from tests.harness import images, oci, tools
from tests.harness.containerd import Containerd
from tests.harness.cri import CriImages
from tests.harness.node import cri_node
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter

SNAP = "nydus"
NS = "k8s.io"  # the CRI plugin's namespace


@pytest.fixture(scope="module")
def nydus_ref(registry: Registry, layered_image: tuple[str, oci.BuiltImage]) -> str:
    src, _ = layered_image
    target = registry.ref("e2e/layered", "nydus")
    convert(ConvertOptions(source=src, target=target, source_insecure=True, target_insecure=True))
    return target


# daemon mode, and fs_driver: blobfile is ours (kernel EROFS over the daemon's blob files)
CONFIGS = {
    "dedicated": 'daemon_mode = "dedicated"\n',
    "shared": 'daemon_mode = "shared"\n',
    "blobfile": 'daemon_mode = "dedicated"\n[daemon]\nfs_driver = "blobfile"\n',
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def daemon_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def nydus_env(registry: Registry, containerd_version: str,
              daemon_mode: str) -> Iterator[tuple[Snapshotter, Containerd]]:
    with cri_node(registry, containerd_version, f"version = 1\n{CONFIGS[daemon_mode]}") as node:
        yield node


@pytest.fixture(scope="module")
def nydus_layers(nydus_ref: str) -> tuple[list[str], str]:
    """(data blob digests, bootstrap layer digest) of the converted image."""
    manifest = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{nydus_ref}"],
        check=True, capture_output=True, text=True).stdout)
    layers = manifest["layers"]
    data = [l["digest"] for l in layers if "containerd.io/snapshot/nydus-blob" in l.get("annotations", {})]
    boot = [l["digest"] for l in layers if "containerd.io/snapshot/nydus-bootstrap" in l.get("annotations", {})]
    assert data and len(boot) == 1
    return data, boot[0]


@pytest.fixture(scope="module")
def pulled(nydus_env: tuple[Snapshotter, Containerd], nydus_ref: str, registry: Registry,
           nydus_layers: tuple[list[str], str]) -> dict:
    _snap, ctrd = nydus_env
    data, boot = nydus_layers
    before = {d: registry.blob_gets(d) for d in [*data, boot]}
    t0 = time.monotonic()
    CriImages(str(ctrd.socket)).pull(nydus_ref)
    pull_s = time.monotonic() - t0
    return {"data": data, "boot": boot, "before": before, "pull_s": pull_s}


def wait_reachable(ctrd: Containerd, timeout: float = 15) -> None:
    """containerd re-dials a restarted proxy plugin with backoff (up to 3 s): wait for it,
    as an operator's next call would. Prepare + Remove proves the round trip."""
    deadline = time.monotonic() + timeout
    while True:
        key = f"probe-{time.monotonic_ns()}"
        proc = ctrd.ctr("snapshots", "--snapshotter", SNAP, "prepare", key, check=False, timeout=30)
        if proc.returncode == 0:
            ctrd.ctr("snapshots", "--snapshotter", SNAP, "rm", key, check=False)
            return
        if time.monotonic() > deadline:
            pytest.fail(f"containerd did not reach the restarted snapshotter: {proc.stderr}")
        time.sleep(0.2)


def run_check(ctrd: Containerd, ref: str, cid: str) -> str:
    try:
        return ctrd.ctr_out("run", "--rm", "--snapshotter", SNAP, ref, cid, "sh", "-c",
                            images.CHECK_SCRIPT, timeout=180).strip()
    finally:
        ctrd.ctr("tasks", "rm", "-f", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)


def test_pull_downloads_only_the_bootstrap(nydus_env, pulled: dict, registry: Registry) -> None:
    _snap, ctrd = nydus_env
    for d in pulled["data"]:
        assert registry.blob_gets(d) == pulled["before"][d], f"data blob {d} was downloaded at pull"
    assert registry.blob_gets(pulled["boot"]) > pulled["before"][pulled["boot"]]
    content = ctrd.ctr_out("content", "ls", "-q")
    for d in pulled["data"]:
        assert d not in content  # containerd's content store never got the data layers
    assert pulled["boot"] in content


def test_container_reads_lazily_and_sees_the_right_rootfs(nydus_env, pulled: dict, nydus_ref: str,
                                                           registry: Registry) -> None:
    snap, ctrd = nydus_env
    out = run_check(ctrd, nydus_ref, "ny-check-1")
    assert out == images.expected_check_output()
    fetched = sum(registry.blob_gets(d) - pulled["before"][d] for d in pulled["data"])
    assert fetched > 0  # the data came at run time, on demand
    assert len(snap.image_daemon_pids()) == 1


def test_second_container_reuses_the_daemon(nydus_env, pulled: dict, nydus_ref: str) -> None:
    snap, ctrd = nydus_env
    before = snap.image_daemon_pids()
    assert run_check(ctrd, nydus_ref, "ny-check-2") == images.expected_check_output()
    assert snap.image_daemon_pids() == before


def test_oci_image_runs_beside_it(nydus_env, pulled: dict, layered_image) -> None:
    _snap, ctrd = nydus_env
    ref, _ = layered_image
    CriImages(str(ctrd.socket)).pull(ref)
    assert run_check(ctrd, ref, "oci-check") == images.expected_check_output()


def test_running_container_survives_snapshotter_restart(nydus_env, pulled: dict, nydus_ref: str) -> None:
    snap, ctrd = nydus_env
    cid = "ny-sleeper"
    ctrd.ctr("run", "-d", "--snapshotter", SNAP, nydus_ref, cid, "sleep", "300")
    try:
        daemons = snap.image_daemon_pids()
        snap.restart()
        assert snap.image_daemon_pids() == daemons
        out = ctrd.ctr_out("tasks", "exec", "--exec-id", "e1", cid, "cat", "/app/v3.txt")
        assert out.strip() == "three"
        wait_reachable(ctrd)
        assert run_check(ctrd, nydus_ref, "ny-check-3") == images.expected_check_output()
    finally:
        ctrd.ctr("tasks", "kill", "-s", "KILL", cid, check=False)
        time.sleep(0.5)
        ctrd.ctr("tasks", "rm", "-f", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)


def test_killed_daemon_is_restarted(nydus_env, pulled: dict, nydus_ref: str) -> None:
    snap, ctrd = nydus_env
    (pid,) = snap.image_daemon_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = snap.image_daemon_pids()
        if now and now != [pid]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the daemon was not restarted (recover_policy restart)")
    assert run_check(ctrd, nydus_ref, "ny-check-4") == images.expected_check_output()


@pytest.mark.parametrize("containerd_version", [pytest.param("1.6", id="ctrd1.6")])
def test_plain_ctr_pull_fails_clearly(registry: Registry, nydus_ref: str,
                                      containerd_version: str) -> None:
    """ctr 1.6 hands the snapshotter neither layer annotations nor the image reference,
    so it cannot pull a Nydus image lazily; the pull must fail naming the blob media type
    (README: use the CRI, ctr-remote images rpull or nerdctl)."""
    with Snapshotter() as snap, Containerd(snap.socket, registry_hosts=[registry.host],
                                           version=containerd_version) as ctrd:
        proc = ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", SNAP, nydus_ref,
                        check=False, timeout=300)
        assert proc.returncode != 0
        assert "application/vnd.oci.image.layer.nydus.blob.v1" in proc.stderr


@pytest.mark.parametrize("containerd_version", [pytest.param("2", id="ctrd2")])
def test_transfer_service_pulls_are_lazy(registry: Registry, nydus_ref: str,
                                         nydus_layers: tuple[list[str], str],
                                         containerd_version: str) -> None:
    """containerd 2.x pulls through its transfer service: the CRI's default since 2.1
    (``disable_snapshot_annotations = true``) and ``ctr image pull``. The proxy's
    ``enable_remote_snapshot_annotations`` export makes it label the layers as the CRI
    does, so both pull no data blob and the image runs."""
    data, _ = nydus_layers
    with Snapshotter() as snap, Containerd(snap.socket, registry_hosts=[registry.host], cri=True,
                                           cri_transfer=True, namespace=NS,
                                           version=containerd_version) as ctrd:
        before = {d: registry.blob_gets(d) for d in data}
        CriImages(str(ctrd.socket)).pull(nydus_ref)
        assert "Falling back to local image pull" not in ctrd.log.read_text()
        ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", SNAP, nydus_ref,
                 namespace="xfer")
        assert {d: registry.blob_gets(d) for d in data} == before, "a data blob was pulled"
        for ns in (NS, "xfer"):
            content = ctrd.ctr("content", "ls", "-q", namespace=ns).stdout
            assert not any(d in content for d in data)
        out = ctrd.ctr("run", "--rm", "--snapshotter", SNAP, nydus_ref, "xfer-run", "cat",
                       "/app/v3.txt", namespace="xfer", timeout=120).stdout
        assert out.strip() == "three"
        assert run_check(ctrd, nydus_ref, "xfer-check") == images.expected_check_output()


def test_ctr_remote_rpull_pulls_lazily(nydus_env, pulled: dict, nydus_ref: str) -> None:
    """ctr-remote passes the layer annotations and stargz's reference label, which is
    enough for us: the pull downloads no data blob and the image runs."""
    tools.require("/usr/bin/ctr-remote")
    _snap, ctrd = nydus_env
    ns = "rpull"
    subprocess.run(["/usr/bin/ctr-remote", "-a", str(ctrd.socket), "-n", ns, "images", "rpull",
                    "--plain-http", "--snapshotter", SNAP, nydus_ref], check=True, capture_output=True,
                   timeout=300)
    content = ctrd.ctr("content", "ls", "-q", namespace=ns).stdout
    assert not any(d in content for d in pulled["data"])
    out = ctrd.ctr("run", "--rm", "--snapshotter", SNAP, nydus_ref, "rpull-run", "cat",
                   "/app/v3.txt", namespace=ns, timeout=120).stdout
    assert out.strip() == "three"


def test_registry_down_at_run_time_gives_eio_and_snapshotter_stays_healthy(
        tmp_path: Path, containerd_version: str) -> None:
    """Data not cached and the registry gone: reads fail with EIO (no hang, no wrong
    bytes), the snapshotter keeps answering, and reads work again once it is back."""
    workdir = tmp_path / "reg"
    workdir.mkdir()
    payload = os.urandom(3 << 20)
    app = oci.Layer("payload").file("app/payload.bin", payload).file("app/ok.txt", "ok\n")
    built = oci.Image([oci.busybox_layer(), app], cmd=["true"]).write_layout(tmp_path / "layout")
    reg = Registry(workdir)
    reg.start()
    try:
        src, ref = reg.ref("down/app"), reg.ref("down/app", "nydus")
        oci.push(built, src)
        convert(ConvertOptions(source=src, target=ref, source_insecure=True, target_insecure=True))
        with Snapshotter() as snap, Containerd(snap.socket, registry_hosts=[reg.host], cri=True,
                                               namespace=NS, version=containerd_version) as ctrd:
            CriImages(str(ctrd.socket)).pull(ref)
            # busybox and ok.txt are read (and cached) while the registry is up
            assert ctrd.ctr_out("run", "--rm", "--snapshotter", SNAP, ref, "warm", "cat", "/app/ok.txt",
                                timeout=120).strip() == "ok"
            assert reg.proc is not None
            reg.proc.stop()
            t0 = time.monotonic()
            proc = ctrd.ctr("run", "--rm", "--snapshotter", SNAP, ref, "cold", "sh", "-c",
                            "cat /app/payload.bin >/dev/null 2>/tmp/err; echo rc=$?; cat /tmp/err",
                            check=False, timeout=180)
            elapsed = time.monotonic() - t0
            assert "rc=1" in proc.stdout and "Input/output error" in proc.stdout, proc.stdout + proc.stderr
            assert elapsed < 90
            assert ctrd.ctr_out("snapshots", "--snapshotter", SNAP, "ls")  # still healthy
            reg.proc.start()
            out = ctrd.ctr_out("run", "--rm", "--snapshotter", SNAP, ref, "back", "sh", "-c",
                               "sha256sum /app/payload.bin | cut -d' ' -f1", timeout=120)
            assert out.strip() == hashlib.sha256(payload).hexdigest()
    finally:
        reg.stop()


def test_remove_image_and_prune_stops_daemons_and_drops_cache(nydus_env, pulled: dict, nydus_ref: str) -> None:
    snap, ctrd = nydus_env
    cri = CriImages(str(ctrd.socket))
    for img in cri.list():
        cri.remove(img.id)
    for ns in (NS, "rpull"):
        refs = ctrd.ctr("images", "ls", "-q", namespace=ns).stdout.split()
        if refs:
            ctrd.ctr("images", "rm", "--sync", *refs, namespace=ns, check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (snap.image_daemon_pids() or os.listdir(snap.root / "snapshots")):
        time.sleep(0.2)
    assert snap.image_daemon_pids() == []
    assert os.listdir(snap.root / "snapshots") == []
    assert [f for f in os.listdir(snap.root / "cache")] == []


def test_nydus_overlayfs_mounts(registry: Registry, nydus_ref: str, tmp_path: Path,
                                containerd_version: str) -> None:
    """enable_nydus_overlayfs: containers get one fuse.nydus-overlayfs mount carrying
    extraoption; containerd runs it through mount.fuse3 and our helper."""
    tools.require("mount.fuse3")
    assert shutil.which("nydus-overlayfs"), "nydus-overlayfs is not in PATH: scripts/setup.sh links it"
    with cri_node(registry, containerd_version,
                  'version = 1\n[snapshot]\nenable_nydus_overlayfs = true\n') as (_snap, ctrd):
        CriImages(str(ctrd.socket)).pull(nydus_ref)
        rows = [line.split() for line in ctrd.ctr_out("snapshots", "--snapshotter", SNAP, "ls").splitlines()[1:]]
        parents = {r[1] for r in rows if len(r) == 3}
        (top,) = [r[0] for r in rows if r[0] not in parents]
        ctrd.ctr("snapshots", "--snapshotter", SNAP, "prepare", "ovl-probe", top)
        shown = ctrd.ctr_out("snapshots", "--snapshotter", SNAP, "mounts", "/mnt/x", "ovl-probe")
        assert "-t fuse.nydus-overlayfs" in shown and "extraoption=" in shown
        ctrd.ctr("snapshots", "--snapshotter", SNAP, "rm", "ovl-probe")
        assert run_check(ctrd, nydus_ref, "ny-ovl") == images.expected_check_output()
