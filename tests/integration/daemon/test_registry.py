"""pynydusd over a real ``docker-registry``: the same tree as localfs, with and without auth.

Contract: with the registry backend the mount is byte-for-byte the source; data comes
from ranged GETs of ``/v2/<repo>/blobs/sha256:<blob_id>``; with token auth the daemon
answers the registry's Bearer challenge with the configured user:password at the token
server; wrong credentials are EIO on read (never a hang), metadata still works.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.registry.client import RegistryClient
from tests.harness.registry import Registry
from tests.harness.util import make_workdir, remove_tree
from tests.integration.registry.servers import FaultProxy, TokenServer

from .conftest import Image, StartFn, push, registry_config, settled_gets
from .trees import compare_trees

USER, PASSWORD = "alice", "wonderland"
REPO = "daemon/full"


@pytest.fixture(scope="module")
def plain_registry(full_image: Image) -> Iterator[Registry]:
    with Registry() as reg:
        push(reg.host, full_image, REPO)
        yield reg


@pytest.fixture(scope="module")
def token_registry(full_image: Image) -> Iterator[tuple[Registry, TokenServer]]:
    wd = make_workdir("dmntok")
    ts = TokenServer(wd, users={USER: PASSWORD})
    try:
        with Registry(auth_yaml=ts.registry_auth_yaml()) as reg:
            from pynydus.registry.auth import Credentials

            with RegistryClient(reg.host, scheme="http",
                                auth=Credentials(USER, PASSWORD)) as c:
                c.push_blob(REPO, str(full_image.blob_path), f"sha256:{full_image.blob_id}")
            yield reg, ts
    finally:
        ts.stop()
        remove_tree(wd)


def test_full_tree_through_registry_without_auth(full_image: Image, plain_registry: Registry,
                                                 start_daemon: StartFn, workdir: Path) -> None:
    before = plain_registry.blob_gets(f"sha256:{full_image.blob_id}")
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=registry_config(plain_registry.host, REPO, workdir / "cache"))
    assert compare_trees(full_image.src, d.mountpoint) == []
    m = d.backend_metrics()
    gets = settled_gets(plain_registry, f"sha256:{full_image.blob_id}",
                        before + m["read_count"]) - before
    assert m["backend_type"] == "registry"
    assert m["read_errors"] == 0
    assert gets == m["read_count"] > 0
    # every byte fetched at most once: no more than the blob's compressed size
    assert m["read_amount_total"] <= full_image.result.blobs[-1].compressed_size
    assert "HTTP Request" not in d.log_text()  # no line per chunk fetch at --log-level info


def test_redirected_blob_reads_go_to_blob_url_scheme_and_redirected_host(
        full_image: Image, plain_registry: Registry, start_daemon: StartFn,
        workdir: Path) -> None:
    """The registry redirects blob GETs to a storage URL the daemon cannot reach
    (https on a closed port); nydusd's blob_url_scheme and blob_redirected_host rewrite
    it to where the storage really answers (plain http through a proxy we count)."""
    from tests.harness.util import free_port

    storage = FaultProxy(plain_registry.host)
    front = FaultProxy(plain_registry.host, redirect=True,
                       redirect_to=f"https://127.0.0.1:{free_port()}")
    try:
        cfg = registry_config(front.host, REPO, workdir / "cache")
        cfg["device"]["backend"]["config"].update(
            {"blob_url_scheme": "http", "blob_redirected_host": storage.host, "retry_limit": 0})
        d = start_daemon(bootstrap=full_image.bootstrap, config=cfg)
        assert compare_trees(full_image.src, d.mountpoint) == []
        assert front.count("GET", "/blobs/") >= 1
        assert storage.count("GET", "/blobs/") >= 1
        assert d.backend_metrics()["read_errors"] == 0
    finally:
        front.stop()
        storage.stop()


def test_full_tree_through_registry_with_token_auth(
        full_image: Image, token_registry: tuple[Registry, TokenServer],
        start_daemon: StartFn, workdir: Path) -> None:
    reg, ts = token_registry
    issued = ts.issued
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=registry_config(reg.host, REPO, workdir / "cache",
                                            user=USER, password=PASSWORD))
    assert compare_trees(full_image.src, d.mountpoint) == []
    assert ts.issued > issued  # the daemon got its own token ...
    assert ts.issued - issued <= 2  # ... and reused it for every ranged read
    assert ts.requests[-1]["query"]["account"] == [USER]
    assert ts.requests[-1]["query"]["scope"] == [f"repository:{REPO}:pull"]
    statuses = [s for m, p, s in reg.requests() if "/blobs/" in p and m == "GET"]
    assert 206 in statuses


def test_wrong_credentials_are_eio_not_a_hang(
        full_image: Image, token_registry: tuple[Registry, TokenServer],
        start_daemon: StartFn, workdir: Path) -> None:
    reg, _ = token_registry
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=registry_config(reg.host, REPO, workdir / "cache",
                                            user=USER, password="wrong", timeout=3))
    assert (d.mountpoint / "files").is_dir()  # metadata needs no registry
    t0 = time.monotonic()
    with pytest.raises(OSError) as err:
        (d.mountpoint / "files/tiny").read_bytes()
    assert err.value.errno == errno.EIO
    assert time.monotonic() - t0 < 10
    assert d.backend_metrics()["read_errors"] >= 1
    # hot credential refresh (what the snapshotter does when a secret rotates)
    import base64

    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    status, _ = d.api("PUT", "/api/v1/config", {"registry_auth": auth})
    assert status == 204
    assert (d.mountpoint / "files/tiny").read_bytes() == \
        (full_image.src / "files/tiny").read_bytes()


def test_a_bearer_token_is_replaced_at_run_time(
        full_image: Image, token_registry: tuple[Registry, TokenServer],
        start_daemon: StartFn, workdir: Path) -> None:
    """``registry_token`` (a bearer token used as is) through ``PUT /api/v1/config``,
    pynydusd's extension for credential renewal: a daemon whose token the registry
    refuses (expired) reads EIO, and reads again once handed a fresh one. A bad value
    changes nothing."""
    reg, ts = token_registry
    scope = [f"repository:{REPO}:pull"]
    ts.exp_offset = -3600  # expired an hour ago, leeway or not
    try:
        expired = ts.make_jwt(USER, scope)
    finally:
        ts.exp_offset = 0.0
    cfg = registry_config(reg.host, REPO, workdir / "cache", timeout=3)
    cfg["device"]["backend"]["config"]["registry_token"] = expired
    d = start_daemon(bootstrap=full_image.bootstrap, config=cfg)
    with pytest.raises(OSError) as err:
        (d.mountpoint / "files/tiny").read_bytes()
    assert err.value.errno == errno.EIO
    for bad in ({"registry_token": ""}, {"registry_token": 7},
                {"registry_token": "x", "registry_auth": "eDp5"}):
        status, _ = d.api("PUT", "/api/v1/config", bad)
        assert status == 400, bad
    status, _ = d.api("PUT", "/api/v1/config", {"registry_token": ts.make_jwt(USER, scope)})
    assert status == 204
    assert (d.mountpoint / "files/tiny").read_bytes() == \
        (full_image.src / "files/tiny").read_bytes()
