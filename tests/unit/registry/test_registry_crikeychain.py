"""The CRI keychain: the credentials of a PullImage request, read from its protobuf bytes."""

from __future__ import annotations

import base64

import pytest

from pynydus.errors import InvalidArgument
from pynydus.registry.credentials import Credentials
from pynydus.registry.crikeychain import CriKeychain, parse_pull_request
from pynydus.registry.reference import parse_reference
from tests.harness.criapi import cri_pb2


def pull(image: str, **auth: str) -> bytes:
    req = cri_pb2.PullImageRequest(
        image=cri_pb2.ImageSpec(image=image, annotations={"a": "b"}),
        auth=cri_pb2.AuthConfig(**auth) if auth else None,
        sandbox_config=cri_pb2.PodSandboxConfig(
            metadata=cri_pb2.PodSandboxMetadata(name="p", uid="u", namespace="n", attempt=3)))
    return req.SerializeToString()


@pytest.mark.parametrize("auth, creds", [
    ({"username": "u", "password": "p"}, Credentials("u", "p")),
    ({"auth": base64.b64encode(b"u:p:x").decode()}, Credentials("u", "p:x")),
    ({"registry_token": "tok"}, Credentials(registry_token="tok")),
    ({"identity_token": "idt"}, Credentials(identity_token="idt")),
    ({"server_address": "r.io"}, None),
    ({}, None),
])
def test_pull_request_credentials(auth: dict, creds: Credentials | None) -> None:
    got = parse_pull_request(pull("r.io/app:1", **auth))
    assert (got.image, got.credentials) == ("r.io/app:1", creds)


@pytest.mark.parametrize("data, message", [
    (b"\x0a\x05ab", "runs past the message"),
    (b"\x0a", "truncated varint"),
    (b"\x0b", "unsupported wire type"),
    (b"\x12\x02\x1a\x05", "runs past"),
])
def test_malformed_requests_are_invalid(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_pull_request(data)


def test_bad_auth_field_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="base64"):
        parse_pull_request(pull("r.io/app:1", auth="!!"))


def test_found_by_reference_then_repository_and_kept_over_anonymous_pulls() -> None:
    kc = CriKeychain()
    assert kc.record_pull(pull("r.io/app:1", username="u", password="p")) == "r.io/app:1"
    kc.record_pull(pull("r.io/app:1"))  # anonymous: forgets nothing
    found = kc.find(parse_reference("r.io/app:1"), {})
    assert found is not None and found.credentials == Credentials("u", "p")
    assert "CRI keychain" in found.source and "p" not in found.source.replace("app", "")
    by_digest = kc.find(parse_reference("r.io/app@sha256:" + "a" * 64), {})
    assert by_digest is not None and by_digest.credentials == Credentials("u", "p")
    assert kc.find(parse_reference("r.io/other:1"), {}) is None
    assert kc.find(parse_reference("q.io/app:1"), {}) is None
    # docker.io names are normalised on both sides
    kc.record_pull(pull("busybox", username="h", password="q"))
    found = kc.find(parse_reference("docker.io/library/busybox:latest"), {})
    assert found is not None and found.credentials == Credentials("h", "q")


def test_newest_pull_wins_and_entries_are_bounded() -> None:
    kc = CriKeychain(max_entries=4)
    kc.record_pull(pull("r.io/app:1", username="u", password="old"))
    kc.record_pull(pull("r.io/app:2", username="u", password="new"))
    found = kc.find(parse_reference("r.io/app:3"), {})
    assert found is not None and found.credentials.password == "new"
    for i in range(5):
        kc.record_pull(pull(f"r.io/x{i}:1", username="u", password="p"))
    assert len(kc._by_key) == 4
    assert kc.find(parse_reference("r.io/app:1"), {}) is None
