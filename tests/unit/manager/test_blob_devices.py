"""``blob_devices``: which bootstraps ``fs_driver = "blobfile"`` can mount as EROFS over blob
files, and the device order it gives (the bootstrap's blob table, which the EROFS device
table follows); the others are refused naming the snapshot and the driver."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from pynydus.errors import FailedPrecondition
from pynydus.manager.filesystem import blob_devices
from pynydus.rafs.builder import build
from pynydus.rafs.merge import merge

# a RAFS v5 bootstrap (our builder writes v6 only)
V5_BOOTSTRAP = Path(__file__).resolve().parents[3] / "fuzz/corpus/rafs_v5/synthetic-v5"


def _tree(root: Path, name: str) -> Path:
    (root / name / "d").mkdir(parents=True)
    (root / name / "d" / "f").write_bytes(name.encode() * 5000)
    return root / name


def test_the_blob_ids_in_the_order_of_the_bootstraps_device_table(tmp_path: Path) -> None:
    a = build(str(_tree(tmp_path, "a")), str(tmp_path / "a.boot"), str(tmp_path / "blobs"))
    b = build(str(_tree(tmp_path, "b")), str(tmp_path / "b.boot"), str(tmp_path / "blobs"))
    merge([str(tmp_path / "a.boot"), str(tmp_path / "b.boot")], str(tmp_path / "m.boot"))
    assert blob_devices(str(tmp_path / "a.boot"), "s1") == a.blob_ids
    assert blob_devices(str(tmp_path / "m.boot"), "s1") == a.blob_ids + b.blob_ids


def test_rafs_v5_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match='snapshot "s1": fs_driver blobfile needs a '
                                                 "RAFS v6 image"):
        blob_devices(str(V5_BOOTSTRAP), "s1")


def test_zran_blobs_are_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("f")
        data = b"zran " * 20000
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(gzip.compress(buf.getvalue()))
    build(str(layer), str(tmp_path / "z.boot"), str(tmp_path / "blobs"), type="targz-ref")
    with pytest.raises(FailedPrecondition, match="cannot serve ZRAN or batch blobs"):
        blob_devices(str(tmp_path / "z.boot"), "s1")
