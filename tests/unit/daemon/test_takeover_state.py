"""The takeover state blob and the supervisor's frames.

Contract: ``DaemonState.decode(state.encode()) == state``; any change to the payload, a
cut, another format or version is a ``StateError`` naming what is wrong (the manager
then restarts instead of taking over); frames carry an fd with SCM_RIGHTS, received
close-on-exec; the supervisor keeps the latest connection per daemon, hands it to a
successor asking on that daemon's socket and refuses states it cannot read.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

import pytest

from pynydus.daemon import fuseproto as P
from pynydus.daemon.takeover import (
    VERSION,
    DaemonState,
    MountState,
    StateError,
    recv_frame,
    request_takeover,
    send_frame,
    send_state,
)
from pynydus.manager.supervisor import Supervisor

PARAMS, _ = P.negotiate(P.InitIn(7, 45, 128 << 10, P.INIT_EXT | P.MAX_PAGES | P.HAS_RESEND),
                        P.InitWants())


def _state(**kw: object) -> DaemonState:
    base: dict[str, object] = {
        "daemon_id": "d1", "mountpoint": "/var/lib/mnt", "init": PARAMS, "next_slot": 4,
        "mounts": (MountState("/a", 2, "/s/a/image.boot", '{"device": {}}', 1.5),
                   MountState("/b", 3, "/s/b/image.boot", "{}", 2.5))}
    base.update(kw)
    return DaemonState(**base)  # type: ignore[arg-type]


def test_state_round_trips() -> None:
    state = _state()
    assert DaemonState.decode(state.encode()) == state
    one = _state(mounts=(MountState("/", 0, "/boot", "{}"),), next_slot=1)
    assert DaemonState.decode(one.encode()) == one


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b.replace(b'"next_slot": 4', b'"next_slot": 5'), "checksum mismatch"),
    (lambda b: b[:-10], "checksum mismatch"),
    (lambda b: b.replace(b"PYNYDUSD-STATE/%d" % VERSION, b"PYNYDUSD-STATE/%d" % (VERSION + 1)),
     f"state version {VERSION + 1} is not {VERSION}"),
    (lambda b: b"garbage", "no header line"),
    (lambda b: b"PYNYDUSD-STATE/x y\n{}", "malformed"),
])
def test_damaged_states_are_refused(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StateError, match=match):
        DaemonState.decode(mutate(_state().encode()))


@pytest.mark.parametrize("state, match", [
    (_state(mountpoint="relative"), "not absolute"),
    (_state(mounts=(MountState("/a", 2, "s", "{}"), MountState("/b", 2, "s", "{}"))), "repeat"),
    (_state(mounts=(MountState("/", 0, "s", "{}"), MountState("/b", 2, "s", "{}"))), "mixes"),
    (_state(next_slot=0), "next_slot"),
    (_state(failover_policy="none"), "failover_policy"),
])
def test_inconsistent_states_are_refused(state: DaemonState, match: str) -> None:
    with pytest.raises(StateError, match=match):
        DaemonState.decode(state.encode())  # a correct checksum over a wrong content


def test_frames_carry_an_fd_close_on_exec(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        send_frame(a, b"S", b"x" * 100_000, fd)
        kind, payload, got, none = recv_frame(b)
        assert none == -1
        assert (kind, payload) == (b"S", b"x" * 100_000)
        assert os.path.samestat(os.fstat(got), os.fstat(fd))
        assert fcntl.fcntl(got, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.close(got)
        send_frame(a, b"K")
        assert recv_frame(b) == (b"K", b"", -1, -1)
        a.close()
        with pytest.raises(EOFError):
            recv_frame(b)
    finally:
        os.close(fd)
        b.close()


def test_supervisor_keeps_the_latest_and_hands_it_over(tmp_path: Path) -> None:
    sup = Supervisor(str(tmp_path / "sup"))
    try:
        path = sup.add("d1")
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        with pytest.raises(OSError, match="no FUSE connection is held"):
            request_takeover(path, "d1")
        first = os.open(tmp_path, os.O_RDONLY)
        second = os.open("/", os.O_RDONLY)
        send_state(path, _state(), first)
        table = os.memfd_create("iomodes")  # a passthrough daemon's open-mode table
        send_state(path, _state(next_slot=9), second, table_fd=table)
        held = sup.held("d1")
        assert held is not None and held.state.next_slot == 9 and held.sender_pid == os.getpid()
        blob, fd, got_table = request_takeover(path, "d1")
        assert DaemonState.decode(blob).next_slot == 9
        assert os.path.samestat(os.fstat(fd), os.fstat(second))
        assert os.path.samestat(os.fstat(got_table), os.fstat(table))
        os.close(fd)
        os.close(got_table)
        os.close(table)
        with pytest.raises(OSError, match="serves daemon d1, not d2"):
            request_takeover(path, "d2")
        with pytest.raises(OSError, match="refused the state: state of daemon 'other'"):
            send_state(path, _state(daemon_id="other"), first)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            send_frame(s, b"S", _state().encode()[:-3], first)
            kind, payload, _, _ = recv_frame(s)
            assert kind == b"E" and b"checksum" in payload
        sup.drop("d1")
        assert sup.held("d1") is None
        sup.remove("d1")
        assert not os.path.exists(path)
        os.close(first)
        os.close(second)
    finally:
        sup.close()
