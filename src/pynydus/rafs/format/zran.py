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
``inflatePrime`` feeds them; Python's zlib has no such call, so the input is shifted
instead: deflate reads bits least significant first, so the stream from the checkpoint
on is ``(input as one little-endian integer) << ctx_bits | pending bits``. Raw inflate
(``wbits=-15``) with ``zdict`` sets the window before the first byte, which is what
``inflateSetDictionary`` does for upstream.

Sans-I/O: the caller reads ``[in_offset, in_offset + in_len)`` of the layer and hands
the bytes in.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from pynydus.errors import FormatError
from pynydus.rafs.format.blobmeta import BlobMeta, ZranContext
from pynydus.rafs.format.layout import BlobFeatures, format_error, need

#: Largest deflate window, hence largest dictionary of a context.
ZRAN_DICT_MAX = 32 << 10


@dataclass(frozen=True, slots=True)
class ZranTable:
    """The contexts and dictionaries of one ZRAN blob's chunk-info buffer."""

    contexts: tuple[ZranContext, ...]
    dicts: bytes  # the dictionary table that follows the contexts

    @classmethod
    def from_meta(cls, meta: BlobMeta) -> ZranTable:
        """FormatError if the blob is not ZRAN or a context points outside the buffer."""
        h = meta.header
        if not h.features & BlobFeatures.ZRAN:
            raise format_error("blob meta features", 4, f"0x{h.features:x} has no ZRAN")
        ctxs = tuple(c for c in meta.contexts() if isinstance(c, ZranContext))
        start = h.ci_zran_offset + h.ci_zran_count * ZranContext.SIZE
        end = h.ci_zran_offset + h.ci_zran_size
        need(len(meta.data), h.ci_zran_offset, h.ci_zran_size, "zran contexts and dictionaries")
        dicts = bytes(meta.data[start:end])
        for i, c in enumerate(ctxs):
            if c.dict_size > ZRAN_DICT_MAX or c.dict_offset + c.dict_size > len(dicts):
                raise format_error(f"zran context {i} dictionary",
                                   h.ci_zran_offset + i * ZranContext.SIZE + 16,
                                   f"{c.dict_offset}+{c.dict_size} beyond {len(dicts)} bytes")
            if c.ctx_bits > 7:
                raise format_error(f"zran context {i} ctx_bits",
                                   h.ci_zran_offset + i * ZranContext.SIZE + 37, str(c.ctx_bits))
        return cls(ctxs, dicts)

    def window(self, index: int) -> bytes:
        c = self.contexts[index]
        return self.dicts[c.dict_offset:c.dict_offset + c.dict_size]


def inflate_context(ctx: ZranContext, window: bytes, data: bytes | memoryview,
                    want: int | None = None) -> bytes:
    """The first ``want`` (default ``ctx.out_len``) bytes of context ``ctx``'s output,
    from ``data`` = the ``ctx.in_len`` compressed bytes at ``ctx.in_offset``.

    FormatError if the bytes do not inflate to that much output.
    """
    if len(data) != ctx.in_len:
        raise FormatError(f"zran context at {ctx.in_offset}: got {len(data)} compressed bytes, "
                          f"expected {ctx.in_len}")
    n = ctx.out_len if want is None else want
    if not 0 <= n <= ctx.out_len:
        raise FormatError(f"zran context at {ctx.in_offset}: {n} bytes wanted of {ctx.out_len}")
    stream: bytes | memoryview = data
    if ctx.ctx_bits:
        pending = (ctx.ctx_byte >> (8 - ctx.ctx_bits)) & ((1 << ctx.ctx_bits) - 1)
        value = (int.from_bytes(data, "little") << ctx.ctx_bits) | pending
        stream = value.to_bytes(len(data) + 1, "little")
    try:
        d = zlib.decompressobj(-15, zdict=window) if window else zlib.decompressobj(-15)
        out = d.decompress(stream, n)
    except zlib.error as err:
        raise FormatError(f"zran context at {ctx.in_offset}: inflate: {err}") from err
    if len(out) != n:
        raise FormatError(f"zran context at {ctx.in_offset}: inflated {len(out)} bytes, "
                          f"expected {n}")
    return out
