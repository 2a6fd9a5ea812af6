"""Cut file data into chunks and write one Nydus data blob (separate-bootstrap flavour).

Theory of operation. Files arrive one after another; each is read in
``chunk_size`` pieces (never whole), every piece is digested (blake3 or sha256 of
the *uncompressed* bytes) and looked up, first in the caller's chunk dict (chunks
that already live in other blobs), then among the chunks this blob already holds.
Only a miss is compressed and appended. Every chunk gets a slot in the blob's
*uncompressed address space* starting on a 4 KiB boundary; the kernel's EROFS
driver and nydusd's blob cache address chunks there.

With ``compressor=none`` we also start each chunk's *compressed* bytes on a 4 KiB
boundary, zero-filling the gaps, so compressed offset == uncompressed offset and
the data section of the blob file *is* the uncompressed address space: the blob
can be handed to the kernel as an EROFS extra device as-is (spec §7). Upstream
packs raw chunks back to back; readers do not care, they follow the offsets.

After the data the blob carries, in upstream's blob-toc layout (spec §2.2)::

    chunks | tar(image.blob) | ci | ci header (4096) | tar(blob.meta)
           | digests | tar(blob.digest) | TOC | tar(rafs.blob.toc)

where ``ci`` is the V1 chunk-info array (16 B per chunk, compressed with the blob's
compressor when that helps). A "tar(x)" is a 512-byte GNU header naming the
section *before* it, so the blob parses backwards from its end.

The blob is streamed to a temp file in ``blob_dir`` and renamed to its id at the
end. The id is the sha256 of the whole file, i.e. its registry digest (upstream's
internal id for separately built blobs skips the digest array; we deliberately use
the pushable digest, spec §2.7).
"""

from __future__ import annotations

import collections
import hashlib
import os
import queue
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from pynydus.errors import InvalidArgument
from pynydus.host.cpus import usable_cpus
from pynydus.host.writeback import start_writeback
from pynydus.rafs.format import (
    BlobFeatures,
    Compressor,
    Digester,
    TocEntry,
    compress,
    digest,
    pack_section_header,
    toc_flag_for_compressor,
)
from pynydus.rafs.format import layout as L
from pynydus.rafs.format.blobmeta import (
    BLOB_CCT_HEADER_SIZE,
    BlobChunkInfo,
    BlobCompressionContextHeader,
    ChunkInfoFlags,
    pack_chunk_info_v1,
)
from pynydus.rafs.source import DataReader, Entry

if TYPE_CHECKING:  # the pool's module (and logging) load only when a pool is made
    from concurrent.futures import Future, ThreadPoolExecutor

__all__ = [
    "BLOB_FEATURES_DEFAULT",
    "DEFAULT_CHUNK_SIZE",
    "BlobDesc",
    "BlobWriter",
    "ChunkDesc",
    "ChunkDict",
    "discard_partial",
    "pack_ci_v1",
]

DEFAULT_CHUNK_SIZE = L.RAFS_DEFAULT_CHUNK_SIZE
BLOCK = L.EROFS_BLOCK_SIZE_4096  # chunks start on this boundary in the uncompressed space
_MAX_V1_OFFSET = (1 << 40) - 1  # V1 chunk info holds 40-bit compressed offsets

BLOB_FEATURES_DEFAULT = int(
    BlobFeatures.ALIGNED
    | BlobFeatures.INLINED_CHUNK_DIGEST
    | BlobFeatures.HAS_TAR_HEADER
    | BlobFeatures.HAS_TOC
    | BlobFeatures.CAP_TAR_TOC
)

# Chunks of one file in flight between the reading thread and the codec workers:
# bounds memory to about _WINDOW * chunk_size while keeping every core busy.
_WINDOW = 4
# Blob bytes are handed to the writer thread in batches of about this size, so
# small files cost one list append each, not one thread hand-off.
_WRITE_BATCH = 1 << 20
# Writeback of the blob is started every this many bytes (see pynydus.host.writeback).
_WRITEBACK_STEP = 16 << 20

