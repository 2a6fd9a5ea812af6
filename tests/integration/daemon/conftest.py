"""Fixtures for pynydusd integration tests: real images, real FUSE mounts, real daemons.

``workdir``        private ``/var/tmp/pyn-dmn-XXXX`` removed (after unmounting) at teardown
``start_daemon``   factory: ``start_daemon(bootstrap=..., config=..., wait=True, ...)`` starts
                   the real ``pynydusd`` CLI; every daemon is stopped by PID and its mount
                   removed at teardown, whatever the test did
``full_image``     (session) the all-entry-types tree of ``trees.py`` built with lz4_block
``localfs_config`` nydusd JSON v1 config for a localfs backend and a blob cache dir
``registry_config`` the same for a registry backend
``push``           upload an image's blob with our registry client
``settled_gets``   the registry access log's blob GET count, once it caught up

Everything here mounts, so every test is marked ``root`` and skipped when not root.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pynydus.rafs.builder import BuildResult, build
from pynydus.registry.client import RegistryClient
from tests.harness.pynydusd import Pynydusd, force_unmount
from tests.harness.registry import Registry
from tests.harness.util import make_workdir, remove_tree, stop_recorded

from .trees import make_full_tree

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.root)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="needs root: FUSE mounts"))


@dataclass
class Image:
    src: Path
    bootstrap: Path
    blob_dir: Path
    result: BuildResult

    @property
    def blob_id(self) -> str:
        return self.result.blob_ids[-1]

    @property
    def blob_path(self) -> Path:
        return self.blob_dir / self.blob_id


def build_image(src: Path, out: Path, **kw: Any) -> Image:
    """Build ``src`` into ``out/image.boot`` + ``out/blobs/<sha256>``."""
    (out / "blobs").mkdir(parents=True, exist_ok=True)
    boot = out / "image.boot"
    kw.setdefault("compressor", "lz4_block")
    res = build(str(src), str(boot), str(out / "blobs"), **kw)
    return Image(src, boot, out / "blobs", res)


def push(host: str, image: Image, repo: str, **auth: str) -> None:
    with RegistryClient(host, scheme="http", **auth) as c:  # type: ignore[arg-type]
        c.push_blob(repo, str(image.blob_path), f"sha256:{image.blob_id}")


def settled_gets(reg: Registry, digest: str, expect: int, timeout: float = 5.0) -> int:
    """The registry's count of blob GETs once it reaches ``expect`` (or after ``timeout``):
    distribution writes its access-log line after the response went out, so the client
    may have its bytes a moment before the log shows the request."""
    deadline = time.monotonic() + timeout
    while True:
        n = reg.blob_gets(digest)
        if n >= expect or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def localfs_config(blob_dir: Path, cache_dir: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                   "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}}},
        "mode": "direct", "enable_xattr": True,
    }
    cfg.update(extra)
    return cfg


def registry_config(host: str, repo: str, cache_dir: Path, *, user: str | None = None,
                    password: str | None = None, timeout: int = 5, retry_limit: int = 2,
                    validate: bool = False, **extra: Any) -> dict[str, Any]:
    backend: dict[str, Any] = {"scheme": "http", "host": host, "repo": repo, "timeout": timeout,
                               "connect_timeout": timeout, "retry_limit": retry_limit}
    if user is not None:
        backend["auth"] = base64.b64encode(f"{user}:{password}".encode()).decode()
    cfg: dict[str, Any] = {
        "device": {"backend": {"type": "registry", "config": backend},
                   "cache": {"type": "blobcache", "validate": validate,
                             "config": {"work_dir": str(cache_dir)}}},
        "mode": "direct", "enable_xattr": True,
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = make_workdir("dmn")
    try:
        yield d
    finally:
        stop_recorded(d)
        remove_tree(d)


StartFn = Callable[..., Pynydusd]


@pytest.fixture
def start_daemon(workdir: Path) -> Iterator[StartFn]:
    """``start_daemon(name="d", bootstrap=None, config=None, wait=True, **kw)``."""
    started: list[Pynydusd] = []
    names: dict[str, int] = {}

    def start(name: str = "d", *, wait: bool = True, timeout: float = 30.0,
              **kw: Any) -> Pynydusd:
        n = names.get(name, 0)
        names[name] = n + 1
        d = Pynydusd(workdir, name=f"{name}{n}" if n else name, **kw)
        started.append(d)
        d.start(wait=wait, timeout=timeout)
        return d

    try:
        yield start
    finally:
        for d in reversed(started):
            d.stop()
            force_unmount(d.mountpoint)


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    d = make_workdir("dmns")
    try:
        yield d
    finally:
        stop_recorded(d)
        remove_tree(d)


@pytest.fixture(scope="session")
def full_image(session_dir: Path) -> Image:
    src = session_dir / "full-src"
    make_full_tree(src)
    return build_image(src, session_dir / "full")


BIG_FILES = 190  # 190 MiB of incompressible 1 MiB files + one 8 MiB file ≈ 200 MB
TARGET = "apps/target.bin"  # the 1 MiB file the laziness tests read


@pytest.fixture(scope="session")
def big_image(session_dir: Path) -> Image:
    """≈200 MB image of incompressible files (so compressed bytes = file bytes): the
    laziness tests read one 1 MiB file of it and count what was fetched."""
    src = session_dir / "big-src"
    for d in ("data", "apps"):
        (src / d).mkdir(parents=True)
    os.chmod(src, 0o755)
    for i in range(BIG_FILES):
        (src / "data" / f"f{i:03d}").write_bytes(os.urandom(1 << 20))
    (src / TARGET).write_bytes(os.urandom(1 << 20))
    (src / "apps/large.bin").write_bytes(os.urandom(8 << 20))
    return build_image(src, session_dir / "big")
