"""The ZRAN "blob" of a gzip layer: chunks as slices of its inflate contexts (targz-ref).

In ZRAN mode (``nydus-image create -t targz-ref``, ``nydusify convert --oci-ref``; spec
§2.5) nothing is re-encoded: the data blob *is* the original ``.tar.gz`` layer, named by
its digest, and a small *meta blob* holds what a reader needs to reach into it:

* one V2 chunk-info entry per distinct chunk (flags COMPRESSED|ZRAN; ``data`` =
  context index << 32 | the chunk's offset in the context's output), in tar order;
* the inflate contexts (40 bytes each) and their dictionaries (the 32 KiB windows),
  zstd-compressed as frames a reader can fetch one by one (``pack_framed_ci``).

:class:`ZranBlob` receives the layer's regular files from the builder, as the tar reader
meets them over a :class:`~pynydus.rafs.decoder.gzindex.GzipIndexer`; for each chunk it
records it picks the context by upstream's rule (``ZranGenerator::begin_read``): a new
context when the current one already spans ``context_size`` compressed bytes, or would
exceed ``max_uncomp`` with one more chunk, or the stream skipped far ahead, or a new
gzip member began; else the chunk joins the current context. A new context starts at
the last checkpoint (deflate block start) at or before the chunk. Upstream's spacing
is 512 KiB (half its 1 MiB ``max_comp``); ours defaults to
:data:`DEFAULT_CONTEXT_SIZE`, smaller, because a reader fetches a chunk as the prefix of
its context up to the chunk's end: the context's start is what a random read pays for
beyond its chunk, and a context more costs 40 bytes and a sparse window
(docs/decisions.md, "ZRAN context spacing").

The meta blob comes in upstream's two forms (:func:`separate_meta`, :func:`inline_meta`):
``ci | header`` for ``create -t targz-ref -B -D`` (2.2), and, for registry images, the
blob-toc form ``tar(image.blob) | ci | header | tar(blob.meta) | digests | tar(blob.digest)
| zstd(bootstrap) | tar(image.boot) | TOC | tar(rafs.blob.toc)``, whose first header names
the gzip layer that is not there (``--blob-inline-meta --features blob-toc``).

A window is what inflating may refer to, not what it does: only the first 32 KiB of a
context's output can reach back into it, and most of it is never read (incompressible
data has no back-references at all). Bytes no back-reference reads are zeroed
(:func:`sparse_window`), so a window costs what the layer uses of it; the window is then
checked: inflating the context's lead (the bytes to its first 32 KiB of output) with
it gives the same output as with the real one, or the real one is kept.

Chunk digests are sha256 (upstream forces it); chunks with equal digests are stored
once. The chunk records (bootstrap and chunk info) carry the compressed range a chunk
came from (to where the layer's inflate had produced its last byte), as upstream's do;
nydusd 2.2 fetches whole contexts, pynydusd a context's prefix up to that end.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pynydus.errors import FormatError, InvalidArgument, NotImplementedFeature
from pynydus.rafs.builder.blobwriter import (
    BlobDesc,
    BlobStats,
    ChunkDesc,
    _copy_ref,
    _read_full,
)
from pynydus.rafs.decoder.gzindex import Checkpoint, GzipIndexer
from pynydus.rafs.format import BlobFeatures, Compressor, Digester
from pynydus.rafs.format import layout as L
from pynydus.rafs.format.blobmeta import (
    BLOB_CCT_HEADER_SIZE,
    BlobChunkInfo,
    BlobCompressionContextHeader,
    ChunkInfoFlags,
    TocEntry,
    ZranContext,
    pack_chunk_info_v2,
    pack_section_header,
)
from pynydus.rafs.format.compress import toc_flag_for_compressor
from pynydus.rafs.format.libz import WINDOW, Z_STREAM_END, Inflater
from pynydus.rafs.format.zran import pack_framed_ci
from pynydus.rafs.source import DataReader, Entry

__all__ = [
    "DEFAULT_CONTEXT_SIZE",
    "UPSTREAM_CONTEXT_SIZE",
    "ZRAN_FEATURES_INLINE",
    "ZRAN_FEATURES_LEAN",
    "ZRAN_FEATURES_SEPARATE",
    "MetaBlob",
    "ZranBlob",
    "inline_meta",
    "separate_meta",
]

#: Features of a ZRAN blob built with a separate bootstrap (``create -t targz-ref -B``).
ZRAN_FEATURES_SEPARATE = int(BlobFeatures.ALIGNED | BlobFeatures.CHUNK_INFO_V2
                             | BlobFeatures.ZRAN | BlobFeatures.SEPARATE
                             | BlobFeatures.CAP_TAR_TOC)
#: ... and of one whose meta blob carries its bootstrap and a TOC (registry images); a
#: merged bootstrap clears INLINED_FS_META (the image's bootstrap is the merged one).
ZRAN_FEATURES_INLINE = ZRAN_FEATURES_SEPARATE | int(
    BlobFeatures.INLINED_FS_META | BlobFeatures.INLINED_CHUNK_DIGEST
    | BlobFeatures.HAS_TAR_HEADER | BlobFeatures.HAS_TOC)
#: ... and of a lean meta blob: no chunk digests (nor, in the blob itself, bootstrap).
ZRAN_FEATURES_LEAN = ZRAN_FEATURES_INLINE & ~int(BlobFeatures.INLINED_CHUNK_DIGEST)

# Upstream's context sizes (ZranContextGenerator: chunk size / 2, chunk size, 2 x chunk
# size, with the default 1 MiB chunk): a new context once one spans MAX_COMP // 2.
UPSTREAM_CONTEXT_SIZE = 512 << 10
MAX_UNCOMP = 2 << 20
#: Compressed bytes a context spans before the next chunk starts a new one (ours).
DEFAULT_CONTEXT_SIZE = 128 << 10
_ZRAN_CHUNK = int(ChunkInfoFlags.COMPRESSED | ChunkInfoFlags.ZRAN)


@dataclass(slots=True)
class _Context:
    cp: Checkpoint
    out_end: int
    in_end: int

    @property
    def in_len(self) -> int:
        return self.in_end - self.cp.in_pos


class ZranBlob:
    """The chunks of one gzip layer's files, as ZRAN references into the layer.

    Use as the builder's blob (:meth:`add_entry` per regular file, in tar order), then
    :meth:`finish` once the layer has been read to its end (``index.drain()``).
    """

    def __init__(self, index: GzipIndexer, chunk_size: int,
                 context_size: int = DEFAULT_CONTEXT_SIZE) -> None:
        if not 4096 <= context_size <= 1 << 30:
            raise InvalidArgument(f"zran context size {context_size}: must be in [4 KiB, 1 GiB]")
        self.index = index
        self.chunk_size = chunk_size
        self.context_size = context_size
        self.stats = BlobStats()
        self.replaced_existing = False
        self.desc = BlobDesc(blob_id="", chunk_size=chunk_size, compressor=Compressor.GZIP,
                             digester=Digester.SHA256, features=ZRAN_FEATURES_SEPARATE)
        self._own: dict[bytes, ChunkDesc] = {}
        self._ci = bytearray()
        self._digests: list[bytes] = []
        self._ctxs: list[_Context] = []
        self._u_end = 0

    def add_entry(self, entry: Entry, reader: DataReader) -> tuple[list[ChunkDesc], int]:
        """The chunks of a regular file's data as it lies in the layer, and its size."""
        if not entry.size:
            return [], 0
        if entry.data_offset is None:
            raise NotImplementedFeature(
                f"zran: {entry.path!r} is a sparse tar member; its data is not contiguous "
                "in the layer")
        refs: list[ChunkDesc] = []
        done = 0
        while done < entry.size:
            want = min(self.chunk_size, entry.size - done)
            start = entry.data_offset + done
            piece = _read_full(reader, want)
            if not piece:
                break
            refs.append(self._chunk(piece, start, done))
            done += len(piece)
            if len(piece) < want:
                break
        self.stats.bytes_in += done
        return refs, done

    def _chunk(self, data: bytes | memoryview, start: int, file_offset: int) -> ChunkDesc:
        n = len(data)
        self.stats.chunks_in += 1
        d = hashlib.sha256(data).digest()
        hit = self._own.get(d)
        if hit is not None:
            self.stats.dedup_chunks += 1
            self.stats.dedup_bytes += n
            self.index.checkpoint(start)  # the windows before it are not needed
            return _copy_ref(hit, file_offset)
        index = len(self._digests)
        if index >= L.RAFS_MAX_CHUNKS_PER_BLOB:
            raise InvalidArgument(f"blob exceeds {L.RAFS_MAX_CHUNKS_PER_BLOB} chunks")
        ctx_index = self._context_for(start)
        ctx = self._ctxs[ctx_index]
        c_off = self.index.in_at(start)
        c_end = self.index.in_after(start + n)
        ctx.out_end = max(ctx.out_end, start + n)
        ctx.in_end = max(ctx.in_end, c_end)
        u_off = self._u_end
        self._u_end = (u_off + n + 4095) & -4096
        try:
            self._ci += pack_chunk_info_v2(BlobChunkInfo(
                c_off, c_end - c_off, u_off, n, _ZRAN_CHUNK,
                (ctx_index << 32) | (start - ctx.cp.out_pos)))
        except ValueError as err:
            raise FormatError(f"zran chunk at tar offset {start}: {err}") from err
        self._digests.append(d)
        ref = ChunkDesc(d, self.desc, index, c_off, c_end - c_off, u_off, n, True, file_offset)
        self._own[d] = ref
        self.stats.chunks_written += 1
        self.stats.compressed_bytes += c_end - c_off
        return ref

    def _context_for(self, start: int) -> int:
        """Index of the context the chunk at tar offset ``start`` joins (upstream's rule)."""
        cp = self.index.checkpoint(start)
        if self._ctxs:
            cur = self._ctxs[-1]
            if cp is cur.cp:
                return len(self._ctxs) - 1  # no block boundary since the context began
            if cp.member == cur.cp.member:
                comp = self.index.in_at(start) - cur.cp.in_pos
                uncomp = start - cur.cp.out_pos
                full = comp >= self.context_size or uncomp + self.chunk_size >= MAX_UNCOMP
                gap = comp > 2 * cur.in_len and cur.in_len > self.context_size
                if not full and not gap:
                    return len(self._ctxs) - 1
        self._ctxs.append(_Context(cp, cp.out_pos, cp.in_pos))
        if len(self._ctxs) > 0xFFFF_FFFF:
            raise InvalidArgument("zran: too many inflate contexts")
        return len(self._ctxs) - 1

    # ------------------------------------------------------------------ finish
    def chunk_info(self) -> bytes:
        """The uncompressed chunk-info buffer: V2 entries, contexts, dictionaries."""
        head, windows = self._ci_parts()
        return head + b"".join(windows)

    def _ci_parts(self) -> tuple[bytes, list[bytes]]:
        """(entries and contexts, each context's dictionary in order)."""
        ctxs = bytearray()
        windows: list[bytes] = []
        dict_off = 0
        for c in self._ctxs:
            ctxs += ZranContext(
                in_offset=c.cp.in_pos, out_offset=c.cp.out_pos, dict_offset=dict_off,
                in_len=c.in_len, out_len=c.out_end - c.cp.out_pos,
                dict_size=len(c.cp.window), ctx_byte=c.cp.byte, ctx_bits=c.cp.bits).pack()
            windows.append(sparse_window(c.cp))
            dict_off += len(c.cp.window)
        return bytes(self._ci) + bytes(ctxs), windows

    @property
    def chunk_count(self) -> int:
        return len(self._digests)

    @property
    def context_count(self) -> int:
        return len(self._ctxs)

    def finish(self) -> ChunkInfoPack | None:
        """The packed chunk information and the blob's descriptor filled in from the
        layer (id = its sha256, size), or None when the layer has no file data.
        Call after the whole layer was read (``index.drain()``)."""
        if not self._digests:
            return None
        head, windows = self._ci_parts()
        raw = head + b"".join(windows)
        # Framed (rafs.format.zran): a reader fetches the entries and contexts alone,
        # and a window when its context is first inflated; upstream reads it whole.
        payload = pack_framed_ci(head, windows)
        comp = Compressor.ZSTD
        if len(payload) >= len(raw):  # tiny: stored as is, as upstream does (read whole)
            payload, comp = raw, Compressor.NONE
        d = self.desc
        d.blob_id = self.index.hexdigest()
        d.chunk_count = len(self._digests)
        d.compressed_size = self.index.size_in
        d.uncompressed_size = self._u_end
        d.ci_compressor = comp
        d.ci_compressed_size = len(payload)
        d.ci_uncompressed_size = len(raw)
        return ChunkInfoPack(raw, payload, d.ci_compressor, len(self._digests),
                             len(self._ctxs), b"".join(self._digests))


