"""Cleanup hands the instances of all removed snapshots to the filesystem at once
(``umount_many``: their records go in one transaction, no daemon's exit is waited for),
not one after another: each stop waited for a process to exit (about 0.5 s), and removing
100 images took 48 s. An instance that cannot be unmounted does not keep the snapshot
directories from being removed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from pynydus.snapshot.snapshotter import Snapshotter, SnapshotterOptions


class Instances:
    """A filesystem whose every snapshot has an instance."""

    def __init__(self, root: Path, fail: bool = False) -> None:
        self.root = root
        self.fail = fail
        self.calls: list[list[str]] = []

    def prefetch_hint(self, labels: Mapping[str, str]) -> None:
        pass  # no prefetch lists here

    def mount(self, sid: str, labels: Mapping[str, str]) -> str:
        raise AssertionError("nothing is mounted here")

    def has_instance(self, sid: str) -> bool:
        return not any(sid in c for c in self.calls)

    def umount(self, sid: str) -> None:
        raise AssertionError("Cleanup unmounts through umount_many")

    def umount_many(self, sids: list[str]) -> None:
        self.calls.append(list(sids))
        if self.fail:
            raise RuntimeError("an instance that cannot be unmounted")

    def gc_cache(self, keep: set[str]) -> list[str]:
        return []

    def close(self, teardown: bool = False) -> None:
        pass


@pytest.mark.parametrize("fail", [False, True])
def test_cleanup_unmounts_the_instances_of_removed_snapshots_at_once(tmp_path: Path,
                                                                     fail: bool) -> None:
    fs = Instances(tmp_path, fail)
    sn = Snapshotter(tmp_path, SnapshotterOptions(), fs)  # type: ignore[arg-type]
    try:
        for i in range(10):
            sn.prepare(f"k{i}", "", {})
            sn.commit(f"c{i}", f"k{i}", {})
        for i in range(10):
            sn.remove(f"c{i}")
        removed = sn.cleanup()
    finally:
        sn.close()
    assert len(removed) == 10
    (call,) = fs.calls
    assert sorted(call) == sorted(removed)
    assert list((tmp_path / "snapshots").iterdir()) == []
