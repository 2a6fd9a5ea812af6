"""A bootstrap carried inside its data blob (``--blob-inline-meta``, spec §2.2, §2.8).

An inline blob ends with its sections, each followed by a 512-byte tar header naming
it; one of them is ``image.boot``, the layer's bootstrap. With a TOC (``--features
blob-toc``, what converters push) the TOC's ``image.boot`` entry gives its extent,
compression (zstd) and sha256; without one the headers are walked back from the end
and the bootstrap is stored as it is.

Upstream (``RafsSuper::load_from_file``) opens such a blob wherever a bootstrap is
expected: when the file is no bootstrap, it extracts ``image.boot`` and then names every
blob of the image that carries inline metadata (or has no TOC capability) after the file
it was opened from, its name without extensions, since the embedded table still holds
the builder's id. :func:`extract_bootstrap` and :func:`blob_id_from_path` are those two
steps; :func:`pynydus.rafs.read.open.open_bootstrap` applies them.
"""

from __future__ import annotations

import os

from pynydus.errors import FormatError
from pynydus.rafs.format import BlobFeatures, Compressor, Digester, decompress, digest
from pynydus.rafs.format.blobmeta import (
    TAR_BLOCK_SIZE,
    TOC_ENTRY_BLOB_TOC,
    TOC_ENTRY_BOOTSTRAP,
    TocFlags,
    unpack_section_header,
    unpack_toc,
)
from pynydus.rafs.format.layout import format_error
from pynydus.rafs.read.bootstrap import Buffer

#: Largest bootstrap we inflate from a blob (upstream's limit for ``image.boot``).
MAX_INLINE_BOOTSTRAP = 1 << 30
#: Most sections an inline blob has (image.blob, blob.meta, blob.digest, image.boot, TOC).
_MAX_SECTIONS = 16

_TOC_CODEC = {TocFlags.COMPRESSION_NONE: Compressor.NONE,
              TocFlags.COMPRESSION_ZSTD: Compressor.ZSTD,
              TocFlags.COMPRESSION_LZ4_BLOCK: Compressor.LZ4_BLOCK}


def _looks_like_tail(buf: Buffer) -> bool:
    """Whether the last 512 bytes are a section header (cheap test before parsing)."""
    if len(buf) < TAR_BLOCK_SIZE:
        return False
    try:
        unpack_section_header(buf, len(buf) - TAR_BLOCK_SIZE)
    except FormatError:
        return False
    return True


def extract_bootstrap(buf: Buffer) -> bytes | None:
    """The bootstrap inside inline blob ``buf``; None when ``buf`` has no ``image.boot``
    section (it is not an inline blob). FormatError when it has one that is damaged."""
    if not _looks_like_tail(buf):
        return None
    size = len(buf)
    name, _ = unpack_section_header(buf, size - TAR_BLOCK_SIZE)
    if name == TOC_ENTRY_BLOB_TOC:
        toc = unpack_toc(buf[size - min(size, 4096):])
        for e in toc:
            if e.entry_name != TOC_ENTRY_BOOTSTRAP:
                continue
            flags = TocFlags(e.flags & 0xF)
            codec = _TOC_CODEC.get(flags)
            if codec is None or e.compressed_offset + e.compressed_size > size \
                    or e.uncompressed_size > MAX_INLINE_BOOTSTRAP:
                raise format_error("blob TOC image.boot entry", 0,
                                   f"flags 0x{e.flags:x} extent {e.compressed_offset}+"
                                   f"{e.compressed_size} (blob {size}) size {e.uncompressed_size}")
            raw = bytes(buf[e.compressed_offset:e.compressed_offset + e.compressed_size])
            boot = decompress(raw, codec, e.uncompressed_size)
            if e.uncompressed_digest != bytes(32) \
                    and digest(boot, Digester.SHA256) != e.uncompressed_digest:
                raise format_error("blob TOC image.boot digest", 0,
                                   "the bootstrap does not hash to its TOC digest")
            return boot
        return None
    # No TOC: walk the sections back from the end.
    end = size
    for _ in range(_MAX_SECTIONS):
        if end < TAR_BLOCK_SIZE:
            return None
        try:
            name, length = unpack_section_header(buf, end - TAR_BLOCK_SIZE)
        except FormatError:
            return None  # the chunk data: no section before here names image.boot
        start = end - TAR_BLOCK_SIZE - length
        if start < 0:
            raise format_error(f"section {name!r}", end - TAR_BLOCK_SIZE,
                               f"size {length} runs before the start of the blob")
        if name == TOC_ENTRY_BOOTSTRAP:
            if length > MAX_INLINE_BOOTSTRAP:
                raise format_error("image.boot section", end - TAR_BLOCK_SIZE, f"{length} bytes")
            return bytes(buf[start:end - TAR_BLOCK_SIZE])
        end = start
    return None


def blob_id_from_path(path: str | os.PathLike[str]) -> str:
    """Upstream's ``get_blob_id_from_meta_path``: the file name without any extension."""
    name = os.path.basename(os.fspath(path))
    stem = name.split(".", 1)[0]
    if not stem:
        raise FormatError(f"cannot take a blob id from the file name {name!r}")
    return stem


def renames_blob(features: int) -> bool:
    """Whether upstream names this blob after the file an inline bootstrap came from."""
    return bool(features & BlobFeatures.INLINED_FS_META) or not features & BlobFeatures.CAP_TAR_TOC
