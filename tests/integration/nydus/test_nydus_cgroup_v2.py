"""The daemons' memory cgroup on the cgroup v2 path (the v1 path: test_snapshotter_nydus).

This host is cgroup v1 "hybrid": the memory controller is bound to the v1 hierarchy, so
the v2 hierarchy (``/sys/fs/cgroup/unified``, or a private ``mount -t cgroup2``) has no
memory controller to delegate and the kernel cannot enforce ``memory.max`` there. What
can be tested here, with ``PYNYDUS_CGROUP_ROOT`` pointing the snapshotter elsewhere:

- on a real cgroup2 hierarchy mounted privately for the test, a v2 root without the
  memory controller is recognised as v2 and start-up stops naming the missing
  controller (not a v1 error, not a daemon without a limit); on a host that delegates
  memory on v2 the same test checks the real placement and limit instead;
- on a directory laid out like a v2 root with memory delegated (``cgroup.controllers``,
  ``cgroup.subtree_control``), the daemon's PID is written to
  ``system.slice/nydusd/cgroup.procs`` and the limit to ``memory.max``, nothing to v1
  file names.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.host.mount import unmount_all
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import HarnessError, make_workdir, remove_tree

from .support import container_rootfs, pull_nydus_image

pytestmark = [pytest.mark.root]

CONFIG = 'version = 1\ndaemon_mode = "shared"\n[cgroup]\nenable = true\nmemory_limit = "300MiB"\n'


@pytest.fixture
def cgroup2() -> Iterator[Path]:
    """A private mount of the host's cgroup v2 hierarchy."""
    work = make_workdir("cg2")
    mnt = work / "cg"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "cgroup2", "none", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        remove_tree(work)


def test_v2_on_the_real_hierarchy(cgroup2: Path, image: dict, tmp_path: Path) -> None:
    """On a private mount of the host's cgroup2 hierarchy: where memory is delegated
    (cgroup v2 hosts), the daemon really runs in system.slice/nydusd under memory.max;
    where it is not (this v1-hybrid host), start-up stops naming the missing controller
    (not a v1 error, and not a daemon without its limit)."""
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    env = {"PYNYDUS_CGROUP_ROOT": str(cgroup2)}
    delegated = "memory" in (cgroup2 / "cgroup.subtree_control").read_text().split()
    if not delegated:
        snap = Snapshotter(config=config, env=env)
        try:
            with pytest.raises(HarnessError, match="snapshotter exited"):
                snap.start()
            assert snap.proc is not None and snap.proc.returncode() not in (None, 0)
            text = snap.log.read_text(errors="replace")
            assert "cgroup v2: the memory controller is not enabled" in text, text[-3000:]
            assert not (cgroup2 / "system.slice" / "nydusd").exists()
        finally:
            snap.close()
        return
    cg = cgroup2 / "system.slice" / "nydusd"
    existed = cg.exists()
    try:
        with Snapshotter(config=config, env=env) as snap:
            (pid,) = snap.daemon_pids()
            assert str(pid) in (cg / "cgroup.procs").read_text().split()
            assert (cg / "memory.max").read_text().strip() == str(300 << 20)
            top = pull_nydus_image(snap, image)
            rootfs = tmp_path / "rootfs"
            container_rootfs(snap, top, "default/3/c1", rootfs)
            try:
                assert (rootfs / "data/small.txt").read_text() == "small\n"
            finally:
                unmount_all(str(rootfs))
    finally:
        if not existed and cg.exists():
            with contextlib.suppress(OSError):
                cg.rmdir()


@pytest.fixture
def v2_root() -> Iterator[Path]:
    work = make_workdir("cg2f")
    root = work / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (root / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    try:
        yield root
    finally:
        remove_tree(work)


def test_v2_daemon_is_placed_with_memory_max(v2_root: Path, image: dict, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    cg = v2_root / "system.slice" / "nydusd"
    with Snapshotter(config=config, env={"PYNYDUS_CGROUP_ROOT": str(v2_root)}) as snap:
        assert (cg / "memory.max").read_text() == str(300 << 20)
        top = pull_nydus_image(snap, image)
        rootfs = tmp_path / "rootfs"
        container_rootfs(snap, top, "default/3/c1", rootfs)
        try:
            (pid,) = snap.daemon_pids()  # shared mode: one daemon, started with the snapshotter
            assert (cg / "cgroup.procs").read_text().split() == [str(pid)]
            assert (rootfs / "data/small.txt").read_text() == "small\n"
        finally:
            unmount_all(str(rootfs))
    assert sorted(p.name for p in cg.iterdir()) == ["cgroup.procs", "memory.max"]  # no v1 names
    assert not (v2_root / "memory").exists()
