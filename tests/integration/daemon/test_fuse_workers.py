"""How many FUSE workers a daemon runs: four until requests need more, then up to its
``threads`` (16 with the default --thread-num), one more each time a worker takes a
request while none is left waiting for the next.

Contract (issue 11's idle RSS): a daemon that serves one reader at a time keeps few
workers (each idle one is ~35 KB of resident memory); concurrent readers get more. The
workers are counted in the stack dump SIGUSR1 writes into the log (``fuse-N``).
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
from pathlib import Path

from tests.harness.pynydusd import Pynydusd
from tests.harness.util import wait_until

from .conftest import StartFn, build_image, localfs_config

_WORKER = re.compile(r"thread 'fuse-(\d+)'")
_DUMP = "SIGUSR1: stacks of"


def fuse_workers(d: Pynydusd) -> set[int]:
    """The numbers of the FUSE workers in a new stack dump of ``d``."""
    before = d.log_text().count(_DUMP)
    os.kill(d.pid, signal.SIGUSR1)
    wait_until(lambda: d.log_text().count(_DUMP) > before, 30, "the stack dump")
    text = d.log_text()
    return {int(n) for n in _WORKER.findall(text[text.rfind(_DUMP):])}


def test_workers_start_at_four_and_grow_with_concurrent_readers(
        workdir: Path, start_daemon: StartFn) -> None:
    src = workdir / "src"
    src.mkdir()
    size = 16 << 20
    (src / "data").write_bytes(os.urandom(size))
    img = build_image(src, workdir / "img")
    d = start_daemon(bootstrap=img.bootstrap,
                     config=localfs_config(img.blob_dir, workdir / "cache"))
    assert fuse_workers(d) == {0, 1, 2, 3}
    assert (d.mountpoint / "data").stat().st_size == size  # one reader: still four
    assert fuse_workers(d) == {0, 1, 2, 3}

    stop = threading.Event()

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        fd = os.open(d.mountpoint / "data", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for _ in range(2000):
                if stop.is_set():
                    return
                os.pread(fd, 4096, rnd.randrange(size // 4096) * 4096)
        finally:
            os.close(fd)

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in readers:
        t.start()
    try:
        wait_until(lambda: len(fuse_workers(d)) > 4 or not any(t.is_alive() for t in readers),
                   60, "more workers", interval=0.5)
    finally:
        stop.set()
        for t in readers:
            t.join()
    workers = fuse_workers(d)
    assert 4 < len(workers) <= 16 and workers == set(range(len(workers))), workers
