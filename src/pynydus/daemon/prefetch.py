"""Background prefetch: warm the blob cache with the chunks an image will need.

What is prefetched (upstream's order): the files of ``--prefetch-files`` or of the
mount request, else the bootstrap's prefetch table (directories expanded), then,
with ``prefetch_all``, every chunk of the image. Workers are plain threads owned by the
Prefetcher; ``stop()`` ends them. They yield to foreground reads: while any FUSE read is
in flight a worker waits, so a container's own reads go first. A token bucket limits
the bandwidth when ``bandwidth_limit`` is set.

A prefetch list learned from a start-up (``prefetchlist``, handed over by the
snapshotter) is fetched by a ``ListPrefetch``: in the list's order, in pieces of at most
256 KiB, two at a time, each started only while the image's foreground has no request on
the wire (``WireGate``: a container's misses go first, the list fills the idle link);
chunks already cached or being fetched by a miss are skipped; the pieces ahead of the
furthest listed chunk the workload has read go before the ones it passed over, and
they run ahead of it by at most 4 MiB or the bytes of the list it has read so far, times
the share of listed chunks among its last 32 first reads. The
workload's first reads (the image's access trace) also judge the list: when fewer than
a quarter of a window of them are listed chunks, the list is stale, and when the
workload has read and then reads nothing new for 3 s its start-up is over; either way
the rest of the list is dropped (docs/decisions.md, "prefetch list scheduling").
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from pynydus.daemon.blobcache import Backend, ChunkRef
from pynydus.daemon.instance import RafsInstance
from pynydus.daemon.prefetchlist import PrefetchList, chunks_in_order
from pynydus.errors import NydusError
from pynydus.rafs.read import FileChunk

log = logging.getLogger(__name__)

_BATCH_CHUNKS = 64
# A list's request at most (compressed bytes): 20 ms of a 100 Mbit/s link, so a miss that
# finds its chunk in a list request under way does not wait long for it.
_PIECE_BYTES = 256 << 10
# A list's requests in flight at once: two keep a link busy across the gap between
# requests; more would only share it, delaying the chunks needed first.
_LIST_INFLIGHT = 2
# How far (compressed bytes) the list may run ahead of the furthest listed chunk the
# workload has read: this much, or as much as the workload has read of the list so far
# if that is more (a list the workload follows earns its lead; the tail of one it left
# is not fetched), times the share of listed chunks among its last _RECENT first reads
# (a workload that has left the list stops it: on a node's few cores the decoding of
# chunks nobody reads takes the CPU, and the GIL, from the container's own reads).
_LOOKAHEAD = 4 << 20
_RECENT = 32
# Foreground first reads of chunks judged together, and the share of them that must be
# listed chunks for the list to go on (docs/decisions.md, "prefetch list scheduling").
_STALE_WINDOW = 64
_STALE_SHARE = 0.25
# A window that stops filling (the start-up is over) is judged after this long without a
# new first read, if it holds at least _STALE_MIN_READS.
_STALE_QUIET = 1.0
_STALE_MIN_READS = 8
# A workload that has read and then reads nothing new for this long has finished its
# start-up: what the list still holds belongs to another start-up, and is dropped.
_DONE_QUIET = 3.0
# How long the driver waits for its last pieces before it reports.
_WAIT_PIECE = 120.0

_local = threading.local()


def _background() -> bool:
    return bool(getattr(_local, "background", False))


class WireGate:
    """An image's backend that counts the foreground's requests on the wire (those of
    threads not marked background: FUSE readers, their readahead), so that prefetch goes
    on the wire only when they are done (``wait_idle``)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._foreground = 0
        self._cond = threading.Condition()
        self.foreground_requests = 0

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        if _background():
            return self.backend.read_range(blob_id, offset, length)
        with self._cond:
            self._foreground += 1
            self.foreground_requests += 1
        try:
            return self.backend.read_range(blob_id, offset, length)
        finally:
            with self._cond:
                self._foreground -= 1
                if not self._foreground:
                    self._cond.notify_all()

    @property
    def busy(self) -> bool:
        return self._foreground > 0

    def wait_idle(self, stop: threading.Event, timeout: float) -> bool:
        """Wait up to ``timeout`` s for no foreground request to be on the wire (or
        ``stop``); whether none is."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._foreground and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return not self._foreground

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __getattr__(self, name: str) -> object:  # update_auth and the like
        return getattr(self.backend, name)


class TokenBucket:
    """Bytes-per-second limiter; ``take`` blocks until the bytes may be spent."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.capacity = max(rate, 1 << 20)
        self.tokens = float(self.capacity)
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int, stop: threading.Event) -> None:
        if self.rate <= 0:
            return
        while not stop.is_set():
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n or self.tokens >= self.capacity:
                    self.tokens -= n
                    return
                wait = (n - self.tokens) / self.rate
            stop.wait(min(wait, 0.1))


