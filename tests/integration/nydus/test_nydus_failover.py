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
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from pynydus.host.mount import unmount_all
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


def _log(snap: Snapshotter) -> str:
    return snap.log.read_text(errors="replace")


def _takeovers(snap: Snapshotter) -> int:
    return _log(snap).count(" taken over by pid ")


def _wait_taken_over(snap: Snapshotter, before: int, n: int = 1, timeout: float = 60) -> None:
    wait_until(lambda: _takeovers(snap) >= before + n, timeout,
               f"{n} takeover(s) in the snapshotter log")


def _wait_spare(snap: Snapshotter, timeout: float = 60) -> None:
    wait_until(lambda: any(r["mode"] == "spare" and r.get("pid") for r in snap.daemon_records())
               and "spare" in _log(snap), timeout, "a spare daemon")
    wait_until(lambda: _spare_waiting(snap), timeout, "the spare in INIT")


def _spare_waiting(snap: Snapshotter) -> bool:
    from pynydus.manager.client import DaemonClient

    for r in snap.daemon_records():
        if r["mode"] == "spare" and os.path.exists(r["api_socket"]):
            try:
                return DaemonClient(r["api_socket"], timeout=2).state() == "INIT"
            except Exception:  # noqa: BLE001 - still starting
                return False
    return False


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
            _wait_spare(snap)
            (pid,) = snap.image_daemon_pids()
            before = _takeovers(snap)
            os.kill(pid, signal.SIGKILL)
            _wait_taken_over(snap, before)
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
            _wait_spare(snap)
            pids = snap.image_daemon_pids()
            if mode == "shared":
                spare = [r["pid"] for r in snap.daemon_records() if r["mode"] == "spare"]
                victims = pids + spare
            else:
                victims = pids
            assert len(victims) == 2, (pids, snap.daemon_records())
            before = _takeovers(snap)
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            _wait_taken_over(snap, before, n=len(pids))
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
            _wait_spare(snap)
            (pid,) = snap.image_daemon_pids()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: "handed to pid" in _log(snap), 30, "the hand-over")
            snap.kill9()
            snap.env = None
            snap.start()
            c.reader.wait_passes(2, timeout=60)
            assert "took over but was not started; starting it" in _log(snap)
            assert c.reader.errors == []
            # and the new snapshotter supervises it: another death is taken over too
            _wait_spare(snap)
            (pid2,) = snap.image_daemon_pids()
            before = _takeovers(snap)
            os.kill(pid2, signal.SIGKILL)
            _wait_taken_over(snap, before)
            c.reader.wait_passes(2)
            assert c.reader.errors == []
    finally:
        snap.close()


