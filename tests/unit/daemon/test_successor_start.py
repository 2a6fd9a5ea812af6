"""What a failover successor does not do before it serves: build its registry clients
(``RegistryBackend(defer=True)``: no thread, built by ``warm()`` or the first read that
needs one) or start threads for its first FUSE workers (``Parked``: started in advance,
each runs one function when asked)."""

from __future__ import annotations

import threading
import time

import pytest

from pynydus.daemon import registry_backend
from pynydus.daemon.config import RegistryConfig
from pynydus.daemon.daemon import Parked
from pynydus.daemon.registry_backend import RegistryBackend


class _Client:
    closed = False

    def close(self) -> None:
        self.closed = True


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


def test_a_deferred_backend_builds_its_client_when_warmed_or_needed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    def fake(cfg: RegistryConfig) -> _Client:
        built.append(threading.current_thread().name)
        return _Client()

    monkeypatch.setattr(registry_backend, "client_from_config", fake)
    deferred = RegistryBackend(RegistryConfig(host="r.example"), defer=True)
    time.sleep(0.05)
    assert built == [] and "registry-client" not in _threads()
    client = deferred.client  # a read needs it: built right here, once
    assert built == [threading.current_thread().name] and deferred.client is client
    deferred.warm()
    assert len(built) == 1
    deferred.close()
    assert client.closed  # type: ignore[attr-defined]

    warmed = RegistryBackend(RegistryConfig(host="r.example"), defer=True)
    warmed.warm()
    assert len(built) == 2 and isinstance(warmed.client, _Client)
    eager = RegistryBackend(RegistryConfig(host="r.example"))  # a daemon's own: its thread
    assert isinstance(eager.client, _Client) and len(built) == 3


def test_parked_threads_run_what_they_are_given_under_its_name() -> None:
    parked = Parked(2)
    ran: list[str] = []
    done = threading.Event()

    def work() -> None:
        ran.append(threading.current_thread().name)
        if len(ran) == 2:
            done.set()

    parked.run(work, "fuse-0")
    parked.run(work, "fuse-1")
    assert done.wait(10)
    assert sorted(ran) == ["fuse-0", "fuse-1"]
    parked.close()  # nothing left to run: the threads end
