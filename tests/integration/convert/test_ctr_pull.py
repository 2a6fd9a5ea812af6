"""containerd (a private ``ctr``/containerd 1.6 from tests/harness) pulls what we push.

Content only: unpacking Nydus blobs needs the Nydus snapshotter (plain containerd has
no stream processor for ``application/vnd.oci.image.layer.nydus.blob.v1``, exactly as
with nydusify's images), which a later e2e test drives. What is checked here: the
manifest resolves, every blob and the config fetch, containerd records the image
with its GC references to every layer, and the layer annotations the snapshotter
turns into labels are on the descriptors containerd stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.harness import tools
from tests.harness.containerd import Containerd
from tests.harness.registry import Registry

from .conftest import convert_args, pynydus

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (containerd)"),
]


@pytest.fixture(scope="module")
def ctrd(registry: Registry) -> Iterator[Containerd]:
    tools.require("/usr/bin/containerd", "/usr/bin/ctr")
    with Containerd(registry_hosts=[registry.host]) as c:
        yield c


def test_ctr_fetches_the_converted_image(ctrd: Containerd, registry: Registry, layered: str,
                                        tmp_path: object) -> None:
    dst = registry.ref("nydus/ctr", "v1")
    r = pynydus(*convert_args(layered, dst, str(tmp_path) + "/cache"))
    assert r.rc == 0, r.err
    digest = r.out.strip().rsplit("@", 1)[1]
    ctrd.ctr("content", "fetch", "--plain-http", dst)
    images = ctrd.ctr_out("images", "ls")
    assert dst in images and digest in images
    manifest = json.loads(ctrd.ctr_out("content", "get", digest))
    content = ctrd.ctr_out("content", "ls")
    for i, layer in enumerate(manifest["layers"]):
        assert layer["digest"] in content  # fetched
        assert f"containerd.io/gc.ref.content.l.{i}={layer['digest']}" in content
    assert manifest["layers"][-1]["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
    assert all(lyr["annotations"] == {"containerd.io/snapshot/nydus-blob": "true"}
               for lyr in manifest["layers"][:-1])
    # unpacking needs the Nydus snapshotter: plain containerd refuses the blob media type
    pull = ctrd.ctr("images", "pull", "--plain-http", dst, check=False)
    assert pull.returncode != 0
    assert "application/vnd.oci.image.layer.nydus.blob.v1" in pull.stderr


def test_merged_index_lets_plain_containerd_pull_the_oci_image(
        ctrd: Containerd, registry: Registry, layered: str, tmp_path: object) -> None:
    dst = registry.ref("nydus/ctr-merged", "v1")
    r = pynydus(*convert_args(layered, dst, str(tmp_path) + "/cache", "--merge-platform"))
    assert r.rc == 0, r.err
    # containerd picks the OCI manifest: the Nydus one has a config type it ignores
    pull = ctrd.ctr("images", "pull", "--plain-http", "--platform", "linux/amd64", dst,
                    check=False)
    assert pull.returncode == 0, pull.stderr
