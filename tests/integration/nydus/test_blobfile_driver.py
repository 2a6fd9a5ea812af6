"""``fs_driver = "blobfile"``: the same Nydus images, served as kernel EROFS over pynydusd's
blob files (``pynydusd --blob-files``), through the snapshotter as containerd drives it.

Contract: the container's lower dir is an EROFS mount of the image's bootstrap whose
devices are the daemon's blob files; data is still fetched lazily; a killed daemon is
restarted and new containers read again; a restarted snapshotter keeps daemon, mount and
container; Remove + Cleanup leave no mount, daemon or cache behind. The fusedev tests of
``test_snapshotter_nydus.py`` below run again here, on this module's ``snap`` (both
daemon modes with this driver); the tests after them are this driver's own.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pynydus.api import snapshots_pb2 as pb
from pynydus.host.mount import unmount_all
from pynydus.host.mountinfo import read_mountinfo
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter

from .support import container_rootfs, pull_nydus_image, snapshotter_in_mode
from .test_snapshotter_nydus import (  # noqa: F401 - collected here, on this module's snap
    test_killed_daemon_is_restarted,
    test_lazy_image_through_snapshotter,
    test_remove_image_stops_daemon_and_cleanup_drops_cache,
    test_removed_images_leave_no_daemon_files,
    test_snapshotter_restart_keeps_daemon_and_container,
)

pytestmark = [pytest.mark.root]

V5_BOOTSTRAP = Path(__file__).resolve().parents[3] / "fuzz/corpus/rafs_v5/synthetic-v5"


@pytest.fixture(params=["dedicated", "shared"])
def snap(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Snapshotter]:
    """A started snapshotter with fs_driver blobfile, in daemon mode dedicated and shared."""
    yield from snapshotter_in_mode(tmp_path, request.param, driver="blobfile")


def _fstype(path: Path) -> str:
    (m,) = [m for m in read_mountinfo() if m.mountpoint == str(path)]
    return m.fstype


def test_image_is_kernel_erofs_over_the_daemons_blob_files(snap: Snapshotter, image: dict,
                                                           tmp_path: Path) -> None:
    reg: Registry = image["registry"]
    top = pull_nydus_image(snap, image)
    rootfs = tmp_path / "rootfs"
    container_rootfs(snap, top, "default/3/c1", rootfs)
    try:
        (m,) = snap.stub().Mounts(pb.MountsRequest(key="default/3/c1")).mounts
        lower = next(o for o in m.options if o.startswith("lowerdir=")).split("=", 1)[1]
        assert _fstype(Path(lower.split(":")[-1])) == "erofs"
        # the daemon's FUSE mount lists the image's blobs as files, nothing else
        fuse = [Path(e.mountpoint) for e in read_mountinfo()
                if e.fstype.startswith("fuse") and e.mountpoint.startswith(str(snap.root))]
        listings = [sorted(os.listdir(p)) for p in fuse]
        assert sorted(image["blob_ids"]) in listings, listings
        # the walk is the kernel's: no blob range is fetched for it
        gets = reg.blob_gets()
        assert sorted(os.listdir(rootfs / "data")) == ["big.bin", "link", "small.txt"]
        assert reg.blob_gets() == gets
        big = (rootfs / "data/big.bin").read_bytes()
        assert hashlib.sha256(big).hexdigest() == image["big_sha"]
        assert reg.blob_gets() > gets
    finally:
        unmount_all(str(rootfs))


def test_v5_image_is_refused_clearly_and_leaves_no_daemon(snap: Snapshotter, image: dict) -> None:
    top = pull_nydus_image(snap, image, boot=V5_BOOTSTRAP.read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        snap.stub().Prepare(pb.PrepareSnapshotRequest(key="default/3/c1", parent=top))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fs_driver blobfile needs a RAFS v6 image" in (err.value.details() or "")
    assert snap.image_daemon_pids() == []
