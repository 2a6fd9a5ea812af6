"""tarfs across snapshotter restarts (docs/tarfs.md, "Restart").

Contract: state is on disk. A layer is converted when its bootstrap exists; a restart
converts again the layers that had not finished (a kill -9 mid-download leaves no temp
tar and no partial bootstrap behind it); EROFS mounts made before a restart are adopted,
not made twice, and Remove and Cleanup after the restart unmount and free them as
before: no mount, no loop device, no tar left.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pynydus.api import snapshots_pb2 as pb
from tests.harness.snapshotter import Snapshotter

from .support import check_rootfs, erofs_mounts, loops_under, pull_oci, rootfs

pytestmark = [pytest.mark.root]


def _remove_all(snap: Snapshotter, img: dict, containers: list[str]) -> None:
    stub = snap.stub()
    for key in containers:
        stub.Remove(pb.RemoveSnapshotRequest(key=key))
    for chain in reversed(img["built"].chain_ids):
        stub.Remove(pb.RemoveSnapshotRequest(key=f"default/{chain}"))
    stub.Cleanup(pb.CleanupRequest())


def test_killed_during_conversion_converts_again_after_restart(
        tarfs_snap: Snapshotter, oci_image: dict, tmp_path: Path) -> None:
    top = pull_oci(tarfs_snap, oci_image)  # conversions start in the background
    tarfs_snap.kill9()
    tarfs_snap.start()
    with rootfs(tarfs_snap, top, "default/c1", tmp_path / "r") as root:
        check_rootfs(root)
    cache = tarfs_snap.root / "cache"
    assert not [n for n in os.listdir(cache) if n.startswith(".tarfs-")]
    assert not list((tarfs_snap.root / "snapshots").glob("*/fs/image/*.building"))
    _remove_all(tarfs_snap, oci_image, ["default/c1"])
    assert erofs_mounts(tarfs_snap) == []
    assert loops_under(tarfs_snap.root) == []
    assert os.listdir(cache) == []


def test_mounts_are_adopted_after_a_restart_and_freed_by_remove(
        tarfs_snap: Snapshotter, oci_image: dict, tmp_path: Path) -> None:
    top = pull_oci(tarfs_snap, oci_image)
    with rootfs(tarfs_snap, top, "default/c1", tmp_path / "r1") as r1:
        before = erofs_mounts(tarfs_snap)
        loops = loops_under(tarfs_snap.root)
        tarfs_snap.restart()
        assert erofs_mounts(tarfs_snap) == before  # adopted, not mounted again
        assert loops_under(tarfs_snap.root) == loops
        check_rootfs(r1)  # the running container still reads its image
        with rootfs(tarfs_snap, top, "default/c2", tmp_path / "r2") as r2:
            assert erofs_mounts(tarfs_snap) == before
            check_rootfs(r2)
    _remove_all(tarfs_snap, oci_image, ["default/c1", "default/c2"])
    assert erofs_mounts(tarfs_snap) == []
    assert loops_under(tarfs_snap.root) == []
    assert os.listdir(tarfs_snap.root / "snapshots") == []
    assert os.listdir(tarfs_snap.root / "cache") == []
