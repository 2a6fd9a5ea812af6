"""Chunk codecs and chunk digests for RAFS data blobs.

Every chunk of a Nydus blob is compressed on its own (no shared dictionary, no
stream state), so a reader can decode any chunk from its compressed bytes and its
uncompressed size alone. The numeric values of :class:`Compressor` and
:class:`Digester` are the on-disk values of the blob table (``compression_algo``,
``digest_algo``); the flag helpers give the bootstrap superblock bits and the blob
TOC entry bits for the same algorithm.

``lz4_block`` is a raw LZ4 block without frame or size prefix: decoding needs the
uncompressed size, which the chunk info always carries. ``zstd`` is one frame at
level 3. A chunk whose compressed form is not smaller than its input is stored raw
and flagged uncompressed, exactly as upstream does, so even a zstd blob contains
raw chunks.
"""

from __future__ import annotations

import functools
import threading
import types
import zlib
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pynydus.errors import FormatError, InvalidArgument
from pynydus.rafs.format import layout as _layout

if TYPE_CHECKING:
    import zstandard

__all__ = [
    "Compressor",
    "Digester",
    "compress",
    "decode_chunk",
    "decompress",
    "decompress_frames",
    "digest",
    "new_hasher",
    "parse_compressor",
    "parse_digester",
    "super_flag_for_compressor",
    "super_flag_for_digester",
    "toc_flag_for_compressor",
]


# One definition of the on-disk enums, shared with the layout module.
Compressor = _layout.Compressor
Digester = _layout.Digester

_COMPRESSOR_NAMES = {
    "none": Compressor.NONE,
    "lz4_block": Compressor.LZ4_BLOCK,
    "lz4": Compressor.LZ4_BLOCK,
    "gzip": Compressor.GZIP,
    "zstd": Compressor.ZSTD,
}
_DIGESTER_NAMES = {"blake3": Digester.BLAKE3, "sha256": Digester.SHA256}

# zstd level 3 is upstream's default (zstd::bulk::compress with level 0 -> 3).
_ZSTD_LEVEL = 3


class _Libraries:
    """The codec and digest libraries, each imported when first used: the snapshotter
    imports this package for the bootstrap magics and never compresses or hashes a chunk
    (blake3, lz4 and zstandard are ~3 MB of its resident memory), and a daemon needs only
    its images' codec (hashlib loads libcrypto: 3.7 MB of a localfs daemon's)."""

    @functools.cached_property
    def hashlib(self) -> types.ModuleType:
        import hashlib

        return hashlib

    @functools.cached_property
    def gzip(self) -> types.ModuleType:
        import gzip

        return gzip

    @functools.cached_property
    def blake3(self) -> types.ModuleType:
        import blake3

        return blake3

    @functools.cached_property
    def lz4(self) -> types.ModuleType:
        import lz4.block  # type: ignore[import-untyped]

        return lz4.block

    @functools.cached_property
    def lz4_decompress_safe(self) -> Any:
        """(new bytes object of a size, liblz4's ``LZ4_decompress_safe``) through ctypes,
        which lets go of the GIL while the block decodes (python-lz4's decoder holds it:
        a daemon's readers then queue for the GIL behind every chunk decoded); None
        without the library (python-lz4 then)."""
        import ctypes

        try:  # the soname first: find_library runs ldconfig (tens of ms at the first miss)
            lib = ctypes.CDLL("liblz4.so.1")  # and imports shutil, subprocess, tempfile
        except OSError:
            import ctypes.util

            try:
                lib = ctypes.CDLL(ctypes.util.find_library("lz4") or "liblz4.so")
            except OSError:
                return None
        decode = getattr(lib, "LZ4_decompress_safe", None)
        if decode is None:
            return None
        decode.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        decode.restype = ctypes.c_int
        new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
        new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
        new_bytes.restype = ctypes.py_object
        return new_bytes, decode

    @functools.cached_property
    def zstd(self) -> types.ModuleType:
        import zstandard

        return zstandard


_lib = _Libraries()


def parse_compressor(name: str | Compressor) -> Compressor:
    """Map a CLI/config name (``none``, ``lz4_block``, ``zstd``, ``gzip``) to :class:`Compressor`."""
    if isinstance(name, Compressor):
        return name
    try:
        return _COMPRESSOR_NAMES[name.lower()]
    except KeyError:
        raise InvalidArgument(
            f"unknown compressor {name!r}: expected one of none, lz4_block, zstd, gzip"
        ) from None


