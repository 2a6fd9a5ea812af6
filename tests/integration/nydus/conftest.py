"""Fixtures for the Nydus path through the snapshotter (see ``support.py`` for the calls).

``image``  (session) a Nydus image built by our builder from a small tree, its data blob
           pushed to a real docker-registry: ``src``, ``boot``, ``blob_ids``, ``ref``,
           ``registry``, ``big_sha``
``snap``   a started snapshotter process in daemon mode ``dedicated`` and ``shared``
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.rafs.builder import build
from pynydus.registry.client import RegistryClient
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter

from .support import REPO, snapshotter_in_mode


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A Nydus image: source tree, bootstrap, and its blob pushed to a registry."""
    work = tmp_path_factory.mktemp("nyimg")
    src = work / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/hello.txt").write_text("hello from a lazily pulled image\n")
    (src / "data").mkdir()
    big = os.urandom(3 << 20)
    (src / "data/big.bin").write_bytes(big)
    (src / "data/small.txt").write_text("small\n")
    os.symlink("../etc/hello.txt", src / "data/link")
    blobs = work / "blobs"
    boot = work / "image.boot"
    result = build(str(src), str(boot), str(blobs), compressor="lz4_block")
    with Registry() as reg:
        with RegistryClient(reg.host, scheme="http") as client:
            for b in result.blobs:
                client.push_blob(REPO, Path(b.path), "sha256:" + b.blob_id)
        yield {"src": src, "boot": boot, "blob_ids": [b.blob_id for b in result.blobs],
               "blobs": [Path(b.path) for b in result.blobs],
               "ref": f"{reg.host}/{REPO}:latest", "registry": reg,
               "big_sha": hashlib.sha256(big).hexdigest()}


@pytest.fixture(params=["dedicated", "shared"])
def snap(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Snapshotter]:
    yield from snapshotter_in_mode(tmp_path, request.param)
