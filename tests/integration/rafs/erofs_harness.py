"""Kernel-as-referee helpers for RAFS v6 builder tests.

* :func:`mounted` mounts a bootstrap with its blobs as EROFS extra devices through
  mount(2) directly (file-backed mode: util-linux mount would loop the primary and
  then reject regular-file ``device=`` options, spec §7.3) and always unmounts.
* :func:`fsck` runs ``fsck.erofs`` with one ``--device`` per blob.
* :func:`materialize` turns a (possibly compressed) Nydus blob into its
  uncompressed address space using only the blob's own TOC and chunk-info array,
  which is what a kernel device must contain. Given the bootstrap, the chunk-info
  array and header it decoded (with the code under test) must equal what upstream's
  ``nydus-image check`` decodes from the same blob (:func:`upstream_blob_meta`).
* :func:`make_rich_tree` creates a directory with every entry type and attribute
  the builder has to carry; :func:`snapshot` / :func:`assert_same_tree` compare two
  trees path by path (type, mode, ids, size, mtime, link, xattrs, rdev, bytes,
  hardlink identity).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pynydus.rafs.format import Compressor, blobmeta, decompress

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_MS_RDONLY = 1
_MNT_DETACH = 2


def mount_fs(source: bytes, target: bytes, fstype: bytes, flags: int, data: bytes) -> None:
    if _libc.mount(source, target, fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source!r} on {target!r} ({data!r}): {os.strerror(err)}")


def umount_fs(target: bytes) -> None:
    if _libc.umount2(target, 0) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return  # not mounted
        if _libc.umount2(target, _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount {target!r}: {os.strerror(err)}")


@contextmanager
def mounted(bootstrap: str | Path, blobs: Sequence[str | Path],
            options: Sequence[str] = ()) -> Iterator[Path]:
    """Mount ``bootstrap`` read-only with ``blobs`` as extra devices (and EROFS mount
    ``options``, e.g. ``noacl``); yield the mountpoint."""
    mnt = Path(tempfile.mkdtemp(prefix="pn-erofs-"))
    opts = ",".join([*(f"device={os.fspath(b)}" for b in blobs), *options])
    try:
        mount_fs(os.fsencode(bootstrap), os.fsencode(mnt), b"erofs", _MS_RDONLY, opts.encode())
        try:
            yield mnt
        finally:
            umount_fs(os.fsencode(mnt))
    finally:
        os.rmdir(mnt)


def fsck(bootstrap: str | Path, blobs: Sequence[str | Path], *extra: str) -> str:
    """Run fsck.erofs (erofs-utils 1.5); assert exit 0 and no error line; return stderr."""
    cmd = ["fsck.erofs", *[f"--device={os.fspath(b)}" for b in blobs], *extra, os.fspath(bootstrap)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, f"{cmd}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "<E>" not in p.stderr, p.stderr
    return p.stderr


def upstream_blob_meta(bootstrap: str | Path, blob: str | Path) -> bytes:
    """The chunk-info array and its header as upstream decodes them: ``nydus-image
    check -D`` over a copy of the blob writes ``<blob id>.blob.meta`` to its cache dir,
    the uncompressed array padded to 4 KiB and then the 4096-byte header. (nydus-image
    2.2 cannot check an image with POSIX ACLs, docs/compat.md: use a tree without.)"""
    from tests.harness.peers import peer_bin

    blob = Path(blob)
    with tempfile.TemporaryDirectory(prefix="pn-upmeta-") as d:
        shutil.copyfile(blob, Path(d) / blob.name)
        p = subprocess.run([str(peer_bin("nydus-rs", "nydus-image")), "check", "--log-level",
                            "warn", "-D", d, os.fspath(bootstrap)],
                           capture_output=True, text=True, timeout=300, check=False)
        assert p.returncode == 0, f"upstream check of {blob.name}: {p.stdout}{p.stderr}"
        return (Path(d) / f"{blob.name}.blob.meta").read_bytes()


def materialize(blob: str | Path, out: str | Path, bootstrap: str | Path | None = None) -> int:
    """Write the uncompressed address space of a Nydus blob; return its size.

    Uses the blob's TOC, compressed chunk-info array and header only (not the
    bootstrap), so this also checks that the blob is self-describing. With the
    ``bootstrap``, upstream referees that decoding (:func:`upstream_blob_meta`).
    """
    data = Path(blob).read_bytes()
    toc = {e.entry_name: e for e in blobmeta.unpack_toc(data[-min(4096, len(data)) :])}
    meta = toc["blob.meta"]
    flags = meta.flags & 0xF
    ci_comp = {1: Compressor.NONE, 2: Compressor.ZSTD, 4: Compressor.LZ4_BLOCK}[flags]
    raw = data[meta.compressed_offset : meta.compressed_offset + meta.compressed_size]
    ci_buf = decompress(raw, ci_comp, meta.uncompressed_size)
    hdr = blobmeta.BlobCompressionContextHeader.unpack(
        data, meta.compressed_offset + meta.compressed_size
    )
    assert hdr.magic == hdr.magic2 == blobmeta.BLOB_CCT_MAGIC
    if bootstrap is not None:
        theirs = upstream_blob_meta(bootstrap, blob)
        assert theirs[: len(ci_buf)] == ci_buf, "chunk-info array differs from upstream's decoding"
        assert theirs[-4096:] == hdr.pack(), "blob meta header differs from upstream's decoding"
    arr = blobmeta.ChunkInfoArray(ci_buf, hdr.ci_entries, v2=False)
    size = 0
    with open(out, "wb") as f:
        for i in range(len(arr)):
            ci = arr[i]
            payload = data[ci.compressed_offset : ci.compressed_end]
            if ci.is_compressed:
                chunk = _decompress_any(payload, ci.uncompressed_size)
            else:
                chunk = payload
            f.seek(ci.uncompressed_offset)
            f.write(chunk)
            size = max(size, ci.uncompressed_offset + ci.uncompressed_size)
        size = (size + 4095) // 4096 * 4096
        f.truncate(size)
    return size


def _decompress_any(payload: bytes, n: int) -> bytes:
    if payload[:4] == b"\x28\xb5\x2f\xfd":
        return decompress(payload, Compressor.ZSTD, n)
    return decompress(payload, Compressor.LZ4_BLOCK, n)


# --------------------------------------------------------------------------- trees

CAP_NET_BIND = bytes.fromhex("0100000200040000000000000000000000000000")  # vfs_cap_data v2
# posix_acl_xattr v2: user::rw- user:1000:r-- group::r-- mask::r-- other::---
_ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in (
        (0x01, 6, 0xFFFFFFFF),
        (0x02, 4, 1000),
        (0x04, 4, 0xFFFFFFFF),
        (0x10, 4, 0xFFFFFFFF),
        (0x20, 0, 0xFFFFFFFF),
    )
)


def _set_times(p: Path | bytes, sec: int, nsec: int) -> None:
    ns = sec * 1_000_000_000 + nsec
    os.utime(p, ns=(ns, ns), follow_symlinks=False)


def _w(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def make_rich_tree(root: Path, *, big: bool = True, acls: bool = True,
                   binary_xattr: bytes = bytes(range(256))) -> None:
    """Populate ``root`` with every entry type and attribute a layer can carry.

    Regular (empty, small, multi-chunk, sparse, duplicate), hardlinks across
    directories, symlinks (short, inline-limit, 4095-byte), char/block devices
    (incl. 0/0 whiteout form and large numbers), fifo, socket, xattrs (user.*,
    trusted.*, security.capability, binary values), long and non-UTF-8 names, a
    directory with several dirent blocks, a 40-level deep path, odd modes and ids,
    nanosecond mtimes. Directory mtimes are set last, bottom-up.

    ``acls=False`` leaves out the POSIX ACLs and ``binary_xattr`` replaces the value of
    ``user.bin``: nydus-image 2.2 cannot build either (see docs/compat.md).
    """
    r = os.fsencode(root)
    j = os.path.join
    os.makedirs(j(r, b"dir/sub"), exist_ok=True)
    _w(j(r, b"empty"), b"")
    _w(j(r, b"small.txt"), b"hello nydus\n")
    rnd = hashlib.sha256(b"seed").digest() * (3 * 2**20 // 32 + 77)  # ~3 MiB, not chunk aligned
    _w(j(r, b"dir/multi.bin"), rnd)
    _w(j(r, b"dir/dup.bin"), rnd)  # dedups fully against multi.bin
    _w(j(r, b"exact-4k"), b"x" * 4096)
    if big:
        with open(j(r, b"sparse.img"), "wb") as f:
            f.truncate(9 * 2**20)
            f.seek(5 * 2**20 + 123)
            f.write(b"data in the middle of a hole")
    # hardlinks
    _w(j(r, b"dir/hl-a"), b"linked content\n")
    os.link(j(r, b"dir/hl-a"), j(r, b"dir/sub/hl-b"))
    os.link(j(r, b"dir/hl-a"), j(r, b"hl-c"))
    # symlinks
    os.symlink(b"small.txt", j(r, b"link-short"))
    os.symlink(b"/" + b"t" * 3000, j(r, b"link-3000"))
    os.symlink(b"z" * 4095, j(r, b"link-4095"))
    os.symlink(b"dangling/target", j(r, b"dir/link-dangling"))
    # special files
    os.mknod(j(r, b"dev-null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(j(r, b"dev-blk"), stat.S_IFBLK | 0o660, os.makedev(7, 200))
    os.mknod(j(r, b"dev-big"), stat.S_IFCHR | 0o600, os.makedev(300, 70000))
    os.mknod(j(r, b"whiteout"), stat.S_IFCHR | 0o000, os.makedev(0, 0))
    os.mkfifo(j(r, b"fifo"), 0o640)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(j(r, b"sock"))
    finally:
        s.close()
    # names
    _w(j(r, b"L" * 255), b"long name\n")
    _w(j(r, b"bin-\xff\xfe\x80"), b"non-utf8 name\n")
    _w(j(r, b"!first"), b"sorts before dot\n")
    _w(j(r, b"sp ace"), b"")
    os.makedirs(j(r, b"many"), exist_ok=True)
    for i in range(400):
        _w(j(r, b"many", b"entry-%04d-%s" % (i, b"n" * (i % 50))), b"%d" % i)
    deep = j(r, b"deep")
    for i in range(40):
        deep = j(deep, b"d%02d" % i)
    os.makedirs(deep)
    _w(j(deep, b"bottom"), b"bottom of the tree\n")
    # xattrs
    os.setxattr(j(r, b"small.txt"), "user.comment", b"a comment")
    os.setxattr(j(r, b"small.txt"), "user.bin", binary_xattr)
    os.setxattr(j(r, b"small.txt"), "trusted.something", b"t")
    os.setxattr(j(r, b"dir/multi.bin"), "security.capability", CAP_NET_BIND)
    os.setxattr(j(r, b"dir"), "trusted.overlay.opaque", b"y")
    os.setxattr(j(r, b"dir/hl-a"), "user.shared", b"on all links")
    for i in range(20):
        os.setxattr(j(r, b"many"), f"user.k{i:02d}", b"v" * i)
    if acls:  # POSIX ACLs (stored under the two system.posix_acl_* name indexes)
        _w(j(r, b"acl-file"), b"acl\n")
        os.setxattr(j(r, b"acl-file"), "system.posix_acl_access", _ACL)
        os.makedirs(j(r, b"acl-dir"))
        os.setxattr(j(r, b"acl-dir"), "system.posix_acl_default", _ACL)
    # ownership, modes
    os.chown(j(r, b"small.txt"), 1000, 1000)
    os.chown(j(r, b"exact-4k"), 70000, 80000)
    os.lchown(j(r, b"link-short"), 1234, 5678)
    os.chmod(j(r, b"small.txt"), 0o4755)
    os.chmod(j(r, b"exact-4k"), 0o2750)
    os.chmod(j(r, b"empty"), 0o000)
    os.chmod(j(r, b"dir/sub"), 0o1777)
    # times: files first, then directories bottom-up
    for dirpath, dirnames, filenames in os.walk(r, topdown=False):
        for n in filenames + [d for d in dirnames if os.path.islink(j(dirpath, d))]:
            _set_times(j(dirpath, n), 1_600_000_000 + len(n), 123_456_789)
        _set_times(dirpath, 1_500_000_000 + len(dirpath) % 1000, 987_654_321)


@dataclass(frozen=True)
class Rec:
    """What we compare for one path."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    mtime_ns: int
    nlink: int
    link: bytes | None
    rdev: int | None
    xattrs: tuple[tuple[str, bytes], ...]
    sha256: str | None
    ino: int


