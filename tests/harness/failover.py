"""What failover tests and the failover benchmark do to a snapshotter's daemons.

Shared by ``tests/integration/nydus/test_nydus_failover.py`` (container rootfs mounted by
hand), ``tests/e2e/test_failover_e2e.py`` (a container under containerd) and
``bench/failover_bench.py``: reading the snapshotter's view of its daemons (spare
waiting, takeovers logged, each takeover's timeline), and the events a daemon goes
through (another build to upgrade to, its memory cgroup's OOM killer, the system
socket's upgrade call).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .snapshotter import Snapshotter
from .util import wait_until

TAKEN_OVER = " taken over by pid "
_TIMELINE = re.compile(r"daemon (\S+) takeover timeline \(CLOCK_MONOTONIC\): (.*)$")


def log_text(snap: Snapshotter) -> str:
    return snap.log.read_text(errors="replace")


def takeovers(snap: Snapshotter) -> int:
    """Takeovers the snapshotter logged so far (its whole log, restarts included)."""
    return log_text(snap).count(TAKEN_OVER)


def wait_taken_over(snap: Snapshotter, before: int, n: int = 1, timeout: float = 60) -> None:
    wait_until(lambda: takeovers(snap) >= before + n, timeout,
               f"{n} takeover(s) in the snapshotter log")


def kill_image_daemon(snap: Snapshotter, kill: Callable[[int], None] | None = None) -> int:
    """With a spare waiting, end the image's one daemon (``kill(pid)``; SIGKILL by default)
    and wait until the snapshotter has taken it over; the dead daemon's pid."""
    wait_spare(snap)
    (pid,) = snap.image_daemon_pids()
    before = takeovers(snap)
    if kill is None:
        os.kill(pid, signal.SIGKILL)
    else:
        kill(pid)
    wait_taken_over(snap, before)
    return pid


def timelines(snap: Snapshotter) -> list[dict[str, float]]:
    """Each logged takeover's steps, CLOCK_MONOTONIC (``time.monotonic()`` here): noticed,
    successor, request, state_received, restored, resent, serving, recorded."""
    out = []
    for line in log_text(snap).splitlines():
        m = _TIMELINE.search(line)
        if m:
            out.append({k: float(v) for k, v in (kv.split("=", 1) for kv in m.group(2).split())})
    return out


def spare_waiting(snap: Snapshotter) -> bool:
    """A spare daemon (a successor started in advance) answers in INIT."""
    from pynydus.manager.client import DaemonClient

    for r in snap.daemon_records():
        if r["mode"] == "spare" and r.get("pid") and os.path.exists(r["api_socket"]):
            try:
                return DaemonClient(r["api_socket"], timeout=2).state() == "INIT"
            except Exception:  # noqa: BLE001 - still starting
                return False
    return False


def wait_spare(snap: Snapshotter, timeout: float = 90) -> None:
    wait_until(lambda: spare_waiting(snap), timeout, "a spare daemon waiting in INIT")


def spare_pids(snap: Snapshotter) -> list[int]:
    return [r["pid"] for r in snap.daemon_records() if r["mode"] == "spare" and r.get("pid")]


def other_build(directory: Path, name: str, patch: str = "") -> str:
    """Another "build" of pynydusd: a launcher with its own name that marks its processes
    with ``PYNYDUS_BUILD=<name>`` in their environment; ``patch`` (Python) runs before
    main() in successors (started with --upgrade) only."""
    path = directory / name
    code = ("import sys\n"
            f"if '--upgrade' in sys.argv:\n    {patch or 'pass'}\n"
            "from pynydus.daemon.main import main\nsys.exit(main())\n")
    (directory / f"{name}.py").write_text(code)
    path.write_text(f"#!/bin/sh\nPYNYDUS_BUILD={name} exec {sys.executable} "
                    f"{directory / f'{name}.py'} \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def runs_build(pid: int, name: str) -> bool:
    return f"PYNYDUS_BUILD={name}".encode() in Path(f"/proc/{pid}/environ").read_bytes()


def put_json(sock: Path, path: str, body: object) -> tuple[int, dict[str, Any]]:
    """``PUT path`` with a JSON body on a unix socket (the system controller's)."""
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


# --- the daemons' memory cgroup and its OOM killer ---------------------------------------

MEMORY = Path("/sys/fs/cgroup/memory")
CGROUP_CONFIG = '[cgroup]\nenable = true\nmemory_limit = "1GiB"\n'  # the snapshotter's

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


class DaemonCgroup:
    """The memory cgroup the snapshotter puts its daemons in (``CGROUP_CONFIG``; cgroup
    v1, ``system.slice/nydusd``); removed at ``cleanup`` with the slice if we made it."""

    def __init__(self) -> None:
        if not MEMORY.is_dir():
            raise AssertionError("no cgroup v1 memory controller on this host "
                                 "(extend the failover harness for v2)")
        self.slice_existed = (MEMORY / "system.slice").exists()
        self.path = MEMORY / "system.slice" / "nydusd"

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def oom_kill(self, pid: int) -> None:
        """Have the cgroup's OOM killer kill daemon ``pid``: it is made the preferred
        victim (oom_score_adj 1000), the limit is set just above the usage and a memory
        hog in the same cgroup allocates until the first OOM kill. Asserts that the
        daemon went (the hog may be a second victim: an allocation under way when the
        daemon dies can run the cgroup out again before its memory is freed)."""
        Path(f"/proc/{pid}/oom_score_adj").write_text("1000")
        kills = self.oom_kills()
        usage = int((self.path / "memory.usage_in_bytes").read_text())
        limit = self.path / "memory.limit_in_bytes"
        old = limit.read_text().strip()
        limit.write_text(str(usage + (64 << 20)))
        try:
            hog = subprocess.run([sys.executable, "-c", _HOG, str(self.path), str(pid)],
                                 timeout=120, check=False)
        finally:
            limit.write_text(old)
        assert hog.returncode in (0, -signal.SIGKILL), hog.returncode
        assert self.oom_kills() > kills, "the daemon was not killed by the OOM killer"
        # killed: it may take a moment to exit on a loaded machine (every thread must run)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}/stat") or zombie(pid), 30,
                   f"OOM-killed daemon {pid} to exit")

    def cleanup(self) -> None:
        for d in [self.path] + ([] if self.slice_existed else [MEMORY / "system.slice"]):
            try:
                d.rmdir()
            except OSError:
                pass


def zombie(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line[stat_line.rindex(")") + 2] == "Z"
