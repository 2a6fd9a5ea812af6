"""Entry sources (tar codecs, PAX, dir walk) and tree semantics (replace, hardlink, whiteouts)."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from pynydus.errors import FormatError
from pynydus.rafs.builder import (
    Tree,
    layer_of_tree,
    merged_of_tree,
    overlay_layer,
    tree_of_merged,
)
from pynydus.rafs.format import LOWER_HARDLINK_XATTR, decode_rdev, encode_rdev
from pynydus.rafs.source import DirSource, Entry, EntryType, TarSource, Whiteout, normalize_path
from pynydus.rafs.source.tarsource import _pax_time


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        for info, data in members:
            info.size = len(data or b"")
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _ti(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type = kind
    for k, v in kw.items():
        setattr(t, k, v)
    return t


SAMPLE = _tar([
    (_ti("./", tarfile.DIRTYPE, mode=0o755), None),
    (_ti("./d/f", mode=0o640, uid=70000, pax_headers={
        "mtime": "1700000000.000000123", "SCHILY.xattr.user.k": "v",
        "SCHILY.xattr.security.capability": b"\x01\x00\x00\x02\xff".decode("utf-8", "surrogateescape"),
    }), b"x" * 5000),
    (_ti("d/l", tarfile.LNKTYPE, linkname="./d/f"), None),
    (_ti("d/s", tarfile.SYMTYPE, linkname="../f"), None),
    (_ti("d/c", tarfile.CHRTYPE, devmajor=4, devminor=300), None),
    (_ti("d/p", tarfile.FIFOTYPE), None),
    (_ti("caf\udcff", tarfile.REGTYPE), b""),
])


@pytest.mark.parametrize("codec", ["plain", "gzip", "zstd"])
def test_tar_source_detects_codec_by_magic_and_streams_entries(codec: str) -> None:
    raw = {"plain": SAMPLE, "gzip": gzip.compress(SAMPLE),
           "zstd": zstandard.ZstdCompressor().compress(SAMPLE)}[codec]
    src = TarSource(io.BytesIO(raw))
    got = []
    for e, r in src:
        data = b""
        if r is not None:
            while piece := r.read(1000):
                assert len(piece) <= 1000
                data += piece
        got.append((e, data))
    assert src.compression == (None if codec == "plain" else codec)
    paths = [e.path for e, _ in got]
    assert paths == [b"", b"d/f", b"d/l", b"d/s", b"d/c", b"d/p", b"caf\xff"]
    f = got[1][0]
    assert (f.type, f.mode, f.uid, f.mtime, f.mtime_nsec) == (EntryType.REG, 0o640, 70000, 1700000000, 123)
    assert f.xattrs == {b"user.k": b"v", b"security.capability": b"\x01\x00\x00\x02\xff"}
    assert got[1][1] == b"x" * 5000
    assert got[2][0].type == EntryType.HARDLINK and got[2][0].link == b"d/f"
    assert got[3][0].link == b"../f"
    assert (got[4][0].rdev_major, got[4][0].rdev_minor) == (4, 300)
    assert got[5][0].type == EntryType.FIFO


def test_tar_source_rejects_garbage_and_accepts_an_empty_file() -> None:
    assert list(TarSource(io.BytesIO(b""))) == []
    with pytest.raises(FormatError):
        list(TarSource(io.BytesIO(b"not a tar" * 100)))


def test_pax_time_and_path_normalization() -> None:
    assert _pax_time("12.5") == (12, 500_000_000)
    assert _pax_time("-1.25") == (-2, 750_000_000)
    assert _pax_time("7") == (7, 0)
    assert normalize_path(b"./a//b/") == b"a/b"
    assert normalize_path(b"/") == b""
    with pytest.raises(FormatError):
        normalize_path(b"a/../../etc")


def test_whiteout_names() -> None:
    assert Entry(b"a/.wh.x", EntryType.REG).whiteout == Whiteout.REMOVAL
    assert Entry(b".wh..wh..opq", EntryType.REG).whiteout == Whiteout.OPAQUE
    assert Entry(b"a/.wh.", EntryType.REG).whiteout is None
    assert Entry(b"a/x.wh.y", EntryType.REG).whiteout is None


def test_dir_source_reports_hardlinks_once_and_parents_first(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a").write_bytes(b"1")
    os.link(tmp_path / "a", tmp_path / "b" / "z")
    os.symlink("a", tmp_path / "s")
    os.setxattr(tmp_path / "a", "user.x", b"y")
    entries = [e for e, _ in DirSource(tmp_path)]
    assert [e.path for e in entries] == [b"", b"a", b"b", b"s", b"b/z"]
    assert entries[4].type == EntryType.HARDLINK and entries[4].link == b"a"
    assert entries[1].xattrs == {b"user.x": b"y"}


def _e(path: bytes, kind: EntryType = EntryType.REG, **kw: object) -> Entry:
    return Entry(path, kind, **kw)  # type: ignore[arg-type]


def test_tree_replaces_later_entries_and_keeps_dir_children() -> None:
    t = Tree()
    t.apply(_e(b"a/b/f"))  # parents implied
    assert t.lookup(b"a").inode.implicit
    t.apply(_e(b"a", EntryType.DIR, mode=0o700, mtime=5))
    a = t.lookup(b"a")
    assert not a.inode.implicit and a.inode.mode == stat.S_IFDIR | 0o700 and b"b" in a.children
    t.apply(_e(b"a/b", EntryType.SYMLINK, link=b"x"))  # non-dir replaces dir
    assert t.lookup(b"a/b/f") is None and t.lookup(b"a/b").inode.link == b"x"


def test_tree_hardlinks_share_regular_inodes_only() -> None:
    t = Tree()
    t.apply(_e(b"f", size=0))
    t.apply(_e(b"s", EntryType.SYMLINK, link=b"f"))
    t.apply(_e(b"h1", EntryType.HARDLINK, link=b"f"))
    t.apply(_e(b"h2", EntryType.HARDLINK, link=b"s"))
    t.finalize()
    assert t.lookup(b"h1").inode is t.lookup(b"f").inode and t.lookup(b"f").inode.nlink == 2
    assert t.lookup(b"h2").inode is not t.lookup(b"s").inode
    assert t.lookup(b"h2").inode.link == b"f" and t.lookup(b"s").inode.nlink == 1
    assert t.root.inode.nlink == 2
    with pytest.raises(FormatError):
        t.apply(_e(b"h3", EntryType.HARDLINK, link=b""))  # the root: a directory
    # A target outside the layer waits for the lower layers (overlay_layer binds it).
    t.apply(_e(b"h4", EntryType.HARDLINK, link=b"lower/file"))
    h4 = t.lookup(b"h4").inode
    assert h4.is_reg and h4.size == 0 and h4.xattrs == {LOWER_HARDLINK_XATTR: b"lower/file"}
    assert t.lower_links == [(b"h4", b"lower/file")]


def test_overlay_binds_lower_links_to_the_lower_inode() -> None:
    lower = Tree()
    lower.apply(_e(b"usr/bin/tool", size=0))
    lower.apply(_e(b"usr/bin/sh", EntryType.SYMLINK, link=b"tool"))
    upper = Tree("none")
    upper.apply(_e(b"a", EntryType.HARDLINK, link=b"usr/bin/tool"))
    upper.apply(_e(b"b", EntryType.HARDLINK, link=b"a"))  # a link to the waiting link
    upper.apply(_e(b"c", EntryType.HARDLINK, link=b"usr/bin/sh"))
    tool = lower.lookup(b"usr/bin/tool").inode
    sh = lower.lookup(b"usr/bin/sh").inode
    merged = merged_of_tree(lower)
    overlay_layer(merged, layer_of_tree(upper))
    out = tree_of_merged(merged)
    assert out.lookup(b"a").inode is tool and out.lookup(b"b").inode is tool
    assert out.lookup(b"usr/bin/tool").inode is tool
    c = out.lookup(b"c").inode
    assert c is not out.lookup(b"usr/bin/sh").inode and c.link == b"tool"  # a copy
    assert sh in (c, out.lookup(b"usr/bin/sh").inode)
    missing = Tree("none")
    missing.apply(_e(b"x", EntryType.HARDLINK, link=b"nowhere"))
    with pytest.raises(FormatError, match="nowhere"):
        overlay_layer(merged, layer_of_tree(missing))


def test_tree_whiteout_specs() -> None:
    for spec, expect in (("overlayfs", {b"gone", b"keep"}), ("oci", {b"keep"}),
                         ("none", {b".wh.gone", b".wh..wh..opq", b"keep"})):
        t = Tree(spec)
        t.apply(_e(b"d/keep"))
        t.apply(_e(b"d/.wh.keep"))  # same-layer file is not hidden by its own layer
        t.apply(_e(b"d/.wh.gone"))
        t.apply(_e(b"d/.wh..wh..opq"))
        d = t.lookup(b"d")
        names = set(d.children)
        if spec == "none":
            names.discard(b".wh.keep")
        assert names == expect, spec
        opaque = d.inode.xattrs.get(b"trusted.overlay.opaque")
        assert opaque == (b"y" if spec == "overlayfs" else None)
        if spec == "overlayfs":
            g = d.children[b"gone"].inode
            assert stat.S_ISCHR(g.mode) and g.rdev == 0


def test_unstorable_xattrs_are_skipped_and_reported() -> None:
    t = Tree()
    t.apply(_e(b"f", xattrs={b"user.ok": b"1", b"hardlink3": b"v", b"system.nfs4_acl": b"x"}))
    assert t.lookup(b"f").inode.xattrs == {b"user.ok": b"1"}
    assert sorted(n for _, n in t.skipped_xattrs) == [b"hardlink3", b"system.nfs4_acl"]


@pytest.mark.parametrize("major,minor", [(0, 0), (1, 3), (8, 255), (300, 70000), (4095, 0xFFFFF)])
def test_rdev_encoding_matches_linux(major: int, minor: int) -> None:
    assert encode_rdev(major, minor) == os.makedev(major, minor) & 0xFFFFFFFF
    assert decode_rdev(encode_rdev(major, minor)) == (major, minor)
