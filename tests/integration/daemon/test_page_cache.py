"""pynydusd fills the kernel's page cache with the chunks a miss fetched.

Contract (``fill_page_cache``, default true, our own FUSE session): after a read that
had to wait for the backend, the rest of the chunks it fetched is pushed into the
kernel's page cache (FUSE_NOTIFY_STORE), byte-identical to the image, so later reads of
them never reach the daemon; with the key false only what was read is cached. The
kernel reads ahead ``READAHEAD_KB`` on the mount (not the 128 KiB INIT leaves).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import pytest

from pynydus.daemon.daemon import READAHEAD_KB
from pynydus.host.mountinfo import read_mountinfo
from tests.harness.util import wait_until

from .conftest import Image, StartFn, localfs_config
from .trees import CHUNK

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(path: Path, length: int) -> list[bool]:
    """Which of the file's first ``length`` bytes' pages are in the page cache: mincore(2)
    over a mapping of the file, which itself reads nothing."""
    mmap_ = _libc.mmap
    mmap_.restype = ctypes.c_void_p
    mmap_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = mmap_(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        vec = (ctypes.c_ubyte * ((length + PAGE - 1) // PAGE))()
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return [bool(v & 1) for v in vec]
    finally:
        _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(length))


def _read_one_page(path: Path, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead
        return os.pread(fd, PAGE, offset)
    finally:
        os.close(fd)


def _chunk_filled(path: Path, chunk: int, length: int, wait: float) -> bool:
    """Whether every other page of ``chunk`` is in the page cache after reading one page
    inside it, waiting up to ``wait`` s for them."""
    offset = chunk * CHUNK + 16 * PAGE
    pages = range(chunk * CHUNK // PAGE, min((chunk + 1) * CHUNK, length) // PAGE)
    _read_one_page(path, offset)
    deadline = time.monotonic() + wait
    while True:
        resident = resident_pages(path, length)
        others = all(resident[i] for i in pages if i != offset // PAGE)
        if others or time.monotonic() > deadline:
            return others
        time.sleep(0.05)


@pytest.mark.parametrize("fill", [True, False])
def test_a_miss_puts_its_whole_chunk_in_the_page_cache(full_image: Image, start_daemon: StartFn,
                                                       workdir: Path, fill: bool) -> None:
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=localfs_config(full_image.blob_dir, workdir / f"cache-{fill}",
                                           fill_page_cache=fill))
    path = d.mountpoint / "files/multi-chunk"
    src = (full_image.src / "files/multi-chunk").read_bytes()
    length = len(src) - len(src) % PAGE
    if fill:
        # a cache drop by anything else on the machine empties the page cache under us:
        # another chunk is another chance
        assert any(_chunk_filled(path, chunk, length, 10) for chunk in (1, 2))
    else:
        assert not _chunk_filled(path, 1, length, 0.5)
    assert not any(resident_pages(path, length)[:CHUNK // PAGE])  # chunk 0 was never read
    # what the kernel holds is the image's bytes
    with open(path, "rb") as f:
        assert f.read() == src


def test_the_mount_reads_ahead_as_far_as_the_daemon_sets(full_image: Image, start_daemon: StartFn,
                                                          workdir: Path) -> None:
    # the kernel resets the window to what INIT negotiated (128 KiB) when it applies the
    # INIT reply: the daemon raises it after that, once
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=localfs_config(full_image.blob_dir, workdir / "cache"))
    entry = next(e for e in reversed(read_mountinfo()) if e.mountpoint == str(d.mountpoint))
    knob = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
    wait_until(lambda: int(knob.read_text()) == READAHEAD_KB, 30,
               f"{knob} at {READAHEAD_KB} (is {knob.read_text().strip()})")
