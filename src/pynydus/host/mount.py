"""Performing containerd mount specs with mount(2), as containerd's mount package does.

Used by tests (to mount exactly what the snapshotter returned) and by the
``nydus-overlayfs`` helper. Option words that are mount flags become flags; the
rest is the filesystem's data string. A read-only bind is a bind followed by a
read-only remount, since the kernel ignores MS_RDONLY on the first bind.

Overlay options longer than a page (128 layers of absolute paths) do not fit the
kernel's mount data; like containerd we then mount from the lowerdirs' common
parent directory with relative paths. That changes the process's working
directory for the duration of the call, so it is serialised by a lock and is not
for use in a multi-threaded daemon that depends on its cwd.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 0x2

# option -> (clear?, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_cwd_lock = threading.Lock()


@dataclass(frozen=True)
class MountSpec:
    """A mount as containerd describes one: type, source, options."""

    type: str
    source: str
    options: tuple[str, ...]


def parse_options(options: Iterable[str]) -> tuple[int, list[str]]:
    """Split option words into (flags, data words)."""
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAGS:
            clear, flag = _FLAGS[opt]
            flags = flags & ~flag if clear else flags | flag
        else:
            data.append(opt)
    return flags, data


def sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2); OSError naming the mount (its data cut to 200 characters)."""
    rc = _libc.mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype), flags,
                     os.fsencode(data) if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target} ({data[:200]!r}): "
                           f"{os.strerror(err)}")


def compact_lowerdir(data: list[str]) -> tuple[str, list[str]]:
    """(common dir, data with lowerdirs relative to it), as containerd's compactLowerdirOption."""
    idx = next((i for i, d in enumerate(data) if d.startswith("lowerdir=")), -1)
    if idx < 0:
        return "", data
    dirs = data[idx][len("lowerdir="):].split(":")
    if len(dirs) <= 1:
        return "", data
    common = os.path.commonpath(dirs)
    if common in ("/", ""):
        return "", data
    rel = [os.path.relpath(d, common) for d in dirs]
    out = list(data)
    out[idx] = "lowerdir=" + ":".join(rel)
    return common, out


def mount(spec: MountSpec, target: str) -> None:
    """Mount ``spec`` on ``target`` (an existing directory)."""
    flags, data = parse_options(spec.options)
    target = os.path.abspath(target)
    if spec.type == "bind" or flags & MS_BIND:
        sys_mount(spec.source, target, "", flags & ~MS_RDONLY | MS_BIND, "")
        if flags & MS_RDONLY:
            sys_mount("", target, "", flags | MS_REMOUNT | MS_BIND, "")
        return
    joined = ",".join(data)
    if spec.type == "overlay" and len(joined) >= _PAGE_SIZE - 512:
        common, data = compact_lowerdir(data)
        if common:
            with _cwd_lock:
                saved = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.chdir(common)
                    sys_mount(spec.source, target, spec.type, flags, ",".join(data))
                finally:
                    os.fchdir(saved)
                    os.close(saved)
            return
    sys_mount(spec.source, target, spec.type, flags, joined)


def mount_all(specs: Sequence[MountSpec], target: str) -> None:
    """Mount each spec on ``target`` in order; on failure undo the ones done."""
    done = 0
    try:
        for spec in specs:
            mount(spec, target)
            done += 1
    except BaseException:
        for _ in range(done):
            unmount(target)
        raise


def unmount(target: str, *, lazy: bool = False) -> None:
    rc = _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def unmount_all(target: str) -> None:
    """Unmount everything stacked on ``target``; quiet when nothing is mounted."""
    for _ in range(64):
        try:
            unmount(target)
        except OSError:
            return
