"""Two snapshotters never share a root or a socket: the second one exits non-zero at once,
naming the first one's pid, and the first one keeps serving with its socket in place."""

from __future__ import annotations

import os
import socket
import time

from .conftest import StartFn
from .support import SnapshotterClient, SnapshotterProcess

_EXIT_WAIT = 15.0


def _refused(proc: SnapshotterProcess) -> str:
    """The second instance exited non-zero by itself; its stderr."""
    assert proc.proc is not None
    t0 = time.monotonic()
    rc = proc.proc.wait(timeout=_EXIT_WAIT)
    assert rc != 0, proc.logs()
    assert time.monotonic() - t0 < _EXIT_WAIT
    return proc.stderr_path.read_text()


def _still_serving(first: SnapshotterProcess) -> None:
    assert first.client is not None
    first.client.prepare(f"after-{time.monotonic_ns()}")
    assert first.address.is_socket()


def test_a_second_snapshotter_on_the_same_root_exits_naming_the_first(
        start_snapshotter: StartFn) -> None:
    first = start_snapshotter()
    first.client.prepare("a")  # type: ignore[union-attr]
    assert first.proc is not None
    second = start_snapshotter(wait=False, extra_args=["--root", str(first.root)])
    err = _refused(second)
    assert "in use" in err and f"pid {first.proc.pid}" in err, err
    assert not second.address.exists()  # it bound nothing
    _still_serving(first)


def test_a_second_snapshotter_on_the_same_address_exits_naming_the_first(
        start_snapshotter: StartFn) -> None:
    first = start_snapshotter()
    assert first.proc is not None
    second = start_snapshotter(wait=False, extra_args=["--address", str(first.address)])
    err = _refused(second)
    assert "served by another process" in err and f"pid {first.proc.pid}" in err, err
    _still_serving(first)


def test_a_file_at_the_address_is_never_deleted(start_snapshotter: StartFn) -> None:
    proc = start_snapshotter(wait=False, extra_args=[])
    proc.stop()
    proc.address.write_text("precious")
    again = start_snapshotter(wait=False, extra_args=["--address", str(proc.address)])
    err = _refused(again)
    assert "not a socket" in err, err
    assert proc.address.read_text() == "precious"


def test_a_stale_socket_is_replaced(start_snapshotter: StartFn) -> None:
    proc = start_snapshotter(wait=False)
    proc.stop()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(proc.address))  # bound, never listening, closed: what a crash leaves
    stale.close()
    assert proc.address.is_socket()
    proc.start()
    _still_serving(proc)


def test_stopping_leaves_a_successors_socket_alone(start_snapshotter: StartFn) -> None:
    """Someone removed the first one's socket and started another on that path: the
    first one's stop must not unlink the successor's socket."""
    first = start_snapshotter()
    os.unlink(first.address)
    start_snapshotter(wait=False, extra_args=["--address", str(first.address)])
    deadline = time.monotonic() + 20
    while not first.address.is_socket():
        assert time.monotonic() < deadline, "the second snapshotter did not bind"
        time.sleep(0.05)
    first.stop()
    assert first.address.is_socket()
    client = SnapshotterClient(first.address)
    try:
        client.prepare("still-reachable")
    finally:
        client.close()
