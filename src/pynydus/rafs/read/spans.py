"""Chunks that are not stored one by one: ZRAN and batch chunks (spec §2.4, §2.5).

Most chunks are a compressed extent of their own in the data blob, and the bootstrap's
chunk record says where. Two kinds are not:

* **ZRAN** (``targz-ref``): the data blob is the original gzip layer; a chunk is a slice
  of the output of one inflate *context* (see :mod:`pynydus.rafs.format.zran`). The
  chunk-info array, contexts and dictionaries live in a separate meta blob named by the
  blob table's ``blob_meta_digest``.
* **batch** (``--batch-size``): small chunks concatenated and compressed as one unit; a
  chunk is a slice of the decompressed batch. The chunk-info array is in the blob itself.

Both are a :class:`Span`: a compressed extent of the data blob that decodes to a buffer
holding several chunks. :class:`SpanMap` (built from the blob's chunk-info array, which
only these blobs need) tells which span holds a chunk and where in it; reading the
span's bytes is the caller's business (a blob file, a registry, a cache), so this stays
free of I/O apart from :func:`load_span_map`, which is handed the read function.

A ZRAN meta blob whose chunk info is framed (:mod:`pynydus.rafs.format.zran`) is read
in parts: its index, the entries and contexts, the header (two to four small reads), and a
context's window when the context is first inflated: one ranged read of its frame and
the frames after it (up to 256 KiB), which are kept for their contexts. Given a way to
run jobs on another thread, that read starts when a reader is about to fetch the
context's bytes (:meth:`SpanMap.resume` finds no stream), so the two reads overlap.
Other chunk info is read whole, in one read.

A ZRAN chunk needs its context only up to its own end (:meth:`SpanMap.compressed_end`);
the inflate stream that decoded it is kept (:meth:`SpanMap.resume`, at most
:data:`_KEEP_STREAMS` per blob), so the context's next chunk continues from there. A
stream that reaches its context's end goes on as the next context's (the layer is one
deflate stream): a reader of that context fetches from where the stream stopped, needs
no window and does not read again the deflate block the two contexts share.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynydus.errors import FormatError
from pynydus.rafs.format import BlobFeatures, Compressor, decompress
from pynydus.rafs.format.blobmeta import (
    BLOB_CCT_HEADER_SIZE,
    BLOB_CHUNK_INFO_V2_SIZE,
    BatchContext,
    BlobChunkInfo,
    BlobCompressionContextHeader,
    BlobMeta,
    ChunkInfoFlags,
    ZranContext,
    check_header,
    meta_from_parts,
    parse_blob_meta,
)
from pynydus.rafs.read.bootstrap import BlobInfo

if TYPE_CHECKING:
    from concurrent.futures import Future

    from pynydus.rafs.format.zran import ContextStream, FramedChunkInfo, ZranTable

log = logging.getLogger(__name__)

#: ``read_range(blob_id, offset, length) -> bytes``: exactly ``length`` bytes, or raise.
ReadRange = Callable[[str, int, int], bytes]
#: Runs a job on another thread (an executor's ``submit``): window reads that overlap a
#: reader's data read.
RunJob = Callable[[Callable[[], None]], "Future[None]"]

ZRAN, BATCH = "zran", "batch"
#: A V2 chunk-info entry: uncompressed info (flags in the top byte), compressed info, data
#: (for ZRAN and batch chunks: the span's number in the high 32 bits).
_ENTRY_V2 = struct.Struct("<QQQ")
_ZRAN_BIT, _BATCH_BIT = int(ChunkInfoFlags.ZRAN), int(ChunkInfoFlags.BATCH)


@dataclass(frozen=True, slots=True)
class Span:
    """A compressed extent of a data blob that decodes to ``out_len`` bytes holding
    several chunks: ZRAN context or batch number ``index``."""

    kind: str
    index: int
    offset: int
    size: int
    out_len: int


def has_spans(blob: BlobInfo) -> bool:
    """Whether a blob's chunks may live in spans (ZRAN or batch blobs)."""
    return bool(blob.features & (BlobFeatures.ZRAN | BlobFeatures.BATCH))


def meta_blob_id(blob: BlobInfo) -> str:
    """The blob holding ``blob``'s chunk-info array: the separate meta blob of a ZRAN
    image (``blob_meta_digest``), else the data blob itself."""
    if blob.features & BlobFeatures.SEPARATE:
        return blob.blob_meta_digest.hex()
    return blob.blob_id


