"""Generated source trees for daemon tests, and a strict comparison of a mount with its source.

``make_full_tree(root)`` writes every entry type RAFS carries: regular files (empty,
tiny, one chunk exactly, several chunks, sparse with a hole spanning whole chunks,
duplicated content), directories (deep, wide enough for several dirent blocks),
symlinks (relative, absolute, dangling, long target), hardlinks (in one directory and
across directories), char and block devices, fifos, unix sockets, xattrs in every
namespace RAFS v6 keeps (user, trusted, security incl. ``security.capability``), long
(255 byte) and non-UTF-8 names, odd permission bits (setuid, sticky) and owners.

``compare_trees(src, mnt)`` walks both with ``lstat`` and returns a list of differences
(empty = identical): type, permission bits, size, nlink, uid/gid, mtime (ns), rdev,
symlink target, xattr names and values, file bytes (sha256) and hardlink grouping (two
paths share an inode on the mount exactly when they do in the source); nlink of
directories too.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import struct
from pathlib import Path

MiB = 1 << 20
CHUNK = MiB  # the builder's default chunk size

# VFS_CAP_REVISION_2, effective, CAP_NET_RAW permitted: what ``setcap cap_net_raw+ep`` writes
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def _data(seed: int, n: int) -> bytes:
    """Deterministic, partly compressible bytes (so lz4 both compresses and stores raw)."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        if rnd.random() < 0.5:
            out += rnd.randbytes(min(4096, n - len(out)))
        else:
            out += bytes([rnd.randrange(256)]) * min(4096, n - len(out))
    return bytes(out[:n])


def _set_times(path: bytes | str | Path, sec: int, nsec: int) -> None:
    ns = sec * 1_000_000_000 + nsec
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def make_full_tree(root: Path) -> dict[str, int]:
    """Write the all-entry-types tree at ``root`` (must not exist). Returns counts by kind."""
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)  # nydusd reports the image root as 0755 whatever the source says
    r = os.fsencode(root)
    counts: dict[str, int] = {}

    def count(kind: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1

    def write(rel: str | bytes, data: bytes, mode: int = 0o644) -> bytes:
        p = os.path.join(r, os.fsencode(rel))
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        count("reg")
        return p

    def mkdir(rel: str | bytes, mode: int = 0o755) -> bytes:
        p = os.path.join(r, os.fsencode(rel))
        os.mkdir(p)
        os.chmod(p, mode)
        count("dir")
        return p

    # regular files
    mkdir("files")
    write("files/empty", b"")
    write("files/tiny", b"hello, nydus\n")
    write("files/odd-size", _data(1, 12345))
    write("files/one-chunk", _data(2, CHUNK))
    write("files/multi-chunk", _data(3, 3 * CHUNK + 4097), 0o600)
    write("files/dup-a", _data(4, 2 * CHUNK))
    write("files/dup-b", _data(4, 2 * CHUNK))  # same chunks: deduplicated in the blob
    write("files/zeros", bytes(CHUNK + 100))
    sparse = os.path.join(r, b"files/sparse")
    with open(sparse, "wb") as f:  # hole, data, hole, data at the end
        f.seek(3 * CHUNK + 123)
        f.write(_data(5, 5000))
        f.seek(6 * CHUNK)
        f.write(b"tail")
    count("reg")
    write("files/setuid", b"#!/bin/sh\n", 0o4755)
    write("files/ro", b"read only\n", 0o444)
    os.chown(write("files/owned", b"owner 1234:5678\n"), 1234, 5678)

    # xattrs (user, trusted, security; capability on an executable)
    mkdir("xattr")
    p = write("xattr/capable", b"\x7fELF pretend\n", 0o755)
    os.setxattr(p, "security.capability", CAPABILITY)
    p = write("xattr/many", b"x")
    os.setxattr(p, "user.empty", b"")
    os.setxattr(p, "user.text", b"value")
    os.setxattr(p, "user.binary", bytes(range(256)))
    os.setxattr(p, "trusted.overlay.opaque", b"y")
    os.setxattr(p, "security.selinux", b"system_u:object_r:bin_t:s0\0")
    d = mkdir("xattr/dir")
    os.setxattr(d, "user.on-dir", b"dir value")
    os.setxattr(d, "trusted.overlay.opaque", b"y")

    # symlinks
    mkdir("links")
    for name, target in ((b"rel", b"../files/tiny"), (b"abs", b"/etc/hostname"),
                         (b"dangling", b"does/not/exist"), (b"dir", b"../files"),
                         (b"long", b"t" * 1000)):
        os.symlink(target, os.path.join(r, b"links", name))
        count("symlink")

    # hardlinks: in one directory and across directories
    mkdir("hard")
    h = write("hard/orig", _data(6, 70000))
    os.link(h, os.path.join(r, b"hard/second"))
    os.link(h, os.path.join(r, b"links/third"))
    count("hardlink")
    count("hardlink")
    p = write("hard/with-xattr", b"xattr and nlink")
    os.setxattr(p, "user.shared", b"both names")
    os.link(p, os.path.join(r, b"hard/with-xattr-2"))
    count("hardlink")

    # special files
    mkdir("dev")
    os.mknod(os.path.join(r, b"dev/null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(os.path.join(r, b"dev/sda"), 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    os.mknod(os.path.join(r, b"dev/big"), 0o600 | stat.S_IFCHR, os.makedev(4095, 1048575))
    counts["chr"] = 2
    counts["blk"] = 1
    os.mkfifo(os.path.join(r, b"dev/fifo"), 0o640)
    count("fifo")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(os.path.join(r, b"dev/sock"))
    finally:
        s.close()
    count("socket")

    # names
    mkdir("names")
    write(b"names/" + b"L" * 255, b"longest name")
    write(b"names/\xff\xfe-not-utf8-\x80", b"latin-1 bytes in the name")
    write("names/üñïçødé ☃", b"utf-8")
    write("names/with space and\ttab", b"whitespace")
    write("names/.hidden", b"dot")
    os.symlink(b"\xff\xfe-not-utf8-\x80", os.path.join(r, b"names/link-to-bytes"))
    count("symlink")

    # a wide directory (several dirent blocks) and a deep one
    wide = mkdir("wide")
    for i in range(600):
        with open(os.path.join(wide, f"entry-{i:04d}-{'x' * (i % 40)}".encode()), "wb") as f:
            f.write(str(i).encode())
        count("reg")
    deep = r
    for i in range(40):
        deep = os.path.join(deep, f"d{i:02d}".encode())
        os.mkdir(deep)
        count("dir")
    with open(os.path.join(deep, b"bottom"), "wb") as f:
        f.write(b"deep file")
    count("reg")
    mkdir("sticky", 0o1777)
    mkdir("empty-dir", 0o700)

    # fixed, distinct times with nanoseconds on everything (directories last)
    all_paths: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(r):
        for n in filenames + dirnames:
            all_paths.append(os.path.join(dirpath, n))
    for i, p in enumerate(sorted(all_paths, key=lambda x: -x.count(b"/"))):
        _set_times(p, 1_600_000_000 + i * 7, (i * 1_234_567) % 1_000_000_000)
    return counts


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


def walk(root: Path) -> list[bytes]:
    """Relative paths (bytes) of everything below ``root``, ``b""`` for the root."""
    r = os.fsencode(root)
    out = [b""]
    for dirpath, dirnames, filenames in os.walk(r):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), r))
    return sorted(out)