def _kind(m: int) -> str:
    for test, name in (
        (stat.S_ISREG, "reg"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(m):
            return name
    return "?"


def _xattrs(p: bytes) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False)) for n in names))


def snapshot(root: str | Path, *, skip_kinds: Sequence[str] = ()) -> dict[bytes, Rec]:
    """Record every path below ``root`` (relative bytes paths; root is b"")."""
    out: dict[bytes, Rec] = {}
    r = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(r):
        for n in [b"", *dirnames, *filenames] if dirpath == r else [*dirnames, *filenames]:
            p = os.path.join(dirpath, n) if n else dirpath
            st = os.lstat(p)
            kind = _kind(st.st_mode)
            if kind in skip_kinds:
                continue
            digest = None
            if kind == "reg":
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                digest = h.hexdigest()
            rel = os.path.relpath(p, r) if p != r else b""
            out[b"" if rel == b"." else rel] = Rec(
                kind=kind,
                mode=st.st_mode,
                uid=st.st_uid,
                gid=st.st_gid,
                size=None if kind == "dir" else st.st_size,
                mtime_ns=st.st_mtime_ns,
                nlink=st.st_nlink,
                link=os.readlink(p) if kind == "symlink" else None,
                rdev=st.st_rdev if kind in ("char", "block") else None,
                xattrs=_xattrs(p),
                sha256=digest,
                ino=st.st_ino,
            )
    return out


