"""A layer that hardlinks to a file of a lower layer, under the kernel.

Image builders other than overlayfs-based ones emit such layers (the link's target
is not in the layer's tar). Each layer is built on its own, as the converter does,
then merged (or built with the lower image as parent); the kernel mounts the
result, which must equal the two tars extracted one over the other (tarfile links
to the already extracted lower file, as containerd's applier does).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from erofs_harness import assert_same_tree, fsck, mounted, snapshot

from pynydus.errors import FormatError
from pynydus.rafs.builder import build
from pynydus.rafs.format import LOWER_HARDLINK_XATTR
from pynydus.rafs.merge import merge
from pynydus.rafs.read import open_bootstrap

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="kernel EROFS mounts need root"),
]

TOOL = bytes(range(256)) * 6000  # 1.5 MB: two chunks
T1, T2 = 1_600_000_000, 1_700_000_000


def _tar(path: Path, entries: list[tuple[str, bytes, bytes | str, int]]) -> None:
    """(name, type, data or link target, mode) entries into a PAX tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, payload, mode in entries:
            t = tarfile.TarInfo(name)
            t.type, t.mode, t.mtime = kind, mode, T1 if path.name == "l1.tar" else T2
            data = None
            if kind == tarfile.REGTYPE:
                assert isinstance(payload, bytes)
                t.size, data = len(payload), io.BytesIO(payload)
            elif kind == tarfile.LNKTYPE:
                assert isinstance(payload, str)
                t.linkname = payload
            tf.addfile(t, data)
    path.write_bytes(buf.getvalue())


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    _tar(tmp_path / "l1.tar", [
        ("usr", tarfile.DIRTYPE, b"", 0o755),
        ("usr/bin", tarfile.DIRTYPE, b"", 0o755),
        ("usr/bin/tool", tarfile.REGTYPE, TOOL, 0o755),
        ("usr/bin/small", tarfile.REGTYPE, b"small file\n", 0o644),
        ("usr/bin/replaced", tarfile.REGTYPE, b"old content\n", 0o644),
    ])
    _tar(tmp_path / "l2.tar", [
        ("usr/bin/tool-alias", tarfile.LNKTYPE, "usr/bin/tool", 0o755),  # lower target
        ("usr/bin/alias2", tarfile.LNKTYPE, "usr/bin/tool-alias", 0o755),  # link to that link
        ("opt", tarfile.DIRTYPE, b"", 0o755),
        ("opt/small", tarfile.LNKTYPE, "usr/bin/small", 0o644),  # into a new directory
        ("usr/bin/keep-old", tarfile.LNKTYPE, "usr/bin/replaced", 0o644),
        # replaced after the link was made: the link keeps the lower (old) content
        ("usr/bin/replaced", tarfile.REGTYPE, b"new content\n", 0o644),
        ("usr/bin/local", tarfile.REGTYPE, b"in layer 2\n", 0o644),
        ("usr/bin/local-link", tarfile.LNKTYPE, "usr/bin/local", 0o644),  # same layer
    ])
    expected = tmp_path / "expected"
    expected.mkdir()
    for name in ("l1.tar", "l2.tar"):
        with tarfile.open(tmp_path / name) as tf:
            tf.extractall(expected, filter="fully_trusted")
    # tarfile rewrites a file in place where containerd replaces it: redo "replaced"
    # as containerd leaves it (the old inode stays with keep-old).
    bin_ = expected / "usr/bin"
    os.unlink(bin_ / "replaced")
    (bin_ / "keep-old").write_bytes(b"old content\n")
    (bin_ / "replaced").write_bytes(b"new content\n")
    os.utime(bin_ / "replaced", ns=(T2 * 10**9,) * 2)
    # Extracting layer 2 touched the directories, and tarfile stamps a link's own
    # mtime on the inode it shares; the image keeps the target's metadata, as for
    # links inside one layer.
    for rel, t in (("usr/bin/tool", T1), ("usr/bin/small", T1), ("usr/bin/keep-old", T1),
                   ("usr/bin", T1), ("usr", T1), ("opt", T2)):
        os.utime(expected / rel, ns=(t * 10**9,) * 2)
    return {"l1": tmp_path / "l1.tar", "l2": tmp_path / "l2.tar", "expected": expected}


