"""Byte packaging of what a converted image pushes: inline-meta layer blobs and the
bootstrap layer.

Layer blobs. Upstream's converter pushes every layer as an *inline* blob
(``nydus-image create --blob-inline-meta --features blob-toc``; rafs-nydusd-spec
§2.2): the data blob of the builder followed by the layer's own bootstrap,
zstd-compressed, named by an ``image.boot`` tar header and listed in the blob TOC,
so a layer blob is self-contained (``nydus-image unpack``/``check`` and upstream's
``UnpackEntry`` find ``image.boot`` by the TOC). Our builder writes the blob-toc
flavour; :func:`inline_bootstrap` cuts its TOC off, appends the bootstrap section
and writes a TOC with one more entry. A layer without file data still gets a blob
holding just the bootstrap, as upstream pushes one blob per source layer.

The embedded bootstrap keeps the builder's blob id (upstream does the same); the
image's merged bootstrap names the blob by the sha256 of the final file, which is
what the runtime asks the registry for.

Bootstrap layer: a gzip'ed tar with ``image/``, ``image/image.boot`` (0444) and one
``image/<blob digest hex>.blob.meta`` per data blob (spec §3.2), deterministic (mtime 0, no owner names) so the same bootstrap gives the same digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from pynydus.errors import FormatError
from pynydus.rafs.format import (
    Compressor,
    TocEntry,
    decompress_frames,
    pack_section_header,
    toc_flag_for_compressor,
)
from pynydus.rafs.source import EntryType, TarSource

__all__ = ["InlineBlob", "blob_meta_cache_file", "bootstrap_layer", "inline_bootstrap",
           "read_toc"]

TAR_BLOCK = 512
TOC_NAME = "rafs.blob.toc"
BOOT_NAME = "image.boot"
BOOTSTRAP_IN_LAYER = "image/image.boot"
_COPY = 1 << 20


@dataclass(frozen=True)
class InlineBlob:
    """The pushable blob: registry digest, size, and its TOC's size and sha256."""

    path: str
    digest: str
    size: int
    toc_size: int
    toc_digest: bytes
    data_end: int  # where the embedded bootstrap starts (blob table compressed_size)


def _section_name(header: bytes) -> str:
    return header[:100].split(b"\0", 1)[0].decode("latin-1")


def _section_size(header: bytes) -> int:
    raw = header[124:136]
    if raw[0] & 0x80:
        return int.from_bytes(raw[1:], "big")
    return int(raw.rstrip(b"\0 ").decode() or "0", 8)


def read_toc(f: BinaryIO, size: int) -> tuple[int, list[TocEntry]]:
    """Locate the TOC at the end of a blob; return (offset of the TOC, entries).

    FormatError if the blob does not end with a ``rafs.blob.toc`` section.
    """
    if size < TAR_BLOCK:
        raise FormatError(f"blob of {size} bytes: too small for a TOC")
    f.seek(size - TAR_BLOCK)
    hdr = f.read(TAR_BLOCK)
    if _section_name(hdr) != TOC_NAME:
        raise FormatError(f"blob does not end with a {TOC_NAME} section")
    toc_size = _section_size(hdr)
    if toc_size % TocEntry.SIZE or toc_size > size - TAR_BLOCK:
        raise FormatError(f"blob TOC of {toc_size} bytes is malformed")
    start = size - TAR_BLOCK - toc_size
    f.seek(start)
    raw = f.read(toc_size)
    entries = [TocEntry.unpack(raw[i:i + TocEntry.SIZE])
               for i in range(0, toc_size, TocEntry.SIZE)]
    return start, entries


def inline_bootstrap(blob_path: str | None, bootstrap: bytes, out_dir: str, *,
                     consume: bool = False) -> InlineBlob:
    """Write ``blob + zstd(bootstrap) + tar(image.boot) + TOC + tar(rafs.blob.toc)``.

    ``blob_path`` is a builder blob, or None for a layer without file data. It is
    left as it is, unless ``consume``: then it is rewritten in place and moved (no
    copy of the chunk data; it must be on the same filesystem as ``out_dir``). The
    result goes to ``out_dir/<sha256>``, atomically.
    """
    comp = zstandard.ZstdCompressor(level=3).compress(bootstrap)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".inline-{os.getpid()}-{id(bootstrap):x}")
    h = hashlib.sha256()
    entries: list[TocEntry] = []
    pos = 0
    try:
        if blob_path is not None and consume:
            os.replace(blob_path, tmp)
        else:
            open(tmp, "wb").close()
        with open(tmp, "r+b") as out:
            if blob_path is not None:
                src_path = tmp if consume else blob_path
                with open(src_path, "rb") as src:
                    pos, entries = read_toc(src, os.path.getsize(src_path))
                    src.seek(0)
                    left = pos
                    while left:  # hash (and, unless consuming, copy) the chunk data part
                        buf = src.read(min(_COPY, left))
                        if not buf:
                            raise FormatError(f"{blob_path}: shorter than its TOC says")
                        if not consume:
                            out.write(buf)
                        h.update(buf)
                        left -= len(buf)
                out.seek(pos)
                out.truncate()
            data_end = pos
            boot_hdr = pack_section_header(BOOT_NAME, len(comp))
            entries = [e for e in entries if e.entry_name != BOOT_NAME]
            entries.append(TocEntry(
                toc_flag_for_compressor(Compressor.ZSTD), BOOT_NAME.encode().ljust(16, b"\0"),
                hashlib.sha256(bootstrap).digest(), pos, len(comp), len(bootstrap)))
            toc = b"".join(e.pack() for e in entries)
            toc_hdr = pack_section_header(TOC_NAME, len(toc))
            for part in (comp, boot_hdr, toc, toc_hdr):
                out.write(part)
                h.update(part)
            total = pos + len(comp) + TAR_BLOCK + len(toc) + TAR_BLOCK
        digest = h.hexdigest()
        final = os.path.join(out_dir, digest)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return InlineBlob(final, "sha256:" + digest, total, len(toc) + TAR_BLOCK,
                      hashlib.sha256(toc + toc_hdr).digest(), data_end)


