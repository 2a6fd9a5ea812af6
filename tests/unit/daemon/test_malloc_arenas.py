"""pynydusd keeps glibc's malloc to two arenas (``limit_malloc_arenas``), whatever its
thread count: by default every thread that allocates gets an arena of its own, up to
eight per CPU, and keeps its pages. ``malloc_stats()`` (glibc) prints one ``Arena N:``
block per arena on stderr; each case runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

_SCRIPT = """
import ctypes, sys, threading
from pynydus.host.libc import limit_malloc_arenas
print(limit_malloc_arenas(2))
all_in = threading.Barrier(8)
def allocate():
    kept = [bytearray(256 << 10) for _ in range(4)]  # beyond pymalloc: malloc itself
    all_in.wait()  # every thread alive (an ended thread's arena is reused)
    del kept
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
sys.stdout.flush()
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(env: dict[str, str]) -> tuple[str, int]:
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                       env=env, check=True, timeout=120)
    return r.stdout.strip(), sum(line.startswith("Arena ") for line in r.stderr.splitlines())


def test_eight_allocating_threads_share_at_most_two_arenas() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    limited, arenas = _arenas(env)
    assert limited == "True"
    assert 1 <= arenas <= 2


def test_malloc_arena_max_in_the_environment_wins() -> None:
    limited, arenas = _arenas({**os.environ, "MALLOC_ARENA_MAX": "4"})
    assert limited == "False"
    assert 1 <= arenas <= 4


def test_without_the_limit_each_thread_takes_an_arena() -> None:
    """The case the limit is for: the same threads without it (glibc's default)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    script = _SCRIPT.replace("print(limit_malloc_arenas(2))", "print('unlimited')")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=env, check=True, timeout=120)
    assert sum(line.startswith("Arena ") for line in r.stderr.splitlines()) > 2
