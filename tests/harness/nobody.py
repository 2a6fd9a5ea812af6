"""Talking to a socket as another local user: a forked child that drops to ``nobody``."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable

NOBODY = pwd.getpwnam("nobody")


def as_nobody(talk: Callable[[], str], gid: int | None = None) -> str:
    """``talk()`` in a forked child running as nobody (primary gid ``gid`` if given): what it
    returned, "EACCES" when the socket's mode refused the connection, "hung up" when the
    server closed it, or the name and text of any other error."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(NOBODY.pw_gid if gid is None else gid)
            os.setuid(NOBODY.pw_uid)
            try:
                result = talk()
            except PermissionError:
                result = "EACCES"
            except (ConnectionResetError, BrokenPipeError):  # http.client's RemoteDisconnected too
                result = "hung up"
            except Exception as err:  # noqa: BLE001 - reported to the parent
                result = f"{type(err).__name__}: {err}"
            os.write(write, result.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out
