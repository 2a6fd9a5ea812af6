"""Compare what our tools see of an image with what upstream's tools see of it.

* :func:`assert_check_agrees` — ``pynydus image check --json`` (every chunk read and
  digest-checked) against ``nydus-image check -v -J``: same blobs, same number of paths.
* :func:`assert_inspect_agrees` — ``pynydus image inspect --json`` against
  ``nydus-image inspect -R stats`` / ``-R blobs``: inode count and blob table.
* :func:`assert_reader_agrees` — every path of our reader against upstream's ``check -v``
  listing: kind, nlink, size, mtime, and each chunk's digest, blob, compressed and
  uncompressed extent.
* :func:`assert_unpack_agrees` — ``pynydus image unpack`` against ``nydus-image unpack``,
  entry by entry (type, mode, owner, size, mtime, link, device, xattrs, content).
* :func:`assert_served` — a FUSE mount against the source tree (walk, lstat, xattrs,
  readlink, content, hardlink identity).

Known, deliberate differences are normalised, each with its reason beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from pynydus.rafs.read import open_bootstrap
from tests.harness.rafs_layers import FUSE_VFS_INO_MASK
from tests.integration.rafs.erofs_harness import Rec, assert_same_tree, snapshot

from .upstream import CheckView, check_view, inspect_request, nydus_image

PYNYDUS = str(Path(sys.executable).with_name("pynydus"))
#: our drop-in ``nydus-image`` (upstream's subcommands and flags mapped onto ours)
NYDUS_IMAGE = str(Path(sys.executable).with_name("nydus-image"))


def ours(*args: str | Path, exe: str = PYNYDUS) -> subprocess.CompletedProcess[str]:
    """``pynydus ARGS`` (or ``exe ARGS``: our ``NYDUS_IMAGE``); AssertionError with its
    output unless it exits 0."""
    argv = [exe, *(str(a) for a in args)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{' '.join(argv[1:])} exited {r.returncode}:\n{r.stdout}{r.stderr}"
    return r


def assert_check_agrees(boot: Path, blob_dir: Path, up: CheckView) -> dict[str, Any]:
    rep = json.loads(ours("image", "check", "--json", "--blob-dir", blob_dir, boot).stdout)
    assert rep["blobs"] == up.blobs, (rep["blobs"], up.blobs)
    assert rep["inodes"] == len(up.inodes)
    assert rep["chunks_verified"] > 0 or rep["chunks"] == 0
    return rep


def assert_inspect_agrees(boot: Path, up_boot: Path, up_blob_dir: Path | None = None) -> None:
    mine = json.loads(ours("image", "inspect", "--json", boot).stdout)
    stats = inspect_request(up_boot, "stats", up_blob_dir)
    blobs = inspect_request(up_boot, "blobs", up_blob_dir)
    assert mine["inode_count"] == stats["inodes_count"]
    assert [(b["blob_id"], b["compressed_size"], b["uncompressed_size"]) for b in mine["blobs"]] \
        == [(b["blob_id"], b["compressed_size"], b["decompressed_size"]) for b in blobs]


def assert_reader_agrees(boot: Path, up: CheckView) -> int:
    """Every path: our reader and upstream agree on kind, nlink, size, mtime, chunks."""
    n = 0
    with open_bootstrap(boot) as bs:
        paths = dict(bs.walk())
        assert sorted(paths) == sorted(up.inodes), (
            sorted(set(paths) ^ set(up.inodes))[:10])
        for path, ino in paths.items():
            u, st = up.inodes[path], bs.stat(ino)
            kind = ("dir" if st.is_dir else "symlink" if st.is_symlink
                    else "file" if st.is_reg else "")
            got = (kind, st.nlink, st.size, st.mtime, st.mtime_nsec)
            want = ("file" if u.kind == "hardlink" else u.kind, u.nlink, u.size, u.mtime,
                    u.mtime_nsec)
            assert got == want, f"{path!r}: ours {got}, upstream {want}"
            if st.is_reg and u.chunks:
                # Chunks in file order. Not their file_offset: a v6 file's chunk is the
                # bootstrap's shared record, and upstream prints that record's
                # file_offset (of the chunk's first user) for every file that uses it.
                mine = [(c.digest.hex() if c.digest else None, c.blob_index,
                         c.compressed_offset, c.compressed_size, c.uncompressed_offset,
                         c.uncompressed_size) for c in bs.chunks(ino)]
                # Upstream prints a zero id for chunks of an image whose digests live in
                # the blob (blob-toc: INLINED_CHUNK_DIGEST): it does not load them.
                theirs = [(None if set(c.digest) == {"0"} else c.digest, c.blob_index,
                           c.compressed_offset, c.compressed_size, c.uncompressed_offset,
                           c.uncompressed_size) for c in u.chunks]
                if any(t[0] is None for t in theirs):
                    mine = [(None, *m[1:]) for m in mine]
                assert mine == theirs, f"{path!r}: chunks differ:\nours {mine}\nupstream {theirs}"
            n += 1
    return n


def assert_views_agree(boot: Path, blob_dir: Path, workdir: Path, *,
                       up_boot: Path | None = None, up_blob_dir: Path | None = None) -> None:
    """check + inspect + reader against upstream. ``up_boot``/``up_blob_dir``: what to
    hand upstream when it differs (an inline blob needs ``-D`` to be opened)."""
    up = check_view(up_boot or boot, up_blob_dir, workdir=workdir)
    assert_check_agrees(boot, blob_dir, up)
    assert_inspect_agrees(boot, up_boot or boot, up_blob_dir)
    assert_reader_agrees(boot, up)


# --------------------------------------------------------------------------- unpack


def _tar_view(path: Path, *, ours_side: bool) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    opaque: set[str] = set()
    with tarfile.open(path) as tf:
        for m in tf:
            name = m.name.removeprefix("./").rstrip("/")
            base = name.rpartition("/")[2]
            xattrs = {k.removeprefix("SCHILY.xattr."): v for k, v in m.pax_headers.items()
                      if k.startswith("SCHILY.xattr.")}
            typ, major, minor = m.type, m.devmajor, m.devminor
            if ours_side and base == ".wh..wh..opq":
                # We unpack the builder's overlayfs opaque marker as OCI's .wh..wh..opq
                # (so build + unpack of an OCI layer gives the layer again); upstream
                # keeps the trusted.overlay.opaque xattr.
                opaque.add(name.rpartition("/")[0])
                continue
            if ours_side and base.startswith(".wh."):
                # Likewise a whiteout: ours .wh.NAME, upstream the char 0/0 device.
                name = name.rpartition("/")[0] + "/" + base[4:] if "/" in name else base[4:]
                typ, major, minor = tarfile.CHRTYPE, 0, 0
            digest = None
            if typ == tarfile.REGTYPE:
                f = tf.extractfile(m)
                assert f is not None
                digest = hashlib.sha256(f.read()).hexdigest()
            out[name] = [typ, m.mode, m.uid, m.gid, m.size if typ == tarfile.REGTYPE else None,
                         int(m.mtime),  # ours writes ns in PAX, upstream whole seconds
                         m.linkname.lstrip("/"),  # upstream hardlinks name "/path"
                         major if typ in (tarfile.CHRTYPE, tarfile.BLKTYPE) else None,
                         minor if typ in (tarfile.CHRTYPE, tarfile.BLKTYPE) else None,
                         digest, xattrs]
    for d in opaque:
        out[d][10] = {**out[d][10], "trusted.overlay.opaque": "y"}
    return {k: tuple(v[:10]) + (tuple(sorted(v[10].items())),) for k, v in out.items()}


def assert_unpack_agrees(boot: Path, blob_dir: Path, blob: Path, workdir: Path) -> None:
    """Our unpack (blob dir) and upstream's (``-b blob``: upstream 2.2 can unpack only a
    single-blob image, see docs/compat.md) give the same entries."""
    mine, theirs = workdir / "ours.tar", workdir / "upstream.tar"
    ours("image", "unpack", "--blob-dir", blob_dir, "--output", mine, boot)
    nydus_image("unpack", "-b", blob, "--output", theirs, boot)
    a, b = _tar_view(mine, ours_side=True), _tar_view(theirs, ours_side=False)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:10]
    diffs = [(k, a[k], b[k]) for k in sorted(a) if a[k] != b[k]]
    assert not diffs, "\n".join(f"{k!r}:\n  ours     {x}\n  upstream {y}" for k, x, y in diffs[:8])


# --------------------------------------------------------------------------- serving


def assert_served(mnt: Path, expected: dict[bytes, Rec], **kw: bool) -> int:
    """The mount shows exactly ``expected`` (root's own attributes aside: nydus-image
    zeroes the root mtime on purpose, and nydusd serves a synthesized root)."""
    # hardlink identity on a nydusd mount: see FUSE_VFS_INO_MASK
    got = {k: dataclasses.replace(v, ino=v.ino & FUSE_VFS_INO_MASK)
           for k, v in snapshot(mnt).items()}
    return assert_same_tree(expected, got, check_root_meta=False, **kw)


def no_sockets(snap: dict[bytes, Rec]) -> dict[bytes, Rec]:
    return {k: v for k, v in snap.items() if not stat.S_ISSOCK(v.mode)}
