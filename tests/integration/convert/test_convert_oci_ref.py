"""``pynydus convert --oci-ref``: a ZRAN image next to the OCI image it reads in place.

Only metadata is pushed (per layer a meta blob: chunk info, inflate contexts, windows;
the merged bootstrap layer; config; manifest); the data blobs are
the source's gzip layers, which must be in the target repository (mounted from the
source repository of the same registry, copied from another registry). pynydusd and
upstream's nydusd then serve the image from the registry, byte for byte as the source
layers applied with overlay semantics.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pynydus.convert.pack import bootstrap_from_layer, read_toc
from pynydus.rafs.format import BlobFeatures
from pynydus.rafs.read import bootstrap_from_bytes
from tests.harness.pynydusd import Pynydusd
from tests.harness.registry import Registry
from tests.harness.util import make_workdir, remove_tree

from .conftest import (
    PASSWORD,
    USER,
    assert_tree_matches,
    client_for,
    convert_args,
    layer_blob,
    push_layers,
    pynydus,
    source_view,
)

NYDUS_BLOB_MT = "application/vnd.oci.image.layer.nydus.blob.v1"


@pytest.fixture
def mountdir() -> Iterator[Path]:
    d = make_workdir("cvz")
    yield d
    remove_tree(d)


def _manifest(reg: Registry, repo: str, ref: str, auth: str | None = None) -> dict[str, Any]:
    with client_for(reg, auth) as c:
        return json.loads(c.get_manifest(repo, ref).data)  # type: ignore[no-any-return]


def _boot(reg: Registry, repo: str, m: dict[str, Any], auth: str | None = None) -> bytes:
    with client_for(reg, auth) as c:
        return bootstrap_from_layer(b"".join(c.get_blob(repo, m["layers"][-1]["digest"])))


def test_oci_ref_pushes_only_metadata_and_names_the_source_layers(
        registry: Registry, layered: str, cache_dir: str, tmp_path: Path) -> None:
    summary = tmp_path / "s.json"
    r = pynydus(*convert_args(layered, registry.ref("zran/layout", "v1"), cache_dir,
                              "--oci-ref", "--output-json", str(summary)))
    assert r.rc == 0, r.err
    src = _manifest(registry, "src/layered", "latest")
    m = _manifest(registry, "zran/layout", "v1")
    blobs, boot = m["layers"][:-1], m["layers"][-1]
    assert len(blobs) == len(src["layers"])
    for b, s in zip(blobs, src["layers"], strict=True):
        assert b["mediaType"] == NYDUS_BLOB_MT
        assert b["annotations"] == {"containerd.io/snapshot/nydus-blob": "true",
                                    "containerd.io/snapshot/nydus-ref": s["digest"]}
    assert boot["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
    with bootstrap_from_bytes(_boot(registry, "zran/layout", m)) as bs:
        data_layers = {s["digest"]: b["digest"] for b, s in zip(blobs, src["layers"])}
        assert bs.blobs
        for blob in bs.blobs:
            # The blob the runtime reads is the source layer, its chunk info the meta blob.
            assert data_layers["sha256:" + blob.blob_id] == "sha256:" + blob.blob_meta_digest.hex()
            assert blob.features & BlobFeatures.ZRAN and blob.features & BlobFeatures.SEPARATE
    with client_for(registry) as c:  # same registry: the source layers were mounted
        for s in src["layers"]:
            assert c.blob_exists("zran/layout", s["digest"])
    with client_for(registry) as c:  # the chunk info is in the meta blobs only
        boot_layer = b"".join(c.get_blob("zran/layout", boot["digest"]))
    with tarfile.open(fileobj=io.BytesIO(boot_layer)) as tf:
        assert [m.name for m in tf if m.isfile()] == ["image/image.boot"]
    with client_for(registry) as c:  # lean meta blobs: no layer bootstrap, no digests
        for b in blobs:
            meta = b"".join(c.get_blob("zran/layout", b["digest"]))
            _, toc = read_toc(io.BytesIO(meta), len(meta))
            names = [e.entry_name for e in toc]
            assert names in (["image.blob", "blob.meta", "blob.meta.header"],
                             ["image.boot"]), names  # the latter: a layer without data
    doc = json.loads(summary.read_text())["images"][0]
    assert doc["oci_ref"]["pushed_bytes"] < doc["oci_ref"]["source_layer_bytes"]


@pytest.mark.root
def test_pynydusd_and_upstream_nydusd_serve_the_zran_image_from_the_registry(
        registry: Registry, layered: str, cache_dir: str, mountdir: Path) -> None:
    from tests.compat.upstream import Nydusd

    r = pynydus(*convert_args(layered, registry.ref("zran/served", "v1"), cache_dir, "--oci-ref"))
    assert r.rc == 0, r.err
    (mountdir / "image.boot").write_bytes(_boot(registry, "zran/served",
                                                _manifest(registry, "zran/served", "v1")))
    backend = {"type": "registry", "config": {
        "scheme": "http", "host": registry.host, "repo": "zran/served",
        "timeout": 10, "connect_timeout": 10, "retry_limit": 2}}
    cfg = {"device": {"backend": backend, "cache": {"type": "blobcache", "config": {
               "work_dir": str(mountdir / "cache")}}},
           "mode": "direct", "enable_xattr": True}
    view = source_view(registry, "src/layered", "latest")
    with Pynydusd(mountdir, bootstrap=mountdir / "image.boot", config=cfg) as d:
        assert_tree_matches(d.mountpoint, view, zero_mtime=False)
    up = Nydusd(mountdir, name="up", bootstrap=mountdir / "image.boot", blob_dir=mountdir)
    up.config_path.write_text(json.dumps({**cfg, "device": {**cfg["device"], "cache": {
        "type": "blobcache", "config": {"work_dir": str(mountdir / "upcache")}}}}))
    (mountdir / "upcache").mkdir()
    try:
        up.start()
        assert_tree_matches(up.mountpoint, view, zero_mtime=False)
    finally:
        up.stop()


def test_oci_ref_to_another_registry_copies_the_source_layers(
        registry: Registry, auth_registry: Registry, layered: str, cache_dir: str) -> None:
    auth = f"{USER}:{PASSWORD}"
    r = pynydus(*convert_args(layered, auth_registry.ref("zran/copied", "v1"), cache_dir,
                              "--oci-ref", "--target-auth", auth))
    assert r.rc == 0, r.err
    src = _manifest(registry, "src/layered", "latest")
    with client_for(auth_registry, base64.b64encode(auth.encode()).decode()) as c:
        for s in src["layers"]:
            assert c.blob_exists("zran/copied", s["digest"])


def test_oci_ref_refuses_layers_that_are_not_gzip(registry: Registry, cache_dir: str) -> None:
    from tests.harness import oci

    layer = oci.Layer("z").file("a.txt", "zstd layer\n")
    with client_for(registry) as c:
        push_layers(c, "src/zstd", "v1", [layer_blob(layer, "zstd")])
    r = pynydus(*convert_args(registry.ref("src/zstd", "v1"), registry.ref("zran/zstd", "v1"),
                              cache_dir, "--oci-ref"))
    assert r.rc != 0
    assert "--oci-ref" in r.err and "zstd, not gzip" in r.err