def parse_digester(name: str | Digester) -> Digester:
    """Map ``blake3`` / ``sha256`` to :class:`Digester`."""
    if isinstance(name, Digester):
        return name
    try:
        return _DIGESTER_NAMES[name.lower()]
    except KeyError:
        raise InvalidArgument(f"unknown digester {name!r}: expected blake3 or sha256") from None


def super_flag_for_compressor(c: Compressor) -> int:
    """The RAFS superblock flag bit (``RafsSuperFlags``) for a compressor."""
    return {
        Compressor.NONE: 0x1,
        Compressor.LZ4_BLOCK: 0x2,
        Compressor.GZIP: 0x40,
        Compressor.ZSTD: 0x80,
    }[c]


def super_flag_for_digester(d: Digester) -> int:
    """The RAFS superblock flag bit for a digester."""
    return {Digester.BLAKE3: 0x4, Digester.SHA256: 0x8}[d]


def toc_flag_for_compressor(c: Compressor) -> int:
    """The blob TOC entry flag for a compressor; gzip has no TOC encoding."""
    try:
        return {Compressor.NONE: 0x1, Compressor.ZSTD: 0x2, Compressor.LZ4_BLOCK: 0x4}[c]
    except KeyError:
        raise InvalidArgument(f"compressor {c.name} cannot be recorded in a blob TOC") from None


_Data = TypeVar("_Data", bytes, memoryview, bytes | memoryview)


def compress(data: _Data, algo: Compressor) -> tuple[bytes | _Data, bool]:
    """Compress one chunk; return ``(payload, compressed)``.

    ``compressed`` is False (and ``payload`` is ``data`` itself, not a copy) when the
    algorithm is NONE, the input is empty, or compression did not make it smaller.
    """
    if algo == Compressor.NONE or not data:
        return data, False
    if algo == Compressor.LZ4_BLOCK:
        out = _lib.lz4.compress(data, store_size=False)
    elif algo == Compressor.ZSTD:
        out = _zstd_compressor().compress(data)
    elif algo == Compressor.GZIP:
        out = _lib.gzip.compress(data, compresslevel=6, mtime=0)
    else:  # pragma: no cover - enum is closed
        raise InvalidArgument(f"unsupported compressor {algo!r}")
    if len(out) >= len(data):
        return data, False
    return out, True


_tls = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    """One compression context per thread (a context serves one call at a time)."""
    c = getattr(_tls, "zstd_c", None)
    if c is None:
        c = _tls.zstd_c = _lib.zstd.ZstdCompressor(level=_ZSTD_LEVEL)
    return c


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    """One decompression context per thread: creating one costs more than a small chunk."""
    d = getattr(_tls, "zstd", None)
    if d is None:
        d = _tls.zstd = _lib.zstd.ZstdDecompressor()
    return d


def _lz4_decompress(raw: bytes | memoryview, size: int) -> bytes:
    """A raw LZ4 block decoded into ``size`` bytes (fewer when it holds fewer: the caller
    checks), without holding the GIL when liblz4 is there. liblz4 writes straight into
    a new bytes object (not shared with anyone before this returns): no copy."""
    lz4 = _lib.lz4_decompress_safe
    if lz4 is None or not 1 < size < 1 << 31 or len(raw) >= 1 << 31:
        out: bytes = _lib.lz4.decompress(raw, uncompressed_size=size)
        return out
    if not isinstance(raw, bytes):  # a chunk cut out of a fetched range: the whole of it?
        obj = raw.obj if isinstance(raw, memoryview) else None
        raw = obj if isinstance(obj, bytes) and raw.nbytes == len(obj) else bytes(raw)
    new_bytes, decode = lz4
    out = new_bytes(None, size)
    got = decode(raw, out, len(raw), size)
    if got < 0:
        raise FormatError(f"decompress LZ4_BLOCK chunk: corrupt block (error at byte {-got - 1})")
    if got != size:
        raise FormatError(f"decompress LZ4_BLOCK chunk: got {got} bytes, expected {size}")
    return out


