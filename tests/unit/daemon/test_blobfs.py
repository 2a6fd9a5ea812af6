"""Blob files (``pynydusd --blob-files``) answer kernel requests, without a mount.

Contract: the root lists one regular read-only file per blob, named by its id, sized as
the blob's uncompressed address space; a read at any offset returns that space's bytes
(each chunk decompressed at its uncompressed offset, zeros between chunks), short only
at the end; opens are direct I/O and refuse writing; other nodes are not directories.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from pynydus.daemon import fuseproto as P
from pynydus.daemon.blobfs import READAHEAD, BlobFileServer
from pynydus.daemon.vfs import Vfs
from pynydus.rafs.builder import build
from tests.harness.rafs_instance import local_instance
from tests.unit.daemon.test_fuseops import Kernel

BIG = bytes(range(256)) * 4096 * 3  # 3 MiB: several chunks
SMALL = b"small file\n"


def _serve(tmp_path: Path, files: dict[str, bytes]):  # type: ignore[no-untyped-def]
    """An image of ``files`` (path -> bytes; lz4_block, 1 MiB chunks) served as blob
    files: (kernel, server, instance, build result)."""
    src = tmp_path / "src"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (tmp_path / "blobs").mkdir()
    res = build(str(src), str(tmp_path / "image.boot"), str(tmp_path / "blobs"),
                compressor="lz4_block", chunk_size=1 << 20)
    inst = local_instance(tmp_path / "image.boot", tmp_path / "blobs", tmp_path / "cache")
    vfs = Vfs()
    vfs.dedicated = inst
    server = BlobFileServer(vfs)
    kernel = Kernel(server)
    kernel.init()
    return kernel, server, inst, res


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    kernel, _server, inst, res = _serve(tmp_path, {"big": BIG, "small": SMALL, "empty": b""})
    yield kernel, inst, res
    inst.close()


def _address_space(inst, size: int) -> bytes:  # type: ignore[no-untyped-def]
    out = bytearray(size)
    for name, data in ((b"/big", BIG), (b"/small", SMALL)):
        for c in inst.bs.chunks(inst.bs.lookup_path(name)):
            piece = data[c.file_offset:c.file_offset + c.uncompressed_size]
            out[c.uncompressed_offset:c.uncompressed_offset + len(piece)] = piece
    return bytes(out)


def test_root_lists_one_file_per_blob(served) -> None:  # type: ignore[no-untyped-def]
    kernel, _inst, res = served
    blob = res.blobs[-1]
    assert [e[0] for e in kernel.listing(P.ROOT_ID, plus=False)] == [blob.blob_id.encode()]
    assert [e[0] for e in kernel.listing(P.ROOT_ID, plus=True)] == [blob.blob_id.encode()]
    node, _, attr = kernel.lookup(P.ROOT_ID, blob.blob_id.encode())
    assert node == attr.ino != P.ROOT_ID
    assert stat.S_ISREG(attr.mode) and attr.mode & 0o777 == 0o444
    assert attr.size == blob.uncompressed_size and attr.size % 4096 == 0
    assert kernel.send(P.LOOKUP, P.ROOT_ID, b"nope\0")[0] == errno.ENOENT
    assert kernel.send(P.LOOKUP, node, b"x\0")[0] == errno.ENOTDIR
    _, root = P.parse_attr(kernel.ok(P.GETATTR, P.ROOT_ID, b"\0" * 16))
    assert stat.S_ISDIR(root.mode)


def test_reads_are_the_uncompressed_address_space(served) -> None:  # type: ignore[no-untyped-def]
    kernel, inst, res = served
    blob = res.blobs[-1]
    node = kernel.lookup(P.ROOT_ID, blob.blob_id.encode())[0]
    fh, flags, _ = P.parse_open(kernel.ok(P.OPEN, node, struct.pack("<II", os.O_RDONLY, 0)))
    assert fh == node and flags & P.FOPEN_DIRECT_IO
    for flag in (os.O_WRONLY, os.O_RDWR):
        assert kernel.send(P.OPEN, node, struct.pack("<II", flag, 0))[0] == errno.EROFS
    size = blob.uncompressed_size
    want = _address_space(inst, size)
    got = b"".join(kernel.read(node, off, 1 << 20) for off in range(0, size, 1 << 20))
    assert got == want
    for off, n in ((1, 10), ((1 << 20) - 5, 10), (size - 7, 4096), (3 << 20, 4096)):
        assert kernel.read(node, off, n) == want[off:off + n]
    assert kernel.read(node, size, 4096) == b""


def test_sequential_reads_taken_out_of_order_start_the_read_ahead(tmp_path: Path) -> None:
    """EROFS keeps several 1 MiB reads of a blob file in flight and the FUSE threads take
    them in any order: a run read that way still counts as sequential, and once it is
    READAHEAD_AFTER long the chunks after it are fetched into the cache; a small read
    elsewhere starts no read-ahead."""
    mib = 1 << 20
    kernel, server, inst, res = _serve(tmp_path, {"big": os.urandom(24 * mib)})
    try:
        node = kernel.lookup(P.ROOT_ID, res.blobs[-1].blob_id.encode())[0]
        cache = inst.cache(0)
        by_offset = {c.uncompressed_offset // mib: c.index
                     for c in inst.bs.chunks(inst.bs.lookup_path(b"/big"))}
        kernel.read(node, 20 * mib, 4096)  # a small read alone: no read-ahead
        for mb in (1, 0, 3, 2, 5, 4, 6):  # pairs swapped, as the threads take them
            kernel.read(node, mb * mib, mib)
        server._ra_pool.shutdown(wait=True)
        ready = {mb for mb, index in by_offset.items() if cache.chunk_map.is_ready(index)}
        assert {0, 1, 2, 3, 4, 5, 6, 20} <= ready
        # read ahead: READAHEAD from where the run passed READAHEAD_AFTER, at least half
        # of it still ahead of the last read
        assert set(range(7, 7 + READAHEAD // mib // 2)) <= ready
        # the small read's miss inside a large file brought nothing more (the FUSE tree
        # amplifies only small files' misses), and no read-ahead window
        assert not {21, 22, 23} & ready
    finally:
        inst.close()


def _two_files(tmp_path: Path, first: dict[str, int], then: dict[str, int]):  # type: ignore[no-untyped-def]
    """An image whose blob holds ``first``'s files, then ``then``'s (name -> size, random
    data) served as blob files: (kernel, server, instance, the blob file's node, each
    file's chunks by name)."""
    files = {f"{d}/{n}": os.urandom(size)
             for d, group in (("a", first), ("b", then)) for n, size in group.items()}
    kernel, server, inst, res = _serve(tmp_path, files)
    node = kernel.lookup(P.ROOT_ID, res.blobs[-1].blob_id.encode())[0]
    chunks = {name: inst.bs.chunks(inst.bs.lookup_path(f"/{name}".encode())) for name in files}
    return kernel, server, inst, node, chunks


def test_read_ahead_in_a_large_file_stops_at_its_end(tmp_path: Path) -> None:
    """A sequential run inside one large file (a library the start-up maps and reads
    around) reads ahead to that file's end, not into the next file's chunks, as the FUSE
    tree's read-ahead of a file does."""
    mib = 1 << 20
    kernel, server, inst, node, chunks = _two_files(tmp_path, {"lib": 12 * mib},
                                                    {"next": 8 * mib})
    try:
        lib, nxt = chunks["a/lib"], chunks["b/next"]
        assert lib[-1].uncompressed_offset < nxt[0].uncompressed_offset  # blob order
        base = lib[0].uncompressed_offset
        for mb in (1, 0, 3, 2, 5, 4, 7, 6, 9, 8):  # 10 MiB of lib, pairs out of order
            kernel.read(node, base + mb * mib, mib)
        server._ra_pool.shutdown(wait=True)
        # read ahead from 4 MiB to 12 MiB, lib's end; at 10 MiB the run would have read
        # ahead again, to 20 MiB: lib's chunks were fetched, each once, and none of the
        # file after it
        fetched = inst.cache_stats.backend_bytes
        assert fetched == sum(c.compressed_size for c in lib)
        cache = inst.cache(0)
        assert not [c.index for c in nxt if cache.chunk_map.is_ready(c.index)]
    finally:
        inst.close()


def test_a_small_files_miss_brings_the_next_files_a_large_files_does_not(
        tmp_path: Path) -> None:
    """A miss in a small file's data fetches the blob's next chunks too (the files EROFS
    reads next lie there); a miss in a large file's data fetches only what was asked
    (the kernel's read-ahead asks for the rest of the file)."""
    mib = 1 << 20
    small = {f"s{i:02}": 3000 for i in range(8)}
    kernel, _server, inst, node, chunks = _two_files(tmp_path, small, {"big": 4 * mib})
    try:
        stats = inst.cache_stats
        first = chunks["a/s00"][0]
        kernel.read(node, first.uncompressed_offset, 4096)
        assert stats.backend_bytes > first.compressed_size  # its neighbours came too
        big = chunks["b/big"]
        before = stats.backend_bytes
        kernel.read(node, big[1].uncompressed_offset, 4096)
        assert stats.backend_bytes - before == big[1].compressed_size
    finally:
        inst.close()


def test_an_images_other_blob_layouts_are_decoded_after_its_first_read(
        tmp_path: Path) -> None:
    """The mount decodes no layout (its lookups must not wait for that CPU); the first
    read of one of an image's blob files decodes that blob's, and the other blobs' are
    decoded in the background right after, before their own first reads."""
    mib = 1 << 20
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(mib))
    build(str(src), str(tmp_path / "lower.boot"), str(tmp_path / "blobs"),
          compressor="lz4_block", chunk_size=mib)
    (src / "g").write_bytes(os.urandom(mib))
    build(str(src), str(tmp_path / "image.boot"), str(tmp_path / "blobs"),
          compressor="lz4_block", chunk_size=mib, parent_bootstrap=str(tmp_path / "lower.boot"))
    inst = local_instance(tmp_path / "image.boot", tmp_path / "blobs", tmp_path / "cache")
    try:
        vfs = Vfs()
        vfs.dedicated = inst
        server = BlobFileServer(vfs)
        kernel = Kernel(server)
        kernel.init()
        assert len(inst.bs.blobs) == 2
        jobs: list[str] = []
        submit = server._ra_pool.submit

        def spy(fn, *args):  # type: ignore[no-untyped-def]
            jobs.append(fn.__name__)
            return submit(fn, *args)

        server._ra_pool.submit = spy  # type: ignore[method-assign]
        node = kernel.lookup(P.ROOT_ID, inst.bs.blobs[0].blob_id.encode())[0]
        assert not jobs and not inst.bs._blob_layouts
        kernel.read(node, 0, 4096)
        server._ra_pool.shutdown(wait=True)
        assert jobs == ["_prepare"]
        assert set(inst.bs._blob_layouts) == {0, 1}
    finally:
        inst.close()
