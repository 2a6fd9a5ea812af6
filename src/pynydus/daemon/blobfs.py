"""Blob files: each blob of the served images as one flat read-only file on a FUSE mount.

The kernel's EROFS can then mount an image's RAFS v6 bootstrap itself, with these files
as its devices (file-backed mounts, ``device=<mount>/<blob id>``): the kernel does the
metadata, the directory walks and the page cache, and the daemon only moves blob ranges.
This is the shape upstream gets from fscache (``/dev/cachefiles``), with FUSE as the
fetcher.

A blob file is the blob's *uncompressed* address space, ``uncompressed_size`` bytes: the
bytes of chunk i at its uncompressed offset, zeros between chunks (the bootstrap's EROFS
chunk indexes address blocks of that space: ``blkaddr = uncompressed_offset / block
size``, which our v6 builder keeps block-aligned). A read maps its range to the chunks of
the bootstrap's chunk table by uncompressed offset and reads them through the image's
blob cache, which fetches, decompresses and keeps what is missing, as for a FUSE read of
a file. Blobs whose chunks live in spans (ZRAN, batch) have no such address space and
are not listed.

The blob does not say where files end, but its chunk table does where they begin (the
records at file offset 0, upstream's builder's as ours), and with it reads follow the
FUSE tree's rules per file: a miss in a small file's data brings the next chunks too, a
sequential run inside one large file reads ahead to that file's end and no
further (a start-up that maps a large library fetched the chunks of whatever followed it:
8.33 MB against the FUSE tree's 5.74 MB for a python start).

Files are opened with ``FOPEN_DIRECT_IO``: the EROFS pages are the one page cache of the
data (a FUSE page cache under them would be a second copy). The root directory lists one
file per distinct blob id of the images in the ``Vfs`` (a blob shared by two images is
one file, read through the first image that has it).
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pynydus.daemon import fuseproto as P
from pynydus.daemon.blobcache import ChunkRef
from pynydus.daemon.fuseops import FOREVER, FuseError, RafsServer, Reply
from pynydus.daemon.instance import RafsInstance
from pynydus.daemon.vfs import ROOT_ID, Vfs
from pynydus.rafs.read import BootstrapV6, has_spans

__all__ = ["BlobFileServer", "BlobIndex"]

log = logging.getLogger(__name__)

_DT_REG = 8
# Sequential read-ahead of a blob file (the FUSE tree's per-file window: 8 x 1 MiB)
READAHEAD = 8 << 20
# ... once a run of sequential reads is this long (one small file's read fetches no more)
READAHEAD_AFTER = 4 << 20
# a read this far past the run's furthest end still continues it (requests in flight
# arrive out of order)
RUN_SLACK = 2 << 20


@dataclass(frozen=True)
class _File:
    name: bytes
    node: int
    inst: RafsInstance
    blob_index: int
    size: int


class BlobIndex:
    """The chunks of one blob of a bootstrap, sorted by uncompressed offset, and where
    files begin in it (the reader's ``BootstrapV6.blob_layout``; one chunk named twice,
    deduplicated within the blob, counts once)."""

    def __init__(self, inst: RafsInstance, blob_index: int) -> None:
        self.inst = inst
        self.blob_index = blob_index
        assert isinstance(inst.bs, BootstrapV6)
        self.starts, self.sizes, self.indexes, self.file_starts = inst.bs.blob_layout(blob_index)
        self.size = inst.bs.blobs[blob_index].uncompressed_size

    def file_span(self, pos: int) -> tuple[int, int] | None:
        """``[start, end)`` of the file data that holds blob offset ``pos``: from the
        last file start at or before it to the next (a file's chunks and the padding to
        the next file's block), None before the first start."""
        fs = self.file_starts
        i = bisect.bisect_right(fs, pos)
        if i == 0:
            return None
        return fs[i - 1], fs[i] if i < len(fs) else self.size

    def one_file(self, lo: int, hi: int) -> bool:
        """No file begins inside ``(lo, hi)``: the range is one file's data."""
        fs = self.file_starts
        i = bisect.bisect_right(fs, lo)
        return i == len(fs) or fs[i] >= hi

    def pieces(self, offset: int, end: int) -> list[tuple[int, int, int, int]]:
        """(position in the range, chunk index, offset in chunk, length) of every chunk
        piece inside ``[offset, end)``, in order; what no chunk covers reads as zeros."""
        starts, sizes = self.starts, self.sizes
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0 or starts[i] + sizes[i] <= offset:
            i += 1
        out = []
        n = len(starts)
        while i < n and starts[i] < end:
            lo = max(offset, starts[i])
            hi = min(end, starts[i] + sizes[i])
            out.append((lo - offset, self.indexes[i], lo - starts[i], hi - lo))
            i += 1
        return out


class BlobFileServer(RafsServer):
    """Answers FUSE requests for the blob files of the images of a ``Vfs``. Thread-safe."""

    def __init__(self, vfs: Vfs, **kw: object) -> None:
        super().__init__(vfs, **kw)  # type: ignore[arg-type]
        self._files: dict[bytes, _File] = {}
        self._by_node: dict[int, _File] = {}
        self._indexes: dict[tuple[int, int], BlobIndex] = {}
        self._seen: tuple[int, ...] = ()
        self._lock = threading.Lock()
        # Sequential read-ahead per blob file, as the FUSE tree has per file: node ->
        # (next expected offset, fetched-or-queued up to, where the run began); the chunks
        # go to the cache
        self._ra: dict[int, tuple[int, int, int]] = {}  # ... and where the run began
        self._ra_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="blob-readahead")

    # --- the directory of blob files ---------------------------------------------------------

    def _table(self) -> dict[bytes, _File]:
        """Blob files by name, brought up to date with the Vfs's images."""
        insts = self.vfs.instances()
        key = tuple(id(i) for i in insts)
        with self._lock:
            if key == self._seen:
                return self._files
            files: dict[bytes, _File] = {}
            old = {f.name: f.node for f in self._by_node.values()}
            next_node = max(self._by_node, default=ROOT_ID) + 1
            for inst in insts:
                if not isinstance(inst.bs, BootstrapV6):
                    continue  # RAFS v5 has no EROFS form
                for bi, blob in enumerate(inst.bs.blobs):
                    name = blob.blob_id.encode()
                    if name in files or has_spans(blob):
                        continue
                    node = old.get(name)
                    if node is None:
                        node, next_node = next_node, next_node + 1
                    files[name] = _File(name, node, inst, bi, blob.uncompressed_size)
            self._files = files
            # node ids stay with their names; a blob that went away keeps its id reserved
            self._by_node = {**self._by_node, **{f.node: f for f in files.values()}}
            self._seen = key
            return files

    def _prepare(self, inst: RafsInstance) -> None:
        """Decode the layouts of ``inst``'s other blobs (0.05-0.1 s of CPU for one of
        50,000 chunks) after the first read of one of them, before their own first reads:
        a container reads its lower layers' blobs first. Not at the kernel's mount: the
        CPU it takes there delayed the mount's own requests (a container's Prepare
        waited 0.1-0.27 s for its image's mount at load 8)."""
        assert isinstance(inst.bs, BootstrapV6)
        try:
            for i in range(len(inst.bs.blobs)):
                inst.bs.blob_layout(i)
        except Exception as err:  # noqa: BLE001 - the first read decodes it and reports
            log.debug("blob layouts of %s not prepared: %s", inst.bootstrap_path, err)

    def _file(self, node: int) -> _File:
        f = self._by_node.get(node)
        if f is None or self._table().get(f.name) is not f:
            raise FuseError(errno.ENOENT if f is None else errno.ESTALE)
        return f

    def _index(self, f: _File) -> BlobIndex:
        key = (id(f.inst), f.blob_index)
        idx = self._indexes.get(key)
        if idx is None or idx.inst is not f.inst:
            idx = BlobIndex(f.inst, f.blob_index)
            with self._lock:
                first = not any(i.inst is f.inst for i in self._indexes.values())
                self._indexes[key] = idx
            if first:  # the image's first blob read: its other blobs' layouts next
                self._ra_pool.submit(self._prepare, f.inst)
        return idx

    def _attr(self, f: _File) -> P.Attr:
        return P.Attr(ino=f.node, mode=stat.S_IFREG | 0o444, size=f.size,
                      blocks=(f.size + 511) // 512, uid=0, gid=0, time_ns=self.start_ns)

    def _root_attr(self) -> P.Attr:
        return P.Attr(ino=ROOT_ID, mode=stat.S_IFDIR | 0o755, nlink=2, time_ns=self.start_ns)

    # --- operations ---------------------------------------------------------------------------

    def _lookup(self, req: P.Request) -> Reply:
        if req.nodeid != ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        name: bytes = req.arg
        if name in (b".", b".."):
            return [P.reply(req.unique, P.entry_body(ROOT_ID, self._root_attr(), 0, 0))]
        f = self._table().get(name)
        if f is None:
            raise FuseError(errno.ENOENT)  # not cached: an image may come later
        return [P.reply(req.unique, P.entry_body(f.node, self._attr(f), FOREVER, FOREVER))]

    def _getattr(self, req: P.Request) -> Reply:
        if req.nodeid == ROOT_ID:
            return [P.reply(req.unique, P.attr_body(self._root_attr(), 0))]
        return [P.reply(req.unique, P.attr_body(self._attr(self._file(req.nodeid)), FOREVER))]

    def _open(self, req: P.Request) -> Reply:
        if req.arg & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FuseError(errno.EROFS)
        if req.nodeid == ROOT_ID:
            raise FuseError(errno.EISDIR)
        self._file(req.nodeid)
        return [P.reply(req.unique, P.open_body(req.nodeid, P.FOPEN_DIRECT_IO | P.FOPEN_NOFLUSH))]

    def _opendir(self, req: P.Request) -> Reply:
        if req.nodeid != ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        return [P.reply(req.unique, P.open_body(req.nodeid, 0))]

    def _release(self, req: P.Request) -> Reply:
        return [P.reply(req.unique)]

    def _readdir(self, req: P.Request) -> Reply:
        if req.nodeid != ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        arg: P.ReadIn = req.arg
        plus = req.opcode == P.READDIRPLUS
        files = sorted(self._table().values(), key=lambda f: f.name)
        out = bytearray()
        for i in range(arg.offset, len(files)):
            f = files[i]
            if len(out) + P.dirent_size(f.name, plus) > arg.size:
                break
            if plus:
                entry = P.entry_body(f.node, self._attr(f), FOREVER, FOREVER)
                out += P.pack_direntplus(entry, f.node, i + 1, _DT_REG, f.name)
            else:
                out += P.pack_dirent(f.node, i + 1, _DT_REG, f.name)
        return [P.reply(req.unique, bytes(out))]

    def _read(self, req: P.Request) -> Reply:
        arg: P.ReadIn = req.arg
        f = self._file(req.nodeid)
        end = min(arg.offset + arg.size, f.size)
        if end <= arg.offset:
            return [P.header(req.unique, 0)]
        data = self.read_blob(f, arg.offset, end, req.unique)
        return [P.header(req.unique, len(data)), data]

    def _refs(self, f: _File, pieces: list[tuple[int, int, int, int]]
              ) -> list[tuple[ChunkRef, int, int]]:
        """The cache's references of ``pieces`` of blob file ``f``, with their spans."""
        inst, bi = f.inst, f.blob_index
        refs = []
        for _pos, index, inner, length in pieces:
            rec = inst.bs.chunk_record(bi, index)
            if rec is None:
                raise FuseError(errno.EIO)
            refs.append((ChunkRef.of_record(rec), inner, length))
        return refs

    def _readahead(self, f: _File, offset: int, end: int) -> None:
        """After a long sequential run of reads (a large file read through, not a small
        one: the blob does not say where files end), fetch the next ``READAHEAD`` bytes.

        EROFS reads a blob file with several asynchronous requests in flight (its
        read-ahead window in 1 MiB pieces), which our threads take in any order: a read
        continues the run if it starts between the run's start and a little past the
        furthest end read so far, not only exactly where the last one ended."""
        idx = self._index(f)
        with self._lock:
            frontier, scheduled, run = self._ra.get(f.node, (-1, 0, offset))
            if not run <= offset <= frontier + RUN_SLACK:
                run, frontier = offset, end  # a new run starts here
            frontier = max(frontier, end)
            self._ra[f.node] = (frontier, scheduled, run)
            if frontier - run < READAHEAD_AFTER or scheduled >= frontier + READAHEAD // 2:
                return
            start = max(scheduled, frontier)
            stop = min(start + READAHEAD, f.size)
            if idx.one_file(run, frontier):
                # a run inside one file reads ahead to that file's end only, as the FUSE
                # tree's read-ahead of a file does: past it lie other files' chunks, which
                # a start-up mapping one large library does not read (a run across files,
                # small ones read in the blob's order, goes on into the next ones)
                span = idx.file_span(run)
                if span is not None:
                    stop = min(stop, span[1])
            if stop <= start:
                return
            self._ra[f.node] = (frontier, stop, run)
        self._ra_pool.submit(self._fetch_ahead, f, start, stop)

    def _fetch_ahead(self, f: _File, start: int, stop: int) -> None:
        try:
            refs = [r for r, _, _ in self._refs(f, self._index(f).pieces(start, stop))]
            if refs:
                cache = f.inst.cache(f.blob_index)
                cache.ensure(refs, amplify=False, max_request=stop - start)
                cache.will_need(refs)  # and from the cache file into the page cache
        except Exception as err:  # noqa: BLE001 - a hint; the read itself reports
            log.debug("read-ahead of blob %s at %d failed: %s", f.name, start, err)

    def read_blob(self, f: _File, offset: int, end: int, unique: int = 0) -> bytearray:
        """Bytes ``[offset, end)`` of blob file ``f`` (end inside the blob)."""
        out = bytearray(end - offset)
        pieces = self._index(f).pieces(offset, end)
        self._readahead(f, offset, end)
        if not pieces:
            return out
        inst = f.inst
        cache = inst.cache(f.blob_index)
        refs = self._refs(f, pieces)
        # our own session's worker may block on the cache file's disk (as the FUSE tree's
        # reads do): only a miss waits for the backend
        data = cache.read_cached(refs, nowait=False)
        if data is None:
            self.inflight[unique] = (f.node, "read", 0.0)
            try:
                # a miss in a small file's data brings the blob's next chunks too, as a
                # FUSE tree read of a small file does (the cache's adaptive window): the
                # files EROFS reads next lie there, and one small file at a time was a
                # request each (4.5x the FUSE tree's requests); a large file's miss does
                # not (the kernel's read-ahead asks for the rest of the file, and what
                # follows it in the blob is another file)
                span = self._index(f).file_span(offset)
                data = cache.read(refs, amplify=span is None
                                  or span[1] - span[0] < inst.amplify_below)
            finally:
                self.inflight.pop(unique, None)
        # the pieces' bytes back to back; put each at its place in the range
        pos = 0
        for at, _index, _inner, length in pieces:
            out[at:at + length] = data[pos:pos + length]
            pos += length
        inst.fs_stats.record("read", size=len(out))
        return out

    def _listxattr(self, req: P.Request) -> Reply:
        size: int = req.arg
        return [P.reply(req.unique, P.xattr_size_body(0) if size == 0 else b"")]

    def _getxattr(self, req: P.Request) -> Reply:
        raise FuseError(errno.ENODATA)

    def _readlink(self, req: P.Request) -> Reply:
        raise FuseError(errno.EINVAL)

    def _statfs(self, req: P.Request) -> Reply:
        return [P.reply(req.unique, P.statfs_body(files=len(self._table())))]
