"""The failover hand-over: the state a daemon leaves to its successor, and how it travels.

A daemon with ``--supervisor`` sends its ``/dev/fuse`` fd and a state blob to the
supervisor (the snapshotter) over a unix socket with SCM_RIGHTS. A successor started
with ``--upgrade`` gets both back on ``PUT /api/v1/daemon/fuse/takeover`` and serves the
same kernel connection: no second mount, no second INIT, the same node ids.

The state (``DaemonState``) is a value: the negotiated INIT parameters, the slot table
(which image is in which slot, so node ids come out the same) and, per mounted image,
its bootstrap and config. It is serialised as one line naming format and version and
the SHA-256 of the JSON that follows; a blob that is cut, altered or of another version
is refused (``StateError``) and the manager falls back to a restart.

Wire frames (ours; upstream's supervisor speaks dbs-snapshot, which nothing here needs
to read): one kind byte, a 4-byte big-endian length, the payload; an fd rides on the
frame's first byte. ``S`` daemon -> supervisor: state + fd; ``T`` successor ->
supervisor: takeover request (JSON ``{"id": ...}``); ``R`` supervisor -> successor:
state + fd; ``K`` acknowledgement; ``E`` error (text). A state frame may carry a second
fd: the connection's open-mode table (a memfd, ``iomode``) when passthrough is on.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import dataclass, field

from pynydus.daemon.fuseproto import InitParams

FORMAT = b"PYNYDUSD-STATE"
VERSION = 1
_MAX_FRAME = 64 << 20
_FRAME = struct.Struct(">cI")


def _checksum(payload: bytes) -> bytes:
    """The state's sha256, in hex. hashlib is imported here, when a daemon with a
    supervisor first sends its state: it loads libcrypto (3.7 MB), which a daemon
    without failover never needs."""
    import hashlib

    return hashlib.sha256(payload).hexdigest().encode()


class StateError(ValueError):
    """A state blob that cannot be restored: corrupt, truncated or of another version."""


@dataclass(frozen=True)
class MountState:
    """One image: where it is mounted ("/" for a --bootstrap daemon, "/<id>" for an API
    mount), its slot (0 for "/"), its bootstrap and the config text it was mounted with."""

    mountpoint: str
    slot: int
    source: str
    config: str
    mounted_time: float = 0.0


@dataclass(frozen=True)
class DaemonState:
    """What a successor takes over: the daemon's id, its FUSE mountpoint and INIT, its
    images and the failover policy."""

    daemon_id: str
    mountpoint: str  # the FUSE mountpoint
    init: InitParams
    next_slot: int = 1
    mounts: tuple[MountState, ...] = field(default_factory=tuple)
    failover_policy: str = "resend"

    def encode(self) -> bytes:
        payload = json.dumps({
            "daemon_id": self.daemon_id, "mountpoint": self.mountpoint,
            "init": self.init.to_dict(), "next_slot": self.next_slot,
            "failover_policy": self.failover_policy,
            "mounts": [m.__dict__ for m in self.mounts],
        }, sort_keys=True).encode()
        return FORMAT + b"/%d " % VERSION + _checksum(payload) + b"\n" + payload

    @classmethod
    def decode(cls, blob: bytes) -> DaemonState:
        """The state in ``blob``; StateError naming what is wrong with it."""
        head, sep, payload = blob.partition(b"\n")
        if not sep or not head.startswith(FORMAT + b"/"):
            raise StateError("not a pynydusd state blob (no header line)")
        try:
            version_text, digest = head[len(FORMAT) + 1:].split(b" ", 1)
            version = int(version_text)
        except ValueError:
            raise StateError(f"state header {head[:80]!r} is malformed") from None
        if version != VERSION:
            raise StateError(f"state version {version} is not {VERSION} (a daemon of another "
                             f"release wrote it)")
        if _checksum(payload) != digest:
            raise StateError(f"state checksum mismatch ({len(payload)} bytes of payload): "
                             f"the blob is corrupt or truncated")
        try:
            data = json.loads(payload)
            mounts = tuple(MountState(mountpoint=str(m["mountpoint"]), slot=int(m["slot"]),
                                      source=str(m["source"]), config=str(m["config"]),
                                      mounted_time=float(m.get("mounted_time", 0.0)))
                           for m in data["mounts"])
            state = cls(daemon_id=str(data["daemon_id"]), mountpoint=str(data["mountpoint"]),
                        init=InitParams.from_dict(data["init"]),
                        next_slot=int(data.get("next_slot", 1)), mounts=mounts,
                        failover_policy=str(data.get("failover_policy", "resend")))
        except (ValueError, KeyError, TypeError) as err:
            raise StateError(f"state content is invalid: {err!r}") from err
        state.validate()
        return state

    def validate(self) -> None:
        if not self.mountpoint.startswith("/"):
            raise StateError(f"state mountpoint {self.mountpoint!r} is not absolute")
        slots = [m.slot for m in self.mounts]
        if len(set(slots)) != len(slots) or any(not 0 <= s <= 255 for s in slots):
            raise StateError(f"state slots {slots} repeat or are out of range")
        dedicated = [m for m in self.mounts if m.slot == 0]
        if dedicated and (len(self.mounts) != 1 or dedicated[0].mountpoint != "/"):
            raise StateError("state mixes an image at the root with API mounts")
        if not 1 <= self.next_slot <= 255:
            raise StateError(f"state next_slot {self.next_slot} is out of range")
        if self.failover_policy not in ("resend", "flush"):
            raise StateError(f"state failover_policy {self.failover_policy!r} is unknown")


# --- frames over a unix socket -----------------------------------------------------------------


def send_frame(sock: socket.socket, kind: bytes, payload: bytes = b"", fd: int = -1,
               extra_fd: int = -1) -> None:
    """One frame; ``fd`` (if >= 0), then ``extra_fd`` (if >= 0), travel with it as
    SCM_RIGHTS."""
    data = _FRAME.pack(kind, len(payload)) + payload
    if fd >= 0:
        sent = socket.send_fds(sock, [data[:1]], [fd] + ([extra_fd] if extra_fd >= 0 else []))
        if sent != 1:
            raise OSError("short send of the frame carrying the fd")
        sock.sendall(data[1:])
    else:
        sock.sendall(data)


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes, int, int]:
    """(kind, payload, fd or -1, extra fd or -1). The caller owns the fds.
    OSError/EOFError on a cut."""
    first, fds, _, _ = socket.recv_fds(sock, 1, 4)
    for received in fds:  # recv_fds drops its flags argument (CPython 3.11): no CMSG_CLOEXEC
        os.set_inheritable(received, False)
    if not first:
        for extra in fds:
            close_fd(extra)
        raise EOFError("supervisor connection closed")
    fd = fds[0] if fds else -1
    extra_fd = fds[1] if len(fds) > 1 else -1
    for extra in fds[2:]:
        close_fd(extra)
    try:
        rest = _recv_exact(sock, _FRAME.size - 1)
        kind, length = _FRAME.unpack(first + rest)
        if length > _MAX_FRAME:
            raise OSError(f"frame of {length} bytes is larger than {_MAX_FRAME}")
        return kind, _recv_exact(sock, length), fd, extra_fd
    except BaseException:
        close_fd(fd)
        close_fd(extra_fd)
        raise


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed {n - len(buf)} bytes before the frame's end")
        buf += chunk
    return bytes(buf)


def close_fd(fd: int) -> None:
    """Close ``fd`` if it is one (>= 0), ignoring an error: for descriptors being let go."""
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def send_state(path: str, state: DaemonState, fd: int, timeout: float = 10.0,
               table_fd: int = -1) -> None:
    """Give ``state``, the connection fd (and its open-mode table's) to the supervisor at
    ``path``; returns once it acknowledged keeping them."""
    with connect(path, timeout) as sock:
        send_frame(sock, b"S", state.encode(), fd, table_fd)
        kind, payload, extra, extra2 = recv_frame(sock)
        close_fd(extra)
        close_fd(extra2)
        if kind != b"K":
            raise OSError(f"supervisor {path} refused the state: {payload.decode(errors='replace')}")


def request_takeover(path: str, daemon_id: str,
                     timeout: float = 10.0) -> tuple[bytes, int, int]:
    """Ask the supervisor for the state blob and the fds of ``daemon_id`` ("" = whatever
    the supervisor assigned to this process). Returns (blob, fd or -1, the open-mode
    table's fd or -1)."""
    with connect(path, timeout) as sock:
        send_frame(sock, b"T", json.dumps({"id": daemon_id}).encode())
        kind, payload, fd, table_fd = recv_frame(sock)
        if kind != b"R":
            close_fd(fd)
            close_fd(table_fd)
            raise OSError(f"supervisor {path}: {payload.decode(errors='replace')}")
        return payload, fd, table_fd