#: Inflate streams kept per ZRAN blob for their context's next chunk (~40 KiB each).
_KEEP_STREAMS = 16
#: A stream at its context's end goes on into the next context when that one starts
#: within this many compressed bytes of the stream's input end (reading them costs less
#: than a round trip, as blobcache's merge gap) ...
_FOLLOW_GAP = 64 << 10
#: ... and this many bytes of output (inflated and dropped: tar headers, files the
#: builder deduplicated).
_FOLLOW_SKIP = 256 << 10


class SpanMap:
    """Which span holds each chunk of one ZRAN or batch blob, and how to decode spans.
    Thread-safe (a kept inflate stream belongs to one reader at a time)."""

    def __init__(self, blob: BlobInfo, meta: BlobMeta,
                 windows: _FrameWindows | None = None) -> None:
        self.blob = blob
        self.meta = meta
        self._windows = windows
        self._zran: ZranTable | None = None
        if blob.features & BlobFeatures.ZRAN:
            # the ZRAN code (and libz through ctypes) loads with the first ZRAN blob
            from pynydus.rafs.format.zran import ZranTable

            self._zran = ZranTable.from_meta(meta, windows)
        self._members: dict[tuple[str, int], list[int]] | None = None
        self._members_lock = threading.Lock()
        self._batches: list[BatchContext] = []
        if blob.features & BlobFeatures.BATCH:
            self._batches = [c for c in meta.contexts() if isinstance(c, BatchContext)]
        self._streams: OrderedDict[int, ContextStream] = OrderedDict()  # context -> stream
        self._streams_lock = threading.Lock()

    def chunk_info(self, index: int) -> BlobChunkInfo:
        return self.meta.chunk(index)

    def locate(self, index: int) -> tuple[Span, int] | None:
        """(span, offset of the chunk in the span's output) of chunk ``index``, or None
        when the chunk is stored on its own. FormatError if its entry is inconsistent."""
        ci = self.meta.chunk(index)
        sub, inner = ci.data >> 32, ci.data & 0xFFFF_FFFF
        if ci.flags & ChunkInfoFlags.ZRAN:
            if self._zran is None or sub >= len(self._zran.contexts):
                raise FormatError(f"blob {self.blob.blob_id} chunk {index}: zran context {sub} "
                                  f"does not exist")
            ctx = self._zran.contexts[sub]
            span = Span(ZRAN, sub, ctx.in_offset, ctx.in_len, ctx.out_len)
        elif ci.flags & ChunkInfoFlags.BATCH:
            if sub >= len(self._batches):
                raise FormatError(f"blob {self.blob.blob_id} chunk {index}: batch {sub} "
                                  f"does not exist")
            b = self._batches[sub]
            span = Span(BATCH, sub, ci.compressed_offset, b.compressed_size,
                        b.uncompressed_batch_size)
        else:
            return None
        if inner + ci.uncompressed_size > span.out_len:
            raise FormatError(f"blob {self.blob.blob_id} chunk {index}: {inner}+"
                              f"{ci.uncompressed_size} beyond its {span.kind} span of "
                              f"{span.out_len} bytes")
        return span, inner

    def compressed_end(self, index: int, span: Span) -> int:
        """Where the compressed bytes chunk ``index`` of ``span`` needs end: for a ZRAN
        chunk its entry's compressed end (by then the layer's inflate had produced the
        chunk's last byte; upstream's entries and ours both say so), within the context;
        else, or for an entry outside its context, the span's end."""
        end = span.offset + span.size
        if span.kind != ZRAN:
            return end
        c_end = self.meta.chunk(index).compressed_end
        return c_end if span.offset < c_end <= end else end

    def members(self, span: Span) -> list[int]:
        """Indexes of every chunk ``span`` holds. The whole array is scanned once, for
        each entry's flags and span number only (decoding and checking every entry, as
        :meth:`locate` does, took 0.1-0.2 s of a reader's first miss for a layer of
        7,000 chunks); the caller checks the members it uses (:meth:`chunk_info`)."""
        with self._members_lock:
            if self._members is None:
                found: dict[tuple[str, int], list[int]] = {}
                if self.meta.v2:
                    n = self.meta.chunk_count
                    entries = memoryview(self.meta.data)[:n * BLOB_CHUNK_INFO_V2_SIZE]
                    for i, (uncomp, _, data) in enumerate(_ENTRY_V2.iter_unpack(entries)):
                        flags = uncomp >> 56
                        if flags & _ZRAN_BIT:
                            found.setdefault((ZRAN, data >> 32), []).append(i)
                        elif flags & _BATCH_BIT:
                            found.setdefault((BATCH, data >> 32), []).append(i)
                self._members = found
            return self._members.get((span.kind, span.index), [])

    def decode(self, span: Span, raw: bytes | memoryview, want: int | None = None) -> bytes:
        """The output of ``span`` (its first ``want`` bytes if given) from its
        ``span.size`` compressed bytes."""
        if span.kind == ZRAN:
            from pynydus.rafs.format.zran import inflate_context

            assert self._zran is not None
            return inflate_context(self._zran.contexts[span.index],
                                   self._zran.window(span.index), raw, want)
        return self._decode_batch(span, raw, want)

    def resume(self, span: Span, out_from: int) -> ContextStream | None:
        """The inflate stream a reader left in ZRAN context ``span``, if it stopped at or
        before output ``out_from``, else None (and always for batch spans). The caller
        owns it until it hands it to :meth:`decode_from`. None for a ZRAN context starts
        the read of its window in the background (framed chunk info with a ``run``):
        the caller's read of the context's bytes and the window's overlap."""
        if span.kind != ZRAN:
            return None
        with self._streams_lock:
            stream = self._streams.get(span.index)
            if stream is not None and stream.out_pos <= out_from:
                del self._streams[span.index]
                return stream
        if self._windows is not None:  # the caller inflates the context from its start
            self._windows.start(span.index)
        return None

    def decode_from(self, span: Span, data: bytes | memoryview, want: int,
                    stream: ContextStream | None = None) -> tuple[int, bytes]:
        """``(first, output[first:want])`` of ``span``. ``data``: its compressed bytes from
        ``stream.in_end`` on (a stream from :meth:`resume`; ``first`` is where it had
        stopped) or from ``span.offset`` on (``first`` 0), as far as ``want`` needs
        (batch spans: the whole span). The ZRAN stream is kept for the context's next
        chunk. ZranInputShort when ``data`` ends before ``want`` bytes of output."""
        if span.kind != ZRAN:
            return 0, self._decode_batch(span, data, want)
        assert self._zran is not None
        if stream is None:
            from pynydus.rafs.format.zran import ContextStream

            stream = ContextStream(self._zran.contexts[span.index],
                                   self._zran.window(span.index))
        first = max(stream.out_pos, 0)  # below 0: a stream that followed into the span
        try:
            stream.feed(data)
            out = stream.take(want)
        except BaseException:
            stream.close()
            raise
        self._keep(span.index, stream)
        return first, out

    def _keep(self, index: int, stream: ContextStream) -> None:
        if stream.out_pos >= stream.ctx.out_len:  # done with its context: on to the next
            index += 1
            with self._streams_lock:  # unless a reader is in that one already
                taken = index in self._streams
            if taken or not self._follows(index, stream):
                stream.close()
                return
            assert self._zran is not None
            stream.follow(self._zran.contexts[index])
        with self._streams_lock:
            done = [s for s in (self._streams.pop(index, None),) if s is not None]
            self._streams[index] = stream
            while len(self._streams) > _KEEP_STREAMS:
                done.append(self._streams.popitem(last=False)[1])
        for s in done:
            s.close()

    def _follows(self, index: int, stream: ContextStream) -> bool:
        """Whether a stream at the end of its context goes on as context ``index``'s:
        the context exists and starts within :data:`_FOLLOW_GAP` compressed bytes of
        where the stream's input ends and :data:`_FOLLOW_SKIP` bytes of its output (a
        reader of that context then fetches from the stream's end and needs no window)."""
        assert self._zran is not None
        if index >= len(self._zran.contexts):
            return False
        nxt, end = self._zran.contexts[index], stream.ctx.out_offset + stream.out_pos
        return (stream.in_end <= nxt.in_offset + nxt.in_len
                and nxt.in_offset - stream.in_end <= _FOLLOW_GAP
                and stream.ctx.out_offset <= nxt.out_offset
                and nxt.out_offset - end <= _FOLLOW_SKIP)

    def _decode_batch(self, span: Span, raw: bytes | memoryview, want: int | None) -> bytes:
        algo = self.blob.compressor if span.size != span.out_len else Compressor.NONE
        try:
            out = decompress(raw, algo, span.out_len)
        except FormatError as err:
            raise FormatError(f"blob {self.blob.blob_id} batch {span.index}: {err}") from err
        return out if want is None else out[:want]


