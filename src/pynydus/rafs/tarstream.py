"""Filesystem entry sources for the RAFS builder: OCI layer tars and local directories.

Both sources produce the same :class:`Entry` model, one entry at a time, paired with
a :class:`DataReader` for regular-file data. Nothing is unpacked to disk and no file
is held in memory: the builder reads file data in chunk-size pieces while it
consumes the entry, before asking for the next one. For a tar stream that is a hard
rule (the stream cannot go back); :class:`TarSource` enforces nothing but the
reader of an entry is invalid once the iterator has advanced.

Tar layers may be plain, gzip (any number of members) or zstd (any number of
frames); the codec is detected from the magic bytes, not from the file name.
PAX extended headers supply nanosecond mtimes, long names and xattrs
(``SCHILY.xattr.*``, falling back to libarchive's base64 ``LIBARCHIVE.xattr.*``).

OCI whiteouts (``.wh.NAME`` removes NAME from lower layers, ``.wh..wh..opq`` makes the
directory opaque) are passed through as ordinary entries tagged with
:attr:`Entry.whiteout`; turning them into the overlayfs form (char 0/0 devices and
``trusted.overlay.opaque=y``) needs the parent directory, so the tree does it
(:mod:`pynydus.rafs.tree`).
"""

from __future__ import annotations

import base64
import enum
import errno
import gzip
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, cast

import zstandard

from pynydus.errors import FormatError, InvalidArgument

__all__ = [
    "DataReader",
    "DirSource",
    "Entry",
    "EntryType",
    "TarSource",
    "Whiteout",
    "normalize_path",
    "open_layer",
]

OCI_WHITEOUT_PREFIX = b".wh."
OCI_WHITEOUT_OPAQUE = b".wh..wh..opq"

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# tarfile's stream reader copies in units of its buffer: 64 KiB keeps the number of
# Python-level reads per 1 MiB chunk small without holding much memory.
_TAR_BUFSIZE = 64 * 1024


class EntryType(enum.Enum):
    """What an entry is. HARDLINK points at an earlier path through :attr:`Entry.link`."""

    REG = "reg"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"


_S_IFMT_OF = {
    EntryType.REG: stat.S_IFREG,
    EntryType.HARDLINK: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
    EntryType.SOCKET: stat.S_IFSOCK,
}


class Whiteout(enum.Enum):
    """OCI whiteout kinds: REMOVAL for ``.wh.NAME``, OPAQUE for ``.wh..wh..opq``."""

    REMOVAL = "removal"
    OPAQUE = "opaque"


@dataclass(slots=True)
class Entry:
    """One filesystem object as found in a layer.

    ``path`` is relative, normalized, without leading ``/`` or ``./``; the root
    directory is ``b""``. ``mode`` holds only the permission bits (``0o7777``);
    the type is in ``type``. ``link`` is the symlink target (verbatim) or the
    normalized path of a hardlink's target. ``data_offset`` is the byte offset of
    the file data inside the *uncompressed* tar (tarfs needs it), else None.
    """

    path: bytes
    type: EntryType
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    link: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    data_offset: int | None = None

    @property
    def name(self) -> bytes:
        """The last path component (``b""`` for the root)."""
        return self.path.rsplit(b"/", 1)[-1]

    @property
    def parent(self) -> bytes:
        """The parent directory's path (``b""`` for top-level entries)."""
        return self.path.rsplit(b"/", 1)[0] if b"/" in self.path else b""

    @property
    def st_mode(self) -> int:
        """Full ``st_mode`` (type bits and permissions)."""
        return _S_IFMT_OF[self.type] | (self.mode & 0o7777)

    @property
    def whiteout(self) -> Whiteout | None:
        """The OCI whiteout kind this entry's name encodes, if any."""
        name = self.name
        if name == OCI_WHITEOUT_OPAQUE:
            return Whiteout.OPAQUE
        if name.startswith(OCI_WHITEOUT_PREFIX) and len(name) > len(OCI_WHITEOUT_PREFIX):
            return Whiteout.REMOVAL
        return None


class DataReader(Protocol):
    """File data of the current entry; ``read(n)`` returns at most n bytes, b"" at end."""

    def read(self, n: int = -1, /) -> bytes: ...


