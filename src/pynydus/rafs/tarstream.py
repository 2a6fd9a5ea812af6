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
import os
import stat
import tarfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, cast

from pynydus.errors import FormatError, InvalidArgument
from pynydus.rafs.chunker import _usable_cpus
from pynydus.rafs.layerstream import DECODE_ERRORS, LayerStream

__all__ = [
    "DataReader",
    "DirSource",
    "Entry",
    "EntryType",
    "TarSource",
    "Whiteout",
    "normalize_path",
]

OCI_WHITEOUT_PREFIX = b".wh."
OCI_WHITEOUT_OPAQUE = b".wh..wh..opq"



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
    """File data of the current entry; ``read(n)`` returns at most n bytes, b"" at end.

    The result is bytes-like: a tar source hands out memoryviews of its decoded
    blocks (valid after the iterator advances, but they pin the block)."""

    def read(self, n: int = -1, /) -> bytes | memoryview: ...


def normalize_path(raw: bytes) -> bytes:
    """Normalize a layer path: strip ``/`` and ``./`` prefixes, empty and ``.`` components.

    Raises :class:`FormatError` for ``..`` components, which could escape the root.
    """
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise FormatError(f"layer path {raw!r}: '..' component not allowed")
    return b"/".join(parts)


# --------------------------------------------------------------------------- tar


def _peek(f: BinaryIO, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = f.read(n - len(buf))
        if not got:
            break
        buf += got
    return buf


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


# Directory read-ahead (_ReadAhead): files up to this size are read whole, at most
# this many entries ahead of the walk.
_AHEAD_MAX_FILE = 64 * 1024
_AHEAD_ENTRIES = 512

# What decoders and the tar parser raise for malformed input (gzip.BadGzipFile is
# an OSError; plain OSErrors from the source file itself are left alone).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    EOFError,
    UnicodeError,
    *DECODE_ERRORS,
)


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class _Slice:
    """The next ``size`` bytes of a layer stream, as zero-copy views where possible."""

    def __init__(self, stream: LayerStream, size: int) -> None:
        self._stream = stream
        self._left = size

    def read(self, n: int = -1, /) -> bytes | memoryview:
        n = self._left if n < 0 else min(n, self._left)
        if n <= 0:
            return b""
        data = self._stream.read_view(n)
        self._left -= len(data)
        if len(data) < n:
            self._left = 0  # the stream ended early: the caller sees a short file
        return data


