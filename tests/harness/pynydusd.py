"""``pynydusd`` as a subprocess: the real console script, driven like nydus-snapshotter does.

``Pynydusd(workdir, mountpoint=..., bootstrap=..., config={...})`` writes the config as
JSON, starts ``pynydusd --mountpoint M [--bootstrap B --config C] --apisock S`` with the
harness's ``Proc`` (own session, PID recorded, stopped by PID only) and, on ``start()``,
waits until the API reports ``RUNNING`` and the FUSE mount is in mountinfo.

``stop()`` sends SIGTERM, waits, SIGKILLs if needed and then makes sure nothing is left
mounted at the mountpoint (``umount``, lazily as a last resort): a test that fails half
way must not leave a dead FUSE mount behind. ``kill9()`` simulates a crash and leaves the
stale mount for the next daemon to clean.

``api(method, path, body)`` speaks HTTP/1.1 over the unix socket and returns
``(status, decoded JSON | bytes | None)``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

from .util import HarnessError, Proc, Service, wait_until

PYNYDUSD = str(Path(sys.executable).with_name("pynydusd"))


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def api_call(sock: str | Path, method: str, path: str, body: Any = None,
             timeout: float = 10.0) -> tuple[int, Any]:
    """One request to a daemon's API socket: (status, JSON / bytes / None for empty)."""
    conn = _UnixHTTPConnection(str(sock), timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type") or ""
        if not raw:
            return resp.status, None
        if "json" in ctype:
            return resp.status, json.loads(raw)
        return resp.status, raw
    finally:
        conn.close()


def fuse_mounted(path: str | Path) -> bool:
    """True if ``path`` is a FUSE mountpoint (alive or dead) in our mount namespace."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            mp = parts[4].replace("\\040", " ")
            if mp == target and parts[sep + 1].startswith("fuse"):
                return True
    return False


def abort_fuse_under(path: str | Path) -> list[str]:
    """Abort the FUSE connection of every mount at or below ``path`` (fusectl's ``abort``):
    whoever waits on one gets ENOTCONN. For tests whose connections a supervisor, or a
    successor, keeps alive: a plain unmount of such a mount would wait for an answer
    (umount(8) asks statfs) that nobody is left to give. Returns the mountpoints."""
    conns = "/sys/fs/fuse/connections"
    if not os.path.ismount(conns):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", conns], check=False,
                       capture_output=True)
    base = os.path.realpath(path).rstrip("/")
    done = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            mp = parts[4].replace("\\040", " ")
            if parts[sep + 1].startswith("fuse") and (mp == base or mp.startswith(base + "/")):
                minor = parts[2].split(":")[1]
                try:
                    with open(f"{conns}/{minor}/abort", "w") as ctl:
                        ctl.write("1")
                    done.append(mp)
                except OSError:
                    pass
    return done


def force_unmount(path: str | Path) -> None:
    """Unmount ``path`` until nothing is mounted there (lazy as a last resort)."""
    for _ in range(5):
        if not fuse_mounted(path):
            return
        r = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


class Pynydusd(Service):
    """One ``pynydusd`` process. Context manager; ``stop()`` is idempotent."""

    def __init__(self, workdir: Path, *, name: str = "pynydusd", mountpoint: Path | None = None,
                 bootstrap: Path | str | None = None, config: dict[str, Any] | None = None,
                 config_text: str | None = None, extra_args: tuple[str, ...] = (),
                 log_level: str = "info", apisock: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.name = name
        self.mountpoint = mountpoint or workdir / f"{name}.mnt"
        self.apisock = apisock or workdir / f"{name}.sock"
        self.log = workdir / f"{name}.log"
        self.bootstrap = bootstrap
        self.config_path: Path | None = None
        if config is not None or config_text is not None:
            self.config_path = workdir / f"{name}.json"
            self.config_path.write_text(config_text if config_text is not None
                                        else json.dumps(config))
        argv = [PYNYDUSD, "--mountpoint", str(self.mountpoint), "--apisock", str(self.apisock),
                "--log-level", log_level]
        if bootstrap is not None:
            argv += ["--bootstrap", str(bootstrap)]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        argv += list(extra_args)
        self.proc = Proc(name, argv, workdir, self.log, env=env)
        self.started_at = 0.0
        self.ready_seconds = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, wait: bool = True, timeout: float = 30.0) -> Self:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        self.proc.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def _ready(self) -> bool:
        if not self.proc.running():
            raise HarnessError(f"{self.name} exited with {self.proc.returncode()}:\n"
                               f"{self.proc.log_tail()}")
        if not self.apisock.exists() or not fuse_mounted(self.mountpoint):
            return False
        status, info = api_call(self.apisock, "GET", "/api/v1/daemon", timeout=2)
        return status == 200 and info.get("state") == "RUNNING"

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(self._ready, timeout, f"{self.name} RUNNING at {self.mountpoint}",
                   interval=0.01)
        self.ready_seconds = time.monotonic() - self.started_at

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc.popen is not None
        return self.proc.popen.wait(timeout)

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10.0
            ) -> tuple[int, Any]:
        return api_call(self.apisock, method, path, body, timeout)

    def get(self, path: str) -> Any:
        status, body = self.api("GET", path)
        if status != 200:
            raise HarnessError(f"GET {path}: HTTP {status}: {body!r}")
        return body

    def backend_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = self.get("/api/v1/metrics/backend")
        return out

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise HarnessError(f"no VmRSS for pid {self.pid}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (SIGKILL after ``timeout``), then make sure the mount is gone."""
        rc = self.proc.stop(timeout)
        force_unmount(self.mountpoint)
        return rc

    def kill9(self) -> None:
        """Crash the daemon: SIGKILL, no clean-up (the FUSE mount stays, dead)."""
        self.proc.kill9()

