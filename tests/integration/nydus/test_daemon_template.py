"""Dedicated mode forks its daemons from the template (``pynydusd template``).

A forked daemon must behave as a spawned one across what the snapshotter does to its
daemons: adopted after a snapshotter restart (graceful or kill -9), stopped at removal;
a template that died leaves the snapshotter spawning daemons itself, with a log line.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.api import snapshots_pb2 as pb
from pynydus.host.mount import unmount_all
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import wait_until

from .support import container_rootfs, pull_nydus_image, snapshotter_in_mode

pytestmark = [pytest.mark.root]


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


@pytest.fixture
def dedicated(tmp_path: Path) -> Iterator[Snapshotter]:
    yield from snapshotter_in_mode(tmp_path, "dedicated")


def _dead(pid: int) -> bool:
    """``pid`` has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _template(snap: Snapshotter) -> int:
    wait_until(lambda: len(snap.template_pids()) == 1, 30, "one daemon template")
    (pid,) = snap.template_pids()
    return pid


@pytest.mark.parametrize("how", ["graceful", "kill9"])
def test_forked_daemon_is_adopted_after_a_snapshotter_restart(
        dedicated: Snapshotter, image: dict, tmp_path: Path, how: str) -> None:
    snap = dedicated
    template = _template(snap)
    top = pull_nydus_image(snap, image)
    rootfs = tmp_path / "rootfs"
    container_rootfs(snap, top, "default/3/c1", rootfs)
    try:
        (daemon,) = snap.image_daemon_pids()
        assert _ppid(daemon) == template  # forked, not spawned by the snapshotter
        records = {r["id"]: r["pid"] for r in snap.daemon_records()}
        if how == "kill9":
            snap.kill9()
            snap.start()
            # a template left by a killed snapshotter runs our code: adopted
            assert _template(snap) == template
        else:
            snap.restart()
            # stopped with the snapshotter (its daemons run on), a new one started
            assert _template(snap) != template
            wait_until(lambda: not Path(f"/proc/{template}").exists(), 15, "the old template")
        assert snap.image_daemon_pids() == [daemon]
        after = {r["id"]: r["pid"] for r in snap.daemon_records()}
        assert {k: v for k, v in after.items() if v == daemon} == \
            {k: v for k, v in records.items() if v == daemon}
        assert f"(pid {daemon}) is alive; reconnected" in snap.log.read_text()
        assert hashlib.sha256((rootfs / "data/big.bin").read_bytes()).hexdigest() == \
            image["big_sha"]
        # a second container of the image is served by the adopted daemon
        rootfs2 = tmp_path / "rootfs2"
        container_rootfs(snap, top, "default/4/c2", rootfs2)
        try:
            assert (rootfs2 / "etc/hello.txt").read_text() == "hello from a lazily pulled image\n"
        finally:
            unmount_all(str(rootfs2))
    finally:
        unmount_all(str(rootfs))
    # the adopted daemon is stopped at removal like any other
    stub = snap.stub()
    for key in ("default/4/c2", "default/3/c1", top, "default/sha256:blobchain"):
        stub.Remove(pb.RemoveSnapshotRequest(key=key))
    stub.Cleanup(pb.CleanupRequest())
    wait_until(lambda: not Path(f"/proc/{daemon}").exists(), 20, "the image's daemon to exit")
    assert snap.image_daemon_pids() == []


def test_a_dead_template_falls_back_to_spawning(dedicated: Snapshotter, image: dict,
                                                tmp_path: Path) -> None:
    snap = dedicated
    template = _template(snap)
    os.kill(template, signal.SIGKILL)
    wait_until(lambda: _dead(template), 30, "the killed template to exit")
    # the standby forked before the kill serves this image; its replacement must be
    # spawned, and so must the next image's daemon
    top = pull_nydus_image(snap, image)
    rootfs = tmp_path / "rootfs"
    container_rootfs(snap, top, "default/3/c1", rootfs)
    try:
        assert (rootfs / "etc/hello.txt").read_text() == "hello from a lazily pulled image\n"
        wait_until(lambda: "spawning daemons directly" in snap.log.read_text(), 30,
                   "the fall-back log line")
        wait_until(lambda: bool([p for p in snap.daemon_pids() if _ppid(p) == snap.pid]), 30,
                   "a daemon spawned by the snapshotter itself")
        top2 = pull_nydus_image(snap, image, "other")
        rootfs2 = tmp_path / "rootfs2"
        container_rootfs(snap, top2, "other/3/c1", rootfs2)
        try:
            assert (rootfs2 / "data/small.txt").read_text() == "small\n"
        finally:
            unmount_all(str(rootfs2))
        assert len(snap.image_daemon_pids()) == 2
    finally:
        unmount_all(str(rootfs))
