"""Upgrading a node's pynydus while containers run on Nydus images.

The upgrade path (README "Upgrading"): the service restarts on the new version, which
systemd does with ``KillMode=process`` (SIGTERM to the snapshotter alone). The daemons of
running images are adopted by the new snapshotter and keep serving their containers; the
images mounted afterwards get daemons of the new ``pynydusd``. A standby daemon left by a
crashed old version is not used for them. An old image's daemon goes when its image is
removed.

Two installs: the package built as a wheel from an older commit (:data:`UPGRADE_FROM`)
and installed on its own (snapshotter, template and daemons all run it, through
``PYTHONPATH``), replaced by the working tree's. The other tests stand a second launcher
of this checkout's pynydusd (``daemon.nydusd_path``) in for a newer daemon build.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.convert.converter import ConvertOptions, convert
from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.cri import CriImages
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import make_workdir, mounts_under, remove_tree, wait_until

SNAP = "nydus"
NS = "k8s.io"
PYNYDUSD = Path(sys.executable).parent / "pynydusd"
REPO = Path(__file__).resolve().parents[2]
# The release an upgrade starts from: main at the start of the 7 Dec 2026 fifth session.
# Move it forward only when upgrades from it are given up on purpose (docs/deploy.md).
UPGRADE_FROM = "ca71c6b108a3ba53498405361da1977cc8c3efd1"


def launcher(path: Path) -> Path:
    """A pynydusd "build" of its own: a script that runs this checkout's pynydusd."""
    path.write_text(f"#!/bin/sh\nexec {PYNYDUSD} \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def config(path: Path, nydusd: Path) -> Path:
    path.write_text(f'version = 1\ndaemon_mode = "dedicated"\n[daemon]\nnydusd_path = "{nydusd}"\n')
    return path


def daemons_by_command(snap: Snapshotter) -> dict[str, list[str]]:
    """daemon id -> the command its record says started it."""
    return {r["id"]: r.get("command", []) for r in snap.daemon_records()}


def serving(snap: Snapshotter) -> dict[str, str]:
    """snapshot id -> daemon id, for every image being served."""
    (rows,) = snap._daemons_db("SELECT snapshot_id, daemon_id FROM instances")
    return dict(rows)


@pytest.fixture(scope="module")
def refs(registry: Registry, layouts: Path) -> tuple[str, str]:
    """Two Nydus images: one running across the upgrade, one pulled after it."""
    out = []
    for name in ("old", "new"):
        built = images.small_image(name).write_layout(layouts / f"up-{name}")
        src = registry.ref(f"upgrade/{name}")
        oci.push(built, src)
        target = registry.ref(f"upgrade/{name}", "nydus")
        convert(ConvertOptions(source=src, target=target, source_insecure=True,
                               target_insecure=True))
        out.append(target)
    return out[0], out[1]


@pytest.fixture
def node(registry: Registry, containerd_version: str, tmp_path: Path
         ) -> Iterator[tuple[Snapshotter, Containerd, Path, Path]]:
    v1, v2 = launcher(tmp_path / "pynydusd-v1"), launcher(tmp_path / "pynydusd-v2")
    cfg = config(tmp_path / "config.toml", v1)
    with Snapshotter(config=cfg) as snap, Containerd(
            snap.socket, registry_hosts=[registry.host], cri=True, namespace=NS,
            version=containerd_version) as ctrd:
        yield snap, ctrd, v1, v2


def _force_remove(ctrd: Containerd, name: str) -> None:
    """Kill container ``name``'s task and remove both, whatever state they are in."""
    ctrd.ctr("tasks", "kill", "-s", "KILL", name, check=False)
    time.sleep(0.5)
    ctrd.ctr("tasks", "rm", "-f", name, check=False)
    ctrd.ctr("containers", "rm", name, check=False)


def test_running_containers_keep_their_daemons_and_new_images_get_the_new_one(
        node: tuple[Snapshotter, Containerd, Path, Path], refs: tuple[str, str]) -> None:
    snap, ctrd, v1, v2 = node
    old_ref, new_ref = refs
    cri = CriImages(str(ctrd.socket))
    cri.pull(old_ref)
    ctrd.ctr("run", "-d", "--snapshotter", SNAP, old_ref, "before", "sleep", "600")
    try:
        (old_daemon,) = serving(snap).values()
        assert daemons_by_command(snap)[old_daemon] == [str(v1)]
        old_pid = next(r["pid"] for r in snap.daemon_records() if r["id"] == old_daemon)

        # the upgrade: SIGTERM to the snapshotter alone, then the new version starts
        config(Path(str(snap.config)), v2)
        assert snap.restart() == 0
        ctrd.wait_snapshotter(SNAP)

        # the running container still reads through its (old) daemon
        out = ctrd.ctr_out("tasks", "exec", "--exec-id", "after", "before", "cat", "/app/data.txt")
        assert out.strip() == "data"
        assert os.path.exists(f"/proc/{old_pid}")
        assert daemons_by_command(snap)[old_daemon] == [str(v1)]

        # an image mounted now gets a daemon of the new version
        cri.pull(new_ref)
        out = ctrd.ctr_out("run", "--rm", "--snapshotter", SNAP, new_ref, "new-run",
                           "/bin/sh", "/app/hello.sh", timeout=180)
        assert out.strip() == "hello from new"
        new_daemons = set(serving(snap).values()) - {old_daemon}
        assert len(new_daemons) == 1
        assert daemons_by_command(snap)[new_daemons.pop()] == [str(v2)]
        assert all(c == [str(v2)] for d, c in daemons_by_command(snap).items() if d != old_daemon)
    finally:
        _force_remove(ctrd, "before")

    # the old image goes: its daemon with it
    for img in cri.list():
        cri.remove(img.id)
    wait_until(lambda: old_daemon not in daemons_by_command(snap), 60,
               "the old image's daemon to stop with its image")
    wait_until(lambda: not pid_running(old_pid), 15, "the old image's daemon to exit")


def pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_standby_left_by_a_crashed_old_version_is_replaced(
        node: tuple[Snapshotter, Containerd, Path, Path], refs: tuple[str, str]) -> None:
    """kill -9 leaves the old version's spare daemon running; the new version does not
    hand it an image: it stops it and starts a spare of its own."""
    snap, ctrd, v1, v2 = node
    wait_until(lambda: any(r["mode"] == "standby" and r["pid"] for r in snap.daemon_records()),
               60, "the standby daemon")
    (old_spare,) = [r for r in snap.daemon_records() if r["mode"] == "standby"]
    assert old_spare["command"] == [str(v1)]
    snap.kill9()
    config(Path(str(snap.config)), v2)
    snap.start()
    ctrd.wait_snapshotter(SNAP)

    def fresh_spare() -> bool:
        spares = [r for r in snap.daemon_records() if r["mode"] == "standby" and r["pid"]]
        return len(spares) == 1 and spares[0]["command"] == [str(v2)]

    wait_until(fresh_spare, 60, "a standby daemon of the new version")
    assert old_spare["id"] not in daemons_by_command(snap)
    wait_until(lambda: not pid_running(old_spare["pid"]), 15, "the old spare to exit")
    CriImages(str(ctrd.socket)).pull(refs[1])
    out = ctrd.ctr_out("run", "--rm", "--snapshotter", SNAP, refs[1], "spare-run",
                       "/bin/sh", "/app/hello.sh", timeout=180)
    assert out.strip() == "hello from new"
    assert all(c == [str(v2)] for c in daemons_by_command(snap).values())


@pytest.fixture(scope="module")
def old_install() -> Iterator[Path]:
    """:data:`UPGRADE_FROM` built as a wheel and installed into a directory of its own
    (its dependencies are this venv's): the ``PYTHONPATH`` of an older pynydus."""
    work = make_workdir("oldpkg")
    try:
        tree = subprocess.run(["git", "-C", str(REPO), "archive", UPGRADE_FROM],
                              check=True, capture_output=True, timeout=120).stdout
        with tarfile.open(fileobj=io.BytesIO(tree)) as tf:
            tf.extractall(work / "src", filter="data")
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(work / "wheel"), str(work / "src")], check=True, timeout=600)
        (wheel,) = (work / "wheel").glob("pynydus-*.whl")
        subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target",
                        str(work / "site"), str(wheel)], check=True, timeout=600)
        yield work / "site"
    finally:
        remove_tree(work)


