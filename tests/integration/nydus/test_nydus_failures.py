"""Failures on the Nydus path leave nothing behind: the key can be retried.

A RAFS mount that fails in the daemon (a bootstrap the daemon refuses) during a
container's Prepare or a View removes the snapshot again (docs/decisions.md, "a failed
remote mount in Prepare/View"); a Prepare whose skip-path Commit fails returns that error
instead of AlreadyExists (which containerd reads as "the layer is there").
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from pynydus import labels as L
from pynydus.api import snapshots_pb2 as pb
from tests.harness.snapshotter import Snapshotter

from .support import exists, pull_nydus_image

pytestmark = [pytest.mark.root]


def damaged_bootstrap(image: dict) -> bytes:
    """The image's superblock (magic and all) and nothing of its inodes: it passes the
    snapshotter's completeness check (v6 magic, block-aligned size), so only the daemon,
    parsing it, can refuse it."""
    data = Path(image["boot"]).read_bytes()
    assert len(data) > 8192, "the test image's bootstrap should have more than a superblock"
    return data[:4096] + b"\xa5" * 4096


def snapshot_dirs(snap: Snapshotter) -> set[str]:
    return set(os.listdir(snap.root / "snapshots"))


def test_daemon_side_mount_failure_in_prepare_removes_the_snapshot(snap: Snapshotter,
                                                                   image: dict) -> None:
    top = pull_nydus_image(snap, image, boot=damaged_bootstrap(image))
    before = snapshot_dirs(snap)
    stub = snap.stub()
    for attempt in range(2):  # the second attempt is not AlreadyExists: the key was freed
        with pytest.raises(grpc.RpcError) as err:
            stub.Prepare(pb.PrepareSnapshotRequest(key="default/3/c1", parent=top))
        assert err.value.code() != grpc.StatusCode.ALREADY_EXISTS, (attempt, err.value.details())
        # the daemon refused it (dedicated: its start; shared: the API mount)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "daemon" in err.value.details(), err.value.details()
        assert not exists(snap, "default/3/c1")
        assert snapshot_dirs(snap) == before
    assert snap.image_daemon_pids() == []  # no daemon is left serving the refused image


def test_failed_remote_mount_in_view_removes_the_view(snap: Snapshotter, image: dict) -> None:
    top = pull_nydus_image(snap, image, boot=damaged_bootstrap(image))
    before = snapshot_dirs(snap)
    stub = snap.stub()
    for attempt in range(2):
        with pytest.raises(grpc.RpcError) as err:
            stub.View(pb.ViewSnapshotRequest(key="default/v1", parent=top))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (attempt, err.value)
        assert not exists(snap, "default/v1")
        assert snapshot_dirs(snap) == before
    # the image itself is still there, and a good image next to it still mounts
    assert exists(snap, top)
    good = pull_nydus_image(snap, image, ns="good")
    (m,) = stub.View(pb.ViewSnapshotRequest(key="good/v1", parent=good)).mounts
    assert any(o.startswith("lowerdir=") and "/mnt" in o for o in m.options), m


def test_prepare_whose_skip_commit_fails_returns_the_error(snap: Snapshotter, image: dict) -> None:
    """A data layer whose target name is unusable: the skip path's Commit fails, and that
    failure (not AlreadyExists, not a success without mounts) is what containerd gets."""
    stub = snap.stub()
    cri = {L.CRI_IMAGE_REF: image["ref"], L.CRI_LAYER_DIGEST: "sha256:" + image["blob_ids"][0],
           L.NYDUS_BLOB: "true"}
    with pytest.raises(grpc.RpcError) as err:
        stub.Prepare(pb.PrepareSnapshotRequest(key="default/1/extract", labels={
            L.TARGET_SNAPSHOT_REF: "", **cri}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "name" in err.value.details()
    # the key is free again: containerd's retry gets the skip it asked for
    assert not exists(snap, "default/1/extract")
    with pytest.raises(grpc.RpcError) as err:
        stub.Prepare(pb.PrepareSnapshotRequest(key="default/1/extract", labels={
            L.TARGET_SNAPSHOT_REF: "default/sha256:blobchain", **cri}))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = stub.Stat(pb.StatSnapshotRequest(key="default/sha256:blobchain")).info
    assert info.kind == pb.COMMITTED
