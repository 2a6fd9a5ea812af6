"""Plain OCI images through containerd with ``fs_driver = "blockdev"`` (tarfs, docs/tarfs.md).

The CRI pulls the layered check image through our snapshotter: every layer is skipped
(containerd fetches no layer blob, the snapshotter downloads each once), and containers
run on EROFS mounts of the layer tars with an overlay upper on top. The rootfs must be
the one containerd's own overlayfs snapshotter unpacks from the same image, file for
file (names, modes, owners, sizes, links, contents). A container keeps running across a
snapshotter restart; removing the image and Cleanup leave no mount, no loop device and
no cache file. containerd 1.6 runs with loop devices, 2.x with file-backed mounts, so
both ways of handing the tars to the kernel go through a real containerd.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus import labels as L
from pynydus.api import snapshots_pb2 as pb
from pynydus.host.mountinfo import read_mountinfo
from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.cri import CriImages
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter

SNAP = "nydus"
NS = "k8s.io"  # the CRI plugin's namespace

# every file of the image's interesting trees, as `ls -l` would tell, and their contents
# (a directory's size and link count are the filesystem's own: EROFS and ext4 differ)
TREE_SCRIPT = ("cd / && for f in $(find bin/busybox app etc | sort); do "
               "stat -c '%n %A %u %g %N' \"$f\"; "
               "if [ -f \"$f\" ] && [ ! -L \"$f\" ]; then stat -c '%s %h' \"$f\"; "
               "md5sum \"$f\"; fi; done; true")


def _backing(version: str) -> str:
    return "loop" if version.startswith("1") else "file"


@pytest.fixture(scope="module")
def tarfs_env(registry: Registry, containerd_version: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Snapshotter, Containerd]]:
    config = tmp_path_factory.mktemp("tarfscfg") / "config.toml"
    config.write_text('version = 1\n[daemon]\nfs_driver = "blockdev"\n[experimental.tarfs]\n'
                      "enable_tarfs = true\nmount_tarfs_on_host = true\n")
    env = {"PYNYDUS_TARFS_BACKING": _backing(containerd_version)}
    with Snapshotter(config=config, env=env) as snap, Containerd(
            snap.socket, registry_hosts=[registry.host], cri=True, namespace=NS,
            version=containerd_version) as ctrd:
        yield snap, ctrd


@pytest.fixture(scope="module")
def pulled(tarfs_env: tuple[Snapshotter, Containerd], registry: Registry,
           layered_image: tuple[str, oci.BuiltImage]) -> dict:
    _snap, ctrd = tarfs_env
    ref, built = layered_image
    layers = [str(d["digest"]) for d in built.layers]
    before = {d: registry.blob_gets(d) for d in layers}
    CriImages(str(ctrd.socket)).pull(ref)
    return {"ref": ref, "built": built, "layers": layers, "before": before}


def run_in(ctrd: Containerd, ref: str, snapshotter: str, cid: str, script: str) -> str:
    try:
        return ctrd.ctr_out("run", "--rm", "--snapshotter", snapshotter, ref, cid,
                            "sh", "-c", script, timeout=180)
    finally:
        ctrd.ctr("tasks", "rm", "-f", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)


def erofs_mounts(snap: Snapshotter) -> list[str]:
    root = os.path.realpath(snap.root) + "/"
    return sorted(e.mountpoint for e in read_mountinfo()
                  if e.fstype == "erofs" and e.mountpoint.startswith(root))


def loop_devices() -> set[str]:
    return {n for n in os.listdir("/sys/block")
            if n.startswith("loop") and Path("/sys/block", n, "loop", "backing_file").exists()}


def test_cri_pull_skips_every_layer_and_fetches_each_blob_once(
        tarfs_env: tuple[Snapshotter, Containerd], pulled: dict, registry: Registry) -> None:
    snap, ctrd = tarfs_env
    content = ctrd.ctr("content", "ls", "-q").stdout
    for d in pulled["layers"]:
        assert d not in content, f"containerd fetched layer {d}"
    infos = {i.name: i for i in snap.list_infos()}
    for chain, d in zip(pulled["built"].chain_ids, pulled["layers"], strict=True):
        info = next(i for n, i in infos.items() if n.endswith(chain))
        assert info.labels[L.NYDUS_TARFS] == d.split(":", 1)[1]
    # the snapshotter converts in the background: once the first container is up, each
    # layer blob was downloaded exactly once
    out = run_in(ctrd, pulled["ref"], SNAP, "tarfs-check", images.CHECK_SCRIPT)
    assert out.strip().splitlines() == images.expected_check_output().splitlines()
    assert {d: registry.blob_gets(d) - pulled["before"][d] for d in pulled["layers"]} == \
        dict.fromkeys(pulled["layers"], 1)
    assert erofs_mounts(snap), "no EROFS mount serves the image"


def test_rootfs_is_overlayfs_rootfs_file_for_file(
        tarfs_env: tuple[Snapshotter, Containerd], pulled: dict) -> None:
    _snap, ctrd = tarfs_env
    ref = pulled["ref"]
    ours = run_in(ctrd, ref, SNAP, "tarfs-tree", TREE_SCRIPT)
    ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref, timeout=300)
    base = run_in(ctrd, ref, "overlayfs", "base-tree", TREE_SCRIPT)
    assert len(base.splitlines()) > 20, base
    assert ours.splitlines() == base.splitlines()


def test_container_writes_go_to_the_upper_layer(
        tarfs_env: tuple[Snapshotter, Containerd], pulled: dict) -> None:
    _snap, ctrd = tarfs_env
    out = run_in(ctrd, pulled["ref"], SNAP, "tarfs-write",
                 "echo new > /app/v3.txt && rm /app/keep.txt && cat /app/v3.txt && "
                 "ls /app/keep.txt 2>&1; true")
    assert out.splitlines()[0] == "new"
    # the image is untouched for the next container
    out = run_in(ctrd, pulled["ref"], SNAP, "tarfs-after", "cat /app/v3.txt /app/keep.txt")
    assert out.split() == ["three", "keep"]


def test_running_container_survives_snapshotter_restart(
        tarfs_env: tuple[Snapshotter, Containerd], pulled: dict) -> None:
    snap, ctrd = tarfs_env
    cid = "tarfs-sleeper"
    ctrd.ctr("run", "-d", "--snapshotter", SNAP, pulled["ref"], cid, "sleep", "300",
             timeout=180)
    try:
        mounts = erofs_mounts(snap)
        snap.restart()
        assert erofs_mounts(snap) == mounts  # adopted, not mounted again
        out = ctrd.ctr_out("tasks", "exec", "--exec-id", "e1", cid, "cat", "/app/v3.txt")
        assert out.strip() == "three"
        ctrd.wait_snapshotter(SNAP)
        out = run_in(ctrd, pulled["ref"], SNAP, "tarfs-after-restart", images.CHECK_SCRIPT)
        assert out.strip().splitlines() == images.expected_check_output().splitlines()
    finally:
        ctrd.ctr("tasks", "kill", "-s", "KILL", cid, check=False)
        time.sleep(0.5)
        ctrd.ctr("tasks", "rm", "-f", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)


def test_image_removal_and_cleanup_leave_no_mount_loop_device_or_tar(
        tarfs_env: tuple[Snapshotter, Containerd], pulled: dict) -> None:
    snap, ctrd = tarfs_env
    ctrd.remove_all_containers()
    # the CRI names the image by ref, digest and id; ctr pulled it again for overlayfs
    for name in ctrd.ctr_out("images", "ls", "-q").split():
        ctrd.ctr("images", "rm", "--sync", name, check=False)
    # containerd's GC removes the snapshots
    deadline = time.monotonic() + 60
    while snap.list_names():
        assert time.monotonic() < deadline, f"snapshots left: {snap.list_names()}"
        time.sleep(0.5)
    snap.stub().Cleanup(pb.CleanupRequest())
    assert erofs_mounts(snap) == []
    root = os.path.realpath(snap.root)
    assert [n for n in loop_devices()
            if Path("/sys/block", n, "loop", "backing_file").read_text().startswith(root)] == []
    assert os.listdir(snap.root / "snapshots") == []
    assert os.listdir(snap.root / "cache") == []
