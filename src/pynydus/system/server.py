"""HTTP/1.1 on a unix socket for the system controller (``[system] address``).

The socket is created fresh (a stale one from a crash is replaced, a live one is an
error: another snapshotter serves it), mode 0600 and owned by ``[system] uid``/``gid``:
the API lists daemons and hands out backend configurations, which carry registry
credentials. One thread accepts; each request gets a thread (requests are rare).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from pynydus.errors import FailedPrecondition, q
from pynydus.system.controller import Controller

log = logging.getLogger(__name__)

# Request bodies are small JSON documents (a prefetch list); bigger ones are refused.
MAX_BODY = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    server: _UnixHTTPServer
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.send_error(413, f"body over {MAX_BODY} bytes")
            return
        body = self.rfile.read(length) if length else b""
        reply = self.server.controller.handle(self.command, self.path, body)
        payload = reply.payload()
        self.send_response(reply.status)
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = _serve

    def address_string(self) -> str:
        return "unix"  # BaseHTTPRequestHandler expects (host, port)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("system controller: " + format, *args)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    controller: Controller


def _claim(path: Path) -> None:
    """Remove a stale socket at ``path``; refuse one somebody still listens on."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody answers: a leftover of a crash
        return
    finally:
        probe.close()
    raise FailedPrecondition(f"system controller socket {q(str(path))} is in use by another process")


class SystemServer:
    """The controller served on ``address`` until ``stop()``."""

    def __init__(self, controller: Controller, address: str, *, uid: int = 0, gid: int = 0) -> None:
        self.path = Path(address)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _claim(self.path)
        old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            self._server = _UnixHTTPServer(str(self.path), _Handler)
        finally:
            os.umask(old)
        self._server.controller = controller
        if uid or gid:
            os.chown(self.path, uid, gid)
        self._thread = threading.Thread(target=self._server.serve_forever, name="system",
                                        daemon=True)
        self._thread.start()
        log.info("system controller on %s", self.path)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
