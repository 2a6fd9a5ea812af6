"""The uncompressed bytes of a layer tar, decoded ahead on a thread, in large blocks.

Theory of operation. A layer arrives plain, gzip (any number of members) or zstd
(any number of frames); the codec is told by the magic bytes. Decoding is the one
cost of a tar.gz build that cannot shrink, so it runs on a thread of its own: the
thread reads 1 MiB of compressed input at a time and inflates it into blocks of up
to 4 MiB (zlib and zstd release the GIL while they work), a few blocks ahead of the
consumer. The consumer (the tar parser and the chunker on the main thread) then
takes headers and file data as slices of those blocks: one Python call per header
or chunk, no per-read buffering layers in between, and file data as zero-copy
memoryviews unless a chunk straddles two blocks.

:class:`LayerStream` is forward-only: ``read``, ``read_view``, ``tell`` and forward
``seek`` are what :mod:`tarfile` needs in random-access mode (``r:``) over it.
Decoder errors raised on the thread (:data:`DECODE_ERRORS`, EOFError for a truncated
stream) are raised again by the consumer's read at
the point where the data stops. Gzip is inflated with ISA-L (python-isal) when it is
installed, else with zlib: same bytes, about half the CPU time. :meth:`close` stops the thread; it is idempotent.
"""

from __future__ import annotations

import gzip
import io
import queue
import threading
import types
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO, Protocol, Self, cast

import zstandard

_inflate_lib: types.ModuleType
try:  # ISA-L's inflate: same interface as zlib's, about twice as fast (and GIL-free)
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    _inflate_lib = zlib

__all__ = ["DECODE_ERRORS", "GZIP_MAGIC", "INFLATE", "ZSTD_MAGIC", "LayerStream", "compression_of"]

#: Which library inflates gzip layers ("isal_zlib" or "zlib").
INFLATE = _inflate_lib.__name__.rsplit(".", 1)[-1]
#: What the decoders raise for malformed input (besides EOFError for a truncated one).
DECODE_ERRORS: tuple[type[BaseException], ...] = tuple(
    {zlib.error, gzip.BadGzipFile, zstandard.ZstdError, cast(Any, _inflate_lib).error}
)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# 1 MiB of compressed input per read; at most 4 MiB of output per block, 4 blocks
# ahead: decoding overlaps the consumer's work, memory stays under ~20 MiB.
_IN = 1 << 20
_OUT = 4 << 20
_AHEAD = 4
_END = object()


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