# (digest, payload, compressed, raw data when a blob cache needs it besides the payload)
_Prepared = tuple[bytes, "Buffer", bool, "Buffer | None"]
Buffer = bytes | memoryview
_V1 = struct.Struct("<QQ")


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(slots=True, eq=False)
class BlobDesc:
    """A blob of the image being written: what the bootstrap writer puts in its blob table.

    Made by the blob writer (filled in at ``finish()``) or by the loader from a read
    bootstrap's :class:`~pynydus.rafs.read.BlobInfo` (the blob table entry as decoded,
    read-only, with its table index); this one is mutable and its place in the table
    is decided when the bootstrap is written. Field names and meanings follow the
    RAFS v6 blob table entry (spec §1.5). Identity (``is``) matters: each
    :class:`ChunkDesc` points at its BlobDesc object.
    """

    blob_id: str
    chunk_size: int
    compressor: Compressor
    digester: Digester
    chunk_count: int = 0
    features: int = BLOB_FEATURES_DEFAULT
    compressed_size: int = 0
    uncompressed_size: int = 0
    blob_toc_size: int = 0
    blob_toc_digest: bytes = bytes(32)
    ci_compressor: Compressor = Compressor.NONE
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_meta_digest: bytes = bytes(32)
    blob_meta_size: int = 0
    cipher_algo: int = 0
    cipher_iv: bytes = bytes(8)


@dataclass(slots=True)
class ChunkDesc:
    """A chunk of a file in the image being written: where its bytes live, what they are.

    The writer's side of :class:`~pynydus.rafs.read.FileChunk` (a chunk as the reader
    decodes it from a bootstrap). ``ci_index`` is the chunk's position in its blob's
    chunk-info array; offsets are in the blob file (compressed) and in its
    uncompressed address space. ``file_offset`` is where the chunk sits in the file
    that first produced it.
    """

    digest: bytes
    blob: BlobDesc
    ci_index: int
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool
    file_offset: int = 0


ChunkDict = dict[bytes, ChunkDesc]
"""Chunks that exist already in other blobs, keyed by digest (``--chunk-dict``)."""


@dataclass
class BlobStats:
    """Counters for the build report."""

    bytes_in: int = 0
    chunks_in: int = 0
    chunks_written: int = 0
    dedup_chunks: int = 0
    dedup_bytes: int = 0
    dict_chunks: int = 0
    compressed_bytes: int = 0


def pack_ci_v1(c_off: int, c_size: int, u_off: int, u_size: int) -> bytes:
    """Pack a 16-byte V1 chunk-info entry (``BlobChunkInfoV1Ondisk``, spec §2.3)."""
    flags = ChunkInfoFlags.COMPRESSED if c_size != u_size else 0
    try:
        return pack_chunk_info_v1(BlobChunkInfo(c_off, c_size, u_off, u_size, flags))
    except ValueError as err:
        raise InvalidArgument(f"chunk info: {err}") from err


def toc_entry(
    name: str, compressor: Compressor, sha256: bytes, c_off: int, c_size: int, u_size: int
) -> bytes:
    """Pack one 128-byte blob TOC entry (spec §2.6)."""
    return TocEntry(
        toc_flag_for_compressor(compressor), name.encode(), sha256, c_off, c_size, u_size
    ).pack()


