"""Fixtures: a real Debian ``docker-registry`` on 127.0.0.1, plain or with auth.

``registry``          module-scoped registry without auth (private storage)
``htpasswd_registry`` registry with htpasswd (bcrypt) basic auth; user ``alice``/``wonderland``
``token_registry``    (registry, TokenServer): distribution token auth against our own
                      JWT token server; users ``alice``/``wonderland``, ``bob``/``builder``
``fault_proxy``       factory: FaultProxy(upstream) in front of a registry
``client``            factory: RegistryClient with short timeouts, closed at teardown
``make_registry``     factory for tests that stop their registry on purpose
``backend_client``    (function) the client pynydusd makes of a registry backend config

Every server is stopped (by our own PID / our own thread) in teardown, and its
work directory removed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pynydus.daemon.config import parse_daemon_config
from pynydus.daemon.registry_backend import client_from_config
from pynydus.registry import RegistryClient
from tests.harness import tools
from tests.harness.registry import REGISTRY_BIN, Registry
from tests.harness.util import make_workdir, remove_tree

from .servers import FaultProxy, TokenServer

USERS = {"alice": "wonderland", "bob": "builder"}


def backend_client(backend_config: dict[str, Any]) -> RegistryClient:
    """The client pynydusd builds from nydusd's registry backend config (v1's
    ``device.backend.config``), through the daemon's own parser."""
    text = json.dumps({"device": {"backend": {"type": "registry", "config": backend_config},
                                  "cache": {"type": "blobcache"}}})
    cfg, warnings = parse_daemon_config(text)
    assert warnings == []
    return client_from_config(cfg.backend.registry)



@pytest.fixture(scope="session", autouse=True)
def _tools_present() -> None:
    tools.require(REGISTRY_BIN, "htpasswd")


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for distribution's htpasswd file, from whatever is available:
    the ``bcrypt`` package, libxcrypt through ``crypt`` (Python < 3.13), or
    ``htpasswd`` from apache2-utils."""
    try:
        import bcrypt  # type: ignore[import-not-found]
        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode())
    except ImportError:
        pass
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # type: ignore[import-not-found,unused-ignore]
        h = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 4))
        if h and h.startswith("$2"):
            return str(h)
    except (ImportError, AttributeError, OSError):
        pass
    if shutil.which("htpasswd"):
        out = subprocess.run(["htpasswd", "-nbBC", "4", "x", password], check=True,
                             capture_output=True, text=True).stdout
        return out.strip().split(":", 1)[1]
    tools.require("htpasswd")  # fails naming it
    raise AssertionError("unreachable: htpasswd is present")


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with Registry() as reg:
        yield reg


@pytest.fixture(scope="module")
def htpasswd_registry() -> Iterator[Registry]:
    wd = make_workdir("regauth")
    try:
        pw = wd / "htpasswd"
        pw.write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in USERS.items()))
        with Registry(htpasswd=pw) as reg:
            yield reg
    finally:
        remove_tree(wd)


@pytest.fixture(scope="module")
def token_registry() -> Iterator[tuple[Registry, TokenServer]]:
    wd = make_workdir("regtok")
    ts = TokenServer(wd, users=dict(USERS))
    try:
        with Registry(auth_yaml=ts.registry_auth_yaml()) as reg:
            yield reg, ts
    finally:
        ts.stop()
        remove_tree(wd)


@pytest.fixture
def make_registry() -> Iterator[Callable[..., Registry]]:
    made: list[Registry] = []

    def make(**kw: Any) -> Registry:
        reg = Registry(**kw)
        made.append(reg)
        return reg.__enter__()
    yield make
    for reg in made:
        reg.stop()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    made: list[FaultProxy] = []

    def make(upstream: str, **kw: Any) -> FaultProxy:
        fp = FaultProxy(upstream, **kw)
        made.append(fp)
        return fp
    yield make
    for fp in made:
        fp.stop()


@pytest.fixture
def client() -> Iterator[Callable[..., RegistryClient]]:
    made: list[RegistryClient] = []

    def make(host: str, **kw: Any) -> RegistryClient:
        kw.setdefault("scheme", "http")
        kw.setdefault("timeout", 5.0)
        kw.setdefault("connect_timeout", 2.0)
        kw.setdefault("retry_limit", 3)
        c = RegistryClient(host, **kw)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()
