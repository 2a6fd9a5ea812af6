"""The supervisor: holds each daemon's FUSE connection so that its death does not end it.

As nydus-snapshotter's supervisor set: one unix socket per daemon at
``<root>/supervisor/<daemon id>.sock``, given to the daemon as ``--supervisor``. The
daemon sends its ``/dev/fuse`` fd and state there (after it starts and after every
mount change; ``PUT /api/v1/daemon/fuse/sendfd`` on demand); the supervisor keeps a
duplicate of the fd, which keeps the kernel connection, the mount and everything the
kernel caches for it alive while no daemon runs. A successor asks on the same socket
(``PUT /api/v1/daemon/fuse/takeover``) and gets the fd and the state.

The supervisor keeps holding the fd after a takeover (the successor may die too) until
the manager ``remove``s the daemon or ``drop``s the connection to fall back to a
restart: closing the last fd of a connection aborts it (callers get ENOTCONN, the mount
can be removed), so a hand-over that fails never leaves a hung mount behind.

One thread serves every socket; messages are small and answered at once. Nothing is
written to disk: a restarted snapshotter asks the daemons that are alive to send again.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from pynydus.daemon.takeover import DaemonState, StateError, close_fd, recv_frame, send_frame

log = logging.getLogger(__name__)

_CLIENT_TIMEOUT = 5.0
# The CPU priority of a failover's path: the supervisor's thread, and in the manager the
# monitor while it hands a connection over and the successor until it has served for a
# moment. On a loaded node each step would otherwise wait behind every runnable thread
# while the mount's readers wait for it (docs/failover.md, "The gap").
TAKEOVER_NICENESS = -10


@dataclass
class Held:
    """What the supervisor holds for one daemon."""

    fd: int
    blob: bytes
    state: DaemonState
    received: float
    sender_pid: int
    table_fd: int = -1  # the connection's open-mode table (passthrough), if it has one


class Supervisor:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._held: dict[str, Held] = {}
        self._listeners: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False
        self._changed = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._serve, name="supervisor", daemon=True)
        self._thread.start()

    def path(self, daemon_id: str) -> str:
        return os.path.join(self.directory, f"{daemon_id}.sock")

    def add(self, daemon_id: str) -> str:
        """Listen for ``daemon_id`` (idempotent); returns its socket path."""
        with self._lock:
            if daemon_id in self._listeners:
                return self.path(daemon_id)
            path = self.path(daemon_id)
            if os.path.exists(path) or os.path.islink(path):
                os.unlink(path)  # ours from a previous snapshotter: nobody listens there
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(8)
            sock.setblocking(False)
            self._listeners[daemon_id] = sock
            self._sel.register(sock, selectors.EVENT_READ, daemon_id)
        self._wake()
        return path

    def remove(self, daemon_id: str) -> None:
        """Stop supervising ``daemon_id``: close its socket and the connection held for
        it. Idempotent."""
        with self._lock:
            sock = self._listeners.pop(daemon_id, None)
            held = self._held.pop(daemon_id, None)
            if sock is not None:
                self._sel.unregister(sock)
                sock.close()
                try:
                    os.unlink(self.path(daemon_id))
                except FileNotFoundError:
                    pass
        if held is not None:
            close_fd(held.fd)
            close_fd(held.table_fd)
        self._wake()

    def held(self, daemon_id: str) -> Held | None:
        with self._lock:
            return self._held.get(daemon_id)

    def wait_held(self, daemon_id: str, since: float, timeout: float) -> Held | None:
        """The held connection once one received after ``since`` (monotonic) is there."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                held = self._held.get(daemon_id)
                if held is not None and held.received >= since:
                    return held
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def drop(self, daemon_id: str) -> None:
        """Close the connection held for ``daemon_id`` (the daemon is gone and will be
        restarted, not succeeded): the kernel aborts it once no one else holds it."""
        with self._lock:
            held = self._held.pop(daemon_id, None)
        if held is not None:
            close_fd(held.fd)
            close_fd(held.table_fd)
            log.info("supervisor: released the FUSE connection of daemon %s", daemon_id)

    def close(self) -> None:
        """Stop serving and close everything held (a connection whose daemon still runs
        lives on in the daemon)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            for daemon_id, sock in list(self._listeners.items()):
                sock.close()
                try:
                    os.unlink(self.path(daemon_id))
                except FileNotFoundError:
                    pass
            self._listeners.clear()
            held, self._held = list(self._held.values()), {}
        for h in held:
            close_fd(h.fd)
            close_fd(h.table_fd)
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- the serving thread ---------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _serve(self) -> None:
        try:  # this thread only; it answers in microseconds and mostly sleeps
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TAKEOVER_NICENESS)
        except OSError:
            pass
        while True:
            with self._lock:
                if self._closed:
                    return
            for key, _ in self._sel.select(timeout=1.0):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    continue
                try:
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                except OSError:
                    continue
                with conn:
                    conn.settimeout(_CLIENT_TIMEOUT)
                    try:
                        self._answer(str(key.data), conn)
                    except (OSError, EOFError) as err:
                        log.warning("supervisor: daemon %s: %s", key.data, err)

    def _answer(self, daemon_id: str, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[:4], "little")
        kind, payload, fd, table_fd = recv_frame(conn)
        if kind == b"S":
            self._keep(daemon_id, conn, payload, fd, pid, table_fd)
            return
        close_fd(fd)
        close_fd(table_fd)
        if kind == b"T":
            self._give(daemon_id, conn, payload, pid)
        else:
            send_frame(conn, b"E", f"unknown request {kind!r}".encode())

    def _keep(self, daemon_id: str, conn: socket.socket, blob: bytes, fd: int, pid: int,
              table_fd: int = -1) -> None:
        if fd < 0:
            close_fd(table_fd)
            send_frame(conn, b"E", b"no fd came with the state")
            return
        try:
            state = DaemonState.decode(blob)
            if state.daemon_id and state.daemon_id != daemon_id:
                raise StateError(f"state of daemon {state.daemon_id!r} sent to the socket of "
                                 f"{daemon_id!r}")
        except StateError as err:
            close_fd(fd)
            close_fd(table_fd)
            log.error("supervisor: daemon %s (pid %d) sent a state we cannot keep: %s",
                      daemon_id, pid, err)
            send_frame(conn, b"E", str(err).encode())
            return
        with self._lock:
            old = self._held.get(daemon_id)
            self._held[daemon_id] = Held(fd, blob, state, time.monotonic(), pid, table_fd)
            self._changed.notify_all()
        if old is not None:
            close_fd(old.fd)  # the same connection, or one that ended
            close_fd(old.table_fd)
        send_frame(conn, b"K")
        log.debug("supervisor: holding the FUSE connection of daemon %s (pid %d, %d images)",
                  daemon_id, pid, len(state.mounts))

    def _give(self, daemon_id: str, conn: socket.socket, payload: bytes, pid: int) -> None:
        try:
            wanted = str(json.loads(payload or b"{}").get("id") or daemon_id)
        except (ValueError, AttributeError):
            wanted = daemon_id
        if wanted != daemon_id:
            send_frame(conn, b"E", f"this socket serves daemon {daemon_id}, not {wanted}".encode())
            return
        held = self.held(daemon_id)
        if held is None:
            send_frame(conn, b"E", f"no FUSE connection is held for daemon {daemon_id}".encode())
            return
        send_frame(conn, b"R", held.blob, held.fd, held.table_fd)
        log.info("supervisor: FUSE connection of daemon %s handed to pid %d", daemon_id, pid)
