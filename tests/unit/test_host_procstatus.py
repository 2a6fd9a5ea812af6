"""pynydus.host.procstatus: a process's /proc/<pid>/status fields, 0/empty once it is gone."""

from __future__ import annotations

import os

from pynydus.host.procstatus import proc_status, rss_kib


def test_status_fields_of_a_live_process_and_of_self() -> None:
    mine = proc_status("self")
    assert mine["Pid"] == os.getpid() and mine["Threads"] >= 1
    assert mine["VmRSS"] > 1024  # KiB: a Python process is more than a MiB
    assert 0.5 < rss_kib(os.getpid()) / mine["VmRSS"] < 2


def test_a_process_that_is_not_there_has_no_fields_and_no_rss() -> None:
    assert proc_status("no-such-pid") == {} and rss_kib("no-such-pid") == 0
    assert rss_kib(1 << 30) == 0  # above pid_max (4194304 at most): never a process
