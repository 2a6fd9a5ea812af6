"""A plain OCI image pulled through the snapshotter with tarfs on, served by the kernel.

Contract (docs/tarfs.md, upstream's docs/tarfs.md): every layer's Prepare answers
AlreadyExists at once (containerd downloads and unpacks nothing) and carries
``nydus-tarfs=<layer digest hex>``; the layer converts in the background (tar in the
cache, bootstrap in the layer); a container over the image gets an overlay whose lower
layers are EROFS mounts of those tars, and sees exactly the rootfs containerd's
overlayfs would give it. Remove and Cleanup unmount and delete it all, and no loop
device outlives its mount.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from pynydus import labels as L
from pynydus.api import snapshots_pb2 as pb
from pynydus.host import erofs
from pynydus.host.mountinfo import read_mountinfo
from pynydus.tarfs.manager import FILE_READ_AHEAD_KB
from tests.harness.snapshotter import Snapshotter

from .support import check_rootfs, erofs_mounts, labels_of, loops_under, pull_oci, rootfs

pytestmark = [pytest.mark.root]


def test_pulled_layers_are_skipped_and_the_rootfs_is_the_image(
        tarfs_snap: Snapshotter, oci_image: dict, tmp_path: Path) -> None:
    reg = oci_image["registry"]
    before = reg.blob_gets()
    top = pull_oci(tarfs_snap, oci_image)
    built = oci_image["built"]
    for i, chain in enumerate(built.chain_ids):
        labels = labels_of(tarfs_snap, f"default/{chain}")
        assert labels[L.NYDUS_TARFS] == str(built.layers[i]["digest"]).split(":", 1)[1]
    with rootfs(tarfs_snap, top, "default/c1", tmp_path / "rootfs") as root:
        check_rootfs(root)
        mounts = erofs_mounts(tarfs_snap)
        assert mounts, "no EROFS mount serves the image"
        if (tarfs_snap.env or {}).get("PYNYDUS_TARFS_BACKING") == "file":
            # direct I/O from the tar, a wide read-ahead window (docs/decisions.md, tarfs)
            for m in mounts:
                opts = next(e.options for e in read_mountinfo() if e.mountpoint == m)
                assert "directio" in opts.split(","), opts
                bdi = erofs.mount_bdi(m)
                assert bdi is not None
                assert int(Path(bdi, "read_ahead_kb").read_text()) == FILE_READ_AHEAD_KB
    # each layer blob fetched once (plus the config), nothing by containerd
    assert reg.blob_gets() - before == len(built.layers) + 1


def test_second_container_shares_the_mounts(tarfs_snap: Snapshotter, oci_image: dict,
                                            tmp_path: Path) -> None:
    top = pull_oci(tarfs_snap, oci_image)
    with rootfs(tarfs_snap, top, "default/c1", tmp_path / "r1"):
        first = erofs_mounts(tarfs_snap)
        with rootfs(tarfs_snap, top, "default/c2", tmp_path / "r2") as r2:
            assert erofs_mounts(tarfs_snap) == first
            check_rootfs(r2)
    resp = tarfs_snap.stub().Mounts(pb.MountsRequest(key="default/c1"))
    assert any("/mnt" in o for m in resp.mounts for o in m.options)


def test_view_of_the_image(tarfs_snap: Snapshotter, oci_image: dict, tmp_path: Path) -> None:
    top = pull_oci(tarfs_snap, oci_image)
    resp = tarfs_snap.stub().View(pb.ViewSnapshotRequest(key="default/v1", parent=top))
    (m,) = resp.mounts
    if m.type == "bind":  # one lower (the merged image mount): a read-only bind of it
        assert m.source.endswith("/mnt") and "ro" in m.options
        assert os.path.isfile(os.path.join(m.source, "app/v3.txt"))
    else:
        assert m.type == "overlay" and all("upperdir" not in o for o in m.options)


def test_remove_and_cleanup_unmount_and_free_everything(
        start_tarfs: Callable[..., Snapshotter], oci_image: dict, tmp_path: Path) -> None:
    for setup in ("blockdev-file", "fusedev-image-loop"):
        snap = start_tarfs(setup)
        top = pull_oci(snap, oci_image)
        with rootfs(snap, top, "default/c1", tmp_path / setup):
            assert erofs_mounts(snap)
            if setup.endswith("loop"):
                assert loops_under(snap.root), "loop mode attached no loop device"
        stub = snap.stub()
        stub.Remove(pb.RemoveSnapshotRequest(key="default/c1"))
        for chain in reversed(oci_image["built"].chain_ids):
            stub.Remove(pb.RemoveSnapshotRequest(key=f"default/{chain}"))
        stub.Cleanup(pb.CleanupRequest())
        assert erofs_mounts(snap) == []
        assert loops_under(snap.root) == []
        assert os.listdir(snap.root / "snapshots") == []
        assert [n for n in os.listdir(snap.root / "cache")] == []


def test_usage_counts_the_tar(tarfs_snap: Snapshotter, oci_image: dict, tmp_path: Path) -> None:
    top = pull_oci(tarfs_snap, oci_image)
    with rootfs(tarfs_snap, top, "default/c1", tmp_path / "r"):
        pass  # the layers are converted now
    built = oci_image["built"]
    for chain, desc in zip(built.chain_ids, built.layers, strict=True):
        usage = tarfs_snap.stub().Usage(pb.UsageRequest(key=f"default/{chain}"))
        tar = tarfs_snap.root / "cache" / str(desc["digest"]).split(":", 1)[1]
        assert usage.size >= tar.stat().st_size  # the tar, and the layer bootstrap
        assert usage.inodes >= 2


def test_plain_ctr_pull_without_labels_is_unpacked_by_containerd(
        tarfs_snap: Snapshotter) -> None:
    resp = tarfs_snap.stub().Prepare(pb.PrepareSnapshotRequest(
        key="default/1/extract", labels={L.TARGET_SNAPSHOT_REF: "default/sha256:x"}))
    (m,) = resp.mounts
    assert m.type == "bind"


def test_a_layer_that_is_not_a_tar_fails_the_container_not_the_pull(
        tarfs_snap: Snapshotter, oci_image: dict) -> None:
    stub = tarfs_snap.stub()
    labels = {L.TARGET_SNAPSHOT_REF: "default/sha256:bad", L.CRI_IMAGE_REF: oci_image["ref"],
              L.CRI_LAYER_DIGEST: oci_image["built"].config_digest}
    with pytest.raises(grpc.RpcError) as err:
        stub.Prepare(pb.PrepareSnapshotRequest(key="default/1/x", labels=labels))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        stub.Prepare(pb.PrepareSnapshotRequest(key="default/c", parent="default/sha256:bad"),
                     timeout=60)
    assert err.value.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND), \
        err.value.details()
    assert "tarfs layer" in err.value.details()
