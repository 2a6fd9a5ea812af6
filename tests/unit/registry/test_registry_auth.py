"""Credentials, WWW-Authenticate challenges and bearer tokens (sans-I/O parts)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from pynydus import labels as L
from pynydus.errors import ConfigError, InvalidArgument
from pynydus.registry.auth import (
    Challenge,
    Credentials,
    DockerConfig,
    Token,
    TokenCache,
    credentials_from_labels,
    docker_config_path,
    load_docker_config,
    merge_scopes,
    parse_challenges,
    parse_token_response,
    pick_challenge,
    repository_scope,
    resolve_credentials,
)
from pynydus.registry.errors import RegistryProtocolError
from pynydus.registry.exechelper import CredentialSourceError


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


# --------------------------------------------------------------------- challenges
def test_bearer_challenge_with_realm_service_scope() -> None:
    [c] = parse_challenges([('Bearer realm="https://auth.docker.io/token",'
                             'service="registry.docker.io",'
                             'scope="repository:samalba/my-app:pull,push"')])
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.service == "registry.docker.io"
    assert c.scope == "repository:samalba/my-app:pull,push"


def test_basic_challenge_and_case_insensitive_names() -> None:
    [c] = parse_challenges(['BASIC Realm="pynydus test"'])
    assert c == Challenge("basic", {"realm": "pynydus test"})


def test_several_challenges_in_one_header_and_across_headers() -> None:
    cs = parse_challenges(['Basic realm="a", Bearer realm="b",service=s', 'Negotiate'])
    assert [c.scheme for c in cs] == ["basic", "bearer", "negotiate"]
    assert cs[1].params == {"realm": "b", "service": "s"}
    assert pick_challenge(cs) is cs[1]
    assert pick_challenge(parse_challenges(["Negotiate"])) is None


def test_quoted_strings_with_escapes_commas_and_spaces() -> None:
    [c] = parse_challenges([(r'Bearer realm="http://h/t?x=1,y=2" , error="invalid_token", '
                             r'error_description="say \"hi\""')])
    assert c.realm == "http://h/t?x=1,y=2"
    assert c.error == "invalid_token"
    assert c.params["error_description"] == 'say "hi"'


def test_garbage_does_not_raise() -> None:
    assert parse_challenges([""]) == []
    assert parse_challenges(["=,,="]) == []
    [c] = parse_challenges(['Bearer realm="unterminated'])
    assert c.realm == "unterminated"


def test_scopes() -> None:
    assert repository_scope("a/b", "pull") == "repository:a/b:pull"
    assert merge_scopes("repository:b:pull repository:a:pull", "", "repository:a:pull") == \
        ("repository:a:pull", "repository:b:pull")


# --------------------------------------------------------------------- credentials
def test_auth_string_round_trip_and_validation() -> None:
    c = Credentials.from_auth_string(b64("user:pa:ss"))
    assert (c.username, c.password) == ("user", "pa:ss")
    assert c.auth_string() == b64("user:pa:ss")
    assert c.basic_header() == "Basic " + b64("user:pa:ss")
    with pytest.raises(InvalidArgument):
        Credentials.from_auth_string(b64("nocolon"))
    with pytest.raises(InvalidArgument):
        Credentials.from_auth_string("%%%")


def test_secrets_are_not_in_repr() -> None:
    c = Credentials("u", "hunter2", registry_token="tok", identity_token="idt")
    assert "hunter2" not in repr(c) and "tok" not in repr(c) and "idt" not in repr(c)


def test_anonymous() -> None:
    assert Credentials().is_anonymous
    assert not Credentials(registry_token="t").is_anonymous
    assert Credentials(username="u").is_anonymous  # no password: nothing to present


def test_labels_need_both_username_and_secret() -> None:
    assert credentials_from_labels({L.PULL_USERNAME: "u", L.PULL_SECRET: "p"}) == \
        Credentials("u", "p")
    assert credentials_from_labels({L.PULL_USERNAME: "u"}) is None
    assert credentials_from_labels({L.PULL_USERNAME: "", L.PULL_SECRET: "p"}) is None


# -------------------------------------------------------------------- docker config
CONFIG = {
    "auths": {
        "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass")},
        "localhost:5000": {"username": "lu", "password": "lp"},
        "http://reg.example.com:8080/v2/": {"auth": b64("eu:ep")},
        "incomplete.example.com": {"username": "only-user"},
        "oauth.example.com": {"auth": b64("ou:"), "identitytoken": "refresh-me"},
        "tok.example.com": {"registrytoken": "static"},
    },
}


def test_docker_config_lookup_normalises_keys() -> None:
    cfg = DockerConfig.parse(json.dumps(CONFIG))
    hub = Credentials("hubuser", "hubpass")
    assert cfg.lookup("docker.io") == hub
    assert cfg.lookup("registry-1.docker.io") == hub
    assert cfg.lookup("index.docker.io") == hub
    assert cfg.lookup("localhost:5000") == Credentials("lu", "lp")
    assert cfg.lookup("reg.example.com:8080") == Credentials("eu", "ep")
    assert cfg.lookup("reg.example.com") is None  # the port is part of the key
    assert cfg.lookup("incomplete.example.com") is None
    assert cfg.lookup("oauth.example.com") == Credentials("ou", identity_token="refresh-me")
    assert cfg.lookup("tok.example.com") == Credentials(registry_token="static")
    assert cfg.lookup("nowhere.example.com") is None


def test_docker_config_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match=str(p)):
        load_docker_config(p)
    p.write_text(json.dumps({"auths": {"h": {"auth": "!!"}}}))
    with pytest.raises(ConfigError, match="h"):
        load_docker_config(p).lookup("h")


def test_missing_docker_config_is_empty(tmp_path: Path) -> None:
    cfg = load_docker_config(tmp_path / "nope.json")
    assert cfg.lookup("docker.io") is None


def test_docker_config_path_honours_env(tmp_path: Path) -> None:
    assert docker_config_path({"DOCKER_CONFIG": "/x"}) == Path("/x/config.json")
    assert docker_config_path({"HOME": "/home/u"}) == Path("/home/u/.docker/config.json")


def test_resolve_prefers_labels_then_docker_config(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    labels = {L.PULL_USERNAME: "lab", L.PULL_SECRET: "el"}
    assert resolve_credentials("localhost:5000", labels=labels) == Credentials("lab", "el")
    assert resolve_credentials("localhost:5000", labels={}) == Credentials("lu", "lp")
    assert resolve_credentials("other:1") is None


def test_credential_helpers_run_per_host_and_as_store(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    helper = tmp_path / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nread server\n'
                      'case "$server" in\n'
                      '  helped.example.com) echo \'{"Username":"hu","Secret":"hs"}\';;\n'
                      '  https://index.docker.io/v1/) echo \'{"Username":"<token>",'
                      '"Secret":"idt"}\';;\n'
                      '  *) echo "credentials not found" >&2; exit 1;;\n'
                      'esac\n')
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cfg = DockerConfig.parse(json.dumps({"credHelpers": {"helped.example.com": "fake"},
                                         "auths": {"plain.example.com": {"auth": b64("a:b")}},
                                         "credsStore": "fake"}))
    assert cfg.lookup("helped.example.com") == Credentials("hu", "hs")
    assert cfg.lookup("docker.io") == Credentials(identity_token="idt")
    assert cfg.lookup("plain.example.com") == Credentials("a", "b")  # auths before store
    assert cfg.lookup("unknown.example.com") is None
    assert cfg.lookup("helped.example.com", run_helpers=False) is None
    # a helper that is not there is an error naming it, not "no credentials"
    missing = DockerConfig.parse(json.dumps({"credsStore": "does-not-exist"}))
    with pytest.raises(CredentialSourceError, match="docker-credential-does-not-exist"):
        missing.lookup("x.io")


# -------------------------------------------------------------------------- tokens
def test_token_response_token_or_access_token_and_default_lifetime() -> None:
    t = parse_token_response(b'{"token": "abc"}', now=1000.0)
    assert (t.token, t.expires_at, t.lifetime) == ("abc", 1060.0, 60.0)
    t = parse_token_response(b'{"access_token": "x", "expires_in": 300, '
                             b'"refresh_token": "r"}', now=0.0)
    assert (t.token, t.expires_at, t.refresh_token) == ("x", 300.0, "r")


def test_token_expiry_counts_from_plausible_issued_at() -> None:
    # issued 100 s ago by the server's clock: expires 200 s from now
    now = 1_700_000_100.0
    body = json.dumps({"token": "t", "expires_in": 300,
                       "issued_at": "2023-11-14T22:13:20.123456789Z"}).encode()
    assert parse_token_response(body, now).expires_at == pytest.approx(1_700_000_300.0)
    # issued "in the future" (clock skew): count from now
    assert parse_token_response(body, 1_699_999_000.0).expires_at == 1_699_999_300.0
    # so old it would be dead on arrival: clock skew again, count from now
    assert parse_token_response(body, 1_800_000_000.0).expires_at == 1_800_000_300.0
    bad = json.dumps({"token": "t", "expires_in": 300, "issued_at": "yesterday"}).encode()
    assert parse_token_response(bad, 5.0).expires_at == 305.0


@pytest.mark.parametrize("body", [b"", b"[]", b"{}", b'{"token": ""}', b"<html>"])
def test_token_response_without_token_is_protocol_error(body: bytes) -> None:
    with pytest.raises(RegistryProtocolError):
        parse_token_response(body, 0.0)


def test_token_freshness_margin() -> None:
    t = Token("t", expires_at=1000.0, lifetime=300.0)
    assert t.fresh(969.0) and not t.fresh(971.0)   # 30 s margin
    short = Token("t", expires_at=100.0, lifetime=60.0)
    assert short.fresh(93.0) and not short.fresh(95.0)   # a tenth of 60 s


def test_token_cache_expiry_invalidate_and_clear() -> None:
    now = [0.0]
    cache = TokenCache(clock=lambda: now[0])
    key = ("realm", "svc", ("repository:a:pull",))
    cache.put(key, Token("one", expires_at=100.0, lifetime=100.0))
    assert cache.get(key) is not None and cache.get(key).token == "one"  # type: ignore[union-attr]
    now[0] = 95.0
    assert cache.get(key) is None            # inside the refresh margin
    now[0] = 0.0
    cache.invalidate(key, "other")           # someone else's token: keep ours
    assert cache.get(key) is not None
    cache.invalidate(key, "one")
    assert cache.get(key) is None
    cache.put(key, Token("two", expires_at=100.0, lifetime=100.0))
    cache.clear()
    assert len(cache) == 0
    assert cache.fetch_lock(key) is cache.fetch_lock(key)
