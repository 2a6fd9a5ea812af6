"""wait_ready asks a daemon for its state once per change of our account of it.

Prepare and Mounts of an image both call it; a request to a daemon busy serving the
container's first reads used to cost each of them milliseconds. Any change of the
daemon's state in our account (died, restarting, upgrading) makes the next call ask
again."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.errors import Unavailable
from pynydus.manager.manager import RUNNING, DaemonManager, LiveDaemon
from pynydus.manager.store import DaemonRecord, DaemonStore


class FakeDaemonApi:
    """A daemon API socket answering every GET /api/v1/daemon with ``state``."""

    def __init__(self, path: Path) -> None:
        self.state = RUNNING
        self.requests = 0
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(path))
        self._srv.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                self.requests += 1
                body = f'{{"state": "{self.state}"}}'.encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self._srv.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[DaemonManager, LiveDaemon, FakeDaemonApi]]:
    api = FakeDaemonApi(tmp_path / "api.sock")
    store = DaemonStore(tmp_path / "daemons.db")
    manager = DaemonManager(store, command=["true"])
    rec = DaemonRecord(id="d1", mode="shared", mountpoint=str(tmp_path / "mnt"),
                       api_socket=str(tmp_path / "api.sock"), config_path="", bootstrap="",
                       log_file="")
    live = LiveDaemon(rec, state=RUNNING)
    manager.daemons["d1"] = live
    yield manager, live, api
    api.close()
    store.close()


def test_the_daemon_is_asked_once_while_our_account_stays_running(
        setup: tuple[DaemonManager, LiveDaemon, FakeDaemonApi]) -> None:
    manager, live, api = setup
    for _ in range(5):
        assert manager.wait_ready("d1", timeout=5) is live
    assert api.requests == 1


def test_a_change_of_state_makes_the_next_call_ask_again(
        setup: tuple[DaemonManager, LiveDaemon, FakeDaemonApi]) -> None:
    manager, live, api = setup
    manager.wait_ready("d1", timeout=5)
    live.state = "RECOVERING"  # e.g. restarted after a death, images mounted again
    live.state = RUNNING
    manager.wait_ready("d1", timeout=5)
    manager.wait_ready("d1", timeout=5)
    assert api.requests == 2


def test_a_daemon_that_does_not_say_running_is_not_ready(
        setup: tuple[DaemonManager, LiveDaemon, FakeDaemonApi]) -> None:
    manager, live, api = setup
    api.state = "INIT"
    with pytest.raises(Unavailable):
        manager.wait_ready("d1", timeout=0.3)
    assert not live.confirmed
    api.state = RUNNING
    manager.wait_ready("d1", timeout=5)
    assert live.confirmed
