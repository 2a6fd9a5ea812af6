"""The Nydus path through the snapshotter, driven the way containerd drives it.

A Nydus image is built from a generated tree with our builder; its data blob is
pushed to a real docker-registry. Then, through the snapshotter's gRPC socket,
the same calls containerd's unpacker and CRI make: Prepare of the data layer
(answered AlreadyExists, never downloaded), Prepare + Commit of the bootstrap
layer (into which containerd would unpack ``image/image.boot``), and Prepare of
a container layer, which must come back as an overlay on a live RAFS mount served
by a pynydusd process fetching from the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from pynydus import labels as L
from pynydus.api import snapshots_pb2 as pb
from pynydus.config import load_config
from pynydus.errors import Unavailable
from pynydus.host.mount import unmount_all
from pynydus.host.mountinfo import mountpoints_under
from pynydus.manager.filesystem import NydusFilesystem
from pynydus.snapshot.server import make_filesystem
from pynydus.snapshot.snapshotter import Snapshotter as SnapshotterCore
from pynydus.snapshot.snapshotter import SnapshotterOptions
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import all_cmdlines, pynydusd_pids

from .support import container_rootfs, pull_nydus_image

pytestmark = [pytest.mark.root]


def test_lazy_image_through_snapshotter(snap: Snapshotter, image: dict, tmp_path: Path) -> None:
    reg: Registry = image["registry"]
    gets_before = reg.blob_gets()
    top = pull_nydus_image(snap, image)
    # The data layer was never downloaded: it is committed, empty.
    infos = {i.name: i for r in snap.stub().List(pb.ListSnapshotsRequest()) for i in r.info}
    assert infos["default/sha256:blobchain"].kind == pb.COMMITTED
    assert reg.blob_gets() == gets_before

    rootfs = tmp_path / "rootfs"
    container_rootfs(snap, top, "default/3/c1", rootfs)
    try:
        assert (rootfs / "etc/hello.txt").read_text() == "hello from a lazily pulled image\n"
        assert os.readlink(rootfs / "data/link") == "../etc/hello.txt"
        assert reg.blob_gets() > gets_before  # data came from the registry on demand
        big = (rootfs / "data/big.bin").read_bytes()
        assert hashlib.sha256(big).hexdigest() == image["big_sha"]
        # the container layer is writable and does not touch the image
        (rootfs / "etc/new").write_text("x")
        assert len(snap.image_daemon_pids()) == 1

        # A second container of the same image reuses the daemon.
        rootfs2 = tmp_path / "rootfs2"
        container_rootfs(snap, top, "default/4/c2", rootfs2)
        try:
            assert (rootfs2 / "data/small.txt").read_text() == "small\n"
            assert not (rootfs2 / "etc/new").exists()
            assert len(snap.image_daemon_pids()) == 1
        finally:
            unmount_all(str(rootfs2))
        # Mounts() answers the same remote mount.
        (m,) = snap.stub().Mounts(pb.MountsRequest(key="default/3/c1")).mounts
        assert any(o.startswith("lowerdir=") and "/mnt" in o for o in m.options)
    finally:
        unmount_all(str(rootfs))


def test_killed_daemon_is_restarted(snap: Snapshotter, image: dict, tmp_path: Path) -> None:
    """recover_policy restart: a new daemon serves the image; new containers read again.

    The old FUSE connection died with the daemon, and overlays already mounted on it
    keep pointing at it (their reads fail with an error, not a hang): only failover,
    which hands the /dev/fuse fd to the new process, could save them (docs/failover.md).
    """
    top = pull_nydus_image(snap, image)
    rootfs = tmp_path / "rootfs"
    container_rootfs(snap, top, "default/3/c1", rootfs)
    try:
        (pid,) = snap.image_daemon_pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pids = snap.image_daemon_pids()
            if pids and pids != [pid]:
                break
            time.sleep(0.1)
        else:
            pytest.fail("daemon was not restarted")
        with pytest.raises(OSError):
            (rootfs / "data/big.bin").read_bytes()
        rootfs2 = tmp_path / "rootfs2"
        container_rootfs(snap, top, "default/4/c2", rootfs2)
        try:
            assert (rootfs2 / "etc/hello.txt").read_text() == "hello from a lazily pulled image\n"
            assert hashlib.sha256((rootfs2 / "data/big.bin").read_bytes()).hexdigest() == image["big_sha"]
        finally:
            unmount_all(str(rootfs2))
    finally:
        unmount_all(str(rootfs))


def test_snapshotter_restart_keeps_daemon_and_container(snap: Snapshotter, image: dict, tmp_path: Path) -> None:
    top = pull_nydus_image(snap, image)
    rootfs = tmp_path / "rootfs"
    container_rootfs(snap, top, "default/3/c1", rootfs)
    try:
        before = snap.image_daemon_pids()
        snap.restart()
        assert snap.image_daemon_pids() == before  # the daemon outlived the snapshotter
        assert (rootfs / "data/small.txt").read_text() == "small\n"
        (m,) = snap.stub().Mounts(pb.MountsRequest(key="default/3/c1")).mounts
        assert any("/mnt" in o for o in m.options if o.startswith("lowerdir="))
    finally:
        unmount_all(str(rootfs))


def test_remove_image_stops_daemon_and_cleanup_drops_cache(snap: Snapshotter, image: dict, tmp_path: Path) -> None:
    top = pull_nydus_image(snap, image)
    rootfs = tmp_path / "rootfs"
    container_rootfs(snap, top, "default/3/c1", rootfs)
    (rootfs / "etc/hello.txt").read_text()
    unmount_all(str(rootfs))
    stub = snap.stub()
    cache = snap.root / "cache"
    assert any(n.endswith(".blob.data") for n in os.listdir(cache))
    usage = stub.Usage(pb.UsageRequest(key="default/sha256:blobchain"))
    assert usage.size > 0  # the data layer's cache counts
    stub.Remove(pb.RemoveSnapshotRequest(key="default/3/c1"))
    stub.Remove(pb.RemoveSnapshotRequest(key=top))
    stub.Remove(pb.RemoveSnapshotRequest(key="default/sha256:blobchain"))
    stub.Cleanup(pb.CleanupRequest())
    assert os.listdir(snap.root / "snapshots") == []
    assert os.listdir(cache) == []
    if "shared" in snap.config.read_text():
        # upstream keeps the shared daemon until the snapshotter stops; it serves nothing now
        assert len(snap.daemon_pids()) == 1
        assert os.listdir(snap.root / "mnt") == []
        assert mountpoints_under(str(snap.root)) == [str(snap.root / "mnt")]
    else:
        assert snap.image_daemon_pids() == []
        # at most the standby daemon, kept ready for the next image, is left once the
        # removed image's daemon has finished exiting (in the background: its mount went
        # at once)
        deadline = time.monotonic() + 20
        while len(snap.daemon_pids()) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(snap.daemon_pids()) <= 1
        assert all("/daemons/" in m for m in mountpoints_under(str(snap.root)))


def _daemon_ids(snap: Snapshotter) -> set[str]:
    """The ids of the live pynydusd processes, from their --apisock <root>/socket/<id>/.

    A daemon that finishes exiting (a removed image's, in the background) after it was
    listed reads as an empty command line, or none: it is left out."""
    ids = set()
    for pid in snap.daemon_pids():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--apisock" in argv:
                ids.add(Path(argv[argv.index(b"--apisock") + 1].decode()).parent.name)
    return ids


def _daemon_dirs(snap: Snapshotter) -> dict[str, set[str]]:
    out = {}
    for name in ("socket", "logs", "config", "daemons"):
        d = snap.root / name
        out[name] = {e.name for e in d.iterdir() if e.is_dir()} if d.is_dir() else set()
    return out


def test_removed_images_leave_no_daemon_files(snap: Snapshotter, image: dict) -> None:
    """Per-daemon directories (socket/<id>/, logs/<id>/, config/<id>/, daemons/<id>/) go
    with their daemon: after images are pulled and removed, only the live daemons' are
    left (the spare's in dedicated mode, the shared daemon's in shared mode)."""
    stub = snap.stub()
    started: set[str] = set()
    for i in range(4):
        ns = f"churn{i}"
        top = pull_nydus_image(snap, image, ns)
        stub.Prepare(pb.PrepareSnapshotRequest(key=f"{ns}/3/c", parent=top))  # mounts it
        started |= _daemon_ids(snap)
        stub.Remove(pb.RemoveSnapshotRequest(key=f"{ns}/3/c"))
        stub.Remove(pb.RemoveSnapshotRequest(key=top))
        stub.Remove(pb.RemoveSnapshotRequest(key=f"{ns}/sha256:blobchain"))
    stub.Cleanup(pb.CleanupRequest())
    assert len(started) >= (4 if "dedicated" in snap.config.read_text() else 1)
    deadline = time.monotonic() + 30  # removed images' daemons exit in the background
    while True:
        live, dirs = _daemon_ids(snap), _daemon_dirs(snap)
        if len(live) <= 2 and all(names <= live for names in dirs.values()):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(live) <= 2
    for name, names in dirs.items():
        assert names <= live, f"{name}/ keeps directories of stopped daemons: {names - live}"
    logs = {e.name for e in (snap.root / "logs").iterdir() if e.is_file()}
    assert all(n.startswith("nydus-snapshotter.log") for n in logs), logs


def test_missing_image_ref_is_a_clear_error(snap: Snapshotter, image: dict) -> None:
    stub = snap.stub()
    labels = {L.TARGET_SNAPSHOT_REF: "default/sha256:b2", L.NYDUS_BOOTSTRAP: "true"}
    resp = stub.Prepare(pb.PrepareSnapshotRequest(key="default/k", labels=labels))
    upper = next(o.split("=", 1)[1] for o in resp.mounts[0].options if o.startswith("upperdir=")) \
        if resp.mounts[0].type == "overlay" else resp.mounts[0].source
    os.makedirs(os.path.join(upper, "image"))
    shutil.copy(image["boot"], os.path.join(upper, "image", "image.boot"))
    stub.Commit(pb.CommitSnapshotRequest(key="default/k", name="default/sha256:b2", labels=labels))
    with pytest.raises(grpc.RpcError) as err:
        stub.Prepare(pb.PrepareSnapshotRequest(key="default/c", parent="default/sha256:b2"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details()
    assert "cri.image-ref" in details
    # every pynydus command it suggests exists
    for sub in re.findall(r"'pynydus ([\w-]+)", details):
        assert subprocess.run(["pynydus", sub, "--help"], capture_output=True, check=False,
                              env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                   + os.environ["PATH"]}).returncode == 0, details
    # nothing half-made: the container key does not exist
    with pytest.raises(grpc.RpcError) as err2:
        stub.Stat(pb.StatSnapshotRequest(key="default/c"))
    assert err2.value.code() == grpc.StatusCode.NOT_FOUND


def test_daemons_run_in_a_memory_cgroup(image: dict, tmp_path: Path) -> None:
    memory = Path("/sys/fs/cgroup/memory")
    if not memory.is_dir():
        pytest.skip("no cgroup v1 memory controller on this host")
    config = tmp_path / "config.toml"
    config.write_text('version = 1\n[cgroup]\nenable = true\nmemory_limit = "300MiB"\n')
    slice_existed = (memory / "system.slice").exists()
    snap = Snapshotter(config=config)
    snap.start()
    try:
        top = pull_nydus_image(snap, image)
        rootfs = tmp_path / "rootfs"
        container_rootfs(snap, top, "default/3/c1", rootfs)
        try:
            (pid,) = snap.image_daemon_pids()
            cg = memory / "system.slice" / "nydusd"
            assert pid in [int(p) for p in (cg / "cgroup.procs").read_text().split()]
            assert int((cg / "memory.limit_in_bytes").read_text()) == 300 << 20
            assert (rootfs / "data/small.txt").read_text() == "small\n"
        finally:
            unmount_all(str(rootfs))
    finally:
        snap.close()  # daemons outlive the snapshotter by design; close() ends them too
        for d in [memory / "system.slice" / "nydusd"] + ([] if slice_existed else [memory / "system.slice"]):
            try:
                d.rmdir()
            except OSError:
                pass


def test_prometheus_metrics(image: dict, tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.toml"
    config.write_text(f'version = 1\n[metrics]\naddress = "127.0.0.1:{port}"\n')
    snap = Snapshotter(config=config)
    snap.start()
    try:
        top = pull_nydus_image(snap, image)
        rootfs = tmp_path / "rootfs"
        container_rootfs(snap, top, "default/3/c1", rootfs)
        unmount_all(str(rootfs))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/metrics", timeout=5).read().decode()
        assert 'snapshotter_rpc_duration_seconds_count{method="Prepare"} 3.0' in text
        assert 'snapshotter_rpc_errors_total{code="ALREADY_EXISTS",method="Prepare"} 1.0' in text
        # the image's daemon, and maybe already the standby daemon kept for the next image
        assert re.search(r'snapshotter_daemons\{state="RUNNING"\} [12]\.0', text), text
        assert "snapshotter_rafs_instances 1.0" in text
    finally:
        snap.close()


def _thread_nice(pid: int) -> set[int]:
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # the thread ended between the listing and the read
        out.add(int(fields[16]))  # field 19 of stat(5): nice
    return out


def _wait_standby_running(snap: Snapshotter, timeout: float = 30) -> dict:
    from pynydus.manager.client import DaemonClient

    deadline = time.monotonic() + timeout
    while True:
        spares = [r for r in snap.daemon_records() if r["mode"] == "standby"]
        if spares and os.path.exists(spares[0]["api_socket"]):
            with contextlib.suppress(Exception):  # still starting
                if DaemonClient(spares[0]["api_socket"], timeout=5).state() == "RUNNING":
                    return spares[0]
        assert time.monotonic() < deadline, "no standby daemon became RUNNING"
        time.sleep(0.05)


def _wait(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _gated_daemon(tmp_path: Path) -> tuple[Path, Path]:
    """A daemon command that waits for ``gate`` to exist before it execs pynydusd: a spare
    started through it stays "starting" for as long as the test keeps the gate shut."""
    gate = tmp_path / "gate"
    script = tmp_path / "pynydusd-gated"
    real = Path(sys.executable).with_name("pynydusd")
    script.write_text(f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.01; done\nexec {real} \"$@\"\n")
    script.chmod(0o755)
    return script, gate


def _process_nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def test_image_mounted_while_standby_starts_waits_for_it(image: dict, tmp_path: Path) -> None:
    """Dedicated mode: an image that arrives while the spare daemon is still starting is
    mounted into that spare (no second daemon start on the container's critical path),
    and every daemon runs at normal priority once it serves or is ready.

    The spare is held "starting" by a gated daemon command; the image's Prepare is known
    to wait for it when the snapshotter renices the held spare to 0 (it starts at 10):
    only then does the test open the gate."""
    daemon_cmd, gate = _gated_daemon(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(f'version = 1\ndaemon_mode = "dedicated"\n[daemon]\nnydusd_path = "{daemon_cmd}"\n')
    snap = Snapshotter(config=config)
    snap.start()
    rootfs = tmp_path / "rootfs"
    try:
        _wait(lambda: any(r["mode"] == "standby" and r.get("pid") for r in snap.daemon_records()),
              30, "the spare to be spawned")
        (spare,) = [r for r in snap.daemon_records() if r["mode"] == "standby"]
        assert _process_nice(spare["pid"]) == 10  # a spare starts at low priority
        top = pull_nydus_image(snap, image)
        result: dict[str, BaseException | None] = {}

        def prepare() -> None:
            try:
                container_rootfs(snap, top, "default/3/c1", rootfs)
                result["err"] = None
            except BaseException as err:  # noqa: BLE001 - reported by the test
                result["err"] = err

        t = threading.Thread(target=prepare)
        t.start()
        _wait(lambda: _process_nice(spare["pid"]) == 0, 30, "the Prepare to take the held spare")
        assert t.is_alive()  # it waits for the spare, it did not start a daemon of its own
        gate.touch()
        t.join(60)
        assert result.get("err") is None, result
        assert (rootfs / "etc/hello.txt").read_text() == "hello from a lazily pulled image\n"
        records = snap.daemon_records()
        serving = [r for r in records if r["mode"] == "assigned"]
        assert [r["id"] for r in serving] == [spare["id"]], records
        assert not [r for r in records if r["mode"] == "dedicated"], records
        assert _thread_nice(serving[0]["pid"]) == {0}
        # the next spare comes up and, once ready, also runs at normal priority
        nxt = _wait_standby_running(snap)
        _wait(lambda: _thread_nice(nxt["pid"]) == {0}, 30, "the new spare to run at nice 0")
    finally:
        gate.touch()
        unmount_all(str(rootfs))
        snap.close()


def test_second_image_right_after_the_first_gets_the_next_spare_at_once(
        image: dict, tmp_path: Path) -> None:
    """The spare that replaces a taken one starts only later (not during the first
    container's start-up), unless a second image needs it: then it starts at once. The
    refill delay is made 120 s here, so "at once" is told from "after the delay" by a
    margin no machine load closes."""
    config = tmp_path / "config.toml"
    config.write_text('version = 1\ndaemon_mode = "dedicated"\n')
    snap = Snapshotter(config=config, env={"PYNYDUS_STANDBY_REFILL_DELAY": "120"})
    snap.start()
    rootfs_a, rootfs_b = tmp_path / "a", tmp_path / "b"
    try:
        _wait_standby_running(snap)
        top_a = pull_nydus_image(snap, image, ns="one")
        container_rootfs(snap, top_a, "one/3/c1", rootfs_a)
        # the replacement is scheduled, not started: no standby record yet
        assert not [r for r in snap.daemon_records() if r["mode"] == "standby"]
        t0 = time.monotonic()
        top_b = pull_nydus_image(snap, image, ns="two")
        container_rootfs(snap, top_b, "two/3/c1", rootfs_b)
        elapsed = time.monotonic() - t0
        assert (rootfs_b / "etc/hello.txt").read_text() == "hello from a lazily pulled image\n"
        modes = sorted(r["mode"] for r in snap.daemon_records())
        assert modes.count("assigned") == 2 and "dedicated" not in modes, modes
        assert elapsed < 60, f"second image waited {elapsed:.2f} s: the refill delay was not cut"
    finally:
        unmount_all(str(rootfs_a))
        unmount_all(str(rootfs_b))
        snap.close()


def _in_process(tmp_path: Path, mode: str) -> tuple[SnapshotterCore, NydusFilesystem]:
    """The snapshotter as ``pynydus snapshotter`` builds it, without a server."""
    root = Path(tempfile.mkdtemp(prefix="pyn-fs-", dir="/var/tmp")) / "r"  # <= 70 bytes
    cfg, _ = load_config(None, {"root": str(root), "address": str(tmp_path / "s.sock"),
                                "daemon_mode": mode})
    fs = make_filesystem(cfg)
    assert fs is not None
    core = SnapshotterCore(root, SnapshotterOptions(), fs)
    fs.start()
    return core, fs


def _stray_daemons(root: Path, fs: NydusFilesystem) -> list[int]:
    """pynydusd processes working under ``root`` that no daemon record names (read from
    daemons.db, opened anew: the snapshotter's own connection is closed)."""
    import sqlite3

    db = sqlite3.connect(f"file:{root / 'daemons.db'}?mode=ro", uri=True)
    try:
        recorded = {json.loads(r[0])["pid"] for r in db.execute("SELECT record FROM daemons")}
    finally:
        db.close()
    return sorted(set(pynydusd_pids(root)) - recorded)


def _kill_under(root: Path) -> None:
    for pid, cmd in all_cmdlines():
        if str(root).encode() in cmd:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    for mp in sorted(mountpoints_under(str(root)), reverse=True):
        subprocess.run(["umount", "-l", mp], check=False)
    shutil.rmtree(root.parent, ignore_errors=True)


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_close_while_the_bootstrap_commit_mounts_leaves_no_daemon_without_a_record(
        image: dict, tmp_path: Path, mode: str) -> None:
    """The Commit of the bootstrap layer starts the image's mount in the background, which
    waits (up to 1 s) for containerd to finish writing the bootstrap. ``close()`` in that
    wait must not return while the mount can still start a daemon, or mount into one, that
    no record names (the next snapshotter would never find it): it refuses or waits."""
    core, fs = _in_process(tmp_path, mode)
    root = core.root
    try:
        labels = {L.TARGET_SNAPSHOT_REF: "default/sha256:bootchain", L.NYDUS_BOOTSTRAP: "true",
                  L.CRI_IMAGE_REF: image["ref"]}
        (m,) = core.prepare("default/2/extract", "", labels)
        boot = Path(m.source) / "image" / "image.boot"  # a bind of the layer's fs
        boot.parent.mkdir()
        boot.write_bytes(image["boot"].read_bytes()[:1000])  # still being written
        core.commit("default/sha256:bootchain", "default/2/extract", labels)
        finish = threading.Timer(0.3, shutil.copy, (image["boot"], boot))  # containerd is done
        finish.start()
        core.close()
        # Nothing the snapshotter started runs on after close() returned.
        assert not [t.name for t in threading.enumerate() if t.name.startswith("mount-")]
        finish.join()
        time.sleep(2.0)  # a daemon started by a straggling mount would be up by now
        assert _stray_daemons(root, fs) == []
    finally:
        _kill_under(root)


def test_mount_after_close_is_refused_and_starts_nothing(image: dict, tmp_path: Path) -> None:
    core, fs = _in_process(tmp_path, "dedicated")
    root = core.root
    try:
        labels = {L.TARGET_SNAPSHOT_REF: "default/sha256:b", L.NYDUS_BOOTSTRAP: "true",
                  L.CRI_IMAGE_REF: image["ref"]}
        (m,) = core.prepare("default/2/extract", "", labels)
        (Path(m.source) / "image").mkdir()
        shutil.copy(image["boot"], Path(m.source) / "image" / "image.boot")
        sid = core.ms.get_snapshot("default/2/extract").id
        core.close()
        with pytest.raises(Unavailable, match="closing"):
            fs.mount(sid, labels)
        time.sleep(1.0)
        assert _stray_daemons(root, fs) == []
    finally:
        _kill_under(root)


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_sigterm_while_the_bootstrap_commit_mounts_leaves_no_daemon_without_a_record(
        image: dict, tmp_path: Path, mode: str) -> None:
    """The Commit of the bootstrap layer starts the image's mount in the background, which
    waits (up to 1 s) for containerd to finish writing the bootstrap. A SIGTERM in that
    wait must not let the mount start a daemon, or mount into one, that no record names
    (the next snapshotter would never find it): the stop refuses or waits for it."""
    config = tmp_path / "config.toml"
    config.write_text(f'version = 1\ndaemon_mode = "{mode}"\n')
    snap = Snapshotter(config=config)
    snap.start()
    try:
        if mode == "dedicated":
            _wait_standby_running(snap)
        stub = snap.stub()
        labels = {L.TARGET_SNAPSHOT_REF: "default/sha256:bootchain", L.NYDUS_BOOTSTRAP: "true",
                  L.CRI_IMAGE_REF: image["ref"]}
        resp = stub.Prepare(pb.PrepareSnapshotRequest(key="default/2/extract", labels=labels))
        upper = resp.mounts[0].source  # a bind of the parentless layer's fs
        boot = Path(upper) / "image" / "image.boot"
        boot.parent.mkdir()
        boot.write_bytes(image["boot"].read_bytes()[:1000])  # still being written
        stub.Commit(pb.CommitSnapshotRequest(key="default/2/extract",
                                             name="default/sha256:bootchain", labels=labels))
        assert snap.proc is not None and snap.proc.popen is not None
        os.kill(snap.pid, signal.SIGTERM)
        # the stop is under way (logged, not slept for) while the mount still waits for
        # the bootstrap; only then does containerd finish writing it
        _wait(lambda: "letting in-flight calls finish" in snap.log.read_text(errors="replace"),
              30, "the snapshotter to log the signal")
        shutil.copy(image["boot"], boot)
        assert snap.proc.popen.wait(timeout=30) == 0
        time.sleep(2.0)  # a daemon started by a straggling thread would be up by now
        with contextlib.suppress(FileNotFoundError):
            ours = {r["pid"] for r in snap.daemon_records()}
        serving = snap.image_daemon_pids()
        stray = set(snap.daemon_pids()) - ours
        assert not stray, f"daemons {stray} run with no record; records {snap.daemon_records()}"
        snap.start()  # the next snapshotter serves the image
        rootfs = tmp_path / "rootfs"
        container_rootfs(snap, "default/sha256:bootchain", "default/3/c1", rootfs)
        try:
            assert (rootfs / "etc/hello.txt").read_text() == "hello from a lazily pulled image\n"
        finally:
            unmount_all(str(rootfs))
        if serving:  # a mount that finished before the stop is the one served now
            assert snap.image_daemon_pids() == serving
    finally:
        snap.close()
