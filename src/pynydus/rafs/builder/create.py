"""``build()``: turn a directory or an OCI layer tar into a RAFS v6 bootstrap + data blob.

This is the entry point behind ``pynydus image build`` (upstream ``nydus-image
create``). It wires the pieces together in one streaming pass:

    source entries ──► blob writer (data → blob file, dedup) ──► tree (metadata only)
                                                       └──► v6writer (bootstrap file)

Memory holds the metadata tree and one chunk at a time, never a whole file. The
blob is written to a temp file in ``blob_dir`` and renamed to its sha256 (its
registry digest) when complete; on any error it is removed and no bootstrap is
written, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Protocol, cast

from pynydus.errors import FormatError, InvalidArgument, NotImplementedFeature
from pynydus.rafs.builder.blobwriter import (
    DEFAULT_CHUNK_SIZE,
    BlobDesc,
    BlobStats,
    BlobWriter,
    ChunkDesc,
    ChunkDict,
)
from pynydus.rafs.builder.tree import Tree, iter_nodes
from pynydus.rafs.builder.v6writer import (
    BootstrapInfo,
    V6Options,
    atomic_write,
    write_bootstrap,
)
from pynydus.rafs.format import (
    OCI_WHITEOUT_PREFIX,
    BlobFeatures,
    Compressor,
    Digester,
    parse_compressor,
    parse_digester,
)
from pynydus.rafs.format.tarsparse import DEFAULT_MAX_SPARSE_SIZE
from pynydus.rafs.source import (
    DataReader,
    DirSource,
    Entry,
    EntryType,
    normalize_path,
)

# A directory build imports only what it runs: tar sources (tarfile, the layer
# decoders), tarfs, ZRAN and the bootstrap reader (parent images, chunk dicts) load
# in the functions that use them.
if TYPE_CHECKING:
    from pynydus.rafs.builder.load import LoadedImage
    from pynydus.rafs.builder.tarfsblob import TarfsBlob

__all__ = ["BlobReport", "BuildProgress", "BuildResult", "SourceType", "build", "build_tree"]

SourceType = Literal["dir-rafs", "tar-rafs", "targz-rafs", "tar-tarfs", "targz-ref"]


@dataclass(frozen=True)
class BlobReport:
    """One blob of the blob table as reported in the build JSON."""

    blob_id: str
    path: str | None  # None for blobs that came from a chunk dict or parent
    compressed_size: int
    uncompressed_size: int
    chunk_count: int
    new: bool  # written by this build


@dataclass
class BuildResult:
    """Outcome of :func:`build`; ``to_json()`` is the ``--output-json`` document."""

    bootstrap: str
    bootstrap_size: int
    blobs: list[BlobReport]
    inodes: int
    chunk_count: int  # distinct chunks referenced by the bootstrap (chunk table entries)
    chunks_written: int
    bytes_in: int  # file data read from the source
    dedup_chunks: int
    dedup_bytes: int
    dict_chunks: int
    compressed_bytes: int
    elapsed_seconds: float
    fs_version: int = 6
    compressor: str = "none"
    digester: str = "blake3"
    warnings: list[str] = field(default_factory=list)
    # targz-ref: the meta blob written (digest, path, size) and the layer it indexes
    zran: dict[str, Any] | None = None

    @property
    def blob_ids(self) -> list[str]:
        return [b.blob_id for b in self.blobs]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["blob_ids"] = self.blob_ids
        doc["throughput_mib_s"] = (
            round(self.bytes_in / 2**20 / self.elapsed_seconds, 2) if self.elapsed_seconds else None
        )
        return doc


@dataclass(frozen=True)
class BuildProgress:
    """Where a build is: handed to ``build(progress=...)`` about once a second.

    ``phase`` is "data" while entries and file data are read (``entries`` and
    ``bytes_in`` grow), then "bootstrap" once, then "done" once.
    """

    phase: Literal["data", "bootstrap", "done"]
    entries: int
    bytes_in: int
    elapsed: float


ProgressFn = Callable[[BuildProgress], None]


class _Ticker:
    """Calls ``fn`` at most every ``interval`` seconds; cheap to poke per entry."""

    def __init__(self, fn: ProgressFn | None, interval: float, t0: float) -> None:
        self.fn, self.interval, self.t0 = fn, interval, t0
        self._next = t0 + interval
        self.entries = 0

    def entry(self, bytes_in: int) -> None:
        self.entries += 1
        if self.fn is not None and (now := time.monotonic()) >= self._next:
            self._next = now + self.interval
            self.fn(BuildProgress("data", self.entries, bytes_in, now - self.t0))

    def phase(self, phase: Literal["bootstrap", "done"], bytes_in: int) -> None:
        if self.fn is not None:
            self.fn(BuildProgress(phase, self.entries, bytes_in, time.monotonic() - self.t0))


def _source_for(
    source: Any, type: str, first: tuple[bytes, ...] = (),
    max_sparse_size: int = DEFAULT_MAX_SPARSE_SIZE,
) -> Iterable[tuple[Entry, DataReader | None]]:
    if type == "dir-rafs":
        return DirSource(source, first=first)
    if type in ("tar-rafs", "targz-rafs"):
        from pynydus.rafs.source.tarsource import TarSource

        return TarSource(source, max_sparse_size=max_sparse_size)
    raise InvalidArgument(
        f"unknown source type {type!r}: expected dir-rafs, tar-rafs, targz-rafs or tar-tarfs"
    )


class LayerBlob(Protocol):
    """The blob a build feeds file data into: a :class:`BlobWriter` (chunked, deduplicated,
    compressed) or a :class:`TarfsBlob` (the layer tar itself)."""

    stats: BlobStats

    def add_entry(self, entry: Entry, reader: DataReader) -> tuple[list[ChunkDesc], int]:
        """The chunks of regular file ``entry`` read from ``reader``, and the bytes read."""
        ...


def build_tree(
    entries: Iterable[tuple[Entry, DataReader | None]],
    blob: LayerBlob,
    tree: Tree,
    *,
    strict_sizes: bool,
    ticker: _Ticker | None = None,
) -> None:
    """Feed every ``(Entry, reader)`` into ``blob`` (file data) and ``tree`` (metadata).

    ``strict_sizes`` makes a short read an error (tar: the archive is truncated);
    otherwise the size actually read wins (a directory file changed while walking).
    """
    stats = blob.stats
    add_entry, apply = blob.add_entry, tree.apply
    # (entries are counted for the progress reports only)
    tick = ticker.entry if ticker is not None and ticker.fn is not None else None
    keep_whiteouts = tree.whiteout_spec == "none"
    reg = EntryType.REG
    for entry, reader in entries:
        if tick is not None:
            tick(stats.bytes_in)
        refs: list[ChunkDesc] | None = None
        if entry.type is reg and (keep_whiteouts or OCI_WHITEOUT_PREFIX not in entry.path
                                  or entry.whiteout is None):
            assert reader is not None
            try:
                refs, got = add_entry(entry, reader)
            finally:
                close = getattr(reader, "close", None)
                if close is not None:
                    close()  # a directory source's file stays open unless read to EOF
            if got != entry.size:
                if strict_sizes:
                    raise FormatError(
                        f"entry {entry.path!r}: expected {entry.size} bytes of data, got {got}"
                    )
                entry.size = got
        apply(entry, refs)


# Builds under way in this process, and whether the collector ran before the first.
_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a build runs (in any thread of the process).

    A build makes a few long-lived objects per entry (nodes, inodes, chunk records: a
    tree without cycles, freed by reference counts) and a few short-lived ones, and the
    collector's generational passes walk the growing tree again and again: 15% of a
    50,000-file tarfs layer's CPU. Nothing a build makes needs the collector; other
    threads' cyclic garbage waits for it until the last concurrent build ends.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def _gc_after_fork() -> None:
    # A child forked while a build ran in another thread runs no build: the collector
    # is back as it was before the first (and the lock, maybe held then, is new).
    global _gc_pauses, _gc_lock
    _gc_lock = threading.Lock()
    if _gc_pauses:
        _gc_pauses = 0
        if _gc_was_enabled:
            gc.enable()


os.register_at_fork(after_in_child=_gc_after_fork)


@_gc_paused()
def build(
    source: str | os.PathLike[str] | BinaryIO,
    bootstrap_out: str | os.PathLike[str],
    blob_dir: str | os.PathLike[str],
    *,
    type: SourceType = "dir-rafs",
    fs_version: int = 6,
    compressor: str | Compressor = "none",
    digester: str | Digester = "blake3",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_dict: ChunkDict | str | os.PathLike[str] | None = None,
    parent_bootstrap: str | os.PathLike[str] | None = None,
    prefetch_files: Iterable[str | bytes] | None = None,
    output_json: str | os.PathLike[str] | None = None,
    whiteout_spec: str = "overlayfs",
    compact_inodes: bool = False,
    blob_cache_dir: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
    progress_interval: float = 1.0,
    max_sparse_size: int = DEFAULT_MAX_SPARSE_SIZE,
    blob_id: str | None = None,
    expect_tar_sha256: str | None = None,
    blob_inline_meta: bool = False,
    lean_meta: bool = False,
    zran_context_size: int | None = None,
) -> BuildResult:
    """Build a RAFS v6 image from ``source`` into ``bootstrap_out`` + one blob in ``blob_dir``.

    ``source`` is a directory (``dir-rafs``) or a layer tar, plain/gzip/zstd by magic
    (``tar-rafs``/``targz-rafs``; a file object works too). ``tar-tarfs`` makes the
    uncompressed tar itself the blob (512-byte blocks, sha256, no compression; the
    kernel mounts it directly; spec §1.15).

    The blob is named by its sha256 and omitted when the image has no file data.
    ``chunk_dict`` (a digest→ChunkDesc mapping, or a bootstrap path, optionally as
    ``bootstrap=PATH``) dedups against existing blobs, which then join the blob
    table. ``parent_bootstrap`` makes the result the parent image with this layer
    overlaid (its whiteouts applied), parent blobs first in the table.
    ``prefetch_files`` are absolute paths (``/`` = everything) recorded in the
    prefetch table; a directory build also writes their data first.
    ``whiteout_spec`` says what OCI whiteouts become (:mod:`pynydus.rafs.builder.tree`).
    ``blob_cache_dir`` also writes the blob's cache form (``<id>.blob.data``, the
    uncompressed address space usable as the kernel device of a compressed image,
    and ``<id>.blob.meta``), like upstream's ``--blob-cache-dir``.

    ``targz-ref`` (ZRAN, spec §2.5) leaves the file data in the gzip layer ``source``:
    the blob table names the layer (by its sha256, which is computed as it is read)
    and ``blob_dir`` receives only the *meta blob* of :mod:`.zranblob` (chunk info,
    inflate contexts, windows), named by its sha256; chunk size as given, gzip and
    sha256 forced, no chunk dict, parent or blob cache. With ``blob_inline_meta`` the
    meta blob is upstream's registry form (it carries the layer's bootstrap and a TOC)
    and ``bootstrap_out`` is the layer's bootstrap as a merge names that blob
    (``blob_meta_digest``/``blob_meta_size``/TOC digest set): what ``pynydus convert
    --oci-ref`` pushes and merges. ``lean_meta`` (with ``blob_inline_meta``) leaves the
    layer's bootstrap and the chunk digests out of a meta blob that has chunk info:
    the merged bootstrap holds both (what ``convert --oci-ref`` pushes by default).
    ``zran_context_size``: compressed bytes an inflate context spans before the next
    chunk starts another (:mod:`.zranblob`; None: its ``DEFAULT_CONTEXT_SIZE``).

    ``progress`` is called with a :class:`BuildProgress` every ``progress_interval``
    seconds while data is read, and once per later phase (on the calling thread).
    ``max_sparse_size`` bounds the real size of a GNU sparse tar member and the holes
    of all the tar's sparse members together (holes are read as zeros): a larger
    claim is a FormatError.

    ``tar-tarfs`` only: ``blob_id`` names the blob (else its sha256) and
    ``expect_tar_sha256`` is the uncompressed tar's digest, checked before the blob is
    named (FormatError on a mismatch).

    A failed build removes its partial blob and writes no bootstrap. The output is
    deterministic: the same input gives byte-identical bootstrap and blob.
    """
    t0 = time.monotonic()
    ticker = _Ticker(progress, progress_interval, t0)
    if fs_version != 6:
        raise NotImplementedFeature(f"fs version {fs_version}: only RAFS v6 can be built")
    comp = parse_compressor(compressor)
    dig = parse_digester(digester)
    if comp == Compressor.GZIP:
        raise InvalidArgument(
            "compressor gzip is only used for zran data; choose none, lz4_block or zstd"
        )
    if type == "targz-ref":
        if chunk_dict is not None or parent_bootstrap is not None or blob_cache_dir is not None:
            raise InvalidArgument("targz-ref takes no chunk dict, parent or blob cache")
        prefetch = tuple(normalize_path(os.fsencode(p)) for p in (prefetch_files or ()))
        result = _build_zran(source, bootstrap_out, blob_dir, chunk_size, prefetch,
                             blob_inline_meta, lean_meta, zran_context_size, ticker, t0)
        if output_json is not None:
            with open(output_json, "w") as f:
                json.dump(result.to_json(), f, indent=2)
        ticker.phase("done", result.bytes_in)
        return result
    if blob_inline_meta or lean_meta:
        raise InvalidArgument("blob_inline_meta and lean_meta are for targz-ref builds only")
    tarfs = type == "tar-tarfs"
    if (blob_id is not None or expect_tar_sha256 is not None) and not tarfs:
        raise InvalidArgument("blob_id and expect_tar_sha256 apply to tar-tarfs builds only")
    if tarfs:
        if chunk_dict is not None or parent_bootstrap is not None:
            raise InvalidArgument(
                "tar-tarfs layers take no chunk dict or parent; merge them instead"
            )
        if blob_cache_dir is not None:
            raise InvalidArgument("tar-tarfs needs no blob cache: the tar is the uncompressed blob")
        # The blob is the raw tar: nothing is compressed, and upstream forces sha256.
        comp, dig = Compressor.NONE, Digester.SHA256
    dict_map = _load_chunk_dict(chunk_dict)
    parent: LoadedImage | None = None
    if parent_bootstrap is not None:
        from pynydus.rafs.builder.load import chunk_dict_from_tree, load_bootstrap

        parent = load_bootstrap(parent_bootstrap)
        if parent.chunk_size != chunk_size or parent.digester != dig:
            raise InvalidArgument(
                f"parent bootstrap {os.fspath(parent_bootstrap)!r}: chunk size "
                f"{parent.chunk_size:#x}/{parent.digester.name} differs from "
                f"{chunk_size:#x}/{dig.name}"
            )
        # The parent's chunks dedup the new layer too (upstream's layered chunk dict).
        dict_map = {**chunk_dict_from_tree(parent.tree), **dict_map}

    # Prefetch files lead a directory build's blob (a tar stream has its own order).
    prefetch = tuple(normalize_path(os.fsencode(p)) for p in (prefetch_files or ()))
    tree = Tree(whiteout_spec)
    block_size = 4096
    if tarfs:
        from pynydus.rafs.builder.tarfsblob import TARFS_BLOCK_SIZE, TarfsBlob

        block_size = TARFS_BLOCK_SIZE
        data = _write_tarfs_blob(source, TarfsBlob(blob_dir, chunk_size, blob_id=blob_id,
                                                   expect_sha256=expect_tar_sha256),
                                 tree, ticker)
    else:
        data = _write_blob(
            _source_for(source, type, prefetch, max_sparse_size),
            BlobWriter(
                blob_dir,
                compressor=comp,
                digester=dig,
                chunk_size=chunk_size,
                chunk_dict=dict_map,
                cache_dir=blob_cache_dir,
            ),
            tree,
            strict_sizes=type != "dir-rafs",
            ticker=ticker,
        )
    ticker.phase("bootstrap", data.stats.bytes_in)

    try:
        result = _finish_build(
            tree, parent, data, dict_map, bootstrap_out, output_json, t0,
            V6Options(
                chunk_size=chunk_size,
                compressor=comp,
                digester=dig,
                compact_inodes=compact_inodes,
                prefetch=prefetch,
                block_size=block_size,
                tarfs=tarfs,
            ),
        )
        data.settle()
    except BaseException:
        data.discard()  # a failed build leaves no blob behind
        raise
    ticker.phase("done", data.stats.bytes_in)
    return result


def _build_zran(
    source: Any, bootstrap_out: str | os.PathLike[str], blob_dir: str | os.PathLike[str],
    chunk_size: int, prefetch: tuple[bytes, ...], inline: bool, lean: bool,
    context_size: int | None, ticker: _Ticker, t0: float,
) -> BuildResult:
    """A targz-ref build (see :func:`build`): one pass over the gzip layer."""
    from pynydus.rafs.builder.zranblob import (
        DEFAULT_CONTEXT_SIZE,
        ZRAN_FEATURES_INLINE,
        ZRAN_FEATURES_LEAN,
        MetaBlob,
        ZranBlob,
        inline_meta,
        separate_meta,
    )
    from pynydus.rafs.decoder.gzindex import GzipIndexer
    from pynydus.rafs.format.blobmeta import TAR_BLOCK_SIZE as TAR_BLOCK
    from pynydus.rafs.source.tarsource import TarSource

    with contextlib.ExitStack() as stack:
        f: BinaryIO = stack.enter_context(open(source, "rb")) \
            if isinstance(source, (str, os.PathLike)) else source
        index = GzipIndexer(f)
        zblob = ZranBlob(index, chunk_size,
                         DEFAULT_CONTEXT_SIZE if context_size is None else context_size)
        tree = Tree("overlayfs")
        # The indexer is read like a file (of the tar it inflates).
        build_tree(TarSource(cast(BinaryIO, index)), zblob, tree, strict_sizes=True,
                   ticker=ticker)
        index.drain()
    ticker.phase("bootstrap", zblob.stats.bytes_in)
    pack = zblob.finish()
    desc = zblob.desc if pack is not None else None
    blobs = _blob_table(tree, {}, desc)
    opts = V6Options(chunk_size=chunk_size, compressor=Compressor.GZIP,
                     digester=Digester.SHA256, prefetch=prefetch)
    os.makedirs(blob_dir, exist_ok=True)
    meta: MetaBlob | None = None
    if lean and not inline:
        raise InvalidArgument("lean_meta needs blob_inline_meta")
    lean = lean and pack is not None  # a layer without data keeps its (small) bootstrap
    if not inline:
        if pack is not None and desc is not None:
            meta = separate_meta(pack)
            desc.blob_meta_digest = bytes.fromhex(meta.digest)
            desc.blob_meta_size = len(meta.data)
    else:
        features = ZRAN_FEATURES_LEAN if lean else ZRAN_FEATURES_INLINE
        if desc is not None:
            desc.features = features
            desc.ci_offset = TAR_BLOCK
        if lean:
            meta = inline_meta(pack, None, index.size_in, zblob.desc.uncompressed_size,
                               digests=False)
        else:
            embedded = os.fspath(bootstrap_out) + ".embedded"
            try:
                write_bootstrap(tree, blobs, embedded, opts)
                with open(embedded, "rb") as ef:
                    meta = inline_meta(pack, ef.read(), index.size_in,
                                       zblob.desc.uncompressed_size)
            finally:
                try:
                    os.unlink(embedded)
                except FileNotFoundError:
                    pass
        if desc is not None:
            # As upstream's merge names it (--blob-digests/--blob-sizes/--blob-toc-digests;
            # it leaves blob_toc_size 0).
            desc.features = features & ~int(BlobFeatures.INLINED_FS_META)
            desc.blob_meta_digest = bytes.fromhex(meta.digest)
            desc.blob_meta_size = len(meta.data)
            desc.blob_toc_digest = meta.toc_digest
    meta_path = None
    if meta is not None:
        meta_path = os.path.join(os.fspath(blob_dir), meta.digest)
        atomic_write(meta_path, meta.data)
    info = write_bootstrap(tree, blobs, bootstrap_out, opts)
    st = zblob.stats
    result = BuildResult(
        bootstrap=os.fspath(bootstrap_out), bootstrap_size=info.size,
        blobs=[BlobReport(b.blob_id, meta_path, b.compressed_size, b.uncompressed_size,
                          b.chunk_count, True) for b in blobs],
        inodes=info.inodes, chunk_count=info.chunk_table_entries,
        chunks_written=st.chunks_written, bytes_in=st.bytes_in,
        dedup_chunks=st.dedup_chunks, dedup_bytes=st.dedup_bytes, dict_chunks=0,
        compressed_bytes=st.compressed_bytes, elapsed_seconds=time.monotonic() - t0,
        compressor="gzip", digester="sha256",
        warnings=[f"xattr {name!r} of {path!r} has no RAFS v6 prefix; skipped"
                  for path, name in tree.skipped_xattrs],
        zran={"layer_digest": "sha256:" + index.hexdigest(), "layer_size": index.size_in,
              "meta_blob": meta.digest if meta is not None else None,
              "meta_blob_path": meta_path,
              "meta_blob_size": len(meta.data) if meta is not None else 0,
              "meta_toc_digest": meta.toc_digest.hex() if meta is not None else None,
              "contexts": zblob.context_count, "chunks": zblob.chunk_count})
    return result


def _finish_build(
    tree: Tree,
    parent: LoadedImage | None,
    data: _BlobOutcome,
    dict_map: ChunkDict,
    bootstrap_out: str | os.PathLike[str],
    output_json: str | os.PathLike[str] | None,
    t0: float,
    options: V6Options,
) -> BuildResult:
    """Put the layer on its parent, write the bootstrap and the JSON report."""
    lower_links = list(tree.lower_links)
    if parent is not None:
        from pynydus.rafs.builder.overlay import (
            layer_of_tree,
            merged_of_tree,
            overlay_layer,
            tree_of_merged,
        )

        # The layer's whiteouts hide parent entries, its lower-layer hardlinks bind.
        merged = merged_of_tree(parent.tree)
        overlay_layer(merged, layer_of_tree(tree))
        skipped, tree = tree.skipped_xattrs, tree_of_merged(merged)
        tree.skipped_xattrs = skipped
        lower_links = []
    blobs = _blob_table(tree, dict_map, data.desc, parent.blobs if parent is not None else None)
    info = write_bootstrap(tree, blobs, bootstrap_out, options)
    result = _result(
        bootstrap_out, info, blobs, data, tree, options.compressor, options.digester,
        time.monotonic() - t0,
    )
    result.warnings += [
        f"hardlink {path!r}: target {target!r} is not in this layer; a merge onto the "
        "lower layers binds it (empty file until then)"
        for path, target in lower_links
    ]
    if output_json is not None:
        with open(output_json, "w") as f:
            json.dump(result.to_json(), f, indent=2)
    return result


@dataclass
class _BlobOutcome:
    desc: BlobDesc | None  # None: no file data, no blob
    path: str | None
    existed: bool  # a file with this id was in blob_dir already (same content)
    stats: BlobStats
    writer: BlobWriter | None = None  # still making the blob durable (finish(settle=False))

    def settle(self) -> None:
        """Wait until the blob is durable under its id."""
        if self.writer is not None:
            self.writer.settle()

    def discard(self) -> None:
        """Remove the blob this build wrote (the build failed after it)."""
        if self.writer is not None:
            self.writer.abort()
        elif self.path and not self.existed:
            os.unlink(self.path)


def _write_blob(
    entries: Iterable[tuple[Entry, DataReader | None]],
    writer: BlobWriter,
    tree: Tree,
    *,
    strict_sizes: bool,
    ticker: _Ticker,
) -> _BlobOutcome:
    try:
        build_tree(entries, writer, tree, strict_sizes=strict_sizes, ticker=ticker)
        # The blob's fsync and rename overlap with writing the bootstrap.
        desc = writer.finish(settle=False)
    except BaseException:
        writer.abort()
        raise
    return _BlobOutcome(desc, writer.path, writer.replaced_existing, writer.stats, writer)


def _write_tarfs_blob(source: Any, blob: TarfsBlob, tree: Tree, ticker: _Ticker) -> _BlobOutcome:
    from pynydus.rafs.source.tarsource import TarSource

    try:
        build_tree(TarSource(source, tee=blob), blob, tree, strict_sizes=True, ticker=ticker)
        desc = blob.finish()
    except BaseException:
        blob.abort()
        raise
    return _BlobOutcome(desc, blob.path, blob.replaced_existing, blob.stats)


def _result(
    bootstrap_out: str | os.PathLike[str],
    info: BootstrapInfo,
    blobs: list[BlobDesc],
    data: _BlobOutcome,
    tree: Tree,
    comp: Compressor,
    dig: Digester,
    elapsed: float,
) -> BuildResult:
    st = data.stats
    return BuildResult(
        bootstrap=os.fspath(bootstrap_out),
        bootstrap_size=info.size,
        blobs=[
            BlobReport(
                blob_id=b.blob_id,
                path=data.path if b is data.desc else None,
                compressed_size=b.compressed_size,
                uncompressed_size=b.uncompressed_size,
                chunk_count=b.chunk_count,
                new=b is data.desc,
            )
            for b in blobs
        ],
        inodes=info.inodes,
        chunk_count=info.chunk_table_entries,
        chunks_written=st.chunks_written,
        bytes_in=st.bytes_in,
        dedup_chunks=st.dedup_chunks,
        dedup_bytes=st.dedup_bytes,
        dict_chunks=st.dict_chunks,
        compressed_bytes=st.compressed_bytes,
        elapsed_seconds=elapsed,
        compressor=comp.name.lower(),
        digester=dig.name.lower(),
        warnings=[
            f"xattr {name!r} of {path!r} has no RAFS v6 prefix; skipped"
            for path, name in tree.skipped_xattrs
        ],
    )


def _load_chunk_dict(
    chunk_dict: ChunkDict | Mapping[bytes, ChunkDesc] | str | os.PathLike[str] | None,
) -> ChunkDict:
    if chunk_dict is None:
        return {}
    if isinstance(chunk_dict, Mapping):
        return dict(chunk_dict)
    from pynydus.rafs.builder.load import chunk_dict_from_bootstrap

    path = os.fspath(chunk_dict)
    # upstream's CLI form is --chunk-dict bootstrap=PATH
    return chunk_dict_from_bootstrap(path.removeprefix("bootstrap="))


def _blob_table(
    tree: Tree, dict_map: ChunkDict, new: BlobDesc | None, base: list[BlobDesc] | None = None
) -> list[BlobDesc]:
    """The blob table: ``base`` (a parent's table, kept whole and in order), then the
    chunk-dict blobs the tree uses (in dict order), then the new blob. Blob ids are
    unique; the writer resolves chunk references by identity, then by id."""
    order: list[BlobDesc] = list(base or [])
    ids = {b.blob_id for b in order}
    used: dict[str, BlobDesc] = {}
    for _, node in iter_nodes(tree.root):  # order does not matter: no sorting
        for c in node.inode.chunks:
            if c.blob is not new:
                used.setdefault(c.blob.blob_id, c.blob)
    candidates = [ref.blob for ref in dict_map.values()] + list(used.values())
    for b in candidates:
        if b.blob_id in used and b.blob_id not in ids:
            order.append(b)
            ids.add(b.blob_id)
    # The new blob goes in even if later entries replaced every file that used it,
    # unless a blob with the same content (same id) is in the table already.
    if new is not None and new.blob_id not in ids:
        order.append(new)
    return order
