"""Fixtures: a real ``pynydus snapshotter`` per test, a client, and real mounts.

``snapshotter``      a started SnapshotterProcess (private root ≤ 70 bytes under /tmp/pn-*)
``sn``               its SnapshotterClient (prepare/view/mounts/commit/remove/stat/update/
                     list/usage/cleanup; protobufs out, grpc.RpcError through)
``start_snapshotter`` factory for tests that need a config file, other flags or a
                     process that is expected to fail at start-up
``mounter``          mounts what the snapshotter answered with mount(2); unmounts at teardown

Teardown always runs: SIGTERM to our PID, wait, SIGKILL fallback; unmount everything below
the private directories (read from /proc/self/mountinfo); remove them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from pynydus.api import mount_pb2

from .support import (
    SnapshotterClient,
    SnapshotterProcess,
    make_base,
    mount_all,
    teardown_base,
    unmount,
    unmount_below,
)

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything here mounts: mark it, and skip cleanly when we are not root.
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.root)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="needs root: performs mount(2)"))


StartFn = Callable[..., SnapshotterProcess]


@pytest.fixture
def start_snapshotter() -> Iterator[StartFn]:
    """``start(config_text=None, extra_args=(), umask=0o022, wait=True, tmpfs=False,
    as_module=False)``.

    With ``wait=False`` the process is only spawned (for start-up failure tests); with
    ``tmpfs=True`` its directory is a fresh tmpfs (for tests that make many files)."""
    started: list[SnapshotterProcess] = []

    def start(
        config_text: str | None = None,
        extra_args: Sequence[str] = (),
        umask: int = 0o022,
        wait: bool = True,
        tmpfs: bool = False,
        as_module: bool = False,
    ) -> SnapshotterProcess:
        base = make_base()
        if tmpfs:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=512m,mode=0700", "tmpfs", str(base)],
                check=True,
            )
        proc = SnapshotterProcess(
            base=base, extra_args=list(extra_args), umask=umask, as_module=as_module
        )
        started.append(proc)
        if config_text is not None:
            proc.config = base / "config.toml"
            proc.config.write_text(config_text)
        if wait:
            proc.start()
        else:
            proc.spawn()
        return proc

    yield start
    for proc in started:
        teardown_base(proc.base, [proc])


@pytest.fixture
def snapshotter(start_snapshotter: StartFn) -> SnapshotterProcess:
    return start_snapshotter()


@pytest.fixture
def sn(snapshotter: SnapshotterProcess) -> SnapshotterClient:
    assert snapshotter.client is not None
    return snapshotter.client


class Mounter:
    """Mount targets under a private directory; everything is unmounted at teardown."""

    def __init__(self) -> None:
        self.base = make_base()
        self._n = 0

    def target(self, name: str | None = None) -> Path:
        self._n += 1
        t = self.base / (name or f"m{self._n}")
        t.mkdir(parents=True, exist_ok=True)
        return t

    def mount(self, mounts: Sequence[mount_pb2.Mount], name: str | None = None) -> Path:
        t = self.target(name)
        mount_all(mounts, t)
        return t

    def unmount(self, target: Path) -> None:
        unmount(target)

    def close(self) -> None:
        unmount_below(self.base)
        teardown_base(self.base)


@pytest.fixture
def mounter() -> Iterator[Mounter]:
    m = Mounter()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A plain directory (the "flat" reference tree of the checkers)."""
    base = make_base()
    try:
        yield base
    finally:
        teardown_base(base)
