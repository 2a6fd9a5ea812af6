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

Sans-I/O: the caller reads ``[in_offset, in_offset + in_len)`` of the layer and hands
the bytes in.
"""

from __future__ import annotations

from dataclasses import dataclass

from pynydus.errors import FormatError
from pynydus.rafs.format.blobmeta import BlobMeta, ZranContext
from pynydus.rafs.format.layout import BlobFeatures, format_error, need
from pynydus.rafs.format.libz import DT_BLOCK_END, Z_BLOCK, Z_STREAM_END, Inflater

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
    where = f"zran context at {ctx.in_offset}"
    if len(data) != ctx.in_len:
        raise FormatError(f"{where}: got {len(data)} compressed bytes, expected {ctx.in_len}")
    n = ctx.out_len if want is None else want
    if not 0 <= n <= ctx.out_len:
        raise FormatError(f"{where}: {n} bytes wanted of {ctx.out_len}")
    z = Inflater(-15)
    try:
        if ctx.ctx_bits:
            z.prime(ctx.ctx_bits, ctx.ctx_byte >> (8 - ctx.ctx_bits))
        z.set_dictionary(window)
        z.feed(bytes(data))
        parts: list[bytes] = []
        got = 0
        while got < n:
            out, rc = z.inflate(n - got)
            parts.append(out)
            got += len(out)
            if got >= n:
                break
            if rc == Z_STREAM_END:
                _next_member(z, where)
            elif not out:
                raise FormatError(f"{where}: inflated {got} bytes, expected {n}: input ends")
    except FormatError as err:
        if str(err).startswith(where):
            raise
        raise FormatError(f"{where}: {err}") from err
    finally:
        z.close()
    return b"".join(parts)


def _next_member(z: Inflater, where: str) -> None:
    """Skip the gzip trailer after a member's deflate stream and the next member's
    header; leave ``z`` inflating raw deflate right after it (empty window)."""
    rest = z.unused_input()
    if len(rest) < 8:
        raise FormatError(f"{where}: the input ends inside a gzip trailer")
    z.reset(31)
    z.feed(rest[8:])
    while True:
        out, _ = z.inflate(ZRAN_DICT_MAX, Z_BLOCK)
        if out:
            raise FormatError(f"{where}: no gzip header after a member's end")
        if z.data_type & DT_BLOCK_END:
            break
        if not z.avail_in:
            raise FormatError(f"{where}: the input ends inside a gzip header")
    z.reset(-15)
