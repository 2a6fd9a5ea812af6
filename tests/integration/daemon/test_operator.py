"""What an operator asks of a running pynydusd: SIGUSR1 logs every thread's stack into its
--log-file and the daemon carries on serving; that log rotates at --log-rotation-size MB
(what the snapshotter passes from [daemon] log_rotation_size), keeping backups beside it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .conftest import Image, StartFn, localfs_config


def test_sigusr1_stacks_land_in_a_log_that_rotates(full_image: Image, start_daemon: StartFn,
                                                   workdir: Path) -> None:
    log_file = workdir / "logs" / "nydusd.log"
    log_file.parent.mkdir()
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=localfs_config(full_image.blob_dir, workdir / "cache"),
                     extra_args=("--log-file", str(log_file), "--log-rotation-size", "1"))
    os.kill(d.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while "SIGUSR1: stacks of" not in log_file.read_text(errors="replace"):
        assert time.monotonic() < deadline, log_file.read_text(errors="replace")[-2000:]
        time.sleep(0.05)
    one_dump = log_file.stat().st_size
    text = log_file.read_text()
    # the main thread and the FUSE session's workers (our own session, the default)
    assert "thread 'MainThread'" in text and "thread 'fuse-0'" in text

    def backups() -> list[str]:
        return sorted(p.name for p in log_file.parent.iterdir() if p.name != "nydusd.log")

    # dumps until the log passes 1 MB (signals sent while one is pending merge into it)
    deadline = time.monotonic() + 120
    while not backups():
        assert time.monotonic() < deadline, f"no rotation; log is {log_file.stat().st_size} B"
        os.kill(d.pid, signal.SIGUSR1)
        time.sleep(0.002)
    (backup,) = backups()
    assert backup.startswith("nydusd-") and backup.endswith(".log")
    size = (log_file.parent / backup).stat().st_size
    assert (1 << 20) - 4 * one_dump <= size <= 1 << 20  # rotated before a dump would pass 1 MB
    assert d.get("/api/v1/daemon")["state"] == "RUNNING"
    want = (full_image.src / "files/multi-chunk").read_bytes()
    assert (d.mountpoint / "files/multi-chunk").read_bytes() == want
