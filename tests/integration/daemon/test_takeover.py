"""Failover of pynydusd: a successor takes the live FUSE connection over.

Contract (nydusd's API sequence, docs/failover.md): a daemon started with
``--supervisor`` sends its /dev/fuse fd and state there once it runs and after every
mount change; a daemon started with ``--upgrade`` waits in INIT, ``PUT
/api/v1/daemon/fuse/takeover`` gets fd and state (READY), ``PUT /api/v1/daemon/start``
asks the kernel to resend what the dead predecessor had read and serves (RUNNING).
Readers of the mount see no error and the same bytes, node ids and open files stay
valid; a request the predecessor died in the middle of is answered by the successor
(or failed, with ``--failover-policy flush``). A corrupt state or one of another version
is refused: the successor stays in INIT holding nothing.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.daemon.takeover import VERSION
from pynydus.manager.supervisor import Supervisor
from tests.harness.pynydusd import Pynydusd, abort_fuse_under, fuse_mounted
from tests.harness.readloop import ReadLoop, digests
from tests.harness.registry import Registry
from tests.harness.util import stop_recorded, wait_until
from tests.integration.registry.servers import FaultProxy

from .conftest import Image, StartFn, localfs_config, push, registry_config

DID = "dmn-x"


@pytest.fixture
def supervisor(workdir: Path) -> Iterator[Supervisor]:
    sup = Supervisor(str(workdir / "supervisor"))
    try:
        yield sup
    finally:
        sup.close()
        # a failed test may leave a connection a successor holds with nobody serving it
        stop_recorded(workdir)
        abort_fuse_under(workdir)


def _supervised(start_daemon: StartFn, sup: Supervisor, **kw: object) -> Pynydusd:
    path = sup.add(DID)
    since = time.monotonic()
    d = start_daemon(extra_args=("--id", DID, "--supervisor", path), **kw)
    assert sup.wait_held(DID, since, 20) is not None, "the daemon did not send its connection"
    return d


def _successor(workdir: Path, mountpoint: Path, name: str = "succ",
               extra: tuple[str, ...] = ()) -> Pynydusd:
    s = Pynydusd(workdir, name=name, mountpoint=mountpoint, extra_args=("--upgrade", *extra))
    s.proc.start()  # not s.start(): its stat of the mountpoint would wait for the successor
    wait_until(lambda: s.apisock.exists(), 30, "the successor's API socket")
    wait_until(lambda: s.get("/api/v1/daemon")["state"] == "INIT", 30, "INIT")
    return s


def _take_over(s: Pynydusd, sup: Supervisor, one_call: bool = False) -> None:
    """Upstream's sequence (takeover: READY, start: RUNNING), or ours in one call
    (``"start": true``: the reply is the timeline of the steps, in order)."""
    body: dict[str, object] = {"supervisor": sup.path(DID), "id": DID}
    if one_call:
        t0 = time.monotonic()
        status, reply = s.api("PUT", "/api/v1/daemon/fuse/takeover", {**body, "start": True})
        assert status == 200, s.log_text()
        steps = reply["timeline"]
        assert list(steps) == ["request", "state_received", "restored", "resent", "serving"]
        assert t0 <= steps["request"] <= steps["serving"] <= time.monotonic()
        assert sorted(steps.values()) == list(steps.values())
    else:
        assert s.api("PUT", "/api/v1/daemon/fuse/takeover", body) == (204, None), s.log_text()
        assert s.get("/api/v1/daemon")["state"] == "READY"
        assert s.api("PUT", "/api/v1/daemon/start") == (204, None)
    info = s.get("/api/v1/daemon")
    assert (info["state"], info["id"]) == ("RUNNING", DID)


def test_kill9_under_reads_is_taken_over_without_an_error(
        full_image: Image, start_daemon: StartFn, supervisor: Supervisor, workdir: Path) -> None:
    """A daemon killed while a reader checksums every file is succeeded by one started
    with --upgrade: the reader sees neither an error nor wrong bytes."""
    d = _supervised(start_daemon, supervisor, bootstrap=full_image.bootstrap,
                    config=localfs_config(full_image.blob_dir, workdir / "cache"))
    inos = {p: os.lstat(d.mountpoint / p).st_ino for p in ("files", "files/multi-chunk")}
    with ReadLoop(d.mountpoint, digests(full_image.src)) as reader:
        reader.wait_passes(1)
        d.kill9()
        s = _successor(workdir, d.mountpoint)
        _take_over(s, supervisor)
        reader.wait_passes(2)
    assert reader.errors == []
    assert {p: os.lstat(d.mountpoint / p).st_ino for p in inos} == inos
    s.stop()
    assert not fuse_mounted(d.mountpoint)  # the successor unmounts on SIGTERM as any daemon


def test_shared_mode_keeps_slots_node_ids_and_open_files(
        full_image: Image, start_daemon: StartFn, supervisor: Supervisor, workdir: Path) -> None:
    d = _supervised(start_daemon, supervisor)
    cfg = json.dumps(localfs_config(full_image.blob_dir, workdir / "cache"))
    for name in ("a", "b", "c"):
        body = {"source": str(full_image.bootstrap), "fs_type": "rafs", "config": cfg}
        assert d.api("POST", f"/api/v1/mount?mountpoint=/{name}", body)[0] == 204
    assert d.api("DELETE", "/api/v1/mount?mountpoint=/a")[0] == 204  # b, c in slots 2, 3
    held = supervisor.held(DID)
    assert held is not None and [m.mountpoint for m in held.state.mounts] == ["/b", "/c"]
    path = d.mountpoint / "c" / "files/multi-chunk"
    ino = os.lstat(path).st_ino
    fd = os.open(path, os.O_RDONLY)
    want = (full_image.src / "files/multi-chunk").read_bytes()
    try:
        d.kill9()
        s = _successor(workdir, d.mountpoint)
        _take_over(s, supervisor, one_call=True)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(want) + 1, 0) == want  # a handle of the dead daemon
    finally:
        os.close(fd)
    assert os.lstat(path).st_ino == ino and ino >> 56 == 3
    assert sorted(os.listdir(d.mountpoint)) == ["b", "c"]
    # the next mount takes the next slot after the predecessor's, not a freed one
    body = {"source": str(full_image.bootstrap), "fs_type": "rafs", "config": cfg}
    assert s.api("POST", "/api/v1/mount?mountpoint=/d", body)[0] == 204
    assert os.lstat(d.mountpoint / "d").st_ino >> 56 == 4
    s.stop()


@pytest.mark.parametrize("policy", ["resend", "flush"])
def test_a_read_the_dead_daemon_had_taken_is_resent_or_failed(
        full_image: Image, start_daemon: StartFn, supervisor: Supervisor, workdir: Path,
        policy: str) -> None:
    with Registry() as reg:
        push(reg.host, full_image, "daemon/takeover")
        fp = FaultProxy(reg.host, match="/blobs/")
        try:
            d = _supervised(start_daemon, supervisor, bootstrap=full_image.bootstrap,
                            config=registry_config(fp.host, "daemon/takeover", workdir / "cache",
                                                   timeout=30, retry_limit=0, amplify_io=0),
                            )
            fp.hold(1)
            result: dict[str, object] = {}

            def read() -> None:
                try:
                    result["data"] = (d.mountpoint / "files/one-chunk").read_bytes()
                except OSError as err:
                    result["err"] = err.errno

            t = threading.Thread(target=read)
            t.start()
            wait_until(lambda: any("/blobs/" in r[1] for r in fp.log), 20, "the held fetch")
            d.kill9()  # the daemon dies with the READ taken and unanswered
            s = _successor(workdir, d.mountpoint,
                           extra=("--failover-policy", policy))
            fp.release()
            _take_over(s, supervisor)
            t.join(30)
            assert not t.is_alive(), "the read the dead daemon had taken hangs"
            want = (full_image.src / "files/one-chunk").read_bytes()
            if policy == "resend":
                assert result == {"data": want}
            else:  # the resent READ fails; the page cache may then retry the page itself
                assert "that the previous daemon had taken (failover policy flush)" in s.log_text()
                assert result in ({"data": want}, {"err": errno.EIO})
            s.stop()
        finally:
            fp.stop()


def test_hand_over_on_exit_leaves_the_mount_to_the_successor(
        full_image: Image, start_daemon: StartFn, supervisor: Supervisor, workdir: Path) -> None:
    """Hot upgrade: the old daemon exits through the API without unmounting."""
    d = _supervised(start_daemon, supervisor, bootstrap=full_image.bootstrap,
                    config=localfs_config(full_image.blob_dir, workdir / "cache"))
    with ReadLoop(d.mountpoint, digests(full_image.src)) as reader:
        reader.wait_passes(1)
        s = _successor(workdir, d.mountpoint)
        body = {"supervisor": supervisor.path(DID), "id": DID}
        assert s.api("PUT", "/api/v1/daemon/fuse/takeover", body) == (204, None)
        assert d.api("PUT", "/api/v1/daemon/exit") == (204, None)
        assert d.wait_exit(15) == 0
        assert fuse_mounted(d.mountpoint)
        assert s.api("PUT", "/api/v1/daemon/start") == (204, None)
        reader.wait_passes(2)
    assert reader.errors == []
    s.stop()


def _fuse_fds(pid: int) -> list[str]:
    """The descriptors of process *pid* open on /dev/fuse. The process keeps running, so a
    descriptor listed may be closed before it is read: such a one is not on /dev/fuse."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                found.append(fd)
        except FileNotFoundError:
            pass
    return found


