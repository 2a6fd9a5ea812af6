"""Block images of tarfs bootstraps: one file the kernel mounts as EROFS on its own.

A tarfs bootstrap addresses file data in its blobs (the layer tars) through the device
table; each device slot also carries ``mapped_blkaddr``, where that blob would sit in
one flat address space. Laying the bootstrap at block 0 and every tar at its mapped
address gives an image EROFS mounts with no ``device=`` option (it then reads each
device's blocks from the primary at the mapped address: "flatdev"). That is upstream's
``nydus-image export --block``: ``<blob>.layer.disk`` for one layer's bootstrap and tar,
``<top blob>.image.disk`` for an image's merged bootstrap and all its tars.

With verity the dm-verity hash tree (:mod:`.verity`) follows the data, 4 KiB aligned,
and the geometry and root hash go into the ``nydus-layer-block`` /
``nydus-image-block`` label as ``<data blocks>,<hash offset>,sha256:<root>``.

:func:`plan` is pure (bootstrap facts in, extents out); :func:`export` does the I/O:
extents are copied with ``copy_file_range`` when no tree is wanted, read and hashed
block by block when it is. Holes stay sparse.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pynydus.errors import FormatError, InvalidArgument, NotFound
from pynydus.rafs.format import SuperFlags
from pynydus.rafs.read import open_bootstrap
from pynydus.tarfs.verity import TreeBuilder, geometry

__all__ = ["BlockImage", "Extent", "export", "plan"]

_META_ALIGN = 4096  # upstream counts the bootstrap in 4 KiB blocks
_COPY = 1 << 20


@dataclass(frozen=True)
class Extent:
    """``length`` bytes of file ``source`` (from its start) at byte ``offset`` of the image."""

    offset: int
    source: str
    length: int


@dataclass(frozen=True)
class BlockImage:
    """An image to write: its extents in order, its size in ``block_size`` blocks."""

    block_size: int
    blocks: int
    extents: tuple[Extent, ...]

    @property
    def size(self) -> int:
        return self.blocks * self.block_size


@dataclass(frozen=True)
class ExportResult:
    path: str
    size: int  # bytes of the file, tree included
    data_blocks: int
    block_info: str  # the label value: "" without verity


def plan(bootstrap: str, block_size: int, bootstrap_size: int,
         devices: list[tuple[str, int, int]], blob_paths: Mapping[str, str]) -> BlockImage:
    """Lay out ``bootstrap`` (``bootstrap_size`` bytes) and its devices
    (``(blob id, blocks, mapped_blkaddr)`` in table order) in one address space.

    FormatError when a device has no mapped address or overlaps what is before it (the
    bootstrap cannot be exported); NotFound when ``blob_paths`` lacks a blob.
    """
    meta = -(-bootstrap_size // _META_ALIGN) * _META_ALIGN
    extents = [Extent(0, bootstrap, bootstrap_size)]
    end = meta
    for blob_id, blocks, mapped in devices:
        if not mapped:
            raise FormatError(f"block export of {bootstrap}: blob {blob_id} has no mapped "
                              "block address")
        start = mapped * block_size
        if start < end:
            raise FormatError(f"block export of {bootstrap}: blob {blob_id} at block {mapped} "
                              f"overlaps the data before it (ends at byte {end})")
        path = blob_paths.get(blob_id)
        if path is None:
            raise NotFound(f"block export of {bootstrap}: no file for blob {blob_id}")
        extents.append(Extent(start, path, blocks * block_size))
        end = start + blocks * block_size
    return BlockImage(block_size, end // block_size, tuple(extents))


def plan_bootstrap(bootstrap: str, blob_paths: Mapping[str, str]) -> BlockImage:
    """:func:`plan` for a tarfs bootstrap file, reading its superblock and device table.
    InvalidArgument for a bootstrap that is not RAFS v6 tarfs."""
    with open_bootstrap(bootstrap) as bs:
        if bs.version != 6:
            raise InvalidArgument(f"block export of {bootstrap}: RAFS v{bs.version}, want v6")
        if not bs.flags & int(SuperFlags.TARTFS_MODE):
            raise InvalidArgument(f"block export of {bootstrap}: not a tarfs image (its blobs "
                                  "are not the uncompressed data the kernel could read)")
        devices = [(b.blob_id, b.blocks, b.mapped_blkaddr) for b in bs.blobs]
        block_size = bs.block_size
    return plan(bootstrap, block_size, os.path.getsize(bootstrap), devices, blob_paths)


def export(image: BlockImage, out: str, *, verity: bool,
           cancelled: Callable[[], bool] = lambda: False) -> ExportResult:
    """Write ``image`` to ``out`` (through ``out.tmp``, renamed when complete and synced).

    With ``verity`` the hash tree follows the data and the result carries the block info
    label. A source shorter than its extent is a FormatError; ``cancelled`` is polled
    between pieces (InvalidArgument when it says stop). Nothing is left at ``out`` on error.
    """
    tmp = out + ".tmp"
    geom = geometry(image.blocks, image.block_size) if verity else None
    size = geom.end if geom is not None else image.size
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        tree = TreeBuilder(geom, lambda off, block: _pwrite_all(fd, block, off)) if geom else None
        pos = 0
        for ext in image.extents:
            if tree is not None:
                tree.feed_zeros((ext.offset - pos) // image.block_size)
            _copy_extent(fd, ext, image.block_size, tree, cancelled)
            pos = ext.offset + -(-ext.length // image.block_size) * image.block_size
        block_info = ""
        if tree is not None and geom is not None:
            tree.feed_zeros(image.blocks - pos // image.block_size)
            block_info = geom.block_info(tree.finish())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)
    os.replace(tmp, out)
    return ExportResult(out, size, image.blocks, block_info)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_extent(fd: int, ext: Extent, block_size: int, tree: TreeBuilder | None,
                 cancelled: Callable[[], bool]) -> None:
    src = os.open(ext.source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(src).st_size < ext.length:
            raise FormatError(f"block export: {ext.source} is shorter than the "
                              f"{ext.length} bytes its bootstrap maps")
        done = 0
        while done < ext.length:
            if cancelled():
                raise InvalidArgument(f"block export: cancelled while copying {ext.source}")
            want = min(_COPY, ext.length - done)
            if tree is None:
                n = os.copy_file_range(src, fd, want, done, ext.offset + done)
                if n <= 0:
                    raise FormatError(f"block export: {ext.source} ended at byte {done}")
                done += n
                continue
            piece = os.pread(src, want, done)
            if len(piece) != want:
                raise FormatError(f"block export: {ext.source} ended at byte {done + len(piece)}")
            _pwrite_all(fd, piece, ext.offset + done)
            tail = len(piece) % block_size
            if tail:  # the last piece of an extent that ends inside a block
                piece += bytes(block_size - tail)
            tree.feed(piece)
            done += want
    finally:
        os.close(src)
