"""Materialized files: a fully cached file's bytes, once, as a file of its own.

FUSE passthrough (the kernel reads a *backing file* itself: no round trip, the page
cache is the kernel's over that file) reads the backing file at the FUSE file's own
offsets, so the blob cache's data file (chunks at their blob offsets) can back only a
file that is a whole blob. Any other file is *materialized*: once every chunk of a
regular file of at least ``FLOOR`` bytes is in the blob cache, a background thread (at
the lowest CPU priority) copies its bytes from the cache to
``<work_dir>/<blob id>.file.<key>``, written under a temporary name, synced and renamed
into place, so a file of that name is whole. Later opens of the file can then be
answered in passthrough mode (``fuseops``, ``iomode``).

``<blob id>`` is the blob of the file's first chunk, so the snapshotter's cache GC
(which removes the files of blobs no image uses, by name) removes it with the image;
a copy in progress is ``<that>.tmp-<pid>``, removed by the next copy of the same file;
``<key>`` hashes the file's layout (size and, per piece, blob id, chunk index,
uncompressed offset and size, file offset): blobs are content-addressed, so the key
names the bytes, and a daemon started later (a restart, another image with the same
file) finds the file by the same name and uses it when its size matches. Naming a file
costs its whole chunk list (decoded and hashed), so an open looks only when a copy of one
of the image's blobs can exist: the work dir is listed once (the blob ids copies are named
after) and the copies made since are added; a copy another daemon makes after the
listing is found when this daemon's first cached open of the file ends (``released``,
which names it before copying).

Materializing costs the file's size again on the cache disk; it is skipped while the
disk would keep less than ``_DISK_RESERVE`` of its size free, and small files (below
``FLOOR``) are never copied: one FUSE request serves them anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import weakref

from pynydus.daemon.instance import RafsInstance

log = logging.getLogger(__name__)

# Files below this are served through FUSE as before (one request reads them).
FLOOR = 1 << 20
SUFFIX = ".file."
# The share of the cache disk a materialized copy must leave free.
_DISK_RESERVE = 0.10
_COPY = 4 << 20  # bytes per read of the cache while copying
# How long a queued file waits for its last chunks' delayed persist to land.
_LAND_SECONDS = 10.0
_QUEUE = 1024


def is_candidate(inst: RafsInstance, size: int) -> bool:
    """Whether a regular file of ``size`` bytes of ``inst`` may be materialized."""
    return size >= FLOOR and inst.config.rafs.passthrough


class Materializer:
    """Materializes files of the images of one daemon, one at a time, on a thread of its
    own started with the first file. ``path(inst, nid)`` is what an open asks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (instance, nid) -> the materialized file, or "" when known to have none
        self._known: dict[tuple[RafsInstance, int], str] = {}
        self._queued: set[tuple[RafsInstance, int]] = set()
        self._jobs: queue.SimpleQueue[tuple[RafsInstance, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # work dir -> the blob ids materialized files there are named after (see path)
        self._copied: dict[str, set[str]] = {}
        # images unmounted: a copy of theirs in progress is dropped
        self._gone: weakref.WeakSet[RafsInstance] = weakref.WeakSet()
        self._busy = 0  # queued or being copied
        self.done = 0  # files materialized since start
        self.closed = False

    @property
    def pending(self) -> int:
        """Files queued or being copied (a benchmark waits for 0)."""
        return self._busy

    def path(self, inst: RafsInstance, nid: int) -> str:
        """The materialized file of ``inst``'s inode ``nid`` ("" when there is none). The
        first ask of an inode looks on disk (a file left by an earlier daemon) if a copy
        of one of the image's blobs can be there: in the common case (none) it costs a
        set look-up per blob, not the file's layout name."""
        key = (inst, nid)
        known = self._known.get(key)
        if known is not None:
            return known
        found = ""
        if self._may_have_copies(inst):
            try:
                name, size = _layout_name(inst, nid)
                path = os.path.join(inst.config.cache.work_dir, name)
                if os.stat(path).st_size == size:
                    found = path
            except (OSError, ValueError):
                pass
        with self._lock:
            self._known.setdefault(key, found)
        return found

    def _may_have_copies(self, inst: RafsInstance) -> bool:
        """Whether a materialized file of one of ``inst``'s blobs can be in its work dir:
        the dir is listed at the first ask (files an earlier daemon left), the copies
        this materializer makes are added as they land."""
        work_dir = inst.config.cache.work_dir
        copied = self._copied.get(work_dir)
        if copied is None:
            try:
                names = os.listdir(work_dir)
            except OSError:
                names = []
            listed = {n.partition(SUFFIX)[0] for n in names if SUFFIX in n}
            with self._lock:
                copied = self._copied.setdefault(work_dir, listed)
        return bool(copied) and any(b.blob_id in copied for b in inst.bs.blobs)

    def _landed(self, work_dir: str, name: str) -> None:
        """A copy named ``name`` is in ``work_dir`` (made here or found); call with the
        lock held. A dir not listed yet will list it."""
        copied = self._copied.get(work_dir)
        if copied is not None:
            copied.add(name.partition(SUFFIX)[0])

    def released(self, inst: RafsInstance, nid: int) -> None:
        """A cached open of a candidate file ended: queue it if its chunks are all in the
        cache (or landing there) and it is not materialized yet."""
        key = (inst, nid)
        if self.closed or self._known.get(key) or key in self._queued or inst in self._gone:
            return
        if not inst.file_cached(nid, landing=True):
            return
        with self._lock:
            if key in self._queued or len(self._queued) >= _QUEUE:
                return
            self._queued.add(key)
            self._busy += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="materialize", daemon=True)
                self._thread.start()
        self._jobs.put((inst, nid))

    def forget(self, inst: RafsInstance) -> None:
        """An image was unmounted: drop what is known of its inodes."""
        with self._lock:  # after this, no copy of its files is renamed into place
            self._gone.add(inst)
            for key in [k for k in self._known if k[0] is inst]:
                del self._known[key]

    def close(self) -> None:
        self.closed = True
        self._jobs.put(None)

    def _run(self) -> None:
        try:  # this thread only: copying must not take a CPU from readers
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        while (job := self._jobs.get()) is not None:
            inst, nid = job
            key = (inst, nid)
            try:
                path = self._materialize(inst, nid)
                if path:
                    with self._lock:
                        self._known[key] = path
                    self.done += 1
            except Exception as err:  # noqa: BLE001 - an optimisation; reads go through FUSE
                log.warning("materializing inode %d of %s: %s", nid, inst.bootstrap_path, err)
            finally:
                with self._lock:
                    self._queued.discard(key)
                    self._busy -= 1

    def _materialize(self, inst: RafsInstance, nid: int) -> str:
        deadline = time.monotonic() + _LAND_SECONDS
        while not inst.file_cached(nid, landing=False):  # a delayed persist is landing
            if self.closed or time.monotonic() > deadline or not inst.file_cached(nid, landing=True):
                return ""
            time.sleep(0.05)
        name, size = _layout_name(inst, nid)
        work_dir = inst.config.cache.work_dir
        path = os.path.join(work_dir, name)
        if os.path.exists(path) and os.stat(path).st_size == size:
            with self._lock:  # another daemon's copy, made after this one listed the dir
                self._landed(work_dir, name)
            return path
        st = os.statvfs(work_dir)
        if (st.f_bavail * st.f_frsize - size) < _DISK_RESERVE * st.f_blocks * st.f_frsize:
            log.info("not materializing inode %d (%d bytes): the cache disk is nearly full", nid, size)
            return ""
        _remove_stale_copies(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            pos = 0
            while pos < size:
                data = inst.read_cached_quietly(nid, pos, min(size, pos + _COPY))
                if data is None:
                    raise OSError(f"chunks at {pos} left the cache while copying")
                os.pwrite(fd, data, pos)
                pos += len(data)
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        with self._lock:  # the image's removal and the cache GC after it see it or none
            if inst in self._gone:
                os.unlink(tmp)
                return ""
            os.rename(tmp, path)
            self._landed(work_dir, name)
        log.debug("materialized inode %d of %s (%d bytes) as %s", nid, inst.bootstrap_path,
                  size, path)
        return path


def _remove_stale_copies(path: str) -> None:
    """Remove copies of ``path`` in progress whose daemon is gone (killed mid-copy);
    another live daemon's (the cache dir is shared) stays."""
    import glob

    for stale in glob.glob(glob.escape(path) + ".tmp-*"):
        try:
            os.kill(int(stale.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(stale)
        except (ValueError, OSError):
            continue


def _layout_name(inst: RafsInstance, nid: int) -> tuple[str, int]:
    """The materialized file's name for inode ``nid`` and the file's size."""
    import hashlib  # libcrypto: loaded with the first large file opened, not at start

    size = inst.bs.stat_fields(nid)[4]
    reads = inst.bs.map_read(nid, 0, size)
    if not reads:
        raise ValueError(f"inode {nid} has no chunks")
    blobs = inst.bs.blobs
    h = hashlib.sha256(b"%d" % size)
    for r in reads:
        c = r.chunk
        h.update(b"|%s:%d:%d:%d:%d:%d:%d" % (blobs[c.blob_index].blob_id.encode(), c.index,
                                            c.uncompressed_offset, c.uncompressed_size,
                                            c.file_offset, r.offset, r.length))
    return f"{blobs[reads[0].chunk.blob_index].blob_id}{SUFFIX}{h.hexdigest()[:32]}", size
