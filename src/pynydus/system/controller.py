"""The system controller's API: what an operator (or the prefetch NRI plugin) asks the
snapshotter over ``[system] address``, in upstream's shape (``pkg/system/system.go``).

``Controller.handle(method, path, body)`` returns a ``Reply`` (status, JSON); the HTTP
adapter in ``system/server.py`` is the only part that touches a socket. What the
controller reads comes from a ``Daemons`` view of the filesystem (``NydusFilesystem``
implements it) and from ``/proc`` for a daemon's memory.

    GET  /api/v1/daemons                the daemons: id, pid, sockets, mountpoint, image,
                                        memory, data read, and the images (instances) each serves
    GET  /api/v1/daemons/records        the records the snapshotter keeps in its daemon
                                        store, as stored (``{"daemons": [...], "instances":
                                        [...]}``): what a restart adopts (upstream: 501)
    GET  /api/v1/daemons/{id}/backend   {"type", "config"} of the daemon's storage backend
    PUT  /api/v1/prefetch               [{"image": ref, "prefetch": "file list"}]: the files
                                        the next daemon mounting that image prefetches
    PUT  /api/v1/daemons/upgrade        {"nydusd_path": ...} (optional): every daemon is
                                        replaced by one of that binary through the failover
                                        hand-over (recover_policy = "failover"; 501 otherwise)
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pynydus.host.proc import rss_kib

log = logging.getLogger(__name__)

API = "/api/v1"
_BACKEND = re.compile(rf"^{API}/daemons/([^/]+)/backend$")
_INSTANCE_FIELDS = ("snapshot_id", "snapshot_dir", "mountpoint", "image_id")


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any = None  # JSON-able; None for no body

    def payload(self) -> bytes:
        return b"" if self.body is None else json.dumps(self.body).encode()


def error(status: int, code: str, message: str) -> Reply:
    """Upstream's error body: ``{"code": ..., "message": ...}``."""
    return Reply(status, {"code": code, "message": message})


@dataclass(frozen=True)
class DaemonView:
    """One daemon as the controller reports it (no I/O needed to build it)."""

    id: str
    pid: int
    api_socket: str
    mountpoint: str
    reference: str  # the image of a dedicated daemon; "" for the shared one
    config_path: str  # its nydusd config (dedicated), "" otherwise
    state: str
    instances: tuple[dict[str, str], ...]  # {snapshot_id, snapshot_dir, mountpoint, image_id}
    shared: bool = False  # the shared daemon: its API takes an instance id (/<snapshot id>)
    supervisor_path: str = ""  # where it hands its FUSE connection over (failover only)


class Daemons(Protocol):
    """What the controller needs from the filesystem."""

    def daemon_views(self) -> list[DaemonView]: ...

    def daemon_read_bytes(self, daemon_id: str) -> int | None: ...

    def set_prefetch(self, image: str, files: list[str]) -> None: ...

    def daemon_records(self) -> dict[str, list[dict[str, Any]]]: ...


