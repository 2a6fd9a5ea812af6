"""HTTP/1.1 on a unix socket for the system controller (``[system] address``).

The socket is created fresh (``host.exclusive.claim_socket``: a stale one from a crash is
replaced; a live one, or anything that is not a socket, is an error), removed at stop only
while it is still ours, mode 0600 whatever the umask and owned by
``[system] uid``/``gid``: the API lists daemons and hands out backend configurations,
which carry registry credentials. Each connection's SO_PEERCRED is checked too (root,
our uid and the configured ``uid``), so a chmod or a bind mount does not open it. One thread accepts; each request gets a thread (requests are rare).
"""

from __future__ import annotations

import logging
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from pynydus.host.exclusive import SocketClaim, claim_socket
from pynydus.host.unixsock import allowed_peer, bind_private, peer_creds
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
    request_queue_size = 64
    controller: Controller
    owner_uid = -1
    owner_gid = -1

    def server_bind(self) -> None:
        path = str(self.server_address)
        bind_private(self.socket, path, 0o600, uid=self.owner_uid, gid=self.owner_gid)
        self.server_address = path

    def verify_request(self, request: Any, client_address: Any) -> bool:
        pid, uid, gid = peer_creds(request)
        if allowed_peer(uid, gid, None, owner=self.owner_uid if self.owner_uid != -1 else None):
            return True
        log.warning("system controller: refused a connection from pid %d (uid %d, gid %d)",
                    pid, uid, gid)
        return False


class SystemServer:
    """The controller served on ``address`` until ``stop()``."""

    def __init__(self, controller: Controller, address: str, *, uid: int = 0, gid: int = 0) -> None:
        self.path = Path(address)
        claim_socket(self.path)
        server = _UnixHTTPServer(str(self.path), _Handler, bind_and_activate=False)
        if uid or gid:
            server.owner_uid, server.owner_gid = uid, gid
        try:
            server.server_bind()  # born 0600 and owned by uid:gid, whatever the umask
            server.server_activate()
        except BaseException:
            server.server_close()
            raise
        server.controller = controller
        self._server = server
        self._claim = SocketClaim.of(self.path)
        self._thread = threading.Thread(target=self._server.serve_forever, name="system",
                                        daemon=True)
        self._thread.start()
        log.info("system controller on %s", self.path)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._claim.release()
