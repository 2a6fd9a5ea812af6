"""Fixtures of the compatibility matrix (upstream Nydus as a live oracle).

``workdir``   private ``/var/tmp/pyn-compat-XXXX``, unmounted and removed at teardown
``rich_src``  (session) the rich tree nydus-image 2.2 can build (see trees.py)
``serve``     factory: ``serve("pynydusd" | "nydusd", bootstrap, blob_dir)`` mounts the
              image with that daemon (FUSE, localfs backend, blob cache) and returns the
              mountpoint; every daemon is stopped by PID and unmounted at teardown

Every cell mounts (FUSE) and runs upstream's binaries, so it needs root; a missing
upstream binary is a failure naming ``scripts/peers.sh``, never a skip.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.pynydusd import Pynydusd, force_unmount
from tests.harness.util import make_workdir, remove_tree, stop_recorded

from .trees import rich_tree
from .upstream import Nydusd, localfs_config

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.root)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="needs root: FUSE mounts"))


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = make_workdir("compat")
    try:
        yield d
    finally:
        stop_recorded(d)
        remove_tree(d)


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    d = make_workdir("compats")
    try:
        yield d
    finally:
        stop_recorded(d)
        remove_tree(d)


@pytest.fixture(scope="session")
def rich_src(session_dir: Path) -> Path:
    return rich_tree(session_dir / "rich")


ServeFn = Callable[..., Path]


@pytest.fixture
def serve(workdir: Path) -> Iterator[ServeFn]:
    started: list[Any] = []

    def start(daemon: str, bootstrap: Path, blob_dir: Path, *, name: str = "") -> Path:
        name = name or f"{daemon}{len(started)}"
        d: Pynydusd | Nydusd
        if daemon == "pynydusd":
            d = Pynydusd(workdir, name=name, bootstrap=bootstrap,
                         config=localfs_config(blob_dir, workdir / f"{name}.cache"))
        elif daemon == "nydusd":
            d = Nydusd(workdir, name=name, bootstrap=bootstrap, blob_dir=blob_dir)
        else:
            raise ValueError(daemon)
        started.append(d)
        d.start()
        return d.mountpoint

    try:
        yield start
    finally:
        for d in reversed(started):
            d.stop()
            force_unmount(d.mountpoint)
