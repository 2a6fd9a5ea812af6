"""ZRAN and batch spans, and bootstraps inline in their blob: the decoding rules alone.

The real images come from upstream's nydus-image in ``tests/compat``; these pin the
parts that are easy to get subtly wrong: a checkpoint that starts mid-byte, a window
set before the first byte, a batch member cut out of its batch, a TOC-less inline blob,
and the blob id an inline bootstrap takes from its file name.
"""

from __future__ import annotations

import hashlib
import os
import random
import zlib
from pathlib import Path

import pytest
import zstandard

from pynydus.errors import FormatError
from pynydus.rafs.builder import build
from pynydus.rafs.format import BlobFeatures, Compressor, Digester, compress, pack_section_header
from pynydus.rafs.format.blobmeta import (
    BatchContext,
    BlobChunkInfo,
    BlobCompressionContextHeader,
    BlobMeta,
    ChunkInfoFlags,
    ZranContext,
    pack_chunk_info_v2,
)
from pynydus.rafs.format.zran import ZranTable, inflate_context
from pynydus.rafs.read import BlobInfo, check_image, open_bootstrap
from pynydus.rafs.read.inline import blob_id_from_path, extract_bootstrap
from pynydus.rafs.read.spans import BATCH, ZRAN, SpanMap

DATA = b"".join(b"line %d of a text that repeats a bit\n" % (i % 97) for i in range(4000))


def _raw_deflate(data: bytes, zdict: bytes = b"") -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15, zdict=zdict) if zdict else \
        zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize("bits", range(8))
def test_context_that_starts_mid_byte_inflates(bits: int) -> None:
    # The stream starts `bits` bits before the byte boundary: those bits are the high
    # bits of the byte before in_offset, the rest of the stream follows bit-shifted.
    d = _raw_deflate(DATA)
    n = int.from_bytes(d, "little")
    junk = random.Random(bits).randrange(256) & ((1 << (8 - bits)) - 1)
    ctx_byte = ((n & ((1 << bits) - 1)) << (8 - bits)) | junk
    rest = (n >> bits).to_bytes(len(d), "little")
    ctx = ZranContext(in_offset=100, out_offset=0, in_len=len(rest), out_len=len(DATA),
                      ctx_byte=ctx_byte, ctx_bits=bits)
    assert inflate_context(ctx, b"", rest) == DATA
    assert inflate_context(ctx, b"", rest, 1000) == DATA[:1000]


def test_context_window_is_the_dictionary() -> None:
    window = os.urandom(32 << 10)
    data = window[5000:9000] * 3 + b"tail"
    d = _raw_deflate(data, window)
    ctx = ZranContext(in_len=len(d), out_len=len(data), dict_size=len(window))
    assert inflate_context(ctx, window, d) == data
    assert inflate_context(ctx, b"\0" * len(window), d) != data  # the window matters
    with pytest.raises(FormatError, match="compressed bytes"):
        inflate_context(ctx, window, d[:-1])


def _meta(entries: list[BlobChunkInfo], contexts: bytes, count: int, features: int,
          tail: bytes = b"") -> BlobMeta:
    ci = b"".join(pack_chunk_info_v2(e) for e in entries)
    h = BlobCompressionContextHeader(features=features, ci_entries=len(entries),
                                     ci_uncompressed_size=len(ci) + len(contexts) + len(tail),
                                     ci_zran_offset=len(ci), ci_zran_size=len(contexts) + len(tail),
                                     ci_zran_count=count)
    data = ci + contexts + tail
    return BlobMeta(h, data, True, len(entries), 0, 1 << 30)


def _blob(features: int, compressor: Compressor = Compressor.ZSTD) -> BlobInfo:
    return BlobInfo(0, "b" * 64, compressor, Digester.SHA256, 1 << 20, 3, 0, 1 << 30,
                    features=features | BlobFeatures.CHUNK_INFO_V2)


def test_batch_members_are_slices_of_the_decompressed_batch() -> None:
    members = [b"first small file\n", b"second\n" * 50, b"third one"]
    buf = b"".join(members)
    packed = bytes(compress(buf, Compressor.ZSTD)[0])
    offs = [0, len(members[0]), len(members[0]) + len(members[1])]
    flags = ChunkInfoFlags.COMPRESSED | ChunkInfoFlags.BATCH
    entries = [BlobChunkInfo(4096, 0, i * 4096, len(m), flags, o)
               for i, (m, o) in enumerate(zip(members, offs))]
    ctxs = BatchContext(len(packed), len(buf)).pack()
    spans = SpanMap(_blob(BlobFeatures.BATCH), _meta(entries, ctxs, 1, BlobFeatures.BATCH))
    for i, m in enumerate(members):
        at = spans.locate(i)
        assert at is not None
        span, inner = at
        assert (span.kind, span.offset, span.size) == (BATCH, 4096, len(packed))
        assert spans.decode(span, packed)[inner:inner + len(m)] == m


