"""``image check`` and ``image unpack``: validate an image, or turn it back into a tar.

check: decode every inode, directory, symlink, xattr and chunk record (the reader
validates each as it goes); with blobs, read, decompress and digest-check every
chunk once. unpack: write every entry to a tar, hardlinks as links to their first
path, and the overlayfs whiteouts the builder made (char 0/0 devices,
``trusted.overlay.opaque``) back as OCI whiteouts, so building from an OCI layer
and unpacking gives that layer's entries again.
"""

from __future__ import annotations

import io
import stat as st_mod
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pynydus.rafs.format import (
    OCI_WHITEOUT_OPAQUE,
    OCI_WHITEOUT_PREFIX,
    OVERLAY_OPAQUE_XATTR,
    decode_rdev,
    is_overlay_whiteout,
)
from pynydus.rafs.read.blobfiles import BlobFiles
from pynydus.rafs.read.open import open_bootstrap

# overlayfs' opaque mark, and its form for unprivileged mounts (userxattr)
_OPAQUE = (OVERLAY_OPAQUE_XATTR, b"user.overlay.opaque")
_WH = OCI_WHITEOUT_PREFIX.decode()
_WH_OPAQUE = OCI_WHITEOUT_OPAQUE.decode()


@dataclass
class CheckReport:
    inodes: int = 0
    files: int = 0
    chunks: int = 0
    chunks_verified: int = 0
    bytes_verified: int = 0
    seconds: float = 0.0
    blobs: list[str] = field(default_factory=list)


def check_image(bootstrap: str, blob_dir: str | None = None,
                progress: Callable[[int], None] | None = None) -> CheckReport:
    """Validate ``bootstrap`` (and every chunk in ``blob_dir``); raises on the first error."""
    t0 = time.monotonic()
    rep = CheckReport()
    with open_bootstrap(bootstrap) as bs:
        rep.blobs = [b.blob_id for b in bs.blobs]
        seen: set[tuple[int, int]] = set()
        blobs = BlobFiles(bs, blob_dir) if blob_dir else None
        try:
            for _path, ino in bs.walk():
                rep.inodes += 1
                s = bs.stat(ino)
                bs.xattrs(ino)
                if s.is_symlink:
                    bs.readlink(ino)
                if not s.is_reg:
                    continue
                rep.files += 1
                for c in bs.chunks(ino):
                    rep.chunks += 1
                    key = (c.blob_index, c.index)
                    if blobs is None or key in seen:
                        continue
                    seen.add(key)
                    rep.bytes_verified += len(blobs.chunk_data(c, verify=True))
                    rep.chunks_verified += 1
                    if progress is not None:
                        progress(rep.chunks_verified)
        finally:
            if blobs is not None:
                blobs.close()
    rep.seconds = time.monotonic() - t0
    return rep


class _ChunkStream(io.RawIOBase):
    """A file object over an iterator of byte strings (tarfile reads from it)."""

    def __init__(self, parts: Iterator[bytes]) -> None:
        self.parts = parts
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:  # any writable buffer, as RawIOBase's
        while not self.buf:
            nxt = next(self.parts, None)
            if nxt is None:
                return 0
            self.buf = nxt
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def unpack_image(bootstrap: str, blob_dir: str, output: str) -> int:
    """Write the image as a tar to ``output``; returns the number of entries."""
    count = 0
    with open_bootstrap(bootstrap) as bs, BlobFiles(bs, blob_dir) as blobs, \
            tarfile.open(output, "w", format=tarfile.PAX_FORMAT) as tar:
        first_path: dict[int, str] = {}
        for raw_path, ino in bs.walk():
            if raw_path == b"/":
                continue
            s = bs.stat(ino)
            name = raw_path.decode("utf-8", "surrogateescape").lstrip("/")
            ti = tarfile.TarInfo(name)
            ti.mode = st_mod.S_IMODE(s.mode)
            ti.uid, ti.gid = s.uid, s.gid
            ti.mtime = s.mtime + s.mtime_nsec / 1e9 if s.mtime_nsec else s.mtime
            xattrs = dict(bs.xattrs(ino))
            opaque = any(xattrs.get(k) == b"y" for k in _OPAQUE)
            pax = {
                "SCHILY.xattr." + k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
                for k, v in xattrs.items() if k not in _OPAQUE
            }
            if pax:
                ti.pax_headers = pax
            fileobj = None
            if is_overlay_whiteout(s.mode, s.rdev):  # overlayfs whiteout → OCI whiteout
                parent, _, base = name.rpartition("/")
                ti.name = (parent + "/" if parent else "") + _WH + base
                ti.type = tarfile.REGTYPE
                ti.size = 0
            elif s.is_dir:
                ti.type = tarfile.DIRTYPE
            elif s.is_symlink:
                ti.type = tarfile.SYMTYPE
                ti.linkname = bs.readlink(ino).decode("utf-8", "surrogateescape")
            elif s.is_reg and s.nlink > 1 and ino in first_path:
                ti.type = tarfile.LNKTYPE
                ti.linkname = first_path[ino]
            elif s.is_reg:
                first_path.setdefault(ino, name)
                ti.type = tarfile.REGTYPE
                ti.size = s.size
                fileobj = io.BufferedReader(_ChunkStream(blobs.file_data(ino)), 1 << 20)
            else:
                ti.type = {st_mod.S_IFCHR: tarfile.CHRTYPE, st_mod.S_IFBLK: tarfile.BLKTYPE,
                           st_mod.S_IFIFO: tarfile.FIFOTYPE}.get(st_mod.S_IFMT(s.mode), tarfile.REGTYPE)
                if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                    ti.devmajor, ti.devminor = decode_rdev(s.rdev)
                if st_mod.S_ISSOCK(s.mode):
                    continue  # tar cannot carry sockets (they are not data)
            tar.addfile(ti, fileobj)
            count += 1
            if opaque:
                wh = tarfile.TarInfo(name + "/" + _WH_OPAQUE)
                wh.mtime = ti.mtime
                tar.addfile(wh)
                count += 1
    return count