def decompress(data: bytes | memoryview, algo: Compressor, uncompressed_size: int) -> bytes:
    """Decode one chunk compressed with ``algo`` into exactly ``uncompressed_size`` bytes.

    Raises :class:`FormatError` when the payload is corrupt or decodes to another size.
    """
    # the codecs take any buffer: a chunk cut out of a ranged read is not copied first
    raw = data
    try:
        if algo == Compressor.NONE:
            out = bytes(raw)
        elif algo == Compressor.LZ4_BLOCK:
            out = _lz4_decompress(raw, uncompressed_size)
        elif algo == Compressor.ZSTD:
            out = _zstd_decompressor().decompress(raw, max_output_size=max(uncompressed_size, 1))
        elif algo == Compressor.GZIP:
            out = zlib.decompress(raw, wbits=31)
        else:  # pragma: no cover
            raise InvalidArgument(f"unsupported compressor {algo!r}")
    except (_lib.lz4.LZ4BlockError, _lib.zstd.ZstdError, zlib.error) as err:
        raise FormatError(f"decompress {algo.name} chunk: {err}") from err
    if len(out) != uncompressed_size:
        raise FormatError(
            f"decompress {algo.name} chunk: got {len(out)} bytes, expected {uncompressed_size}"
        )
    return out


def decompress_frames(data: bytes | memoryview, algo: Compressor,
                      uncompressed_size: int) -> bytes:
    """Decode a chunk-info payload into exactly ``uncompressed_size`` bytes: as
    :func:`decompress`, but a zstd payload may be several frames, skippable ones among
    them (upstream decodes chunk info with ``ZSTD_decompress``, which reads them so).
    FormatError when it is corrupt or decodes to another size."""
    if algo != Compressor.ZSTD:
        return decompress(data, algo, uncompressed_size)
    parts: list[bytes] = []
    got = 0
    rest = bytes(data)
    try:
        while rest:
            if _lib.zstd.frame_content_size(rest[:18]) > uncompressed_size - got:
                break  # a frame larger than what is left: not decoded (memory bound)
            d = _zstd_decompressor().decompressobj()
            out = d.decompress(rest)
            if not d.eof:
                raise FormatError("decompress ZSTD chunk info: the last frame is truncated")
            got += len(out)
            if got > uncompressed_size:
                break
            parts.append(out)
            rest = d.unused_data
    except _lib.zstd.ZstdError as err:
        raise FormatError(f"decompress ZSTD chunk info: {err}") from err
    if got != uncompressed_size:
        raise FormatError(f"decompress ZSTD chunk info: got {got} bytes or more, expected "
                          f"{uncompressed_size}")
    return b"".join(parts)


class _Hasher(Protocol):
    """Minimal common interface of hashlib / blake3 hashers."""

    def update(self, data: bytes | memoryview, /) -> object: ...

    def digest(self) -> bytes: ...


def new_hasher(algo: Digester) -> _Hasher:
    """A fresh incremental hasher for ``algo`` (``update``/``digest``)."""
    if algo == Digester.BLAKE3:
        return _lib.blake3.blake3()
    return _lib.hashlib.sha256()


def digest(data: bytes | memoryview, algo: Digester) -> bytes:
    """The 32-byte chunk digest of uncompressed ``data``."""
    if algo == Digester.BLAKE3:
        return _lib.blake3.blake3(data).digest()
    return _lib.hashlib.sha256(data).digest()


def decode_chunk(
    raw: bytes | memoryview,
    *,
    compressed: bool,
    compressor: Compressor,
    uncompressed_size: int,
    expected_digest: bytes = b"",
    digester: Digester = Digester.BLAKE3,
    what: str = "chunk",
) -> bytes:
    """The uncompressed bytes of one chunk as stored in a blob, checked.

    ``compressed`` is the chunk's own flag (a chunk may be stored raw in a compressed
    blob). With ``expected_digest`` the result must hash to it. Every failure is a
    FormatError whose message starts with ``what`` (name the blob and chunk there).
    """
    algo = compressor if compressed else Compressor.NONE
    try:
        data = decompress(raw, algo, uncompressed_size)
    except FormatError as err:
        raise FormatError(f"{what}: {err}") from err
    if expected_digest and digest(data, digester) != expected_digest:
        raise FormatError(f"{what}: digest mismatch")
    return data
