"""pynydus.host.proc: is a pid a live process with that command line; its /proc status
fields, 0/empty when it is not there."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pynydus.host.proc import is_live, proc_status, rss_kib


def test_status_fields_of_a_live_process_and_of_self() -> None:
    mine = proc_status("self")
    assert mine["Pid"] == os.getpid() and mine["Threads"] >= 1
    assert mine["VmRSS"] > 1024  # KiB: a Python process is more than a MiB
    assert 0.5 < rss_kib(os.getpid()) / mine["VmRSS"] < 2


def test_a_process_that_is_not_there_has_no_fields_and_no_rss() -> None:
    assert proc_status("no-such-pid") == {} and rss_kib("no-such-pid") == 0
    assert rss_kib(1 << 30) == 0  # above pid_max (4194304 at most): never a process


def test_a_live_process_with_that_command_line_and_no_other() -> None:
    marker = "pynydus-is-live-test-marker"
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()", marker],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"  # exec'd, running
        assert is_live(child.pid, marker)
        assert not is_live(child.pid, "another-api-socket")  # the pid used by another program
        assert not is_live(0, marker) and not is_live(-1, marker)
        assert child.stdin is not None
        child.stdin.close()  # it ends; until it is reaped it is a zombie
        deadline = time.monotonic() + 60  # room for a loaded machine; a zombie shows at once
        while proc_status(child.pid).get("Pid") == child.pid and time.monotonic() < deadline:
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                if b") Z " in f.read():
                    break
            time.sleep(0.01)
        assert not is_live(child.pid, marker)  # a zombie is not live
    finally:
        child.kill()
        child.wait()
    assert not is_live(child.pid, marker)  # reaped: gone
