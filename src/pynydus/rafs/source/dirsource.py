"""A local directory as a build source: ``(Entry, DataReader | None)`` in walk order.

The walk visits children in byte order of their names, parents before children, and
reports a second name of the same file as a hardlink to the first. Small files are
read ahead of the walk on a thread (:class:`_ReadAhead`), so on a cold cache the
disk serves many requests at once and the open/read/close calls run beside the
builder instead of in it.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator, Sequence

from pynydus.errors import FormatError, InvalidArgument
from pynydus.rafs.decoder import usable_cpus
from pynydus.rafs.source.entry import DataReader, Entry, EntryType

__all__ = ["DirSource"]

# Directory read-ahead (_ReadAhead): files up to this size are read whole, at most
# this many entries ahead of the walk.
_AHEAD_MAX_FILE = 64 * 1024
_AHEAD_ENTRIES = 512


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
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
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
        ahead: _ReadAhead | _NoReadAhead = _ReadAhead(self._root) if usable_cpus() > 1 \
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
