"""One client must never starve the others, nor take the server down: attacks on the real
snapshotter process over its real socket, each measured by what another client sees.

Every test runs a well-behaved client (grpcio, as containerd's Go client would be) beside
the attacker and asserts that its Prepare, Commit and List keep answering quickly, and
that the server's threads and memory stay bounded. ``FIGURES`` lines (``pytest -s``)
record what was measured; docs/benchmarks.md keeps the before/after table.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from pynydus.api import snapshots_pb2, snapshots_pb2_grpc
from pynydus.grpcwire import connection as w

from .conftest import StartFn
from .h2peer import Peer, recv_until, whole_frames
from .support import SnapshotterClient, SnapshotterProcess

pytestmark = pytest.mark.root

PREPARE = "/containerd.services.snapshots.v1.Snapshots/Prepare"
USAGE = "/containerd.services.snapshots.v1.Snapshots/Usage"
# What another client's call may take while an attack runs (an idle server: ~1 ms; the
# bound leaves room for a loaded 2-core machine, far below the old hang).
SLOW = 3.0


def _figure(name: str, **values: object) -> None:
    print("FIGURES", name, " ".join(f"{k}={v}" for k, v in values.items()))


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_mb(pid: int) -> float:
    return _status(pid, "VmRSS") / 1024


def _threads(pid: int) -> int:
    return _status(pid, "Threads")


def _pid(proc: SnapshotterProcess) -> int:
    """The snapshotter's own pid (the harness starts it through ``sh -c exec``)."""
    assert proc.proc is not None
    return proc.proc.pid


def _connect(proc: SnapshotterProcess, settings: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(proc.address))
    sock.sendall(w.PREFACE + w.frame(w.SETTINGS, 0, 0, settings))
    return sock


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def _fresh_client(proc: SnapshotterProcess) -> SnapshotterClient:
    """A client on a connection of its own (grpcio shares connections between channels
    to one address unless told otherwise)."""
    client = SnapshotterClient(proc.address, timeout=SLOW * 4)
    client.channel.close()
    client.channel = grpc.insecure_channel("unix:" + str(proc.address),
                                           options=[("grpc.use_local_subchannel_pool", 1)])
    client.stub = snapshots_pb2_grpc.SnapshotsStub(client.channel)
    return client


def _victim_round(proc: SnapshotterProcess, tag: str) -> dict[str, float]:
    """Prepare, Commit and List by a fresh well-behaved client; seconds each."""
    client = _fresh_client(proc)
    try:
        key = f"victim-{tag}-{uuid.uuid4().hex[:8]}"
        return {"prepare": _timed(lambda: client.prepare(key)),
                "commit": _timed(lambda: client.commit(key + "-c", key)),
                "list": _timed(client.list)}
    finally:
        client.close()


def _assert_victim_fast(proc: SnapshotterProcess, tag: str) -> dict[str, float]:
    times = _victim_round(proc, tag)
    assert max(times.values()) < SLOW, f"another client's calls took {times}"
    return times


def _grpc_message(req: object) -> bytes:
    return req.SerializeToString()  # type: ignore[attr-defined]


def _usage_req(key: str) -> bytes:
    return _grpc_message(snapshots_pb2.UsageRequest(key=key))


def _goaway_code(data: bytes) -> int | None:
    for t, _, _, p in Peer.frames(whole_frames(data)):
        if t == w.GOAWAY:
            return int.from_bytes(p[4:8], "big")
    return None


@contextlib.contextmanager
def _raw(proc: SnapshotterProcess, settings: bytes = b"") -> Iterator[socket.socket]:
    sock = _connect(proc, settings)
    try:
        yield sock
    finally:
        sock.close()


def test_a_client_with_a_zero_window_does_not_starve_others(
        snapshotter: SnapshotterProcess, sn: SnapshotterClient) -> None:
    """Window 0 and 16 unary calls (all the workers there are): the responses wait for
    credit in the connection, not in 16 worker threads."""
    sn.prepare("u")
    peer = Peer()
    with _raw(snapshotter, struct.pack(">HL", w.S_INITIAL_WINDOW_SIZE, 0)) as sock:
        sock.sendall(b"".join(peer.request(1 + 2 * i, _usage_req("u"), USAGE) for i in range(16)))
        time.sleep(0.5)
        times = _assert_victim_fast(snapshotter, "zero-window")
        _figure("zero_window", **{k: f"{v * 1e3:.0f}ms" for k, v in times.items()})
        # the starved calls are answered once the client grants credit
        credit = struct.pack(">L", 1 << 20)
        sock.sendall(b"".join(w.frame(w.WINDOW_UPDATE, 0, 1 + 2 * i, credit) for i in range(16)))
        data = recv_until(sock, lambda d: sum(
            1 for t, f, _, _ in Peer.frames(whole_frames(d))
            if t == w.HEADERS and f & w.END_STREAM) >= 16)
        assert sum(1 for t, f, _, _ in Peer.frames(whole_frames(data))
                   if t == w.HEADERS and f & w.END_STREAM) == 16


