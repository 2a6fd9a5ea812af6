"""Client of the nydusd HTTP API on a unix socket (works with pynydusd and nydusd)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

from pynydus.errors import NotFound, NydusError, Unavailable

# Daemon states as nydusd reports them.
INIT, READY, RUNNING = "INIT", "READY", "RUNNING"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        # With a timeout the socket is non-blocking underneath, and connect() to a unix
        # socket whose listen queue is full fails at once with EAGAIN instead of waiting
        # (many mounts or removals at once on the shared daemon): wait for room, within
        # the timeout.
        deadline = time.monotonic() + (self.timeout or 30.0)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except BlockingIOError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
                continue
            except OSError:
                sock.close()
                raise
            self.sock = sock
            return


class DaemonClient:
    """One request per connection: simple, and robust across daemon restarts."""

    def __init__(self, sock_path: str, timeout: float = 30.0, *,
                 what: str = "daemon API") -> None:
        self.sock_path = sock_path
        self.timeout = timeout
        self.what = what  # what errors call the server: the system controller speaks alike

    def _request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        conn = _UnixConnection(self.sock_path, timeout or self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as err:  # HTTPException: a reply cut off
            raise Unavailable(f"{self.what} {self.sock_path}: {method} {path}: {err!r}") from err
        finally:
            conn.close()
        if resp.status in (200, 204):
            return json.loads(data) if data else None
        try:
            detail = json.loads(data).get("message", "")
        except (ValueError, AttributeError):
            detail = data.decode(errors="replace")
        err_cls: type[NydusError] = NotFound if resp.status == 404 else Unavailable
        raise err_cls(f"{self.what} {method} {path}: HTTP {resp.status}: {detail}")

    def get(self, path: str) -> Any:
        """``GET path``: its JSON (None for an empty body); NotFound on 404, Unavailable
        on any other failure."""
        return self._request("GET", path)

    def info(self, timeout: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = self._request("GET", "/api/v1/daemon", timeout=timeout)
        return out

    def state(self) -> str:
        return str(self.info(timeout=5).get("state", "UNKNOWN"))

    def wait_until(self, state: str, timeout: float, is_alive: Any = None) -> None:
        """Poll until the daemon reports ``state``; Unavailable after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if is_alive is not None and not is_alive():
                raise Unavailable(f"daemon API {self.sock_path}: daemon exited before {state}")
            try:
                if self.state() == state:
                    return
            except Unavailable as err:
                last = err
            time.sleep(0.02)
        raise Unavailable(f"daemon API {self.sock_path}: not {state} after {timeout:.0f}s ({last})")

    def set_log_level(self, level: str) -> None:
        self._request("PUT", "/api/v1/daemon", {"log_level": level})

    def metrics(self, kind: str = "", sid: str | None = None) -> dict[str, Any]:
        """``GET /api/v1/metrics[/kind]``: "" (filesystem), "backend", "blobcache", ..."""
        path = "/api/v1/metrics" + (f"/{kind}" if kind else "") + (f"?id={sid}" if sid else "")
        out: dict[str, Any] = self._request("GET", path)
        return out

    def mount(self, mountpoint: str, bootstrap: str, config_json: str,
              prefetch_files: list[str] | None = None, *, fs_type: str = "rafs") -> None:
        body: dict[str, Any] = {"fs_type": fs_type, "source": bootstrap, "config": config_json}
        if prefetch_files:
            body["prefetch_files"] = prefetch_files
        self._request("POST", f"/api/v1/mount?mountpoint={mountpoint}", body)

    def umount(self, mountpoint: str) -> None:
        self._request("DELETE", f"/api/v1/mount?mountpoint={mountpoint}")

    def prefetch_list(self, mountpoint: str, doc: dict[str, Any]) -> None:
        """``PUT /api/v1/prefetch`` (pynydusd's): prefetch the image at ``mountpoint``
        (``/`` for a daemon started with its bootstrap) in a prefetch list's order."""
        self._request("PUT", f"/api/v1/prefetch?mountpoint={mountpoint}", doc)

    def fs_metrics(self, sid: str | None = None) -> dict[str, Any]:
        path = "/api/v1/metrics" + (f"?id={sid}" if sid else "")
        out: dict[str, Any] = self._request("GET", path)
        return out

    def inflight(self) -> list[dict[str, Any]]:
        """FUSE requests the daemon is working on (204, no body, when none)."""
        return list(self._request("GET", "/api/v1/metrics/inflight") or [])

    def blobcache_metrics(self, sid: str | None = None) -> dict[str, Any]:
        path = "/api/v1/metrics/blobcache" + (f"?id={sid}" if sid else "")
        out: dict[str, Any] = self._request("GET", path)
        return out

    def update_auth(self, auth_b64: str, sid: str | None = None) -> None:
        path = "/api/v1/config" + (f"?id={sid}" if sid else "")
        self._request("PUT", path, {"registry_auth": auth_b64})

    def update_token(self, token: str, sid: str | None = None) -> None:
        """pynydusd's extension of ``PUT /api/v1/config``: a new bearer token."""
        path = "/api/v1/config" + (f"?id={sid}" if sid else "")
        self._request("PUT", path, {"registry_token": token})

    def exit(self) -> None:
        self._request("PUT", "/api/v1/daemon/exit")

    def send_fd(self) -> None:
        """``PUT /api/v1/daemon/fuse/sendfd``: the daemon gives its supervisor its FUSE
        connection and state; returns once the supervisor has them."""
        self._request("PUT", "/api/v1/daemon/fuse/sendfd")

    def takeover(self, supervisor: str = "", daemon_id: str = "", *,
                 start: bool = False) -> dict[str, float]:
        """``PUT /api/v1/daemon/fuse/takeover``; naming the supervisor and the daemon to
        succeed (pynydusd's extension) lets a spare started in advance take any over, and
        ``start`` (ours too) has it start right after: one call instead of two on the
        failover's path. Returns the daemon's timeline of the steps (empty without
        ``start``)."""
        body: dict[str, Any] | None = None
        if supervisor:
            body = {"supervisor": supervisor, "id": daemon_id}
            if start:
                body["start"] = True
        out = self._request("PUT", "/api/v1/daemon/fuse/takeover", body)
        timeline = out.get("timeline") if isinstance(out, dict) else None
        return {str(k): float(v) for k, v in timeline.items()} if isinstance(timeline, dict) else {}

    def start(self) -> None:
        self._request("PUT", "/api/v1/daemon/start")
