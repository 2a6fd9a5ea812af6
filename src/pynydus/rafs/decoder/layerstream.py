"""The uncompressed bytes of a layer tar, decoded ahead on a thread, in large blocks.

Theory of operation. A layer arrives plain, gzip (any number of members) or zstd
(any number of frames); the codec is told by the magic bytes. Decoding is the one
cost of a tar.gz build that cannot shrink, so it runs on a thread of its own: the
thread reads 1 MiB of compressed input at a time and inflates it into blocks of up
to 4 MiB (zlib and zstd release the GIL while they work), a few blocks ahead of the
consumer. The consumer (the tar parser and the blob writer on the main thread) then
takes headers and file data as slices of those blocks: one Python call per header
or chunk, no per-read buffering layers in between, and file data as zero-copy
memoryviews unless a chunk straddles two blocks.

A big compressed layer in a regular file is decoded by a child process instead
(:mod:`pynydus.rafs.decoder.decodeproc`) when a second CPU is usable, and the thread only
receives the child's output from a socket, a block per call. In-process, the
decoder and the tar parser take turns at the GIL (every decoder call gives it up
and must win it back from a parser running Python); a process of its own decodes
at full speed while the parser works. A child that cannot start, or dies before
its first byte, is replaced by in-process decoding.

:class:`LayerStream` is forward-only: ``read``, ``read_view``, ``tell`` and forward
``seek`` are what the tar reader needs. Decoder errors (:data:`DECODE_ERRORS`,
EOFError for a truncated stream), raised on the thread or reported by the child
as the same exception types, are raised again by the consumer's read at the point
where the data stops. Gzip is inflated with ISA-L (python-isal) when it is
installed, else with zlib: same bytes, about half the CPU time. :meth:`close`
stops the thread (and the child); it is idempotent.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
import types
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Protocol, Self, cast

import zstandard

import pynydus
from pynydus.errors import InvalidArgument
from pynydus.host.cpus import usable_cpus

_inflate_lib: types.ModuleType
try:  # ISA-L's inflate: same interface as zlib's, about twice as fast (and GIL-free)
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    _inflate_lib = zlib

__all__ = [
    "DECODERS",
    "DECODE_ERRORS",
    "GZIP_MAGIC",
    "INFLATE",
    "ZSTD_MAGIC",
    "LayerStream",
    "absolute_seek",
    "compression_of",
    "usable_cpus",
]

#: Which library inflates gzip layers ("isal_zlib" or "zlib").
INFLATE = _inflate_lib.__name__.rsplit(".", 1)[-1]
#: What the decoders raise for malformed input (besides EOFError for a truncated one).
DECODE_ERRORS: tuple[type[BaseException], ...] = tuple(
    {zlib.error, gzip.BadGzipFile, zstandard.ZstdError, cast(Any, _inflate_lib).error}
)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

log = logging.getLogger(__name__)

# The directory that holds the pynydus package (handed to the decoder process).
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pynydus.__file__)))

# 1 MiB of compressed input per read; at most 4 MiB of output per block, 4 blocks
# ahead: decoding overlaps the consumer's work, memory stays under ~20 MiB.
_IN = 1 << 20
_OUT = 4 << 20
_AHEAD = 4
_END = object()
# Compressed layers at least this big (in a regular file) are decoded by a child
# process when a second CPU is usable; below it the process start (~40 ms) is not
# worth it. PYNYDUS_LAYER_DECODER=thread turns the child off, =process forces it
# (for any size and CPU count), =auto (or unset) is the rule above.
_PROCESS_MIN = 8 << 20


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


def compression_of(head: bytes) -> str | None:
    """``"gzip"``, ``"zstd"`` or None (plain tar) from a stream's first 4 bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


def _pread_inputs(fd: int, offset: int) -> Iterator[bytes]:
    """The file's bytes from ``offset`` on, read with pread (its file offset is left alone)."""
    while data := os.pread(fd, _IN, offset):
        offset += len(data)
        yield data


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
        self._cur = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._cur:
            nxt = next(self._parts, None)
            if nxt is None:
                return 0
            self._cur = memoryview(nxt)
        n = min(len(b), len(self._cur))
        b[:n] = self._cur[:n]
        self._cur = self._cur[n:]
        return n


_ZSTD_FRAME = int.from_bytes(ZSTD_MAGIC, "little")


