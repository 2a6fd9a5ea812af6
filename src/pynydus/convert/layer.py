"""Convert one source layer into one Nydus blob, with a local cache of results.

A :class:`LayerJob` is everything a worker process needs (picklable values only):
where the layer lives, how to build, where the cache is. :func:`convert_layer`
streams the layer blob from the registry straight into the RAFS builder
(``tar-rafs``; gzip/zstd undone on the fly, nothing unpacked to disk, memory
bounded by one chunk plus the tar reader's buffer), then packs the inline blob
(:mod:`.pack`) and rewrites the per-layer bootstrap so that its blob table names
the pushed blob's digest.

The source digest is verified: the stream is drained to its end after the tar's
end-of-archive marker, which makes the registry client compare the sha256 of every
byte received with the layer digest (DigestMismatch otherwise; the partial blob is
removed by the builder and nothing enters the cache).

Cache layout under ``cache_dir`` (safe to share between runs; entries are written
atomically and the entry's JSON last, so a crash leaves no half entry)::

    layers/<key>.json      LayerResult of a finished conversion
    blobs/<sha256 hex>     pushable inline blobs (content addressed)
    bootstraps/<hex>.boot  per-layer bootstrap whose blob table names blobs/<hex>

``key`` hashes the source layer digest with every build option that changes the
output (fs version, compressor, chunk size, digester, chunk dict content,
prefetch list), so a second convert of the same image converts nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pynydus.errors import InvalidArgument
from pynydus.rafs.builder import (
    ZRAN_CONTEXT_SIZE,
    ChunkDict,
    V6Options,
    build,
    chunk_dict_from_bootstrap,
    chunk_dict_from_tree,
    load_bootstrap,
    write_bootstrap,
)
from pynydus.rafs.format import BlobFeatures, parse_compressor, parse_digester
from pynydus.rafs.format import layout as L
from pynydus.rafs.source import normalize_path
from pynydus.registry.errors import DigestMismatch

from .endpoints import RegistrySpec
from .image import LayerDesc
from .pack import InlineBlob, inline_bootstrap

__all__ = ["BuildOptions", "LayerJob", "LayerResult", "cache_key", "convert_layer", "lookup_cache"]

CACHE_FORMAT = 2  # 2: the embedded layer bootstrap flags its blob INLINED_FS_META
Progress = Callable[[int, str, int], None]
"""(layer index, event, value): "bytes" with a byte count, "done" with 0."""


@dataclass(frozen=True)
class BuildOptions:
    """Builder knobs that shape the output (and therefore the cache key)."""

    fs_version: int = 6
    compressor: str = "zstd"      # nydusify's default
    chunk_size: int = 0x100000    # nydusify's default (1 MiB)
    digester: str = "blake3"
    chunk_dict: str | None = None  # path of a chunk dict bootstrap
    chunk_dict_digest: str = ""    # sha256 of that file: part of the cache key
    prefetch_files: tuple[str, ...] = ("/",)  # upstream: prefetch policy fs, pattern "/"
    # --oci-ref: ZRAN; the data stays in the source's gzip layers (gzip and sha256 forced)
    oci_ref: bool = False
    # --oci-ref-full-meta: each meta blob carries its layer's bootstrap and chunk digests,
    # as nydusify pushes them (for tools that open a meta blob as a bootstrap); by default
    # only the merged bootstrap has them (they made a many-files image's metadata twice
    # as big: docs/benchmarks.md, ZRAN)
    oci_ref_full_meta: bool = False
    # --oci-ref-context-size: compressed bytes per inflate context (rafs.builder.zranblob;
    # smaller than upstream's 512 KiB: a reader fetches a context's prefix up to a chunk)
    oci_ref_context_size: int = ZRAN_CONTEXT_SIZE

    def validate(self) -> None:
        if self.fs_version != 6:
            raise InvalidArgument(f"fs version {self.fs_version}: only 6 can be built")
        if self.oci_ref and self.chunk_dict:
            raise InvalidArgument("--oci-ref takes no chunk dict: the data stays in the "
                                  "source layers")
        parse_compressor(self.compressor)
        parse_digester(self.digester)
        if self.chunk_size & (self.chunk_size - 1) or not 0x1000 <= self.chunk_size <= 0x1000000:
            raise InvalidArgument(
                f"chunk size {self.chunk_size:#x}: must be a power of two in [0x1000, 0x1000000]")


@dataclass(frozen=True)
class LayerJob:
    """One layer to convert. ``lower``: (blob digest, per-layer bootstrap) of the
    image's lower layers whose chunks this layer may reference instead of storing
    them again (cross-layer dedup; empty for the first, parallel pass)."""

    index: int
    repo: str
    layer: LayerDesc
    registry: RegistrySpec
    options: BuildOptions
    cache_dir: str
    lower: tuple[tuple[str, str], ...] = ()


@dataclass
class LayerResult:
    """One converted layer, as stored in the cache and reported in the summary."""

    source_digest: str
    source_size: int
    blob_digest: str
    blob_size: int
    bootstrap: str        # per-layer bootstrap path (blob table names blob_digest)
    has_data: bool        # the blob holds chunks (it is in the merged blob table)
    chunks: int           # chunks referenced by the layer's files
    chunks_written: int
    bytes_in: int         # file data read from the layer
    compressed_bytes: int
    dedup_bytes: int      # file data not written again (same layer or chunk dict)
    seconds: float
    cached: bool = False
    rebuilt: bool = False  # converted again with the lower layers as chunk dict
    index: int = -1
    warnings: list[str] = field(default_factory=list)
    # --oci-ref: the source layer the blob's chunks point into (its blob id); the pushed
    # blob (blob_digest) is then the ZRAN meta blob
    ref_digest: str = ""

    def blob_path(self, cache_dir: str) -> str:
        return os.path.join(cache_dir, "blobs", self.blob_digest.split(":", 1)[1])


def cache_key(layer_digest: str, opts: BuildOptions, lower: tuple[str, ...] = ()) -> str:
    """Cache key of a layer converted with ``opts`` (and deduplicated against the
    blobs ``lower``, by digest)."""
    doc = {"format": CACHE_FORMAT, "layer": layer_digest, "fs_version": opts.fs_version,
           "compressor": parse_compressor(opts.compressor).name,
           "chunk_size": opts.chunk_size, "digester": parse_digester(opts.digester).name,
           "chunk_dict": opts.chunk_dict_digest, "prefetch": list(opts.prefetch_files),
           "lower": list(lower)}
    if opts.oci_ref:
        # the meta blob's form: framed chunk info with sparse windows (3), lean or full
        doc["oci_ref"] = "full-3" if opts.oci_ref_full_meta else "lean-3"
        doc["oci_ref_context_size"] = opts.oci_ref_context_size
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _entry_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, "layers", key + ".json")


def lookup_cache(cache_dir: str, layer_digest: str, opts: BuildOptions,
                 lower: tuple[str, ...] = ()) -> LayerResult | None:
    """The cached result for a layer, if complete (its blob and bootstrap exist)."""
    path = _entry_path(cache_dir, cache_key(layer_digest, opts, lower))
    try:
        with open(path) as f:
            doc = json.load(f)
        res = LayerResult(**doc)
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if not (os.path.exists(res.blob_path(cache_dir)) and os.path.exists(res.bootstrap)):
        return None
    res.cached = True
    res.seconds = 0.0  # nothing was converted in this run
    return res


class _StreamReader(io.RawIOBase):
    """A file object over an iterator of byte chunks that reports progress."""

    def __init__(self, chunks: Iterator[bytes], report: Callable[[int], None]) -> None:
        self._it = chunks
        self._buf = b""
        self._report = report
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
            self.total += len(self._buf)
            self._report(len(self._buf))
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def convert_layer(job: LayerJob, progress: Progress | None = None) -> LayerResult:
    """Convert ``job.layer`` (or return the cached result). Idempotent.

    Costs one streamed GET of the layer blob and one pass of the builder; a cache
    hit costs nothing on the network. Errors leave no cache entry and no temp file.
    """
    opts = job.options
    lower_ids = tuple(d for d, _ in job.lower)
    cached = lookup_cache(job.cache_dir, job.layer.digest, opts, lower_ids)
    if cached is not None:
        cached.index = job.index
        if progress:
            progress(job.index, "done", 0)
        return cached
    if opts.oci_ref and job.layer.compression != "gzip":
        raise InvalidArgument(
            f"--oci-ref: layer {job.layer.digest} is {job.layer.compression}, not gzip: "
            "only gzip layers can be read in place (zran)")
    t0 = time.monotonic()
    blobs_dir = os.path.join(job.cache_dir, "blobs")
    boots_dir = os.path.join(job.cache_dir, "bootstraps")
    for d in (blobs_dir, boots_dir, os.path.join(job.cache_dir, "layers"),
              os.path.join(job.cache_dir, "tmp")):
        os.makedirs(d, exist_ok=True)
    work = tempfile.mkdtemp(prefix="layer-", dir=os.path.join(job.cache_dir, "tmp"))
    try:
        def report(n: int) -> None:
            if progress:
                progress(job.index, "bytes", n)

        with job.registry.client() as client:
            chunks = client.get_blob(job.repo, job.layer.digest)
            raw = _StreamReader(chunks, report)
            stream = io.BufferedReader(raw, buffer_size=1 << 20)
            raw_boot = os.path.join(work, "layer.boot")
            chunk_dict = _chunk_dict(opts, job.lower)
            try:
                if opts.oci_ref:
                    result = build(
                        stream, raw_boot, work, type="targz-ref", chunk_size=opts.chunk_size,
                        prefetch_files=opts.prefetch_files, blob_inline_meta=True,
                        lean_meta=not opts.oci_ref_full_meta,
                        zran_context_size=opts.oci_ref_context_size)
                else:
                    result = build(
                        stream, raw_boot, work, type="tar-rafs", fs_version=opts.fs_version,
                        compressor=opts.compressor, digester=opts.digester,
                        chunk_size=opts.chunk_size, chunk_dict=chunk_dict,
                        prefetch_files=opts.prefetch_files, whiteout_spec="none")
            except Exception as err:
                # Corrupt bytes usually break the gzip or tar stream before the digest
                # check at the end could run: name the real cause when it is that.
                mismatch: Exception | None = err if isinstance(err, DigestMismatch) else None
                if mismatch is None:
                    try:
                        for _ in chunks:
                            pass
                    except DigestMismatch as late:
                        mismatch = late
                    except Exception:  # noqa: BLE001, S110 - the build error is the one to report
                        pass
                if mismatch is not None:
                    raise DigestMismatch(
                        f"source layer {job.layer.digest}: content does not match its "
                        f"digest ({mismatch})") from err
                raise
            # Drain to the end: the client checks the layer digest after the last byte.
            try:
                while stream.read(1 << 20):
                    pass
            except DigestMismatch as mismatch:
                raise DigestMismatch(f"source layer {job.layer.digest}: content does not "
                                     f"match its digest ({mismatch})") from mismatch
            if raw.total != job.layer.size:
                raise InvalidArgument(
                    f"layer {job.layer.digest}: registry sent {raw.total} bytes, "
                    f"manifest says {job.layer.size}")
        new = [b for b in result.blobs if b.new]
        blob: _MetaBlob | InlineBlob
        if opts.oci_ref:
            blob = _zran_meta_blob(result, blobs_dir)
            boot_out = os.path.join(boots_dir, blob.digest.split(":", 1)[1] + ".boot")
            # The layer bootstrap already names the meta blob as a merge wants it.
            shutil.copyfile(raw_boot, boot_out)
        else:
            builder_blob = new[0].path if new else None
            with open(raw_boot, "rb") as f:
                layer_boot = f.read()
            if new:
                layer_boot = _flag_inline_meta(layer_boot, new[0].blob_id)
            blob = inline_bootstrap(builder_blob, layer_boot, blobs_dir, consume=True)
            boot_out = os.path.join(boots_dir, blob.digest.split(":", 1)[1] + ".boot")
            _retarget_bootstrap(raw_boot, boot_out, new[0].blob_id if new else None, blob, opts)
        res = LayerResult(
            source_digest=job.layer.digest, source_size=job.layer.size,
            blob_digest=blob.digest, blob_size=blob.size, bootstrap=boot_out,
            has_data=bool(new), chunks=result.chunk_count, chunks_written=result.chunks_written,
            bytes_in=result.bytes_in, compressed_bytes=result.compressed_bytes,
            dedup_bytes=result.dedup_bytes, seconds=round(time.monotonic() - t0, 3),
            index=job.index, warnings=list(result.warnings),
            ref_digest=job.layer.digest if opts.oci_ref else "")
        entry = _entry_path(job.cache_dir, cache_key(job.layer.digest, opts, lower_ids))
        tmp_entry = entry + f".{os.getpid()}.tmp"
        with open(tmp_entry, "w") as out:
            json.dump(asdict(res), out, indent=1)
        os.replace(tmp_entry, entry)
        if progress:
            progress(job.index, "done", 0)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class _MetaBlob:
    digest: str
    size: int


def _zran_meta_blob(result: Any, blobs_dir: str) -> _MetaBlob:
    """Move a targz-ref build's meta blob (the layer's pushable Nydus blob) into the
    cache's blob directory."""
    z = result.zran
    final = os.path.join(blobs_dir, z["meta_blob"])
    os.replace(z["meta_blob_path"], final)
    return _MetaBlob("sha256:" + z["meta_blob"], z["meta_blob_size"])


