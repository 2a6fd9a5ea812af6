"""Which way this kernel lets EROFS read its files (``host.erofs.Backing``), found once at
start-up by mounting a tiny image: file-backed mounts (Linux 6.12+) or loop devices.

Used by tarfs (either backing works) and by ``fs_driver = "blobfile"`` (file-backed
only: its devices are files on a FUSE mount, which loop devices would read through a
second page cache).
"""

from __future__ import annotations

import logging
import os
import tempfile

from pynydus.errors import HostCheckError
from pynydus.host.erofs import BACKING_ENV, Backing, mount_erofs, umount_erofs

__all__ = ["probe_backing"]

log = logging.getLogger(__name__)


def probe_backing(work_dir: str, what: str = "tarfs") -> Backing:
    """``file`` if this kernel mounts EROFS from a regular file, else ``loop`` (then
    HostCheckError if there is no loop control either). ``PYNYDUS_TARFS_BACKING`` wins.
    ``what`` names the feature in the errors."""
    forced = os.environ.get(BACKING_ENV, "")
    if forced:
        if forced not in ("file", "loop"):
            raise HostCheckError(f"{BACKING_ENV}={forced!r}: expected file or loop")
        return "file" if forced == "file" else "loop"
    if not _erofs_registered():
        raise HostCheckError(f"{what} needs the kernel's EROFS (CONFIG_EROFS_FS): "
                             f"modprobe erofs, or do without {what}")
    from pynydus.rafs.builder import build

    with tempfile.TemporaryDirectory(prefix="erofs-probe-", dir=work_dir) as d:
        src = os.path.join(d, "src")
        mnt = os.path.join(d, "mnt")
        os.mkdir(src)
        os.mkdir(mnt)
        boot = os.path.join(d, "probe.boot")
        build(src, boot, os.path.join(d, "blobs"))
        try:
            mount_erofs(boot, [], mnt, "file")
        except OSError as err:
            log.info("EROFS file-backed mounts unavailable (%s): using loop devices", err)
            if not os.path.exists("/dev/loop-control"):
                raise HostCheckError(f"{what} needs EROFS file-backed mounts (Linux 6.12+) or "
                                     "loop devices (/dev/loop-control)") from err
            return "loop"
        umount_erofs(mnt)
    return "file"


def _erofs_registered() -> bool:
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return any(line.split()[-1] == "erofs" for line in f if line.strip())
    except OSError:
        return True  # let the mount say
