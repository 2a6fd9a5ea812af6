"""Random access into a gzip layer: inflating one ZRAN context (spec §2.5).

A ZRAN image (``nydus-image create -t targz-ref``) keeps its file data in the original
OCI ``.tar.gz`` layer. Its chunk-info array cuts the layer's deflate stream at
checkpoints ("contexts"); each context says where inflating may resume: at compressed
offset ``in_offset`` (``in_len`` bytes follow), with the 32 KiB of output before that
point as the dictionary (``dict_size`` bytes of the dictionary table at ``dict_offset``),
producing ``out_len`` bytes of the tar stream from ``out_offset`` on. A chunk names its
context and its offset in that context's output.

A checkpoint need not fall on a byte boundary: ``ctx_bits`` bits of the byte before
``in_offset`` (its high bits, ``ctx_byte``) still belong to the stream. zlib's
``inflatePrime`` feeds them (:mod:`pynydus.rafs.format.libz`; Python's zlib has no such
call, and shifting the input by those bits breaks every stored block after the
checkpoint, which realigns to a byte boundary of the original stream). Raw inflate
with the saved window as dictionary (``inflateSetDictionary``) then resumes where the
layer's inflate was. A context may run past the end of a gzip member (a layer of
several members): the 8-byte trailer and the next member's header are skipped and
inflating goes on with an empty window, as upstream's decoder does.

Sans-I/O: the caller reads the layer's bytes from ``in_offset`` on and hands them in.
A chunk needs only a prefix of its context: inflating must run from the context's
start, but no further than the chunk's last byte, which the layer's inflate had
produced by the compressed offset the chunk's entry ends at (``compressed_offset +
compressed_size``, upstream's entries and ours alike). :class:`ContextStream` inflates
a context as its bytes arrive, so a reader fetches up to one chunk's end and, for the
context's next chunk, only the bytes after that.

**Framed chunk info.** The chunk-info buffer (entries, contexts, windows) is one zstd
payload that upstream's nydusd reads whole (``ZSTD_decompress``, which decodes
concatenated frames and skips skippable ones). Ours is cut into frames so that a reader
can fetch the entries and contexts alone and each window when a context is first
inflated: a skippable frame holding the index (:func:`pack_framed_ci`), one frame of
entries and contexts (the *head*), then one frame per non-empty window, in context
order. Decoded end to end it is the same buffer, so the header, the TOC digest and
upstream's reading are unchanged; only what the frames hold is ours.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pynydus.errors import FormatError
from pynydus.rafs.format.blobmeta import BlobMeta, ZranContext
from pynydus.rafs.format.layout import BlobFeatures, format_error, need
from pynydus.rafs.format.libz import DT_BLOCK_END, Z_BLOCK, Z_STREAM_END, Inflater

#: Largest deflate window, hence largest dictionary of a context.
ZRAN_DICT_MAX = 32 << 10


#: ``window(context index) -> its dictionary``, for windows kept outside the buffer.
WindowSource = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class ZranTable:
    """The contexts of one ZRAN blob's chunk-info buffer and a way to their windows:
    the dictionary table when the buffer holds it, else ``source`` (framed chunk info
    read without its windows)."""

    contexts: tuple[ZranContext, ...]
    dicts: bytes  # the dictionary table that follows the contexts (b"" with a source)
    source: WindowSource | None = None

    @classmethod
    def from_meta(cls, meta: BlobMeta, source: WindowSource | None = None) -> ZranTable:
        """FormatError if the blob is not ZRAN or a context points outside the buffer.
        With ``source``, ``meta.data`` may stop after the contexts (the dictionary table
        is then only checked against the header's size)."""
        h = meta.header
        if not h.features & BlobFeatures.ZRAN:
            raise format_error("blob meta features", 4, f"0x{h.features:x} has no ZRAN")
        ctxs = tuple(c for c in meta.contexts() if isinstance(c, ZranContext))
        start = h.ci_zran_offset + h.ci_zran_count * ZranContext.SIZE
        end = h.ci_zran_offset + h.ci_zran_size
        if end < start:
            raise format_error("blob meta ci_zran_size", 48,
                               f"{h.ci_zran_size} < {h.ci_zran_count} contexts")
        if source is None:
            need(len(meta.data), h.ci_zran_offset, h.ci_zran_size,
                 "zran contexts and dictionaries")
            dicts = bytes(meta.data[start:end])
        else:
            dicts = b""
        table_size = end - start
        for i, c in enumerate(ctxs):
            if c.dict_size > ZRAN_DICT_MAX or c.dict_offset + c.dict_size > table_size:
                raise format_error(f"zran context {i} dictionary",
                                   h.ci_zran_offset + i * ZranContext.SIZE + 16,
                                   f"{c.dict_offset}+{c.dict_size} beyond {table_size} bytes")
            if c.ctx_bits > 7:
                raise format_error(f"zran context {i} ctx_bits",
                                   h.ci_zran_offset + i * ZranContext.SIZE + 37, str(c.ctx_bits))
        return cls(ctxs, dicts, source)

    def window(self, index: int) -> bytes:
        c = self.contexts[index]
        if self.source is not None:
            return self.source(index) if c.dict_size else b""
        return self.dicts[c.dict_offset:c.dict_offset + c.dict_size]


# ---------------------------------------------------------------------- framed chunk info

#: zstd skippable frame magic (0x184D2A50..5F; decoders skip such frames) of the index.
CI_INDEX_MAGIC = 0x184D2A5A
_CI_INDEX_TAG = b"pynzci01"
_FRAME_HDR = struct.Struct("<II")
_INDEX_HDR = struct.Struct("<8sII")  # tag, head frame size, window frames


@dataclass(frozen=True, slots=True)
class FramedChunkInfo:
    """Where the frames of a framed chunk-info payload lie, relative to its start:
    the head (entries and contexts) and each context's window frame (size 0: the
    context has an empty window and no frame)."""

    head_offset: int
    head_size: int
    windows: tuple[tuple[int, int], ...]

    @property
    def head_end(self) -> int:
        return self.head_offset + self.head_size


def pack_framed_ci(head: bytes, windows: Sequence[bytes], level: int = 3) -> bytes:
    """The zstd payload of a ZRAN chunk-info buffer ``head + b"".join(windows)``
    (``head``: entries and contexts; ``windows``: each context's dictionary, in
    context order, as the dictionary table lays them out), framed as the module
    header says. Deterministic for given input and level."""
    import zstandard  # zstd is how the frames are read by upstream's nydusd

    z = zstandard.ZstdCompressor(level=level, write_content_size=True)
    head_frame = z.compress(head)
    frames = [z.compress(w) if w else b"" for w in windows]
    body = _INDEX_HDR.pack(_CI_INDEX_TAG, len(head_frame), len(frames)) + b"".join(
        struct.pack("<I", len(f)) for f in frames)
    return (_FRAME_HDR.pack(CI_INDEX_MAGIC, len(body)) + body + head_frame
            + b"".join(frames))


def framed_index_size(prefix: bytes | memoryview) -> int | None:
    """The size of the index frame that opens a framed payload, from its first 8 bytes
    or more; None when ``prefix`` is not the start of a framed payload."""
    if len(prefix) < _FRAME_HDR.size + _INDEX_HDR.size:
        return None
    magic, size = _FRAME_HDR.unpack_from(prefix, 0)
    if magic != CI_INDEX_MAGIC or bytes(prefix[8:16]) != _CI_INDEX_TAG:
        return None
    return _FRAME_HDR.size + size


def parse_framed_ci(index: bytes | memoryview, payload_size: int) -> FramedChunkInfo:
    """The frame map of a framed payload of ``payload_size`` bytes from its index frame
    (``framed_index_size`` bytes). FormatError if the frames do not fill the payload."""
    n = framed_index_size(index)
    if n is None or len(index) < n:
        raise format_error("framed chunk info index", 0, "not a complete index frame")
    _, head_size, count = _INDEX_HDR.unpack_from(index, _FRAME_HDR.size)
    body = _FRAME_HDR.size + _INDEX_HDR.size
    if n != body + 4 * count:
        raise format_error("framed chunk info index", 4, f"{n} bytes for {count} windows")
    pos = n + head_size
    windows = []
    for (size,) in struct.iter_unpack("<I", index[body:n]):
        windows.append((pos, size))
        pos += size
    if pos != payload_size:
        raise format_error("framed chunk info index", body,
                           f"frames end at {pos}, the payload has {payload_size} bytes")
    return FramedChunkInfo(n, head_size, tuple(windows))


class ZranInputShort(FormatError):
    """The compressed bytes handed in end before the output asked for: the chunk record
    understated where its data ends (the reader fetches the whole context instead)."""


class ContextStream:
    """One context inflated in order as its compressed bytes arrive: :meth:`feed` the
    bytes from ``ctx.in_offset`` on, in pieces, and :meth:`take` the output up to a
    position. A reader that keeps the stream after a chunk continues with the context's
    next chunk from there: only the compressed bytes after :attr:`in_end` are needed.

    A stream that has produced its context's output can :meth:`follow` into a later
    context of the same layer: the layer is one deflate stream, so inflating goes on
    without that context's window and without reading its start again.

    Not thread-safe; :meth:`close` frees the inflater (about 40 KiB). Errors are
    FormatError naming the context; :class:`ZranInputShort` when the input ends first
    (the stream is then spent).
    """

    def __init__(self, ctx: ZranContext, window: bytes) -> None:
        self.ctx = ctx
        self.in_end = ctx.in_offset  # the compressed bytes fed end here
        # output produced, from the context's start (below 0 after ``follow``: the layer's
        # bytes before the context, inflated and dropped by the next ``take``)
        self.out_pos = 0
        self._where = f"zran context at {ctx.in_offset}"
        self._z = Inflater(-15)
        try:
            if ctx.ctx_bits:
                self._z.prime(ctx.ctx_bits, ctx.ctx_byte >> (8 - ctx.ctx_bits))
            self._z.set_dictionary(window)
        except FormatError as err:
            self._z.close()
            raise FormatError(f"{self._where}: {err}") from err

    @property
    def in_limit(self) -> int:
        """Where the context's compressed bytes end."""
        return self.ctx.in_offset + self.ctx.in_len

    def feed(self, data: bytes | memoryview) -> None:
        """The next compressed bytes, from :attr:`in_end` on (not beyond the context)."""
        if self.in_end + len(data) > self.in_limit:
            raise FormatError(f"{self._where}: {len(data)} bytes at {self.in_end} go beyond "
                              f"its {self.ctx.in_len}")
        if data:
            self._z.feed(self._z.unused_input() + bytes(data))
            self.in_end += len(data)

    def follow(self, ctx: ZranContext) -> None:
        """Go on as a stream of ``ctx``, a later context of the same layer whose output
        starts at or after what this one has produced (:attr:`out_pos` becomes relative
        to ``ctx``; negative while the stream is before its start). The bytes fed so far
        stay fed: the next :meth:`feed` goes on from :attr:`in_end`."""
        if ctx.out_offset < self.ctx.out_offset or ctx.in_offset + ctx.in_len < self.in_end:
            raise FormatError(f"{self._where}: cannot follow into the context at "
                              f"{ctx.in_offset}: it starts before this one")
        self.out_pos += self.ctx.out_offset - ctx.out_offset
        self.ctx = ctx
        self._where = f"zran context at {ctx.in_offset}"

    def take(self, upto: int) -> bytes:
        """The output from :attr:`out_pos` (or 0) to ``upto`` (``<= ctx.out_len``)."""
        if not self.out_pos <= upto <= self.ctx.out_len:
            raise FormatError(f"{self._where}: output to {upto} wanted at {self.out_pos} of "
                              f"{self.ctx.out_len}")
        skip = max(0, -self.out_pos)  # bytes before the context (after ``follow``)
        parts: list[bytes] = []
        try:
            while self.out_pos < upto:
                out, rc = self._z.inflate(upto - self.out_pos)
                parts.append(out)
                self.out_pos += len(out)
                if self.out_pos >= upto:
                    break
                if rc == Z_STREAM_END:
                    _next_member(self._z, self._where)
                elif not out:
                    got, self.out_pos = self.out_pos, self.ctx.out_len + 1  # spent
                    raise ZranInputShort(f"{self._where}: inflated {got} bytes, expected "
                                         f"{upto}: input ends at {self.in_end}")
        except ZranInputShort:
            raise
        except FormatError as err:
            if str(err).startswith(self._where):
                raise
            raise FormatError(f"{self._where}: {err}") from err
        self._z.feed(self._z.unused_input())  # keep only the input not consumed yet
        out = b"".join(parts)
        return out[skip:] if skip else out

    def close(self) -> None:
        self._z.close()


def inflate_context(ctx: ZranContext, window: bytes, data: bytes | memoryview,
                    want: int | None = None) -> bytes:
    """The first ``want`` (default ``ctx.out_len``) bytes of context ``ctx``'s output,
    from ``data`` = the ``ctx.in_len`` compressed bytes at ``ctx.in_offset``.

    FormatError if the bytes do not inflate to that much output.
    """
    if len(data) != ctx.in_len:
        raise FormatError(f"zran context at {ctx.in_offset}: got {len(data)} compressed "
                          f"bytes, expected {ctx.in_len}")
    stream = ContextStream(ctx, window)
    try:
        stream.feed(data)
        return stream.take(ctx.out_len if want is None else want)
    finally:
        stream.close()


def _next_member(z: Inflater, where: str) -> None:
    """Skip the gzip trailer after a member's deflate stream and the next member's
    header; leave ``z`` inflating raw deflate right after it (empty window)."""
    rest = z.unused_input()
    if len(rest) < 8:
        raise ZranInputShort(f"{where}: the input ends inside a gzip trailer")
    z.reset(31)
    z.feed(rest[8:])
    while True:
        out, _ = z.inflate(ZRAN_DICT_MAX, Z_BLOCK)
        if out:
            raise FormatError(f"{where}: no gzip header after a member's end")
        if z.data_type & DT_BLOCK_END:
            break
        if not z.avail_in:
            raise ZranInputShort(f"{where}: the input ends inside a gzip header")
    z.reset(-15)
