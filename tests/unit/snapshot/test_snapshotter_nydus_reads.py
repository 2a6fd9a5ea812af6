"""Prepare, View and Mounts over a Nydus image: one decision of which ancestor is the
bootstrap, from the labels the metastore reads with the chain (no read of its own).

The filesystem is a fake (the real one starts daemons; ``tests/integration/nydus`` drives
it): it records what it is asked to mount, with which labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pynydus import labels as L
from pynydus.errors import AlreadyExists
from pynydus.snapshot.snapshotter import Snapshotter, SnapshotterOptions


class FakeFilesystem:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: list[tuple[str, dict[str, str]]] = []

    def prefetch_hint(self, labels: Mapping[str, str]) -> None:
        pass  # no prefetch lists here

    def mount(self, sid: str, labels: Mapping[str, str]) -> str:
        self.mounted.append((sid, dict(labels)))
        return self.mountpoint(sid)

    def wait_until_ready(self, sid: str) -> None:
        pass

    def mountpoint(self, sid: str) -> str:
        return f"{self.root}/snapshots/{sid}/mnt"

    def has_instance(self, sid: str) -> bool:
        return False

    def close(self, teardown: bool = False) -> None:
        pass


class Reads:
    """Counts the metastore's label reads."""

    def __init__(self, sn: Snapshotter, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in ("labels_by_ids", "labels_by_id", "get_info"):
            real = getattr(sn.ms, name)

            def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
                self.calls.append(_name)
                return _real(*args)

            monkeypatch.setattr(sn.ms, name, spy)


@pytest.fixture
def sn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snapshotter]:
    root = Path(tmp_path_factory.mktemp("sn", numbered=True))
    fs = FakeFilesystem(root)
    s = Snapshotter(root, SnapshotterOptions(mount_on_commit=False), fs)  # type: ignore[arg-type]
    yield s
    s.close()


BOOT = {L.NYDUS_BOOTSTRAP: "true", L.CRI_IMAGE_REF: "r/i:1"}


def _pull(sn: Snapshotter) -> None:
    """A Nydus image as containerd's unpacker leaves it: blob layer, bootstrap layer."""
    with pytest.raises(AlreadyExists):
        sn.prepare("x1", "", {L.TARGET_SNAPSHOT_REF: "blob", L.NYDUS_BLOB: "true"})
    sn.prepare("x2", "blob", {L.TARGET_SNAPSHOT_REF: "boot", **BOOT})
    sn.commit("boot", "x2", BOOT)


def test_prepare_takes_the_chains_labels_with_the_chain_and_mounts_with_them(
        sn: Snapshotter, monkeypatch: pytest.MonkeyPatch) -> None:
    _pull(sn)
    reads = Reads(sn, monkeypatch)
    mounts = sn.prepare("c1", "boot")
    assert reads.calls == []
    fs: FakeFilesystem = sn.fs  # type: ignore[assignment]
    boot_id = sn.ms.get_snapshot("boot").id
    assert fs.mounted == [(boot_id, BOOT)]
    assert f"lowerdir={fs.mountpoint(boot_id)}" in mounts[0].options


def test_view_and_mounts_decide_the_same_bootstrap_from_the_chains_labels(
        sn: Snapshotter, monkeypatch: pytest.MonkeyPatch) -> None:
    _pull(sn)
    sn.prepare("c1", "boot")
    sn.commit("layer-above", "c1")  # a build's layer on the image: still the same bootstrap
    reads = Reads(sn, monkeypatch)
    sn.view("v1", "layer-above")
    assert reads.calls == []
    sn.mounts("v1")
    assert reads.calls == []
    fs: FakeFilesystem = sn.fs  # type: ignore[assignment]
    boot_id = sn.ms.get_snapshot("boot").id
    assert [sid for sid, _ in fs.mounted] == [boot_id] * 3
    assert all(labels == BOOT for _, labels in fs.mounted)
