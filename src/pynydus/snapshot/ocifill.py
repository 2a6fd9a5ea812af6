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
import tarfile
from collections.abc import Mapping
from typing import IO, Any

import zstandard

from pynydus import labels as L
from pynydus.errors import FormatError, InvalidArgument, q
from pynydus.rafs.decoder import compression_of
from pynydus.rafs.format import OCI_WHITEOUT_OPAQUE, OCI_WHITEOUT_PREFIX, OVERLAY_OPAQUE_XATTR
from pynydus.registry import Credentials, RegistryClient, parse_reference

__all__ = ["apply_layer", "fetch_layer", "oci_layer_digest"]

_WH = OCI_WHITEOUT_PREFIX.decode()
_WH_OPQ = OCI_WHITEOUT_OPAQUE.decode()
_XATTR_PAX = "SCHILY.xattr."


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


def apply_layer(blob_path: str, dest: str) -> int:
    """Unpack the layer blob at ``blob_path`` (tar: plain, gzip or zstd) into the empty
    directory ``dest`` as an overlayfs upper layer; returns the number of entries."""
    with open(blob_path, "rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        if compression_of(head) == "zstd":
            with zstandard.ZstdDecompressor().stream_reader(raw) as zr:
                return _apply(tarfile.open(fileobj=zr, mode="r|"), dest)
        return _apply(tarfile.open(fileobj=raw, mode="r|*"), dest)


def _apply(tf: tarfile.TarFile, dest: str) -> int:
    root = os.path.realpath(dest)
    dirs: list[tuple[str, tarfile.TarInfo]] = []
    n = 0
    try:
        for m in tf:
            n += 1
            name = os.path.normpath(m.name.lstrip("/"))
            if name in (".", "") :
                dirs.append((root, m))
                continue
            if name.startswith("..") or os.path.isabs(name):
                raise FormatError(f"layer entry {q(m.name)} leaves the layer")
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
            if m.isdir():
                if not os.path.isdir(target) or os.path.islink(target):
                    _remove(target)
                    os.mkdir(target, 0o700)
                dirs.append((target, m))
                continue
            _remove(target)
            if m.islnk():
                src = _inside(root, os.path.normpath(m.linkname.lstrip("/")))
                os.link(src, target, follow_symlinks=False)
                continue
            if m.issym():
                os.symlink(m.linkname, target)
            elif m.isreg():
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    src_f = tf.extractfile(m)
                    assert src_f is not None
                    _copy(src_f, out)
            elif m.ischr() or m.isblk():
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(target, kind | 0o600, os.makedev(m.devmajor, m.devminor))
            elif m.isfifo():
                os.mkfifo(target, 0o600)
            else:
                raise InvalidArgument(f"layer entry {q(m.name)}: type {m.type!r} not supported")
            _attrs(target, m)
        for path, m in reversed(dirs):  # after their content: times and modes stick
            _attrs(path, m)
    except (tarfile.TarError, EOFError, zstandard.ZstdError) as err:
        raise FormatError(f"layer tar: {err}") from err
    finally:
        tf.close()
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


def _copy(src: IO[bytes], out: Any) -> None:
    while True:
        block = src.read(1 << 20)
        if not block:
            return
        out.write(block)


def _attrs(path: str, m: tarfile.TarInfo) -> None:
    os.chown(path, m.uid, m.gid, follow_symlinks=False)
    for key, value in (m.pax_headers or {}).items():
        if key.startswith(_XATTR_PAX):
            raw = value.encode("utf-8", "surrogateescape")
            os.setxattr(path, key[len(_XATTR_PAX):], raw, follow_symlinks=False)
    if not m.issym():
        os.chmod(path, m.mode & 0o7777)
    os.utime(path, ns=(int(m.mtime * 1e9), int(m.mtime * 1e9)), follow_symlinks=False)
