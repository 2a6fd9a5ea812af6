"""One process per root, one listener per socket path.

``lock_root(root)``: an exclusive ``flock`` on ``<root>/snapshotter.lock``, held for the
life of the process (the descriptor is close-on-exec, so daemons we spawn never hold
it), with our pid written inside so that a second instance can name the holder. A
second snapshotter on the same root would otherwise adopt, and on stop kill, the first
one's daemons.

``claim_socket(path)``: ``path`` is free for a new listener. A socket that a live
process answers on is never taken over (its pid, from SO_PEERCRED, is named); a stale
socket (connection refused) is removed; anything else (a regular file, a directory) is
never deleted. ``SocketClaim.release()`` unlinks the socket only while it is still the
one we bound (same device and inode), so stopping never removes a successor's socket.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynydus.errors import FailedPrecondition, q

if TYPE_CHECKING:  # a daemon claims its API socket at start: no pathlib at idle
    from os import PathLike
    from pathlib import Path

LOCK_NAME = "snapshotter.lock"


class RootLock:
    """The held lock on a root; ``release()`` (idempotent) ends it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def lock_root(root: Path) -> RootLock:
    """Lock ``root`` for this process or raise FailedPrecondition naming the holder."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FailedPrecondition(
                f"root {q(str(root))} is in use by another snapshotter (pid {holder}, "
                f"lock {path}); stop it or choose another root") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RootLock(path, fd)


@dataclass(frozen=True)
class SocketClaim:
    """The socket file we bound at ``path``."""

    path: Path
    dev: int
    ino: int

    @classmethod
    def of(cls, path: Path) -> SocketClaim:
        st = os.lstat(path)
        return cls(path, st.st_dev, st.st_ino)

    def release(self) -> None:
        """Unlink the socket if it is still ours; leave anything else alone."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == (self.dev, self.ino):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[0])


def claim_socket(path: str | PathLike[str]) -> None:
    """Make ``path`` free for a new unix socket listener, or raise FailedPrecondition."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(
            f"address {q(path)} exists and is not a socket; refusing to replace it "
            f"(remove it or choose another address)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # nobody listens: a leftover of a crash
        return
    except OSError as err:
        raise FailedPrecondition(f"address {q(path)}: cannot tell whether it is in use: "
                                 f"{err}") from err
    else:
        try:
            holder = str(_peer_pid(probe))
        except OSError:
            holder = "unknown"
        raise FailedPrecondition(
            f"address {q(path)} is served by another process (pid {holder}); "
            f"stop it or choose another address")
    finally:
        probe.close()
