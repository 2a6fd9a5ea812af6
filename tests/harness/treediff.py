"""Compare two mounted or extracted directory trees file by file, with nothing but lstat,
readlink, read and the xattr calls: a referee that shares no code with pynydus.

``tree_diff(reference, candidate)`` returns one line per difference (empty: equal) in:
the set of paths (so whiteouts applied on one side and not the other show), file type,
permission bits, uid/gid, regular file size and content (SHA-256), symlink target,
device number, every extended attribute (names and values), link count of non-directories,
hardlink groups (paths sharing an inode on one side must share one on the other), and,
unless told otherwise, mtime in whole seconds.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    mtime: int
    ino: int
    digest: str = ""
    link: str = ""
    rdev: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def scan(root: Path) -> dict[str, Entry]:
    """Every path under ``root`` ("" is the root itself) with what ``tree_diff`` compares."""
    out: dict[str, Entry] = {}

    def add(full: str, rel: str) -> None:
        st = os.lstat(full)
        kind = _KINDS[stat.S_IFMT(st.st_mode)]
        out[rel] = Entry(
            kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
            size=st.st_size if kind == "file" else 0, nlink=st.st_nlink,
            mtime=int(st.st_mtime), ino=st.st_ino,
            digest=_sha256(full) if kind == "file" else "",
            link=os.readlink(full) if kind == "symlink" else "",
            rdev=st.st_rdev if kind in ("char", "block") else 0,
            xattrs=_xattrs(full))

    add(str(root), "")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            add(full, os.path.relpath(full, root))
    return out


def _groups(entries: dict[str, Entry]) -> set[frozenset[str]]:
    by_ino: dict[int, set[str]] = {}
    for rel, e in entries.items():
        if e.kind != "dir":
            by_ino.setdefault(e.ino, set()).add(rel)
    return {frozenset(paths) for paths in by_ino.values() if len(paths) > 1}


def tree_diff(reference: Path, candidate: Path, *,
              compare_mtime: Callable[[str, Entry], bool] = lambda rel, e: True,
              ignore_xattr: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Differences of ``candidate`` from ``reference`` (see the module docstring).

    ``compare_mtime(rel, reference_entry)`` says whether a path's mtime is compared;
    ``ignore_xattr(name)`` drops attributes neither side is expected to carry over."""
    ref, got = scan(reference), scan(candidate)
    diffs = [f"/{p}: only in {reference}" for p in sorted(set(ref) - set(got))]
    diffs += [f"/{p}: only in {candidate}" for p in sorted(set(got) - set(ref))]
    for rel in sorted(set(ref) & set(got)):
        a, b = ref[rel], got[rel]
        fields = ["kind", "mode", "uid", "gid", "size", "digest", "link", "rdev"]
        if a.kind != "dir":
            fields.append("nlink")
        if compare_mtime(rel, a):
            fields.append("mtime")
        for f in fields:
            va, vb = getattr(a, f), getattr(b, f)
            if va != vb:
                diffs.append(f"/{rel}: {f} {va!r} != {vb!r}")
        xa = tuple(x for x in a.xattrs if not ignore_xattr(x[0]))
        xb = tuple(x for x in b.xattrs if not ignore_xattr(x[0]))
        if xa != xb:
            diffs.append(f"/{rel}: xattrs {dict(xa)!r} != {dict(xb)!r}")
    ga, gb = _groups(ref), _groups(got)
    for g in sorted(ga ^ gb, key=sorted):
        side = reference if g in ga else candidate
        diffs.append(f"hardlink group only in {side}: {sorted(g)}")
    return diffs