class _ZstdFrames:
    """Walks zstd frame and block headers over the compressed bytes as they pass.

    The decoder (zstandard's stream reader) returns end-of-data when its input
    ends inside a frame, so a truncated layer would decode "successfully" to a
    shorter tar. This walker knows where every frame ends: :meth:`end` raises
    EOFError unless the input stopped at a frame boundary. Bytes that are neither
    a zstd frame nor a skippable frame raise ZstdError, as trailing garbage does
    for the zstd tool.
    """

    def __init__(self) -> None:
        self._pending = b""  # header bytes split across inputs
        self._skip = 0  # bytes of block content / skippable payload still to pass
        self._state = "frame"  # "frame": a magic is next; "block": a block header is next
        self._checksum = False
        self._offset = 0  # input offset of _pending[0]

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                take = min(self._skip, len(view))
                self._skip -= take
                self._offset += take
                view = view[take:]
                continue
            need = self._need()
            have = len(self._pending)
            if have + len(view) < need:
                self._pending += bytes(view)
                return
            head = self._pending + bytes(view[: need - have])
            view = view[need - have :]
            self._pending = b""
            more = self._header(head)
            if more:  # a frame header's size depends on its first byte: read on
                self._pending = head
                continue
            self._offset += len(head)

    def _need(self) -> int:
        if self._state == "block":
            return 3
        if self._state == "checksum":
            return 4
        head = self._pending
        if len(head) < 5:
            return 5  # magic + a first byte: enough to know the header's size
        if int.from_bytes(head[:4], "little") & 0xFFFFFFF0 == 0x184D2A50:
            return 8  # skippable frame: magic + payload size
        return max(5, self._frame_header_size(head))

    @staticmethod
    def _frame_header_size(head: bytes) -> int:
        fhd = head[4]
        single = fhd & 0x20
        fcs = (0, 2, 4, 8)[fhd >> 6] if fhd >> 6 else (1 if single else 0)
        return 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs

    def _header(self, head: bytes) -> bool:
        """Consume one header; True when more header bytes are needed first."""
        if self._state == "block":
            h = int.from_bytes(head, "little")
            kind, size = (h >> 1) & 3, h >> 3
            if kind == 3:
                raise zstandard.ZstdError(f"zstd: reserved block type at offset {self._offset}")
            self._skip = 1 if kind == 1 else size
            if h & 1:  # last block of the frame
                self._state = "checksum" if self._checksum else "frame"
            return False
        if self._state == "checksum":
            self._state = "frame"
            return False
        magic = int.from_bytes(head[:4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame: 4-byte size, payload
            if len(head) < 8:
                return True
            self._skip = int.from_bytes(head[4:8], "little")
            return False
        if magic != _ZSTD_FRAME:
            raise zstandard.ZstdError(f"zstd: no frame magic at offset {self._offset}")
        if len(head) < self._frame_header_size(head):
            return True
        self._checksum = bool(head[4] & 4)
        self._state = "block"
        return False

    def end(self) -> None:
        if self._skip or self._pending or self._state != "frame":
            raise EOFError(f"zstd stream ended inside a frame (offset {self._offset})")


def _zstd_blocks(inputs: Iterator[bytes]) -> Iterator[bytes]:
    frames = _ZstdFrames()

    def walked() -> Iterator[bytes]:
        for data in inputs:
            frames.feed(data)
            yield data

    raw = cast(BinaryIO, _Chain(walked()))
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    while data := reader.read(_OUT):
        yield data
    for _ in walked():  # what the reader left unread (none in practice) is walked too
        pass
    frames.end()


def _plain_blocks(inputs: Iterator[bytes]) -> Iterator[bytes]:
    yield from inputs


#: Blocks of uncompressed tar from compressed inputs, by codec (None: a plain tar).
DECODERS: dict[str | None, Callable[[Iterator[bytes]], Iterator[bytes]]] = {
    "gzip": _gzip_blocks,
    "zstd": _zstd_blocks,
    None: _plain_blocks,
}


def absolute_seek(pos: int, whence: int, here: int) -> int:
    """The absolute target of ``seek(pos, whence)`` at ``here``; forward-only streams
    have no end to seek from."""
    if whence == io.SEEK_CUR:
        return pos + here
    if whence != io.SEEK_SET:
        raise io.UnsupportedOperation("layer stream: seek from the end")
    return pos


def _decoder_error(codec: str, kind: str, message: str) -> BaseException:
    """The exception a decoder process reported, as the in-process decoder raises it."""
    if kind == "EOFError":
        return EOFError(message)
    if kind == "BadGzipFile":
        return gzip.BadGzipFile(message)
    if codec == "zstd":
        return zstandard.ZstdError(message)
    return cast(type[BaseException], _inflate_lib.error)(message)


def _process_input(f: BinaryIO, head: bytes, codec: str | None) -> tuple[int, int] | None:
    """(fd, offset) of the compressed stream for a decoder process, or None to decode here.

    Only a regular file can be handed over (the child reads it with pread at the
    offset where ``head`` started), only when it is big enough, and only when a
    second CPU can run the child.
    """
    mode = os.environ.get("PYNYDUS_LAYER_DECODER", "auto") or "auto"
    if mode not in ("auto", "thread", "process"):
        raise InvalidArgument(
            f"PYNYDUS_LAYER_DECODER={mode!r}: expected auto, thread or process"
        )
    if codec is None or mode == "thread":
        return None
    try:
        fd = f.fileno()
        st = os.fstat(fd)
        start = f.tell() - len(head)
    except (AttributeError, OSError, ValueError):
        return None  # not a file with a descriptor (BytesIO, a socket wrapper, ...)
    if not stat.S_ISREG(st.st_mode) or start < 0:
        return None
    big = st.st_size - start >= _PROCESS_MIN
    if mode != "process" and (not big or usable_cpus() < 2):
        return None
    return fd, start


class _DecoderProcess:
    """A child process that decodes ``codec`` from ``fd`` at ``offset`` into a socket.

    A socket, not a pipe: ``recv(n, MSG_WAITALL)`` waits in the kernel until a whole
    block has arrived, so the reading thread wins the GIL back once per block. A
    pipe holds at most 1 MiB, and reading a 4 MiB block from it took four reads,
    each waiting for the GIL while the child, its pipe full, waited for the reader.
    """

    def __init__(self, codec: str, fd: int, offset: int) -> None:
        self.codec = codec
        self._fd, self._offset = fd, offset
        # The child imports this package from where the parent has it, whatever the
        # parent's sys.path was made of (PYTHONPATH, a source checkout, a venv).
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")])
        )
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pynydus.rafs.decoder.decodeproc", codec, str(offset)],
                stdin=fd,
                stdout=theirs.fileno(),
                stderr=subprocess.PIPE,
                env=env,
            )
        except BaseException:
            self._sock.close()
            raise
        finally:
            theirs.close()

    def blocks(self) -> Iterator[bytes]:
        sent = False
        while data := self._sock.recv(_OUT, socket.MSG_WAITALL):
            sent = True
            yield data
        rc = self.proc.wait()
        if rc == 0:
            return
        assert self.proc.stderr is not None
        report = self.proc.stderr.read().decode(errors="replace")
        kind, sep, message = report.partition("\0")
        if rc > 0 and sep:
            raise _decoder_error(self.codec, kind, message)
        if not sent and rc > 0:
            # The child failed before decoding anything (it could not start Python or
            # import us): the file is still all there, so decode it here instead.
            log.warning("layer decoder process failed (status %d: %s); decoding in-process",
                        rc, report.strip()[-500:])
            yield from DECODERS[self.codec](_pread_inputs(self._fd, self._offset))
            return
        raise OSError(f"layer decoder process exited with status {rc}: {report.strip()}")

    def stop(self) -> None:
        """Kill the child if it still runs (a consumer stopped early): its output ends."""
        if self.proc.poll() is None:
            self.proc.kill()

    def reap(self) -> None:
        """Wait for the child and close its socket and pipe (after the reader is gone)."""
        self.proc.wait()
        self._sock.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


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
        self._decoder: _DecoderProcess | None = None
        where = _process_input(f, head, self.compression)
        if where is not None:
            assert self.compression is not None
            try:
                self._decoder = _DecoderProcess(self.compression, *where)
            except OSError as err:  # no process to be had (limits, memory): decode here
                log.warning("layer decoder process did not start (%s); decoding in-process", err)
        if self._decoder is not None:
            self._blocks = self._decoder.blocks()
        else:
            self._blocks = DECODERS[self.compression](_inputs(head, f))
        self._tee = tee
        self._q: queue.Queue[object] = queue.Queue(maxsize=_AHEAD)
        self._stop = threading.Event()
        self._buf = b""
        self._mv = memoryview(self._buf)
        self._i = 0  # read position inside _buf
        self._base = 0  # stream offset of _buf[0]
        self._eof = False
        # With a decoder process the thread only receives its output, blocks ahead.
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

    def skip(self, n: int) -> int:
        """Move ``n`` bytes forward (tee'd, not returned); fewer only at the end of the
        stream. Returns how many were skipped."""
        if 0 <= n <= len(self._buf) - self._i:
            self._i += n  # the common case, block padding: no view, no copy
            return n
        start = self.tell()
        return self.seek(start + n) - start

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        """Skip forward to absolute ``pos`` (tarfile seeks over data it is not given)."""
        pos = absolute_seek(pos, whence, self.tell())
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
        """Stop the decoding thread (and process) and drop buffered blocks; idempotent."""
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        if self._decoder is not None:
            self._decoder.stop()  # a producer blocked receiving sees the end
        self._thread.join()
        if self._decoder is not None:
            self._decoder.reap()
        self._eof = True
        self._buf, self._mv, self._i = b"", memoryview(b""), 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