def runs_from(pid: int, site: Path) -> bool:
    """Process ``pid`` imports pynydus from the install at ``site``."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return f"PYTHONPATH={site}".encode() in env


def test_an_older_install_is_upgraded_while_its_container_reads(
        registry: Registry, containerd_version: str, refs: tuple[str, str], old_install: Path,
        tmp_path: Path) -> None:
    """The older install serves a running container; the working tree's snapshotter
    starts on the same root: it adopts the old daemon (the container keeps reading), mounts
    a new image with a daemon of its own, and once the images go nothing of either is left."""
    old_ref, new_ref = refs
    cfg = tmp_path / "config.toml"
    cfg.write_text('version = 1\ndaemon_mode = "dedicated"\n')
    with Snapshotter(config=cfg, env={"PYTHONPATH": str(old_install)}) as snap, Containerd(
            snap.socket, registry_hosts=[registry.host], cri=True, namespace=NS,
            version=containerd_version) as ctrd:
        cri = CriImages(str(ctrd.socket))
        assert runs_from(snap.pid, old_install)
        cri.pull(old_ref)
        ctrd.ctr("run", "-d", "--snapshotter", SNAP, old_ref, "old", "sleep", "600")
        try:
            (old_daemon,) = serving(snap).values()
            old_pid = next(r["pid"] for r in snap.daemon_records() if r["id"] == old_daemon)
            assert runs_from(old_pid, old_install)

            snap.env = None  # the upgrade: the new install's snapshotter on the same root
            assert snap.restart() == 0
            ctrd.wait_snapshotter(SNAP)
            assert not runs_from(snap.pid, old_install)

            out = ctrd.ctr_out("tasks", "exec", "--exec-id", "after", "old", "cat",
                               "/app/data.txt")
            assert out.strip() == "data"
            assert pid_running(old_pid) and set(serving(snap).values()) == {old_daemon}

            cri.pull(new_ref)
            out = ctrd.ctr_out("run", "--rm", "--snapshotter", SNAP, new_ref, "new",
                               "/bin/sh", "/app/hello.sh", timeout=180)
            assert out.strip() == "hello from new"
            for r in snap.daemon_records():
                if r["id"] != old_daemon and r["pid"] and pid_running(r["pid"]):
                    assert not runs_from(r["pid"], old_install), r
            assert all(not runs_from(p, old_install) for p in snap.template_pids())
        finally:
            _force_remove(ctrd, "old")

        for img in cri.list():
            cri.remove(img.id)

        def nothing_left() -> bool:
            return (not serving(snap) and not pid_running(old_pid)
                    and all(r["mode"] == "standby" for r in snap.daemon_records()))

        wait_until(nothing_left, 90, "the images' daemons, old and new, to go")
        images_mounts = [m for m in mounts_under(snap.root) if "/daemons/" not in m]
        assert images_mounts == [], images_mounts
