"""The tarfs "blob": the layer's uncompressed tar itself, addressed in 512-byte records.

In tarfs mode (``nydus-image create -t tar-tarfs``, spec §1.15) nothing is
re-encoded. The blob is the raw tar, every regular file's chunks point at its
data inside the tar (tar data starts on a 512-byte record, so with a 512-byte
EROFS block size a chunk address is simply ``offset / 512``), and the kernel can
mount the bootstrap with the tar file as its device. There is no chunk-info array,
no TOC and no dedup (two equal chunks are two places in the tar).

:class:`TarfsBlob` receives the uncompressed tar bytes as they stream past (it is
the ``tee`` of :class:`~pynydus.rafs.source.tarsource.TarSource`), writes them to a temp
file in ``blob_dir`` with a running sha256 and renames the file to that digest — the
layer's diff id — at the end (or to the name the caller gives, once the digest is the
diff id it expects). Chunk digests are sha256 of the chunk bytes (upstream
leaves them zero; real digests cost little and keep the chunk table meaningful).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import BinaryIO

from pynydus.errors import FormatError, InvalidArgument, NotImplementedFeature
from pynydus.host.writeback import start_writeback
from pynydus.rafs.builder.blobwriter import (
    BlobDesc,
    BlobStats,
    ChunkDesc,
    _read_full,
    discard_partial,
)
from pynydus.rafs.format import BlobFeatures, Compressor, Digester
from pynydus.rafs.source import DataReader, Entry

__all__ = ["TARFS_BLOCK_SIZE", "TARFS_FEATURES", "TarfsBlob"]

TARFS_BLOCK_SIZE = 512
TARFS_FEATURES = int(BlobFeatures.TARFS | BlobFeatures.CAP_TAR_TOC)
_WRITEBACK_STEP = 16 << 20  # as the blob writer's (pynydus.host.writeback)


class _Prepended:
    """``reader`` with ``head`` read back first."""

    def __init__(self, head: bytes | memoryview, reader: DataReader) -> None:
        self._head: bytes | memoryview | None = head
        self._reader = reader

    def read(self, n: int = -1, /) -> bytes | memoryview:
        head = self._head
        if head is None:
            return self._reader.read(n)
        self._head = None
        if not head:
            return self._reader.read(n)
        if 0 <= n < len(head):
            self._head = head[n:]
            return head[:n]
        return head


class TarfsBlob:
    """Copy of the uncompressed tar in ``blob_dir``, named by its sha256 at :meth:`finish`.

    Use :meth:`write` as the tar source's tee, :meth:`add_entry` for each regular
    file as the builder meets it, then :meth:`finish` (or :meth:`abort`, idempotent).
    """

    def __init__(self, blob_dir: str | os.PathLike[str], chunk_size: int, *,
                 blob_id: str | None = None, expect_sha256: str | None = None) -> None:
        self.blob_dir = os.fspath(blob_dir)
        self.chunk_size = chunk_size
        # ``blob_id`` names the blob instead of its sha256 (upstream's ``--blob-id``: the
        # snapshotter names a layer's tar by its registry digest); ``expect_sha256`` is
        # the tar's digest (the layer's diff id), checked before the blob takes its name.
        self._name = blob_id
        self._expect = expect_sha256
        os.makedirs(self.blob_dir, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=".tarfs-", dir=self.blob_dir)
        self._f: BinaryIO | None = os.fdopen(fd, "wb", buffering=1 << 20)
        self._h = hashlib.sha256()
        self.pos = 0
        self._flushed = 0  # bytes whose writeback was started
        self.stats = BlobStats()  # every chunk is new and stored raw
        self.replaced_existing = False
        self.desc = BlobDesc(
            blob_id="",
            chunk_size=chunk_size,
            compressor=Compressor.NONE,
            digester=Digester.SHA256,
            features=TARFS_FEATURES,
        )

    def write(self, data: bytes) -> None:
        """Append uncompressed tar bytes (called by the tar source as it reads)."""
        assert self._f is not None
        self._f.write(data)
        self._h.update(data)
        self.pos += len(data)
        if self.pos - self._flushed >= _WRITEBACK_STEP:
            # Disk writes overlap with the build instead of all waiting for the fsync
            # (what is still in our buffer goes with the next range or the fsync).
            start_writeback(self._f.fileno(), self._flushed, self.pos - self._flushed)
            self._flushed = self.pos

    def add_entry(self, entry: Entry, reader: DataReader) -> tuple[list[ChunkDesc], int]:
        """The chunks of a regular file's data as it lies in the tar, and its size.

        Reading the data (to digest it) is also what moves it through the tee.
        """
        if entry.size and entry.data_offset is None:
            raise NotImplementedFeature(
                f"tarfs: {entry.path!r} is a sparse tar member; its data is not contiguous"
            )
        size = entry.size
        stats = self.stats
        if 0 < size <= self.chunk_size:
            # One chunk (most files): one read, nothing to loop over.
            piece = reader.read(size)
            if len(piece) == size:
                off = entry.data_offset or 0
                ci = stats.chunks_written
                stats.chunks_in += 1
                stats.chunks_written = ci + 1
                stats.bytes_in += size
                stats.compressed_bytes += size
                return [ChunkDesc(hashlib.sha256(piece).digest(), self.desc, ci, off, size, off,
                                  size, False, 0)], size
            reader = _Prepended(piece, reader)  # a short read: the general path goes on
        refs: list[ChunkDesc] = []
        done = 0
        while done < entry.size:
            piece = _read_full(reader, min(self.chunk_size, entry.size - done))
            if not piece:
                raise InvalidArgument(f"tarfs: {entry.path!r}: tar data ends early")
            off = (entry.data_offset or 0) + done
            refs.append(
                ChunkDesc(
                    digest=hashlib.sha256(piece).digest(),
                    blob=self.desc,
                    ci_index=self.stats.chunks_written,
                    compressed_offset=off,
                    compressed_size=len(piece),
                    uncompressed_offset=off,
                    uncompressed_size=len(piece),
                    compressed=False,
                    file_offset=done,
                )
            )
            self.stats.chunks_in += 1
            self.stats.chunks_written += 1
            done += len(piece)
        self.stats.bytes_in += done
        self.stats.compressed_bytes += done
        return refs, done

    def finish(self) -> BlobDesc:
        """Close and rename the copy to its sha256; fill in and return the descriptor."""
        if self._f is None:
            raise InvalidArgument("tarfs blob already finished")
        if self.pos % TARFS_BLOCK_SIZE:
            raise InvalidArgument(f"tarfs: tar size {self.pos} is not a multiple of 512")
        digest = self._h.hexdigest()
        if self._expect is not None and digest != self._expect:
            raise FormatError(f"tarfs: the uncompressed layer hashes to sha256:{digest}, "
                              f"its diff id is sha256:{self._expect}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        blob_id = self._name or digest
        os.chmod(self._tmp, 0o644)
        final = os.path.join(self.blob_dir, blob_id)
        self.replaced_existing = os.path.exists(final)  # same id = same bytes
        os.replace(self._tmp, final)
        self._tmp = ""
        d = self.desc
        d.blob_id = blob_id
        d.chunk_count = self.stats.chunks_written
        d.compressed_size = d.uncompressed_size = self.pos
        return d

    @property
    def path(self) -> str | None:
        """Path of the finished blob (None before :meth:`finish`)."""
        return os.path.join(self.blob_dir, self.desc.blob_id) if self.desc.blob_id else None

    def abort(self) -> None:
        """Remove the unfinished copy; safe to call any number of times."""
        discard_partial(self._f, self._tmp)
        self._f, self._tmp = None, ""
