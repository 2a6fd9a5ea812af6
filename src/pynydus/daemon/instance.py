"""A mounted RAFS image: its bootstrap, its blob caches and the file read path.

A read is planned once (``plan_read``: the byte range mapped to chunk pieces with the
bootstrap's ``map_read``, grouped by blob; the chunks a file's reads mapped are kept per
inode, so a later read of them does not decode the inode again) and then served from the
plan: by ``read_cached`` when every byte is in the cache (never waits for the backend;
with ``nowait`` not for the disk either), else by ``read_planned``, which lets each
blob's cache fetch missing chunks from the backend. Holes (file ranges no chunk covers,
as in sparse files) read as zeros. Counting the read is the FUSE layer's business
(``FsStats``), once per request.

A blob whose chunks live in spans (ZRAN: slices of a gzip layer's inflate contexts;
batch) has its chunk-info array read from the backend (for ZRAN from the separate meta
blob ``blob_meta_digest``, as nydusd does): at mount, in the background
(``load_span_maps``), or at the blob's first read if that comes first; its chunks are
then fetched as their spans and cut out of them (``rafs.read.spans``): a ZRAN chunk as
the prefix of its context up to its own end, continuing a kept inflate stream when there
is one, with the context's window read beside the context's bytes. Such blobs are not
amplified: on the large lab image's start-up the layer's next chunks added 0.67 MB to
8.5 and saved no request (a reader's misses land in contexts apart).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pynydus.daemon.blobcache import Backend, BlobCache, ChunkRef
from pynydus.daemon.config import NydusdConfig
from pynydus.daemon.metrics import CacheStats, FsStats
from pynydus.daemon.trace import AccessTrace
from pynydus.errors import FormatError, NotImplementedFeature
from pynydus.rafs.read import (
    ChunkRead,
    FileChunk,
    Span,
    SpanMap,
    has_spans,
    load_span_map,
    open_bootstrap,
)

log = logging.getLogger(__name__)

_UNKNOWN = object()  # _spans: a blob not looked at yet

# Decoded chunks waiting for the persist thread, at most (a burst of misses beyond it is
# written by the readers themselves, as before delayed persist).
_PERSIST_BUDGET = 64 << 20
# Chunks of files being read, kept mapped (per inode: chunk number -> blob index and cache
# reference), at most this many in all (~250 bytes each). The bootstrap's ``map_read``
# decodes the inode, its chunk array and chunk records for every read (~50 us); a random
# reader comes back to the same chunks again and again.
_MAPPED_CHUNKS = 8192
# file_cached: files whose cached prefix is kept (one int each), at most; and how many
# chunks one step maps (a file mostly not cached is answered after its first step).
_CACHED_FILES = 4096
_CACHED_STEP = 64


# decoded chunks a read fetched: blob index -> chunk index -> bytes
Fresh = dict[int, dict[int, bytes]]


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """What one read of ``ino`` at ``offset`` needs: per blob, the file position where its
    pieces start and the pieces (chunk, offset in chunk, length); ``end`` is where the read
    stops (the file size caps it); ``amplify`` whether misses may fetch neighbours."""

    ino: int
    offset: int
    end: int
    groups: tuple[tuple[int, int, list[tuple[ChunkRef, int, int]]], ...]
    amplify: bool


def _chunk_ref(c: FileChunk) -> ChunkRef:
    if c.compressed_offset is None or c.compressed_size is None:
        raise NotImplementedFeature(
            f"blob {c.blob_id} chunk {c.index}: the bootstrap has no chunk record; reading chunk "
            f"positions from the blob's chunk-info array is not supported yet"
        )
    return ChunkRef(
        index=c.index,
        c_off=c.compressed_offset,
        c_size=c.compressed_size,
        u_off=c.uncompressed_offset,
        u_size=c.uncompressed_size,
        compressed=bool(c.compressed),
        digest=c.digest or b"",
    )


class RafsInstance:
    """One image served by the daemon. Thread-safe after construction."""

    def __init__(self, bootstrap_path: str, config: NydusdConfig, backend: Backend,
                 cache_stats: CacheStats | None = None) -> None:
        if not config.cache.enabled:
            raise NotImplementedFeature(
                f"cache type {config.cache.type or 'none'!r}: pynydusd serves RAFS through a blob "
                f"cache only (set device.cache.type = \"blobcache\" and a work_dir)"
            )
        self.bootstrap_path = bootstrap_path
        self.config = config
        self.backend = backend
        self.bs = open_bootstrap(bootstrap_path)
        # asked for every attribute the FUSE layer builds (a flags test on the superblock)
        self.explicit_uidgid = self.bs.explicit_uidgid
        self.mounted_at = time.time()
        self.cache_stats = cache_stats or CacheStats()
        self.fs_stats = FsStats()
        # first reads of files and chunks since the mount (reads only: not prefetch or
        # readahead), for the access-pattern API and the prefetch list
        self.trace = AccessTrace()
        self._caches: dict[int, BlobCache] = {}
        # Sequential readahead: per inode (next expected offset, fetched-or-queued up to).
        self.readahead_bytes = 8 * max(config.rafs.batch_size, 1 << 20)
        self.amplify_below = config.rafs.batch_size // 2
        self._ra_state: dict[int, tuple[int, int]] = {}
        self._ra_lock = threading.Lock()
        self._ra_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readahead")
        # Delayed persist: a miss is answered from the decoded chunk and written to the
        # cache file here afterwards, holding at most _PERSIST_BUDGET bytes in memory.
        self._persist_thread = _JobThread("persist")
        self._persist_bytes = 0
        self._persist_lock = threading.Lock()
        self._lock = threading.Lock()
        self._span_maps: dict[int, SpanMap | None] = {}  # blob index -> spans, see _spans
        self._spans_lock = threading.Lock()
        self._span_locks: dict[int, threading.Lock] = {}
        # reads of ZRAN chunk info off the readers' path: span maps at mount, windows
        # beside a context's data (no thread starts for images without spans)
        self._spans_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="chunk-info")
        # inode -> (file size, {chunk number: (blob index, reference)}): see plan_read
        self._mapped: dict[int, tuple[int, dict[int, tuple[int, ChunkRef]]]] = {}
        self._mapped_count = 0
        self._mapped_lock = threading.Lock()
        # inode -> file bytes [0, n) known to be in the blob cache (see file_cached)
        self._cached_upto: dict[int, int] = {}

    def close(self) -> None:
        self._ra_pool.shutdown(wait=False, cancel_futures=True)
        self._spans_pool.shutdown(wait=False, cancel_futures=True)
        self._persist_thread.close()  # writes finish before the files close
        with self._lock:
            for cache in self._caches.values():
                cache.close()
            self._caches.clear()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        self.bs.close()

    def cache(self, blob_index: int) -> BlobCache:
        cache = self._caches.get(blob_index)  # every read asks: no lock once it exists
        if cache is not None:
            return cache
        spans = self._spans(blob_index)
        with self._lock:
            cache = self._caches.get(blob_index)
            if cache is None:
                if not 0 <= blob_index < len(self.bs.blobs):
                    raise FormatError(f"chunk refers to blob index {blob_index}, image has "
                                      f"{len(self.bs.blobs)} blobs")
                cache = BlobCache(
                    self.config.cache.work_dir, self.bs.blobs[blob_index], self.backend,
                    self._chunk_lookup(blob_index) if spans is None else _no_chunk,
                    spans=spans,
                    span_members=None if spans is None else self._span_members(spans),
                    validate=self.config.cache.validate or self.config.rafs.validate,
                    amplify_io=self.config.rafs.batch_size, stats=self.cache_stats,
                    persist=self._persist_later,
                )
                self._caches[blob_index] = cache
            return cache

    def _persist_later(self, job: Callable[[], None], nbytes: int) -> bool:
        """Run a blob cache's write ``job`` on the persist thread; False (write it now)
        when ``nbytes`` more would exceed the budget or the instance is closing."""
        with self._persist_lock:
            if self._persist_bytes + nbytes > _PERSIST_BUDGET:
                return False
            self._persist_bytes += nbytes

        def run() -> None:
            try:
                job()
            finally:
                with self._persist_lock:
                    self._persist_bytes -= nbytes

        if not self._persist_thread.submit(run):  # closing: the caller writes
            with self._persist_lock:
                self._persist_bytes -= nbytes
            return False
        return True

    def _spans(self, blob_index: int) -> SpanMap | None:
        """The span map of a ZRAN or batch blob (read once, from the backend), else None."""
        known = self._span_maps.get(blob_index, _UNKNOWN)
        if known is not _UNKNOWN:  # every read asks: decided once per blob
            return known  # type: ignore[return-value]
        if not 0 <= blob_index < len(self.bs.blobs) or not has_spans(self.bs.blobs[blob_index]):
            with self._spans_lock:
                self._span_maps.setdefault(blob_index, None)
            return None
        with self._spans_lock:  # one lock per blob: blobs load side by side
            lock = self._span_locks.setdefault(blob_index, threading.Lock())
        with lock:
            if blob_index not in self._span_maps:
                self._span_maps[blob_index] = load_span_map(
                    self.bs.blobs[blob_index], self._read_exact, self._spans_pool.submit)
            return self._span_maps[blob_index]

    def load_span_maps(self) -> None:
        """Start reading the chunk info of every ZRAN and batch blob in the background
        (returns at once). A mount calls it: the container's first reads of each layer
        then find its span map ready instead of waiting for its two to four serial
        requests (they overlap the container's creation). A load that fails is left to
        the first read of the blob, which tries again and reports the error."""
        for i, blob in enumerate(self.bs.blobs):
            if has_spans(blob):
                self._spans_pool.submit(self._load_spans_quietly, i)

    def _load_spans_quietly(self, blob_index: int) -> None:
        try:
            self._spans(blob_index)
        except Exception as err:  # noqa: BLE001 - the blob's first read reports it
            log.debug("chunk info of blob %d: %s (left to its first read)", blob_index, err)

    def _read_exact(self, blob_id: str, offset: int, length: int) -> bytes:
        data = self.backend.read_range(blob_id, offset, length)
        if len(data) != length:
            raise FormatError(f"blob {blob_id}: {len(data)} of {length} bytes at {offset}")
        return data

    def _ref(self, c: FileChunk) -> ChunkRef:
        """The cache's reference of chunk ``c`` (its span, for ZRAN and batch chunks)."""
        spans = self._spans(c.blob_index)
        at = spans.locate(c.index) if spans is not None else None
        if spans is None or at is None:
            return _chunk_ref(c)
        return _span_ref(spans, at, c.index, c.uncompressed_offset, c.uncompressed_size,
                         c.digest or b"")

    @staticmethod
    def _span_members(spans: SpanMap) -> Callable[[Span], list[ChunkRef]]:
        """The cache references of every chunk of a span (from the chunk-info array: no
        digest, so they are stored only when chunks are not validated)."""

        def members(span: Span) -> list[ChunkRef]:
            out = []
            for i in spans.members(span):
                ci = spans.chunk_info(i)
                out.append(ChunkRef(index=i, c_off=span.offset, c_size=span.size,
                                    u_off=ci.uncompressed_offset, u_size=ci.uncompressed_size,
                                    compressed=True, span=span,
                                    span_offset=ci.data & 0xFFFF_FFFF))
            return out

        return members

    def _chunk_lookup(self, blob_index: int) -> Callable[[int], ChunkRef | None]:
        """``chunk index -> ChunkRef`` of one blob, for read amplification (amplify_io),
        from the bootstrap's chunk table (indexed by the reader on first use). Images
        whose bootstrap has no chunk table (v5, or v6 records only in the blob's
        chunk-info array) do not amplify.
        """

        def chunk_at(index: int) -> ChunkRef | None:
            rec = self.bs.chunk_record(blob_index, index)
            return None if rec is None else ChunkRef.of_record(rec)

        return chunk_at

    def all_cached(self) -> bool:
        """Every chunk of every blob is in the cache (asks only caches already open: a
        metrics query must not create cache files)."""
        with self._lock:
            caches = dict(self._caches)
        return len(caches) == len(self.bs.blobs) and all(c.chunk_map.all_ready for c in caches.values())

    def underlying_files(self) -> list[str]:
        """Cache files of this image's blobs (for the snapshotter's cache GC)."""
        out = []
        for info in self.bs.blobs:
            base = f"{self.config.cache.work_dir}/{info.blob_id}"
            out += [base + ".blob.data", base + ".blob.data.chunk_map"]
        return out

    def plan_read(self, ino: int, offset: int, size: int) -> ReadPlan:
        """Plan a read of up to ``size`` bytes of file ``ino`` at ``offset`` (short only at
        end of file). Pure: touches neither the cache nor the backend. A read of chunks
        an earlier read of the file mapped costs no bootstrap decoding."""
        mapped = self._mapped.get(ino)  # every read asks: no lock
        if mapped is not None and offset >= 0:
            plan = self._plan_mapped(ino, offset, size, *mapped)
            if plan is not None:
                return plan
        reads = self.bs.map_read(ino, offset, size)
        file_size = self.bs.stat_fields(ino)[4]
        groups = tuple(
            (blob_index, group[0].chunk.file_offset + group[0].offset,
             [(self._ref(r.chunk), r.offset, r.length) for r in group])
            for blob_index, group in _by_blob(reads)
        )
        self._map_chunks(ino, file_size, groups, [r.chunk for r in reads])
        # Amplify misses (fetch the blob's next chunks in the same request) only from
        # small files: a start-up reads runs of small neighbours (modules, configs) for
        # which a round trip costs more than the bytes, while a file of half the window
        # or more is mostly read on its own (sequential reads of it get readahead).
        return ReadPlan(ino, offset, max(offset, min(offset + size, file_size)), groups,
                        amplify=file_size < self.amplify_below)

    def _plan_mapped(self, ino: int, offset: int, size: int, file_size: int,
                     chunks: dict[int, tuple[int, ChunkRef]]) -> ReadPlan | None:
        """``plan_read`` from the file's mapped chunks; None when one is not mapped. A
        mapped chunk number k covers ``[k * chunk_size, +u_size)`` of the file."""
        cs = self.bs.chunk_size
        end = min(offset + size, file_size)
        groups: list[tuple[int, int, list[tuple[ChunkRef, int, int]]]] = []
        pos = offset
        k = pos // cs
        while pos < end:
            hit = chunks.get(k)
            if hit is None:
                return None
            blob_index, ref = hit
            base = k * cs
            n = min(end, base + ref.u_size) - pos
            if groups and groups[-1][0] == blob_index:
                groups[-1][2].append((ref, pos - base, n))
            else:
                groups.append((blob_index, pos, [(ref, pos - base, n)]))
            pos += n
            k += 1
        return ReadPlan(ino, offset, max(offset, end), tuple(groups),
                        amplify=file_size < self.amplify_below)

    def _map_chunks(self, ino: int, file_size: int,
                    groups: tuple[tuple[int, int, list[tuple[ChunkRef, int, int]]], ...],
                    chunks: list[FileChunk]) -> None:
        """Keep the chunks a read mapped (only those at their place in the chunk grid: a
        v5 file's holes and odd geometries go through ``map_read`` each time)."""
        cs = self.bs.chunk_size
        refs = [ref for _, _, pieces in groups for ref, _, _ in pieces]
        if not refs or cs <= 0 or len(refs) != len(chunks):
            return
        with self._mapped_lock:
            mapped = self._mapped.get(ino)
            if mapped is None:
                mapped = self._mapped[ino] = (file_size, {})
            table = mapped[1]
            for c, ref in zip(chunks, refs, strict=True):
                k, rem = divmod(c.file_offset, cs)
                if rem or k in table or c.uncompressed_size != min(cs, file_size - c.file_offset):
                    continue
                table[k] = (c.blob_index, ref)
                self._mapped_count += 1
            if self._mapped_count > _MAPPED_CHUNKS:  # forget the files mapped first
                for old in list(self._mapped)[:max(1, len(self._mapped) // 2)]:
                    self._mapped_count -= len(self._mapped.pop(old)[1])

    def read_planned(self, plan: ReadPlan, fresh: Fresh | None = None) -> bytearray:
        """The bytes of ``plan``; may wait for the backend. The decoded chunks the read
        fetched or took from another reader's fetch go to ``fresh`` when given (blob
        index -> chunk index -> bytes: ``chunk_range`` cuts the rest of them from there).

        A sequential reader gets the following chunks of the same file fetched in the
        background (readahead), so a cold sequential read is not a chain of one-chunk
        round trips."""
        out = self._assemble(plan, cached_only=False, fresh=fresh)
        assert out is not None
        self.trace.record(plan.ino, len(out), plan.groups)
        self._readahead(plan.ino, plan.offset, len(out))
        return out

    def read_cached(self, plan: ReadPlan, *, nowait: bool = True) -> bytearray | None:
        """Like ``read_planned`` when every byte is in the cache; else None. Never waits
        for the backend; with ``nowait`` (pyfuse3's trio loop answers warm reads itself)
        not for the disk either: None unless every byte is in the page cache too."""
        out = self._assemble(plan, cached_only=True, nowait=nowait)
        if out is not None:
            self.trace.record(plan.ino, len(out), plan.groups)
            self._readahead(plan.ino, plan.offset, len(out))
        return out

    def chunk_bounds(self, plan: ReadPlan) -> tuple[int, int]:
        """The file range ``[start, end)`` of the chunks ``plan`` reads from: its own range
        widened to whole chunks, capped at the file's end."""
        if not plan.groups:
            return plan.offset, plan.end
        _, first_pos, first = plan.groups[0]
        start = first_pos - first[0][1]
        _, last_pos, last = plan.groups[-1]
        chunk, off, length = last[-1]
        end = last_pos + sum(n for _, _, n in last) + chunk.u_size - off - length
        return min(start, plan.offset), min(max(end, plan.end), self.bs.stat(plan.ino).size)

    def chunk_range(self, plan: ReadPlan, fresh: Fresh, start: int, end: int
                    ) -> memoryview | bytearray:
        """Bytes ``[start, end)`` of ``plan``'s file inside the chunk a one-chunk ``plan``
        read (``chunk_bounds``): cut from its decoded bytes in ``fresh`` without a copy
        when they are there, else ``read_range_quietly``."""
        if len(plan.groups) == 1 and len(plan.groups[0][2]) == 1:
            blob_index, pos, ((ref, off, _),) = plan.groups[0]
            data = fresh.get(blob_index, {}).get(ref.index)
            if data is not None:
                base = pos - off
                return memoryview(data)[start - base:end - base]
        return self.read_range_quietly(plan.ino, start, end)

    def read_range_quietly(self, ino: int, start: int, end: int) -> bytearray:
        """Bytes ``[start, end)`` of file ``ino`` for the daemon's own use (pushing them
        into the kernel's page cache): not traced and no readahead (the reader's pattern
        is not this); waits for the backend only if a chunk is missing."""
        out = self._assemble(self.plan_read(ino, start, end - start), cached_only=False)
        assert out is not None
        return out

    def file_cached(self, ino: int, *, landing: bool = False) -> bool:
        """Every chunk of file ``ino`` is in the blob cache (``landing``: or on its way
        there: being fetched, or waiting for a delayed persist).

        Asked at every end of a cached open of a large file, so it is incremental: the
        file's prefix found in the cache is remembered (a chunk stays cached for the
        mount's life), the rest is mapped a few chunks at a time and the answer comes
        at the first chunk missing. Costs O(chunks cached since the last ask + one step).
        """
        size = self.bs.stat_fields(ino)[4]
        pos = upto = self._cached_upto.get(ino, 0)
        ended = False  # a chunk only landing ended the cached prefix at ``upto``
        step = _CACHED_STEP * max(self.bs.chunk_size, 4096)
        while pos < size:
            end = min(size, pos + step)
            for r in self.bs.map_read(ino, pos, end - pos):
                c = r.chunk
                cache = self.cache(c.blob_index)
                if cache.has(c.index):
                    if not ended:  # holes before it read as zeros: cached too
                        upto = c.file_offset + r.offset + r.length
                elif landing and cache.has(c.index, landing=True):
                    ended = True
                else:
                    self._keep_cached_upto(ino, upto)
                    return False
            if not ended:
                upto = end
            pos = end
        self._keep_cached_upto(ino, upto)
        return True

    def _keep_cached_upto(self, ino: int, upto: int) -> None:
        cached = self._cached_upto
        if upto <= cached.get(ino, 0):
            return
        with self._mapped_lock:
            cached[ino] = max(upto, cached.get(ino, 0))
            if len(cached) > _CACHED_FILES:  # bounded: forget the files asked about first
                for old in list(cached)[:max(1, _CACHED_FILES // 4)]:
                    del cached[old]

    def read_cached_quietly(self, ino: int, start: int, end: int) -> bytearray | None:
        """Bytes ``[start, end)`` of file ``ino`` if they are all in the blob cache (may
        wait for the disk, never for the backend), else None; for the daemon's own use:
        not traced, no readahead."""
        return self._assemble(self.plan_read(ino, start, end - start), cached_only=True,
                              nowait=False)

    def read(self, ino: int, offset: int, size: int) -> bytearray:
        """``read_planned(plan_read(...))``: for callers that need no warm path."""
        return self.read_planned(self.plan_read(ino, offset, size))

    def _assemble(self, plan: ReadPlan, *, cached_only: bool,
                  nowait: bool = True, fresh: Fresh | None = None) -> bytearray | None:
        parts: list[bytearray] = []
        pos = plan.offset
        for blob_index, start, pieces in plan.groups:
            if start > pos:  # a hole before these chunks
                parts.append(bytearray(start - pos))
                pos = start
            cache = self.cache(blob_index)
            if cached_only:
                data = cache.read_cached(pieces, nowait=nowait)
            else:
                data = cache.read(pieces, plan.amplify,
                                  None if fresh is None else fresh.setdefault(blob_index, {}))
            if data is None:
                return None
            parts.append(data)
            pos += len(data)
        if pos < plan.end:  # trailing hole
            parts.append(bytearray(plan.end - pos))
        if len(parts) == 1:
            return parts[0]
        out = bytearray()
        for p in parts:
            out += p
        return out

    def _readahead(self, ino: int, offset: int, length: int) -> None:
        """After a sequential read, fetch the file's next ``readahead`` bytes in the background."""
        window = self.readahead_bytes
        if window <= 0 or length == 0:
            return
        end = offset + length
        with self._ra_lock:
            expected, scheduled = self._ra_state.get(ino, (-1, 0))
            self._ra_state[ino] = (end, scheduled)
            if offset != expected or scheduled >= end + window // 2:
                return  # not sequential, or enough is on its way already
            start = max(scheduled, end)
            self._ra_state[ino] = (end, start + window)
            if len(self._ra_state) > 4096:  # bounded memory: forget the oldest files
                for key in list(self._ra_state)[:1024]:
                    del self._ra_state[key]
        self._ra_pool.submit(self._fetch_ahead, ino, start, window)

    def _fetch_ahead(self, ino: int, start: int, length: int) -> None:
        try:
            reads = self.bs.map_read(ino, start, length)
            for blob_index, refs in self._refs_by_blob(r.chunk for r in reads).items():
                cache = self.cache(blob_index)
                cache.ensure(refs, amplify=False, max_request=length)
                cache.will_need(refs)  # and from the cache file into the page cache
        except Exception as err:  # noqa: BLE001 - readahead is a hint; the read itself reports
            log.debug("readahead of inode %d at %d failed: %s", ino, start, err)

    def prefetch_chunks(self, chunks: Iterable[FileChunk]) -> int:
        """Fetch these chunks into the cache (no data returned); bytes fetched. One backend
        request carries at most the prefetch ``batch_size`` (nydusd's merging_size)."""
        fetched = 0
        max_request = self.config.rafs.prefetch.batch_size
        for blob_index, refs in self._refs_by_blob(chunks).items():
            refs.sort(key=lambda r: r.c_off)
            cache = self.cache(blob_index)
            for i in range(0, len(refs), 64):
                fetched += cache.ensure(refs[i:i + 64], amplify=False, prefetch=True,
                                        max_request=max_request)
        return fetched

    def chunk_refs(self, blob_index: int, indexes: Iterable[int]) -> list[ChunkRef]:
        """The cache references of chunks of one blob by index (a prefetch list's run);
        indexes the bootstrap's chunk table does not have are left out (a list made for
        another build of the image). A ZRAN or batch chunk is referred to in its span,
        as a reader's miss is (``_ref``)."""
        if not 0 <= blob_index < len(self.bs.blobs):
            return []
        chunk_at = self._chunk_lookup(blob_index)
        refs = [r for r in (chunk_at(i) for i in indexes) if r is not None]
        spans = self._spans(blob_index)
        if spans is None:
            return refs
        out = []
        for r in refs:
            at = spans.locate(r.index)
            out.append(r if at is None else
                       _span_ref(spans, at, r.index, r.u_off, r.u_size, r.digest))
        return out

    def prefetch_refs(self, blob_index: int, refs: list[ChunkRef]) -> int:
        """Fetch those of ``refs`` (of one blob, by ``chunk_refs``) that are neither cached
        nor being fetched by a reader into the cache; bytes fetched."""
        cache = self.cache(blob_index)
        todo = cache.unclaimed(refs)
        if not todo:
            return 0
        return cache.ensure(todo, amplify=False, prefetch=True,
                            max_request=self.config.rafs.prefetch.batch_size)

    def _refs_by_blob(self, chunks: Iterable[FileChunk]) -> dict[int, list[ChunkRef]]:
        """The chunks' cache references, grouped by blob index (order kept within a blob)."""
        by_blob: dict[int, list[ChunkRef]] = {}
        for c in chunks:
            by_blob.setdefault(c.blob_index, []).append(self._ref(c))
        return by_blob


def _span_ref(spans: SpanMap, at: tuple[Span, int], index: int, u_off: int, u_size: int,
              digest: bytes) -> ChunkRef:
    """The cache's reference of chunk ``index`` at ``at`` (its span, its offset there):
    from the span's start to where the chunk's bytes end (a ZRAN context's prefix)."""
    span, inner = at
    return ChunkRef(index=index, c_off=span.offset,
                    c_size=spans.compressed_end(index, span) - span.offset,
                    u_off=u_off, u_size=u_size, compressed=True, digest=digest,
                    span=span, span_offset=inner)


class _JobThread:
    """One thread that runs the jobs given to it in order, started with the first; the
    misses of a random reader hand it one job each, so a hand-off is a SimpleQueue put
    (a ThreadPoolExecutor's took a Future, a lock and two condition variables a job)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; False once ``close`` was called (the job is not run)."""
        with self._lock:
            if self._closed:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._jobs.put(job)
        return True

    def close(self) -> None:
        """Run the jobs queued so far, then end the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._jobs.put(None)
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job reports its own failures; the thread goes on
                log.exception("%s job failed", self.name)


def _no_chunk(index: int) -> ChunkRef | None:
    """Amplification's lookup for blobs it does not extend (spans)."""
    return None


def _by_blob(reads: list[ChunkRead]) -> list[tuple[int, list[ChunkRead]]]:
    """Consecutive, file-contiguous pieces of one blob grouped together, in file order."""
    groups: list[tuple[int, list[ChunkRead]]] = []
    for r in reads:
        if groups and groups[-1][0] == r.chunk.blob_index:
            last = groups[-1][1][-1]
            if last.chunk.file_offset + last.offset + last.length == r.chunk.file_offset + r.offset:
                groups[-1][1].append(r)
                continue
        groups.append((r.chunk.blob_index, [r]))
    return groups
