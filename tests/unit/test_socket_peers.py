"""The snapshotter's own sockets (the Snapshots gRPC socket and the system controller's)
are born with their mode whatever the umask, and a peer that is neither root, our uid nor
the configured owner or group is hung up on even when the mode lets it connect: checked
with a forked child that drops to ``nobody``. pynydusd's API socket has the same tests in
tests/unit/daemon/test_api_socket.py."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pynydus.errors import FailedPrecondition
from pynydus.grpcwire.server import serve
from pynydus.host.unixsock import allowed_peer, bind_private
from pynydus.system.controller import Reply
from pynydus.system.server import SystemServer
from tests.harness.nobody import NOBODY, as_nobody


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="pyn-peers-", dir="/var/tmp")
    os.chmod(d, 0o755)  # nobody may reach the socket: its own mode is what counts
    old = os.umask(0)  # the issue: under umask 000 a socket was world-writable
    try:
        yield d
    finally:
        os.umask(old)
        shutil.rmtree(d, ignore_errors=True)


def _first_bytes(path: str, send: bytes) -> str:
    """Connect, send ``send``, and say what came back: "hung up" or the first bytes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(path)
        try:
            c.sendall(send)
        except (BrokenPipeError, ConnectionResetError):
            return "hung up"
        got = c.recv(64)
    return "hung up" if not got else got.decode("latin-1")


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
GET_DAEMONS = b"GET /api/v1/daemons HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


def _h2(path: str) -> str:
    got = _first_bytes(path, PREFACE)
    return "settings" if got != "hung up" and got.encode("latin-1")[3] == 4 else got


def _http(path: str) -> str:
    got = _first_bytes(path, GET_DAEMONS)
    return got.split("\r\n")[0] if got != "hung up" else got


class _Ctl:
    def handle(self, method: str, path: str, body: bytes = b"") -> Reply:
        return Reply(200, {"daemons": []})


def _mode(path: str) -> int:
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode)


@pytest.mark.root
def test_snapshots_socket_is_0660_under_umask_000_and_refuses_other_users(sockdir: str) -> None:
    path = os.path.join(sockdir, "snap.sock")
    server = serve({}, Path(path), workers=2)
    try:
        assert _mode(path) == 0o660
        assert os.listdir(sockdir) == ["snap.sock"]  # no temporary name left behind
        assert as_nobody(lambda: _h2(path)) == "EACCES"  # the mode stops them
        os.chmod(path, 0o666)  # a careless chmod: the peer check still hangs up on them
        assert as_nobody(lambda: _h2(path)) == "hung up"
        assert _h2(path) == "settings"  # root is served
    finally:
        server.stop().wait(10)


@pytest.mark.root
def test_snapshots_socket_serves_the_configured_group(sockdir: str) -> None:
    path = os.path.join(sockdir, "snap.sock")
    group = 4243  # a gid no user has: nobody joins it for the test
    server = serve({}, Path(path), workers=2, gid=group)
    try:
        assert os.stat(path).st_gid == group and _mode(path) == 0o660
        assert as_nobody(lambda: _h2(path), gid=group) == "settings"
        assert as_nobody(lambda: _h2(path)) == "EACCES"
    finally:
        server.stop().wait(10)


@pytest.mark.root
def test_system_socket_is_0600_under_umask_000_and_refuses_other_users(sockdir: str) -> None:
    path = os.path.join(sockdir, "system.sock")
    server = SystemServer(_Ctl(), path)  # type: ignore[arg-type]
    try:
        assert _mode(path) == 0o600
        assert os.listdir(sockdir) == ["system.sock"]
        assert as_nobody(lambda: _http(path)) == "EACCES"
        os.chmod(path, 0o666)
        assert as_nobody(lambda: _http(path)) == "hung up"
        assert _http(path) == "HTTP/1.1 200 OK"
    finally:
        server.stop()
    assert not os.path.exists(path)


@pytest.mark.root
def test_system_socket_serves_its_configured_owner(sockdir: str) -> None:
    path = os.path.join(sockdir, "system.sock")
    server = SystemServer(_Ctl(), path, uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)  # type: ignore[arg-type]
    try:
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, _mode(path)) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o600)
        assert as_nobody(lambda: _http(path)) == "HTTP/1.1 200 OK"
    finally:
        server.stop()


def test_system_socket_never_replaces_a_file_nor_a_live_socket(sockdir: str) -> None:
    """[system] address is claimed as the Snapshots address is: a regular file there is
    never deleted, a socket somebody answers on is never taken over (its pid is named)."""
    path = os.path.join(sockdir, "system.sock")
    Path(path).write_text("precious")
    with pytest.raises(FailedPrecondition, match="not a socket"):
        SystemServer(_Ctl(), path)  # type: ignore[arg-type]
    assert Path(path).read_text() == "precious"
    os.unlink(path)
    first = SystemServer(_Ctl(), path)  # type: ignore[arg-type]
    try:
        with pytest.raises(FailedPrecondition, match=f"served by another process .pid {os.getpid()}"):
            SystemServer(_Ctl(), path)  # type: ignore[arg-type]
        assert _http(path) == "HTTP/1.1 200 OK"
    finally:
        first.stop()


def test_stopping_the_system_server_leaves_a_successors_socket_alone(sockdir: str) -> None:
    path = os.path.join(sockdir, "system.sock")
    first = SystemServer(_Ctl(), path)  # type: ignore[arg-type]
    os.unlink(path)  # somebody removed it and started another controller there
    second = SystemServer(_Ctl(), path)  # type: ignore[arg-type]
    try:
        first.stop()
        assert _http(path) == "HTTP/1.1 200 OK"
    finally:
        second.stop()
    assert not os.path.exists(path)


def test_bind_private_keeps_long_paths_within_the_limit(tmp_path: Any) -> None:
    # The temporary name is short: a path that fits sun_path binds, whatever its length.
    d = tmp_path / ("d" * max(1, 100 - len(str(tmp_path)) - 12))
    d.mkdir()
    path = str(d / "api.sock")
    assert len(path.encode()) <= 107
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        bind_private(s, path, 0o600)
        assert _mode(path) == 0o600 and sorted(os.listdir(d)) == ["api.sock"]


def test_peer_rules_with_an_owner() -> None:
    assert allowed_peer(0, 0, None) and allowed_peer(os.geteuid(), 1, None)
    assert not allowed_peer(NOBODY.pw_uid, NOBODY.pw_gid, None)
    assert allowed_peer(NOBODY.pw_uid, NOBODY.pw_gid, None, owner=NOBODY.pw_uid)
    assert not allowed_peer(NOBODY.pw_uid, NOBODY.pw_gid, None, owner=12345)