#: What the first read of a framed chunk-info payload asks for: its index and, for most
#: images, its head too (a 600 MB layer has ~600 entries and contexts).
_PROBE = 64 << 10
#: Windows kept by a framed span map (32 KiB each): a context is inflated once per miss.
_KEEP_WINDOWS = 32
#: A window's frame is read with the frames after it, up to this many bytes: one round
#: trip for the next contexts too (sparse windows of incompressible data are a few bytes).
_WINDOW_BATCH = 256 << 10
#: Frames kept that were read with another (a few MiB at most).
_KEEP_RAW = 256
#: How long a reader waits for a window read started in the background before it reads
#: the window itself (the registry client's own timeouts end a stuck read before).
_WINDOW_WAIT = 120.0


def load_span_map(blob: BlobInfo, read_range: ReadRange, run: RunJob | None = None) -> SpanMap:
    """Read and validate the chunk-info array of ``blob`` (from its meta blob for ZRAN).
    Framed ZRAN chunk info costs two to four small reads now and one per window later (through
    ``read_range``, which must then stay usable; with ``run``, started by
    :meth:`SpanMap.resume` on another thread); other chunk info one read."""
    meta_id = meta_blob_id(blob)
    c_size = blob.ci_compressed_size
    whole = c_size + BLOB_CCT_HEADER_SIZE
    if not (blob.features & BlobFeatures.ZRAN and blob.ci_compressor == Compressor.ZSTD):
        return SpanMap(blob, parse_blob_meta(read_range(meta_id, blob.ci_offset, whole), blob))
    from pynydus.rafs.format.zran import framed_index_size, parse_framed_ci

    first = read_range(meta_id, blob.ci_offset, min(c_size, _PROBE))
    n = framed_index_size(first)
    if n is None:
        rest = read_range(meta_id, blob.ci_offset + len(first), whole - len(first))
        return SpanMap(blob, parse_blob_meta(first + rest, blob))
    if n > c_size:
        raise FormatError(f"blob {blob.blob_id}: framed chunk info index of {n} bytes "
                          f"beyond its {c_size}")
    if len(first) < n:
        first += read_range(meta_id, blob.ci_offset + len(first), n - len(first))
    frames = parse_framed_ci(first[:n], c_size)
    if len(first) < frames.head_end:
        first += read_range(meta_id, blob.ci_offset + len(first), frames.head_end - len(first))
    raw_header = read_range(meta_id, blob.ci_offset + c_size, BLOB_CCT_HEADER_SIZE)
    header = BlobCompressionContextHeader.unpack(raw_header, 0)
    check_header(header, blob, c_size)
    head_size = header.ci_zran_offset + header.ci_zran_count * ZranContext.SIZE
    if not header.ci_zran_offset <= head_size <= blob.ci_uncompressed_size:
        raise FormatError(f"blob {blob.blob_id}: zran contexts end at {head_size}, beyond "
                          f"the chunk info's {blob.ci_uncompressed_size} bytes")
    try:
        head = decompress(first[frames.head_offset:frames.head_end], Compressor.ZSTD,
                          head_size)
    except FormatError as err:
        raise FormatError(f"blob {blob.blob_id} chunk info head: {err}") from err
    meta = meta_from_parts(header, head, blob)
    windows = _FrameWindows(blob, meta, frames, read_range, meta_id, first, run)
    return SpanMap(blob, meta, windows)