def compression_of(head: bytes) -> str | None:
    """``"gzip"``, ``"zstd"`` or None (plain tar) from a stream's first 4 bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


def _inputs(head: bytes, f: BinaryIO) -> Iterator[bytes]:
    if head:
        yield head
    while data := f.read(_IN):
        yield data


def _gzip_blocks(inputs: Iterator[bytes]) -> Iterator[bytes]:
    """Inflate concatenated gzip members; zero padding after a member is allowed, as in
    :mod:`gzip`. The gzip trailer (CRC32, size) is checked by zlib itself."""
    d: Any = _inflate_lib.decompressobj(31)
    for data in inputs:
        while data:
            if d is None:  # between members
                data = data.lstrip(b"\0")
                if not data:
                    break
                if not GZIP_MAGIC.startswith(data[:2]):
                    raise gzip.BadGzipFile(f"Not a gzipped file ({data[:2]!r})")
                d = _inflate_lib.decompressobj(31)
            out = d.decompress(data, _OUT)
            if out:
                yield out
            while d.unconsumed_tail and not d.eof:
                out = d.decompress(d.unconsumed_tail, _OUT)
                if out:
                    yield out
            if d.eof:
                data, d = d.unused_data, None
            else:
                data = b""
    if d is not None:
        # flush() returns what an input ending mid-member still produces
        tail = d.flush()
        if tail:
            yield tail
        if not d.eof:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")


class _Chain(io.RawIOBase):
    """A raw stream over an iterator of byte strings (zstd's reader wants ``read``)."""

    def __init__(self, parts: Iterator[bytes]) -> None:
        self._parts = parts
        self._cur = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._cur:
            nxt = next(self._parts, None)
            if nxt is None:
                return 0
            self._cur = nxt
        n = min(len(b), len(self._cur))
        b[:n] = self._cur[:n]
        self._cur = self._cur[n:]
        return n


def _zstd_blocks(inputs: Iterator[bytes]) -> Iterator[bytes]:
    raw = cast(BinaryIO, _Chain(inputs))
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    while data := reader.read(_OUT):
        yield data


def _plain_blocks(inputs: Iterator[bytes]) -> Iterator[bytes]:
    yield from inputs


class LayerStream:
    """Forward-only reader of the uncompressed tar in ``f`` (plain, gzip or zstd).

    ``head`` is what the caller already read from ``f`` (the magic). With ``tee``
    every uncompressed byte is also written there, block by block, in order;
    :meth:`drain` reads to the very end (a tarfs blob wants the whole tar).
    Owns a decoding thread until :meth:`close` (also on garbage collection of the
    consumer's ``with`` block); reads after ``close`` return nothing.
    """

    def __init__(self, f: BinaryIO, head: bytes = b"", *, tee: _Sink | None = None) -> None:
        self.compression = compression_of(head)
        make = {"gzip": _gzip_blocks, "zstd": _zstd_blocks, None: _plain_blocks}
        self._blocks = make[self.compression](_inputs(head, f))
        self._tee = tee
        self._q: queue.Queue[object] = queue.Queue(maxsize=_AHEAD)
        self._stop = threading.Event()
        self._buf = b""
        self._mv = memoryview(self._buf)
        self._i = 0  # read position inside _buf
        self._base = 0  # stream offset of _buf[0]
        self._eof = False
        self._thread = threading.Thread(target=self._produce, name="layer-decode", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- producer
    def _produce(self) -> None:
        try:
            for block in self._blocks:
                if not self._put(block):
                    return
            self._put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(err)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # ---------------------------------------------------------------- consumer
    def _next_block(self) -> bool:
        """Make the next block current; False at the end of the stream."""
        if self._eof:
            return False
        item = self._q.get()
        if item is _END:
            self._eof = True
            return False
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        assert isinstance(item, bytes)
        if self._tee is not None:
            self._tee.write(item)
        self._base += len(self._buf)
        self._buf, self._mv, self._i = item, memoryview(item), 0
        return True

    def tell(self) -> int:
        return self._base + self._i

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes (all that is left for ``n < 0``); short only at the end."""
        if 0 <= n <= len(self._buf) - self._i:
            out = self._buf[self._i : self._i + n]
            self._i += n
            return out
        return bytes(self._gather(n))

    def read_view(self, n: int) -> memoryview | bytes:
        """Like :meth:`read`, but a zero-copy view when the bytes lie in one block."""
        if n <= len(self._buf) - self._i:
            out = self._mv[self._i : self._i + n]
            self._i += n
            return out
        return self._gather(n)

    def _gather(self, n: int) -> bytes:
        parts: list[memoryview] = []
        want = n if n >= 0 else -1
        while want != 0:
            avail = len(self._buf) - self._i
            if avail == 0:
                if not self._next_block():
                    break
                continue
            take = avail if want < 0 else min(avail, want)
            parts.append(self._mv[self._i : self._i + take])
            self._i += take
            if want > 0:
                want -= take
        return b"".join(parts)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        """Skip forward to absolute ``pos`` (tarfile seeks over data it is not given)."""
        if whence == io.SEEK_CUR:
            pos += self.tell()
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("layer stream: seek from the end")
        skip = pos - self.tell()
        if skip < 0:
            raise io.UnsupportedOperation(f"layer stream: cannot seek back {-skip} bytes")
        while skip:
            avail = len(self._buf) - self._i
            if avail == 0:
                if not self._next_block():
                    break
                continue
            take = min(avail, skip)
            self._i += take
            skip -= take
        return self.tell()

    def drain(self) -> None:
        """Read (and tee) everything that is left."""
        self._i = len(self._buf)
        while self._next_block():
            self._i = len(self._buf)

    def close(self) -> None:
        """Stop the decoding thread and drop buffered blocks; idempotent."""
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
        self._eof = True
        self._buf, self._mv, self._i = b"", memoryview(b""), 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
