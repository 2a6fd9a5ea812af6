"""recover_policy = "failover" through the snapshotter: a daemon dies, readers never notice.

Contract (docs/failover.md): with ``recover_policy = "failover"`` the snapshotter's
supervisor holds every daemon's FUSE connection; when a daemon dies (SIGKILL, its
cgroup's OOM killer) a successor takes the connection over, so a container reading its
image files (here: a container rootfs, overlayfs over the daemon's mount, read again and
again by ``ReadLoop``) sees no error and no wrong bytes, only a pause (measured). This
holds in both daemon modes, for two daemons dying at once, for a snapshotter restarted
in the middle of a takeover (the new one finishes it), and for a hot upgrade
(``upgrade_daemons``) to another build. A successor that cannot use the state (corrupt,
another version) makes the manager fall back to a restart with a log line saying so; the
old mount then fails (ENOTCONN), it never hangs.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from pynydus.host.mount import unmount_all
from tests.harness.failover import (
    CGROUP_CONFIG,
    DaemonCgroup,
    kill_image_daemon,
    log_text,
    other_build,
    put_json,
    runs_build,
    spare_pids,
    takeovers,
    wait_spare,
    wait_taken_over,
)
from tests.harness.readloop import ReadLoop, digests
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import wait_until

from .support import container_rootfs, pull_nydus_image

pytestmark = [pytest.mark.root]

PAUSE_LIMIT = 15.0  # seconds: the failure is a hang; bench/failover_bench.py measures the figure


def _config(tmp_path: Path, mode: str, extra: str = "", system: Path | None = None) -> Path:
    config = tmp_path / "config.toml"
    text = f'version = 1\ndaemon_mode = "{mode}"\n'
    if system is not None:
        text += f'[system]\nenable = true\naddress = "{system}"\n'
    config.write_text(text + f'[daemon]\nrecover_policy = "failover"\n{extra}')
    return config


@pytest.fixture(params=["dedicated", "shared"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Container:
    """A container's rootfs over the image (overlayfs on the daemon's mount), read in a loop."""

    def __init__(self, snap: Snapshotter, image: dict, top: str, key: str, path: Path) -> None:
        self.path = path
        container_rootfs(snap, top, key, path)
        self.reader = ReadLoop(path, digests(image["src"]))

    def __enter__(self) -> Self:
        self.reader.__enter__()
        self.reader.wait_passes(2)
        return self

    def __exit__(self, *exc: object) -> None:
        self.reader.stop()
        unmount_all(str(self.path))


@pytest.fixture
def failover_snap(mode: str, tmp_path: Path) -> Iterator[Snapshotter]:
    s = Snapshotter(config=_config(tmp_path, mode))
    s.start()
    try:
        yield s
    finally:
        s.close()


def test_kill9_of_a_serving_daemon_is_invisible(failover_snap: Snapshotter, image: dict,
                                                tmp_path: Path) -> None:
    snap = failover_snap
    top = pull_nydus_image(snap, image)
    with Container(snap, image, top, "default/3/c1", tmp_path / "rootfs") as c:
        for round_ in range(3):
            pid = kill_image_daemon(snap)
            c.reader.wait_passes(2)
            assert snap.image_daemon_pids() != [pid], round_
        assert c.reader.errors == []
        assert c.reader.max_gap() < PAUSE_LIMIT, c.reader.max_gap()
    print(f"longest pause of the reader over 3 takeovers: {c.reader.max_gap():.3f} s")
    # the image still mounts for a new container, through the successor
    with Container(snap, image, top, "default/4/c2", tmp_path / "rootfs2") as c2:
        pass
    assert c2.reader.errors == []


def test_two_daemons_dying_at_once(mode: str, image: dict, tmp_path: Path) -> None:
    """Dedicated: two images' daemons; shared: the shared daemon and the spare waiting to
    succeed it, so that the successor must be started on the spot."""
    with Snapshotter(config=_config(tmp_path, mode)) as snap:
        top = pull_nydus_image(snap, image)
        top2 = pull_nydus_image(snap, image, ns="other") if mode == "dedicated" else top
        with Container(snap, image, top, "default/3/c1", tmp_path / "r1") as c1, \
                Container(snap, image, top2, "other/3/c2", tmp_path / "r2") as c2:
            wait_spare(snap)
            pids = snap.image_daemon_pids()
            if mode == "shared":
                victims = pids + spare_pids(snap)
            else:
                victims = pids
            assert len(victims) == 2, (pids, snap.daemon_records())
            before = takeovers(snap)
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            wait_taken_over(snap, before, n=len(pids))
            c1.reader.wait_passes(2)
            c2.reader.wait_passes(2)
            assert c1.reader.errors == [] and c2.reader.errors == []
        print(f"longest pauses: {c1.reader.max_gap():.3f} s, {c2.reader.max_gap():.3f} s")


def test_snapshotter_killed_in_the_middle_of_a_takeover(mode: str, image: dict,
                                                        tmp_path: Path) -> None:
    """The successor has the connection (READY) when the snapshotter dies; the next
    snapshotter finds it and starts it."""
    snap = Snapshotter(config=_config(tmp_path, mode),
                       env={"PYNYDUS_TEST_TAKEOVER_PAUSE": "3"})
    snap.start()
    try:
        top = pull_nydus_image(snap, image)
        with Container(snap, image, top, "default/3/c1", tmp_path / "rootfs") as c:
            wait_spare(snap)
            (pid,) = snap.image_daemon_pids()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: "handed to pid" in log_text(snap), 30, "the hand-over")
            snap.kill9()
            snap.env = None
            snap.start()
            c.reader.wait_passes(2, timeout=60)
            assert "took over but was not started; starting it" in log_text(snap)
            assert c.reader.errors == []
            # and the new snapshotter supervises it: another death is taken over too
            kill_image_daemon(snap)
            c.reader.wait_passes(2)
            assert c.reader.errors == []
    finally:
        snap.close()


def test_hot_upgrade_to_another_build(mode: str, image: dict, tmp_path: Path) -> None:
    """PUT /api/v1/daemons/upgrade on the system socket, with another build's path."""
    new = other_build(tmp_path, "pynydusd-next")
    system = tmp_path / "system.sock"
    with Snapshotter(config=_config(tmp_path, mode, system=system)) as snap:
        top = pull_nydus_image(snap, image)
        with Container(snap, image, top, "default/3/c1", tmp_path / "rootfs") as c:
            old = snap.image_daemon_pids()
            status, body = put_json(system, "/api/v1/daemons/upgrade", {"nydusd_path": new})
            assert status == 200, body
            records = snap.daemon_records()
            serving = {r["id"] for r in records if r["pid"] in snap.image_daemon_pids()}
            standby = {r["id"] for r in records if r["mode"] == "standby"}
            # every daemon serving an image, and the standby daemon if it was up (the next
            # image is mounted into it: it must run the new build too)
            assert serving <= set(body["upgraded"]) <= serving | standby, body
            c.reader.wait_passes(2)
            now = snap.image_daemon_pids()
            assert now and not set(now) & set(old)
            assert all(runs_build(p, "pynydusd-next") for p in now)
            assert c.reader.errors == []
        assert "upgraded: pid" in log_text(snap)
        print(f"longest pause of the reader over the upgrade: {c.reader.max_gap():.3f} s")


