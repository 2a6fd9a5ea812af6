"""Blob cache: each data chunk is fetched from the backend once, then served locally.

Per blob, in the cache ``work_dir`` (upstream's layout, §5.1 of the spec):
``<blob_id>.blob.data`` is a sparse file of the blob's uncompressed size holding
chunk i's decompressed bytes at its uncompressed offset, and
``<blob_id>.blob.data.chunk_map`` says which chunks are there (see chunkmap.py).

A read names the chunks it needs. Chunks already cached are read with pread.
Missing ones are *claimed* by the first thread that needs them (so concurrent
misses on one chunk fetch it once; later threads wait for the claim), extended
forward with following missing chunks (reads are mostly sequential, and one larger
request costs little more than a small one): up to ``amplify_io`` bytes while the
neighbours a miss brings get read, a window halved down to 16 KiB while they do not
(a start-up that reads one large file after another gains nothing from them),
grouped into contiguous compressed ranges, fetched with one ranged request per
group, decompressed, optionally verified against their digests, written to the
data file and only then marked ready.

A chunk whose digest does not match is fetched once more; if it is still wrong
the read fails (EIO at the FUSE edge) and the log names the blob and chunk.

ZRAN and batch chunks (``ChunkRef.span``) are slices of a *span*: a compressed extent
holding several chunks (a gzip layer's inflate context, a batch). Their ``c_off`` is
the span's start and ``c_size`` runs to where the chunk's compressed bytes end (a ZRAN
chunk: a prefix of its context, which inflates from the start; a batch: all of it), so
chunks of one span group into one request; each span is decoded once per fetch, as far
as the group's chunks need (all of it when the request holds its end), and each chunk
cut out of it. A ZRAN context's inflate stream is kept (``spans``, :class:`SpanDecoder`)
so the context's next chunk fetches and inflates only what follows, and a stream at its
context's end goes on into the next context. The other chunks a decode produced are
stored too (``span_members``) unless chunks are validated (their digests are not at
hand).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pynydus.daemon.chunkmap import ChunkMap
from pynydus.daemon.metrics import CacheStats
from pynydus.errors import FormatError, NotFound, NydusError, Unavailable
from pynydus.rafs.format import Compressor, RafsChunkInfo, decode_chunk
from pynydus.rafs.read import BlobInfo, Span

log = logging.getLogger(__name__)

# Gap between two missing chunks' compressed extents that we still bridge with one
# request (reading the gap is cheaper than a second round trip).
_MERGE_GAP = 64 << 10
# The smallest amplification window (bytes of neighbours after a miss): a probe that
# lets the window grow again when neighbours start being read.
_AMPLIFY_PROBE = 16 << 10
# How long a reader waits for another thread's fetch of a chunk it needs.
_WAIT_SECONDS = 120.0
# How long a miss waits for neighbouring misses to join its request when a request to
# the same blob is already in flight (the kernel's readahead sends a file's next chunks
# as concurrent reads); a miss on an idle blob goes at once.
_GATHER_SECONDS = 0.002


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where one chunk lives in its blob (compressed) and in the cache (uncompressed).

    A chunk of a span (ZRAN, batch) is bytes ``[span_offset, span_offset + u_size)`` of
    the decoded ``span``; its ``c_off``/``c_size`` are the span's extent."""

    index: int
    c_off: int
    c_size: int
    u_off: int
    u_size: int
    compressed: bool
    digest: bytes = b""
    span: Span | None = None
    span_offset: int = 0

    @classmethod
    def of_record(cls, rec: RafsChunkInfo) -> ChunkRef:
        """The reference of a chunk by its record in the bootstrap's chunk table."""
        return cls(index=rec.index, c_off=rec.compressed_offset, c_size=rec.compressed_size,
                   u_off=rec.uncompressed_offset, u_size=rec.uncompressed_size,
                   compressed=rec.is_compressed, digest=rec.digest)


