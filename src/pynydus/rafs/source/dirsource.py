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
from pynydus.host.cpus import usable_cpus
from pynydus.rafs.source.entry import DataReader, Entry, EntryType

__all__ = ["DirSource"]

# Directory read-ahead (_ReadAhead): files up to this size are read whole, at most
# this many entries ahead of the walk.
_AHEAD_MAX_FILE = 64 * 1024
_AHEAD_ENTRIES = 512


_S_IFMT = 0o170000
_REG, _DIR, _HARDLINK = EntryType.REG, EntryType.DIR, EntryType.HARDLINK
_TYPE_OF_FMT = {
    stat.S_IFREG: _REG,
    stat.S_IFDIR: _DIR,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFCHR: EntryType.CHAR,
    stat.S_IFBLK: EntryType.BLOCK,
    stat.S_IFIFO: EntryType.FIFO,
    stat.S_IFSOCK: EntryType.SOCKET,
}


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
        # The walk wakes the thread every eighth of the window, not per entry: a
        # semaphore's release and acquire are Python code under the GIL, a few us each.
        self._wake = threading.Event()
        self._wake_every = max(1, _AHEAD_ENTRIES // 8)
        self._done = False
        self._thread = threading.Thread(target=self._run, name="dir-read-ahead", daemon=True)
        self._thread.start()

    def take(self, path: bytes) -> bytes | None:
        """The data read ahead for ``path`` (once), or None; one call per walked entry."""
        self._taken = taken = self._taken + 1
        if not taken % self._wake_every:
            self._wake.set()
        return self._ready.pop(path, None)

    def stop(self) -> None:
        self._done = True
        self._wake.set()
        self._thread.join()
        self._ready.clear()

    def _run(self) -> None:
        stack = [self._root]
        index = 0  # position of the entry in walk order (1-based, as _taken counts)
        wake = self._wake
        try:
            while stack and not self._done:
                with os.scandir(stack.pop()) as it:
                    entries = sorted(it, key=lambda e: e.name)
                subdirs = []
                for e in entries:
                    while index - self._taken >= _AHEAD_ENTRIES:
                        # A wake-up lost between wait and clear only costs this timeout.
                        wake.wait(0.05)
                        wake.clear()
                        if self._done:
                            return
                    if self._done:
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
        root = self._root
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"build source {root!r}: not a directory")
        # Paths are the root's prefix plus the relative path: os.path.join per entry
        # costs more than the lstat it feeds.
        prefix = root if root.endswith(b"/") else root + b"/"
        seen: dict[tuple[int, int], bytes] = {}
        yield self._entry(root, b"", st, seen), None
        early: set[bytes] = set()
        for rel in self._early_files():
            if rel in early:
                continue
            early.add(rel)
            abs_path = prefix + rel
            entry = self._entry(abs_path, rel, os.lstat(abs_path), seen)
            yield entry, _LazyFile(abs_path) if entry.type is _REG else None
        # On one CPU the read-ahead thread's own walk is pure overhead: nothing runs beside it.
        ahead = _ReadAhead(root) if usable_cpus() > 1 else None
        make_entry, lstat, listdir = self._entry, os.lstat, os.listdir
        try:
            stack: list[bytes] = [b""]
            while stack:
                rel_dir = stack.pop()
                names = sorted(listdir(prefix + rel_dir if rel_dir else root))
                subdirs: list[bytes] = []
                head = rel_dir + b"/" if rel_dir else b""
                for name in names:
                    rel = head + name
                    abs_path = prefix + rel
                    data = ahead.take(abs_path) if ahead is not None else None
                    if early and rel in early:
                        continue
                    entry = make_entry(abs_path, rel, lstat(abs_path), seen)
                    etype = entry.type
                    if etype is _REG:
                        yield entry, _LazyFile(abs_path) if data is None else _Prefetched(data)
                    else:
                        yield entry, None
                        if etype is _DIR:
                            subdirs.append(rel)
                stack.extend(reversed(subdirs))
        finally:
            if ahead is not None:
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
        etype = _TYPE_OF_FMT.get(m & _S_IFMT)
        if etype is None:
            raise FormatError(f"build source {abs_path!r}: unsupported file type {m:o}")
        mtime, mtime_nsec = divmod(st.st_mtime_ns, 1_000_000_000)
        xattrs = _read_xattrs(abs_path) if self._xattrs else {}
        if etype is _REG:  # the bulk of a tree: one Entry built at once
            if st.st_nlink > 1 and (first := _first_name(seen, st, rel)) is not None:
                return Entry(rel, _HARDLINK, m & 0o7777, st.st_uid, st.st_gid, mtime,
                             mtime_nsec, 0, first, 0, 0, xattrs)
            return Entry(rel, _REG, m & 0o7777, st.st_uid, st.st_gid, mtime, mtime_nsec,
                         st.st_size, b"", 0, 0, xattrs)
        e = Entry(rel, etype, m & 0o7777, st.st_uid, st.st_gid, mtime, mtime_nsec, 0, b"",
                  0, 0, xattrs)
        if etype is not _DIR and st.st_nlink > 1:
            first = _first_name(seen, st, rel)
            if first is not None:
                e.type = _HARDLINK
                e.link = first
                return e
        if etype is EntryType.SYMLINK:
            e.link = os.readlink(abs_path)
        elif etype is EntryType.CHAR or etype is EntryType.BLOCK:
            e.rdev_major, e.rdev_minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        return e


def _first_name(seen: dict[tuple[int, int], bytes], st: os.stat_result, rel: bytes) -> bytes | None:
    """The first path seen of the file behind ``st`` (a hardlink), else None (and
    ``rel`` is remembered as its first name)."""
    key = (st.st_dev, st.st_ino)
    first = seen.get(key)
    if first is None:
        seen[key] = rel
    return first
