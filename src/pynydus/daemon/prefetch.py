"""Background prefetch: warm the blob cache with the chunks an image will need.

What is prefetched (upstream's order): the files of ``--prefetch-files`` or of the
mount request, else the bootstrap's prefetch table (directories expanded), then,
with ``prefetch_all``, every chunk of the image. A prefetch list learned from a start-up
(``prefetchlist``, handed over by the snapshotter after the mount) is fetched in its
own order, chunk runs of up to 64 chunks at a time. Workers are plain threads owned
by the Prefetcher; ``stop()`` ends them. They yield to foreground reads: while any
FUSE read is in flight a worker waits, so a container's own reads go first. A
token bucket limits the bandwidth when ``bandwidth_limit`` is set.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from pynydus.daemon.instance import RafsInstance
from pynydus.daemon.prefetchlist import PrefetchList, chunks_in_order
from pynydus.errors import NydusError
from pynydus.rafs.read import FileChunk

log = logging.getLogger(__name__)

_BATCH_CHUNKS = 64


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

    def submit(self, inst: RafsInstance, files: list[str] | None, prefetch_all: bool) -> None:
        """Queue the prefetch of one image (files first, then everything if asked)."""
        self._start_feeder(self._feed, inst, files, prefetch_all)

    def submit_list(self, inst: RafsInstance, plist: PrefetchList) -> None:
        """Queue the prefetch of one image's list, in its order (blobs the image does
        not have are skipped; chunks already cached cost nothing)."""
        self._start_feeder(self._feed_list, inst, plist)

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

    def _feed_list(self, inst: RafsInstance, plist: PrefetchList) -> None:
        try:
            index_of = {b.blob_id: i for i, b in enumerate(inst.bs.blobs)}
            sizes = {(index_of.get(plist.blobs[r[0]]), r[1]): r[4] for r in plist.ranges}
            for blob_index, indexes in chunks_in_order(plist, index_of):
                nbytes = sizes.get((blob_index, indexes[0]), 0)
                for i in range(0, len(indexes), _BATCH_CHUNKS):
                    if self.stop_event.is_set():
                        return
                    part = indexes[i:i + _BATCH_CHUNKS]
                    share = nbytes * len(part) // len(indexes)
                    self.queue.put((share, functools.partial(inst.prefetch_run, blob_index, part),
                                    False))
        except Exception:
            log.exception("prefetch list feeder failed")

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
