"""Start-up checks of the host, each failing with what the operator should do."""

from __future__ import annotations

import ctypes
import os
import struct
import tempfile
from pathlib import Path

from pynydus.errors import HostCheckError

# upstream's limit: daemon API sockets live at <root>/socket/<20-char id>/api?.sock and
# must fit the 108-byte sun_path of a unix socket address.
MAX_ROOT_PATH_LEN = 70


def check_root_path(root: Path) -> None:
    n = len(os.fsencode(str(root)))
    if n > MAX_ROOT_PATH_LEN:
        raise HostCheckError(
            f"root {str(root)!r} is {n} bytes long; at most {MAX_ROOT_PATH_LEN} are allowed because "
            f"daemon API sockets below it must fit a unix socket path (108 bytes). "
            f"Choose a shorter root (config key 'root' or --root)."
        )


_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61, "ppc64le": 202, "s390x": 220}
_DT_UNKNOWN = 0


def _d_types(directory: str) -> list[tuple[bytes, int]]:
    """(name, d_type) of the entries of ``directory``, straight from getdents64(2)."""
    nr = _SYS_GETDENTS64.get(os.uname().machine)
    if nr is None:
        return []  # unknown architecture: cannot probe, assume fine
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(32768)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    out: list[tuple[bytes, int]] = []
    try:
        while True:
            n = libc.syscall(nr, fd, buf, len(buf))
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), directory)
            if n == 0:
                return out
            raw = buf.raw[:n]
            pos = 0
            while pos < n:
                reclen, d_type = struct.unpack_from("<HB", raw, pos + 16)
                name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
                out.append((name, d_type))
                pos += reclen
    finally:
        os.close(fd)


def check_d_type(root: Path) -> None:
    """overlayfs needs d_type (e.g. xfs with ftype=1): readdir must report entry types."""
    with tempfile.TemporaryDirectory(prefix=".d_type-", dir=root) as probe:
        Path(probe, "f").touch()
        for name, d_type in _d_types(probe):
            if name == b"f" and d_type == _DT_UNKNOWN:
                raise HostCheckError(
                    f"the filesystem of {root} does not support d_type; overlayfs cannot "
                    f"work on it (for xfs, recreate it with -n ftype=1)"
                )


def check_overlayfs() -> None:
    try:
        text = Path("/proc/filesystems").read_text()
    except OSError as err:
        raise HostCheckError(f"cannot read /proc/filesystems: {err}") from err
    if not any(line.split()[-1:] == ["overlay"] for line in text.splitlines()):
        raise HostCheckError(
            "the kernel does not offer overlayfs (no 'overlay' in /proc/filesystems); "
            "load it with 'modprobe overlay'"
        )


def overlay_supports_index() -> bool:
    """containerd passes index=off when the kernel has the overlay 'index' parameter."""
    return Path("/sys/module/overlay/parameters/index").exists()
