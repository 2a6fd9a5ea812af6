"""pynydusd's API socket: mode 0600 whatever the umask, and only root, the daemon's
uid and a configured group may use it, checked with SO_PEERCRED against a real
unprivileged user (a forked child that drops to ``nobody``)."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pynydus.daemon.api import ApiServer, allowed_peer
from pynydus.errors import FailedPrecondition, InvalidArgument
from tests.harness.nobody import NOBODY, as_nobody


class _Ctl:
    exited = False

    def daemon_info(self) -> dict[str, Any]:
        return {"id": "d", "state": "RUNNING"}

    def exit(self) -> None:
        self.exited = True


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self._path)


def _request(path: str, method: str, url: str) -> int:
    conn = _UnixHTTP(path)
    try:
        conn.request(method, url)
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="pyn-apisock-", dir="/var/tmp")
    os.chmod(d, 0o755)  # nobody may reach the socket itself: its own mode is what counts
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _serve(path: str, group: str = "") -> tuple[ApiServer, _Ctl]:
    ctl = _Ctl()
    old = os.umask(0)  # the issue: under umask 000 the socket was world-writable
    try:
        api = ApiServer(path, ctl, group=group)  # type: ignore[arg-type]
    finally:
        os.umask(old)
    api.start()
    return api, ctl


def _exit_as_nobody(path: str, gid: int | None = None) -> str:
    """What PUT /api/v1/daemon/exit got from nobody (gid ``gid`` if given): "status N",
    "EACCES" or "hung up"."""
    return as_nobody(lambda: f"status {_request(path, 'PUT', '/api/v1/daemon/exit')}", gid)


@pytest.mark.root
def test_the_socket_is_0600_under_umask_000_and_refuses_other_users(sockdir: str) -> None:
    path = os.path.join(sockdir, "api.sock")
    api, ctl = _serve(path)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert [n for n in os.listdir(sockdir)] == ["api.sock"]  # no temporary name left
        assert _exit_as_nobody(path) == "EACCES"  # the file mode stops them
        # Even with the mode opened up (a careless chmod, a bind mount), the peer check
        # hangs up on them before reading the request.
        os.chmod(path, 0o666)
        assert _exit_as_nobody(path) == "hung up"
        assert not ctl.exited
        assert _request(path, "GET", "/api/v1/daemon") == 200  # root still gets through
    finally:
        api.close()
    assert not os.path.exists(path)


@pytest.mark.root
def test_a_configured_group_may_use_the_socket(sockdir: str) -> None:
    path = os.path.join(sockdir, "api.sock")
    group = 4242  # a gid no user has: nobody joins it for the test
    api, ctl = _serve(path, group=str(group))
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group
        assert _exit_as_nobody(path, gid=group) == "status 204"
        # the answer goes out before exit() is called (the process may be gone a moment
        # later): under load the client can see it first
        deadline = time.monotonic() + 10
        while not ctl.exited and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ctl.exited
        assert _exit_as_nobody(path) == "EACCES"  # nobody outside the group
    finally:
        api.close()


def test_the_group_flag_reaches_the_api_socket(tmp_path: Any) -> None:
    from pynydus.daemon import main as dmain

    args = dmain.build_parser().parse_args(["--mountpoint", str(tmp_path / "m"), "--apisock",
                                            str(tmp_path / "a.sock"), "--apisock-group", "4242"])
    opts = dmain.daemon_options("fuse", args)
    assert (opts.apisock, opts.apisock_group) == (str(tmp_path / "a.sock"), "4242")
    # ... which the daemon hands to ApiServer (test_a_configured_group_may_use_the_socket)


def test_peer_rules() -> None:
    me = os.geteuid()
    assert allowed_peer(0, 0, None) and allowed_peer(me, 12345, None)
    assert not allowed_peer(NOBODY.pw_uid, NOBODY.pw_gid, None)
    assert allowed_peer(NOBODY.pw_uid, 4242, 4242)
    assert not allowed_peer(NOBODY.pw_uid, NOBODY.pw_gid, 4242)
    assert not allowed_peer(987654, 987654, 4242)  # no passwd entry: primary gid only


def test_an_unknown_group_is_refused(sockdir: str) -> None:
    with pytest.raises(InvalidArgument, match="no such group"):
        ApiServer(os.path.join(sockdir, "api.sock"), _Ctl(), group="no-such-group-x")  # type: ignore[arg-type]


def test_the_socket_path_replaces_only_a_dead_socket(sockdir: str) -> None:
    """--apisock takes over a dead daemon's socket, but never deletes a file that is not a
    socket (a mistyped path) nor a live daemon's socket: it refuses, naming the path."""
    path = os.path.join(sockdir, "api.sock")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(FailedPrecondition, match="exists and is not a socket"):
        ApiServer(path, _Ctl())  # type: ignore[arg-type]
    assert Path(path).read_text() == "keep me"
    os.unlink(path)

    api, _ = _serve(path)
    try:
        with pytest.raises(FailedPrecondition, match="served by another process"):
            ApiServer(path, _Ctl())  # type: ignore[arg-type]
        assert _request(path, "GET", "/api/v1/daemon") == 200  # still the first one's
    finally:
        api.server.shutdown()
        api.server.server_close()  # the socket file stays, nobody listens: a dead daemon's
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    api, _ = _serve(path)
    try:
        assert _request(path, "GET", "/api/v1/daemon") == 200
    finally:
        api.close()
