"""systemd's readiness protocol (``sd_notify``) for ``Type=notify`` units.

The snapshotter tells its service manager when it serves (``READY=1``: after the daemons
of the last run were recovered and the socket answers) and when it stops
(``STOPPING=1``), so that containerd, ordered ``After=`` the unit, starts against a
snapshotter that answers. The protocol is one datagram per message to the unix socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket); without that
variable nothing is sent, so the same binary runs under any supervisor.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify_address(env: Mapping[str, str] | None = None) -> str | bytes | None:
    """Where to send: a filesystem path, an abstract address (bytes), or None."""
    value = (os.environ if env is None else env).get(NOTIFY_SOCKET, "")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # systemd also knows vsock addresses; a snapshotter runs on the host


def notify(*fields: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one message; True if sent.

    Failures are logged, never raised: a supervisor's socket gone away must not stop
    the snapshotter."""
    address = notify_address(env)
    if address is None:
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as err:
        log.warning("sd_notify to %r failed: %s", address, err)
        return False
    return True
