"""nydusd's HTTP API on a unix socket: the endpoints the snapshotter uses.

HTTP/1.1, JSON bodies, 200 with a body or 204 without; errors are
``{"code": "...", "message": "..."}`` with 400 (bad request), 404 (unknown route
or object), 501 (not supported), 503 (not ready) or 500 — nydusd's shapes, so
upstream's snapshotter can drive pynydusd. The handlers call a ``Controller``
(the daemon); this module knows HTTP, not filesystems.

Who may talk to it: the API can unmount the image and stop the daemon, so the
socket is created mode 0600 (0660 with a group given), whatever the umask
(bound under a temporary name, chmod'ed, then renamed into place), and every
connection's peer credentials (SO_PEERCRED) are checked: root, the daemon's own
uid and members of the configured group get through; anyone else is logged and
hung up on before a byte is read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socketserver
import threading
import time
from typing import Any, Protocol

from pynydus.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplementedFeature,
    NydusError,
    Unavailable,
)
from pynydus.host.exclusive import claim_socket
from pynydus.host.unixsock import allowed_peer, bind_private, peer_creds, resolve_group

log = logging.getLogger(__name__)


class Controller(Protocol):
    def daemon_info(self) -> dict[str, Any]: ...
    def set_log_level(self, level: str) -> None: ...
    def exit(self) -> None: ...
    def start(self) -> None: ...
    def mount(self, mountpoint: str, body: dict[str, Any]) -> None: ...
    def remount(self, mountpoint: str, body: dict[str, Any]) -> None: ...
    def umount(self, mountpoint: str) -> None: ...
    def metrics(self, kind: str, sid: str | None, query: dict[str, str]) -> Any: ...
    def prometheus(self) -> bytes: ...
    def get_config(self, sid: str | None) -> dict[str, Any]: ...
    def update_config(self, sid: str | None, values: dict[str, Any]) -> None: ...
    def backend_info(self, mountpoint: str) -> dict[str, Any]: ...
    def prefetch_list(self, mountpoint: str, body: dict[str, Any]) -> None: ...
    def send_fd(self) -> None: ...
    def takeover(self, body: dict[str, Any] | None = None) -> dict[str, Any] | None: ...


def _status(err: Exception) -> int:
    if isinstance(err, (InvalidArgument, AlreadyExists, FailedPrecondition)):
        return 400
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, NotImplementedFeature):
        return 501
    if isinstance(err, Unavailable):
        return 503
    return 500


_EXIT = object()  # _route's answer to PUT /api/v1/daemon/exit


# The few reasons we send (http.server's table would cost the daemon the import of
# http.server, email, html and http.client: 7 MB of its resident memory, a quarter).
_REASONS = {100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request",
            404: "Not Found", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}
_METHODS = ("GET", "PUT", "POST", "DELETE")
_MAX_LINE = 65536
_MAX_HEADERS = 100
_MAX_BODY = 16 << 20


_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def parse_query(text: str) -> dict[str, str]:
    """A query string's fields as ``urllib.parse.parse_qs`` reads them, the last value of
    a repeated name: ``+`` is a space, ``%XX`` a byte (UTF-8, undecodable bytes
    replaced), a field without ``=`` or with an empty value is left out. Not urllib:
    urllib.parse imports ipaddress (0.4 MB of every daemon's resident memory)."""
    fields: dict[str, str] = {}
    for field in text.split("&"):
        name, eq, value = field.partition("=")
        if eq and value:
            fields[_unquote_plus(name)] = _unquote_plus(value)
    return fields


def _unquote_plus(text: str) -> str:
    raw = text.replace("+", " ").encode("utf-8", "surrogateescape")
    return _ESCAPE.sub(lambda m: bytes((int(m[1], 16),)), raw).decode("utf-8", "replace")


class _BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Handler(socketserver.StreamRequestHandler):
    """HTTP/1.1 as nydusd's clients speak it: a request line, headers, a body of
    Content-Length bytes; persistent connections unless the client closes (or speaks
    1.0 without keep-alive); ``Expect: 100-continue`` answered."""

    server: _Server
    path = ""
    headers: dict[str, str]
    close_connection = True
    _unread = 0  # body bytes of the current request not read yet

    def handle(self) -> None:
        try:
            while self._one_request():
                pass
        except (ConnectionError, TimeoutError):
            pass

    def _one_request(self) -> bool:
        """Serve one request; False when the connection is to be closed."""
        line = self.rfile.readline(_MAX_LINE + 1)
        if not line:
            return False
        self.close_connection = True
        try:
            method, version = self._parse_head(line)
        except _BadRequest as err:
            log.debug("api: bad request: %s", err)
            self._send(err.code, {"code": "INVALID_ARGUMENT", "message": str(err)})
            return False
        conn = self.headers.get("connection", "").lower()
        self.close_connection = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
        if self.headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if method not in _METHODS:
            self.close_connection = True  # its body, if any, is not read
            self._send(501, {"code": "NOT_IMPLEMENTED",
                             "message": f"unsupported method {method!r}"})
        else:
            self._dispatch(method)
        log.debug("api: %s %s", method, self.path)
        if self._unread and not self.close_connection:
            if self._unread > _MAX_BODY:
                return False
            self.rfile.read(self._unread)  # a body the route did not want
        return not self.close_connection

    def _parse_head(self, line: bytes) -> tuple[str, str]:
        if len(line) > _MAX_LINE:
            raise _BadRequest(414, "request line too long")
        parts = line.decode("latin-1").rstrip("\r\n").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, f"bad request line {line[:100]!r}")
        method, self.path, version = parts
        self.headers = {}
        while True:
            raw = self.rfile.readline(_MAX_LINE + 1)
            if raw in (b"\r\n", b"\n", b""):
                break
            if len(raw) > _MAX_LINE or len(self.headers) >= _MAX_HEADERS:
                raise _BadRequest(431, "request headers too large")
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep:
                raise _BadRequest(400, f"bad header line {raw[:100]!r}")
            self.headers[name.strip().lower()] = value.strip()
        try:
            self._unread = int(self.headers.get("content-length") or 0)
        except ValueError:
            raise _BadRequest(400, "Content-Length is not a number") from None
        if self._unread < 0:
            raise _BadRequest(400, "negative Content-Length")
        return method, version

    def _send(self, code: int, body: Any = None, content_type: str = "application/json") -> None:
        payload = b""
        if body is not None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
        head = (f"HTTP/1.1 {code} {_REASONS.get(code, '')}\r\nServer: Nydus API\r\n"
                f"Date: {date}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\n")
        if self.close_connection:
            head += "Connection: close\r\n"
        self.wfile.write(head.encode("latin-1") + b"\r\n" + payload)

    def _body(self) -> dict[str, Any]:
        length, self._unread = self._unread, 0
        if length > _MAX_BODY:
            self.close_connection = True  # not read: the connection cannot go on
            raise InvalidArgument("request body larger than 16 MiB")
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"request body is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise InvalidArgument("request body must be a JSON object")
        return data

    def _dispatch(self, method: str) -> None:
        # not urlsplit: it caches its last 128 URLs, and each mount's differs; what a
        # cache keeps from the time images were mounted pins the allocator's arenas
        # their objects were freed from (see MemoryTrimmer)
        path, _, query_text = self.path.partition("#")[0].partition("?")
        query = parse_query(query_text)
        ctl = self.server.controller
        try:
            result = self._route(ctl, method, path.rstrip("/") or "/", query)
        except NydusError as err:
            self._send(_status(err), {"code": type(err).__name__.upper(), "message": str(err)})
            return
        except Exception as err:
            log.exception("api %s %s failed", method, self.path)
            self._send(500, {"code": "UNDEFINED", "message": f"internal error: {err}"})
            return
        if result is _EXIT:  # answer first: the process may be gone a moment later
            self._send(204)
            self.wfile.flush()
            try:
                ctl.exit()
            except Exception:
                log.exception("api exit failed")
        elif isinstance(result, tuple):
            self._send(200, result[0], result[1])
        elif result is None:
            self._send(204)
        else:
            self._send(200, result)

    def _route(self, ctl: Controller, method: str, path: str, q: dict[str, str]) -> Any:
        v = path.replace("/api/v2/", "/api/v1/", 1) if path.startswith("/api/v2/daemon") else path
        if v == "/api/v1/daemon":
            if method == "GET":
                info = ctl.daemon_info()
                if path.startswith("/api/v2/"):
                    info.pop("backend_collection", None)
                return info
            if method == "PUT":
                level = self._body().get("log_level")
                if not isinstance(level, str):
                    raise InvalidArgument("log_level: expected a string")
                ctl.set_log_level(level)
                return None
        elif v == "/api/v1/daemon/exit" and method == "PUT":
            return _EXIT
        elif v == "/api/v1/daemon/start" and method == "PUT":
            ctl.start()
            return None
        elif v == "/api/v1/daemon/fuse/sendfd" and method == "PUT":
            ctl.send_fd()
            return None
        elif v == "/api/v1/daemon/fuse/takeover" and method == "PUT":
            return ctl.takeover(self._body())
        elif v == "/api/v1/daemon/backend" and method == "GET":
            return ctl.backend_info(q.get("mountpoint", "/"))
        elif path == "/api/v1/mount":
            mountpoint = q.get("mountpoint")
            if not mountpoint:
                raise InvalidArgument("query parameter mountpoint is required")
            if method == "POST":
                ctl.mount(mountpoint, self._body())
                return None
            if method == "PUT":
                ctl.remount(mountpoint, self._body())
                return None
            if method == "DELETE":
                ctl.umount(mountpoint)
                return None
        elif path == "/api/v1/prefetch" and method == "PUT":
            # ours: a prefetch list (daemon.prefetchlist) for an image mounted here
            ctl.prefetch_list(q.get("mountpoint", "/"), self._body())
            return None
        elif path.startswith("/api/v1/metrics") and method == "GET":
            kind = path[len("/api/v1/metrics"):].lstrip("/") or "fs"
            result = ctl.metrics(kind, q.get("id"), q)
            if kind == "inflight" and not result:
                return None  # 204: nothing in flight
            return result
        elif path == "/metrics" and method == "GET":
            return (ctl.prometheus(), "text/plain; version=0.0.4")
        elif path == "/api/v1/config":
            if method == "GET":
                return ctl.get_config(q.get("id"))
            if method == "PUT":
                ctl.update_config(q.get("id"), self._body())
                return None
        raise NotFound(f"no route for {method} {path}")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's 5 refused a burst of mounts (EAGAIN)
    controller: Controller
    group: int | None = None

    def server_bind(self) -> None:
        path = str(self.server_address)
        bind_private(self.socket, path, 0o600 if self.group is None else 0o660,
                     gid=-1 if self.group is None else self.group)
        self.server_address = path

    def verify_request(self, request: Any, client_address: Any) -> bool:
        pid, uid, gid = peer_creds(request)
        if allowed_peer(uid, gid, self.group):
            return True
        log.warning("api: refused a connection from pid %d (uid %d, gid %d)", pid, uid, gid)
        return False


class ApiServer:
    """Serves the API on ``path`` in a background thread until ``close()``.

    The socket is mode 0600, or 0660 owned by ``group`` (a name or gid); only root,
    this process's uid and the group's members may use it.
    """

    def __init__(self, path: str, controller: Controller, group: str = "") -> None:
        self.path = path
        gid = resolve_group(group) if group else None
        # a stale socket of a dead daemon goes; a live daemon's socket, or anything
        # that is not a socket (a mistyped --apisock), stays: FailedPrecondition
        claim_socket(path)
        self.server = _Server(path, _Handler, bind_and_activate=False)
        self.server.group = gid
        try:
            self.server.server_bind()
            self.server.server_activate()
        except BaseException:
            self.server.server_close()
            raise
        self.server.controller = controller
        self.thread = threading.Thread(target=self.server.serve_forever, name="api", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