def _inflate_lead(cp: Checkpoint, window: bytes | bytearray) -> bytes:
    """What inflating ``cp``'s lead with ``window`` as dictionary gives (at most 32 KiB,
    less at its member's end)."""
    z = Inflater(-15)
    try:
        if cp.bits:
            z.prime(cp.bits, cp.byte >> (8 - cp.bits))
        z.set_dictionary(bytes(window))
        z.feed(cp.lead[0])
        parts: list[bytes] = []
        got = 0
        while got < WINDOW:
            out, rc = z.inflate(WINDOW - got)
            parts.append(out)
            got += len(out)
            if rc == Z_STREAM_END or not out:
                break
        return b"".join(parts)
    except FormatError:
        return b""
    finally:
        z.close()


# Windows whose every byte is the low / high byte of its own position: inflated with
# them, an output byte copied (at any remove) from the window names the byte it came
# from. A third, the low one inverted, tells such bytes from literals: those are equal
# under every window.
_POS_LO = bytes(i & 0xFF for i in range(WINDOW))
_POS_HI = bytes(i >> 8 for i in range(WINDOW))
_POS_LO_INV = bytes(b ^ 0xFF for b in _POS_LO)
_COPIED = re.compile(rb"[^\x00]+")


def sparse_window(cp: Checkpoint) -> bytes:
    """``cp.window`` with the bytes its context never reads zeroed (module header).

    Deflate copies bytes, never transforms them, so the lead is inflated three times
    with windows that encode each byte's position (``_POS_*``): where the outputs
    differ the byte came from the window, and the two position bytes say from where.
    Those window bytes are kept, the rest zeroed; the result is checked once (the lead
    inflates to the same output as with the real window) or the real one is kept.
    """
    window = cp.window
    n = len(window)
    if not window or not cp.lead or n > WINDOW:
        return window
    want = _inflate_lead(cp, window)
    lo = _inflate_lead(cp, _POS_LO[:n])
    hi = _inflate_lead(cp, _POS_HI[:n])
    inv = _inflate_lead(cp, _POS_LO_INV[:n])
    if not want or not len(want) == len(lo) == len(hi) == len(inv):
        return window
    copied = (int.from_bytes(lo, "big") ^ int.from_bytes(inv, "big")).to_bytes(len(lo), "big")
    out = bytearray(n)
    for m in _COPIED.finditer(copied):
        i, j = m.span()
        src = lo[i] | hi[i] << 8
        if src + j - i <= n and lo[i:j] == _POS_LO[src:src + j - i] \
                and hi[i:j] == _POS_HI[src:src + j - i]:
            out[src:src + j - i] = window[src:src + j - i]  # one run copied in order
            continue
        for k in range(i, j):  # several copies side by side
            src = lo[k] | hi[k] << 8
            out[src] = window[src]
    return bytes(out) if _inflate_lead(cp, out) == want else window


