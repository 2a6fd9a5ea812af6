"""The converted image as a runtime sees it, refereed by two readers we did not write
for the converter: ``pynydusd`` (FUSE, registry backend: every chunk comes from the
pushed blobs by range) and the kernel's EROFS (the image bootstrap with the layer
blobs, decompressed to their address space, as extra devices; ``fsck.erofs`` first).
Both mounted trees must equal the source layers applied with overlay semantics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.convert.pack import bootstrap_from_layer
from pynydus.rafs.read import bootstrap_from_bytes
from tests.harness import tools
from tests.harness.pynydusd import Pynydusd
from tests.harness.registry import Registry
from tests.harness.util import make_workdir, remove_tree

from .conftest import assert_tree_matches, client_for, convert_args, pynydus, source_view

pytestmark = pytest.mark.root


@pytest.fixture
def mountdir() -> Iterator[Path]:
    d = make_workdir("cvm")
    yield d
    remove_tree(d)


def _converted(registry: Registry, layered: str, cache_dir: str, repo: str,
               *extra: str) -> bytes:
    r = pynydus(*convert_args(layered, registry.ref(repo, "v1"), cache_dir, *extra))
    assert r.rc == 0, r.err
    with client_for(registry) as c:
        m = json.loads(c.get_manifest(repo, "v1").data)
        return bootstrap_from_layer(b"".join(c.get_blob(repo, m["layers"][-1]["digest"])))


def test_pynydusd_serves_the_converted_image(registry: Registry, layered: str, cache_dir: str,
                                             mountdir: Path) -> None:
    boot = _converted(registry, layered, cache_dir, "nydus/mounted")
    (mountdir / "image.boot").write_bytes(boot)
    cfg = {"device": {"backend": {"type": "registry", "config": {
               "scheme": "http", "host": registry.host, "repo": "nydus/mounted",
               "timeout": 10, "connect_timeout": 10, "retry_limit": 2}},
               "cache": {"type": "blobcache", "config": {"work_dir": str(mountdir / "cache")}}},
           "mode": "direct", "enable_xattr": True}
    view = source_view(registry, "src/layered", "latest")
    with Pynydusd(mountdir, bootstrap=mountdir / "image.boot", config=cfg) as d:
        assert_tree_matches(d.mountpoint, view, zero_mtime=False)


def test_kernel_erofs_mounts_the_converted_image(registry: Registry, layered: str,
                                                 cache_dir: str, mountdir: Path) -> None:
    tools.require("fsck.erofs")
    from tests.integration.rafs.erofs_harness import fsck, materialize, mounted

    boot = _converted(registry, layered, cache_dir, "nydus/kernel")
    boot_path = mountdir / "image.boot"
    boot_path.write_bytes(boot)
    devices = []
    with bootstrap_from_bytes(boot) as bs, client_for(registry) as c:
        for b in bs.blobs:  # device order = blob table order
            raw = mountdir / f"{b.blob_id}.blob"
            raw.write_bytes(b"".join(c.get_blob("nydus/kernel", "sha256:" + b.blob_id)))
            dev = mountdir / f"{b.blob_id}.dev"
            materialize(raw, dev)
            devices.append(dev)
    fsck(boot_path, devices)
    view = source_view(registry, "src/layered", "latest")
    with mounted(boot_path, devices) as mnt:
        assert_tree_matches(mnt, view)