def compare_trees(src: Path, mnt: Path, *, check_data: bool = True,
                  check_xattrs: bool = True) -> list[str]:
    """Differences between ``src`` and the mount ``mnt`` (empty list = identical)."""
    diffs: list[str] = []
    s_paths, m_paths = walk(src), walk(mnt)
    if s_paths != m_paths:
        missing = sorted(set(s_paths) - set(m_paths))[:10]
        extra = sorted(set(m_paths) - set(s_paths))[:10]
        diffs.append(f"path sets differ: missing {missing} extra {extra}")
    s_root, m_root = os.fsencode(src), os.fsencode(mnt)
    ino_map: dict[int, int] = {}
    for rel in sorted(set(s_paths) & set(m_paths)):
        sp = os.path.join(s_root, rel) if rel else s_root
        mp = os.path.join(m_root, rel) if rel else m_root
        a, b = os.lstat(sp), os.lstat(mp)
        name = rel.decode(errors="backslashreplace") or "/"

        def diff(what: str, x: object, y: object, name: str = name) -> None:
            diffs.append(f"{name}: {what}: source {x!r} mount {y!r}")

        if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
            diff("type", oct(a.st_mode), oct(b.st_mode))
            continue
        if stat.S_IMODE(a.st_mode) != stat.S_IMODE(b.st_mode):
            diff("mode", oct(a.st_mode), oct(b.st_mode))
        if (a.st_uid, a.st_gid) != (b.st_uid, b.st_gid):
            diff("owner", (a.st_uid, a.st_gid), (b.st_uid, b.st_gid))
        if a.st_mtime_ns != b.st_mtime_ns:
            diff("mtime_ns", a.st_mtime_ns, b.st_mtime_ns)
        if a.st_nlink != b.st_nlink:  # directories: 2 + subdirectories, as on disk
            diff("nlink", a.st_nlink, b.st_nlink)
        if (stat.S_ISREG(a.st_mode) or stat.S_ISLNK(a.st_mode)) and a.st_size != b.st_size:
            diff("size", a.st_size, b.st_size)
        if (stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode)) and a.st_rdev != b.st_rdev:
            diff("rdev", (os.major(a.st_rdev), os.minor(a.st_rdev)),
                 (os.major(b.st_rdev), os.minor(b.st_rdev)))
        if stat.S_ISLNK(a.st_mode) and os.readlink(sp) != os.readlink(mp):
            diff("symlink target", os.readlink(sp), os.readlink(mp))
        if check_xattrs and _xattrs(sp) != _xattrs(mp):
            diff("xattrs", _xattrs(sp), _xattrs(mp))
        if check_data and stat.S_ISREG(a.st_mode) and _sha256(sp) != _sha256(mp):
            diff("data sha256", _sha256(sp), _sha256(mp))
        if not stat.S_ISDIR(a.st_mode):
            # hardlink grouping: the same source inode must always map to one mount inode
            seen = ino_map.setdefault(a.st_ino, b.st_ino)
            if seen != b.st_ino:
                diff("hardlink inode", seen, b.st_ino)
    if len(set(ino_map.values())) != len(ino_map):
        diffs.append("two distinct source inodes share one inode on the mount")
    return diffs