class _HashingWriter:
    """File writer that keeps a running sha256 and the position.

    Writes go to ``f`` (unbuffered) in batches of about 1 MiB: small parts are
    joined, a big one is written as it is; every 16 MiB the kernel is asked to
    start writing them to disk. With ``threaded`` the sha256 and the writes run
    on a thread of its own (both release the GIL on large buffers): the thread
    that chunks the source never waits for them. ``pos`` is always current;
    :meth:`hexdigest` and :meth:`sync` wait for the writes so far. A write error
    on the thread is raised by the next call. :meth:`close` stops the thread.
    """

    def __init__(self, f: BinaryIO, *, threaded: bool = False) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self.pos = 0
        self._threaded = threaded
        self._parts: list[Buffer] = []
        self._pending = 0
        self._q: queue.Queue[list[Buffer] | None] = queue.Queue(maxsize=8)
        self._thread: threading.Thread | None = None
        self._err: BaseException | None = None
        try:
            self._fd: int | None = f.fileno()
        except (OSError, ValueError):  # io.UnsupportedOperation: not a real file
            self._fd = None
        self._written = 0  # bytes handed to the kernel
        self._flushed = 0  # bytes whose writeback was started

    def write(self, data: Buffer) -> None:
        self.pos += len(data)
        self._parts.append(data)
        self._pending += len(data)
        if self._pending >= _WRITE_BATCH:
            self._hand_off()

    def pad_to(self, align: int) -> None:
        gap = _round_up(self.pos, align) - self.pos
        if gap:
            self.write(bytes(gap))

    def _hand_off(self) -> None:
        if self._err is not None:
            raise OSError(f"blob write failed: {self._err}") from self._err
        batch, self._parts, self._pending = self._parts, [], 0
        if not self._threaded:
            self._write_batch(batch)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="blob-writer", daemon=True)
            self._thread.start()
        self._q.put(batch)

    def _write_batch(self, batch: list[Buffer]) -> None:
        # One copy at most (joining small parts); a big payload goes to the kernel as is.
        data = memoryview(batch[0] if len(batch) == 1 else b"".join(batch))
        self._h.update(data)
        self._written += len(data)
        while data:
            data = data[self._f.write(data) :]
        if self._written - self._flushed >= _WRITEBACK_STEP and self._fd is not None:
            # Disk writes overlap with the build instead of all waiting for the fsync.
            start_writeback(self._fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written

    def _run(self) -> None:
        while (batch := self._q.get()) is not None:
            if self._err is not None:
                continue  # keep draining so the producer never blocks
            try:
                self._write_batch(batch)
            except BaseException as err:  # noqa: BLE001 - raised on the caller's thread
                self._err = err

    def sync(self) -> None:
        """Wait until everything written so far is hashed and in the file object."""
        if self._parts:
            self._hand_off()
        self.close()
        if self._err is not None:
            raise OSError(f"blob write failed: {self._err}") from self._err

    def close(self) -> None:
        """Stop the writer thread (after the batches already handed over); idempotent."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        self.sync()
        return self._h.hexdigest()


class BlobWriter:
    """Write one data blob; feed files with :meth:`add_file`, then :meth:`finish`.

    The blob is created lazily in ``blob_dir`` as a temp file; :meth:`finish` renames
    it to ``<blob_id>`` and returns its :class:`BlobDesc`, or returns None (and
    leaves nothing behind) when no chunk was written. :meth:`abort` removes the temp
    file and is idempotent. Chunks found in ``chunk_dict`` are not written: their
    :class:`ChunkDesc` points at the dict's blob.
    """

    def __init__(
        self,
        blob_dir: str | os.PathLike[str],
        *,
        compressor: Compressor = Compressor.NONE,
        digester: Digester = Digester.BLAKE3,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_dict: ChunkDict | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if chunk_size & (chunk_size - 1) or not BLOCK <= chunk_size <= L.RAFS_MAX_CHUNK_SIZE:
            raise InvalidArgument(
                f"chunk size {chunk_size:#x}: must be a power of two in [0x1000, 0x1000000]"
            )
        self.blob_dir = os.fspath(blob_dir)
        self.compressor = compressor
        self.digester = digester
        self.chunk_size = chunk_size
        self.chunk_dict = chunk_dict or {}
        self.stats = BlobStats()
        # Filled in at finish(); chunk refs hold this object from the start.
        self.desc = BlobDesc(
            blob_id="", chunk_size=chunk_size, compressor=compressor, digester=digester
        )
        self._own: dict[bytes, ChunkDesc] = {}
        self._ci = bytearray()  # V1 chunk-info entries, 16 bytes each
        self._n = 0  # chunks in this blob
        self._digests: list[bytes] = []
        self._u_end = 0  # end of the uncompressed address space used so far
        self._tmp_path: str | None = None
        self._file: BinaryIO | None = None
        self._w: _HashingWriter | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._cache = _CacheWriter(os.fspath(cache_dir)) if cache_dir is not None else None
        self.replaced_existing = False
        self._cpus = usable_cpus()
        self._settler: threading.Thread | None = None
        self._settle_err: BaseException | None = None

    # ------------------------------------------------------------------ data
    def add_entry(self, entry: Entry, reader: DataReader) -> tuple[list[ChunkDesc], int]:
        """:meth:`add_file` for a regular file of a build source: its ``entry.size`` bytes."""
        return self.add_file(reader, entry.size) if entry.size else ([], 0)

    def add_file(self, reader: DataReader, size: int) -> tuple[list[ChunkDesc], int]:
        """Chunk ``size`` bytes of ``reader``; return the file's chunk refs and bytes read.

        Reads at most ``chunk_size`` bytes at a time. A reader that ends early yields
        fewer bytes (the caller decides whether that is an error); a reader with
        more data than ``size`` is read only up to ``size``.
        """
        if size <= self.chunk_size:  # most files: one chunk, no pipeline
            piece = _read_full(reader, size)
            if not piece:
                return [], 0
            return [self._commit(self._prepare(piece), len(piece), 0)], len(piece)
        refs: list[ChunkDesc] = []
        done = 0
        pool = self._pool()
        inflight: collections.deque[tuple[int, int, Future[_Prepared]]] = collections.deque()
        try:
            while done < size:
                want = min(self.chunk_size, size - done)
                piece = _read_full(reader, want)
                if not piece:
                    break
                if pool is None:
                    refs.append(self._commit(self._prepare(piece), len(piece), done))
                else:
                    # Digest + compress run in worker threads (both release the GIL)
                    # while this thread reads ahead; commits stay in file order.
                    inflight.append((len(piece), done, pool.submit(self._prepare, piece)))
                    if len(inflight) >= _WINDOW:
                        n, off, fut = inflight.popleft()
                        refs.append(self._commit(fut.result(), n, off))
                done += len(piece)
                if len(piece) < want:
                    break
            while inflight:
                n, off, fut = inflight.popleft()
                refs.append(self._commit(fut.result(), n, off))
        finally:
            for _, _, fut in inflight:
                fut.cancel()
        return refs, done

    def add_chunk(self, data: bytes, file_offset: int = 0) -> ChunkDesc:
        """Add one chunk's uncompressed bytes (1..chunk_size); dedup, else append."""
        n = len(data)
        if not 0 < n <= self.chunk_size:
            raise InvalidArgument(f"chunk of {n} bytes: must be 1..{self.chunk_size}")
        return self._commit(self._prepare(data), n, file_offset)

    def _pool(self) -> ThreadPoolExecutor | None:
        # Worth a thread hand-off only when there is a codec to run and a second CPU
        # to run it on; digesting alone (blake3: GB/s) is cheaper than the hand-off.
        if self._executor is None and self._cpus > 1 and self.compressor != Compressor.NONE:
            from concurrent.futures import ThreadPoolExecutor

            workers = min(4, self._cpus)
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="chunker")
        return self._executor

    def _prepare(self, data: Buffer) -> _Prepared:
        """CPU part of a chunk: digest and compressed payload. Thread-safe (no state)."""
        payload, is_compressed = compress(data, self.compressor)
        raw = data if self._cache is not None and is_compressed else None
        return digest(data, self.digester), payload, is_compressed, raw

    def _commit(self, prep: _Prepared, n: int, file_offset: int) -> ChunkDesc:
        """Dedup against the dict and this blob, else append the prepared payload."""
        d, payload, is_compressed, raw = prep
        self.stats.bytes_in += n
        self.stats.chunks_in += 1
        hit = self.chunk_dict.get(d)
        if hit is not None and hit.uncompressed_size == n:
            self.stats.dict_chunks += 1
            self.stats.dedup_chunks += 1
            self.stats.dedup_bytes += n
            return _copy_ref(hit, file_offset)
        hit = self._own.get(d)
        if hit is not None:
            self.stats.dedup_chunks += 1
            self.stats.dedup_bytes += n
            return _copy_ref(hit, file_offset)
        index = self._n
        if index >= L.RAFS_MAX_CHUNKS_PER_BLOB:
            raise InvalidArgument(f"blob exceeds {L.RAFS_MAX_CHUNKS_PER_BLOB} chunks")
        w = self._w if self._w is not None else self._writer()
        c_off = w.pos
        if self.compressor == Compressor.NONE and c_off % BLOCK:
            w.pad_to(BLOCK)  # keeps compressed offset == uncompressed offset (kernel device)
            c_off = w.pos
        c_size = len(payload)
        w.write(payload)
        u_off = self._u_end
        self._u_end = (u_off + n + BLOCK - 1) & -BLOCK
        if self._cache is not None:
            self._cache.write_chunk(u_off, raw if raw is not None else payload)
        ref = ChunkDesc(d, self.desc, index, c_off, c_size, u_off, n, is_compressed, file_offset)
        # V1 chunk info (spec §2.3), inline: u_off is 4 KiB aligned by construction,
        # sizes are 1..chunk_size <= 16 MiB; finish() checks the 40-bit offset bound.
        u, c = n - 1, c_size - 1
        self._ci += _V1.pack(
            ((u & 0xF_FFFF) << 44) | u_off | ((u >> 20) << 8),
            ((c & 0xF_FFFF) << 44) | ((c >> 20) << 40) | c_off,
        )
        self._n = index + 1
        self._digests.append(d)
        self._own[d] = ref
        self.stats.chunks_written += 1
        self.stats.compressed_bytes += len(payload)
        return ref

    def _writer(self) -> _HashingWriter:
        if self._w is None:
            os.makedirs(self.blob_dir, exist_ok=True)
            fd, self._tmp_path = tempfile.mkstemp(prefix=".blob-", dir=self.blob_dir)
            # Unbuffered: _HashingWriter hands over ~1 MiB batches itself.
            self._file = os.fdopen(fd, "wb", buffering=0)
            self._w = _HashingWriter(self._file, threaded=self._cpus > 1)
        return self._w

    # ------------------------------------------------------------------ finish
    def finish(self, *, settle: bool = True) -> BlobDesc | None:
        """Append ci, header, digests and TOC; rename the blob to its id.

        Returns the completed :class:`BlobDesc` (also available as ``self.desc``),
        or None if the blob holds no chunk. Calling it twice raises.

        The blob is made durable (fsync) before it is renamed to its id. With
        ``settle=False`` that happens on a thread while the caller goes on (a
        builder writes the bootstrap meanwhile); the caller must then call
        :meth:`settle` before it relies on the file, and :meth:`abort` on failure.
        """
        self._shutdown()
        if self._w is None:
            return None
        if self._file is None or self.desc.blob_id:
            raise InvalidArgument("blob writer already finished")
        w = self._w
        desc = self.desc
        toc: list[bytes] = []
        if self.compressor == Compressor.NONE:
            w.pad_to(BLOCK)  # data section == uncompressed address space
        data_size = w.pos
        # Section 1: chunk data, named by the tar header that follows it.
        hdr = pack_section_header("image.blob", data_size)
        w.write(hdr)
        # TOC digest of image.blob covers data + header; we need a second hash for that.
        toc.append(
            toc_entry(
                "image.blob",
                Compressor.NONE,
                bytes.fromhex(w.hexdigest()),
                0,
                data_size,
                self._u_end,
            )
        )
        if data_size > _MAX_V1_OFFSET:
            raise InvalidArgument(f"blob data of {data_size} bytes: V1 chunk info ends at 1 TiB")
        # Section 2: chunk-info array + its header.
        ci_raw = bytes(self._ci)
        ci_payload, ci_compressed = compress(ci_raw, self.compressor)
        ci_compressor = self.compressor if ci_compressed else Compressor.NONE
        ci_offset = w.pos
        w.write(ci_payload)
        header = BlobCompressionContextHeader(
            features=BLOB_FEATURES_DEFAULT,
            ci_compressor=int(ci_compressor),
            ci_entries=self._n,
            ci_offset=ci_offset,
            ci_compressed_size=len(ci_payload),
            ci_uncompressed_size=len(ci_raw),
        ).pack()
        w.write(header)
        w.write(pack_section_header("blob.meta", len(ci_payload) + BLOB_CCT_HEADER_SIZE))
        toc.append(
            toc_entry(
                "blob.meta",
                ci_compressor,
                hashlib.sha256(ci_raw).digest(),
                ci_offset,
                len(ci_payload),
                len(ci_raw),
            )
        )
        toc.append(
            toc_entry(
                "blob.meta.header",
                Compressor.NONE,
                hashlib.sha256(header).digest(),
                ci_offset + len(ci_payload),
                BLOB_CCT_HEADER_SIZE,
                BLOB_CCT_HEADER_SIZE,
            )
        )
        # Section 3: chunk digests in ci order, never compressed.
        digests = b"".join(self._digests)
        dig_off = w.pos
        w.write(digests)
        w.write(pack_section_header("blob.digest", len(digests)))
        toc.append(
            toc_entry(
                "blob.digest",
                Compressor.NONE,
                hashlib.sha256(digests).digest(),
                dig_off,
                len(digests),
                len(digests),
            )
        )
        # Section 4: the TOC itself.
        toc_bytes = b"".join(toc)
        toc_hdr = pack_section_header("rafs.blob.toc", len(toc_bytes))
        w.write(toc_bytes)
        w.write(toc_hdr)

        w.sync()
        self._file.flush()
        blob_id = w.hexdigest()
        # Same id = same bytes: an existing file is replaced by an identical one.
        self.replaced_existing = os.path.exists(os.path.join(self.blob_dir, blob_id))

        desc.blob_id = blob_id
        desc.chunk_count = self._n
        desc.features = BLOB_FEATURES_DEFAULT
        desc.compressed_size = w.pos
        desc.uncompressed_size = self._u_end
        desc.blob_toc_size = len(toc_bytes) + len(toc_hdr)
        desc.blob_toc_digest = hashlib.sha256(toc_bytes + toc_hdr).digest()
        desc.ci_compressor = ci_compressor
        desc.ci_offset = ci_offset
        desc.ci_compressed_size = len(ci_payload)
        desc.ci_uncompressed_size = len(ci_raw)
        self._settler = threading.Thread(
            target=self._make_durable, args=(blob_id,), name="blob-settle", daemon=True
        )
        self._settler.start()
        if self._cache is not None:
            self._cache.finish(blob_id, self._u_end, ci_raw, header)
        if settle:
            self.settle()
        return desc

    def _make_durable(self, blob_id: str) -> None:
        """fsync, close and rename the finished blob (on the settle thread)."""
        try:
            assert self._file is not None and self._tmp_path is not None
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.chmod(self._tmp_path, 0o644)
            os.replace(self._tmp_path, os.path.join(self.blob_dir, blob_id))
            self._tmp_path = None
        except BaseException as err:  # noqa: BLE001 - raised by settle()
            self._settle_err = err

    def settle(self) -> None:
        """Wait until the finished blob is durable under its id; raise what went wrong."""
        if self._settler is not None:
            self._settler.join()
            self._settler = None
        if self._settle_err is not None:
            err, self._settle_err = self._settle_err, None
            raise OSError(f"blob {self.desc.blob_id or '?'}: {err}") from err

    @property
    def path(self) -> str | None:
        """Path of the finished blob file (None before :meth:`finish` or if empty)."""
        if self.desc.blob_id:
            return os.path.join(self.blob_dir, self.desc.blob_id)
        return None

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def abort(self) -> None:
        """Drop the unfinished blob; safe to call at any time, any number of times.

        After a ``finish(settle=False)`` it waits for the settle thread and removes
        the blob unless a file of that id was there before (same bytes, kept)."""
        self._shutdown()
        if self._settler is not None:
            self._settler.join()
            self._settler = None
            self._settle_err = None
            final = self.path
            if final and not self.replaced_existing and self._tmp_path is None:
                discard_partial(None, final)
        if self._cache is not None:
            self._cache.abort()
        if self._w is not None:
            self._w.close()
        discard_partial(self._file, self._tmp_path)
        self._file = self._tmp_path = None


