"""Prefetch lists in a real registry (distribution, which has no referrers API):
``pynydus optimize --trace --push`` pushes a list beside an image without changing the
image; the snapshotter's lookup finds it through the fallback tag; an image without a
list costs one request per lookup once the registry's kind is known."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from pynydus.cli.main import main
from pynydus.daemon import prefetchlist
from pynydus.manager.prefetchlookup import PrefetchListLookup
from pynydus.registry import RegistryClient, media
from pynydus.registry.referrers import fallback_tag
from tests.harness.registry import Registry


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_image(reg: Registry, repo: str, tag: str) -> str:
    """A one-layer OCI image; its manifest digest."""
    config, layer = b'{"architecture":"amd64","os":"linux"}', os.urandom(1000)
    with RegistryClient(reg.host, scheme="http") as c:
        c.push_blob(repo, config, _sha(config))
        c.push_blob(repo, layer, _sha(layer))
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": _sha(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": _sha(layer), "size": len(layer)}]}).encode()
        return c.put_manifest(repo, tag, media.OCI_MANIFEST, manifest)


def daemon_cfg(reg: Registry, repo: str, cache: Path) -> dict[str, Any]:
    return {"device": {"backend": {"type": "registry", "config": {
        "scheme": "http", "host": reg.host, "repo": repo, "timeout": 5}},
        "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}}}


TRACE = {"files": [{"path": "/usr/bin/app"}, {"path": "/etc/app.conf"}],
         "chunks": [{"blob_id": "b" * 64, "index": i, "offset": 100 * i, "size": 100,
                     "uncompressed_size": 400, "first_read_nanos": i} for i in (3, 4, 5, 0)]}


def test_optimize_pushes_a_list_the_lookup_finds(registry: Registry, tmp_path: Path) -> None:
    digest = push_image(registry, "pf/app", "v1")
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(TRACE))
    out = tmp_path / "list.json"
    ref = f"{registry.host}/pf/app:v1"
    assert main(["optimize", ref, "--trace", str(trace), "--output", str(out), "--push"]) == 0
    plist = prefetchlist.parse(out.read_bytes())
    assert plist.ranges == ((0, 3, 3, 300, 300), (0, 0, 1, 0, 100))
    with RegistryClient(registry.host, scheme="http") as c:
        assert c.head_manifest("pf/app", "v1").digest == digest  # the image is unchanged
        index = c.referrers_fallback("pf/app", digest, prefetchlist.ARTIFACT_TYPE)
        assert len(index["manifests"]) == 1
    assert ("PUT", f"/v2/pf/app/manifests/{fallback_tag(digest)}", 201) in registry.requests()

    lookup = PrefetchListLookup()
    try:
        found = lookup.lookup(ref, {}, daemon_cfg(registry, "pf/app", tmp_path / "c"))
        assert found == plist
        # containerd's label names the manifest: no HEAD of the tag
        labels = {"containerd.io/snapshot/cri.manifest-digest": digest}
        assert lookup.lookup(ref, labels, daemon_cfg(registry, "pf/app", tmp_path / "c")) == plist
    finally:
        lookup.close()


def test_an_image_without_a_list_costs_one_request(registry: Registry, tmp_path: Path) -> None:
    lookup = PrefetchListLookup()
    cfg = daemon_cfg(registry, "pf/plain", tmp_path / "c")
    try:
        digests = [push_image(registry, "pf/plain", f"t{i}") for i in range(6)]
        first = {"containerd.io/snapshot/cri.manifest-digest": digests[0]}
        assert lookup.lookup(f"{registry.host}/pf/plain:t0", first, cfg) is None  # learns
        seen = len(registry.requests())
        times = []
        for i, d in enumerate(digests[1:], 1):
            labels = {"containerd.io/snapshot/cri.manifest-digest": d}
            t0 = time.perf_counter()
            assert lookup.lookup(f"{registry.host}/pf/plain:t{i}", labels, cfg) is None
            times.append(time.perf_counter() - t0)
        deadline = time.monotonic() + 5  # the access log catches up
        while len(registry.requests()) < seen + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        new = registry.requests()[seen:]
        lookups = [r for r in new if "/manifests/sha256-" in r[1] or "/referrers/" in r[1]]
        assert len(lookups) == 5 and all("/manifests/sha256-" in r[1] for r in lookups)
        print(f"lookup without a list: median {statistics.median(times) * 1e3:.1f} ms")
    finally:
        lookup.close()
