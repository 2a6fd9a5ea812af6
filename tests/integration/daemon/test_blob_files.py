"""``pynydusd --blob-files``: each blob a flat file, and the kernel's EROFS over them.

Contract: the mount lists one read-only file per blob, named by its id, of the blob's
uncompressed size, whose bytes are the blob's uncompressed address space (each chunk at
its uncompressed offset, zeros between); the image's bootstrap mounts as kernel EROFS
with those files as devices and shows the source tree byte for byte; only the chunks a
read needs are fetched (lazily, through the blob cache), once.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.host import erofs
from pynydus.rafs.read import open_bootstrap
from pynydus.rafs.read.blobfiles import BlobFiles
from tests.harness.registry import Registry

from .conftest import TARGET, Image, StartFn, localfs_config, push, registry_config
from .trees import compare_trees

REPO = "daemon/blobfiles"
MiB = 1 << 20


def _expected_blob(image: Image) -> bytes:
    """The blob's uncompressed address space, from the bootstrap and the blob."""
    bs = open_bootstrap(str(image.bootstrap))
    try:
        out = bytearray(image.result.blobs[-1].uncompressed_size)
        with BlobFiles(bs, str(image.blob_dir)) as files:
            for _path, ino in bs.walk():
                if stat.S_ISREG(bs.stat(ino).mode):
                    for c in bs.chunks(ino):
                        data = files.chunk_data(c)
                        out[c.uncompressed_offset:c.uncompressed_offset + len(data)] = data
        return bytes(out)
    finally:
        bs.close()


@pytest.fixture
def erofs_mount(workdir: Path) -> Iterator[Path]:
    mnt = workdir / "erofs"
    mnt.mkdir()
    try:
        yield mnt
    finally:
        erofs.umount_erofs(str(mnt))


def test_blob_file_is_the_uncompressed_address_space(full_image: Image, start_daemon: StartFn,
                                                     workdir: Path) -> None:
    d = start_daemon(bootstrap=full_image.bootstrap, extra_args=("--blob-files",),
                     config=localfs_config(full_image.blob_dir, workdir / "cache"))
    names = os.listdir(d.mountpoint)
    assert names == [full_image.blob_id]
    f = d.mountpoint / full_image.blob_id
    st = f.stat()
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o444
    assert st.st_size == full_image.result.blobs[-1].uncompressed_size
    want = _expected_blob(full_image)
    assert f.read_bytes() == want
    # reads at any offset and length, across chunk ends and the blob's end
    with open(f, "rb") as fh:
        for off, n in ((0, 1), (4095, 2), (st.st_size - 3, 10), (12345, 70000)):
            fh.seek(off)
            assert fh.read(n) == want[off:off + n]
    with pytest.raises(OSError):
        os.open(f, os.O_RDWR)


def test_kernel_erofs_over_blob_files_shows_the_tree(full_image: Image, start_daemon: StartFn,
                                                     workdir: Path, erofs_mount: Path) -> None:
    d = start_daemon(bootstrap=full_image.bootstrap, extra_args=("--blob-files",),
                     config=localfs_config(full_image.blob_dir, workdir / "cache"))
    erofs.mount_erofs(str(full_image.bootstrap), [str(d.mountpoint / full_image.blob_id)],
                      str(erofs_mount), "file", direct_io=True, read_ahead_kb=1024)
    assert compare_trees(full_image.src, erofs_mount) == []


@pytest.fixture(scope="module")
def big_registry(big_image: Image) -> Iterator[Registry]:
    with Registry() as reg:
        push(reg.host, big_image, REPO)
        yield reg


def test_erofs_reads_fetch_only_the_chunks_they_need_once(
        big_image: Image, big_registry: Registry, start_daemon: StartFn, workdir: Path,
        erofs_mount: Path) -> None:
    d = start_daemon(bootstrap=big_image.bootstrap, extra_args=("--blob-files",),
                     config=registry_config(big_registry.host, REPO, workdir / "cache"))
    erofs.mount_erofs(str(big_image.bootstrap), [str(d.mountpoint / big_image.blob_id)],
                      str(erofs_mount), "file", direct_io=True)
    assert len(list((erofs_mount / "data").iterdir())) == 190  # metadata: no fetch
    assert d.backend_metrics()["read_count"] == 0
    want = (big_image.src / TARGET).read_bytes()
    assert (erofs_mount / TARGET).read_bytes() == want
    m = d.backend_metrics()
    # that file's chunks, and at most the kernel's read-ahead window (128 KiB) beyond
    assert MiB <= m["read_amount_total"] <= 2 * MiB, m
    # again, through a new mount (no EROFS page cache): the blob cache serves it
    erofs.umount_erofs(str(erofs_mount))
    erofs.mount_erofs(str(big_image.bootstrap), [str(d.mountpoint / big_image.blob_id)],
                      str(erofs_mount), "file")
    assert (erofs_mount / TARGET).read_bytes() == want
    assert d.backend_metrics()["read_count"] == m["read_count"]
