"""The few zlib calls Python's :mod:`zlib` does not expose, through ctypes.

Random access into a gzip layer (ZRAN, spec §2.5) needs two things the standard
module lacks:

* resuming inflate at a point that is not on a byte boundary: ``inflatePrime`` feeds
  the bits of the byte before the resume point. Shifting the input by those bits
  instead is *not* equivalent: a stored block realigns to a byte boundary of the
  original stream, which the shifted stream no longer has;
* finding the points where inflate may resume: ``inflate(Z_BLOCK)`` stops at the end
  of every deflate block and ``data_type`` then says how many bits of the last byte
  are still unused.

:class:`Inflater` is one ``z_stream`` (raw deflate or gzip): bytes in, bytes out, with
the stream's counters and ``data_type`` after each call. ctypes calls release the
GIL, like :mod:`zlib`'s. The library is the system's libz (``zlib1g``), which is
also what Python's zlib is linked against.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

from pynydus.errors import FormatError

Z_OK, Z_STREAM_END, Z_NEED_DICT, Z_BUF_ERROR = 0, 1, 2, -5
Z_NO_FLUSH, Z_BLOCK = 0, 5
#: ``data_type`` bit set when inflate stopped right after an end-of-block code (or a
#: gzip header): a point where inflating may resume.
DT_BLOCK_END = 0x80
#: ``data_type`` bit set while inflating the last block of a deflate stream.
DT_LAST_BLOCK = 0x40
WINDOW = 1 << 15


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


_lib: Any = None
_lib_lock = threading.Lock()


def _libz() -> Any:
    global _lib
    with _lib_lock:
        if _lib is None:
            name = ctypes.util.find_library("z") or "libz.so.1"
            lib = ctypes.CDLL(name)
            p = ctypes.POINTER(_ZStream)
            lib.zlibVersion.restype = ctypes.c_char_p
            lib.inflateInit2_.argtypes = [p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.inflate.argtypes = [p, ctypes.c_int]
            lib.inflateEnd.argtypes = [p]
            lib.inflateReset2.argtypes = [p, ctypes.c_int]
            lib.inflatePrime.argtypes = [p, ctypes.c_int, ctypes.c_int]
            lib.inflateSetDictionary.argtypes = [p, ctypes.c_char_p, ctypes.c_uint]
            lib.inflateGetDictionary.argtypes = [p, ctypes.c_char_p,
                                                 ctypes.POINTER(ctypes.c_uint)]
            _lib = lib
        return _lib


class Inflater:
    """One inflate stream: ``wbits`` -15 for raw deflate, 31 for gzip.

    Not thread-safe; :meth:`close` (or garbage collection) frees it. Errors are
    FormatError naming what zlib said.
    """

    def __init__(self, wbits: int = -15) -> None:
        self._z = _libz()
        self._s = _ZStream()
        self._out = ctypes.create_string_buffer(1)
        self._in: bytes = b""
        rc = self._z.inflateInit2_(ctypes.byref(self._s), wbits, self._z.zlibVersion(),
                                   ctypes.sizeof(_ZStream))
        if rc != Z_OK:
            raise MemoryError(f"inflateInit2: {rc}")
        self._open = True

    # ------------------------------------------------------------------ state
    @property
    def total_in(self) -> int:
        return int(self._s.total_in)

    @property
    def total_out(self) -> int:
        return int(self._s.total_out)

    @property
    def data_type(self) -> int:
        return int(self._s.data_type)

    @property
    def avail_in(self) -> int:
        return int(self._s.avail_in)

    def _check(self, rc: int, what: str) -> int:
        if rc in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            return rc
        msg = self._s.msg.decode(errors="replace") if self._s.msg else f"error {rc}"
        raise FormatError(f"inflate: {what}: {msg}")

    def reset(self, wbits: int) -> None:
        """Start a new stream (``wbits`` as in the constructor); counters keep counting
        only if the caller adds them up: zlib zeroes ``total_in``/``total_out``."""
        self._check(self._z.inflateReset2(ctypes.byref(self._s), wbits), "reset")

    def prime(self, bits: int, value: int) -> None:
        """Feed the low ``bits`` bits of ``value`` before the next input byte."""
        self._check(self._z.inflatePrime(ctypes.byref(self._s), bits, value), "prime")

    def set_dictionary(self, window: bytes) -> None:
        """The 32 KiB (or less) of output before the resume point (raw streams only)."""
        if window:
            self._check(self._z.inflateSetDictionary(ctypes.byref(self._s), window,
                                                     len(window)), "set dictionary")

    # ------------------------------------------------------------------ data
    def feed(self, data: bytes) -> None:
        """Make ``data`` the input (what was left of the previous input is dropped)."""
        self._in = bytes(data)
        self._s.next_in = ctypes.cast(ctypes.c_char_p(self._in), ctypes.c_void_p)
        self._s.avail_in = len(self._in)

    def unused_input(self) -> bytes:
        """The part of the last :meth:`feed` inflate has not consumed."""
        n = self.avail_in
        return self._in[len(self._in) - n:] if n else b""

    def inflate(self, max_out: int, flush: int = Z_NO_FLUSH) -> tuple[bytes, int]:
        """Inflate from the current input into at most ``max_out`` bytes: (output, rc),
        rc being Z_OK, Z_STREAM_END or Z_BUF_ERROR (no progress possible)."""
        if len(self._out) < max_out:
            self._out = ctypes.create_string_buffer(max_out)
        self._s.next_out = ctypes.cast(self._out, ctypes.c_void_p)
        self._s.avail_out = max_out
        rc = self._check(self._z.inflate(ctypes.byref(self._s), flush), "data")
        n = max_out - self._s.avail_out
        return ctypes.string_at(self._out, n) if n else b"", rc

    def close(self) -> None:
        if self._open:
            self._open = False
            self._z.inflateEnd(ctypes.byref(self._s))

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass
