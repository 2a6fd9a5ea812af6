"""Mounting a RAFS v6 bootstrap with its blobs as kernel EROFS, and unmounting it.

Two ways to hand the kernel its files (``Backing``):

- ``file``: EROFS file-backed mounts (Linux 6.12+): the bootstrap is the mount source
  and every blob a ``device=`` path, all regular files; no block device is involved.
  When the option string would pass the one page ``mount(2)`` copies (many layers with
  long cache paths), the devices are named ``/proc/self/fd/N`` of descriptors held
  open for the call.
- ``loop``: what upstream does (and older kernels need): a loop device per file,
  attached read-only with ``LO_FLAGS_AUTOCLEAR`` and our descriptor closed right after
  the mount, so the kernel detaches each device when the mount (its last user) goes.
  Nothing is left to detach on unmount, after a crash of this process, or if the mount
  fails: a loop device never outlives its mount.

:func:`pynydus.tarfs.backing.probe_backing` picks ``file`` where the kernel can, ``loop``
otherwise; ``PYNYDUS_TARFS_BACKING=file|loop`` overrides it (the tests run both).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import Literal

from pynydus.errors import FailedPrecondition
from pynydus.host.mount import MS_RDONLY, sys_mount, unmount

__all__ = ["BACKING_ENV", "Backing", "forget_pages", "mount_bdi", "mount_erofs",
           "umount_erofs"]

log = logging.getLogger(__name__)

Backing = Literal["file", "loop"]
BACKING_ENV = "PYNYDUS_TARFS_BACKING"

# mount(2) copies at most one page of options
_MAX_DATA = os.sysconf("SC_PAGE_SIZE") - 1

_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
_LO_FLAGS_DIRECT_IO = 16
# FS_IOC_GETFSSYSFSPATH (Linux 6.8+): a superblock's sysfs name, struct fs_sysfs_path
_FS_IOC_GETFSSYSFSPATH = 0x80811501
_SYSFS_PATH_SIZE = 129
# struct loop_config: fd, block_size, struct loop_info64 (232 bytes), 8 reserved u64
_LOOP_INFO64 = struct.Struct("<QQQQQIIII64s64s32sQQ")
_LOOP_CONFIG = struct.Struct(f"<II{_LOOP_INFO64.size}s64s")
_LO_FLAGS_OFFSET = 8 * 5 + 4 * 3  # lo_flags inside loop_info64

_loop_lock = threading.Lock()  # GET_FREE + CONFIGURE is a race between our own threads


def _mount(source: str, target: str, data: str) -> None:
    sys_mount(source, target, "erofs", MS_RDONLY, data)


def umount_erofs(target: str) -> bool:
    """Unmount ``target``; False if nothing was mounted there. OSError (EBUSY) while an
    overlay or a process still uses it: it stays mounted, intact."""
    try:
        unmount(target)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.ENOENT):
            return False
        raise
    return True


def mount_erofs(bootstrap: str, devices: Sequence[str], target: str, backing: Backing, *,
                direct_io: bool = False, read_ahead_kb: int | None = None) -> None:
    """Mount ``bootstrap`` read-only on ``target`` with ``devices`` as its extra devices
    (in the order of its device table). All paths absolute; ``target`` exists.

    ``direct_io`` reads the files with direct I/O (EROFS's ``directio`` option, loop
    devices' ``LO_FLAGS_DIRECT_IO``): their own page cache is bypassed, so file data is
    cached once, in the EROFS inodes' pages. ``read_ahead_kb`` sets the mount's read-ahead
    window (the EROFS superblock's bdi, or the loop devices' queues); best effort."""
    if backing == "loop":
        _mount_loop(bootstrap, devices, target, direct_io, read_ahead_kb)
        return
    opts = "directio," if direct_io else ""
    data = opts + ",".join(f"device={d}" for d in devices)
    if len(data) <= _MAX_DATA:
        _mount(bootstrap, target, data)
    else:
        with _held_open(devices) as fds:
            _mount(bootstrap, target,
                   opts + ",".join(f"device=/proc/self/fd/{fd}" for fd in fds))
    if read_ahead_kb is not None:
        _set_read_ahead(mount_bdi(target), read_ahead_kb)


def forget_pages(path: str) -> None:
    """Drop ``path``'s clean pages from the page cache (a file that direct-I/O mounts read
    bypass their cache: keeping it would hold a second copy of the data)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def mount_bdi(target: str) -> str | None:
    """The sysfs bdi directory of the EROFS mount on ``target`` (a file-backed mount's
    superblock has a bdi of its own, named as its sysfs directory), or None."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            raw = fcntl.ioctl(fd, _FS_IOC_GETFSSYSFSPATH, bytes(_SYSFS_PATH_SIZE))
        finally:
            os.close(fd)
    except OSError as err:  # before Linux 6.8
        log.debug("no sysfs name for the mount on %s: %s", target, err)
        return None
    name = raw[1:1 + raw[0]].decode(errors="replace").rsplit("/", 1)[-1]
    return f"/sys/class/bdi/{name}"


def _set_read_ahead(queue_dir: str | None, kb: int) -> None:
    if queue_dir is None:
        return
    try:
        with open(os.path.join(queue_dir, "read_ahead_kb"), "w", encoding="ascii") as f:
            f.write(f"{kb}\n")
    except OSError as err:
        log.debug("read-ahead of %s not set: %s", queue_dir, err)


@contextlib.contextmanager
def _held_open(paths: Sequence[str]) -> Iterator[list[int]]:
    fds: list[int] = []
    try:
        for p in paths:
            fds.append(os.open(p, os.O_RDONLY | os.O_CLOEXEC))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def _attach_loop(path: str, direct_io: bool = False) -> tuple[int, str]:
    """A read-only, auto-clearing loop device over ``path``: (open descriptor, its path).
    The device detaches itself once the descriptor and every mount of it are gone."""
    backing = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _loop_lock:
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                for _ in range(16):
                    num = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
                    dev = f"/dev/loop{num}"
                    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
                    info = bytearray(_LOOP_INFO64.size)
                    flags = _LO_FLAGS_READ_ONLY | _LO_FLAGS_AUTOCLEAR
                    if direct_io:  # the kernel falls back to buffered I/O where it cannot
                        flags |= _LO_FLAGS_DIRECT_IO
                    struct.pack_into("<I", info, _LO_FLAGS_OFFSET, flags)
                    cfg = _LOOP_CONFIG.pack(backing, 512, bytes(info), bytes(64))
                    try:
                        fcntl.ioctl(fd, _LOOP_CONFIGURE, cfg)
                    except OSError as err:
                        os.close(fd)
                        if err.errno == errno.EBUSY:  # taken by someone else meanwhile
                            continue
                        raise
                    return fd, dev
            finally:
                os.close(ctl)
        raise OSError(errno.EBUSY, f"no free loop device for {path}")
    finally:
        os.close(backing)  # the loop device holds its own reference


def _mount_loop(bootstrap: str, devices: Sequence[str], target: str, direct_io: bool,
                read_ahead_kb: int | None) -> None:
    held: list[int] = []
    try:
        meta_fd, meta_dev = _attach_loop(bootstrap, direct_io)
        held.append(meta_fd)
        names = []
        for d in devices:
            fd, dev = _attach_loop(d, direct_io)
            held.append(fd)
            names.append(dev)
        if read_ahead_kb is not None:
            # file reads ahead by the superblock's device's window (the bootstrap's)
            for dev in (meta_dev, *names):
                _set_read_ahead(f"/sys/block/{os.path.basename(dev)}/queue", read_ahead_kb)
        _mount(meta_dev, target, ",".join(f"device={n}" for n in names))
    finally:
        for fd in held:  # the mount keeps what it uses; the rest detaches now
            os.close(fd)


def check_mountpoint(target: str) -> None:
    """FailedPrecondition if ``target`` is not a directory we can mount on."""
    if not os.path.isdir(target):
        raise FailedPrecondition(f"tarfs mountpoint {target} is not a directory")
