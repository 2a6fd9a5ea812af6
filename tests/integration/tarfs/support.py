"""The calls containerd makes for a plain OCI image pulled through a tarfs snapshotter, and
what we look at afterwards (rootfs content, loop devices, kernel mounts)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from pynydus import labels as L
from pynydus.api import snapshots_pb2 as pb
from pynydus.host.mount import MountSpec, mount_all, unmount_all
from pynydus.host.mountinfo import read_mountinfo
from tests.harness import images
from tests.harness.snapshotter import Snapshotter

# name -> what the config and the environment say
SETUPS: dict[str, dict[str, str]] = {
    "blockdev-file": {"fs_driver": "blockdev", "mount_mode": "layer", "backing": "file"},
    "fusedev-image-loop": {"fs_driver": "fusedev", "mount_mode": "image", "backing": "loop"},
}


def config_text(setup: str, *, extra: str = "", **tarfs: object) -> str:
    s = SETUPS[setup]
    keys = {"enable_tarfs": True, "mount_tarfs_on_host": True, "mount_mode": s["mount_mode"],
            **tarfs}
    lines = [f"{k} = {_toml(v)}" for k, v in keys.items()]
    return (f'version = 1\n{extra}\n[daemon]\nfs_driver = "{s["fs_driver"]}"\n'
            "[experimental.tarfs]\n" + "\n".join(lines) + "\n")


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


def layer_labels(img: dict, i: int, ns: str = "default") -> dict[str, str]:
    built = img["built"]
    return {L.TARGET_SNAPSHOT_REF: f"{ns}/{built.chain_ids[i]}",
            L.CRI_IMAGE_REF: img["ref"],
            L.CRI_LAYER_DIGEST: str(built.layers[i]["digest"]),
            L.CRI_MANIFEST_DIGEST: built.manifest_digest,
            L.CRI_IMAGE_LAYERS: ",".join(str(d["digest"]) for d in built.layers)}


def pull_oci(snap: Snapshotter, img: dict, ns: str = "default", *,
             expect_skip: bool = True) -> str:
    """containerd's unpacker for ``img``: Prepare each layer with the CRI's labels; a
    tarfs layer answers AlreadyExists (nothing to download). Returns the top chain name."""
    stub = snap.stub()
    parent = ""
    for i in range(len(img["built"].layers)):
        labels = layer_labels(img, i, ns)
        key = f"{ns}/{i}/extract-{i}"
        if expect_skip:
            with pytest.raises(grpc.RpcError) as err:
                stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels))
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
        else:
            stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels))
        parent = labels[L.TARGET_SNAPSHOT_REF]
    return parent


@contextmanager
def rootfs(snap: Snapshotter, parent: str, key: str, target: Path) -> Iterator[Path]:
    """Prepare container ``key`` over ``parent`` and mount what it answers on ``target``."""
    resp = snap.stub().Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent), timeout=120)
    target.mkdir(parents=True, exist_ok=True)
    mount_all([MountSpec(m.type, m.source, tuple(m.options)) for m in resp.mounts], str(target))
    try:
        yield target
    finally:
        unmount_all(str(target))


def check_rootfs(root: Path) -> None:
    """The layered image's check script, run in ``root`` (chroot, busybox), prints what a
    correct rootfs prints (containerd's overlayfs is the reference, tests/e2e)."""
    r = subprocess.run(["chroot", str(root), "/bin/sh", "-c", images.CHECK_SCRIPT],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.stdout.strip().splitlines() == images.expected_check_output().splitlines(), \
        r.stdout + r.stderr


def erofs_mounts(snap: Snapshotter) -> list[str]:
    """Mountpoints of EROFS filesystems below the snapshotter's root."""
    root = os.path.realpath(snap.root) + "/"
    return sorted(e.mountpoint for e in read_mountinfo()
                  if e.fstype == "erofs" and e.mountpoint.startswith(root))


def loop_devices() -> dict[str, str]:
    """Attached loop devices: name -> backing file."""
    out = {}
    for name in os.listdir("/sys/block"):
        p = Path("/sys/block", name, "loop", "backing_file")
        if name.startswith("loop") and p.exists():
            out[name] = p.read_text().strip()
    return out


def loops_under(path: Path) -> list[str]:
    base = os.path.realpath(path)
    return sorted(n for n, f in loop_devices().items() if f.startswith(base))


def labels_of(snap: Snapshotter, key: str) -> dict[str, str]:
    return dict(snap.stub().Stat(pb.StatSnapshotRequest(key=key)).info.labels)