class _CacheWriter:
    """Writes the blob's cache form next to it, as upstream's ``--blob-cache-dir`` does.

    ``<blob_id>.blob.data`` is the uncompressed address space (every chunk at its
    4 KiB-aligned uncompressed offset): what nydusd's blob cache holds once fully
    fetched, and what the kernel can mount as the blob's EROFS device even when the
    blob itself is compressed. ``<blob_id>.blob.meta`` is the cache form of the
    chunk-info array: the uncompressed array padded to 4 KiB, then the 4096-byte
    header (spec §2.3).
    """

    def __init__(self, cache_dir: str) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        self.dir = cache_dir
        fd, self._tmp = tempfile.mkstemp(prefix=".blob-data-", dir=cache_dir)
        self._f: BinaryIO | None = os.fdopen(fd, "wb", buffering=1 << 20)
        self._pos = 0

    def write_chunk(self, u_off: int, data: Buffer) -> None:
        assert self._f is not None and u_off >= self._pos
        if u_off > self._pos:
            self._f.write(bytes(u_off - self._pos))
        self._f.write(data)
        self._pos = u_off + len(data)

    def finish(self, blob_id: str, size: int, ci_raw: bytes, header: bytes) -> None:
        assert self._f is not None
        self._f.write(bytes(size - self._pos))
        self._f.close()
        self._f = None
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, os.path.join(self.dir, blob_id + ".blob.data"))
        self._tmp = ""
        meta = ci_raw + bytes(_round_up(len(ci_raw), BLOCK) - len(ci_raw)) + header
        fd, tmp = tempfile.mkstemp(prefix=".blob-meta-", dir=self.dir)
        with os.fdopen(fd, "wb") as f:
            f.write(meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(self.dir, blob_id + ".blob.meta"))

    def abort(self) -> None:
        discard_partial(self._f, self._tmp)
        self._f, self._tmp = None, ""


def discard_partial(f: BinaryIO | None, path: str | None) -> None:
    """Close ``f`` and remove the unfinished output file ``path``; either may be None.

    The abort path of every writer that streams into a temp file and renames it at
    the end (blob, blob cache, tarfs copy): idempotent, a missing file is fine.
    """
    if f is not None:
        f.close()
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _copy_ref(ref: ChunkDesc, file_offset: int) -> ChunkDesc:
    return ChunkDesc(
        digest=ref.digest,
        blob=ref.blob,
        ci_index=ref.ci_index,
        compressed_offset=ref.compressed_offset,
        compressed_size=ref.compressed_size,
        uncompressed_offset=ref.uncompressed_offset,
        uncompressed_size=ref.uncompressed_size,
        compressed=ref.compressed,
        file_offset=file_offset,
    )


def _read_full(reader: DataReader, n: int) -> Buffer:
    """Read exactly n bytes unless the reader ends first."""
    first = reader.read(n)
    if len(first) == n or not first:
        return first
    parts = [first]
    got = len(first)
    while got < n:
        more = reader.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
