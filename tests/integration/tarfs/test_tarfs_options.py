"""The ``[experimental.tarfs]`` keys, each shown by what the snapshotter does with it.

- ``enable_tarfs``: on, a pulled OCI layer is skipped and served through EROFS; off (the
  default), containerd unpacks it into the layer directory as usual.
- ``mount_tarfs_on_host = false`` (upstream's default: the image goes to a Kata guest as
  block volumes) is refused at start-up: pynydus has no Kata volumes.
- ``fs_driver = "blockdev"`` without ``enable_tarfs`` stops start-up; with it there are no
  daemons at all.
- ``tarfs_hint``: only images whose manifest carries ``containerd.io/snapshot/tarfs-hint``
  go tarfs; the others are unpacked by containerd.
- ``max_concurrent_proc``: at most that many layers of one image convert at once.
- ``mount_mode``: ``layer`` mounts each layer on its own, ``image`` one merged bootstrap.
- ``warm_metadata`` (on by default, with ``layer``): each layer is mounted once converted and
  its whole tree looked up once, before any container; off, it is mounted at the first
  container.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import grpc
import pytest

from pynydus import labels as L
from pynydus.api import snapshots_pb2 as pb
from tests.harness import images
from tests.harness.oci import push
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import HarnessError

from .support import check_rootfs, erofs_mounts, layer_labels, pull_oci, rootfs

pytestmark = [pytest.mark.root]


def test_enable_tarfs_decides_who_unpacks_oci_layers(
        start_tarfs: Callable[..., Snapshotter], oci_image: dict, tmp_path: Path) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text("version = 1\n[experimental.tarfs]\nenable_tarfs = false\n")
    with Snapshotter(config=plain) as snap:
        resp = snap.stub().Prepare(pb.PrepareSnapshotRequest(
            key="default/0/extract", labels=layer_labels(oci_image, 0)))
        assert resp.mounts[0].type == "bind"  # containerd unpacks into it
    snap = start_tarfs("blockdev-file")  # enable_tarfs = true
    with pytest.raises(grpc.RpcError) as err:
        snap.stub().Prepare(pb.PrepareSnapshotRequest(key="default/0/extract",
                                                      labels=layer_labels(oci_image, 0)))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert snap.daemon_pids() == []  # blockdev: no daemon at all


@pytest.mark.parametrize("text, key", [
    ("[experimental.tarfs]\nenable_tarfs = true\nmount_tarfs_on_host = false\n",
     "experimental.tarfs.mount_tarfs_on_host"),
    ('[daemon]\nfs_driver = "blockdev"\n', "daemon.fs_driver"),
])
def test_mount_tarfs_on_host_false_and_blockdev_without_tarfs_stop_start_up(
        text: str, key: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("version = 1\n" + text)
    snap = Snapshotter(config=config, ready_timeout=30)
    try:
        with pytest.raises(HarnessError, match="snapshotter exited"):
            snap.start()
        assert snap.proc is not None and snap.proc.returncode() not in (None, 0)
        log = snap.log.read_text(errors="replace")
        assert key in log, log[-2000:]
        assert not snap.socket.exists()
    finally:
        snap.close()


def _hinted(tmp_path: Path, reg: object, hint: bool) -> dict:
    img = images.small_image("hinted" if hint else "plain")
    if hint:
        img.annotations = {L.TARFS_HINT: "true"}
    built = img.write_layout(tmp_path / ("hint" if hint else "nohint"))
    ref = reg.ref("test/hint" if hint else "test/nohint")  # type: ignore[attr-defined]
    push(built, ref)
    return {"ref": ref, "built": built}


def test_tarfs_hint_only_takes_images_with_the_annotation(
        start_tarfs: Callable[..., Snapshotter], oci_image: dict, tmp_path: Path) -> None:
    snap = start_tarfs("blockdev-file", tarfs_hint=True)
    reg = oci_image["registry"]
    hinted, plain = _hinted(tmp_path, reg, True), _hinted(tmp_path, reg, False)
    top = pull_oci(snap, hinted, "hinted")  # skipped: tarfs
    with rootfs(snap, top, "hinted/c", tmp_path / "r") as root:
        assert (root / "app/data.txt").read_text() == "data\n"
    resp = snap.stub().Prepare(pb.PrepareSnapshotRequest(
        key="plain/0/extract", labels=layer_labels(plain, 0, "plain")))
    assert resp.mounts[0].type == "bind"  # no hint: containerd unpacks it


def _conversion_spans(log: str) -> list[tuple[datetime, datetime]]:
    fmt = "%Y-%m-%d %H:%M:%S,%f"
    starts: dict[str, datetime] = {}
    spans = []
    for line in log.splitlines():
        m = re.match(r"(\S+ \S+) \w+ \S+: tarfs: (converting layer|layer) (\d+) ", line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), fmt)
        if m.group(2) == "converting layer":
            starts[m.group(3)] = when
        elif "converted" in line:
            spans.append((starts.pop(m.group(3)), when))
    return sorted(spans)


def test_max_concurrent_proc_bounds_conversions_of_an_image(
        start_tarfs: Callable[..., Snapshotter], oci_image: dict, tmp_path: Path) -> None:
    snap = start_tarfs("blockdev-file", max_concurrent_proc=1)
    top = pull_oci(snap, oci_image)
    with rootfs(snap, top, "default/c", tmp_path / "r") as root:
        check_rootfs(root)
    spans = _conversion_spans(snap.log.read_text(errors="replace"))
    assert len(spans) == len(oci_image["built"].layers), spans
    for (_, end), (start, _) in pairwise(spans):
        assert start >= end, f"conversions overlap: {spans}"


@pytest.mark.parametrize("mount_mode, mounts", [("layer", 4), ("image", 1)])
def test_mount_mode_mounts_per_layer_or_per_image(
        start_tarfs: Callable[..., Snapshotter], oci_image: dict, tmp_path: Path,
        mount_mode: str, mounts: int) -> None:
    snap = start_tarfs("blockdev-file", mount_mode=mount_mode)
    top = pull_oci(snap, oci_image)
    with rootfs(snap, top, "default/c", tmp_path / "r") as root:
        check_rootfs(root)
        assert len(erofs_mounts(snap)) == mounts


_WARMED = re.compile(r"tarfs: layer (\d+) mounted, metadata of (\d+) entries cached")
_CONVERTED = re.compile(r"tarfs: layer (\d+) \((\S+)\) converted")


def _found(snap: Snapshotter, pattern: re.Pattern[str], n: int, wait: float) -> dict[str, str]:
    """{snapshot id: first group} of ``pattern``'s log lines, once ``n`` are there or
    ``wait`` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        found = dict(pattern.findall(snap.log.read_text(errors="replace")))
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.parametrize("warm", [True, False])
def test_warm_metadata_mounts_each_converted_layer_and_looks_its_tree_up(
        start_tarfs: Callable[..., Snapshotter], oci_image: dict, tmp_path: Path,
        warm: bool) -> None:
    """What an unpack leaves overlayfs (the layer's inodes in the kernel's caches), a
    layer gets after its conversion, before any container (docs/decisions.md, tarfs)."""
    snap = start_tarfs("blockdev-file", warm_metadata=warm)
    top = pull_oci(snap, oci_image)
    layers = len(oci_image["built"].layers)
    if warm:
        warmed = _found(snap, _WARMED, layers, 60)
        assert len(warmed) == layers, snap.log.read_text(errors="replace")[-3000:]
        mnts = {sid: snap.root / "snapshots" / sid / "mnt" for sid in warmed}
        assert erofs_mounts(snap) == sorted(str(m) for m in mnts.values())
        for sid, n in warmed.items():
            assert int(n) == sum(len(ds) + len(fs) for _, ds, fs in os.walk(mnts[sid])) > 0
    else:
        assert len(_found(snap, _CONVERTED, layers, 60)) == layers
        assert _found(snap, _WARMED, 1, 2) == {}
        assert erofs_mounts(snap) == []
    with rootfs(snap, top, "default/c", tmp_path / "r") as root:
        check_rootfs(root)
        assert len(erofs_mounts(snap)) == layers
