"""The failover path's CPU priority (``manager.Boost``): the calling thread runs at
``TAKEOVER_NICENESS`` for the block only, a successor named with ``process`` keeps it
until ``_BOOST_HOLD`` s after the block and is then set back to 0."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pynydus.manager import manager
from pynydus.manager.manager import Boost
from pynydus.manager.supervisor import TAKEOVER_NICENESS


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


@pytest.mark.root
def test_boost_raises_the_thread_for_the_block_and_the_successor_for_a_while(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager, "_BOOST_HOLD", 0.2)
    sock = str(tmp_path / "api.sock")  # on the command line: how the unboost knows it
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", sock])
    seen: dict[str, int] = {}

    def run() -> None:
        tid = threading.get_native_id()
        before = _nice(tid)
        with Boost() as boost:
            seen["inside"] = _nice(tid)
            boost.process(child.pid, sock)
            seen["child"] = _nice(child.pid)
        seen["after"], seen["before"] = _nice(tid), before

    try:
        t = threading.Thread(target=run)
        t.start()
        t.join(10)
        assert seen["inside"] == seen["child"] == TAKEOVER_NICENESS < 0
        assert seen["after"] == seen["before"]
        deadline = time.monotonic() + 10
        while _nice(child.pid) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _nice(child.pid) == 0
    finally:
        child.kill()
        child.wait()
