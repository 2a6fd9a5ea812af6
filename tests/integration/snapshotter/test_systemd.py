"""The snapshotter under systemd: the shipped unit (``misc/systemd``) and the readiness
protocol it relies on (``Type=notify``).

There is no systemd running here, so the unit is checked with ``systemd-analyze verify``
and its ``ExecStart`` command is run the way systemd runs it: ``$NOTIFY_SOCKET`` names a
datagram socket the test listens on; READY=1 must come once the snapshotter answers,
STOPPING=1 at SIGTERM (all ``KillMode=process`` sends), and the exit must be clean.
"""

from __future__ import annotations

import configparser
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pynydus.host import systemd
from tests.harness.snapshotter import Snapshotter
from tests.harness.tools import require

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[3]
UNIT = REPO / "misc" / "systemd" / "pynydus-snapshotter.service"
PYNYDUS = Path(sys.executable).parent / "pynydus"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """With ExecStart pointed at this checkout's pynydus (verify checks the program)."""
    require("systemd-analyze")
    text = UNIT.read_text().replace("/usr/local/bin/pynydus", str(PYNYDUS))
    local = tmp_path / UNIT.name
    local.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_unit_keeps_daemons_alive_across_restarts() -> None:
    service = unit()["Service"]
    assert service["KillMode"] == "process", "a restart must not kill the pynydusd daemons"
    assert service["Type"] == "notify"
    assert service["Restart"] == "always"
    assert unit()["Unit"]["Before"] == "containerd.service"
    argv = shlex.split(service["ExecStart"])
    assert argv[:2] == ["/usr/local/bin/pynydus", "snapshotter"] and "--config" in argv


def test_notify_without_a_socket_sends_nothing() -> None:
    assert systemd.notify("READY=1", env={}) is False
    assert systemd.notify_address({"NOTIFY_SOCKET": "@abstract"}) == b"\0abstract"


def _receive(sock: socket.socket, timeout: float) -> dict[str, str]:
    sock.settimeout(timeout)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)


def test_ready_when_serving_and_stopping_at_sigterm(tmp_path: Path) -> None:
    """The unit's ExecStart (binary and config path this checkout's) under a fake
    service manager: READY=1 names the main PID and arrives once List answers;
    SIGTERM to the main PID alone gives STOPPING=1 and exit status 0."""
    listen = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(listen))
    argv = shlex.split(unit()["Service"]["ExecStart"])
    config = tmp_path / "config.toml"
    snap = Snapshotter(config=config, env={"NOTIFY_SOCKET": str(listen)})
    config.write_text(f'version = 1\nroot = "{snap.root}"\naddress = "{snap.socket}"\n')
    assert argv[argv.index("--config") + 1] == "/etc/nydus/config.toml"
    try:
        snap.start()  # returns once a List call on the socket answers
        ready = _receive(sock, 30)
        assert ready.get("READY") == "1", ready
        assert ready.get("MAINPID") == str(snap.pid)
        assert str(snap.socket) in ready.get("STATUS", "")
        assert snap.list_names() == []
        os.kill(snap.pid, signal.SIGTERM)
        stopping = _receive(sock, 30)
        assert stopping.get("STOPPING") == "1", stopping
        assert snap.proc is not None and snap.proc.popen is not None
        assert snap.proc.popen.wait(45) == 0  # (a second signal would mean: exit now)
    finally:
        sock.close()
        snap.close()