@dataclass(frozen=True)
class ChunkInfoPack:
    """What a meta blob is made of."""

    raw: bytes  # uncompressed ci buffer
    payload: bytes  # as stored: framed zstd (rafs.format.zran)
    compressor: Compressor
    chunks: int
    contexts: int
    digests: bytes  # chunk digests in ci order

    def header(self, features: int, ci_offset: int) -> bytes:
        return BlobCompressionContextHeader(
            features=features, ci_compressor=int(self.compressor), ci_entries=self.chunks,
            ci_offset=ci_offset, ci_compressed_size=len(self.payload),
            ci_uncompressed_size=len(self.raw),
            ci_zran_offset=self.chunks * 24,
            ci_zran_size=len(self.raw) - self.chunks * 24,
            ci_zran_count=self.contexts).pack()


@dataclass(frozen=True)
class MetaBlob:
    """A meta blob: its bytes, sha256 (registry digest) and, for the TOC form, the TOC's
    size and sha256 (entries and their tar header)."""

    data: bytes
    digest: str  # hex
    toc_size: int = 0
    toc_digest: bytes = bytes(32)


def separate_meta(pack: ChunkInfoPack) -> MetaBlob:
    """``ci | header``: what ``nydus-image create -t targz-ref -D`` writes (2.2)."""
    data = pack.payload + pack.header(ZRAN_FEATURES_SEPARATE, 0)
    return MetaBlob(data, hashlib.sha256(data).hexdigest())


