"""Unpacking OCI layers into snapshots the snapshotter did not let containerd fill.

An image with OCI layers (found through referrer or index detection, or a ZRAN image whose
data layers name their gzip layers by ``nydus-ref``) has its layers *skipped* at pull:
committed empty, never downloaded. When it cannot be served lazily after all (the daemon
will not start, the bootstrap is corrupt, the registry refuses ranged reads, ...), or when
another image without a Nydus form shares those skipped layers, the snapshotter fills
them itself: it downloads each layer blob from the image's repository and unpacks it into
the snapshot's directory as containerd's overlayfs unpacker would (OCI whiteouts become
overlayfs whiteouts: ``.wh.NAME`` a char device 0/0, ``.wh..wh..opq`` the
``trusted.overlay.opaque`` xattr on its directory; owners, modes, times, xattrs kept).

:func:`apply_layer` is the unpacking (no I/O beyond the destination directory);
:func:`fetch_layer` downloads one blob to a file (digest-checked by the registry client).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import BinaryIO

from pynydus import labels as L
from pynydus.errors import FormatError, InvalidArgument, q
from pynydus.rafs.format import (
    OCI_WHITEOUT_OPAQUE,
    OCI_WHITEOUT_PREFIX,
    OVERLAY_OPAQUE_XATTR,
    tarsparse,
)
from pynydus.rafs.source import DataReader, Entry, EntryType, TarSource
from pynydus.registry import Credentials, RegistryClient, parse_reference

__all__ = ["apply_layer", "fetch_layer", "oci_layer_digest"]

_WH = OCI_WHITEOUT_PREFIX.decode()
_WH_OPQ = OCI_WHITEOUT_OPAQUE.decode()
_BLOCK = 1 << 20
_ZEROS = bytes(_BLOCK)


def oci_layer_digest(labels: Mapping[str, str]) -> str | None:
    """The OCI layer blob a skipped snapshot stands for: a ZRAN data layer's ``nydus-ref``,
    else, for a layer skipped by detection, its own ``cri.layer-digest``; None for a
    layer that has no OCI form (a converted Nydus image's blob or bootstrap)."""
    if L.NYDUS_REF in labels:
        return labels[L.NYDUS_REF]
    if L.NYDUS_DETECTED in labels:
        return labels.get(L.CRI_LAYER_DIGEST) or None
    return None


def fetch_layer(image_ref: str, labels: Mapping[str, str], digest: str, path: str,
                credentials: Credentials | None, timeout: float = 30.0) -> None:
    """Download blob ``digest`` of ``image_ref``'s repository to ``path``."""
    ref = parse_reference(image_ref)
    with RegistryClient.for_reference(
            ref, auth=credentials, timeout=timeout, connect_timeout=timeout,
            token_renewal=False) as client, open(path, "wb") as f:
        f.writelines(client.get_blob(ref.repository, digest))


def apply_layer(blob_path: str, dest: str, *,
                max_sparse_size: int = tarsparse.DEFAULT_MAX_SPARSE_SIZE) -> int:
    """Unpack the layer blob at ``blob_path`` (tar: plain, gzip or zstd) into the empty
    directory ``dest`` as an overlayfs upper layer; returns the number of entries.

    The tar is read by pynydus's own reader (what ``image build`` reads layers with): a
    malformed member is a FormatError naming its offset, sparse maps are checked and the
    holes of the layer's sparse members bounded by ``max_sparse_size`` together; holes
    are written as holes. (Python's tarfile wrote a 10 KB layer's claimed 2^50 bytes of
    holes as zeros until the disk was full.)"""
    root = os.path.realpath(dest)
    dirs: list[tuple[str, Entry]] = []
    n = 0
    for entry, reader in TarSource(blob_path, max_sparse_size=max_sparse_size):
        n += 1
        name = os.fsdecode(entry.path)
        if not name:
            dirs.append((root, entry))
            continue
        parent, base = os.path.split(name)
        pdir = _inside(root, parent)
        target = os.path.join(pdir, base)
        if base == _WH_OPQ:
            os.setxattr(pdir, OVERLAY_OPAQUE_XATTR, b"y")
            continue
        if base.startswith(_WH):
            _remove(os.path.join(pdir, base[len(_WH):]))
            os.mknod(os.path.join(pdir, base[len(_WH):]), stat.S_IFCHR | 0o600, 0)
            continue
        kind = entry.type
        if kind is EntryType.DIR:
            if not os.path.isdir(target) or os.path.islink(target):
                _remove(target)
                os.mkdir(target, 0o700)
            dirs.append((target, entry))
            continue
        _remove(target)
        if kind is EntryType.HARDLINK:
            os.link(_inside(root, os.fsdecode(entry.link)), target, follow_symlinks=False)
            continue
        if kind is EntryType.SYMLINK:
            os.symlink(os.fsdecode(entry.link), target)
        elif kind is EntryType.REG:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                if reader is not None:
                    _copy(reader, out)
        elif kind in (EntryType.CHAR, EntryType.BLOCK):
            mode = stat.S_IFCHR if kind is EntryType.CHAR else stat.S_IFBLK
            os.mknod(target, mode | 0o600, os.makedev(entry.rdev_major, entry.rdev_minor))
        elif kind is EntryType.FIFO:
            os.mkfifo(target, 0o600)
        else:
            raise InvalidArgument(f"layer entry {q(name)}: type {kind.value} not supported")
        _attrs(target, entry)
    for path, entry in reversed(dirs):  # after their content: times and modes stick
        _attrs(path, entry)
    return n


def _inside(root: str, rel: str) -> str:
    """``root/rel`` with symlinks resolved, refused when it leaves ``root``."""
    path = os.path.realpath(os.path.join(root, rel))
    if path != root and not path.startswith(root + os.sep):
        raise FormatError(f"layer path {q(rel)} leaves the layer through a symlink")
    return path


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil

        shutil.rmtree(path)
    else:
        os.unlink(path)


def _copy(src: DataReader, out: BinaryIO) -> None:
    """Copy a file's data; blocks of zeros (a sparse member's holes) become holes."""
    while True:
        block = src.read(_BLOCK)
        if not block:
            break
        if memoryview(_ZEROS)[:len(block)] == block:
            out.seek(len(block), os.SEEK_CUR)
        else:
            out.write(block)
    out.truncate()  # a file ending in a hole gets its length


def _attrs(path: str, entry: Entry) -> None:
    os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
    for key, value in entry.xattrs.items():
        os.setxattr(path, os.fsdecode(key), value, follow_symlinks=False)
    if entry.type is not EntryType.SYMLINK:
        os.chmod(path, entry.mode & 0o7777)
    ns = entry.mtime * 1_000_000_000 + entry.mtime_nsec
    os.utime(path, ns=(ns, ns), follow_symlinks=False)