class SpanDecoder(Protocol):
    """Decodes the spans of one blob (:class:`pynydus.rafs.read.spans.SpanMap`)."""

    def resume(self, span: Span, out_from: int) -> Any:
        """A kept decoder state of ``span`` that stopped at or before output ``out_from``
        (its ``in_end``: where the compressed bytes it still needs start), else None."""
        ...

    def decode_from(self, span: Span, data: bytes | memoryview, want: int,
                    stream: Any = None) -> tuple[int, bytes]:
        """``(first, output[first:want])`` from the compressed bytes ``data`` from
        ``stream.in_end`` (or the span's start) on."""
        ...


class Backend(Protocol):
    """Where blobs come from: a registry, a local directory."""

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` of blob ``blob_id``, or raise."""
        ...


class _Claim:
    """A chunk being fetched by one reader. ``done`` is set once its bytes are decoded
    (``data``, while a delayed persist has not written them yet) or the fetch failed
    (``error``); the claim leaves the table once the chunk is in the cache file."""

    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.data: bytes | None = None


class _Batch:
    """Misses gathered into one request while the blob's backend is busy: the first
    reader (the leader) waits ``_GATHER_SECONDS``, neighbours' misses join, then it
    fetches them all; joiners wait for ``done``."""

    __slots__ = ("chunks", "closed", "data", "done", "end", "error", "limit", "start")

    def __init__(self, chunks: list[ChunkRef], limit: int) -> None:
        self.chunks = list(chunks)
        self.start = min(c.c_off for c in chunks)
        self.end = max(c.c_off + c.c_size for c in chunks)
        self.limit = limit
        self.closed = False
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.data: dict[int, bytes] = {}

    def takes(self, chunks: Sequence[ChunkRef]) -> bool:
        start = min(self.start, min(c.c_off for c in chunks))
        end = max(self.end, max(c.c_off + c.c_size for c in chunks))
        gap = max(min(c.c_off for c in chunks) - self.end,
                  self.start - max(c.c_off + c.c_size for c in chunks))
        return not self.closed and gap <= _MERGE_GAP and end - start <= self.limit


# Persists a decoded group later (``job``, ``nbytes`` held in memory until it ran); False
# when it cannot take more, and the caller writes at once.
Persist = Callable[[Callable[[], None], int], bool]


class BlobCache:
    """The cache of one blob. Thread-safe; reads may run concurrently."""

    def __init__(
        self,
        work_dir: str,
        blob: BlobInfo,
        backend: Backend,
        chunk_at: Callable[[int], ChunkRef | None],
        *,
        spans: SpanDecoder | None = None,
        span_members: Callable[[Span], list[ChunkRef]] | None = None,
        validate: bool = False,
        amplify_io: int = 1 << 20,
        stats: CacheStats | None = None,
        persist: Persist | None = None,
    ) -> None:
        self.blob = blob
        self.backend = backend
        self.chunk_at = chunk_at
        self.spans = spans
        self.span_members = span_members
        self.validate = validate
        self.amplify_io = amplify_io
        self.stats = stats or CacheStats()
        self.persist = persist
        os.makedirs(work_dir, exist_ok=True)
        self.data_path = os.path.join(work_dir, f"{blob.blob_id}.blob.data")
        self.map_path = self.data_path + ".chunk_map"
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size < blob.uncompressed_size:
            # A data file that is missing (deleted by cache GC or by hand) or short has lost
            # chunks its map may still call ready: those would be served as zeros. Start
            # the map empty; the chunks are fetched again.
            if os.path.exists(self.map_path):
                log.warning("blob %s: cache data file %s is missing or short; discarding its "
                            "chunk map", blob.blob_id, self.data_path)
                os.unlink(self.map_path)
            os.ftruncate(self._fd, blob.uncompressed_size)
        try:
            self.chunk_map = ChunkMap(self.map_path, blob.chunk_count)
        except BaseException:
            os.close(self._fd)
            raise
        self._lock = threading.Lock()
        self._claims: dict[int, _Claim] = {}
        # Adaptive amplification: the window, the chunks the last one brought, and
        # whether a reader has wanted one of them since.
        self._amp_window = amplify_io
        self._amp_pending: range | None = None
        self._amp_used = False
        self._fetching = 0  # requests to the backend in flight for this blob
        self._batch: _Batch | None = None  # misses gathering for one request

    def close(self) -> None:
        self.chunk_map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # --- reading --------------------------------------------------------------------

    def read(self, pieces: Sequence[tuple[ChunkRef, int, int]], amplify: bool = True,
             fresh: dict[int, bytes] | None = None) -> bytearray:
        """Bytes of ``pieces`` = (chunk, offset in chunk, length), concatenated in order;
        a miss fetches the following chunks too (up to amplify_io) when ``amplify``.

        Chunks fetched for this read are answered from their decoded bytes (left in
        ``fresh`` by chunk index, when given: the caller may want the rest of them); with
        a ``persist`` they are written to the cache file after the answer (upstream's
        delayed persist), and concurrent readers of them take the same bytes meanwhile.
        A bytearray: FUSE replies take any buffer, and this saves a copy per read."""
        if fresh is None:
            fresh = {}
        self._obtain([c for c, _, _ in pieces], amplify=amplify, prefetch=False,
                     max_request=0, fresh=fresh)
        if not fresh:
            return self._pread_pieces(pieces, 0)
        out = bytearray(sum(length for _, _, length in pieces))
        view = memoryview(out)
        pos = 0
        for chunk, off, length in pieces:
            data = fresh.get(chunk.index)
            if data is not None:
                view[pos:pos + length] = memoryview(data)[off:off + length]
            elif length:
                got = os.preadv(self._fd, [view[pos:pos + length]], chunk.u_off + off)
                if got != length:
                    raise FormatError(
                        f"blob {self.blob.blob_id}: cache file short at chunk {chunk.index} "
                        f"(wanted {length} bytes at {chunk.u_off + off}, got {got})")
            pos += length
        return out

    def read_cached(self, pieces: Sequence[tuple[ChunkRef, int, int]], *,
                    nowait: bool = True) -> bytearray | None:
        """The bytes if every chunk is cached, else None; never waits for the backend.

        ``nowait`` (an event loop's caller): None also when a byte is not in the page
        cache, so it never blocks on the disk either (RWF_NOWAIT) and a warm read costs no
        thread hand-off. Without it the cache file is read from the disk if need be: a
        caller that may block (a FUSE worker) reads once instead of twice.
        """
        if not all(self.chunk_map.is_ready(c.index) for c, _, _ in pieces):
            return None
        self._note_use(c.index for c, _, _ in pieces)
        try:
            out = self._pread_pieces(pieces, os.RWF_NOWAIT if nowait else 0)
        except BlockingIOError:
            return None
        self.stats.add(hits=len(pieces))
        return out

    def has(self, index: int, *, landing: bool = False) -> bool:
        """Chunk ``index`` is in the cache file (``landing``: or being fetched, or
        waiting for its delayed persist)."""
        return self.chunk_map.is_ready(index) or (landing and index in self._claims)

    def will_need(self, chunks: Sequence[ChunkRef]) -> None:
        """Ask the kernel to read these chunks' cached bytes ahead (returns at once)."""
        if not chunks:
            return
        start = min(c.u_off for c in chunks)
        end = max(c.u_off + c.u_size for c in chunks)
        try:
            os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def _pread_pieces(self, pieces: Sequence[tuple[ChunkRef, int, int]], flags: int) -> bytearray:
        out = bytearray(sum(length for _, _, length in pieces))
        view = memoryview(out)
        pos = 0
        for chunk, off, length in pieces:
            got = os.preadv(self._fd, [view[pos:pos + length]], chunk.u_off + off, flags) if length else 0
            if got != length:
                if flags:  # RWF_NOWAIT may return what is cached and stop
                    raise BlockingIOError
                raise FormatError(
                    f"blob {self.blob.blob_id}: cache file short at chunk {chunk.index} "
                    f"(wanted {length} bytes at {chunk.u_off + off}, got {got})"
                )
            pos += length
        return out

    def unclaimed(self, chunks: Sequence[ChunkRef]) -> list[ChunkRef]:
        """Those of ``chunks`` neither in the cache nor being fetched by another thread
        (background work leaves those alone rather than wait for them)."""
        with self._lock:
            return [c for c in chunks
                    if c.index not in self._claims and not self.chunk_map.is_ready(c.index)]

    def ensure(self, chunks: Sequence[ChunkRef], *, amplify: bool = True, prefetch: bool = False,
               max_request: int = 0) -> int:
        """Make every chunk of ``chunks`` ready in the cache; returns bytes fetched by us.

        ``max_request`` caps one ranged request (default: amplify_io, at least 1 MiB);
        background work (readahead, prefetch) asks for larger ones: fewer round trips.
        On return the chunks are in the cache file (or, for a moment, in a delayed
        persist that a later read waits for).
        """
        return self._obtain(chunks, amplify=amplify, prefetch=prefetch,
                            max_request=max_request, fresh=None)

    def _obtain(self, chunks: Sequence[ChunkRef], *, amplify: bool, prefetch: bool,
                max_request: int, fresh: dict[int, bytes] | None) -> int:
        """``ensure``; with ``fresh`` (a foreground read) the decoded bytes of chunks this
        call fetched or found decoded in another reader's claim go there, misses may join
        a gathering request, and persisting may be delayed."""
        hits = sum(1 for c in chunks if self.chunk_map.is_ready(c.index))
        if hits:
            self.stats.add(hits=hits)
        mine, theirs = self._claim(chunks, amplify)
        fetched = 0
        if mine:
            if fresh is None:
                fetched = self._fetch(mine, prefetch=prefetch, max_request=max_request)
            else:
                fetched = self._fetch_gathered(mine, fresh)
        retried: set[int] = set()
        while theirs:
            index, claim = theirs.pop()
            if not claim.done.wait(_WAIT_SECONDS):
                raise Unavailable(f"blob {self.blob.blob_id}: chunk {index}: timed out waiting for fetch")
            if claim.error is not None and index not in retried:
                # The other reader's fetch failed; try once ourselves (the fault may be gone).
                # A third reader may have claimed it first: then wait for that claim too,
                # never go on to read a chunk that is not in the cache (it reads as zeros).
                retried.add(index)
                again, more = self._claim([c for c in chunks if c.index == index], False)
                if again:
                    fetched += self._fetch(again, prefetch=prefetch, fresh=fresh)
                theirs.extend(more)
            elif claim.error is None and claim.data is not None:
                if fresh is not None:
                    fresh[index] = claim.data
                elif not self.chunk_map.is_ready(index):
                    self._wait_persisted(index, claim)
        missing = [c.index for c in chunks
                   if not self.chunk_map.is_ready(c.index) and (fresh is None or c.index not in fresh)]
        if missing:
            raise Unavailable(f"blob {self.blob.blob_id}: chunk {missing[0]}: fetch by another "
                              f"reader failed")
        return fetched

    def _claim(self, chunks: Sequence[ChunkRef], amplify: bool) -> tuple[list[ChunkRef], list[tuple[int, _Claim]]]:
        mine: dict[int, ChunkRef] = {}
        theirs: list[tuple[int, _Claim]] = []
        with self._lock:
            self._note_use(c.index for c in chunks)
            for c in chunks:
                if c.index in mine or self.chunk_map.is_ready(c.index):
                    continue
                claim = self._claims.get(c.index)
                if claim is not None:
                    theirs.append((c.index, claim))
                    continue
                self._claims[c.index] = _Claim()
                mine[c.index] = c
            if mine and amplify and self.amplify_io > 0:
                if self._amp_pending is not None:
                    # How did the previous amplification do? Grow the window while its
                    # chunks get read, halve it while they do not (down to a probe).
                    if self._amp_used:
                        self._amp_window = min(self.amplify_io, self._amp_window * 2)
                    else:
                        self._amp_window = max(_AMPLIFY_PROBE, self._amp_window // 2)
                budget = max(self._amp_window - sum(c.c_size for c in mine.values()),
                             min(_AMPLIFY_PROBE, self.amplify_io))
                first = nxt = max(mine) + 1
                while budget > 0 and nxt < self.blob.chunk_count:
                    if nxt in mine or nxt in self._claims or self.chunk_map.is_ready(nxt):
                        break
                    extra = self.chunk_at(nxt)
                    if extra is None:
                        break
                    self._claims[nxt] = _Claim()
                    mine[nxt] = extra
                    budget -= extra.c_size
                    nxt += 1
                self._amp_pending = range(first, nxt) or None  # the neighbours it brought
                self._amp_used = False
        return sorted(mine.values(), key=lambda c: c.c_off), theirs

    def _note_use(self, indexes: Iterable[int]) -> None:
        """A reader wants these chunks: credit the last amplification if it brought one."""
        pending = self._amp_pending
        if pending and not self._amp_used and any(i in pending for i in indexes):
            self._amp_used = True

    def _release(self, chunks: Sequence[ChunkRef], error: BaseException | None) -> None:
        with self._lock:
            for c in chunks:
                claim = self._claims.pop(c.index, None)
                if claim is not None:
                    claim.error = error
                    claim.done.set()

    def _wait_persisted(self, index: int, claim: _Claim) -> None:
        """Background work found a chunk decoded but not yet written: wait for the write
        (the claim leaves the table then); a failed write leaves the chunk missing."""
        deadline = time.monotonic() + _WAIT_SECONDS
        while time.monotonic() < deadline:
            with self._lock:
                if self._claims.get(index) is not claim:
                    return
            time.sleep(0.001)

    def _fetch_gathered(self, chunks: list[ChunkRef], fresh: dict[int, bytes]) -> int:
        """A foreground read's claimed misses: fetched at once while the blob's backend is
        idle; while it is busy, gathered with concurrent neighbouring misses into one
        request (the first of them waits ``_GATHER_SECONDS`` for the others)."""
        limit = max(self.amplify_io, 1 << 20)
        leader: _Batch | None = None
        joined: _Batch | None = None
        with self._lock:
            batch = self._batch
            if batch is not None and batch.takes(chunks):
                batch.chunks.extend(chunks)
                batch.start = min(batch.start, min(c.c_off for c in chunks))
                batch.end = max(batch.end, max(c.c_off + c.c_size for c in chunks))
                joined = batch
            elif self._fetching > 0 and _GATHER_SECONDS > 0:
                leader = self._batch = _Batch(chunks, limit)
        if joined is not None:
            if not joined.done.wait(_WAIT_SECONDS):
                raise Unavailable(f"blob {self.blob.blob_id}: timed out waiting for a fetch")
            if joined.error is not None:
                raise Unavailable(f"blob {self.blob.blob_id}: {joined.error}") from joined.error
            for c in chunks:
                if c.index in joined.data:
                    fresh[c.index] = joined.data[c.index]
            return 0
        if leader is None:
            return self._fetch(chunks, prefetch=False, fresh=fresh)
        time.sleep(_GATHER_SECONDS)
        with self._lock:
            leader.closed = True
            if self._batch is leader:
                self._batch = None
            members = sorted(leader.chunks, key=lambda c: c.c_off)
        try:
            return self._fetch(members, prefetch=False, fresh=leader.data)
        except BaseException as err:
            leader.error = err
            raise
        finally:
            fresh.update(leader.data)
            leader.done.set()

    def _fetch(self, chunks: list[ChunkRef], *, prefetch: bool, max_request: int = 0,
               fresh: dict[int, bytes] | None = None) -> int:
        """Fetch claimed ``chunks`` (sorted by c_off); releases every claim, even on error.
        With ``fresh`` the decoded bytes go there too and may be persisted later."""
        fetched = 0
        pending = list(chunks)
        with self._lock:
            self._fetching += 1
        try:
            for group in plan_ranges(chunks, max_request or max(self.amplify_io, 1 << 20)):
                fetched += self._fetch_group(group, prefetch=prefetch, fresh=fresh)
                pending = pending[len(group):]
        except BaseException as err:
            self._release(pending, err)
            raise
        finally:
            with self._lock:
                self._fetching -= 1
        return fetched

    def _fetch_group(self, group: list[ChunkRef], *, prefetch: bool,
                     fresh: dict[int, bytes] | None = None) -> int:
        """Fetch, decode and store one group; its claims are released once the chunks are
        in the cache file (at once, or after a delayed persist: ``fresh`` given and the
        cache has a ``persist``; their claims then hold the bytes meanwhile)."""
        streams = self._resume(group)
        try:
            # a resumed span needs only the bytes after those its stream was fed
            start = min(streams[c.span].in_end if c.span in streams else c.c_off
                        for c in group)
            end = max(c.c_off + c.c_size for c in group)
            raw = memoryview(self._backend_read(start, end - start, prefetch=prefetch)
                             if end > start else b"")
            spans = self._decode_spans(group, raw, start, streams, prefetch)
        finally:
            for stream in streams.values():  # taken but not reached (an error)
                stream.close()
        decoded: list[tuple[ChunkRef, bytes]] = []
        for c in group:
            data = self._chunk_of(c, raw, start, spans)
            if data is None:  # digest mismatch: fetch this one chunk once more
                self.stats.add(digest_failures=1)
                log.warning("blob %s chunk %d: digest mismatch, fetching again", self.blob.blob_id, c.index)
                again = memoryview(self._backend_read(c.c_off, c.c_size, prefetch=prefetch))
                data = self._chunk_of(c, again, c.c_off,
                                      self._decode_spans([c], again, c.c_off, {}, prefetch))
                if data is None:
                    self.stats.add(digest_failures=1)
                    log.error("blob %s chunk %d: digest mismatch after refetch; failing the read",
                              self.blob.blob_id, c.index)
                    raise FormatError(f"blob {self.blob.blob_id} chunk {c.index}: digest mismatch")
            decoded.append((c, data))
        self.stats.add(misses=len(group))
        if fresh is not None:
            for c, data in decoded:
                fresh[c.index] = data
        if spans and self.span_members is not None and not self.validate:
            decoded += self._claim_span_members(spans)
        nbytes = sum(len(d) for _, d in decoded)
        if fresh is not None and self.persist is not None:
            with self._lock:
                for c, data in decoded:
                    claim = self._claims.get(c.index)
                    if claim is not None:
                        claim.data = data
                        claim.done.set()  # readers of these chunks take the bytes now

            def job() -> None:
                self._persist(decoded)

            if self.persist(job, nbytes):
                return max(end - start, 0)
        self._persist(decoded, raise_errors=True)
        return max(end - start, 0)

    def _persist(self, decoded: list[tuple[ChunkRef, bytes]], raise_errors: bool = False) -> None:
        """Write decoded chunks to the cache file, mark them ready, release their claims.
        A failed delayed write (disk full) leaves them missing: fetched again later."""
        error: BaseException | None = None
        try:
            for c, data in decoded:
                if self._fd < 0:
                    raise Unavailable(f"blob {self.blob.blob_id}: cache closed")
                os.pwrite(self._fd, data, c.u_off)
            self.chunk_map.set_ready([c.index for c, _ in decoded])
        except BaseException as err:
            error = err
            if raise_errors:
                self._release([c for c, _ in decoded], err)
                raise
            log.warning("blob %s: writing %d chunks to the cache failed: %s",
                        self.blob.blob_id, len(decoded), err)
        self._release([c for c, _ in decoded], error)

    def _claim_span_members(self, spans: dict[Span, tuple[int, bytes]]) -> list[tuple[ChunkRef, bytes]]:
        """The other chunks the decoded spans (``(first, output from there)``) hold in full
        that nobody has or is fetching, claimed: they are stored with the fetched ones
        (and, while a delayed write is pending, served from their claims)."""
        extra: list[tuple[ChunkRef, bytes]] = []
        with self._lock:
            for span, (first, out) in spans.items():
                assert self.span_members is not None
                for m in self.span_members(span):
                    if m.span_offset < first or m.span_offset + m.u_size > first + len(out) \
                            or m.index in self._claims or self.chunk_map.is_ready(m.index):
                        continue
                    self._claims[m.index] = _Claim()
                    extra.append((m, out[m.span_offset - first:m.span_offset - first + m.u_size]))
        return extra

    def _resume(self, group: Sequence[ChunkRef]) -> dict[Span, Any]:
        """The kept decoder states the group's spans can continue from (taken: the
        caller hands each to ``decode_from`` or closes it)."""
        if self.spans is None:
            return {}
        lowest: dict[Span, int] = {}
        for c in group:
            if c.span is not None:
                lowest[c.span] = min(lowest.get(c.span, c.span_offset), c.span_offset)
        found = {}
        for span, out_from in lowest.items():
            stream = self.spans.resume(span, out_from)
            if stream is not None:
                found[span] = stream
        return found

    def _decode_spans(self, group: Sequence[ChunkRef], raw: memoryview, start: int,
                      streams: dict[Span, Any], prefetch: bool) -> dict[Span, tuple[int, bytes]]:
        """Each span of ``group`` decoded as far as the group's chunks need, from ``raw``
        (the blob's bytes at ``start``): ``(first output offset, output)``; a span that
        does not decode is left out (its chunks are fetched again). ``streams`` (from
        :meth:`_resume`) are handed on and removed from it."""
        # span -> (compressed end, output end, lowest output offset wanted)
        need: dict[Span, tuple[int, int, int]] = {}
        for c in group:
            if c.span is not None:
                c_end, want, low = need.get(c.span, (0, 0, c.span_offset))
                need[c.span] = (max(c_end, c.c_off + c.c_size),
                                max(want, c.span_offset + c.u_size), min(low, c.span_offset))
        out: dict[Span, tuple[int, bytes]] = {}
        if need:  # the ZRAN code (ctypes' libz) loads with a blob that has spans
            from pynydus.rafs.format import zran
        stop = start + len(raw)
        for span, (c_end, want, low) in need.items():
            if span.offset + span.size <= stop:
                # the bytes fetched hold the whole span (the group goes on past it):
                # decode it all, its other chunks are stored and a ZRAN stream at the
                # context's end goes on into the next context of the group
                c_end, want = span.offset + span.size, span.out_len
            stream = streams.pop(span, None)
            if stream is None and self.spans is not None:
                # the span before it in this group may have left a stream to go on with
                stream = self.spans.resume(span, low)
                if stream is not None and not start <= stream.in_end <= max(c_end, start):
                    stream.close()  # another reader's, outside these bytes
                    stream = None
            begin = span.offset if stream is None else stream.in_end
            data = raw[begin - start:max(begin, c_end) - start]
            try:
                if self.spans is None:
                    raise FormatError(f"blob {self.blob.blob_id}: {span.kind} chunk but no "
                                      f"span decoder")
                try:
                    out[span] = self.spans.decode_from(span, data, want, stream)
                except zran.ZranInputShort as err:
                    # The chunk entry understated where its bytes end: the whole context.
                    log.warning("blob %s: %s; reading the whole context", self.blob.blob_id, err)
                    whole = self._backend_read(span.offset, span.size, prefetch=prefetch)
                    out[span] = self.spans.decode_from(span, whole, want)
            except FormatError as err:
                log.warning("blob %s %s %d: %s", self.blob.blob_id, span.kind, span.index, err)
        return out

    def _chunk_of(self, c: ChunkRef, raw: memoryview, start: int,
                  spans: dict[Span, tuple[int, bytes]]) -> bytes | None:
        """Chunk ``c`` from ``raw`` (the blob's bytes at ``start``) or, for a span chunk,
        from its decoded span; None when it is corrupt (the caller fetches again)."""
        if c.span is None:
            return self._decode(c, raw[c.c_off - start:c.c_off - start + c.c_size])
        seg = spans.get(c.span)
        if seg is None:
            return None
        first, out = seg
        piece = out[c.span_offset - first:c.span_offset - first + c.u_size]
        try:
            return decode_chunk(
                piece, compressed=False, compressor=Compressor.NONE, uncompressed_size=c.u_size,
                expected_digest=c.digest if self.validate else b"", digester=self.blob.digester,
                what=f"blob {self.blob.blob_id} chunk {c.index} ({c.span.kind} {c.span.index})")
        except FormatError as err:
            log.warning("%s", err)
            return None

    def _decode(self, c: ChunkRef, payload: bytes | memoryview) -> bytes | None:
        """The chunk's bytes, or None when they are corrupt (the caller fetches again)."""
        if len(payload) != c.c_size:
            raise FormatError(
                f"blob {self.blob.blob_id} chunk {c.index}: backend returned {len(payload)} of "
                f"{c.c_size} bytes"
            )
        try:
            return decode_chunk(
                payload, compressed=c.compressed, compressor=self.blob.compressor,
                uncompressed_size=c.u_size, expected_digest=c.digest if self.validate else b"",
                digester=self.blob.digester, what=f"blob {self.blob.blob_id} chunk {c.index}",
            )
        except FormatError as err:
            # A payload that does not decode is as wrong as one with a bad digest.
            log.warning("%s", err)
            return None

    def _backend_read(self, offset: int, length: int, *, prefetch: bool) -> bytes:
        t0 = time.perf_counter()

        def count(size: int, error: bool) -> None:
            millis = int((time.perf_counter() - t0) * 1e3)
            self.stats.backend_read(size, millis, error=error, prefetch=prefetch and not error)

        try:
            data = self.backend.read_range(self.blob.blob_id, offset, length)
        except NotFound as err:
            # A blob the image needs is missing from the backend: an I/O error for
            # the reader (ENOENT would claim the *file* does not exist).
            count(0, True)
            raise Unavailable(f"blob {self.blob.blob_id}: {err}") from err
        except NydusError as err:
            count(0, True)
            if err.errno == errno.EIO:
                raise
            # Any backend failure is an I/O error for the reader, as in nydusd: EACCES
            # (registry refused our credentials) or EINVAL from read(2) would blame the
            # caller for what is the daemon's configuration or the registry's fault.
            raise Unavailable(f"blob {self.blob.blob_id}: {err}") from err
        except OSError as err:
            count(0, True)
            raise Unavailable(f"blob {self.blob.blob_id}: read {length} bytes at {offset}: {err}") from err
        count(len(data), len(data) != length)
        if len(data) != length:
            raise Unavailable(
                f"blob {self.blob.blob_id}: backend returned {len(data)} of {length} bytes at {offset}"
            )
        return data


def plan_ranges(chunks: Sequence[ChunkRef], max_request: int) -> list[list[ChunkRef]]:
    """Group chunks (sorted by compressed offset) into ranges for single requests.

    Neighbours are joined when the gap between them is at most 64 KiB (or they
    overlap, as chunks of one span share its extent) and the joined range stays within
    ``max_request`` bytes (a single chunk may exceed it alone).
    """
    groups: list[list[ChunkRef]] = []
    # The open group's extent is kept as we go: recomputing its end from all its
    # members made this quadratic, and an amplified miss over small files plans
    # 1,000+ chunks (seconds of CPU on the read path for a 50,000-file image).
    g_start = g_end = 0
    for c in chunks:
        inside = c.c_off + c.c_size <= g_end  # another chunk of a span already planned
        if groups and (inside or (c.c_off - g_end <= _MERGE_GAP
                                  and c.c_off + c.c_size - g_start <= max_request)):
            groups[-1].append(c)
            g_end = max(g_end, c.c_off + c.c_size)
            continue
        groups.append([c])
        g_start, g_end = c.c_off, c.c_off + c.c_size
    return groups


class LocalFsBackend:
    """Blobs as files ``<dir>/<blob_id>`` (nydusd's ``localfs`` backend), or one ``blob_file``."""

    def __init__(self, directory: str = "", blob_file: str = "", alt_dirs: Sequence[str] = ()) -> None:
        self.dirs = [d for d in [directory, *alt_dirs] if d]
        self.blob_file = blob_file
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, blob_id: str) -> int:
        with self._lock:
            fd = self._fds.get(blob_id)
            if fd is not None:
                return fd
            candidates = [self.blob_file] if self.blob_file else [os.path.join(d, blob_id) for d in self.dirs]
            for path in candidates:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                self._fds[blob_id] = fd
                return fd
        from pynydus.errors import NotFound

        raise NotFound(f"localfs: blob {blob_id} not found in {', '.join(candidates) or '(no dir)'}")

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        return os.pread(self._fd(blob_id), length, offset)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
