"""Cleanup and ``sync_remove`` never delete through a mountpoint.

A removed snapshot's directory with something still mounted inside it (a container
rootfs left mounted, a bind mount of someone's data) is kept and logged; the data
behind the mount survives; once it is unmounted the next Cleanup takes the directory.
The snapshotter runs in this process so its log records can be read directly.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.host.mountinfo import mountpoints_under
from pynydus.snapshot import filters
from pynydus.snapshot.snapshotter import Snapshotter, SnapshotterOptions
from tests.harness.util import make_workdir, remove_tree

from .support import unmount, unmount_below

pytestmark = pytest.mark.root


@pytest.fixture
def base() -> Iterator[Path]:
    d = make_workdir("cln")
    try:
        yield d
    finally:
        unmount_below(d)
        remove_tree(d)


def bind(src: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(src), str(target)], check=True)


def someones_data(base: Path) -> Path:
    """A directory outside the snapshotter's root that must never be deleted."""
    data = base / "precious"
    (data / "sub").mkdir(parents=True)
    (data / "sub/file").write_text("keep me\n")
    return data


def still_mounted_warnings(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "still mounted" in r.getMessage()
            and str(path) in r.getMessage()]


@pytest.mark.parametrize("depth", ["fs", "fs/deep/er"])
def test_cleanup_keeps_a_removed_snapshot_with_a_live_mount(base: Path, depth: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    sn = Snapshotter(base / "root")
    try:
        sn.prepare("a")
        sn.prepare("b")
        sid_a, sid_b = sn.ms.get_snapshot("a").id, sn.ms.get_snapshot("b").id
        snap_dir = sn.snapshots_dir / sid_a
        target = snap_dir / depth / "mnt"
        data = someones_data(base)
        bind(data, target)
        sn.remove("a")
        sn.remove("b")
        with caplog.at_level(logging.WARNING, logger="pynydus.snapshot.snapshotter"):
            removed = sn.cleanup()
        assert removed == [sid_b]  # the other orphan goes
        assert snap_dir.is_dir() and (target / "sub/file").read_text() == "keep me\n"
        assert (data / "sub/file").read_text() == "keep me\n"
        assert mountpoints_under(str(snap_dir)) == [str(target)]
        assert still_mounted_warnings(caplog, snap_dir), caplog.text
        assert sn.cleanup() == []  # still mounted: still kept
        unmount(target)
        assert sn.cleanup() == [sid_a]
        assert not snap_dir.exists()
        assert (data / "sub/file").read_text() == "keep me\n"
    finally:
        sn.close()


def test_sync_remove_keeps_a_directory_with_a_live_mount(base: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    sn = Snapshotter(base / "root", SnapshotterOptions(sync_remove=True))
    try:
        sn.prepare("a")
        sid = sn.ms.get_snapshot("a").id
        snap_dir = sn.snapshots_dir / sid
        data = someones_data(base)
        bind(data, snap_dir / "fs" / "mnt")
        with caplog.at_level(logging.WARNING, logger="pynydus.snapshot.snapshotter"):
            sn.remove("a")  # the record goes; the directory cannot
        assert "a" not in {i.name for i in sn.walk(filters.parse([]))}
        assert snap_dir.is_dir()
        assert (data / "sub/file").read_text() == "keep me\n"
        assert still_mounted_warnings(caplog, snap_dir), caplog.text
        unmount(snap_dir / "fs" / "mnt")
        assert sn.cleanup() == [sid]
        assert (data / "sub/file").read_text() == "keep me\n"
        assert os.listdir(sn.snapshots_dir) == []
    finally:
        sn.close()


def test_sync_remove_without_mounts_deletes_at_once(base: Path) -> None:
    """The contrast: the same remove with nothing mounted deletes the directory now."""
    sn = Snapshotter(base / "root", SnapshotterOptions(sync_remove=True))
    try:
        sn.prepare("a")
        sid = sn.ms.get_snapshot("a").id
        (sn.snapshots_dir / sid / "fs" / "mnt").mkdir()
        sn.remove("a")
        assert not (sn.snapshots_dir / sid).exists()
    finally:
        sn.close()