@pytest.mark.parametrize("damage", ["corrupt", "version"])
def test_unusable_state_falls_back_to_restart(image: dict, tmp_path: Path, damage: str) -> None:
    patch = {"corrupt": "import pynydus.daemon.takeover as t; "
                        "t.DaemonState.decode = classmethod(lambda cls, b, _d=t.DaemonState.decode: "
                        "_d(b[:-1] + bytes([b[-1] ^ 1])))",
             "version": "import pynydus.daemon.takeover as t; t.VERSION = t.VERSION + 1"}[damage]
    build = other_build(tmp_path, f"pynydusd-{damage}", patch)
    config = _config(tmp_path, "dedicated", f'nydusd_path = "{build}"\n')
    with Snapshotter(config=config) as snap:
        top = pull_nydus_image(snap, image)
        rootfs = tmp_path / "rootfs"
        container_rootfs(snap, top, "default/3/c1", rootfs)
        try:
            wait_spare(snap)
            (pid,) = snap.image_daemon_pids()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: "falling back to restart" in log_text(snap), 60, "the fall-back")
            line = next(ln for ln in log_text(snap).splitlines() if "falling back to restart" in ln)
            assert "takeover state refused" in line
            assert {"corrupt": "checksum", "version": "state version"}[damage] in line
            wait_until(lambda: bool(snap.image_daemon_pids())
                       and snap.image_daemon_pids() != [pid], 60, "the restarted daemon")
            t0 = time.monotonic()
            with pytest.raises(OSError):  # the old mount fails, at once: no hang
                (rootfs / "data/small.txt").read_text()
            assert time.monotonic() - t0 < 5
        finally:
            unmount_all(str(rootfs))
        with Container(snap, image, top, "default/4/c2", tmp_path / "rootfs2") as c2:
            pass
        assert c2.reader.errors == []


def test_daemon_oom_killed_by_its_cgroup_is_taken_over(image: dict, tmp_path: Path) -> None:
    """The daemons' memory cgroup runs out; the kernel's OOM killer picks the serving
    daemon (its oom_score_adj of 1000 makes it the victim over the memory hog that, in the
    same cgroup, makes the cgroup run out)."""
    cgroup = DaemonCgroup()
    config = _config(tmp_path, "dedicated")
    config.write_text(config.read_text().replace("[daemon]", CGROUP_CONFIG + "[daemon]"))
    snap = Snapshotter(config=config)
    snap.start()
    try:
        top = pull_nydus_image(snap, image)
        with Container(snap, image, top, "default/3/c1", tmp_path / "rootfs") as c:
            kill_image_daemon(snap, cgroup.oom_kill)
            c.reader.wait_passes(2)
            assert c.reader.errors == []
        print(f"longest pause of the reader over the OOM kill: {c.reader.max_gap():.3f} s")
    finally:
        snap.close()
        cgroup.cleanup()