_STALLED_CLIENT = r"""
import socket, sys
from pynydus.grpcwire import connection as w
from tests.integration.snapshotter.h2peer import LIST, Peer
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
peer = Peer()
sock.sendall(w.PREFACE + w.frame(w.SETTINGS, 0, 0)
             + b"".join(peer.request(1 + 2 * i, b"", LIST) for i in range(16)))
print("sent", flush=True)
sys.stdin.read()  # never reads the socket; the test stops us with SIGSTOP
"""


def test_a_stopped_client_does_not_starve_others(
        snapshotter: SnapshotterProcess, sn: SnapshotterClient) -> None:
    """16 Lists larger than the default windows from a client that stops (SIGSTOP): the
    Lists wait for credit, bounded, while other clients go on; then they are cancelled."""
    for i in range(300):
        sn.prepare(f"s{i:03}", labels={"pad": "p" * 900})
    child = subprocess.Popen([sys.executable, "-c", _STALLED_CLIENT, str(snapshotter.address)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             cwd=Path(__file__).resolve().parents[3])
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"sent"
        time.sleep(0.5)
        os.kill(child.pid, signal.SIGSTOP)
        times = _assert_victim_fast(snapshotter, "stopped")
        _figure("stopped_client", **{k: f"{v * 1e3:.0f}ms" for k, v in times.items()})
        # within the stall timeout (10 s) plus a tick the stalled Lists are given up
        time.sleep(12)
        _assert_victim_fast(snapshotter, "stopped-later")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def test_rapid_reset_costs_others_nothing_and_ends_the_connection(
        snapshotter: SnapshotterProcess, sn: SnapshotterClient) -> None:
    """Hundreds of HEADERS + DATA + RST_STREAM in one write, again and again: none of the
    reset calls runs, other clients' Lists stay fast, memory stays flat, and the
    attacking connection is told ENHANCE_YOUR_CALM."""
    pid = _pid(snapshotter)
    for i in range(200):
        sn.prepare(f"r{i:03}")
    rss0 = _rss_mb(pid)
    stop = threading.Event()
    goaways: list[int | None] = []

    def attack() -> None:
        peer_sid = 0
        while not stop.is_set():
            peer = Peer()
            try:
                with _raw(snapshotter) as sock:
                    burst = b""
                    for i in range(500):
                        peer_sid = 1 + 2 * i
                        req = _grpc_message(snapshots_pb2.PrepareSnapshotRequest(
                            key=f"attack-{uuid.uuid4().hex}"))
                        burst += (peer.request(peer_sid, req, PREPARE)
                                  + w.frame(w.RST_STREAM, 0, peer_sid, struct.pack(">L", w.CANCEL)))
                    sock.sendall(burst)
                    goaways.append(_goaway_code(recv_until(sock, lambda d: False, limit=5)))
            except OSError:
                continue  # the server closed on us mid-write

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    worst, rss_max = 0.0, rss0
    t_end = time.monotonic() + 8
    while time.monotonic() < t_end:
        worst = max(worst, _timed(sn.list))
        rss_max = max(rss_max, _rss_mb(pid))
        time.sleep(0.1)
    stop.set()
    attacker.join(timeout=30)
    ran = [i.name for i in sn.list() if i.name.startswith("attack-")]
    _figure("rapid_reset", list_worst=f"{worst * 1e3:.0f}ms", rss0=f"{rss0:.0f}MB",
            rss_max=f"{rss_max:.0f}MB", connections=len(goaways), reset_calls_run=len(ran),
            goaway=sorted(set(goaways), key=str))
    assert worst < SLOW
    assert rss_max - rss0 < 60
    assert goaways and all(code == w.ENHANCE_YOUR_CALM for code in goaways), goaways
    assert len(ran) < 50, f"{len(ran)} reset calls ran"


def test_request_bodies_beyond_the_window_end_the_connection_and_memory_stays_flat(
        snapshotter: SnapshotterProcess, sn: SnapshotterClient) -> None:
    """20 streams each sending 15 MiB without regard to flow control."""
    pid = _pid(snapshotter)
    rss0 = _rss_mb(pid)
    peer = Peer()
    chunk = w.frame(w.DATA, 0, 0, bytes(16_000))[9:]
    with _raw(snapshotter) as sock:
        sock.sendall(b"".join(w.frame(w.HEADERS, w.END_HEADERS, 1 + 2 * i, peer.headers(PREPARE))
                              for i in range(20)))
        sent = 0
        with contextlib.suppress(OSError):
            for _ in range(15 * 1024 * 1024 // 16_000):
                for i in range(20):
                    sock.sendall(w.frame(w.DATA, 0, 1 + 2 * i, chunk))
                    sent += len(chunk)
        rss_max = max(rss0, _rss_mb(pid))
        _figure("window_overrun", sent_mb=f"{sent / 2**20:.1f}", rss0=f"{rss0:.0f}MB",
                rss_after=f"{rss_max:.0f}MB")
        data = recv_until(sock, lambda d: _goaway_code(d) is not None, limit=10)
    assert _goaway_code(data) == w.FLOW_CONTROL_ERROR
    assert sent < 24 << 20  # cut off once it holds 16 MiB beyond its window, not 300 MiB later
    assert rss_max - rss0 < 40
    _assert_victim_fast(snapshotter, "overrun")


def test_idle_connections_cost_no_thread_and_are_closed(
        snapshotter: SnapshotterProcess, sn: SnapshotterClient) -> None:
    """300 connections that never send a preface: no thread each, the server keeps
    answering, and they are closed after the preface timeout (10 s)."""
    pid = _pid(snapshotter)
    threads0, rss0 = _threads(pid), _rss_mb(pid)
    socks = []
    try:
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(snapshotter.address))
            socks.append(s)
        time.sleep(1.0)
        threads1, rss1 = _threads(pid), _rss_mb(pid)
        times = _assert_victim_fast(snapshotter, "idle")
        _figure("idle_connections", n=len(socks), threads_before=threads0,
                threads_after=threads1, rss0=f"{rss0:.0f}MB", rss1=f"{rss1:.1f}MB",
                list=f"{times['list'] * 1e3:.0f}ms")
        assert threads1 <= threads0 + 2
        # beyond the connection limit (256) the rest were closed at accept; the others
        # go at the preface timeout
        deadline = time.monotonic() + 20
        open_ones = list(socks)
        while open_ones and time.monotonic() < deadline:
            still = []
            for s in open_ones:
                s.settimeout(0.01)
                try:
                    if s.recv(1 << 16) == b"":
                        continue
                except TimeoutError:
                    pass
                except OSError:
                    continue
                still.append(s)
            open_ones = still
            time.sleep(0.2)
        assert not open_ones, f"{len(open_ones)} idle connections still open"
    finally:
        for s in socks:
            s.close()


def test_a_flood_of_empty_continuation_frames_ends_the_connection(
        snapshotter: SnapshotterProcess, sn: SnapshotterClient) -> None:
    peer = Peer()
    with _raw(snapshotter) as sock:
        sock.sendall(w.frame(w.HEADERS, 0, 1, peer.headers()[:5]))
        with contextlib.suppress(OSError):
            for _ in range(100):
                sock.sendall(w.frame(w.CONTINUATION, 0, 1) * 1000)
        data = recv_until(sock, lambda d: _goaway_code(d) is not None, limit=10)
    assert _goaway_code(data) == w.ENHANCE_YOUR_CALM
    _assert_victim_fast(snapshotter, "continuation")


# --- thread limits: pids.max (what systemd's TasksMax sets) ---------------------------------

_PIDS = Path("/sys/fs/cgroup/pids")


@contextlib.contextmanager
def _pids_cgroup() -> Iterator[Path]:
    if not (_PIDS / "cgroup.procs").exists():
        pytest.fail(f"no pids cgroup controller at {_PIDS} (cgroup v1 layout expected)")
    cg = _PIDS / f"pyn-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        yield cg
    finally:
        for pid in (cg / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (_PIDS / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            cg.rmdir()


def test_connections_are_served_when_no_thread_can_be_created(
        snapshotter: SnapshotterProcess, sn: SnapshotterClient) -> None:
    """At the pids limit nothing may stop the server: new connections are accepted and
    answered (a connection costs no thread)."""
    pid = _pid(snapshotter)
    with _pids_cgroup() as cg:
        (cg / "cgroup.procs").write_text(str(pid))
        current = int((cg / "pids.current").read_text())
        (cg / "pids.max").write_text(str(current))
        for i in range(10):
            _assert_victim_fast(snapshotter, f"pids-{i}")
        _figure("pids_max", pids=current, connections=10, served="all")


def test_a_server_that_cannot_start_its_threads_exits_non_zero(start_snapshotter: StartFn) -> None:
    with _pids_cgroup() as cg:
        (cg / "pids.max").write_text("6")
        proc = start_snapshotter(wait=False)
        assert proc.proc is not None
        (cg / "cgroup.procs").write_text(str(proc.proc.pid))  # before it starts its threads
        try:
            rc = proc.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the snapshotter lives on without the threads to serve")
        assert rc != 0
        assert "threads" in proc.stderr_path.read_text()
