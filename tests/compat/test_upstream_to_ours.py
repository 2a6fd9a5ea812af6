"""Matrix cell 1: images upstream's ``nydus-image create`` writes, read by us.

For each way of building (RAFS v5 and v6; compressors none, lz4_block, zstd; chunk sizes
4 KiB to 16 MiB; sha256 digests; blob TOC; inline metadata; a chunk dictionary; tar,
tar.gz and zran (``targz-ref``) sources) the image of the rich tree must:

* pass ``pynydus image check`` (every chunk read and digest-checked) with the blob list
  and path count upstream's ``nydus-image check`` reports;
* ``pynydus image inspect`` like ``nydus-image inspect -R stats/blobs``;
* read through our reader exactly as upstream's ``check -v`` lists every inode (kind,
  nlink, size, mtime, each chunk's digest and extents);
* unpack like ``nydus-image unpack`` (single-blob images: upstream's limit);
* and be served by pynydusd (FUSE, localfs) byte for byte with the source's metadata.

nydus-image 2.2 has no ``--batch-size`` and no ``tar-tarfs`` (both came later); the
cells that would need them are listed in docs/compat.md as not applicable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.rafs_layers import Ent
from tests.integration.rafs.erofs_harness import Rec, snapshot

from .conftest import ServeFn
from .trees import T1, rich_tree, tar_of, write_layers
from .upstream import UpstreamFailed, check_view, nydus_image
from .views import assert_served, assert_unpack_agrees, assert_views_agree, no_sockets


class UpstreamBug(AssertionError):
    """Upstream failed with exactly the output recorded as the evidence of a known bug."""


@contextmanager
def upstream_bug(evidence: str | None) -> Iterator[None]:
    """Turn the upstream failure whose output contains ``evidence`` into UpstreamBug (the
    cell's expected failure); any other failure stays a failure of the cell."""
    try:
        yield
    except UpstreamFailed as err:
        if evidence is not None and evidence in err.output:
            raise UpstreamBug(err.output) from err
        raise


def whole_seconds(snap: dict[bytes, Rec]) -> dict[bytes, Rec]:
    return {k: dataclasses.replace(v, mtime_ns=v.mtime_ns // 10**9 * 10**9)
            for k, v in snap.items()}


@dataclass(frozen=True)
class Build:
    """One way upstream builds an image of the rich tree."""

    id: str
    args: tuple[str, ...] = ()
    source: str = "dir"  # dir | tar | targz
    inline: bool = False  # --blob-inline-meta: the blob carries the bootstrap
    bug: tuple[str, str] | None = None  # (evidence in upstream's output, why) of a known bug

    def __str__(self) -> str:
        return self.id


BUILDS = [
    Build("v6-none", ("--compressor", "none")),
    Build("v6-lz4_block", ("--compressor", "lz4_block")),
    Build("v6-zstd", ("--compressor", "zstd")),
    Build("v6-zstd-chunk4k", ("--compressor", "zstd", "--chunk-size", "0x1000")),
    Build("v6-lz4_block-chunk16m", ("--compressor", "lz4_block", "--chunk-size", "0x1000000")),
    Build("v6-sha256", ("--digester", "sha256")),
    Build("v6-blob-toc", ("--features", "blob-toc")),
    Build("v5-none", ("-v", "5", "--compressor", "none")),
    Build("v5-lz4_block", ("-v", "5", "--compressor", "lz4_block")),
    Build("v5-zstd-aligned-chunk64k", ("-v", "5", "--aligned-chunk", "--chunk-size", "0x10000")),
    Build("v6-inline-meta", ("--blob-inline-meta",), inline=True),
    Build("v6-inline-meta-blob-toc", ("--blob-inline-meta", "--features", "blob-toc"),
          inline=True),
    Build("v6-tar-rafs", ("-t", "tar-rafs"), source="tar"),
    Build("v6-targz-rafs-sha256", ("-t", "targz-rafs", "--digester", "sha256"), source="targz"),
    Build("v6-targz-ref-zran", ("-t", "targz-ref"), source="targz"),
    Build("v5-targz-rafs", ("-v", "5", "-t", "targz-rafs"), source="targz", bug=(
        "inode validation failure",
        ("nydus-image 2.2 writes a corrupt RAFS v5 bootstrap from a tar layer in which a "
         "hardlinked file has an xattr: its own 'nydus-image check' then fails with "
         "'inode validation failure, inode RafsV5Inode { ... }' at nydus-rafs 0.2.2 "
         "metadata/direct_v5.rs:440 / 'failed to load bootstrap for validator' (v6 from "
         "the same tar, and v5 from the same directory, are fine)"))),
]


def _param(b: Build) -> object:
    if b.bug is None:
        return pytest.param(b, id=b.id)
    return pytest.param(b, id=b.id, marks=pytest.mark.xfail(
        raises=UpstreamBug, strict=True, reason=b.bug[1]))


@pytest.fixture(scope="session")
def rich_snap(rich_src: Path) -> dict[bytes, Rec]:
    return snapshot(rich_src)


@dataclass
class Built:
    boot: Path  # what our tools open: the bootstrap, or the blob with inline metadata
    blob_dir: Path
    up_boot: Path  # what upstream's tools open
    up_blob_dir: Path | None  # -D for upstream check (inline metadata needs it)
    single_blob: Path | None  # the blob, when the image has exactly one


def upstream_build(b: Build, src: Path, work: Path, *extra: str) -> Built:
    blob_dir = work / "blobs"
    blob_dir.mkdir(parents=True)
    source = src
    if b.source != "dir":
        source = tar_of(src, work / "layer.tar", gz=b.source == "targz")
    boot = work / "image.boot"
    args: list[str | Path] = ["create", *b.args, *extra, "-D", blob_dir]
    if not b.inline:
        args += ["-B", boot]
    nydus_image(*args, source)
    if "targz-ref" in b.args:
        # The data of a zran image stays in the original .tar.gz: the blob the bootstrap
        # names is that layer, by its sha256 (what a registry serves it as).
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        shutil.copyfile(source, blob_dir / digest)
    blobs = sorted(blob_dir.iterdir())
    if b.inline:
        (blob,) = blobs
        return Built(blob, blob_dir, blob, blob_dir, blob)
    # -D for upstream's check too: a blob-toc image is not checked without a backend
    # ("no configuration information for backend").
    return Built(boot, blob_dir, boot, blob_dir, blobs[0] if len(blobs) == 1 else None)


def verify(built: Built, expected: dict[bytes, Rec], work: Path, serve: ServeFn, *,
           unpack: bool = True) -> None:
    assert_views_agree(built.boot, built.blob_dir, work, up_boot=built.up_boot,
                       up_blob_dir=built.up_blob_dir)
    if unpack and built.single_blob is not None:
        assert_unpack_agrees(built.boot, built.blob_dir, built.single_blob, work)
    mnt = serve("pynydusd", built.boot, built.blob_dir)
    assert_served(mnt, expected)


@pytest.mark.parametrize("b", [_param(b) for b in BUILDS])
def test_upstream_image_reads_and_serves_like_upstream(
        b: Build, rich_src: Path, rich_snap: dict[bytes, Rec], workdir: Path,
        serve: ServeFn) -> None:
    with upstream_bug(b.bug[0] if b.bug else None):
        built = upstream_build(b, rich_src, workdir)
        # From a tar, nydus-image 2.2 keeps whole seconds of mtime only (see
        # test_upstream_tar_keeps_subsecond_mtimes): compare the rest.
        expected = rich_snap if b.source == "dir" else whole_seconds(no_sockets(rich_snap))
        verify(built, expected, workdir, serve,
               # upstream unpack reads an inline blob's data only through a backend config,
               # and a zran image's only through the original layer: -b cannot name either
               unpack=not b.inline and "targz-ref" not in b.args)


def test_chunk_dict_image_reads_both_blobs(rich_src: Path, rich_snap: dict[bytes, Rec],
                                           workdir: Path, serve: ServeFn) -> None:
    """``--chunk-dict``: the image's chunks already in the dictionary's blob stay there,
    so the image has two blobs and reads from both."""
    base = workdir / "base-src"
    base.mkdir()
    shutil.copytree(rich_src / "dir", base / "dir", symlinks=True)  # multi.bin, dup.bin
    dict_built = upstream_build(Build("dict", ("--compressor", "zstd")), base, workdir / "d")
    work = workdir / "img"
    built = upstream_build(Build("v6-chunk-dict", ("--compressor", "zstd")), rich_src, work,
                           "--chunk-dict", f"bootstrap={dict_built.boot}")
    for blob in dict_built.blob_dir.iterdir():
        shutil.copyfile(blob, built.blob_dir / blob.name)
    assert len(list(built.blob_dir.iterdir())) == 2
    built.single_blob = None
    verify(built, rich_snap, work, serve)


# --------------------------------------------------------------------------- upstream bugs


ACL_EVIDENCE = '"invalid xattr key"'


@pytest.mark.xfail(raises=UpstreamBug, strict=True, reason=(
    "nydus-image 2.2 rejects POSIX ACL xattrs: RafsXAttrs::add (nydus-rafs 0.2.2, "
    "metadata/layout/mod.rs:262) accepts a name only if it is *longer* than a prefix of "
    "RAFS_XATTR_PREFIXES, and the ACL prefixes are whole names "
    "('system.posix_acl_access'); output: 'invalid xattr key' ... 'failed to create node "
    "\"src/acl-file\"' ... 'Invalid argument (os error 22)'"))
def test_upstream_builds_posix_acls(workdir: Path, serve: ServeFn) -> None:
    src = rich_tree(workdir / "src", acls=True, big=False)
    with upstream_bug(ACL_EVIDENCE):
        built = upstream_build(Build("v6-acl"), src, workdir / "img")
    verify(built, snapshot(src), workdir / "img", serve)


PAX_EVIDENCE = "failed to parse PaxExtension from tar header, malformed pax extension"


@pytest.mark.xfail(raises=UpstreamBug, strict=True, reason=(
    "nydus-image 2.2 cannot build a tar layer with an xattr value holding a newline byte: "
    "the tar crate 0.4.38 it uses splits PAX records at b'\\n' instead of reading each "
    "record's length; output: 'failed to parse PaxExtension from tar header, malformed "
    "pax extension'"))
def test_upstream_builds_tar_with_binary_xattr(workdir: Path, serve: ServeFn) -> None:
    src = rich_tree(workdir / "src", newline_xattr=True, big=False)
    with upstream_bug(PAX_EVIDENCE):
        built = upstream_build(Build("v6-tar-binary-xattr", ("-t", "tar-rafs"), "tar"),
                               src, workdir / "img")
    verify(built, no_sockets(snapshot(src)), workdir / "img", serve)


MTIME_EVIDENCE = "i_mtime_nsec 0"


@pytest.mark.xfail(raises=UpstreamBug, strict=True, reason=(
    "nydus-image 2.2 drops the sub-second part of a tar entry's mtime: the tar builder "
    "takes the ustar header's whole seconds and ignores the PAX 'mtime' record, so "
    "'nydus-image check -v' lists 'i_mtime_nsec 0' for an entry whose PAX mtime is "
    "1600000000.123456789"))
def test_upstream_tar_keeps_subsecond_mtimes(workdir: Path) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    os.utime(src / "f", ns=(1_600_000_000_123_456_789,) * 2)
    built = upstream_build(Build("v6-tar", ("-t", "tar-rafs"), "tar"), src, workdir / "img")
    view = check_view(built.boot, built.blob_dir, workdir=workdir)
    line = next(ln for ln in view.output.splitlines() if '"/f"' in ln)
    if view.inodes[b"/f"].mtime_nsec != 123_456_789:
        raise UpstreamBug(line)


FIFO_EVIDENCE = "numeric field was not a number:  when getting device_major for pipe"


@pytest.mark.xfail(raises=UpstreamBug, strict=True, reason=(
    "nydus-image 2.2 reads device numbers of a tar fifo entry and fails when the fields "
    "are empty, as Python's tarfile writes them (ustar defines devmajor/devminor for "
    "character and block devices only): 'failed to get device major from tar entry' / "
    "'numeric field was not a number:  when getting device_major for pipe'"))
def test_upstream_builds_fifo_without_device_numbers(workdir: Path, serve: ServeFn) -> None:
    layers = [[Ent("fifo", "pipe", mtime=T1), Ent("file", "f", data=b"f", mtime=T1)]]
    (tar,) = write_layers(layers, workdir / "tars", numeric_fifo_devs=False)
    work = workdir / "img"
    (work / "blobs").mkdir(parents=True)
    with upstream_bug(FIFO_EVIDENCE):
        nydus_image("create", "-t", "tar-rafs", "-B", work / "image.boot", "-D",
                    work / "blobs", tar)
    mnt = serve("pynydusd", work / "image.boot", work / "blobs")
    assert sorted(os.listdir(mnt)) == ["f", "pipe"]
