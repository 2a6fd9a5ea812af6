"""Snapshotter directory lifecycle: temp dirs, sync_remove, Cleanup of orphans."""

import os
from pathlib import Path

import pytest

from pynydus import labels as L
from pynydus.errors import (
    AlreadyExists,
    FailedPrecondition,
    HostCheckError,
    InvalidArgument,
    NotFound,
)
from pynydus.snapshot.snapshotter import Snapshotter, SnapshotterOptions


@pytest.fixture
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("sn", numbered=True))


def dirs(sn: Snapshotter) -> set[str]:
    return set(os.listdir(sn.snapshots_dir))


def test_failed_prepare_leaves_no_directory(root: Path) -> None:
    sn = Snapshotter(root)
    sn.prepare("a")
    before = dirs(sn)
    with pytest.raises(AlreadyExists):
        sn.prepare("a")
    with pytest.raises(NotFound):
        sn.prepare("b", "missing")
    with pytest.raises(InvalidArgument):
        sn.prepare("c", "", {"k": "v" * 5000})
    assert dirs(sn) == before


def test_active_has_fs_and_work_view_only_fs(root: Path) -> None:
    sn = Snapshotter(root)
    sn.prepare("a")
    sn.commit("A", "a")
    sn.view("v", "A")
    sid_a = sn.ms.get_snapshot("A").id
    sid_v = sn.ms.get_snapshot("v").id
    assert sorted(os.listdir(sn.snapshots_dir / sid_a)) == ["fs", "work"]
    assert sorted(os.listdir(sn.snapshots_dir / sid_v)) == ["fs"]
    assert (os.stat(sn.snapshots_dir / sid_a / "fs").st_mode & 0o7777) == 0o755


def test_remove_defers_to_cleanup_unless_sync_remove(root: Path) -> None:
    sn = Snapshotter(root)
    sn.prepare("a")
    sid = sn.ms.get_snapshot("a").id
    sn.remove("a")
    assert sid in dirs(sn)
    assert sn.cleanup() == [sid]
    assert dirs(sn) == set()
    assert sn.cleanup() == []  # idempotent
    sn.close()

    sn = Snapshotter(root, SnapshotterOptions(sync_remove=True))
    sn.prepare("b")
    sid = sn.ms.get_snapshot("b").id
    sn.remove("b")
    assert sid not in dirs(sn)


def test_cleanup_removes_crash_leftovers(root: Path) -> None:
    sn = Snapshotter(root)
    sn.prepare("keep")
    (sn.snapshots_dir / "new-123abc" / "fs").mkdir(parents=True)
    (sn.snapshots_dir / "999").mkdir()
    assert sorted(sn.cleanup()) == ["999", "new-123abc"]
    assert dirs(sn) == {sn.ms.get_snapshot("keep").id}


def test_mounts_of_committed_is_failed_precondition(root: Path) -> None:
    sn = Snapshotter(root)
    sn.prepare("a")
    sn.commit("A", "a")
    with pytest.raises(FailedPrecondition):
        sn.mounts("A")


def test_volatile_label_and_option(root: Path) -> None:
    sn = Snapshotter(root)
    sn.prepare("a")
    sn.commit("A", "a")
    (m,) = sn.prepare("b", "A", {L.OVERLAY_VOLATILE: ""})
    assert "volatile" in m.options
    (m,) = sn.prepare("c", "A")
    assert "volatile" not in m.options
    sn.close()
    sn = Snapshotter(root, SnapshotterOptions(volatile=True))
    (m,) = sn.mounts("c")
    assert "volatile" in m.options


def test_usage_active_live_committed_recorded(root: Path) -> None:
    sn = Snapshotter(root)
    sn.prepare("a")
    fs = Path(sn.upper_path(sn.ms.get_snapshot("a").id))
    (fs / "f").write_bytes(b"x" * 10000)
    live = sn.usage("a")
    assert live.inodes == 2 and live.size >= 10000
    sn.commit("A", "a")
    (fs / "g").write_bytes(b"y" * 10000)  # after commit: not counted any more
    assert sn.usage("A") == live


def test_root_path_too_long(tmp_path: Path) -> None:
    with pytest.raises(HostCheckError, match="at most 70"):
        Snapshotter(tmp_path / ("x" * 80))
