"""A ZRAN image (``pynydus convert --oci-ref``) pulled lazily and run through containerd.

The pull downloads the bootstrap layer only: neither the meta blobs (pynydusd reads
their chunk info and inflate contexts on demand, as it reads a blob's meta) nor the
source's gzip layers; a container then reads its files by ranged GETs of the original
gzip layers, in the image's own repository, and sees the OCI image's rootfs.

Runs against containerd 1.6 and 2.x, in both daemon modes.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from pynydus.convert.converter import ConvertOptions, convert
from pynydus.convert.layer import BuildOptions
from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.cri import CriImages
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter

SNAP = "nydus"
NS = "k8s.io"


def _manifest(ref: str) -> dict:
    return json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True, capture_output=True, text=True).stdout)


def _whole_gets(registry: Registry, digest: str) -> int:
    """GETs of the whole blob (200; a ranged read is answered 206)."""
    return sum(1 for method, path, status in registry.requests()
               if method == "GET" and path.endswith(digest) and status == 200)


@pytest.fixture(scope="module")
def zran(registry: Registry, layered_image: tuple[str, oci.BuiltImage]) -> dict:
    src, _ = layered_image
    target = registry.ref("e2e/layered", "zran")
    convert(ConvertOptions(source=src, target=target, source_insecure=True,
                           target_insecure=True, build=BuildOptions(oci_ref=True)))
    m = _manifest(target)
    metas = [l["digest"] for l in m["layers"][:-1]]
    refs = [l["annotations"]["containerd.io/snapshot/nydus-ref"] for l in m["layers"][:-1]]
    source_layers = [l["digest"] for l in _manifest(src)["layers"]]
    assert refs == source_layers
    return {"ref": target, "metas": metas, "sources": refs, "boot": m["layers"][-1]["digest"]}


@pytest.fixture(scope="module", params=["dedicated", "shared"])
def zran_env(registry: Registry, containerd_version: str, request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Snapshotter, Containerd]]:
    config = tmp_path_factory.mktemp("snapcfg") / "config.toml"
    config.write_text(f'version = 1\ndaemon_mode = "{request.param}"\n')
    with Snapshotter(config=config) as snap, Containerd(
            snap.socket, registry_hosts=[registry.host], cri=True, namespace=NS,
            version=containerd_version) as ctrd:
        yield snap, ctrd


def test_zran_image_pulls_lazily_and_runs_from_the_oci_layers(
        zran_env: tuple[Snapshotter, Containerd], zran: dict, registry: Registry) -> None:
    snap, ctrd = zran_env
    watched = [*zran["metas"], *zran["sources"], zran["boot"]]
    before = {d: registry.blob_gets(d) for d in watched}
    whole_before = {d: _whole_gets(registry, d) for d in zran["metas"]}
    CriImages(str(ctrd.socket)).pull(zran["ref"])
    for d in zran["sources"]:
        assert registry.blob_gets(d) == before[d], f"{d} was downloaded at pull"
    # a ZRAN layer's meta blob is never downloaded at pull; the image's early mount (at
    # the bootstrap's Commit) may read its span maps, ranged, in the background, and on a
    # loaded machine such a read lands before the pull returns
    for d in zran["metas"]:
        assert _whole_gets(registry, d) == whole_before[d], f"{d} was downloaded at pull"
    assert registry.blob_gets(zran["boot"]) > before[zran["boot"]]
    cid = "zran-check"
    try:
        out = ctrd.ctr_out("run", "--rm", "--snapshotter", SNAP, zran["ref"], cid, "sh", "-c",
                           images.CHECK_SCRIPT, timeout=180).strip()
    finally:
        ctrd.ctr("tasks", "rm", "-f", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)
    assert out == images.expected_check_output()
    # The file data came at run time, from the original gzip layers.
    assert sum(registry.blob_gets(d) - before[d] for d in zran["sources"]) > 0
    assert len(snap.image_daemon_pids()) == 1
