"""RegistryClient against a real docker-registry: push, pull, ranges, manifests, referrers."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pynydus.errors import InvalidArgument, NotFound
from pynydus.registry import DigestMismatch, RegistryClient, compute_digest, media
from tests.harness.registry import Registry

from .conftest import backend_client

Make = Callable[..., RegistryClient]


def blob(size: int, seed: int = 0) -> tuple[bytes, str]:
    data = os.urandom(size) if seed == 0 else bytes((i * seed) & 0xFF for i in range(size))
    return data, compute_digest(data)


def image_manifest(c: RegistryClient, repo: str, layers: list[tuple[bytes, str]],
                   **extra: object) -> bytes:
    cfg = b'{"architecture":"amd64","os":"linux"}'
    c.push_blob(repo, cfg, compute_digest(cfg))
    for data, d in layers:
        c.push_blob(repo, data, d)
    doc = {"schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": compute_digest(cfg), "size": len(cfg)},
           "layers": [{"mediaType": media.NYDUS_BLOB, "digest": d, "size": len(data)}
                      for data, d in layers], **extra}
    return json.dumps(doc).encode()


def test_push_then_read_ranges_full_blob_and_head(registry: Registry, client: Make) -> None:
    c = client(registry.host)
    data, d = blob(5 << 20)
    assert c.push_blob("ns/img", data, d) == "uploaded"
    assert c.push_blob("ns/img", data, d) == "exists"  # idempotent
    assert c.head_blob("ns/img", d).size == len(data)
    assert c.blob_exists("ns/img", d)
    for off, n in [(0, 1), (0, 4096), (123457, 1 << 20), (len(data) - 10, 10), (4 << 20, 1 << 20)]:
        assert c.read_blob_range("ns/img", d, off, n) == data[off:off + n]
    assert c.read_blob_range("ns/img", d, 77, 0) == b""
    assert b"".join(c.get_blob("ns/img", d, chunk_size=65536)) == data
    m = c.metrics.snapshot()
    assert m["bytes_read"] >= len(data) + (2 << 20)
    assert m["status_counts"].get(206, 0) >= 5  # type: ignore[attr-defined]


def test_range_past_the_end_is_invalid_argument(registry: Registry, client: Make) -> None:
    c = client(registry.host)
    data, d = blob(10000)
    c.push_blob("ns/end", data, d)
    with pytest.raises(InvalidArgument, match="past the end|not satisfiable"):
        c.read_blob_range("ns/end", d, 9000, 2000)
    with pytest.raises(InvalidArgument):
        c.read_blob_range("ns/end", d, 20000, 10)


def test_missing_blob_and_manifest_are_not_found_naming_repo_and_digest(
        registry: Registry, client: Make) -> None:
    c = client(registry.host)
    _, d = blob(100)
    with pytest.raises(NotFound) as ei:
        c.read_blob_range("ns/missing", d, 0, 10)
    assert "ns/missing" in str(ei.value) and d in str(ei.value)
    with pytest.raises(NotFound):
        list(c.get_blob("ns/missing", d))
    with pytest.raises(NotFound):
        c.head_blob("ns/missing", d)
    assert not c.blob_exists("ns/missing", d)
    with pytest.raises(NotFound, match="nope"):
        c.get_manifest("ns/missing", "nope")
    assert c.metrics.retries == 0  # 404 is an answer, not a failure to retry


def test_push_with_wrong_digest_is_digest_mismatch(registry: Registry, client: Make) -> None:
    c = client(registry.host)
    data, _ = blob(1000)
    _, other = blob(1000)
    with pytest.raises(DigestMismatch):
        c.push_blob("ns/bad", data, other)
    assert not c.blob_exists("ns/bad", other)


def test_chunked_upload_from_file_and_file_object(registry: Registry, client: Make,
                                                  tmp_path: Path) -> None:
    c = client(registry.host)
    data, d = blob(3 * 1000 * 1000 + 17)
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert c.push_blob("ns/chunked", p, d, chunk_size=1 << 20) == "uploaded"
    assert c.read_blob_range("ns/chunked", d, 2_999_000, 1017) == data[2_999_000:]
    data2, d2 = blob(200_000)
    f = io.BytesIO(b"prefix" + data2)
    f.seek(6)
    assert c.push_blob("ns/chunked", f, d2) == "uploaded"
    assert b"".join(c.get_blob("ns/chunked", d2)) == data2
    patches = [r for r in registry.requests() if r[0] == "PATCH" and "ns/chunked" in r[1]]
    assert len(patches) == 3


def test_cross_repo_mount(registry: Registry, client: Make) -> None:
    c = client(registry.host)
    data, d = blob(300_000)
    c.push_blob("ns/src", data, d)
    assert c.push_blob("ns/dst", data, d, mount_from="ns/src") == "mounted"
    assert c.head_blob("ns/dst", d).size == len(data)
    _, d2 = blob(10)
    assert c.mount_blob("ns/dst2", d2, "ns/src") is False  # not there: no mount


def test_manifest_put_get_head_by_tag_and_digest(registry: Registry, client: Make) -> None:
    c = client(registry.host)
    layer = blob(4096)
    body = image_manifest(c, "ns/man", [layer])
    digest = c.put_manifest("ns/man", "v1", media.OCI_MANIFEST, body)
    assert digest == compute_digest(body)
    mt, got_digest, data = c.get_manifest("ns/man", "v1")
    assert (mt, got_digest, data) == (media.OCI_MANIFEST, digest, body)
    assert c.get_manifest("ns/man", digest).data == body
    h = c.head_manifest("ns/man", "v1")
    assert (h.digest, h.size, h.media_type) == (digest, len(body), media.OCI_MANIFEST)
    assert c.put_manifest("ns/man", digest, media.OCI_MANIFEST, body) == digest
    assert "v1" in c.list_tags("ns/man")
    with pytest.raises(InvalidArgument):
        c.put_manifest("ns/man", compute_digest(b"other"), media.OCI_MANIFEST, body)


def test_index_round_trip(registry: Registry, client: Make) -> None:
    c = client(registry.host)
    body = image_manifest(c, "ns/idx", [blob(100)])
    md = c.put_manifest("ns/idx", "m", media.OCI_MANIFEST, body)
    index = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": [
        {"mediaType": media.OCI_MANIFEST, "digest": md, "size": len(body),
         "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    c.put_manifest("ns/idx", "multi", media.OCI_INDEX, index)
    m = c.get_manifest("ns/idx", "multi")
    assert m.media_type == media.OCI_INDEX
    assert m.json()["manifests"][0]["digest"] == md
    m = c.get_manifest("ns/idx", "multi", accept=[media.OCI_MANIFEST, media.OCI_INDEX])
    assert m.media_type == media.OCI_INDEX


def test_referrers_fall_back_to_the_tag_schema(registry: Registry, client: Make) -> None:
    # distribution 2.8 has no referrers API: the client maintains the fallback tag.
    c = client(registry.host)
    subject_body = image_manifest(c, "ns/ref", [blob(100)])
    subject = c.put_manifest("ns/ref", "oci", media.OCI_MANIFEST, subject_body)
    assert c.get_referrers("ns/ref", subject)["manifests"] == []
    nydus = image_manifest(c, "ns/ref", [blob(200)], subject={
        "mediaType": media.OCI_MANIFEST, "digest": subject, "size": len(subject_body)},
        artifactType=media.NYDUS_MANIFEST_ARTIFACT,
        annotations={"containerd.io/snapshot/nydus-bootstrap": "true"})
    nd = c.put_manifest("ns/ref", "nydus", media.OCI_MANIFEST, nydus)
    c.put_manifest("ns/ref", "nydus", media.OCI_MANIFEST, nydus)  # no duplicate entry
    refs = c.get_referrers("ns/ref", subject)
    assert [m["digest"] for m in refs["manifests"]] == [nd]
    assert refs["manifests"][0]["artifactType"] == media.NYDUS_MANIFEST_ARTIFACT
    assert refs["manifests"][0]["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
    assert c.get_referrers("ns/ref", subject, artifact_type="other/type")["manifests"] == []
    assert len(c.get_referrers("ns/ref", subject,
                               artifact_type=media.NYDUS_MANIFEST_ARTIFACT)["manifests"]) == 1


def test_get_blob_detects_corrupt_content(registry: Registry, client: Make) -> None:
    c = client(registry.host)
    data, d = blob(50_000)
    c.push_blob("ns/corrupt", data, d)
    # Corrupt the stored blob behind the registry's back.
    [path] = list(registry.storage.rglob(f"blobs/sha256/{d[7:9]}/{d[7:]}/data"))
    path.write_bytes(b"X" + data[1:])
    with pytest.raises(DigestMismatch, match=d):
        list(c.get_blob("ns/corrupt", d))
    assert len(b"".join(c.get_blob("ns/corrupt", d, verify=False))) == len(data)


def test_early_close_of_blob_iterator_releases_the_connection(registry: Registry,
                                                              client: Make) -> None:
    c = client(registry.host)
    data, d = blob(4 << 20)
    c.push_blob("ns/close", data, d)
    it = c.get_blob("ns/close", d, chunk_size=65536)
    assert len(next(it)) > 0
    it.close()  # type: ignore[attr-defined]
    assert c.read_blob_range("ns/close", d, 5, 5) == data[5:10]


def test_backend_config_and_reference_constructors(registry: Registry) -> None:
    data, d = blob(1000)
    with backend_client({
            "scheme": "http", "host": registry.host, "repo": "ns/cfg", "timeout": 3,
            "connect_timeout": 3, "retry_limit": 1, "proxy": {"url": "", "fallback": True},
            "mirrors": []}) as c:
        c.push_blob("ns/cfg", data, d)
        assert c.read_blob_range("ns/cfg", d, 1, 2) == data[1:3]
    with RegistryClient.for_reference(f"{registry.host}/ns/cfg:latest") as c:
        assert c.head_blob("ns/cfg", d).size == 1000  # loopback: http by default