def assert_same_tree(
    src: dict[bytes, Rec],
    got: dict[bytes, Rec],
    *,
    check_root_meta: bool = True,
    symlink_perms: bool = True,
) -> int:
    """Assert equal trees (all fields but ``ino``), and equal hardlink grouping. Return count.

    ``symlink_perms=False`` ignores symlink permission bits: a tar records them, but
    Linux extracts every symlink as 0777, so an extracted reference cannot show them.
    """
    assert sorted(src) == sorted(got), (
        f"only in source: {sorted(set(src) - set(got))[:10]}, "
        f"only in image: {sorted(set(got) - set(src))[:10]}"
    )
    for path, a in src.items():
        b = got[path]
        if path == b"" and not check_root_meta:
            continue
        if a.kind == "symlink" and not symlink_perms:
            assert stat.S_IFMT(a.mode) == stat.S_IFMT(b.mode), path
            a = dataclasses.replace(a, mode=b.mode)
        for name in ("kind", "mode", "uid", "gid", "size", "mtime_ns", "nlink", "link", "rdev",
                     "xattrs", "sha256"):
            assert getattr(a, name) == getattr(b, name), (
                f"{path!r}: {name} differs: source {getattr(a, name)!r} image {getattr(b, name)!r}"
            )
    # Hardlink identity: same source inode <=> same image inode, for non-directories.
    fwd: dict[int, int] = {}
    back: dict[int, int] = {}
    for path, a in src.items():
        if a.kind == "dir":
            continue
        b = got[path]
        assert fwd.setdefault(a.ino, b.ino) == b.ino, f"{path!r}: hardlink split in image"
        assert back.setdefault(b.ino, a.ino) == a.ino, f"{path!r}: distinct files share an inode"
    return len(src)
