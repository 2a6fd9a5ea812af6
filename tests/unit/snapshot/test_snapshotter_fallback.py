"""The OCI fallback's decisions in the snapshotter, with a filesystem that fails to mount
and the layer download replaced (the e2e tests, tests/e2e/test_oci_fallback_e2e.py, run
the real thing through containerd)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from pynydus import labels as L
from pynydus.errors import AlreadyExists, FailedPrecondition, PermissionDenied
from pynydus.snapshot import ocifill
from pynydus.snapshot.snapshotter import Snapshotter, SnapshotterOptions

OCI1, OCI2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
REF = {L.CRI_IMAGE_REF: "reg.example/app:zran"}


class FailingFilesystem:
    def __init__(self, root: Path, err: Exception) -> None:
        self.root, self.err = root, err
        self.mounts = 0

    def prefetch_hint(self, labels: Mapping[str, str]) -> None:
        pass  # no prefetch lists here

    def mount(self, sid: str, labels: Mapping[str, str]) -> str:
        self.mounts += 1
        raise self.err

    def wait_until_ready(self, sid: str) -> None:
        pass

    def mountpoint(self, sid: str) -> str:
        return f"{self.root}/mnt/{sid}"

    def has_instance(self, sid: str) -> bool:
        return False

    def close(self, teardown: bool = False) -> None:
        pass


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Layers "downloaded": each becomes a file named after its digest."""
    got: list[str] = []

    def fetch(ref: str, labels: Mapping[str, str], digest: str, path: str, creds: object) -> None:
        got.append(digest)
        Path(path).write_text(digest)

    def apply(blob: str, dest: str) -> int:
        (Path(dest) / Path(blob).read_text().replace(":", "-")).write_text("x")
        return 1

    monkeypatch.setattr(ocifill, "fetch_layer", fetch)
    monkeypatch.setattr(ocifill, "apply_layer", apply)
    return got


def _zran_image(sn: Snapshotter) -> None:
    for key, parent, digest in (("d1", "", OCI1), ("d2", "d1", OCI2)):
        with pytest.raises(AlreadyExists):
            sn.prepare(f"x-{key}", parent, {L.TARGET_SNAPSHOT_REF: key, L.NYDUS_BLOB: "true",
                                            L.NYDUS_REF: digest, **REF})
    boot = {L.NYDUS_BOOTSTRAP: "true", **REF}
    sn.prepare("x-boot", "d2", {L.TARGET_SNAPSHOT_REF: "boot", **boot})
    (Path(sn.upper_path(sn.ms.get_snapshot("x-boot").id)) / "image").mkdir()
    sn.commit("boot", "x-boot", boot)


def _snapshotter(tmp_path: Path, err: Exception, **opts: bool) -> Snapshotter:
    fs = FailingFilesystem(tmp_path, err)
    return Snapshotter(tmp_path / "root", SnapshotterOptions(mount_on_commit=False, **opts),
                       fs)  # type: ignore[arg-type]


@pytest.fixture
def made(tmp_path: Path) -> Iterator[list[Snapshotter]]:
    made: list[Snapshotter] = []
    yield made
    for sn in made:
        sn.close()


def test_unservable_zran_image_is_unpacked_from_its_oci_layers(
        tmp_path: Path, fetched: list[str], made: list[Snapshotter]) -> None:
    sn = _snapshotter(tmp_path, FailedPrecondition("no valid RAFS bootstrap at /x"))
    made.append(sn)
    _zran_image(sn)
    mounts = sn.prepare("c1", "boot")
    assert sorted(fetched) == [OCI1, OCI2]
    assert mounts[0].type == "overlay"  # native: the layers' directories
    boot = sn.ms.get_snapshot("boot").id
    assert not any(Path(sn.upper_path(boot)).iterdir())  # image.boot is gone
    labels = sn.stat("boot").labels
    assert L.NYDUS_BOOTSTRAP not in labels
    assert labels[L.NYDUS_FALLBACK].startswith("bootstrap: no valid RAFS bootstrap")
    assert sn.stat("d1").labels[L.NYDUS_FALLBACK] == labels[L.NYDUS_FALLBACK]
    # the next container stands on the unpacked layers: nothing fetched or mounted again
    sn.prepare("c2", "boot")
    assert sorted(fetched) == [OCI1, OCI2]
    assert sn.fs.mounts == 1  # type: ignore[union-attr]


def test_fallback_off_or_a_refused_signature_fails_the_prepare(
        tmp_path: Path, fetched: list[str], made: list[Snapshotter]) -> None:
    off = _snapshotter(tmp_path / "a", FailedPrecondition("no valid RAFS bootstrap"),
                       oci_fallback=False)
    made.append(off)
    _zran_image(off)
    with pytest.raises(FailedPrecondition, match="bootstrap"):
        off.prepare("c1", "boot")
    signed = _snapshotter(tmp_path / "b", PermissionDenied("nydus-signature does not verify"))
    made.append(signed)
    _zran_image(signed)
    with pytest.raises(PermissionDenied):
        signed.prepare("c1", "boot")
    assert fetched == []
    assert L.NYDUS_FALLBACK not in signed.stat("boot").labels


def test_a_converted_nydus_image_has_no_oci_layers_to_fall_back_to(
        tmp_path: Path, fetched: list[str], made: list[Snapshotter]) -> None:
    sn = _snapshotter(tmp_path, FailedPrecondition("no valid RAFS bootstrap"))
    made.append(sn)
    with pytest.raises(AlreadyExists):
        sn.prepare("x1", "", {L.TARGET_SNAPSHOT_REF: "blob", L.NYDUS_BLOB: "true", **REF})
    boot = {L.NYDUS_BOOTSTRAP: "true", **REF}
    sn.prepare("x2", "blob", {L.TARGET_SNAPSHOT_REF: "boot", **boot})
    sn.commit("boot", "x2", boot)
    with pytest.raises(FailedPrecondition, match="no valid RAFS bootstrap"):
        sn.prepare("c1", "boot")
    assert fetched == []


def test_a_full_cache_disk_names_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pynydus.errors import Unavailable
    from pynydus.snapshot import snapshotter as snapshotter_mod

    eio = Unavailable("reading the image of snapshot 7 failed (ranged reads of its blobs): "
                      "[Errno 5] Input/output error")
    assert snapshotter_mod._cause_kind(eio, str(tmp_path)) == "ranged-read"
    full = OSError(28, "No space left on device")
    wrapped = Unavailable("daemon failed")
    wrapped.__cause__ = full
    assert snapshotter_mod._cause_kind(wrapped) == "cache-full"

    class _Full:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(snapshotter_mod.os, "statvfs", lambda p: _Full())
    assert snapshotter_mod._cause_kind(eio, str(tmp_path)) == "cache-full"
    assert snapshotter_mod._cause_kind(eio, "") == "ranged-read"


def test_a_full_cache_disk_falls_back_before_any_mount(
        tmp_path: Path, fetched: list[str], made: list[Snapshotter],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pynydus.snapshot import snapshotter as snapshotter_mod

    sn = _snapshotter(tmp_path, FailedPrecondition("not reached"))
    made.append(sn)
    sn.fs.cache_dir = str(tmp_path)  # type: ignore[union-attr]
    _zran_image(sn)

    class _Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(snapshotter_mod.os, "statvfs", lambda p: _Full())
    sn.prepare("c1", "boot")
    assert sorted(fetched) == [OCI1, OCI2]
    assert sn.fs.mounts == 0  # type: ignore[union-attr]
    assert sn.stat("boot").labels[L.NYDUS_FALLBACK].startswith("cache-full: the cache disk")
