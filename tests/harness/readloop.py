"""A reader that checksums every file of a tree again and again, and measures its stalls.

``ReadLoop(root, expected)`` runs in a thread: for each file it opens, reads everything,
compares the SHA-256 with ``expected[relative path]`` and, so that the next pass reaches
the FUSE daemon again instead of the page cache, drops the file's cached pages
(POSIX_FADV_DONTNEED). Every error (exception or wrong bytes) is recorded with its time;
``gaps()`` are the times between consecutive completed reads, so a failover shows as the
longest gap. Some files stay open for the whole run (``keep_open``) and are read through
the same fd each pass: handles must survive a takeover too.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path
from typing import Self


def digests(src: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``src`` by relative path."""
    out = {}
    for dirpath, _, files in os.walk(src):
        for name in files:
            p = Path(dirpath) / name
            if stat.S_ISREG(os.lstat(p).st_mode):
                out[str(p.relative_to(src))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class ReadLoop:
    def __init__(self, root: Path, expected: dict[str, str], *, keep_open: int = 2,
                 drop_cache: bool = True) -> None:
        self.root = root
        self.expected = dict(sorted(expected.items()))
        self.drop_cache = drop_cache
        self.errors: list[tuple[float, str]] = []
        self.done: list[float] = []  # monotonic time of each completed file read
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readloop", daemon=True)
        names = sorted(self.expected, key=lambda n: -len(n))[:keep_open]
        self._held = {n: os.open(root / n, os.O_RDONLY) for n in names}

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()
        if self._thread.is_alive():
            self.errors.append((time.monotonic(), "reader still blocked at stop (a hung read)"))

    def wait_passes(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        start = self.passes
        while self.passes < start + n:
            if time.monotonic() > deadline:
                raise AssertionError(f"reader made {self.passes - start} of {n} passes in "
                                     f"{timeout:.0f}s; errors: {self.errors[:5]}")
            time.sleep(0.02)

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.done, self.done[1:])]

    def max_gap(self) -> float:
        return max(self.gaps(), default=0.0)

    def _read(self, fd: int) -> bytes:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size + 1, 0) if size else b""
        if self.drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return data

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, want in self.expected.items():
                if self._stop.is_set():
                    return
                try:
                    held = self._held.get(name)
                    if held is not None:
                        data = self._read(held)
                    else:
                        fd = os.open(self.root / name, os.O_RDONLY)
                        try:
                            data = self._read(fd)
                        finally:
                            os.close(fd)
                    if hashlib.sha256(data).hexdigest() != want:
                        self.errors.append((time.monotonic(), f"{name}: wrong bytes"))
                except OSError as err:
                    self.errors.append((time.monotonic(), f"{name}: {err}"))
                    time.sleep(0.01)
                self.done.append(time.monotonic())
            self.passes += 1