class _FrameWindows:
    """The windows of framed chunk info, read one frame at a time and kept a while."""

    def __init__(self, blob: BlobInfo, meta: BlobMeta, frames: FramedChunkInfo,
                 read_range: ReadRange, meta_id: str, prefix: bytes = b"",
                 run: RunJob | None = None) -> None:
        ctxs = [c for c in meta.contexts() if isinstance(c, ZranContext)]
        if len(frames.windows) != len(ctxs):
            raise FormatError(f"blob {blob.blob_id}: {len(frames.windows)} window frames for "
                              f"{len(ctxs)} zran contexts")
        pos = 0
        for i, c in enumerate(ctxs):
            if c.dict_offset != pos or bool(c.dict_size) != bool(frames.windows[i][1]):
                raise FormatError(f"blob {blob.blob_id}: zran context {i}'s dictionary "
                                  f"({c.dict_offset}+{c.dict_size}) is not its window frame")
            pos += c.dict_size
        self._where = f"blob {blob.blob_id}"
        self._ctxs = ctxs
        self._frames = frames
        self._read = read_range
        self._meta_id = meta_id
        self._base = blob.ci_offset
        self._prefix = prefix  # the payload's first bytes, read already
        self._kept: OrderedDict[int, bytes] = OrderedDict()
        self._raw: dict[int, bytes] = {}  # frames read with another, not inflated yet
        self._run = run
        self._loading: dict[int, threading.Event] = {}  # frames being read by ``start``
        self._lock = threading.Lock()

    def start(self, index: int) -> None:
        """Begin reading window ``index``'s frame (with the frames after it, as
        :meth:`_fetch` does) on another thread, unless it is at hand or being read (or
        there is no ``run``); a later call for any of those frames waits for that read."""
        if self._run is None or not self._ctxs[index].dict_size:
            return
        off, size = self._frames.windows[index]
        done = threading.Event()
        with self._lock:
            if off + size <= len(self._prefix) or index in self._kept or index in self._raw \
                    or index in self._loading:
                return
            marked = [i for i in range(index, self._last(index) + 1)
                      if i == index or not (i in self._kept or i in self._raw
                                            or i in self._loading)]
            for i in marked:
                self._loading[i] = done

        def release() -> None:  # read or not, the frames' readers stop waiting
            with self._lock:
                for i in marked:
                    self._loading.pop(i, None)
            done.set()

        def load() -> None:
            try:
                raw = self._fetch(index)
                with self._lock:
                    self._raw[index] = raw
            except Exception as err:  # noqa: BLE001 - the reader's own read reports it
                log.debug("%s zran context %d window: %s (read again by the reader)",
                          self._where, index, err)
            finally:
                release()

        try:
            job = self._run(load)
        except RuntimeError:  # the executor is shut down: the readers read them
            release()
            return
        job.add_done_callback(lambda f: release() if f.cancelled() else None)

    def __call__(self, index: int) -> bytes:
        with self._lock:
            loading = self._loading.get(index)
        if loading is not None:
            loading.wait(_WINDOW_WAIT)
        with self._lock:
            w = self._kept.get(index)
            if w is not None:
                self._kept.move_to_end(index)
                return w
            raw = self._raw.pop(index, None)
        if raw is None:
            raw = self._fetch(index)
        try:
            w = decompress(raw, Compressor.ZSTD, self._ctxs[index].dict_size)
        except FormatError as err:
            raise FormatError(f"{self._where} zran context {index} window: {err}") from err
        with self._lock:
            self._kept[index] = w
            while len(self._kept) > _KEEP_WINDOWS:
                self._kept.popitem(last=False)
        return w

    def _fetch(self, index: int) -> bytes:
        """Window frame ``index``, read with the frames after it up to
        :data:`_WINDOW_BATCH` bytes in one ranged read (contexts are mostly inflated in
        layer order; the others are kept as they came)."""
        frames = self._frames.windows
        off, size = frames[index]
        if off + size <= len(self._prefix):
            return self._prefix[off:off + size]
        last = self._last(index)
        end = frames[last][0] + frames[last][1]
        data = self._read(self._meta_id, self._base + off, end - off)
        with self._lock:
            for i in range(index + 1, last + 1):
                o, n = frames[i]
                if n and i not in self._kept:
                    self._raw[i] = data[o - off:o - off + n]
            while len(self._raw) > _KEEP_RAW:
                self._raw.pop(next(iter(self._raw)))
        return data[:size]

    def _last(self, index: int) -> int:
        """The last frame read with frame ``index``: those after it up to
        :data:`_WINDOW_BATCH` bytes from its start."""
        frames = self._frames.windows
        off, last = frames[index][0], index
        while last + 1 < len(frames) and frames[last + 1][0] + frames[last + 1][1] - off \
                <= _WINDOW_BATCH:
            last += 1
        return last


class SpanCache:
    """The last few decoded spans (a ZRAN context inflates to megabytes; chunks of one
    context are usually read together). Not thread-safe: one per reader."""

    def __init__(self, spans: SpanMap, read_span: Callable[[Span], bytes],
                 keep: int = 4) -> None:
        self.spans = spans
        self.read_span = read_span
        self.keep = keep
        self._out: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def chunk(self, span: Span, inner: int, size: int) -> bytes:
        key = (span.kind, span.index)
        out = self._out.get(key)
        if out is None:
            out = self.spans.decode(span, self.read_span(span))
            self._out[key] = out
            while len(self._out) > self.keep:
                self._out.popitem(last=False)
        else:
            self._out.move_to_end(key)
        return out[inner:inner + size]
