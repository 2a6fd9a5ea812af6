"""Image references normalise the way docker and containerd do."""

from __future__ import annotations

import pytest

from pynydus.errors import InvalidArgument
from pynydus.registry.reference import (
    Reference,
    api_host,
    is_loopback_host,
    parse_reference,
    validate_digest,
)

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, domain, path, tag, digest", [
    ("alpine", "docker.io", "library/alpine", "latest", None),
    ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
    ("library/alpine", "docker.io", "library/alpine", "latest", None),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
    ("index.docker.io/alpine", "docker.io", "library/alpine", "latest", None),
    ("registry-1.docker.io/foo/bar:1", "docker.io", "foo/bar", "1", None),
    ("foo/bar", "docker.io", "foo/bar", "latest", None),
    ("foo/bar/baz", "docker.io", "foo/bar/baz", "latest", None),
    ("localhost/foo", "localhost", "foo", "latest", None),
    ("localhost:5000/foo:v1", "localhost:5000", "foo", "v1", None),
    ("127.0.0.1:5000/ns/img:tag", "127.0.0.1:5000", "ns/img", "tag", None),
    ("ghcr.io/dragonflyoss/nydus", "ghcr.io", "dragonflyoss/nydus", "latest", None),
    (f"ghcr.io/a/b@{D}", "ghcr.io", "a/b", None, D),
    (f"ghcr.io/a/b:v2@{D}", "ghcr.io", "a/b", "v2", D),
    ("[::1]:5000/a:b", "[::1]:5000", "a", "b", None),
    ("Host/a", "Host", "a", "latest", None),  # upper case first component is a host
    ("a.b-c/d__e/f-g.h_i:T_1.0-x", "a.b-c", "d__e/f-g.h_i", "T_1.0-x", None),
])
def test_parse_normalises_like_docker(text: str, domain: str, path: str, tag: str | None,
                                      digest: str | None) -> None:
    r = parse_reference(text)
    assert (r.domain, r.path, r.tag, r.digest) == (domain, path, tag, digest)


@pytest.mark.parametrize("text", [
    "", " alpine", "Alpine", "foo/Bar", "foo:bad tag", "foo@sha256:xyz", "foo@sha256:" + "AB" * 32,
    "host:5000/", "/foo", "foo//bar", "foo/bar:", "a:" + "x" * 129, "foo/-bar", "ho_st:5/x",
    "foo@" + D + "@" + D,
])
def test_malformed_references_are_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(text)


def test_api_host_of_docker_hub_is_registry_1() -> None:
    assert parse_reference("alpine").api_host == "registry-1.docker.io"
    assert api_host("index.docker.io") == "registry-1.docker.io"
    assert parse_reference("localhost:5000/x").api_host == "localhost:5000"


def test_object_prefers_digest_over_tag() -> None:
    assert parse_reference(f"a.io/b:t@{D}").object == D
    assert parse_reference("a.io/b:t").object == "t"
    assert parse_reference("a.io/b", default_tag=False).object == "latest"
    assert parse_reference("a.io/b", default_tag=False).tag is None


def test_str_and_familiar_forms() -> None:
    r = parse_reference("alpine:3")
    assert str(r) == "docker.io/library/alpine:3"
    assert r.familiar() == "alpine:3"
    assert parse_reference("foo/bar").familiar() == "foo/bar:latest"
    assert parse_reference("localhost:5000/x@" + D).familiar() == "localhost:5000/x@" + D
    assert str(parse_reference(str(r))) == str(r)  # round trip


def test_default_scheme_is_http_only_for_loopback() -> None:
    assert parse_reference("localhost:5000/x").default_scheme == "http"
    assert parse_reference("127.0.0.1:5000/x").default_scheme == "http"
    assert parse_reference("127.1.2.3/x").default_scheme == "http"
    assert parse_reference("[::1]:5000/x").default_scheme == "http"
    assert parse_reference("ghcr.io/x").default_scheme == "https"
    assert parse_reference("10.0.0.1:5000/x").default_scheme == "https"
    assert is_loopback_host("localhost")
    assert not is_loopback_host("localhost.example.com")


def test_with_digest_and_tag_validate() -> None:
    r = Reference("a.io", "b")
    assert r.with_digest(D).digest == D
    with pytest.raises(InvalidArgument):
        r.with_digest("sha256:short")
    with pytest.raises(InvalidArgument):
        r.with_tag("bad tag")


def test_validate_digest_accepts_other_algorithms() -> None:
    assert validate_digest("sha512:" + "0" * 128)
    with pytest.raises(InvalidArgument):
        validate_digest("sha256" + "0" * 64)
