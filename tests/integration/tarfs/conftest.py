"""Fixtures for tarfs: a plain OCI image in a real registry and snapshotters that serve it
with the kernel's EROFS (see ``support.py`` for the calls containerd makes).

``oci_image``  (session) the layered e2e image (busybox + three layers of overrides,
               whiteouts, opaque dirs, hardlinks) with gzip, zstd and uncompressed layers,
               pushed to a docker-registry: ``ref``, ``built`` (BuiltImage), ``registry``
``tarfs_snap`` a started snapshotter with tarfs, in each of two set-ups: fs_driver
               blockdev, per-layer mounts, file-backed EROFS; fs_driver fusedev beside
               tarfs, one merged mount per image, loop devices
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.oci import MT_LAYER_GZIP, MT_LAYER_TAR, MT_LAYER_ZSTD, push
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter

from .support import SETUPS, config_text


@pytest.fixture(scope="session")
def oci_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    img = images.layered_image()
    for layer, mt in zip(img.layers, (MT_LAYER_GZIP, MT_LAYER_ZSTD, MT_LAYER_TAR, MT_LAYER_GZIP),
                         strict=True):
        layer.media_type = mt
    built = img.write_layout(tmp_path_factory.mktemp("tarfs-oci") / "layout")
    with Registry() as reg:
        ref = reg.ref("test/tarfs-app")
        push(built, ref)
        yield {"ref": ref, "built": built, "registry": reg}


@pytest.fixture
def start_tarfs(tmp_path: Path) -> Iterator[Callable[..., Snapshotter]]:
    """``start_tarfs(setup, **tarfs_keys)``: a started snapshotter in one of ``SETUPS``."""
    started: list[Snapshotter] = []

    def start(setup: str = "blockdev-file", *, extra: str = "", **tarfs: object) -> Snapshotter:
        config = tmp_path / f"config{len(started)}.toml"
        config.write_text(config_text(setup, extra=extra, **tarfs))
        snap = Snapshotter(config=config, env={"PYNYDUS_TARFS_BACKING": SETUPS[setup]["backing"]})
        started.append(snap)
        snap.start()
        return snap

    try:
        yield start
    finally:
        for snap in started:
            snap.close()


@pytest.fixture(params=sorted(SETUPS))
def tarfs_snap(request: pytest.FixtureRequest,
               start_tarfs: Callable[..., Snapshotter]) -> Snapshotter:
    return start_tarfs(request.param)
