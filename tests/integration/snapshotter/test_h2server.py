"""The snapshotter process on our HTTP/2 server: protocol edges a grpcio client never hits,
flow control of a large List, graceful stop, and the grpcio fallback answering alike."""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import time

import grpc
import pytest

from pynydus.api import snapshots_pb2
from pynydus.grpcwire import connection as w
from pynydus.snapshot.server import SERVER_ENV

from .conftest import StartFn
from .h2peer import LIST, Peer, recv_until, whole_frames
from .support import SnapshotterClient, SnapshotterProcess


def _connect(proc: SnapshotterProcess, settings: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(proc.address))
    sock.sendall(w.PREFACE + w.frame(w.SETTINGS, 0, 0, settings))
    return sock


def _ended(sid: int):  # type: ignore[no-untyped-def]
    def done(data: bytes) -> bool:
        return any(t == w.HEADERS and f & w.END_STREAM and s == sid
                   for t, f, s, _ in Peer.frames(whole_frames(data)))
    return done


@pytest.mark.parametrize("server", ["h2", "grpcio"])
def test_both_servers_answer_alike(server: str, start_snapshotter: StartFn,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SERVER_ENV, server)
    proc = start_snapshotter()
    sn = proc.client
    assert sn is not None
    sn.prepare("a", labels={"x": "1"})
    assert sn.stat("a").labels == {"x": "1"}
    assert [m.type for m in sn.mounts("a")] == ["bind"]
    assert [i.name for i in sn.list()] == ["a"]
    with pytest.raises(grpc.RpcError) as err:
        sn.stat("missing")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "missing" in (err.value.details() or "")
    assert stat.S_IMODE(os.stat(proc.address).st_mode) == 0o660


def test_unknown_method_is_unimplemented(sn: SnapshotterClient) -> None:
    call = sn.channel.unary_unary("/containerd.services.snapshots.v1.Snapshots/Rename")
    with pytest.raises(grpc.RpcError) as err:
        call(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_list_larger_than_every_flow_control_window_arrives_whole(sn: SnapshotterClient) -> None:
    label = {"containerd.io/snapshot/pad": "p" * 400}
    for i in range(1500):
        sn.prepare(f"k{i:04}", labels=label)
    infos = sn.list()  # about 700 KB: ten times grpcio's and HTTP/2's initial windows
    assert sorted(i.name for i in infos) == [f"k{i:04}" for i in range(1500)]


def test_malformed_connection_gets_goaway_and_the_server_keeps_serving(
        snapshotter: SnapshotterProcess, sn: SnapshotterClient) -> None:
    for junk in [b"GET / HTTP/1.1\r\n\r\n", w.PREFACE + b"\xff" * 40]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(snapshotter.address))
        sock.sendall(junk)
        data = recv_until(sock, lambda d: False)  # until the server closes
        sock.close()
        frames = Peer.frames(whole_frames(data))
        assert frames[-1][0] == w.GOAWAY
        assert int.from_bytes(frames[-1][3][4:8], "big") in (w.PROTOCOL_ERROR, w.FRAME_SIZE_ERROR)
    sn.prepare("still-here")
    assert sn.stat("still-here").name == "still-here"


def test_stat_and_list_over_one_raw_connection(snapshotter: SnapshotterProcess,
                                               sn: SnapshotterClient) -> None:
    sn.prepare("r")
    peer = Peer()
    sock = _connect(snapshotter)
    req = snapshots_pb2.StatSnapshotRequest(key="r").SerializeToString()
    sock.sendall(peer.request(1, req) + peer.request(3, b"", LIST)
                 + peer.request(5, req, "/containerd.services.snapshots.v1.Snapshots/Nope"))
    data = whole_frames(recv_until(sock, lambda d: all(_ended(s)(d) for s in (1, 3, 5))))
    sock.close()
    fields, msgs, _ = peer.response(data, 1)
    assert fields["grpc-status"] == "0"
    assert snapshots_pb2.StatSnapshotResponse.FromString(msgs[0]).info.name == "r"
    fields, msgs, _ = peer.response(data, 3)
    assert fields["grpc-status"] == "0" and len(msgs) == 1
    assert peer.response(data, 5)[0]["grpc-status"] == "12"


def test_sigterm_lets_a_list_waiting_for_credit_finish(snapshotter: SnapshotterProcess,
                                                      sn: SnapshotterClient) -> None:
    """A List blocked on flow control is in flight: SIGTERM sends GOAWAY and waits for it;
    when the client grants credit the List completes, then the process exits."""
    for i in range(300):
        sn.prepare(f"g{i:03}", labels={"pad": "q" * 200})
    peer = Peer()
    sock = _connect(snapshotter, struct.pack(">HL", w.S_INITIAL_WINDOW_SIZE, 1000))
    sock.sendall(peer.request(1, b"", LIST))
    first = recv_until(sock, lambda d: any(
        t == w.DATA for t, *_ in Peer.frames(whole_frames(d))))
    assert snapshotter.proc is not None
    os.kill(snapshotter.proc.pid, signal.SIGTERM)
    seen = first + recv_until(sock, lambda d: any(
        t == w.GOAWAY for t, *_ in Peer.frames(whole_frames(first + d))))
    time.sleep(0.3)
    assert snapshotter.proc.poll() is None  # still draining the List
    credit = struct.pack(">L", 1 << 24)
    sock.sendall(w.frame(w.WINDOW_UPDATE, 0, 1, credit) + w.frame(w.WINDOW_UPDATE, 0, 0, credit))
    rest = recv_until(sock, lambda d: _ended(1)(seen + d))
    fields, msgs, _ = peer.response(whole_frames(seen + rest), 1)
    sock.close()
    assert fields["grpc-status"] == "0"
    names = [i.name for m in msgs for i in snapshots_pb2.ListSnapshotsResponse.FromString(m).info]
    assert len(names) == 300
    snapshotter.proc.wait(timeout=30)