def _devices(boot: Path | str, blob_dir: Path) -> list[Path]:
    with open_bootstrap(boot) as bs:
        return [blob_dir / b.blob_id for b in bs.blobs]


def _check(boot: Path, blobs: Path, expected: Path) -> None:
    devs = _devices(boot, blobs)
    fsck(boot, devs)
    with mounted(boot, devs) as mnt:
        got = snapshot(mnt)
        want = snapshot(expected)
        want[b""] = got[b""]  # the root: implied by both layers, not under test
        assert_same_tree(want, got)
        st = os.stat(mnt / "usr/bin/tool")
        assert st.st_nlink == 3 and os.stat(mnt / "usr/bin/alias2").st_ino == st.st_ino
        assert (mnt / "usr/bin/keep-old").read_bytes() == b"old content\n"
        assert LOWER_HARDLINK_XATTR.decode() not in os.listxattr(mnt / "opt/small")


def test_layer_linking_into_a_lower_layer_builds_alone_and_merges(
    tmp_path: Path, layers: dict[str, Path]
) -> None:
    blobs = tmp_path / "blobs"
    build(layers["l1"], tmp_path / "l1.boot", blobs, type="tar-rafs", whiteout_spec="none")
    r2 = build(layers["l2"], tmp_path / "l2.boot", blobs, type="tar-rafs", whiteout_spec="none")
    assert sum("is not in this layer" in w for w in r2.warnings) == 3  # alias2: in-layer
    # Alone, layer 2 is a valid image: the waiting links are empty files.
    devs2 = _devices(tmp_path / "l2.boot", blobs)
    fsck(tmp_path / "l2.boot", devs2)
    with mounted(tmp_path / "l2.boot", devs2) as mnt:
        assert (mnt / "opt/small").read_bytes() == b""
        assert os.getxattr(mnt / "opt/small", LOWER_HARDLINK_XATTR.decode()) == b"usr/bin/small"
    merge([tmp_path / "l1.boot", tmp_path / "l2.boot"], tmp_path / "merged.boot")
    _check(tmp_path / "merged.boot", blobs, layers["expected"])


def test_layer_linking_into_its_parent_bootstrap(tmp_path: Path, layers: dict[str, Path]) -> None:
    blobs = tmp_path / "blobs"
    build(layers["l1"], tmp_path / "l1.boot", blobs, type="tar-rafs")
    r = build(layers["l2"], tmp_path / "l12.boot", blobs, type="tar-rafs",
              parent_bootstrap=tmp_path / "l1.boot")
    assert not [w for w in r.warnings if "hardlink" in w]
    _check(tmp_path / "l12.boot", blobs, layers["expected"])


def test_merge_rejects_a_link_whose_target_no_layer_has(tmp_path: Path) -> None:
    _tar(tmp_path / "l1.tar", [("etc", tarfile.DIRTYPE, b"", 0o755)])
    _tar(tmp_path / "l2.tar", [("etc/passwd-", tarfile.LNKTYPE, "etc/passwd", 0o644)])
    blobs = tmp_path / "blobs"
    for n in ("l1", "l2"):
        build(tmp_path / f"{n}.tar", tmp_path / f"{n}.boot", blobs, type="tar-rafs",
              whiteout_spec="none")
    with pytest.raises(FormatError, match="etc/passwd.*is in no lower layer"):
        merge([tmp_path / "l1.boot", tmp_path / "l2.boot"], tmp_path / "merged.boot")
    assert not (tmp_path / "merged.boot").exists()