def extract_inline_bootstrap(blob: bytes) -> bytes:
    """The per-layer bootstrap embedded in an inline blob (by its TOC entry)."""
    _, entries = read_toc(io.BytesIO(blob), len(blob))
    for e in entries:
        if e.entry_name == BOOT_NAME:
            raw = blob[e.compressed_offset:e.compressed_offset + e.compressed_size]
            if e.flags & 0x2:
                return zstandard.ZstdDecompressor().decompress(
                    raw, max_output_size=e.uncompressed_size)
            return raw
    raise FormatError("blob has no image.boot entry in its TOC")


@dataclass(frozen=True)
class BootstrapLayer:
    """The bootstrap layer blob: gzip bytes, their digest, and the tar's diff id."""

    data: bytes
    digest: str
    diff_id: str


def blob_meta_cache_file(blob_path: str) -> bytes | None:
    """The blob's chunk-info array in nydusd's cache form (``<blob_id>.blob.meta``):
    uncompressed ci padded to 4 KiB, then the 4096-byte header; None for a blob
    without chunks. Taken from the blob's own TOC entries, as upstream does."""
    size = os.path.getsize(blob_path)
    with open(blob_path, "rb") as f:
        _, entries = read_toc(f, size)
        by_name = {e.entry_name: e for e in entries}
        meta, header = by_name.get("blob.meta"), by_name.get("blob.meta.header")
        if meta is None or header is None:
            return None
        f.seek(meta.compressed_offset)
        raw = f.read(meta.compressed_size)
        f.seek(header.compressed_offset)
        head = f.read(header.compressed_size)
    comp = next((c for c in (Compressor.NONE, Compressor.ZSTD, Compressor.LZ4_BLOCK)
                 if toc_flag_for_compressor(c) == meta.flags & 0xF), None)
    if comp is None:
        raise FormatError(f"{blob_path}: blob.meta has unknown compression flags {meta.flags:#x}")
    ci = decompress_frames(raw, comp, meta.uncompressed_size) if comp != Compressor.NONE else raw
    if not ci and not head:
        return None
    pad = -len(ci) % 4096
    return ci + bytes(pad) + head


def bootstrap_layer(bootstrap: bytes,
                    blob_metas: Sequence[tuple[str, bytes]] = ()) -> BootstrapLayer:
    """Pack ``bootstrap`` as ``image/image.boot`` in a deterministic tar.gz, followed by
    ``image/<blob digest hex>.blob.meta`` per ``(digest, cache-form blob meta)``
    (upstream's bootstrap layer since nydus-snapshotter eefc9f4: the runtime can
    seed its blob cache instead of fetching every blob's chunk-info array)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
        d = tarfile.TarInfo("image")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        tf.addfile(d)
        files = [(BOOTSTRAP_IN_LAYER, bootstrap)]
        files += [(f"image/{digest.split(':', 1)[-1]}.blob.meta", data)
                  for digest, data in blob_metas]
        for name, data in files:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o444, 0
            tf.addfile(ti, io.BytesIO(data))
    tar = raw.getvalue()
    gz = gzip.compress(tar, compresslevel=6, mtime=0)
    return BootstrapLayer(gz, "sha256:" + hashlib.sha256(gz).hexdigest(),
                          "sha256:" + hashlib.sha256(tar).hexdigest())


def bootstrap_from_layer(data: bytes) -> bytes:
    """``image/image.boot`` (or legacy ``image.boot``) out of a bootstrap layer tar.gz.

    Read with pynydus's tar reader and no room for sparse holes: a registry's layer is
    untrusted, and tarfile read a sparse ``image.boot`` into memory at whatever size
    its header claimed (98 bytes of layer for 16 GiB of zeros). FormatError for
    anything malformed."""
    names = (BOOTSTRAP_IN_LAYER.encode(), BOOT_NAME.encode())
    for entry, reader in TarSource(io.BytesIO(data), max_sparse_size=0):
        if entry.type is EntryType.REG and entry.path in names and reader is not None:
            parts = []
            while piece := reader.read(1 << 20):
                parts.append(bytes(piece))
            return b"".join(parts)
    raise FormatError(f"bootstrap layer has no {BOOTSTRAP_IN_LAYER}")