def _build(tmp_path: Path, name: str, patch: str = "") -> str:
    """Another "build" of pynydusd: a launcher with its own name; ``patch`` (Python) runs
    before main() in successors (started with --upgrade) only."""
    path = tmp_path / name
    code = ("import sys\n"
            f"if '--upgrade' in sys.argv:\n    {patch or 'pass'}\n"
            "from pynydus.daemon.main import main\nsys.exit(main())\n")
    (tmp_path / f"{name}.py").write_text(code)
    path.write_text(f"#!/bin/sh\nPYNYDUS_BUILD={name} exec {sys.executable} "
                    f"{tmp_path / f'{name}.py'} \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def test_hot_upgrade_to_another_build(mode: str, image: dict, tmp_path: Path) -> None:
    """PUT /api/v1/daemons/upgrade on the system socket, with another build's path."""
    new = _build(tmp_path, "pynydusd-next")
    system = tmp_path / "system.sock"
    with Snapshotter(config=_config(tmp_path, mode, system=system)) as snap:
        top = pull_nydus_image(snap, image)
        with Container(snap, image, top, "default/3/c1", tmp_path / "rootfs") as c:
            old = snap.image_daemon_pids()
            status, body = _put(system, "/api/v1/daemons/upgrade", {"nydusd_path": new})
            assert status == 200, body
            assert sorted(body["upgraded"]) == sorted(
                r["id"] for r in snap.daemon_records() if r["pid"] in snap.image_daemon_pids())
            c.reader.wait_passes(2)
            now = snap.image_daemon_pids()
            assert now and not set(now) & set(old)
            assert all(b"PYNYDUS_BUILD=pynydusd-next" in _environ(p) for p in now)
            assert c.reader.errors == []
        assert "upgraded: pid" in _log(snap)
        print(f"longest pause of the reader over the upgrade: {c.reader.max_gap():.3f} s")


def _put(sock: Path, path: str, body: object) -> tuple[int, dict]:
    import http.client
    import json
    import socket

    conn = http.client.HTTPConnection("localhost", timeout=120)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.settimeout(120)
    conn.sock.connect(str(sock))
    try:
        conn.request("PUT", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


@pytest.mark.parametrize("damage", ["corrupt", "version"])
def test_unusable_state_falls_back_to_restart(image: dict, tmp_path: Path, damage: str) -> None:
    patch = {"corrupt": "import pynydus.daemon.takeover as t; "
                        "t.DaemonState.decode = classmethod(lambda cls, b, _d=t.DaemonState.decode: "
                        "_d(b[:-1] + bytes([b[-1] ^ 1])))",
             "version": "import pynydus.daemon.takeover as t; t.VERSION = t.VERSION + 1"}[damage]
    build = _build(tmp_path, f"pynydusd-{damage}", patch)
    config = _config(tmp_path, "dedicated", f'nydusd_path = "{build}"\n')
    with Snapshotter(config=config) as snap:
        top = pull_nydus_image(snap, image)
        rootfs = tmp_path / "rootfs"
        container_rootfs(snap, top, "default/3/c1", rootfs)
        try:
            _wait_spare(snap)
            (pid,) = snap.image_daemon_pids()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: "falling back to restart" in _log(snap), 60, "the fall-back")
            line = next(ln for ln in _log(snap).splitlines() if "falling back to restart" in ln)
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


_HOG = """
import os, sys, time
cg, victim = sys.argv[1], int(sys.argv[2])
with open(os.path.join(cg, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds no memory
    except FileNotFoundError:
        return False
def oom_kills():
    with open(os.path.join(cg, "memory.oom_control")) as f:
        return int(next(ln for ln in f if ln.startswith("oom_kill ")).split()[1])
# stop at the first OOM kill: allocating on while the victim exits makes the cgroup run
# out again, and the next victim is the hog itself
kills = oom_kills()
hog = []
while alive(victim) and oom_kills() == kills and len(hog) < 4096:
    hog.append(bytearray(os.urandom(1 << 20)))
    time.sleep(0.002)
"""


def test_daemon_oom_killed_by_its_cgroup_is_taken_over(image: dict, tmp_path: Path) -> None:
    """The daemons' memory cgroup runs out; the kernel's OOM killer picks the serving
    daemon (its oom_score_adj of 1000 makes it the victim over the memory hog that, in the
    same cgroup, makes the cgroup run out)."""
    import subprocess

    memory = Path("/sys/fs/cgroup/memory")
    if not memory.is_dir():
        pytest.fail("no cgroup v1 memory controller on this host (extend the test for v2)")
    slice_existed = (memory / "system.slice").exists()
    cg = memory / "system.slice" / "nydusd"
    config = _config(tmp_path, "dedicated")
    config.write_text(config.read_text().replace(
        "[daemon]", '[cgroup]\nenable = true\nmemory_limit = "1GiB"\n[daemon]'))
    snap = Snapshotter(config=config)
    snap.start()
    try:
        top = pull_nydus_image(snap, image)
        with Container(snap, image, top, "default/3/c1", tmp_path / "rootfs") as c:
            _wait_spare(snap)
            (pid,) = snap.image_daemon_pids()
            Path(f"/proc/{pid}/oom_score_adj").write_text("1000")
            kills = _oom_kills(cg)
            usage = int((cg / "memory.usage_in_bytes").read_text())
            (cg / "memory.limit_in_bytes").write_text(str(usage + (64 << 20)))
            before = _takeovers(snap)
            hog = subprocess.run([sys.executable, "-c", _HOG, str(cg), str(pid)], timeout=120,
                                 check=False)
            (cg / "memory.limit_in_bytes").write_text(str(1 << 30))
            # the hog may be a second victim: an allocation already under way when the
            # daemon is killed can run the cgroup out again before the daemon's memory
            # is freed; what matters is that the daemon went first (asserted below)
            assert hog.returncode in (0, -signal.SIGKILL), hog.returncode
            assert not os.path.exists(f"/proc/{pid}/stat") or _zombie(pid)
            assert _oom_kills(cg) > kills, "the daemon was not killed by the OOM killer"
            _wait_taken_over(snap, before)
            c.reader.wait_passes(2)
            assert c.reader.errors == []
        print(f"longest pause of the reader over the OOM kill: {c.reader.max_gap():.3f} s")
    finally:
        snap.close()
        for d in [cg] + ([] if slice_existed else [memory / "system.slice"]):
            try:
                d.rmdir()
            except OSError:
                pass


def _oom_kills(cg: Path) -> int:
    for line in (cg / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def _zombie(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line[stat_line.rindex(")") + 2] == "Z"
