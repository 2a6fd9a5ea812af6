"""Artifacts referring to an image: the manifest's shape, and lookups that cost one
request once the registry's kind is known, cached."""

from __future__ import annotations

import base64
import json
from typing import Any, cast

import pytest

from pynydus.errors import FormatError
from pynydus.registry.artifact import (
    CREATED,
    ReferrersFinder,
    Subject,
    artifact_manifest,
    fetch_artifact,
)
from pynydus.registry.client import RegistryClient

SUBJECT = Subject("application/vnd.oci.image.manifest.v1+json", "sha256:" + "a" * 64, 123)


def test_manifest_refers_to_the_subject_and_carries_small_data_inline() -> None:
    doc = json.loads(artifact_manifest(SUBJECT, "application/x.t", "application/x.t+json",
                                       b'{"x":1}', {"k": "v"}))
    assert doc["artifactType"] == "application/x.t"
    assert doc["subject"] == {"mediaType": SUBJECT.media_type, "digest": SUBJECT.digest,
                              "size": 123}
    (layer,) = doc["layers"]
    assert base64.b64decode(layer["data"]) == b'{"x":1}' and layer["size"] == 7
    assert doc["annotations"]["k"] == "v" and CREATED in doc["annotations"]
    big = json.loads(artifact_manifest(SUBJECT, "t", "t+json", b"x" * (64 << 10)))
    assert "data" not in big["layers"][0]


class FakeClient:
    def __init__(self, has_api: bool, index: dict[str, Any]) -> None:
        self.has_api = has_api
        self.index = index
        self.calls: list[str] = []

    def referrers_api(self, repo: str, digest: str, artifact_type: str | None = None
                      ) -> dict[str, Any] | None:
        self.calls.append("api")
        return self.index if self.has_api else None

    def referrers_fallback(self, repo: str, digest: str, artifact_type: str | None = None
                           ) -> dict[str, Any]:
        self.calls.append("tag")
        return self.index


def _entry(digest: str, created: str, kind: str = "t") -> dict[str, Any]:
    return {"digest": digest, "artifactType": kind, "annotations": {CREATED: created}}


def test_a_registry_without_the_api_costs_one_request_after_the_first_lookup() -> None:
    now = [0.0]
    finder = ReferrersFinder(ttl=100, miss_ttl=10, clock=lambda: now[0])
    client = FakeClient(False, {"manifests": []})
    c = cast(RegistryClient, client)
    assert finder.find(c, "h", "r", "sha256:1", "t") == []
    assert client.calls == ["api", "tag"]
    assert finder.find(c, "h", "r", "sha256:2", "t") == []
    assert client.calls == ["api", "tag", "tag"]  # known: no referrers API
    assert finder.find(c, "h", "r", "sha256:2", "t") == []
    assert len(client.calls) == 3  # cached
    now[0] = 11.0  # a miss is asked again after miss_ttl
    finder.find(c, "h", "r", "sha256:2", "t")
    assert len(client.calls) == 4


def test_newest_artifact_of_the_type_comes_first() -> None:
    index = {"manifests": [_entry("sha256:old", "2026-01-01T00:00:00Z"),
                           _entry("sha256:other", "2027-01-01T00:00:00Z", kind="x"),
                           _entry("sha256:new", "2026-06-01T00:00:00Z")]}
    client = FakeClient(True, index)
    found = ReferrersFinder().find(cast(RegistryClient, client), "h", "r", "sha256:1", "t")
    assert [m["digest"] for m in found] == ["sha256:new", "sha256:old"]
    assert client.calls == ["api"]


class _Manifests:
    """A registry's answer to the artifact's manifest request, as it came."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def get_manifest(self, repo: str, ref: str, accept: Any = ()) -> Any:
        return type("M", (), {"data": self.data})()


@pytest.mark.parametrize("data", [b"[]", b"{", b'{"layers": 5}', b'{"layers": [7]}',
                                  b'{"layers": [{"mediaType": "t+json"}]}',
                                  b'{"layers": [{"digest": "d", "size": "3"}]}',
                                  b'{"layers": [{"digest": "d", "mediaType": "t+json"}]}'])
def test_a_malformed_artifact_manifest_is_a_format_error(data: bytes) -> None:
    with pytest.raises(FormatError, match="artifact sha256:b"):
        fetch_artifact(cast(RegistryClient, _Manifests(data)), "r", "sha256:b", "t+json", 1 << 20)