def expand_paths(inst: RafsInstance, paths: Iterable[str]) -> list[int]:
    """Inode numbers of regular files named by ``paths`` (directories recursively)."""
    inos = []
    for p in paths:
        try:
            inos.append(inst.bs.lookup_path(p))
        except NydusError:
            log.info("prefetch: %s is not in the image", p)
    return expand_inodes(inst, inos)


def expand_inodes(inst: RafsInstance, inos: Iterable[int]) -> list[int]:
    """Regular files among ``inos``, directories expanded recursively, each once."""
    out: list[int] = []
    seen: set[int] = set()
    stack = list(inos)
    while stack:
        ino = stack.pop()
        if ino in seen:
            continue
        seen.add(ino)
        st = inst.bs.stat(ino)
        if st.is_reg:
            out.append(ino)
        elif st.is_dir:
            stack.extend(e.ino for e in inst.bs.readdir(ino) if e.name not in (b".", b".."))
    return out


def _chunks_of(inst: RafsInstance, inos: Iterable[int]) -> Iterator[FileChunk]:
    for ino in inos:
        yield from inst.bs.chunks(ino)


def _all_files(inst: RafsInstance) -> Iterator[int]:
    for _, ino in inst.bs.walk():
        if inst.bs.stat(ino).is_reg:
            yield ino


class Prefetcher:
    """Owns the prefetch workers of one daemon."""

    def __init__(self, threads: int, bandwidth_limit: int, busy: Callable[[], bool]) -> None:
        self.threads = max(1, threads)
        self.bucket = TokenBucket(bandwidth_limit)
        self.busy = busy
        self.stop_event = threading.Event()
        # (bytes the job fetches at most, the job: returns bytes fetched, whether it
        # waits for foreground reads: a list's jobs do not, they fetch what those reads
        # are about to ask for)
        self.queue: queue.Queue[tuple[int, Callable[[], int], bool] | None] = queue.Queue(
            maxsize=256)
        self.workers: list[threading.Thread] = []
        self.done_bytes = 0
        self.requests = 0
        self.begin = 0.0
        self.end = 0.0
        self._lock = threading.Lock()
        self._feeders: list[threading.Thread] = []
        self.lists: list[ListPrefetch] = []

    def submit(self, inst: RafsInstance, files: list[str] | None, prefetch_all: bool) -> None:
        """Queue the prefetch of one image (files first, then everything if asked)."""
        self._start_feeder(self._feed, inst, files, prefetch_all)

    def submit_list(self, inst: RafsInstance, plist: PrefetchList) -> ListPrefetch:
        """Start the prefetch of one image's list, in its order (blobs the image does not
        have are skipped; chunks already cached cost nothing); see ``ListPrefetch``."""
        job = ListPrefetch(inst, plist, self)
        with self._lock:
            self.lists.append(job)
            del self.lists[:-16]  # the last ones, for the log and the metrics
        self._start_feeder(job.run)
        return job

    def _start_feeder(self, target: Callable[..., None], *args: object) -> None:
        if not self.workers:
            self.begin = time.time()
            for i in range(self.threads):
                t = threading.Thread(target=self._work, name=f"prefetch-{i}", daemon=True)
                t.start()
                self.workers.append(t)
        feeder = threading.Thread(target=target, args=args, name="prefetch-feed", daemon=True)
        feeder.start()
        self._feeders.append(feeder)

    def _feed(self, inst: RafsInstance, files: list[str] | None, prefetch_all: bool) -> None:
        try:
            if files is not None:
                inos = expand_paths(inst, files)
            else:
                inos = expand_inodes(inst, [i for i in inst.bs.prefetch_list if i])
            self._put_chunks(inst, _chunks_of(inst, inos))
            if prefetch_all or (files is not None and "/" in files):
                self._put_chunks(inst, _chunks_of(inst, _all_files(inst)))
        except NydusError as err:
            log.warning("prefetch: %s", err)
        except Exception:
            log.exception("prefetch feeder failed")

    def _put_chunks(self, inst: RafsInstance, chunks: Iterator[FileChunk]) -> None:
        batch: list[FileChunk] = []
        for c in chunks:
            if self.stop_event.is_set():
                return
            batch.append(c)
            if len(batch) >= _BATCH_CHUNKS:
                self._put_batch(inst, batch)
                batch = []
        if batch:
            self._put_batch(inst, batch)

    def _put_batch(self, inst: RafsInstance, batch: list[FileChunk]) -> None:
        nbytes = sum(c.compressed_size or c.uncompressed_size for c in batch)
        self.queue.put((nbytes, functools.partial(inst.prefetch_chunks, batch), True))

    def _work(self) -> None:
        _local.background = True  # our requests wait for the foreground's (WireGate)
        while not self.stop_event.is_set():
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                return
            nbytes, job, yields = item
            while yields and self.busy() and not self.stop_event.is_set():
                self.stop_event.wait(0.005)  # foreground reads first
            self.bucket.take(nbytes, self.stop_event)
            try:
                n = job()
                with self._lock:
                    self.done_bytes += n
                    self.requests += 1
                    self.end = time.time()
            except NydusError as err:
                log.warning("prefetch of up to %d bytes failed: %s", nbytes, err)
            except Exception:
                log.exception("prefetch worker error")

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.workers:
            t.join(timeout=5)


