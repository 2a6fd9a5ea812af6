"""pynydus.host.libc: the C library calls os lacks (malloc tuning of build processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# One process per setting: the tuning is process-wide and cannot be undone.
_CHURN = """
import os, resource, sys
import lz4.block
from pynydus.host.libc import keep_freed_buffers
if sys.argv[1] == "tuned":
    assert keep_freed_buffers()
data = os.urandom(1 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(100):  # a build's buffers: a chunk read, its compressed form
    piece = b"x" * ((1 << 20) + i * 4096)
    packed = lz4.block.compress(data, store_size=False)
    del piece, packed
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], check=True,
                         capture_output=True, text=True).stdout
    return int(out)


def test_kept_buffers_are_reused_instead_of_faulted_in_again() -> None:
    default, tuned = _page_faults("default"), _page_faults("tuned")
    # 100 rounds of two 1 MiB buffers: glibc's defaults fault most of their pages in
    # every round (~50,000 faults); kept, only the first round's do.
    assert tuned * 10 < default, (tuned, default)
    assert tuned < 100 * 256 // 10


def test_writeback_still_reaches_the_kernel(tmp_path: Path) -> None:
    from pynydus.host.writeback import start_writeback

    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 9000)
        f.flush()
        assert start_writeback(f.fileno(), 0, 9000)
        assert not start_writeback(f.fileno(), 0, 0)