def normalize_path(raw: bytes) -> bytes:
    """Normalize a layer path: strip ``/`` and ``./`` prefixes, empty and ``.`` components.

    Raises :class:`FormatError` for ``..`` components, which could escape the root.
    """
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise FormatError(f"layer path {raw!r}: '..' component not allowed")
    return b"/".join(parts)


# --------------------------------------------------------------------------- tar


def open_layer(fileobj: BinaryIO) -> BinaryIO:
    """Wrap ``fileobj`` so that reads return the uncompressed tar bytes.

    Detects gzip and zstd by their magic numbers; anything else is taken as a plain
    tar. Only sequential ``read`` is used, so pipes and HTTP bodies work.
    """
    return _decoder(_peek(fileobj, 4), fileobj)


def _decoder(head: bytes, rest: BinaryIO) -> BinaryIO:
    """Uncompressed stream of ``head + rest`` (``head`` = bytes already peeked)."""
    raw = io.BufferedReader(_Prefixed(head, rest), buffer_size=1 << 20)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if head.startswith(_ZSTD_MAGIC):
        dctx = zstandard.ZstdDecompressor()
        return dctx.stream_reader(raw, read_across_frames=True)
    return raw


def _peek(f: BinaryIO, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = f.read(n - len(buf))
        if not got:
            break
        buf += got
    return buf


class _Prefixed(io.RawIOBase):
    """A read-only stream that yields ``prefix`` then the rest of ``inner``."""

    def __init__(self, prefix: bytes, inner: BinaryIO) -> None:
        self._prefix = prefix
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._inner.read(len(b))
        n = len(data)
        b[:n] = data
        return n


def _pax_time(value: str) -> tuple[int, int]:
    """Parse a PAX time ``[-]SECONDS[.FRACTION]`` exactly into (seconds, nanoseconds)."""
    neg = value.startswith("-")
    sec_s, _, frac = value.lstrip("-").partition(".")
    sec = int(sec_s or "0")
    nsec = int((frac + "000000000")[:9]) if frac else 0
    if neg:
        if nsec:
            sec, nsec = -sec - 1, 1_000_000_000 - nsec
        else:
            sec = -sec
    return sec, nsec


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _tar_xattrs(pax: Mapping[str, str]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith("LIBARCHIVE.xattr."):
            name = _enc(key[len("LIBARCHIVE.xattr.") :])
            b64 = value + "=" * (-len(value) % 4)
            try:
                out.setdefault(name, base64.b64decode(b64, altchars=b"-_"))
            except ValueError:
                continue
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out[_enc(key[len("SCHILY.xattr.") :])] = _enc(value)
    return out


# What decoders and the tar parser raise for malformed input (gzip.BadGzipFile is
# an OSError; plain OSErrors from the source file itself are left alone).
_DECODE_ERRORS = (
    tarfile.TarError,
    EOFError,
    gzip.BadGzipFile,
    zlib.error,
    zstandard.ZstdError,
    UnicodeError,
)


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class _Tee:
    """Read-through wrapper that copies every byte read into ``sink`` (tarfs blobs)."""

    def __init__(self, inner: BinaryIO, sink: _Sink) -> None:
        self._inner = inner
        self._sink = sink

    def read(self, n: int = -1, /) -> bytes:
        data = self._inner.read(n)
        if data:
            self._sink.write(data)
        return data


class _TarData:
    """File data of one tar member; a truncated or corrupt stream is a FormatError."""

    def __init__(self, f: BinaryIO, path: bytes) -> None:
        self._f = f
        self._path = path

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._f.read(n)
        except _DECODE_ERRORS as err:
            raise FormatError(f"layer tar: data of {self._path!r}: {err}") from err


class TarSource:
    """Iterate an OCI layer tar (plain, gzip or zstd) as ``(Entry, DataReader | None)``.

    ``source`` is a path or a readable binary file object. With ``tee`` every
    uncompressed tar byte (up to its very end) is also written there, which is how
    a tarfs blob gets made in the same pass. The tar is read once,
    front to back; each regular file's reader must be consumed (or abandoned)
    before the iterator advances. Memory is bounded by one tar record buffer plus
    what the caller reads. Iterating twice re-opens a path source but raises
    :class:`InvalidArgument` for a file object.
    """

    def __init__(
        self, source: str | os.PathLike[str] | BinaryIO, *, tee: _Sink | None = None
    ) -> None:
        self._source = source
        self._consumed = False
        self._tee = tee
        self.compression: str | None = None

    def __iter__(self) -> Iterator[tuple[Entry, DataReader | None]]:
        if isinstance(self._source, (str, os.PathLike)):
            with open(self._source, "rb") as f:
                yield from self._iter(f)
        else:
            if self._consumed:
                raise InvalidArgument("tar stream already consumed")
            self._consumed = True
            yield from self._iter(self._source)

    def _iter(self, f: BinaryIO) -> Iterator[tuple[Entry, DataReader | None]]:
        try:
            yield from self._iter_entries(f)
        except _DECODE_ERRORS as err:
            # Decoder and tar-parser failures anywhere (header, data skip, end padding)
            # mean malformed input; consumer exceptions never pass through here.
            raise FormatError(f"layer tar: {type(err).__name__}: {err}") from err

    def _iter_entries(self, f: BinaryIO) -> Iterator[tuple[Entry, DataReader | None]]:
        head = _peek(f, 4)
        self.compression = (
            "gzip"
            if head.startswith(_GZIP_MAGIC)
            else "zstd"
            if head.startswith(_ZSTD_MAGIC)
            else None
        )
        stream = _decoder(head, f)
        if not head:
            return  # an empty file is an empty layer (upstream's empty.tar fixture)
        if self._tee is not None:
            stream = _Tee(stream, self._tee)  # type: ignore[assignment]
        tf = tarfile.open(  # noqa: SIM115 - entered with "with" right below
            fileobj=stream,
            mode="r|",
            encoding="utf-8",
            errors="surrogateescape",
            bufsize=_TAR_BUFSIZE,
        )
        with tf:
            while True:
                member = tf.next()
                if member is None:
                    if self._tee is not None:
                        # The copy must be the whole tar, padding after the end marker too.
                        while stream.read(1 << 20):
                            pass
                    return
                # tarfile remembers every member for random access we never use.
                cast(Any, tf).members.clear()
                entry = self._entry(member)
                if entry is None:
                    continue
                reader = (
                    _TarData(tf.extractfile(member), entry.path)  # type: ignore[arg-type]
                    if entry.type == EntryType.REG
                    else None
                )
                yield entry, reader

    @staticmethod
    def _entry(m: tarfile.TarInfo) -> Entry | None:
        path = normalize_path(_enc(m.name))
        pax = m.pax_headers
        if "mtime" in pax:
            mtime, nsec = _pax_time(pax["mtime"])
        else:
            mtime, nsec = int(m.mtime), 0
        common: dict[str, Any] = {
            "path": path,
            "mode": m.mode & 0o7777,
            "uid": m.uid,
            "gid": m.gid,
            "mtime": mtime,
            "mtime_nsec": nsec,
            "xattrs": _tar_xattrs(pax),
        }
        if m.isreg():  # REGTYPE, AREGTYPE, CONTTYPE, GNU sparse
            return Entry(
                type=EntryType.REG,
                size=m.size,
                data_offset=None if m.issparse() else m.offset_data,
                **common,
            )
        if m.isdir():
            return Entry(type=EntryType.DIR, **common)
        if m.issym():
            return Entry(type=EntryType.SYMLINK, link=_enc(m.linkname), **common)
        if m.islnk():
            return Entry(type=EntryType.HARDLINK, link=normalize_path(_enc(m.linkname)), **common)
        if m.ischr() or m.isblk():
            return Entry(
                type=EntryType.CHAR if m.ischr() else EntryType.BLOCK,
                rdev_major=m.devmajor,
                rdev_minor=m.devminor,
                **common,
            )
        if m.isfifo():
            return Entry(type=EntryType.FIFO, **common)
        return None  # unknown vendor types carry nothing a filesystem can show


# --------------------------------------------------------------------------- directory


class _LazyFile:
    """Opens the file on first read and closes it at EOF, so walking holds no fds."""

    def __init__(self, path: bytes) -> None:
        self._path = path
        self._f: BinaryIO | None = None
        self._done = False

    def read(self, n: int = -1, /) -> bytes:
        if self._done:
            return b""
        if self._f is None:
            self._f = open(self._path, "rb")  # noqa: SIM115 - closed at EOF or close()
        data = self._f.read(n)
        if not data or n < 0:
            self._f.close()
            self._done = True
        return data

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._done = True


def _read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for name in names:
        try:
            out[_enc(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as err:
            if err.errno in (errno.ENODATA, errno.ENOTSUP):
                continue
            raise
    return out


class DirSource:
    """Walk a local directory as ``(Entry, DataReader | None)``, root first.

    Children are visited in byte order of their names, parents before children.
    A non-directory seen a second time (same ``st_dev``/``st_ino``) is reported as
    HARDLINK to the first path. Sparse files read as zeros (dedup collapses the
    zero chunks). ``xattrs=False`` skips reading extended attributes.

    ``first`` lists normalized paths (files, or directories meaning every regular
    file below them) whose entries come right after the root, so that their data
    leads the blob, as upstream's directory builder does for prefetch files: a
    prefetch then reads one contiguous range. Their parent directories follow later
    in walk order (the tree fills in implied parents).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | bytes,
        *,
        xattrs: bool = True,
        first: Sequence[bytes] = (),
    ) -> None:
        self._root = os.fsencode(root)
        self._xattrs = xattrs
        self._first = [p for p in first if p]

    def __iter__(self) -> Iterator[tuple[Entry, DataReader | None]]:
        st = os.lstat(self._root)
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"build source {self._root!r}: not a directory")
        seen: dict[tuple[int, int], bytes] = {}
        yield self._entry(self._root, b"", st, seen), None
        early: set[bytes] = set()
        for rel in self._early_files():
            if rel in early:
                continue
            early.add(rel)
            abs_path = os.path.join(self._root, rel)
            entry = self._entry(abs_path, rel, os.lstat(abs_path), seen)
            yield entry, _LazyFile(abs_path) if entry.type == EntryType.REG else None
        stack: list[bytes] = [b""]
        while stack:
            rel_dir = stack.pop()
            abs_dir = os.path.join(self._root, rel_dir) if rel_dir else self._root
            with os.scandir(abs_dir) as it:
                names = sorted(e.name for e in it)
            subdirs: list[bytes] = []
            for name in names:
                rel = rel_dir + b"/" + name if rel_dir else name
                abs_path = os.path.join(self._root, rel)
                if rel in early:
                    continue
                cst = os.lstat(abs_path)
                entry = self._entry(abs_path, rel, cst, seen)
                reader = _LazyFile(abs_path) if entry.type == EntryType.REG else None
                yield entry, reader
                if entry.type == EntryType.DIR:
                    subdirs.append(rel)
            stack.extend(reversed(subdirs))

    def _early_files(self) -> Iterator[bytes]:
        """Regular files named by ``first`` (directories expanded, sorted); missing ones skipped."""
        for rel in self._first:
            abs_path = os.path.join(self._root, rel)
            try:
                st = os.lstat(abs_path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield rel
            elif stat.S_ISDIR(st.st_mode):
                for dirpath, dirnames, filenames in os.walk(abs_path):
                    dirnames.sort()
                    for name in sorted(filenames):
                        p = os.path.join(dirpath, name)
                        if stat.S_ISREG(os.lstat(p).st_mode):
                            yield os.path.relpath(p, self._root)

    def _entry(
        self, abs_path: bytes, rel: bytes, st: os.stat_result, seen: dict[tuple[int, int], bytes]
    ) -> Entry:
        m = st.st_mode
        e = Entry(
            path=rel,
            type=EntryType.REG,
            mode=stat.S_IMODE(m),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime=st.st_mtime_ns // 1_000_000_000,
            mtime_nsec=st.st_mtime_ns % 1_000_000_000,
            xattrs=_read_xattrs(abs_path) if self._xattrs else {},
        )
        if not stat.S_ISDIR(m) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = seen.get(key)
            if first is not None:
                e.type = EntryType.HARDLINK
                e.link = first
                return e
            seen[key] = rel
        if stat.S_ISREG(m):
            e.size = st.st_size
        elif stat.S_ISDIR(m):
            e.type = EntryType.DIR
        elif stat.S_ISLNK(m):
            e.type = EntryType.SYMLINK
            e.link = os.readlink(abs_path)
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
            e.type = EntryType.CHAR if stat.S_ISCHR(m) else EntryType.BLOCK
            e.rdev_major, e.rdev_minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(m):
            e.type = EntryType.FIFO
        elif stat.S_ISSOCK(m):
            e.type = EntryType.SOCKET
        else:
            raise FormatError(f"build source {abs_path!r}: unsupported file type {m:o}")
        return e