class ListPrefetch:
    """One image's prefetch list being fetched (the module's doc says how). ``run`` is
    its driver (on a thread of its own); the pieces go to the Prefetcher's workers."""

    def __init__(self, inst: RafsInstance, plist: PrefetchList, owner: Prefetcher) -> None:
        self.inst = inst
        self.plist = plist
        self.owner = owner
        backend = inst.backend
        self.gate = backend if isinstance(backend, WireGate) else None
        self.pieces: list[tuple[int, list[ChunkRef]]] = []
        self.position: dict[tuple[int, int], int] = {}  # (blob index, chunk index) -> piece
        self.issued: list[bool] = []
        self.frontier = 0  # the piece of the furthest listed chunk the workload has read
        self.stopped = ""  # why the rest of the list was dropped, if it was
        self.done = threading.Event()
        self.listed_reads = 0  # the workload's first reads of listed chunks
        self.used = 0  # ... their compressed bytes
        self.other_reads = 0  # ... and of chunks the list does not have
        self.fetched = 0
        self.requests = 0
        self._cursor = 0
        self._back = 0
        self._seen = 0  # chunks of the trace looked at
        self._window = [0, 0]  # listed, all first reads of the window being filled
        self._recent: deque[bool] = deque(maxlen=_RECENT)  # the last first reads: listed?
        self._last_read = time.monotonic()
        self._slots = threading.Semaphore(_LIST_INFLIGHT)
        self._lock = threading.Lock()

    def _plan(self) -> None:
        """Cut the list into pieces: its chunks in order, consecutive ones of a blob
        together up to _PIECE_BYTES (a piece may span runs: one request if they touch)."""
        index_of = {b.blob_id: i for i, b in enumerate(self.inst.bs.blobs)}
        piece: list[ChunkRef] = []
        blob, size = -1, 0
        for blob_index, indexes in chunks_in_order(self.plist, index_of):
            for ref in self.inst.chunk_refs(blob_index, indexes):
                if piece and (blob_index != blob or size + ref.c_size > _PIECE_BYTES
                              or len(piece) >= _BATCH_CHUNKS):
                    self.pieces.append((blob, piece))
                    piece, size = [], 0
                blob = blob_index
                piece.append(ref)
                size += ref.c_size
                self.position.setdefault((blob_index, ref.index), len(self.pieces))
        if piece:
            self.pieces.append((blob, piece))
        self.issued = [False] * len(self.pieces)
        self._cum = [0]  # compressed bytes of the pieces before each
        for _, refs in self.pieces:
            self._cum.append(self._cum[-1] + sum(r.c_size for r in refs))

    def run(self) -> None:
        stop = self.owner.stop_event
        try:
            self._plan()
            while not stop.is_set():
                self._observe()
                if self.stopped:
                    break
                if not self._slots.acquire(timeout=0.02):
                    continue
                if self.gate is not None and self.gate.busy:  # the foreground's misses first
                    self._slots.release()
                    self.gate.wait_idle(stop, 0.02)
                    continue
                i = self._next()
                if i is None:
                    self._slots.release()
                    break
                if i < 0:  # as far ahead of the workload as it may go
                    self._slots.release()
                    stop.wait(0.02)
                    continue
                self.issued[i] = True
                blob_index, refs = self.pieces[i]
                self.owner.queue.put((sum(r.c_size for r in refs),
                                      functools.partial(self._fetch, blob_index, refs), False))
            deadline = time.monotonic() + _WAIT_PIECE
            for _ in range(_LIST_INFLIGHT):  # the pieces under way
                while not self._slots.acquire(timeout=0.05):
                    if stop.is_set() or time.monotonic() > deadline:
                        return
        except Exception:
            log.exception("prefetch list failed")
        finally:
            self.done.set()
            log.info("prefetch list %s: %s; %d of %d pieces fetched (%d requests, %d bytes); the "
                     "workload's first reads: %d listed chunks, %d others", self.inst.bootstrap_path,
                     f"stopped ({self.stopped})" if self.stopped else "done",
                     sum(self.issued), len(self.pieces), self.requests, self.fetched,
                     self.listed_reads, self.other_reads)

    def _fetch(self, blob_index: int, refs: list[ChunkRef]) -> int:
        try:
            n = self.inst.prefetch_refs(blob_index, refs)
            with self._lock:
                self.fetched += n
                self.requests += 1 if n else 0
            return n
        finally:
            self._slots.release()

    def _next(self) -> int | None:
        """The first piece not yet fetched from the workload's position on (-1 when it
        is further ahead of the workload than _LOOKAHEAD allows), else the first of
        those it passed over; None when every piece is under way."""
        n = len(self.pieces)
        i = self._cursor = max(self._cursor, self.frontier)
        while i < n and self.issued[i]:
            i += 1
        self._cursor = i
        if i < n:
            if self._cum[i] - self._cum[self.frontier] > self._lead():
                i = -1
            else:
                return i
        j = self._back
        while j < min(n, self.frontier) and self.issued[j]:
            j += 1
        self._back = j
        if j < min(n, self.frontier):
            return j
        return -1 if i < 0 else None

    def _lead(self) -> float:
        """How many bytes of the list may be fetched past the workload's position."""
        recent = self._recent
        share = sum(recent) / len(recent) if len(recent) >= _STALE_MIN_READS else 1.0
        return max(_LOOKAHEAD, self.used) * share

    def _observe(self) -> None:
        """Take the workload's new first reads from the trace: its position in the list,
        and the judgement of each window of them."""
        new = self.inst.trace.chunks_since(self._seen)
        self._seen += len(new)
        now = time.monotonic()
        for c in new:
            p = self.position.get((c.blob_index, c.index))
            self._recent.append(p is not None)
            if p is None:
                self.other_reads += 1
            else:
                self.listed_reads += 1
                self.used += c.c_size
                self._window[0] += 1
                self.frontier = max(self.frontier, p)
            self._window[1] += 1
            if self._window[1] >= _STALE_WINDOW:
                self._judge()
        if new:
            self._last_read = now
        elif self._window[1] >= _STALE_MIN_READS and now - self._last_read > _STALE_QUIET:
            self._judge()
        elif self._seen and now - self._last_read > _DONE_QUIET and not self.stopped:
            self.stopped = (f"the workload has read nothing new for {_DONE_QUIET:.0f} s: its "
                            f"start-up is over")

    def _judge(self) -> None:
        listed, total = self._window
        self._window = [0, 0]
        if listed < _STALE_SHARE * total and not self.stopped:
            self.stopped = (f"stale: {listed} of {total} chunks the workload read first were "
                            f"on the list (less than {_STALE_SHARE:.0%})")
