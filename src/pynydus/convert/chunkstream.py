"""File digests of a Nydus image computed while its blobs stream past once, in order.

``check-image`` must hash every regular file of the image. Reading each file with its
own ranged GET costs one registry round trip per file (50,000 for a many-small-files
image, ~7 ms each on loopback); here every chunk the files use is read once, blob by
blob in offset order, in windows of up to :data:`MAX_WINDOW` bytes, and handed to the
files that use it as it arrives.

Sans-I/O core: :func:`plan_windows` turns the chunks' extents into ranges to fetch,
:class:`FileDigests` takes decoded chunk data in blob order and hashes each file in
file order. A chunk that arrives before the file needs it (a file whose chunks are
not in blob order, or a chunk shared by several files at different positions) waits
in memory; past :data:`MAX_WAITING` bytes of such chunks, the file that holds the most
gives them up and is read file by file afterwards (``deferred``). :func:`stream_digests`
is the I/O adapter: it fetches the windows (the next ones while the current is being
decoded), decodes and verifies every chunk against its digest, and feeds the core.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pynydus.errors import FormatError
from pynydus.rafs.format import Digester, decode_chunk
from pynydus.rafs.read import FileChunk

__all__ = ["FileDigests", "Window", "file_digest", "plan_windows", "stream_digests"]

#: Largest range fetched in one request (a window is held in memory while decoded).
MAX_WINDOW = 32 << 20
#: Unused bytes between two needed chunks that are fetched rather than splitting the
#: window (one more request costs more than a megabyte on any network).
MAX_GAP = 1 << 20
#: Decoded chunks kept for files that are not ready for them yet.
MAX_WAITING = 256 << 20
#: Windows fetched ahead of the one being decoded.
AHEAD = 2

ExtentKey = tuple[str, int, int]  # (blob id, compressed offset, compressed size)


def extent_of(c: FileChunk) -> ExtentKey:
    if c.compressed_offset is None or c.compressed_size is None:
        raise FormatError(f"chunk {c.index} of blob {c.blob_id}: no chunk record in the "
                          "bootstrap")
    return (c.blob_id, c.compressed_offset, c.compressed_size)


@dataclass(frozen=True)
class Window:
    """One range of one blob to fetch, and the chunks inside it (offset order)."""

    blob_id: str
    start: int
    end: int
    chunks: tuple[FileChunk, ...]


def plan_windows(chunks: Iterable[FileChunk], *, max_window: int = MAX_WINDOW,
                 max_gap: int = MAX_GAP) -> list[Window]:
    """Ranges covering every distinct extent of ``chunks``: blob by blob (in order of
    first appearance), offsets ascending; a window ends at ``max_window`` bytes or at a
    gap wider than ``max_gap``. A chunk larger than ``max_window`` gets a window alone."""
    by_blob: dict[str, dict[int, FileChunk]] = {}
    for c in chunks:
        blob, off, size = extent_of(c)
        seen = by_blob.setdefault(blob, {})
        prev = seen.get(off)
        if prev is None:
            seen[off] = c
        elif prev.compressed_size != size:
            raise FormatError(f"blob {blob}: two chunk records at offset {off} with sizes "
                              f"{prev.compressed_size} and {size}")
    out: list[Window] = []
    for blob, extents in by_blob.items():
        group: list[FileChunk] = []
        start = end = 0
        for off in sorted(extents):
            c = extents[off]
            size = c.compressed_size or 0
            if group and (off - end > max_gap or off + size - start > max_window):
                out.append(Window(blob, start, end, tuple(group)))
                group = []
            if not group:
                start = off
            group.append(c)
            end = max(end, off + size)
        if group:
            out.append(Window(blob, start, end, tuple(group)))
    return out


@dataclass(slots=True)
class _File:
    size: int
    extents: list[ExtentKey]  # in file order
    hasher: Any = field(default_factory=hashlib.sha256)
    next: int = 0  # index into extents of the chunk the hasher wants next
    got: int = 0
    waiting: dict[int, bytes] = field(default_factory=dict)
    waiting_bytes: int = 0
    deferred: bool = False


class FileDigests:
    """sha256 of each file's content from chunk data delivered in any order.

    ``add(key, chunks, size)`` registers a file (chunks in file order, covering it
    without gaps: FormatError otherwise); ``feed(chunk, data)`` delivers a chunk's
    uncompressed bytes once; ``digests()`` returns ``{key: hexdigest}`` of every file
    that is complete and ``deferred()`` the keys of files that gave up their waiting
    chunks (memory bound) and must be read on their own.
    """

    def __init__(self, max_waiting: int = MAX_WAITING) -> None:
        self.max_waiting = max_waiting
        self._files: dict[int, _File] = {}
        self._users: dict[ExtentKey, list[tuple[_File, int]]] = {}
        self._waiting = 0

    def add(self, key: int, chunks: list[FileChunk], size: int) -> None:
        pos = 0
        for c in chunks:
            if c.file_offset != pos:
                raise FormatError(f"file of {size} bytes: chunk {c.index} of blob {c.blob_id} "
                                  f"at file offset {c.file_offset}, expected {pos}")
            pos += c.uncompressed_size
        if pos != size:
            raise FormatError(f"file data: chunks cover {pos} bytes, inode size {size}")
        f = _File(size, [extent_of(c) for c in chunks])
        self._files[key] = f
        for i, ext in enumerate(f.extents):
            self._users.setdefault(ext, []).append((f, i))

    def chunks_needed(self) -> int:
        return len(self._users)

    def feed(self, c: FileChunk, data: bytes) -> None:
        for f, i in self._users.pop(extent_of(c), ()):
            if f.deferred:
                continue
            if i == f.next:
                self._take(f, data)
            else:
                f.waiting[i] = data
                f.waiting_bytes += len(data)
                self._waiting += len(data)
        while self._waiting > self.max_waiting:
            worst = max(self._files.values(), key=lambda f: f.waiting_bytes)
            self._waiting -= worst.waiting_bytes
            worst.waiting.clear()
            worst.waiting_bytes = 0
            worst.deferred = True

    def _take(self, f: _File, data: bytes) -> None:
        while True:
            f.hasher.update(data)
            f.got += len(data)
            f.next += 1
            nxt = f.waiting.pop(f.next, None)
            if nxt is None:
                return
            f.waiting_bytes -= len(nxt)
            self._waiting -= len(nxt)
            data = nxt

    def digests(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for key, f in self._files.items():
            if f.deferred:
                continue
            if f.next != len(f.extents):
                raise FormatError(f"file data: {len(f.extents) - f.next} chunks never arrived")
            out[key] = f.hasher.hexdigest()
        return out

    def deferred(self) -> list[int]:
        return [k for k, f in self._files.items() if f.deferred]


Fetch = Callable[[str, int, int], bytes]  # (blob id, offset, length) -> exactly length bytes


def _decoded(windows: list[Window], fetch: Fetch, digester: Callable[[FileChunk], Digester],
             ahead: int) -> Iterator[tuple[FileChunk, bytes]]:
    """Every chunk of ``windows`` decoded and checked against its digest, in window
    order; the next ``ahead`` windows are fetched on threads meanwhile."""
    if not windows:
        return
    with ThreadPoolExecutor(max(1, ahead), thread_name_prefix="chunkstream") as pool:
        pending: list[Future[bytes]] = []
        submitted = 0

        def top_up() -> None:
            nonlocal submitted
            while submitted < len(windows) and len(pending) <= ahead:
                w = windows[submitted]
                pending.append(pool.submit(fetch, w.blob_id, w.start, w.end - w.start))
                submitted += 1

        top_up()
        for w in windows:
            data = memoryview(pending.pop(0).result())
            top_up()
            for c in w.chunks:
                off = (c.compressed_offset or 0) - w.start
                raw = data[off:off + (c.compressed_size or 0)]
                yield c, decode_chunk(
                    raw, compressed=bool(c.compressed), compressor=c.compressor,
                    uncompressed_size=c.uncompressed_size, expected_digest=c.digest or b"",
                    digester=digester(c),
                    what=f"chunk {c.index} of blob {c.blob_id} at offset {c.compressed_offset}")


@dataclass
class StreamStats:
    windows: int = 0
    chunks: int = 0
    bytes_fetched: int = 0


def stream_digests(files: FileDigests, chunks: Iterable[FileChunk], fetch: Fetch,
                   digester: Callable[[FileChunk], Digester], *,
                   ahead: int = AHEAD) -> StreamStats:
    """Fetch and decode every distinct chunk of ``chunks`` once, in blob order, and feed
    it to ``files``. FormatError for a chunk that fails to decode or to match its digest
    (naming blob, chunk and offset); the fetch's own errors pass through."""
    windows = plan_windows(chunks)
    stats = StreamStats(windows=len(windows),
                        bytes_fetched=sum(w.end - w.start for w in windows))
    for c, data in _decoded(windows, fetch, digester, ahead):
        files.feed(c, data)
        stats.chunks += 1
    return stats


def file_digest(chunks: list[FileChunk], fetch: Fetch,
                digester: Callable[[FileChunk], Digester]) -> str:
    """sha256 of one file read in file order: runs of chunks that follow each other in
    a blob share a request (up to :data:`MAX_WINDOW`); each chunk is checked."""
    windows: list[Window] = []
    group: list[FileChunk] = []
    for c in chunks:
        blob, off, size = extent_of(c)
        if group:
            first, last = group[0], group[-1]
            if (blob != last.blob_id or off != (last.compressed_offset or 0) +
                    (last.compressed_size or 0) or
                    off + size - (first.compressed_offset or 0) > MAX_WINDOW):
                windows.append(_window(group))
                group = []
        group.append(c)
    if group:
        windows.append(_window(group))
    h = hashlib.sha256()
    for _, data in _decoded(windows, fetch, digester, 0):
        h.update(data)
    return h.hexdigest()


def _window(group: list[FileChunk]) -> Window:
    start = group[0].compressed_offset or 0
    last = group[-1]
    return Window(group[0].blob_id, start,
                  (last.compressed_offset or 0) + (last.compressed_size or 0), tuple(group))
