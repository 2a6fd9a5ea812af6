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
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from pynydus.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplementedFeature,
    NydusError,
    Unavailable,
)
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


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "Nydus API"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def _send(self, code: int, body: Any = None, content_type: str = "application/json") -> None:
        payload = b""
        if body is not None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 16 << 20:
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
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        ctl = self.server.controller
        try:
            result = self._route(ctl, method, url.path.rstrip("/") or "/", query)
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

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


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
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path) or os.path.islink(path):
            os.unlink(path)  # a stale socket from a previous run
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
