"""Start-up choices the snapshotter reports, asserted on what it does, not on the parse.

(``recover_policy = "failover"`` has its own tests: test_nydus_failover.py.) An ``fs_driver`` we
do not drive (fscache, blockdev, nodev, proxy) stops start-up with a non-zero status and
a message naming the driver; nothing serves on the socket.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.snapshotter import Snapshotter
from tests.harness.util import HarnessError

pytestmark = [pytest.mark.root]


def _log_lines(snap: Snapshotter, needle: str) -> list[str]:
    return [ln for ln in snap.log.read_text(errors="replace").splitlines() if needle in ln]


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
