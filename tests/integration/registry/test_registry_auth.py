"""Authentication against a real docker-registry: htpasswd (Basic) and token (Bearer)."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Callable

import pytest

from pynydus.registry import Credentials, RegistryClient, Unauthorized, compute_digest
from pynydus.registry.auth import DockerConfig
from tests.harness.registry import Registry

from .servers import FaultProxy, TokenServer

Make = Callable[..., RegistryClient]
ALICE = Credentials("alice", "wonderland")


def blob(size: int = 10_000) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, compute_digest(data)


# ------------------------------------------------------------------------ htpasswd
def test_basic_auth_push_and_read(htpasswd_registry: Registry, client: Make) -> None:
    c = client(htpasswd_registry.host, auth=ALICE)
    data, d = blob()
    c.push_blob("basic/img", data, d)
    assert c.read_blob_range("basic/img", d, 10, 100) == data[10:110]
    # After the first challenge Basic is sent up front: one 401 in total.
    assert c.metrics.status_counts.get(401) == 1


def test_basic_auth_wrong_password_is_unauthorized(htpasswd_registry: Registry,
                                                   client: Make) -> None:
    c = client(htpasswd_registry.host, auth=Credentials("alice", "wrong"))
    with pytest.raises(Unauthorized) as ei:
        c.head_blob("basic/img", blob()[1])
    code = ei.value.grpc_code
    assert getattr(code, "name", code) == "PERMISSION_DENIED"
    assert c.metrics.retries == 0


def test_basic_auth_without_credentials_is_unauthorized(htpasswd_registry: Registry,
                                                        client: Make) -> None:
    with pytest.raises(Unauthorized, match="no usable credentials"):
        client(htpasswd_registry.host).ping()


def test_nydusd_auth_string_and_docker_config(htpasswd_registry: Registry, client: Make) -> None:
    client(htpasswd_registry.host, auth=ALICE.auth_string()).ping()
    cfg = DockerConfig.parse(json.dumps(
        {"auths": {f"http://{htpasswd_registry.host}": {"auth": ALICE.auth_string()}}}))
    client(htpasswd_registry.host, auth=cfg.lookup(htpasswd_registry.host)).ping()


def test_hot_credential_update(htpasswd_registry: Registry, client: Make) -> None:
    c = client(htpasswd_registry.host, auth=Credentials("alice", "old-password"))
    with pytest.raises(Unauthorized):
        c.ping()
    c.set_credentials(ALICE.auth_string())
    c.ping()


# --------------------------------------------------------------------------- token
def test_token_auth_push_pull_and_token_reuse(token_registry: tuple[Registry, TokenServer],
                                              client: Make) -> None:
    reg, ts = token_registry
    c = client(reg.host, auth=ALICE)
    data, d = blob(200_000)
    assert c.push_blob("tok/img", data, d) == "uploaded"
    for off in range(0, 100_000, 10_000):
        assert c.read_blob_range("tok/img", d, off, 1000) == data[off:off + 1000]
    m = c.metrics.snapshot()
    # one token for pull (HEAD before push), one for pull,push; reads reuse the pull one
    assert m["token_fetches"] == 2
    assert m["status_counts"].get(401) == 1  # type: ignore[attr-defined]
    req = ts.requests[-1]
    assert req["query"]["account"] == ["alice"]
    assert req["query"]["service"] == ["pynydus-test-registry"]


def test_token_auth_wrong_password_is_unauthorized(token_registry: tuple[Registry, TokenServer],
                                                   client: Make) -> None:
    reg, _ = token_registry
    c = client(reg.host, auth=Credentials("alice", "nope"))
    with pytest.raises(Unauthorized, match="token server"):
        c.head_blob("tok/img", blob()[1])


def test_token_auth_anonymous_denied_then_allowed(token_registry: tuple[Registry, TokenServer],
                                                  client: Make) -> None:
    reg, ts = token_registry
    with pytest.raises(Unauthorized):
        client(reg.host).ping()
    ts.allow_anonymous = True
    try:
        data, d = blob()
        client(reg.host, auth=ALICE).push_blob("tok/anon", data, d)
        anon = client(reg.host)
        assert anon.read_blob_range("tok/anon", d, 0, 10) == data[:10]
        assert "authorization" not in {k.lower() for k in ts.requests[-1]} or \
            ts.requests[-1]["authorization"] == ""
    finally:
        ts.allow_anonymous = False


def test_static_registry_token(token_registry: tuple[Registry, TokenServer],
                               client: Make) -> None:
    reg, ts = token_registry
    data, d = blob()
    client(reg.host, auth=ALICE).push_blob("tok/static", data, d)
    jwt = ts.make_jwt("alice", ["repository:tok/static:pull"])
    before = ts.issued
    c = client(reg.host, registry_token=jwt)
    assert c.read_blob_range("tok/static", d, 0, 5) == data[:5]
    assert ts.issued == before and c.metrics.token_fetches == 0
    with pytest.raises(Unauthorized):  # scope not in the token: refused, no fetch
        c.head_blob("tok/other", d)


def test_token_expiry_fetches_a_new_token_before_use(token_registry: tuple[Registry, TokenServer],
                                                     client: Make) -> None:
    reg, ts = token_registry
    data, d = blob()
    client(reg.host, auth=ALICE).push_blob("tok/exp", data, d)
    ts.expires_in = 2
    try:
        c = client(reg.host, auth=ALICE, token_renewal=False)
        c.read_blob_range("tok/exp", d, 0, 1)
        c.read_blob_range("tok/exp", d, 1, 1)
        assert c.metrics.token_fetches == 1
        time.sleep(2.1)
        assert c.read_blob_range("tok/exp", d, 2, 1) == data[2:3]
        assert c.metrics.token_fetches == 2
        assert c.metrics.status_counts.get(401) == 1  # renewed without a new challenge
    finally:
        ts.expires_in = 300


def test_token_rejected_by_registry_is_refreshed_once(token_registry: tuple[Registry, TokenServer],
                                                      client: Make) -> None:
    reg, ts = token_registry
    data, d = blob()
    client(reg.host, auth=ALICE).push_blob("tok/revoked", data, d)
    c = client(reg.host, auth=ALICE)
    ts.exp_offset = -3600  # tokens that claim 300 s but the registry finds expired
    try:
        c.read_blob_range("tok/revoked", d, 0, 1)
    except Unauthorized:
        pass  # both tokens were bad: expected while the server issues bad tokens
    else:
        pytest.fail("a registry-rejected token must not pass")
    ts.exp_offset = 0
    fetches = c.metrics.token_fetches
    # The cached token is bad: the registry says 401, the client drops it, fetches
    # a fresh one and retries once.
    assert c.read_blob_range("tok/revoked", d, 0, 4) == data[:4]
    assert c.metrics.token_fetches == fetches + 1


def test_concurrent_readers_share_one_token_fetch(token_registry: tuple[Registry, TokenServer],
                                                  client: Make) -> None:
    reg, _ = token_registry
    data, d = blob(1 << 20)
    client(reg.host, auth=ALICE).push_blob("tok/conc", data, d)
    c = client(reg.host, auth=ALICE)
    c.ping()  # learn the challenge
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(5):
                off = (i * 5 + j) * 4096
                assert c.read_blob_range("tok/conc", d, off, 4096) == data[off:off + 4096]
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert c.metrics.token_fetches == 2  # one for /v2/ (no scope), one for the repo


def test_bare_401_to_a_token_is_answered_by_asking_for_a_challenge(
        token_registry: tuple[Registry, TokenServer], client: Make,
        fault_proxy: Callable[..., FaultProxy]) -> None:
    # Harbor answers an expired token with 401 and no WWW-Authenticate.
    reg, _ = token_registry
    data, d = blob()
    client(reg.host, auth=ALICE).push_blob("tok/harbor", data, d)
    fp = fault_proxy(reg.host)
    c = client(fp.host, auth=ALICE)
    assert c.read_blob_range("tok/harbor", d, 0, 3) == data[:3]
    fetches = c.metrics.token_fetches
    fp.fail(1, 401)
    assert c.read_blob_range("tok/harbor", d, 3, 3) == data[3:6]
    assert c.metrics.token_fetches == fetches + 1
    assert c.metrics.retries == 0


def test_pull_only_grant_cannot_push(token_registry: tuple[Registry, TokenServer],
                                     client: Make) -> None:
    reg, ts = token_registry
    ts.readonly_users.add("bob")
    try:
        data, d = blob()
        c = client(reg.host, auth=Credentials("bob", "builder"))
        with pytest.raises(Unauthorized):
            c.push_blob("tok/ro", data, d)
        assert c.metrics.retries == 0
        client(reg.host, auth=ALICE).push_blob("tok/ro", data, d)
        assert c.read_blob_range("tok/ro", d, 0, 8) == data[:8]  # pulling is fine
    finally:
        ts.readonly_users.discard("bob")


def test_streamed_upload_refused_by_auth_is_resent_from_the_source(
        token_registry: tuple[Registry, TokenServer], client: Make,
        fault_proxy: Callable[..., FaultProxy]) -> None:
    reg, _ = token_registry
    fp = fault_proxy(reg.host, match="/blobs/uploads/", match_method="PUT")
    c = client(fp.host, auth=ALICE, sleep=lambda _s: None)
    data = os.urandom(300_000)
    d = compute_digest(data)
    fp.fail(1, 401)  # the token "expired" just as the PUT with the file body went out
    assert c.push_blob("tok/stream", io.BytesIO(data), d) == "uploaded"
    assert c.metrics.retries == 1
    assert b"".join(c.get_blob("tok/stream", d)) == data


def test_tokens_in_use_are_renewed_in_the_background(
        token_registry: tuple[Registry, TokenServer], client: Make) -> None:
    """A 4 s token is renewed by the background thread a quarter of its lifetime before
    expiry (at 3 s; the inline refresh margin is 0.4 s). Each step waits for the event it
    checks (a renewal counted) instead of sleeping a fixed time and hoping the renewer
    was on time; only "no renewal" needs time to pass, and then it waits past the
    token's expiry, after which a renewal could no longer help anyone."""
    reg, ts = token_registry
    data, d = blob()
    client(reg.host, auth=ALICE).push_blob("tok/renew", data, d)
    ts.expires_in = 4
    try:
        c = client(reg.host, auth=ALICE)
        t0 = time.monotonic()
        c.read_blob_range("tok/renew", d, 0, 1)
        first = c.metrics.token_fetches
        wait_for(lambda: c.metrics.token_renewals == 1, 30, "the first renewal")
        assert time.monotonic() - t0 >= 2.5  # due at 3 s, not earlier
        assert c.metrics.token_fetches == first + 1  # the renewal, without any read
        assert c.read_blob_range("tok/renew", d, 1, 1) == data[1:2]
        assert c.metrics.token_fetches == first + 1  # the read did not fetch inline
        wait_for(lambda: c.metrics.token_renewals == 2, 30, "the second renewal")
        renewed = time.monotonic()
        # not used since: left to lapse. Wait until that token has expired for certain.
        time.sleep(max(0.0, renewed + 4.2 - time.monotonic()))
        assert c.metrics.token_renewals == 2
        assert c.metrics.token_fetches == first + 2

        def renewers() -> int:
            return sum(1 for t in threading.enumerate()
                       if t.name.startswith("token-renewal") and t.is_alive())
        before = renewers()
        c.close()  # stops and joins its renewer
        assert renewers() == before - 1
    finally:
        ts.expires_in = 300


def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)