@pytest.mark.parametrize("damage", ["corrupt", "version", "truncated"])
def test_a_bad_state_is_refused_and_the_successor_holds_nothing(
        full_image: Image, start_daemon: StartFn, supervisor: Supervisor, workdir: Path,
        damage: str) -> None:
    d = _supervised(start_daemon, supervisor, bootstrap=full_image.bootstrap,
                    config=localfs_config(full_image.blob_dir, workdir / "cache"))
    held = supervisor.held(DID)
    assert held is not None
    blob = held.blob
    if damage == "corrupt":
        blob = blob.replace(b'"next_slot": 1', b'"next_slot": 2')
    elif damage == "version":
        blob = blob.replace(b"PYNYDUSD-STATE/%d " % VERSION, b"PYNYDUSD-STATE/%d " % (VERSION + 1))
    else:
        blob = blob[:len(blob) // 2]
    held.blob = blob  # what the supervisor hands out
    d.kill9()
    s = _successor(workdir, d.mountpoint)
    status, body = s.api("PUT", "/api/v1/daemon/fuse/takeover",
                         {"supervisor": supervisor.path(DID), "id": DID})
    assert status == 400, body
    assert "takeover state refused" in body["message"]
    assert {"corrupt": "checksum", "version": "version", "truncated": "checksum"}[damage] in \
        body["message"]
    assert s.get("/api/v1/daemon")["state"] == "INIT"
    assert _fuse_fds(s.pid) == []
    # the manager's fall-back: the supervisor lets go, and the mount fails instead of hanging
    supervisor.drop(DID)
    with pytest.raises(OSError) as err:
        os.statvfs(d.mountpoint)
    assert err.value.errno == errno.ENOTCONN
    s.stop()
