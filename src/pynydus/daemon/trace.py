"""An image's access trace: which files and chunks its readers touched first, and when.

Every read that reaches an image (``RafsInstance``: the FUSE reads, not prefetch or
readahead) is offered to the image's ``AccessTrace``. The trace keeps each file and each
chunk once, in the order of their first read, with the time since the mount; a file also
counts its reads and bytes. That order is a start-up's working set: the API shows it
(upstream's ``/api/v1/metrics/files`` and ``/pattern``, our ``/metrics/trace``) and it
becomes the prefetch list other nodes use (``pynydus.daemon.prefetchlist``).

Bounded memory: at most ``max_files`` files and ``max_chunks`` chunks are kept (about 100
bytes each); later first reads are dropped and the trace says it is truncated. A start-up
is the head of the trace, so the head is what is kept.

Cost on the read path: one dictionary look-up per read and one set look-up per chunk piece
under a lock; the warm path (a file and chunks already seen) adds nothing else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pynydus.daemon.blobcache import ChunkRef

# A start-up of a large image reads a few thousand files and a few thousand chunks; these
# bounds are far above that and cap a long-running container's trace at ~30 MB.
MAX_FILES = 65536
MAX_CHUNKS = 262144


class FileAccess:
    """One file's first read (``first_ns`` after the mount, ``wall_ns`` since the epoch),
    its reads and the bytes they returned."""

    __slots__ = ("bytes_read", "first_ns", "ino", "nr_read", "wall_ns")

    def __init__(self, ino: int, first_ns: int, wall_ns: int) -> None:
        self.ino = ino
        self.first_ns = first_ns
        self.wall_ns = wall_ns
        self.nr_read = 0
        self.bytes_read = 0


@dataclass(frozen=True, slots=True)
class ChunkAccess:
    """A chunk's first read: its blob (index in the bootstrap's blob table), its index in
    the blob, its compressed range in the blob and uncompressed size, ``first_ns`` after
    the mount."""

    blob_index: int
    index: int
    c_off: int
    c_size: int
    u_size: int
    first_ns: int


# a read's pieces as ``RafsInstance`` plans them: (blob index, file position, [(ref, off, len)])
Groups = Sequence[tuple[int, int, Sequence[tuple[ChunkRef, int, int]]]]


class AccessTrace:
    """The first-read order of one mounted image's files and chunks. Thread-safe."""

    def __init__(self, max_files: int = MAX_FILES, max_chunks: int = MAX_CHUNKS,
                 clock: Callable[[], int] = time.monotonic_ns,
                 wall: Callable[[], int] = time.time_ns) -> None:
        self.max_files = max_files
        self.max_chunks = max_chunks
        self._clock = clock
        self._wall = wall
        self.start_ns = clock()
        self._files: dict[int, FileAccess] = {}
        self._chunks: list[ChunkAccess] = []
        self._seen: set[tuple[int, int]] = set()
        self._latest: set[int] = set()
        self.truncated = False
        self._lock = threading.Lock()

    def record(self, ino: int, nbytes: int, groups: Groups) -> None:
        """One read of ``nbytes`` from file ``ino`` covering the chunks of ``groups``."""
        with self._lock:
            f = self._files.get(ino)
            now = -1
            if f is None:
                if len(self._files) < self.max_files:
                    now = self._clock() - self.start_ns
                    f = self._files[ino] = FileAccess(ino, now, self._wall())
                else:
                    self.truncated = True
            if f is not None:
                f.nr_read += 1
                f.bytes_read += nbytes
            self._latest.add(ino)
            seen = self._seen
            for blob_index, _, pieces in groups:
                for ref, _, _ in pieces:
                    key = (blob_index, ref.index)
                    if key in seen:
                        continue
                    if len(self._chunks) >= self.max_chunks:
                        self.truncated = True
                        break
                    if now < 0:
                        now = self._clock() - self.start_ns
                    seen.add(key)
                    self._chunks.append(ChunkAccess(blob_index, ref.index, ref.c_off,
                                                    ref.c_size, ref.u_size, now))

    def files(self) -> list[FileAccess]:
        """The files in first-read order (copies of their counters)."""
        with self._lock:
            out = []
            for f in self._files.values():
                c = FileAccess(f.ino, f.first_ns, f.wall_ns)
                c.nr_read, c.bytes_read = f.nr_read, f.bytes_read
                out.append(c)
            return out

    def chunks(self) -> list[ChunkAccess]:
        """The chunks in first-read order."""
        with self._lock:
            return list(self._chunks)

    def chunks_since(self, start: int) -> list[ChunkAccess]:
        """The chunks first read after the first ``start`` of them, in first-read order."""
        with self._lock:
            return self._chunks[start:]

    def take_latest(self) -> list[int]:
        """Inodes read since the last call (upstream's ``latest_read_files``), sorted."""
        with self._lock:
            latest, self._latest = self._latest, set()
        return sorted(latest)


def ino_ranges(inos: Iterable[int]) -> list[list[int]]:
    """Sorted inode numbers as upstream's ``[[start, end], ...]`` runs (end inclusive)."""
    out: list[list[int]] = []
    for ino in sorted(inos):
        if out and out[-1][1] + 1 == ino:
            out[-1][1] = ino
        else:
            out.append([ino, ino])
    return out


def paths_of(walk: Iterable[tuple[bytes, int]], inos: Iterable[int]) -> dict[int, str]:
    """The first path of each of ``inos`` in a bootstrap walk (stops once all are found)."""
    want = set(inos)
    out: dict[int, str] = {}
    for path, ino in walk:
        if ino in want and ino not in out:
            out[ino] = path.decode("utf-8", "surrogateescape")
            if len(out) == len(want):
                break
    return out


# --- the API's shapes --------------------------------------------------------------------


def pattern_json(trace: AccessTrace) -> list[dict[str, int]]:
    """``GET /api/v1/metrics/pattern``: upstream's records (``ino``, ``nr_read``, wall-clock
    ``first_access_time_secs``/``_nanos``), in first-read order (upstream's are unordered)."""
    return [{"ino": f.ino, "nr_read": f.nr_read,
             "first_access_time_secs": f.wall_ns // 1_000_000_000,
             "first_access_time_nanos": f.wall_ns % 1_000_000_000} for f in trace.files()]


def files_json(trace: AccessTrace, paths: Callable[[Iterable[int]], dict[int, str]]
               ) -> list[dict[str, int | str]]:
    """``GET /api/v1/metrics/files``: each file read, in first-read order, with its path,
    reads, bytes and first read in nanoseconds after the mount."""
    files = trace.files()
    names = paths(f.ino for f in files)
    return [{"ino": f.ino, "path": names.get(f.ino, ""), "nr_read": f.nr_read,
             "data_read": f.bytes_read, "first_read_nanos": f.first_ns} for f in files]


def trace_json(trace: AccessTrace, blob_ids: Sequence[str],
               paths: Callable[[Iterable[int]], dict[int, str]]) -> dict[str, object]:
    """``GET /api/v1/metrics/trace`` (ours): the files and chunks in first-read order; a
    chunk names its blob, index, compressed range and uncompressed size."""
    chunks = [{"blob_id": blob_ids[c.blob_index] if c.blob_index < len(blob_ids) else "",
               "index": c.index, "offset": c.c_off, "size": c.c_size,
               "uncompressed_size": c.u_size, "first_read_nanos": c.first_ns}
              for c in trace.chunks()]
    return {"truncated": trace.truncated, "files": files_json(trace, paths), "chunks": chunks}
