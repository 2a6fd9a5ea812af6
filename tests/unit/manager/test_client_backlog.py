"""A daemon API whose listen queue is full makes the client wait for room (within its
timeout), not fail at once: with a timeout, connect() to a unix socket fails with EAGAIN
when the queue is full, and many mounts or removals at once on the shared daemon hit it
(the removed image then stayed mounted in the daemon)."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

from pynydus.manager.client import DaemonClient


def test_a_full_listen_queue_is_waited_for() -> None:
    path = str(Path(tempfile.mkdtemp(prefix="pyn-backlog-", dir="/var/tmp")) / "api.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    queued = []
    for _ in range(8):  # fill the queue: further connects fail with EAGAIN
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:
            c.close()
            break
        queued.append(c)

    def serve() -> None:
        time.sleep(0.3)
        for _ in range(len(queued) + 1):
            conn, _ = server.accept()
            if conn.recv(4096).startswith(b"GET /api/v1/daemon "):
                body = b'{"state": "RUNNING"}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        for c in queued:
            c.close()  # their requests read as empty; the client's comes after them
        assert DaemonClient(path, timeout=10).state() == "RUNNING"
    finally:
        t.join(timeout=10)
        server.close()