def test_zran_members_name_their_context_and_window() -> None:
    window = os.urandom(1000)
    data = window * 5
    d = _raw_deflate(data, window)
    ctx = ZranContext(in_offset=10, out_offset=0, dict_offset=0, in_len=len(d),
                      out_len=len(data), dict_size=len(window))
    flags = ChunkInfoFlags.COMPRESSED | ChunkInfoFlags.ZRAN
    entries = [BlobChunkInfo(10, len(d), 0, 1500, flags, 0),
               BlobChunkInfo(10, len(d), 4096, 500, flags, 4500)]
    feats = BlobFeatures.ZRAN | BlobFeatures.SEPARATE
    meta = _meta(entries, ctx.pack(), 1, feats, window)
    spans = SpanMap(_blob(feats, Compressor.GZIP), meta)
    assert ZranTable.from_meta(meta).window(0) == window
    span, inner = spans.locate(1) or (None, 0)
    assert span is not None and span.kind == ZRAN and (span.offset, span.size) == (10, len(d))
    assert spans.decode(span, d)[inner:inner + 500] == data[4500:5000]
    bad = [BlobChunkInfo(10, len(d), 0, 1500, flags, (1 << 32) | 0)]  # context 1 missing
    with pytest.raises(FormatError, match="zran context 1"):
        SpanMap(_blob(feats, Compressor.GZIP), _meta(bad, ctx.pack(), 1, feats, window)).locate(0)


def test_plain_chunks_of_a_span_blob_are_not_in_spans() -> None:
    entries = [BlobChunkInfo(0, 10, 0, 10, 0, 0)]
    spans = SpanMap(_blob(BlobFeatures.BATCH), _meta(entries, b"", 0, BlobFeatures.BATCH))
    assert spans.locate(0) is None


# --------------------------------------------------------------------------- inline


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("inline")
    src = tmp / "src"
    src.mkdir()
    (src / "a").write_bytes(b"alpha" * 1000)
    (src / "b").write_bytes(os.urandom(5000))
    res = build(src, tmp / "boot", tmp / "blobs", compressor="zstd")
    return tmp / "boot", tmp / "blobs" / res.blob_ids[0], res.blob_ids[0]


def test_toc_less_inline_blob_opens_as_its_bootstrap(built: tuple[Path, Path, str],
                                                    tmp_path: Path) -> None:
    boot, blob, _ = built
    raw_boot = boot.read_bytes()
    # An old-style inline blob: data, then the raw bootstrap named by its tar header.
    inline = tmp_path / ("c" * 64)
    inline.write_bytes(blob.read_bytes() + raw_boot + pack_section_header("image.boot",
                                                                          len(raw_boot)))
    assert extract_bootstrap(inline.read_bytes()) == raw_boot
    with open_bootstrap(inline) as bs:
        # The blob table names the builder's blob; its CAP_TAR_TOC blob keeps that id,
        # as upstream renames only inline-meta (or pre-TOC) blobs.
        assert [b.blob_id for b in bs.blobs] == [blob.name]
    assert extract_bootstrap(blob.read_bytes()) is None  # a plain blob has no image.boot
    assert extract_bootstrap(b"\0" * 100) is None


def test_toc_inline_blob_checks_its_bootstrap_digest(built: tuple[Path, Path, str],
                                                     tmp_path: Path) -> None:
    from pynydus.convert.pack import inline_bootstrap

    boot, blob, _ = built
    res = inline_bootstrap(str(blob), boot.read_bytes(), str(tmp_path / "out"))
    path = Path(res.path)
    assert extract_bootstrap(path.read_bytes()) == boot.read_bytes()
    rep = check_image(str(path), str(blob.parent))  # data read from the builder's blob
    assert rep.chunks_verified == 2
    # The TOC's sha256 guards the bootstrap: flip a byte of the compressed bootstrap.
    data = bytearray(path.read_bytes())
    comp = zstandard.ZstdCompressor(level=3).compress(boot.read_bytes())
    at = bytes(data).index(comp)
    data[at + len(comp) // 2] ^= 0xFF
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError):
        extract_bootstrap(bytes(data))


def test_blob_id_from_path_drops_every_extension() -> None:
    h = hashlib.sha256(b"x").hexdigest()
    assert blob_id_from_path(f"/a/b/{h}") == h
    assert blob_id_from_path(f"/a/{h}.blob.meta") == h
    with pytest.raises(FormatError):
        blob_id_from_path("/a/.hidden")
