"""The daemon API client turns every way a daemon can break a call into Unavailable.

A daemon that exits while it answers (headers sent, body cut off: seen when a daemon
refuses its bootstrap during start-up) must not surface as an internal error of the
snapshotter's Prepare; callers decide on Unavailable (restart, fall back, report)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from pynydus.errors import Unavailable
from pynydus.manager.client import DaemonClient


def _serve_once(path: Path, reply: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.recv(65536)
            conn.sendall(reply)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 205\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 205\r\n\r\n{\"state\": \"RUN",
    b"HTTP/1.1 2",
    b"",
], ids=["headers-only", "body-cut", "status-line-cut", "closed"])
def test_a_reply_cut_off_is_unavailable(tmp_path: Path, reply: bytes) -> None:
    sock = tmp_path / "api.sock"
    t = _serve_once(sock, reply)
    with pytest.raises(Unavailable, match="api.sock"):
        DaemonClient(str(sock), timeout=5).info()
    t.join(5)
