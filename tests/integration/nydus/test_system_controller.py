"""The system controller (``[system] enable``): its unix socket, as an operator or the
prefetch NRI plugin talks to it, on a snapshotter serving a Nydus image.

GET /api/v1/daemons lists each daemon with the images it serves (the snapshot the image's
bootstrap layer is, its directory, the mountpoint, the image reference) and its memory and
data read; GET /api/v1/daemons/records gives the daemon store's records as persisted; GET
/api/v1/daemons/{id}/backend gives the registry it reads from; PUT /api/v1/prefetch makes
the next daemon mounting that image prefetch those files; the upgrade endpoint answers 501
with a reason. The socket is 0600. SIGUSR1 makes the snapshotter and pynydusd log every
thread's stack and carry on.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.snapshotter import Snapshotter

from .support import container_rootfs, pull_nydus_image

pytestmark = pytest.mark.root


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def call(sock: Path, method: str, path: str, body: object = None) -> tuple[int, object]:
    conn = UnixHTTP(sock)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


@pytest.fixture(params=["dedicated", "shared"])
def snap(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Snapshotter]:
    s = Snapshotter(config=tmp_path / "config.toml")
    s.system_socket = s.workdir / "system.sock"  # type: ignore[attr-defined]
    (tmp_path / "config.toml").write_text(
        f'version = 1\ndaemon_mode = "{request.param}"\n[daemon]\nlog_rotation_size = 3\n'
        f'[system]\nenable = true\naddress = "{s.system_socket}"\n')  # type: ignore[attr-defined]
    s.start()
    # The harness waits for the Snapshots socket; the system controller's comes up just
    # after it (a test that called it at once found no socket, now and then under load).
    deadline = time.monotonic() + 30
    while not s.system_socket.exists() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    try:
        yield s
    finally:
        s.close()


def test_daemons_lists_the_image_and_its_daemon(snap: Snapshotter, image: dict,
                                                tmp_path: Path) -> None:
    sock: Path = snap.system_socket  # type: ignore[attr-defined]
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600, "it hands out backend credentials"
    top = pull_nydus_image(snap, image)
    container_rootfs(snap, top, "default/3/ctr", tmp_path / "rootfs")
    try:
        assert (tmp_path / "rootfs/data/small.txt").read_text() == "small\n"
        status, daemons = call(sock, "GET", "/api/v1/daemons")
        assert status == 200 and isinstance(daemons, list)
        serving = [d for d in daemons if d["instances"]]
        assert len(serving) == 1, daemons
        (d,) = serving
        assert d["pid"] in snap.daemon_pids()
        assert Path(d["api_socket"]).is_socket()
        assert d["memory_rss_kb"] > 1000
        assert d["read_data_kb"] > 0  # small.txt was read through it
        assert d["supervisor_path"] == ""
        ((sid, inst),) = d["instances"].items()
        assert inst["snapshot_id"] == sid and inst["image_id"] == image["ref"]
        assert Path(inst["snapshot_dir"]).name == sid
        assert Path(inst["mountpoint"], "etc/hello.txt").exists()
        if d["id"] != "shared_daemon":
            assert d["reference"] == image["ref"]

        status, backend = call(sock, "GET", f"/api/v1/daemons/{d['id']}/backend")
        assert status == 200, backend
        assert backend["type"] == "registry"  # type: ignore[index]
        assert backend["config"]["host"] == image["registry"].host  # type: ignore[index]
        assert call(sock, "GET", "/api/v1/daemons/nope/backend")[0] == 404
    finally:
        import subprocess
        subprocess.run(["umount", str(tmp_path / "rootfs")], check=False)


def test_unimplemented_and_unknown_endpoints(snap: Snapshotter) -> None:
    sock: Path = snap.system_socket  # type: ignore[attr-defined]
    status, body = call(sock, "PUT", "/api/v1/daemons/upgrade", {"nydusd_path": "/bin/true"})
    assert status == 501 and "failover" in body["message"]  # type: ignore[index]
    assert call(sock, "GET", "/api/v1/nothing")[0] == 404
    assert call(sock, "DELETE", "/api/v1/daemons")[0] == 405


def _wait_for_text(path: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got = path.read_text(errors="replace") if path.exists() else ""
        if text in got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_records_and_stack_dumps(snap: Snapshotter, image: dict, tmp_path: Path) -> None:
    """GET /api/v1/daemons/records: the store's daemon and instance records (the daemons
    started with [daemon] log_rotation_size on their command line); SIGUSR1 to the
    snapshotter and to a daemon logs their threads' stacks, and both keep serving."""
    import signal
    import subprocess

    sock: Path = snap.system_socket  # type: ignore[attr-defined]
    top = pull_nydus_image(snap, image)
    container_rootfs(snap, top, "default/3/ctr", tmp_path / "rootfs")
    try:
        _, before = call(sock, "GET", "/api/v1/daemons")
        status, records = call(sock, "GET", "/api/v1/daemons/records")
        assert status == 200 and set(records) == {"daemons", "instances"}  # type: ignore[arg-type]
        daemons, instances = records["daemons"], records["instances"]  # type: ignore[index]
        _, after = call(sock, "GET", "/api/v1/daemons")
        # a spare daemon may start meanwhile (dedicated mode keeps one ready)
        live = {d["id"] for d in before} | {d["id"] for d in after}  # type: ignore[union-attr]
        assert {d["id"] for d in daemons} <= live, (daemons, live)
        (inst,) = instances
        assert inst["image_ref"] == image["ref"] and Path(inst["bootstrap"]).is_file()
        (serving,) = [d for d in daemons if d["id"] == inst["daemon_id"]]
        assert serving["pid"] in snap.daemon_pids() and Path(serving["api_socket"]).is_socket()
        for d in daemons:
            if d["pid"] not in snap.daemon_pids():
                continue  # a spare still starting has no pid in its record yet
            argv = Path(f"/proc/{d['pid']}/cmdline").read_bytes().split(b"\0")
            assert argv[argv.index(b"--log-rotation-size") + 1] == b"3", argv
            assert argv[argv.index(b"--log-file") + 1].decode() == d["log_file"]

        os.kill(snap.pid, signal.SIGUSR1)
        text = _wait_for_text(snap.log, "SIGUSR1: stacks of")
        assert "SIGUSR1: stacks of" in text and "thread 'MainThread'" in text, text[-3000:]
        assert snap.proc is not None and snap.proc.running()
        assert call(sock, "GET", "/api/v1/daemons")[0] == 200
        assert snap.list_names()  # the snapshots service still answers

        os.kill(serving["pid"], signal.SIGUSR1)
        daemon_log = Path(serving["log_file"])
        text = _wait_for_text(daemon_log, "SIGUSR1: stacks of")
        assert "SIGUSR1: stacks of" in text and "thread 'MainThread'" in text, text[-3000:]
        # not read before: the daemon serves it now
        assert (tmp_path / "rootfs/etc/hello.txt").read_text().startswith("hello from")
        assert serving["pid"] in snap.daemon_pids()
        status, info = call(sock, "GET", "/api/v1/daemons")
        assert status == 200 and serving["id"] in {d["id"] for d in info}  # type: ignore[union-attr]
    finally:
        subprocess.run(["umount", str(tmp_path / "rootfs")], check=False)