class PrefetchLists:
    """Image reference -> files to prefetch, kept until a daemon mounting it takes them
    (upstream: in memory, consumed once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lists: dict[str, list[str]] = {}

    def put(self, image: str, files: list[str]) -> None:
        with self._lock:
            self._lists[image] = files

    def take(self, image: str) -> list[str] | None:
        with self._lock:
            return self._lists.pop(image, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._lists)


def parse_file_list(text: str) -> list[str]:
    """The NRI plugin's annotation value: absolute paths separated by commas, newlines or
    spaces; anything else is dropped."""
    return [p for p in re.split(r"[\s,]+", text) if p.startswith("/")]


class Controller:
    """Routes one request; thread-safe as far as ``daemons`` is."""

    def __init__(self, daemons: Daemons | None) -> None:
        self.daemons = daemons  # None: no Nydus filesystem (plain snapshots only)

    def handle(self, method: str, path: str, body: bytes = b"") -> Reply:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path == f"{API}/daemons" and method == "GET":
                return Reply(200, self.list_daemons())
            if path == f"{API}/daemons/records" and method == "GET":
                return Reply(200, self.records())
            if path == f"{API}/daemons/upgrade" and method == "PUT":
                return self.upgrade(body)
            if path == f"{API}/prefetch" and method == "PUT":
                return self.put_prefetch(body)
            m = _BACKEND.match(path)
            if m and method == "GET":
                return self.backend(m.group(1))
        except Exception as err:  # an answer, never a dropped connection
            log.exception("system controller: %s %s failed", method, path)
            return error(500, "Unknown", f"{method} {path}: {err}")
        known = (f"{API}/daemons", f"{API}/daemons/records", f"{API}/daemons/upgrade",
                 f"{API}/prefetch")
        if path in known or _BACKEND.match(path):
            return error(405, "MethodNotAllowed", f"{method} not allowed on {path}")
        return error(404, "NotFound", f"no endpoint {path}")

    # --- endpoints --------------------------------------------------------------------

    def list_daemons(self) -> list[dict[str, Any]]:
        if self.daemons is None:
            return []
        out = []
        for d in self.daemons.daemon_views():
            read = self.daemons.daemon_read_bytes(d.id)
            out.append({
                "id": d.id, "pid": d.pid, "api_socket": d.api_socket,
                "supervisor_path": d.supervisor_path,
                "reference": d.reference, "mountpoint": d.mountpoint, "state": d.state,
                "startup_cpu_utilization": 0.0,  # [system.debug] sampling is not done
                "memory_rss_kb": float(rss_kib(d.pid)),
                "read_data_kb": float((read or 0) / 1024),
                "instances": {i["snapshot_id"]: {k: i[k] for k in _INSTANCE_FIELDS}
                              for i in d.instances},
            })
        return out

    def records(self) -> dict[str, list[dict[str, Any]]]:
        """The daemon store's two tables, each record as persisted: the daemons a restarted
        snapshotter adopts or restarts and the RAFS instances it mounts again. Unlike
        ``/daemons`` it reads no process: a record whose daemon died shows here only."""
        if self.daemons is None:
            return {"daemons": [], "instances": []}
        return self.daemons.daemon_records()

    def put_prefetch(self, body: bytes) -> Reply:
        """Always 200, as upstream; what cannot be read is logged and skipped."""
        try:
            items = json.loads(body or b"[]")
        except ValueError as err:
            log.warning("system controller: prefetch body is not JSON: %s", err)
            return Reply(200)
        if isinstance(items, Mapping):
            items = [items]
        for item in items if isinstance(items, list) else []:
            image = item.get("image") if isinstance(item, Mapping) else None
            files = item.get("prefetch") if isinstance(item, Mapping) else None
            if not isinstance(image, str) or not image:
                log.warning("system controller: prefetch entry without an image: %r", item)
                continue
            paths = (parse_file_list(files) if isinstance(files, str)
                     else [p for p in files if isinstance(p, str) and p.startswith("/")]
                     if isinstance(files, list) else [])
            if self.daemons is not None:
                self.daemons.set_prefetch(image, paths)
            log.info("prefetch list for %s: %d files", image, len(paths))
        return Reply(200)

    def upgrade(self, body: bytes) -> Reply:
        """Hot upgrade: 200 with the daemons replaced, 501 when the snapshotter cannot hand
        connections over (recover policy other than failover), 400 for a bad body."""
        upgrade = getattr(self.daemons, "upgrade_daemons", None)
        if upgrade is None:
            return error(501, "Unimplemented", "no Nydus daemons to upgrade")
        try:
            req = json.loads(body or b"{}")
        except ValueError as err:
            return error(400, "InvalidArgument", f"upgrade body is not JSON: {err}")
        path = req.get("nydusd_path", "") if isinstance(req, Mapping) else None
        if not isinstance(path, str):
            return error(400, "InvalidArgument", "nydusd_path: expected a string")
        from pynydus.errors import FailedPrecondition

        try:
            done = upgrade(path)
        except FailedPrecondition as err:
            return error(501, "Unimplemented", str(err))
        log.info("hot upgrade done: %d daemons replaced", len(done))
        return Reply(200, {"upgraded": done})

    def backend(self, daemon_id: str) -> Reply:
        if self.daemons is None:
            return error(404, "NotFound", f"daemon {daemon_id} not found")
        for d in self.daemons.daemon_views():
            if d.id != daemon_id:
                continue
            configs = [d.config_path] if d.config_path else []
            configs += [i.get("config_path", "") for i in d.instances]
            for path in filter(None, configs):
                backend = _backend_of(path)
                if backend is not None:
                    return Reply(200, backend)
            return error(404, "NotFound", f"daemon {daemon_id} serves no image with a backend")
        return error(404, "NotFound", f"daemon {daemon_id} not found")


def _backend_of(config_path: str) -> dict[str, Any] | None:
    """``{"type", "config"}`` of a nydusd config file (v1 ``device.backend`` or v2
    ``backend``), or None if it has none."""
    try:
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    backend = (cfg.get("device") or {}).get("backend") or cfg.get("backend")
    if not isinstance(backend, Mapping) or "type" not in backend:
        return None
    btype = str(backend["type"])
    config = backend.get("config", backend.get(btype, {}))
    return {"type": btype, "config": config}


def instance_view(snapshot_id: str, snapshot_dir: str, mountpoint: str, image_id: str,
                  config_path: str = "") -> dict[str, str]:
    return {"snapshot_id": snapshot_id, "snapshot_dir": snapshot_dir, "mountpoint": mountpoint,
            "image_id": image_id, "config_path": config_path}


def views_by_daemon(daemons: Iterable[Any], instances: Iterable[Any]) -> list[DaemonView]:
    """``DaemonView``s from the manager's live daemons and the filesystem's instance
    records (``LiveDaemon``/``RafsRecord``-shaped objects)."""
    by_daemon: dict[str, list[Any]] = {}
    for rec in instances:
        by_daemon.setdefault(rec.daemon_id, []).append(rec)
    out = []
    for live in daemons:
        r = live.record
        mine = by_daemon.get(r.id, [])
        reference = mine[0].image_ref if r.mode != "shared" and mine else ""
        out.append(DaemonView(
            id=r.id, pid=r.pid, api_socket=r.api_socket, mountpoint=r.mountpoint,
            reference=reference, config_path=r.config_path, state=live.state,
            shared=r.mode == "shared",
            instances=tuple(instance_view(i.snapshot_id, i.snapshot_dir, i.mountpoint,
                                          i.image_ref, i.config_path) for i in mine)))
    return sorted(out, key=lambda v: v.id)
