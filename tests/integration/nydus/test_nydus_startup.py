"""Start-up choices the snapshotter reports, asserted on what it does, not on the parse.

``recover_policy = "failover"`` (not possible with libfuse, docs/failover.md) starts with a
warning and then behaves as ``restart``: a killed daemon is replaced. An ``fs_driver`` we
do not drive (fscache, blockdev, nodev, proxy) stops start-up with a non-zero status and
a message naming the driver; nothing serves on the socket.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.harness.snapshotter import Snapshotter
from tests.harness.util import HarnessError

from .support import container_rootfs, pull_nydus_image

pytestmark = [pytest.mark.root]


def _log_lines(snap: Snapshotter, needle: str) -> list[str]:
    return [ln for ln in snap.log.read_text(errors="replace").splitlines() if needle in ln]


def test_recover_policy_failover_warns_and_restarts(image: dict, tmp_path: Path) -> None:
    from pynydus.host.mount import unmount_all

    config = tmp_path / "config.toml"
    config.write_text('version = 1\n[daemon]\nrecover_policy = "failover"\n')
    with Snapshotter(config=config) as snap:
        warned = _log_lines(snap, "recover_policy failover")
        assert warned and all("WARN" in ln.upper() for ln in warned), snap.log.read_text()[-3000:]
        assert any("restart" in ln for ln in warned), warned
        top = pull_nydus_image(snap, image)
        rootfs = tmp_path / "rootfs"
        container_rootfs(snap, top, "default/3/c1", rootfs)
        try:
            (pid,) = snap.image_daemon_pids()
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                pids = snap.image_daemon_pids()
                if pids and pids != [pid]:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("recover_policy failover did not fall back to restart:\n"
                            + snap.log.read_text()[-3000:])
        finally:
            unmount_all(str(rootfs))
        rootfs2 = tmp_path / "rootfs2"
        container_rootfs(snap, top, "default/4/c2", rootfs2)
        try:
            assert (rootfs2 / "data/small.txt").read_text() == "small\n"
        finally:
            unmount_all(str(rootfs2))


@pytest.mark.parametrize("driver", ["fscache", "blockdev", "nodev", "proxy"])
def test_fs_driver_we_do_not_drive_stops_start_up(driver: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    mode = 'daemon_mode = "shared"\n' if driver == "fscache" else ""
    config.write_text(f'version = 1\n{mode}[daemon]\nfs_driver = "{driver}"\n')
    snap = Snapshotter(config=config, ready_timeout=30)
    try:
        with pytest.raises(HarnessError, match="snapshotter exited"):
            snap.start()
        assert snap.proc is not None
        status = snap.proc.returncode()
        assert status not in (None, 0), status
        text = snap.log.read_text(errors="replace")
        assert f"fs_driver {driver}" in text, text[-3000:]
        assert "fusedev" in text  # what to use instead
        assert not snap.socket.exists()
    finally:
        snap.close()
