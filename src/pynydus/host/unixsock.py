"""Unix sockets that only their users may reach: created with their mode whatever the
umask, and each connection's peer credentials (SO_PEERCRED) checked.

The umask is the whole process's (other threads create files at the same time), so a
socket is bound under a temporary name, given its owner and mode, and only then renamed
to its path: nobody can connect during a window where it has the umask's mode. The mode
alone fails open under a careless chmod or a bind mount, so servers also check who is at
the other end before reading a byte (``allowed_peer``).
"""

from __future__ import annotations

import grp
import itertools
import os
import pwd
import socket
import struct

from pynydus.errors import InvalidArgument

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SERIAL = itertools.count()


def bind_private(sock: socket.socket, path: str, mode: int, *, uid: int = -1,
                 gid: int = -1) -> None:
    """Bind ``sock`` to ``path`` (free already) with ``mode`` and owner ``uid``:``gid``
    (-1 keeps ours), whatever the umask."""
    # Short, so that a path near the 107-byte limit still fits; unique per call.
    tmp = os.path.join(os.path.dirname(path), f".{os.getpid()}.{next(_SERIAL)}.s")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    sock.bind(tmp)
    try:
        if uid != -1 or gid != -1:
            os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """The connected peer's (pid, uid, gid) as the kernel recorded them at connect."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    return pid, uid, gid


def allowed_peer(uid: int, gid: int, group: int | None, owner: int | None = None) -> bool:
    """Root, our own uid, ``owner`` (a configured socket owner) and, when ``group`` is
    given, its members (primary or supplementary)."""
    if uid == 0 or uid == os.geteuid() or (owner is not None and uid == owner):
        return True
    if group is None:
        return False
    if gid == group:
        return True
    try:  # supplementary groups: SO_PEERCRED carries the primary gid only
        return group in os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:
        return False


def resolve_group(group: str, what: str = "API socket") -> int:
    """A group name or number as a gid; InvalidArgument if there is no such group."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidArgument(f"{what} group {group!r}: no such group") from None
