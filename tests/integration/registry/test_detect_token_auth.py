"""Referrer and index detection (snapshot/detect.py) against a registry that wants a
token (distribution token auth, our JWT token server): the snapshotter's credentials
reach the lookup, a Nydus form is found, a plain image is one cached lookup, and a
lookup the registry refuses (no credentials) is "no Nydus form", not an error.

What a lookup costs in time is measured by ``bench/detect_cost.py`` (a test must not
depend on the machine's load).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from pynydus import labels as L
from pynydus.convert.converter import ConvertOptions, convert
from pynydus.registry import Credentials, RegistryClient
from pynydus.snapshot import detect
from tests.harness import oci
from tests.harness.registry import Registry
from tests.integration.convert.conftest import layer_blob, push_layers

from .servers import TokenServer

USER, PASSWORD = "alice", "wonderland"


def _push(reg: Registry, repo: str, name: str) -> str:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with RegistryClient(reg.host, scheme="http", auth=auth) as c:
        digest, _, _ = push_layers(c, repo, "v1", [layer_blob(
            oci.Layer(name).file(f"etc/{name}", f"{name}\n"), "gzip")])
    return digest


def _convert_with_referrer(reg: Registry, repo: str, tmp_path) -> None:
    convert(ConvertOptions(source=reg.ref(repo, "v1"), target=reg.ref(repo, "nydus"),
                           source_insecure=True, target_insecure=True,
                           source_auth=f"{USER}:{PASSWORD}", target_auth=f"{USER}:{PASSWORD}",
                           with_referrer=True, cache_dir=str(tmp_path / "cache")))


def _labels(ref: str, manifest: str) -> dict[str, str]:
    return {L.CRI_IMAGE_REF: ref, L.CRI_MANIFEST_DIGEST: manifest,
            L.CRI_LAYER_DIGEST: "sha256:" + "0" * 64}


def _creds(ref: str, labels: Mapping[str, str]) -> Credentials | None:
    return Credentials(username=USER, password=PASSWORD)


def test_detection_with_token_auth(token_registry: tuple[Registry, TokenServer],
                                   tmp_path) -> None:
    reg, ts = token_registry
    plain = _push(reg, "det/plain", "plain")
    ref_manifest = _push(reg, "det/ref", "ref")
    _convert_with_referrer(reg, "det/ref", tmp_path)
    det = detect.Detector(referrer=True, index=True,
                          client_factory=detect.client_factory(creds=_creds))
    form = det.find(_labels(reg.ref("det/ref", "v1"), ref_manifest))
    assert form is not None and form.how == "referrer" and form.repo == "det/ref"
    issued = ts.issued
    assert det.find(_labels(reg.ref("det/plain", "v1"), plain)) is None
    assert ts.issued > issued  # the lookup did authenticate
    # the image's other layers ask again: answered from the cache
    lookups, issued = det.lookups, ts.issued
    for _ in range(3):
        assert det.find(_labels(reg.ref("det/plain", "v1"), plain)) is None
    assert (det.lookups, ts.issued) == (lookups, issued)
    # without credentials the registry refuses: plain OCI, no error
    anon = detect.Detector(referrer=True, index=True,
                           client_factory=detect.client_factory(creds=lambda r, lb: None))
    assert anon.find(_labels(reg.ref("det/ref", "v1"), ref_manifest)) is None
    # the bootstrap is fetched with the same credentials
    out = det.fetch_bootstrap(form, _labels(reg.ref("det/ref", "v1"), ref_manifest),
                              str(tmp_path / "boot"))
    assert (tmp_path / "boot" / "image" / "image.boot").stat().st_size > 0
    assert isinstance(out, dict)


def test_one_token_serves_an_images_lookups_and_its_bootstrap(
        token_registry: tuple[Registry, TokenServer], tmp_path) -> None:
    """The index, referrers API, referrers tag and bootstrap requests of one image share
    the lookup client's token (one token request in all); a later image of the same
    registry reuses the client's challenge."""
    reg, ts = token_registry
    manifest = _push(reg, "det/one", "one")
    _convert_with_referrer(reg, "det/one", tmp_path)
    det = detect.Detector(referrer=True, index=True,
                          client_factory=detect.client_factory(creds=_creds))
    issued = ts.issued
    labels = _labels(reg.ref("det/one", "v1"), manifest)
    form = det.find(labels)
    assert form is not None and form.how == "referrer"
    det.fetch_bootstrap(form, labels, str(tmp_path / "boot"))
    assert (tmp_path / "boot" / "image" / "image.boot").stat().st_size > 0
    assert ts.issued - issued == 1
