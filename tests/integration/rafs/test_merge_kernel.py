"""Multi-layer images under the kernel: merge, parent bootstrap and chunk-dict dedup.

Three layers — a base directory, an overlayfs-style upper directory (char 0/0
whiteouts, ``trusted.overlay.opaque``) and an OCI tar layer (``.wh.`` names) — are
built separately, merged, and mounted with one EROFS device per blob. The expected
tree is created independently by applying the same changes to a plain directory.
"""

from __future__ import annotations

import io
import os
import random
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from erofs_harness import assert_same_tree, fsck, mount_fs, mounted, snapshot, umount_fs

from pynydus.rafs.builder import build
from pynydus.rafs.merge import merge
from pynydus.rafs.read import open_bootstrap
from tests.harness.rafs_layers import (
    Ent,
    expected_listing,
    layer_tar,
    mount_listing,
    random_layers,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="kernel EROFS mounts need root"),
]

T1, T2, T3 = 1_600_000_000, 1_650_000_000, 1_700_000_000
BIG = bytes(range(256)) * 8192  # 2 MiB, two chunks


def _file(root: Path, rel: str, data: bytes, t: int, mode: int = 0o644) -> None:
    p = root / rel
    p.write_bytes(data)
    os.chmod(p, mode)
    os.utime(p, ns=(t * 10**9, t * 10**9))


def _dir(root: Path, rel: str, t: int, mode: int = 0o755) -> None:
    p = root / rel
    p.mkdir(parents=True, exist_ok=True)
    os.chmod(p, mode)


def _times(root: Path, t: int) -> None:
    for dirpath, _, _ in os.walk(root, topdown=False):
        os.utime(dirpath, ns=(t * 10**9, t * 10**9))


def _base(root: Path) -> None:
    for d in ("a", "b", "c/deep"):
        _dir(root, d, T1)
    _file(root, "a/x", BIG, T1)
    _file(root, "a/y", b"y to be removed", T1)
    _file(root, "b/old1", b"hidden by opaque", T1)
    _file(root, "b/old2", b"hidden by opaque too", T1)
    _file(root, "c/deep/keep", b"untouched", T1)
    _file(root, "c/gone-by-oci", b"removed by layer 3", T1)
    os.link(root / "a/x", root / "c/x-link")
    _times(root, T1)


def _upper(root: Path) -> None:
    """Layer 2 as an overlayfs upper directory would look."""
    _dir(root, "a", T2)
    _dir(root, "b", T2, 0o700)
    os.mknod(root / "a/y", stat.S_IFCHR, os.makedev(0, 0))  # whiteout
    os.setxattr(root / "b", "trusted.overlay.opaque", b"y")
    _file(root, "b/new", b"new in layer 2", T2)
    _file(root, "a/x-copy", BIG, T2)  # same chunks as a/x: chunk dict dedup
    _times(root, T2)


def _oci_layer(path: Path) -> None:
    """Layer 3 as an OCI tar with .wh. names."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, kind: bytes, data: bytes = b"", mode: int = 0o644) -> None:
            t = tarfile.TarInfo(name)
            t.type, t.size, t.mtime, t.mode = kind, len(data), T3, mode
            tf.addfile(t, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("c", tarfile.DIRTYPE, mode=0o750)
        add("c/.wh.gone-by-oci", tarfile.REGTYPE)
        add("d", tarfile.DIRTYPE, mode=0o755)
        add("d/.wh..wh..opq", tarfile.REGTYPE)  # opaque over nothing: must vanish
        add("d/file", tarfile.REGTYPE, b"layer 3 file")
    path.write_bytes(buf.getvalue())


def _expected(root: Path) -> None:
    for d in ("a", "b", "c/deep", "d"):
        _dir(root, d, T1)
    os.chmod(root / "b", 0o700)
    os.chmod(root / "c", 0o750)
    _file(root, "a/x", BIG, T1)
    _file(root, "a/x-copy", BIG, T2)
    _file(root, "b/new", b"new in layer 2", T2)
    _file(root, "c/deep/keep", b"untouched", T1)
    _file(root, "d/file", b"layer 3 file", T3)
    os.link(root / "a/x", root / "c/x-link")
    for rel, t in (("c/deep", T1), ("a", T2), ("b", T2), ("c", T3), ("d", T3), ("", T3)):
        os.utime(root / rel, ns=(t * 10**9, t * 10**9))


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, make in (("base", _base), ("upper", _upper), ("expected", _expected)):
        d = tmp_path / name
        d.mkdir()
        make(d)
        out[name] = d
    _oci_layer(tmp_path / "l3.tar")
    out["l3"] = tmp_path / "l3.tar"
    # the OCI tar has no root entry: the merged root keeps layer 2's metadata
    os.utime(out["expected"], ns=(T2 * 10**9,) * 2)
    return out


def _devices(boot: Path, blob_dir: Path) -> list[Path]:
    with open_bootstrap(boot) as bs:
        return [blob_dir / b.blob_id for b in bs.blobs]


def test_merge_applies_whiteouts_in_layer_order_and_keeps_every_blob(
    tmp_path: Path, layers: dict[str, Path]
) -> None:
    blobs = tmp_path / "blobs"
    r1 = build(layers["base"], tmp_path / "l1.boot", blobs)
    r2 = build(layers["upper"], tmp_path / "l2.boot", blobs, chunk_dict=tmp_path / "l1.boot")
    r3 = build(layers["l3"], tmp_path / "l3.boot", blobs, type="tar-rafs", whiteout_spec="none")
    assert r2.dict_chunks == 2 and r2.blob_ids[0] == r1.blob_ids[0]  # a/x-copy came from layer 1
    m = merge([tmp_path / "l1.boot", tmp_path / "l2.boot", tmp_path / "l3.boot"],
              tmp_path / "merged.boot")
    assert m.blob_ids == [r1.blob_ids[0], r2.blob_ids[-1], r3.blob_ids[-1]]
    devs = _devices(tmp_path / "merged.boot", blobs)
    fsck(tmp_path / "merged.boot", devs)
    for r in (r1, r2, r3):
        fsck(r.bootstrap, _devices(Path(r.bootstrap), blobs))
    with mounted(tmp_path / "merged.boot", devs) as mnt:
        got = snapshot(mnt)
        assert_same_tree(snapshot(layers["expected"]), got)
        assert os.listxattr(mnt / "b") == []  # opaque marker applied, not kept


def test_build_with_parent_bootstrap_equals_merge(tmp_path: Path, layers: dict[str, Path]) -> None:
    blobs = tmp_path / "blobs"
    build(layers["base"], tmp_path / "l1.boot", blobs)
    r12 = build(layers["upper"], tmp_path / "l12.boot", blobs, parent_bootstrap=tmp_path / "l1.boot")
    assert r12.dict_chunks == 2  # parent chunks dedup the new layer
    build(layers["l3"], tmp_path / "l123.boot", blobs, type="tar-rafs",
                 parent_bootstrap=tmp_path / "l12.boot")
    devs = _devices(tmp_path / "l123.boot", blobs)
    assert len(devs) == 3
    for boot in ("l1.boot", "l12.boot", "l123.boot"):
        fsck(tmp_path / boot, _devices(tmp_path / boot, blobs))
    with mounted(tmp_path / "l123.boot", devs) as mnt:
        assert_same_tree(snapshot(layers["expected"]), snapshot(mnt))


@contextmanager
def _overlay(lowers: list[Path]) -> Iterator[Path]:
    """Read-only overlayfs of ``lowers`` (uppermost first); always unmounted."""
    mnt = Path(tempfile.mkdtemp(prefix="pn-ovl-"))
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    try:
        mount_fs(b"overlay", os.fsencode(mnt), b"overlay", 1, opts.encode())
        try:
            yield mnt
        finally:
            umount_fs(os.fsencode(mnt))
    finally:
        os.rmdir(mnt)


def test_overlayfs_form_whiteouts_work_under_kernel_overlayfs(
    tmp_path: Path, layers: dict[str, Path]
) -> None:
    """Per-layer images mounted separately and stacked by overlayfs: the char 0/0 and
    opaque-xattr form our builder emits is what overlayfs itself understands."""
    blobs = tmp_path / "blobs"
    r1 = build(layers["base"], tmp_path / "l1.boot", blobs)
    r2 = build(layers["upper"], tmp_path / "l2.boot", blobs)
    r3 = build(layers["l3"], tmp_path / "l3.boot", blobs, type="tar-rafs")  # .wh. -> overlay form
    for r in (r1, r2, r3):
        fsck(r.bootstrap, _devices(Path(r.bootstrap), blobs))
    with ExitStack() as stack:
        mnts = [
            stack.enter_context(mounted(r.bootstrap, _devices(Path(r.bootstrap), blobs)))
            for r in (r1, r2, r3)
        ]
        with _overlay(list(reversed(mnts))) as ovl:
            got = snapshot(ovl)
    expected = snapshot(layers["expected"])
    assert sorted(got) == sorted(expected)
    for path, rec in expected.items():
        if rec.kind == "reg":
            assert got[path].sha256 == rec.sha256, path


def _rich_layers(seed: int) -> list[list[Ent]]:
    """The first random 4-layer stack from ``seed`` on that uses every entry kind."""
    kinds = {"dir", "file", "symlink", "hardlink", "fifo", "char", "wh", "opq"}
    while True:
        layers = random_layers(random.Random(seed), 4, explicit_dirs=True, tries=40)
        if {e.kind for ents in layers for e in ents} >= kinds and any(
            len(e.link) > 2000 for ents in layers for e in ents
        ):
            return layers
        seed += 1


@pytest.mark.parametrize("seed", [0, 1000, 2000])
def test_random_layers_merged_mount_as_the_oci_model_says(tmp_path: Path, seed: int) -> None:
    """Four random layers (whiteouts, opaque dirs, hardlinks, xattrs, long symlinks,
    devices, files and directories replacing each other), built alternately with both
    whiteout forms, merged by records: fsck.erofs is clean and the kernel's view of the
    merged image is the model's OCI layer application, content included."""
    layers = _rich_layers(seed)
    blobs = tmp_path / "blobs"
    boots = []
    for i, ents in enumerate(layers):
        boot = tmp_path / f"l{i}.boot"
        build(io.BytesIO(layer_tar(ents)), boot, blobs, type="tar-rafs",
              whiteout_spec=("overlayfs", "none")[i % 2])
        boots.append(boot)
    merge(boots, tmp_path / "merged.boot")
    devs = _devices(tmp_path / "merged.boot", blobs)
    fsck(tmp_path / "merged.boot", devs, "--extract")
    with mounted(tmp_path / "merged.boot", devs) as mnt:
        got = mount_listing(mnt)
    assert got == expected_listing(layers, data="sha256")