def _chunk_dict(opts: BuildOptions, lower: tuple[tuple[str, str], ...]) -> Any:
    """The chunk dict of a build: the user's dict bootstrap, then every chunk of the
    lower layers' own bootstraps (per-layer trees keep whiteout-deleted files, so
    their chunks count too). A path when there is only the user's dict."""
    if not lower:
        return opts.chunk_dict
    out: ChunkDict = chunk_dict_from_bootstrap(opts.chunk_dict) if opts.chunk_dict else {}
    for _, boot in lower:
        for d, ref in chunk_dict_from_tree(load_bootstrap(boot).tree).items():
            out.setdefault(d, ref)
    return out


def _flag_inline_meta(boot: bytes, builder_id: str) -> bytes:
    """The layer bootstrap as its blob carries it: its own blob flagged INLINED_FS_META,
    as ``nydus-image create --blob-inline-meta`` writes it. A reader that opens the pushed
    blob as a bootstrap (upstream's ``nydus-image check``/``inspect``, nydusd) names the
    blobs so flagged after the file, since the table still holds the builder's id; without
    the flag upstream looks for a blob named by the builder's id and fails."""
    out = bytearray(boot)
    ext = L.RafsV6SuperBlockExt.unpack(out, L.RAFS_V6_EXT_SUPER_OFFSET)
    for off in range(ext.blob_table_offset, ext.blob_table_offset + ext.blob_table_size,
                     L.RafsV6Blob.SIZE):
        entry = L.RafsV6Blob.unpack(out, off)
        if entry.blob_id.decode("latin-1") == builder_id:
            flagged = replace(entry, features=entry.features | BlobFeatures.INLINED_FS_META)
            out[off:off + L.RafsV6Blob.SIZE] = flagged.pack()
    return bytes(out)


def _retarget_bootstrap(src: str, dst: str, builder_id: str | None, blob: Any,
                        opts: BuildOptions) -> None:
    """Rewrite a per-layer bootstrap so that its own blob carries the pushed digest.

    The builder names a blob by the sha256 of the builder's file; the registry
    holds the inline blob (builder blob + bootstrap + new TOC), so id, TOC size
    and TOC digest change. ``compressed_size`` stays the end of the builder's
    blob, which is where upstream's inline blobs record it too.
    """
    if builder_id is None:
        shutil.copyfile(src, dst)
        return
    img = load_bootstrap(src)
    for b in img.blobs:
        if b.blob_id == builder_id:
            b.blob_id = blob.digest.split(":", 1)[1]
            b.blob_toc_size = blob.toc_size
            b.blob_toc_digest = blob.toc_digest
            b.compressed_size = blob.data_end
    write_bootstrap(img.tree, img.blobs, dst, V6Options(
        chunk_size=img.chunk_size, compressor=img.compressor, digester=img.digester,
        prefetch=tuple(normalize_path(os.fsencode(p)) for p in opts.prefetch_files)))
