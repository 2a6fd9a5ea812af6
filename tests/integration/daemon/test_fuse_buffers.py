"""What the FUSE threads' request buffers keep resident: a page each, after a cache drop.

Contract (issue 11's idle RSS): a request is read into its thread's buffer (1 MiB and a
page, the largest request the negotiated INIT allows); a request longer than a page (in
practice a BATCH_FORGET, after the kernel evicted many of the mount's inodes) gives the
pages beyond the first back at once, so an idle daemon keeps about a page per thread
whatever it was asked before. The buffers are private maps: pages given back are freed,
not kept in shmem.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from .conftest import StartFn, build_image, localfs_config

# max_pages 256 (our INIT): a buffer is 1 MiB and a page; adjacent ones may be merged
# into one mapping by the kernel, so a mapping of k buffers has k times that size
BUFFER_KIB = 1028
FILES = 6000


def _buffers(pid: int) -> list[tuple[int, int]]:
    """(size, resident) in KiB of each of ``pid``'s anonymous mappings that are whole
    FUSE request buffers, and of the shared ones (named /dev/zero)."""
    found: list[tuple[int, int]] = []
    size = 0
    anon = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
        if head:
            size = (int(head[2], 16) - int(head[1], 16)) >> 10
            anon = head[3] in ("", "/dev/zero (deleted)")
        elif line.startswith("Rss:") and anon and size % BUFFER_KIB == 0:
            found.append((size, int(line.split()[1])))
    return found


def test_request_buffers_keep_a_page_each_after_a_cache_drop(
        workdir: Path, start_daemon: StartFn) -> None:
    src = workdir / "src"
    for i in range(FILES):
        d = src / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i % 100:02d}").write_bytes(b"")
    img = build_image(src, workdir / "img")
    d = start_daemon(bootstrap=img.bootstrap,
                     config=localfs_config(img.blob_dir, workdir / "cache"))
    for _ in range(2):
        assert sum(len(files) for _, _, files in os.walk(d.mountpoint)) == FILES
        # the kernel forgets the mount's inodes: BATCH_FORGETs of many nodes each
        subprocess.run(["sh", "-c", "sync; echo 2 > /proc/sys/vm/drop_caches"], check=True)
    assert sum(len(files) for _, _, files in os.walk(d.mountpoint / "d000")) == 100
    buffers = _buffers(d.pid)
    assert sum(size // BUFFER_KIB for size, _ in buffers) >= 4, buffers
    for size, resident in buffers:
        assert resident <= size // BUFFER_KIB * 8, buffers  # a page, and one of the map's
