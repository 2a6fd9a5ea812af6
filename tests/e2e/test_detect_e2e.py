"""Referrer and index detection: a pod keeps its OCI reference and is served lazily from
the image's Nydus form (``experimental.enable_referrer_detect``, ``enable_index_detect``).

The layered check image is pushed as OCI; its Nydus form is made by ``pynydus convert
--with-referrer`` (a Nydus manifest whose subject is the OCI manifest; the test registry,
docker-registry 2.8, has no referrers API, so the referrers tag scheme is what is found)
and by ``--merge-platform`` (an OCI index with the OCI and the Nydus manifest for the same
platform). containerd pulls the OCI reference through the CRI: no OCI layer and no Nydus
blob is downloaded, only the Nydus bootstrap (by the snapshotter); the container then
reads its files lazily from the Nydus blobs. An image without a Nydus form is pulled and
unpacked as usual, with one lookup.

Runs against containerd 1.6 and 2.x.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.convert.converter import ConvertOptions, convert
from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.cri import CriImages
from tests.harness.node import cri_node
from tests.harness.registry import Registry, raw_manifest
from tests.harness.snapshotter import Snapshotter

SNAP = "nydus"
NS = "k8s.io"
DETECTED = "containerd.io/snapshot/nydus-detected"
IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
FALLBACK = "containerd.io/snapshot/nydus-oci-fallback"


@pytest.fixture(scope="module")
def forms(registry: Registry, layouts: Path) -> dict:
    """OCI references whose Nydus form is a referrer, an index entry, or missing."""
    out: dict = {}
    for name in ("referrer", "index", "plain"):
        # a layer of its own on top: containerd would reuse another case's snapshots
        image = images.layered_image()
        image.layers.append(oci.Layer(name).file(f"etc/detect-{name}", f"{name}\n"))
        built = image.write_layout(layouts / f"detect-{name}")
        ref = registry.ref(f"e2e/detect-{name}", "oci")
        oci.push(built, ref)
        out[name] = {"ref": ref, "oci_layers": [l["digest"] for l in raw_manifest(ref)["layers"]]}
    convert(ConvertOptions(source=out["referrer"]["ref"],
                           target=registry.ref("e2e/detect-referrer", "nydus"),
                           source_insecure=True, target_insecure=True, with_referrer=True))
    merged = registry.ref("e2e/detect-index", "merged")
    convert(ConvertOptions(source=out["index"]["ref"], target=merged, source_insecure=True,
                           target_insecure=True, merge_platform=True))
    out["index"]["ref"] = merged
    for name, nydus_ref in (("referrer", registry.ref("e2e/detect-referrer", "nydus")),):
        m = raw_manifest(nydus_ref)
        out[name]["blobs"] = [l["digest"] for l in m["layers"][:-1]]
        out[name]["boot"] = m["layers"][-1]["digest"]
    idx = raw_manifest(merged)
    nydus = [d for d in idx["manifests"]
             if "nydus.remoteimage.v1" in d.get("platform", {}).get("os.features", [])]
    assert len(nydus) == 1
    m = raw_manifest(f"{registry.host}/e2e/detect-index@{nydus[0]['digest']}")
    out["index"]["blobs"] = [l["digest"] for l in m["layers"][:-1]]
    out["index"]["boot"] = m["layers"][-1]["digest"]
    return out


@pytest.fixture(scope="module")
def detect_env(registry: Registry,
               containerd_version: str) -> Iterator[tuple[Snapshotter, Containerd]]:
    with cri_node(registry, containerd_version,
                  'version = 1\n[experimental]\nenable_referrer_detect = true\n'
                  'enable_index_detect = true\n') as node:
        yield node


def _run_check(ctrd: Containerd, ref: str, cid: str, name: str) -> str:
    """The check script's output, and the case's own file (in its own top layer)."""
    script = images.CHECK_SCRIPT + f"\necho detect=$(cat /etc/detect-{name})\n"
    try:
        return ctrd.ctr_out("run", "--rm", "--snapshotter", SNAP, ref, cid, "sh", "-c",
                            script, timeout=180).strip()
    finally:
        ctrd.ctr("tasks", "rm", "-f", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)


def _snapshot_labels(ctrd: Containerd) -> list[dict[str, str]]:
    out = []
    for line in ctrd.ctr_out("snapshots", "--snapshotter", SNAP, "ls").splitlines()[1:]:
        key = line.split()[0]
        info = json.loads(ctrd.ctr_out("snapshots", "--snapshotter", SNAP, "info", key))
        out.append(info.get("Labels") or {})
    return out


@pytest.mark.parametrize("how", ["referrer", "index"])
def test_oci_reference_is_served_lazily_from_its_nydus_form(
        detect_env: tuple[Snapshotter, Containerd], forms: dict, registry: Registry,
        how: str) -> None:
    snap, ctrd = detect_env
    form = forms[how]
    watched = [*form["oci_layers"], *form["blobs"], form["boot"]]
    before = {d: registry.blob_gets(d) for d in watched}
    CriImages(str(ctrd.socket)).pull(form["ref"])
    for d in [*form["oci_layers"], *form["blobs"]]:
        assert registry.blob_gets(d) == before[d], f"{d} was downloaded at pull"
    assert registry.blob_gets(form["boot"]) == before[form["boot"]] + 1
    # (the lower layers are the other case's too, skipped when it was pulled first)
    mine = [lb for lb in _snapshot_labels(ctrd) if lb.get(IMAGE_REF) == form["ref"]]
    assert mine and all(lb[DETECTED].startswith(how + " sha256:") for lb in mine)
    assert any("containerd.io/snapshot/nydus-bootstrap" in lb for lb in mine)
    assert _run_check(ctrd, form["ref"], f"detect-{how}", how) == \
        images.expected_check_output() + f"\ndetect={how}"
    assert sum(registry.blob_gets(d) - before[d] for d in form["blobs"]) > 0
    assert sum(registry.blob_gets(d) - before[d] for d in form["oci_layers"]) == 0
    assert snap.image_daemon_pids()


def _lookups(registry: Registry, repo: str) -> int:
    """Requests of the referrers API or of the referrers fallback tag in ``repo``."""
    return sum(1 for _m, path, _s in registry.requests()
               if path.startswith((f"/v2/{repo}/referrers/", f"/v2/{repo}/manifests/sha256-")))


def test_image_without_nydus_form_is_unpacked_as_oci_after_one_lookup(
        detect_env: tuple[Snapshotter, Containerd], forms: dict, registry: Registry) -> None:
    """Its lower layers are the detected images' too, skipped when those were pulled
    (containerd does not download them again): the snapshotter unpacks them as OCI for
    the first container and marks them ``nydus-oci-fallback``."""
    _snap, ctrd = detect_env
    form = forms["plain"]
    *shared, own = form["oci_layers"]
    before = {d: registry.blob_gets(d) for d in form["oci_layers"]}
    lookups = _lookups(registry, "e2e/detect-plain")
    CriImages(str(ctrd.socket)).pull(form["ref"])
    assert registry.blob_gets(own) == before[own] + 1  # containerd unpacked it
    # one discovery per image (referrers API, then the tag scheme), not one per layer
    assert _lookups(registry, "e2e/detect-plain") - lookups <= 2
    assert not any(DETECTED in lb for lb in _snapshot_labels(ctrd)
                   if lb.get(IMAGE_REF) == form["ref"])
    assert _run_check(ctrd, form["ref"], "detect-plain", "plain") == \
        images.expected_check_output() + "\ndetect=plain"
    for d in shared:
        assert registry.blob_gets(d) == before[d] + 1, f"shared layer {d} not unpacked once"
    filled = [lb for lb in _snapshot_labels(ctrd) if FALLBACK in lb]
    assert len(filled) == len(shared)
    assert all(lb[FALLBACK].startswith("shared") for lb in filled)
