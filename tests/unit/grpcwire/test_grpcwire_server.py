"""The server's I/O thread in-process: what it does when accept(2) fails."""

from __future__ import annotations

import errno
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from pynydus.grpcwire.connection import Limits
from pynydus.grpcwire.server import H2Server


class _FailingListener(socket.socket):
    """A real listening socket whose accept() fails with ``errors`` first, in order."""

    errors: list[int]

    def accept(self) -> Any:  # type: ignore[override]
        if self.errors:
            raise OSError(self.errors.pop(0), "injected")
        return super().accept()


def _server(errors: list[int]) -> tuple[H2Server, Path, list[BaseException]]:
    path = Path(tempfile.mkdtemp(prefix="pyn-h2-")) / "s.sock"
    listener = _FailingListener(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.errors = errors
    listener.bind(str(path))
    listener.listen(8)
    fatal: list[BaseException] = []
    server = H2Server({}, listener, workers=2, limits=Limits(), on_fatal=fatal.append)
    server.start()
    return server, path, fatal


def _settings_arrive(path: Path, timeout: float = 30.0) -> bool:
    """A client connects and gets the server's SETTINGS frame."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(str(path))
        try:
            head = c.recv(9)
        except (TimeoutError, OSError):
            return False
        return len(head) == 9 and head[3] == 4  # a SETTINGS frame


def test_descriptor_exhaustion_pauses_accepts_and_serving_goes_on() -> None:
    server, path, fatal = _server([errno.EMFILE, errno.ENFILE])
    try:
        assert _settings_arrive(path)
        assert not fatal
    finally:
        server.stop(0).wait(10)
        shutil.rmtree(path.parent, ignore_errors=True)


def test_a_broken_listener_is_fatal_not_a_silent_death() -> None:
    server, path, fatal = _server([errno.EINVAL])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(path))
            deadline = time.monotonic() + 30  # a loaded machine
            while not fatal and time.monotonic() < deadline:
                time.sleep(0.02)
        assert fatal and isinstance(fatal[0], OSError)
        server._io.join(30)
        assert not server._io.is_alive()
    finally:
        server.stop(0).wait(10)
        shutil.rmtree(path.parent, ignore_errors=True)


def test_an_idle_connection_is_told_goaway_and_closed() -> None:
    """A connection with no stream open and nothing leaving is closed after
    ``Timeouts.idle`` (a GOAWAY first), so idle clients cannot hold the 256 places."""
    from pynydus.grpcwire import connection as w
    from pynydus.grpcwire.server import Timeouts

    path = Path(tempfile.mkdtemp(prefix="pyn-h2-")) / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    server = H2Server({}, listener, workers=1, limits=Limits(), timeouts=Timeouts(idle=0.5))
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(30)  # a loaded machine; the idle clock is 0.5 s
            c.connect(str(path))
            c.sendall(w.PREFACE + w.frame(w.SETTINGS, 0, 0))
            got = b""
            t0 = time.monotonic()
            while chunk := c.recv(1 << 16):
                got += chunk
            waited = time.monotonic() - t0
        types = []
        while len(got) >= 9:
            n = int.from_bytes(got[:3], "big")
            types.append(got[3])
            got = got[9 + n:]
        assert w.GOAWAY in types, types
        assert waited >= 0.5
    finally:
        server.stop(0).wait(10)
        shutil.rmtree(path.parent, ignore_errors=True)
