"""Property: for random directory trees, the kernel shows exactly the source tree.

Hypothesis creates a tree on disk (names with any byte but ``/`` and NUL, all file
types, hardlinks, xattrs, ids, modes, nanosecond mtimes, sizes around chunk and
block boundaries), we build it with a random chunk size and compressor none, run
fsck.erofs, mount the image with the kernel and compare every path. Building twice
must give byte-identical outputs (reproducible images).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from erofs_harness import assert_same_tree, fsck, mounted, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynydus.rafs.builder import build

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="kernel EROFS mounts need root"),
]

# ".wh." names are OCI whiteouts, which the builder converts on purpose (tested elsewhere)
names = st.binary(min_size=1, max_size=40).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
    and not b.startswith(b".wh.")
)
kinds = st.sampled_from(["file", "file", "file", "dir", "symlink", "char", "fifo", "hardlink"])
sizes = st.sampled_from([0, 1, 4095, 4096, 4097, 65536, 65537, 200_000])


@st.composite
def trees(draw: st.DrawFn) -> list[tuple[str, bytes, dict[str, object]]]:
    """A list of (kind, relative path, attributes), parents before children."""
    out: list[tuple[str, bytes, dict[str, object]]] = []
    dirs = [b""]
    files: list[bytes] = []
    used: set[bytes] = set()
    for _ in range(draw(st.integers(1, 30))):
        parent = draw(st.sampled_from(dirs))
        path = (parent + b"/" if parent else b"") + draw(names)
        if path in used:
            continue
        used.add(path)
        kind = draw(kinds)
        if kind == "hardlink" and not files:
            kind = "file"
        attrs: dict[str, object] = {
            "mode": draw(st.integers(0, 0o7777)),
            "uid": draw(st.sampled_from([0, 1000, 65534, 100000])),
            "gid": draw(st.sampled_from([0, 100, 70000])),
            "mtime_ns": draw(st.integers(0, 2**32 * 10**9)),
            "xattrs": draw(st.dictionaries(
                st.sampled_from(["user.a", "user.b" * 20, "trusted.x", "security.y"]),
                st.binary(max_size=64), max_size=3)),
        }
        if kind == "file":
            n = draw(sizes)
            attrs["data"] = hashlib.sha256(b"%d" % draw(st.integers(0, 2))).digest() * (n // 32 + 1)
            attrs["data"] = attrs["data"][:n]  # type: ignore[index]
            files.append(path)
        elif kind == "symlink":
            attrs["target"] = draw(st.binary(min_size=1, max_size=600).filter(lambda b: b"\0" not in b))
        elif kind == "char":
            attrs["rdev"] = os.makedev(draw(st.integers(1, 300)), draw(st.integers(0, 70000)))
        elif kind == "hardlink":
            attrs["target"] = draw(st.sampled_from(files))
        elif kind == "dir":
            dirs.append(path)
        out.append((kind, path, attrs))
    return out


def _create(root: Path, tree: list[tuple[str, bytes, dict[str, object]]]) -> None:
    r = os.fsencode(root)
    made: list[bytes] = []
    for kind, rel, a in tree:
        p = os.path.join(r, rel)
        if kind == "file":
            with open(p, "wb") as f:
                f.write(a["data"])  # type: ignore[arg-type]
        elif kind == "dir":
            os.mkdir(p)
        elif kind == "symlink":
            os.symlink(a["target"], p)  # type: ignore[arg-type]
        elif kind == "char":
            os.mknod(p, stat.S_IFCHR | 0o600, a["rdev"])  # type: ignore[arg-type]
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "hardlink":
            os.link(os.path.join(r, a["target"]), p)  # type: ignore[arg-type]
            continue  # attributes belong to the shared inode
        for k, v in a["xattrs"].items():  # type: ignore[attr-defined]
            if k.startswith("user.") and kind not in ("file", "dir"):
                continue  # Linux allows user.* only on regular files and directories
            os.setxattr(p, k, v, follow_symlinks=False)
        os.chown(p, a["uid"], a["gid"], follow_symlinks=False)  # type: ignore[arg-type]
        if kind != "symlink":
            os.chmod(p, a["mode"])  # type: ignore[arg-type]
        made.append(p)
    # times last, deepest first, so creating children does not move a parent's mtime
    for (kind, rel, a), p in sorted(
        zip([t for t in tree if t[0] != "hardlink"], made), key=lambda x: -x[1].count(b"/")
    ):
        t = a["mtime_ns"]
        os.utime(p, ns=(t, t), follow_symlinks=False)  # type: ignore[arg-type]
    os.utime(r, ns=(10**18, 10**18))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(tree=trees(), chunk_size=st.sampled_from([0x1000, 0x10000, 0x100000]))
def test_random_directory_trees_mount_identical(
    tree: list[tuple[str, bytes, dict[str, object]]], chunk_size: int
) -> None:
    work = Path(tempfile.mkdtemp(prefix="pn-prop-"))
    try:
        src = work / "src"
        src.mkdir()
        _create(src, tree)
        expected = snapshot(src)
        res = build(src, work / "boot", work / "blobs", chunk_size=chunk_size)
        again = build(src, work / "boot2", work / "blobs2", chunk_size=chunk_size)
        assert (work / "boot").read_bytes() == (work / "boot2").read_bytes()
        assert res.blob_ids == again.blob_ids
        blobs = [work / "blobs" / b for b in res.blob_ids]
        fsck(res.bootstrap, blobs)
        with mounted(res.bootstrap, blobs) as mnt:
            assert_same_tree(expected, snapshot(mnt))
    finally:
        shutil.rmtree(work, ignore_errors=True)