def _toc(name: str, comp: Compressor, content: bytes, off: int, c_size: int, u_size: int,
         digest: bytes | None = None) -> TocEntry:
    return TocEntry(toc_flag_for_compressor(comp), name.encode().ljust(16, b"\0"),
                    digest if digest is not None else hashlib.sha256(content).digest(),
                    off, c_size, u_size)


def inline_meta(pack: ChunkInfoPack | None, bootstrap: bytes | None, layer_size: int,
                u_size: int, digests: bool = True) -> MetaBlob:
    """The blob-toc form with the layer's bootstrap inside (what upstream's converter
    pushes as a ZRAN image's Nydus layer). ``pack`` None: a layer without file data,
    whose meta blob holds only the bootstrap. The *lean* form (``bootstrap`` None,
    ``digests`` False) leaves out the layer's bootstrap and the chunk digests, which
    the image's merged bootstrap holds too: only the chunk info and the TOC remain."""
    import zstandard  # the bootstrap section is zstd, whatever the blob's compressor

    parts: list[bytes] = []
    toc: list[TocEntry] = []
    pos = 0
    if pack is not None:
        blob_hdr = pack_section_header("image.blob", layer_size)
        # The section the header names (the gzip layer) is not here: its offset is
        # "before the start", as upstream records it; its digest covers the header.
        toc.append(_toc("image.blob", Compressor.NONE, blob_hdr, (-layer_size) % (1 << 64),
                        layer_size, u_size))
        parts.append(blob_hdr)
        pos = len(blob_hdr)
        features = ZRAN_FEATURES_INLINE if digests else ZRAN_FEATURES_LEAN
        if bootstrap is None:
            features &= ~int(BlobFeatures.INLINED_FS_META)
        header = pack.header(features, pos)
        toc.append(_toc("blob.meta", pack.compressor, pack.raw, pos, len(pack.payload),
                        len(pack.raw)))
        toc.append(_toc("blob.meta.header", Compressor.NONE, header, pos + len(pack.payload),
                        BLOB_CCT_HEADER_SIZE, BLOB_CCT_HEADER_SIZE))
        parts += [pack.payload, header,
                  pack_section_header("blob.meta", len(pack.payload) + BLOB_CCT_HEADER_SIZE)]
        pos += len(pack.payload) + BLOB_CCT_HEADER_SIZE + 512
        if digests:
            toc.append(_toc("blob.digest", Compressor.NONE, pack.digests, pos,
                            len(pack.digests), len(pack.digests)))
            parts += [pack.digests, pack_section_header("blob.digest", len(pack.digests))]
            pos += len(pack.digests) + 512
    if bootstrap is None:
        return _with_toc(parts, toc)
    boot = zstandard.ZstdCompressor(level=3).compress(bootstrap)
    toc.append(_toc("image.boot", Compressor.ZSTD, bootstrap, pos, len(boot), len(bootstrap)))
    parts += [boot, pack_section_header("image.boot", len(boot))]
    return _with_toc(parts, toc)


def _with_toc(parts: list[bytes], toc: list[TocEntry]) -> MetaBlob:
    toc_bytes = b"".join(e.pack() for e in toc)
    toc_hdr = pack_section_header("rafs.blob.toc", len(toc_bytes))
    parts += [toc_bytes, toc_hdr]
    data = b"".join(parts)
    return MetaBlob(data, hashlib.sha256(data).hexdigest(), len(toc_bytes) + len(toc_hdr),
                    hashlib.sha256(toc_bytes + toc_hdr).digest())