@pytest.mark.parametrize("snap", ["dedicated"], indirect=True)
def test_prefetch_list_is_prefetched_by_the_next_daemon(snap: Snapshotter, image: dict,
                                                        tmp_path: Path) -> None:
    """The NRI plugin's PUT: the image's next daemon fetches big.bin before anyone reads it."""
    sock: Path = snap.system_socket  # type: ignore[attr-defined]
    reg = image["registry"]
    blob = "sha256:" + image["blob_ids"][0]
    status, _ = call(sock, "PUT", "/api/v1/prefetch",
                     [{"image": image["ref"], "prefetch": "/data/big.bin"}])
    assert status == 200
    assert call(sock, "PUT", "/api/v1/prefetch", b"not json".decode())[0] == 200  # logged only
    before = reg.blob_bytes(blob)
    top = pull_nydus_image(snap, image)
    container_rootfs(snap, top, "default/3/ctr", tmp_path / "rootfs")
    try:
        deadline = time.monotonic() + 30
        while reg.blob_bytes(blob) - before < 3 << 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        fetched = reg.blob_bytes(blob) - before
        assert fetched >= 3 << 20, (f"big.bin (3 MiB) was not prefetched ({fetched} bytes); "
                                    f"snapshotter log:\n{snap.log.read_text()[-4000:]}")
    finally:
        import subprocess
        subprocess.run(["umount", str(tmp_path / "rootfs")], check=False)


def test_socket_address_owner_and_mode(tmp_path: Path) -> None:
    """[system] enable starts the controller on address, 0600 and owned by uid/gid; without
    enable there is no socket; a stale socket left by a crash is replaced."""
    config = tmp_path / "config.toml"
    s = Snapshotter(config=config)
    address = s.workdir / "ctl" / "system.sock"
    address.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(address))
    stale.close()  # bound, never listening: what a killed process leaves
    config.write_text('version = 1\n[system]\nenable = true\n'
                      f'address = "{address}"\nuid = 4242\ngid = 4343\n')
    try:
        s.start()
        st = address.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4343, 0o600)
        assert call(address, "GET", "/api/v1/daemons")[0] == 200
        s.stop()
        assert not address.exists(), "the socket goes with the snapshotter"
        config.write_text(f'version = 1\n[system]\nenable = false\naddress = "{address}"\n')
        s.start()
        assert not address.exists()
    finally:
        s.close()
