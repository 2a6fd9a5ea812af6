"""Registries with distribution token auth (our JWT token server from the registry
client's tests): credentials from flags and from docker's ``config.json``."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.registry import RegistryClient
from tests.harness import oci
from tests.harness.registry import Registry
from tests.harness.util import make_workdir, remove_tree
from tests.integration.registry.servers import TokenServer

from .conftest import convert_args, layer_blob, push_layers, pynydus

USER, PASSWORD = "alice", "wonderland"


@pytest.fixture(scope="module")
def token_registry() -> Iterator[Registry]:
    wd = make_workdir("cvttok")
    ts = TokenServer(wd, users={USER: PASSWORD})
    try:
        with Registry(auth_yaml=ts.registry_auth_yaml()) as reg:
            yield reg
    finally:
        ts.stop()
        remove_tree(wd)


@pytest.fixture(scope="module")
def private_image(token_registry: Registry) -> str:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with RegistryClient(token_registry.host, scheme="http", auth=auth) as c:
        layers = [layer_blob(oci.Layer("a").file("etc/token", "t\n").file("bin/x", "x" * 9000,
                                                                          0o755), "gzip")]
        push_layers(c, "src/tok", "v1", layers)
    return token_registry.ref("src/tok", "v1")


def test_token_auth_with_flags(token_registry: Registry, private_image: str,
                               cache_dir: str) -> None:
    creds = f"{USER}:{PASSWORD}"
    dst = token_registry.ref("nydus/tok", "v1")
    r = pynydus(*convert_args(private_image, dst, cache_dir, "--source-auth", creds,
                              "--target-auth", creds))
    assert r.rc == 0, r.err
    c = pynydus("check-image", "--source", private_image, "--target", dst,
                "--source-auth", creds, "--target-auth", creds)
    assert c.rc == 0, c.err + c.out
    denied = pynydus(*convert_args(private_image, token_registry.ref("nydus/tok", "v2"),
                                   cache_dir))
    assert denied.rc == 3, denied.err


def test_token_auth_from_docker_config(token_registry: Registry, private_image: str,
                                       cache_dir: str, tmp_path: Path) -> None:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (tmp_path / "config.json").write_text(json.dumps(
        {"auths": {token_registry.host: {"auth": auth}}}))
    dst = token_registry.ref("nydus/tok", "cfg")
    r = subprocess.run([sys.executable, "-m", "pynydus.cli.main",
                        *convert_args(private_image, dst, cache_dir)],
                       capture_output=True, text=True, timeout=600, check=False,
                       env={**os.environ, "DOCKER_CONFIG": str(tmp_path)})
    assert r.returncode == 0, r.stderr