class _TarData:
    """File data of one tar member; a truncated or corrupt stream is a FormatError."""

    def __init__(self, f: _Slice | BinaryIO, path: bytes) -> None:
        self._f = f
        self._path = path

    def read(self, n: int = -1, /) -> bytes | memoryview:
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
        if not head:
            self.compression = None
            return  # an empty file is an empty layer (upstream's empty.tar fixture)
        with LayerStream(f, head, tee=self._tee) as stream:
            self.compression = stream.compression
            # Random-access mode over a forward-only stream: tarfile parses headers
            # (PAX, GNU long names, sparse maps) and seeks forward over data; regular
            # file data is taken straight from the stream's blocks (_TarData).
            tf = tarfile.TarFile(
                fileobj=stream,  # type: ignore[arg-type]
                mode="r",
                encoding="utf-8",
                errors="surrogateescape",
            )
            with tf:
                while True:
                    member = tf.next()
                    if member is None:
                        if self._tee is not None:
                            stream.drain()  # the copy must be the whole tar, padding too
                        return
                    # tarfile remembers every member for random access we never use.
                    cast(Any, tf).members.clear()
                    entry = self._entry(member)
                    if entry is None:
                        continue
                    reader: DataReader | None = None
                    if entry.type == EntryType.REG:
                        reader = (
                            _TarData(tf.extractfile(member), entry.path)  # type: ignore[arg-type]
                            if member.issparse()
                            else _TarData(_Slice(stream, member.size), entry.path)
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
    """Opens the file on first read and closes it at EOF, so walking holds no fds.

    Plain ``os.read`` on a descriptor: a file object's buffering only adds a copy
    and a few microseconds per file, which a 50,000-file layer notices."""

    def __init__(self, path: bytes) -> None:
        self._path = path
        self._fd = -1
        self._done = False

    def read(self, n: int = -1, /) -> bytes:
        if self._done:
            return b""
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        if n < 0:
            parts = []
            while data := os.read(self._fd, 1 << 20):
                parts.append(data)
            self.close()
            return b"".join(parts)
        data = os.read(self._fd, n)
        if not data:
            self.close()
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._done = True


class _Prefetched:
    """File data the read-ahead thread already read (small files only)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1, /) -> bytes | memoryview:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos : end]
        self._pos += len(out)
        return out


class _NoReadAhead:
    """What :class:`_ReadAhead` offers, doing nothing (the walk reads every file itself)."""

    def take(self, path: bytes) -> None:
        return None

    def stop(self) -> None:
        pass


class _ReadAhead:
    """Reads a directory walk's small files ahead of it, on a thread of its own.

    The thread walks the tree in :class:`DirSource`'s order (names sorted, depth
    first) and reads every regular file of at most :data:`_AHEAD_MAX_FILE` bytes;
    larger files get their first MiB requested from the kernel
    (``posix_fadvise(WILLNEED)``, asynchronous). The walk then finds inodes, directory
    blocks and file data in memory: on a cold cache the disk serves many requests at
    once instead of one small file at a time, and the open/read/close system calls
    of small files run beside the builder instead of in it. It stays at most
    :data:`_AHEAD_ENTRIES` entries ahead (so at most ~32 MiB of data). Everything is
    best effort: a file it could not read is read by the walk itself.
    """

    def __init__(self, root: bytes) -> None:
        self._root = root
        self._ready: dict[bytes, bytes] = {}
        self._taken = 0  # entries the walk has passed; data for those is not kept
        self._room = threading.Semaphore(_AHEAD_ENTRIES)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dir-read-ahead", daemon=True)
        self._thread.start()

    def take(self, path: bytes) -> bytes | None:
        """The data read ahead for ``path`` (once), or None; one call per walked entry."""
        self._taken += 1
        self._room.release()
        return self._ready.pop(path, None)

    def stop(self) -> None:
        self._done.set()
        self._room.release()
        self._thread.join()
        self._ready.clear()

    def _run(self) -> None:
        stack = [self._root]
        index = 0  # position of the entry in walk order (1-based, as _taken counts)
        try:
            while stack and not self._done.is_set():
                with os.scandir(stack.pop()) as it:
                    entries = sorted(it, key=lambda e: e.name)
                subdirs = []
                for e in entries:
                    while not self._room.acquire(timeout=0.5):
                        if self._done.is_set():
                            return
                    if self._done.is_set():
                        return
                    index += 1
                    if e.is_dir(follow_symlinks=False):
                        subdirs.append(e.path)
                    elif e.is_file(follow_symlinks=False) and index > self._taken:
                        self._read(e.path, index)
                stack.extend(reversed(subdirs))
        except OSError:
            return  # the walk itself will meet (and report) whatever went wrong

    def _read(self, path: bytes, index: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # O_NOATIME needs ownership
            except OSError:
                return
        try:
            data = os.read(fd, _AHEAD_MAX_FILE + 1)
            if len(data) <= _AHEAD_MAX_FILE:
                if index > self._taken:  # else the walk went past it meanwhile
                    self._ready[path] = data
            else:
                os.posix_fadvise(fd, 0, 1 << 20, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


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
        # On one CPU the read-ahead thread's own walk is pure overhead: nothing runs beside it.
        ahead: _ReadAhead | _NoReadAhead = _ReadAhead(self._root) if _usable_cpus() > 1 \
            else _NoReadAhead()
        try:
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
                    data = ahead.take(abs_path)
                    if rel in early:
                        continue
                    cst = os.lstat(abs_path)
                    entry = self._entry(abs_path, rel, cst, seen)
                    reader: DataReader | None = None
                    if entry.type == EntryType.REG:
                        reader = _LazyFile(abs_path) if data is None else _Prefetched(data)
                    yield entry, reader
                    if entry.type == EntryType.DIR:
                        subdirs.append(rel)
                stack.extend(reversed(subdirs))
        finally:
            ahead.stop()

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
