"""The FUSE session: threads that read ``/dev/fuse``, answer, and write the replies.

A thin adapter around ``fuseproto`` (the messages) and ``fuseops`` (the answers).
Each of ``threads`` worker threads blocks in read(2) on the connection's fd, parses
the one request it got, lets the server answer it (a read whose chunks are missing
waits for the backend right there, as nydusd's FUSE threads do) and writes the reply
with one writev(2). The kernel hands each request to exactly one reader, so nothing is
shared between the threads but the server.

The fd is the connection: whoever holds it keeps the mount alive. ``mount_fuse`` opens
``/dev/fuse`` and mounts it with mount(2) directly (we are root; no fusermount). A
successor daemon gets the same fd from the supervisor instead and, since the kernel sends
INIT once per connection, restores the negotiated ``InitParams``; it first asks the
kernel to resend what its predecessor had read and not answered (``resend``).

Stopping: an unmount ends the connection (read returns ENODEV) and the threads return.
A daemon that hands its connection over does not unmount; it exits, and requests its
threads had read but not answered are resent to the successor.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import queue
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable

from pynydus.daemon import fuseproto as P
from pynydus.daemon.fuseops import RafsServer
from pynydus.daemon.instance import Fresh, RafsInstance, ReadPlan
from pynydus.host.mount import MountSpec, mount

log = logging.getLogger(__name__)

FSNAME = "rafs"
# Opcodes (the low byte; the upper three are zero) that need neither an answer nor
# parsing: after a cache drop the kernel sends one FORGET or BATCH_FORGET per few
# evicted inodes, thousands of them, interleaved with the requests a reader waits for.
_UNANSWERED = frozenset({P.FORGET, P.BATCH_FORGET})
# A request longer than this (in practice a BATCH_FORGET: requests are headers and
# names) gives back the pages it was read into beyond it (MADV_DONTNEED): a cache drop's
# batches left 16-68 KiB resident in each of 16 threads' buffers, 0.2-0.7 MB of an idle
# daemon after a walk. Only FORGETs are that long, so the cost is one madvise per batch.
_KEPT_BUFFER = mmap.PAGESIZE
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's; in mmap from Python 3.13
# Workers a session starts with; more start, one at a time up to ``threads``, when a
# worker takes a request while none is left waiting for the next. An idle worker is
# ~35 KB of resident memory (its stack, its frame chunk, its buffer's first page): the
# 12 of 16 an idle daemon never needed were 0.45 MB of its RSS. A successor (takeover)
# starts all of them: its callers' requests are already queued.
_FIRST_WORKERS = 4
_STORE_QUEUE = 256  # misses waiting for their chunks to be stored; more are dropped
# ... of which this many keep the decoded chunks their read fetched (stored from those,
# no read of the cache; ~1 MiB each); the others read them back from the cache
_STORE_KEEPS = 32


def mount_fuse(mountpoint: str, *, fsname: str = FSNAME, subtype: str = FSNAME,
               options: tuple[str, ...] = ("ro", "nosuid", "nodev", "default_permissions",
                                           "allow_other")) -> int:
    """Open ``/dev/fuse`` and mount a FUSE filesystem on ``mountpoint`` served through
    the returned fd (close-on-exec). The kernel sends INIT as the first request."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        mode = os.stat(mountpoint).st_mode
        data = (f"fd={fd}", f"rootmode={stat.S_IFMT(mode):o}", f"user_id={os.geteuid()}",
                f"group_id={os.getegid()}")
        mount(MountSpec(type=f"fuse.{subtype}", source=fsname, options=(*options, *data)),
              mountpoint)
    except BaseException:
        os.close(fd)
        raise
    return fd


class FuseSession:
    """Serves one FUSE connection (``fd``) with ``server`` on ``threads`` threads."""

    def __init__(self, fd: int, server: RafsServer, *, threads: int = 4,
                 on_end: Callable[[], None] | None = None, store_chunks: bool = False) -> None:
        self.fd = fd
        self.server = server
        # after a read that waited for the backend, push the rest of its chunks into the
        # kernel's page cache, so the next reads of them never reach us
        self._stores: queue.SimpleQueue[tuple[int, RafsInstance, ReadPlan, Fresh]] | None = None
        self.threads = max(1, threads)
        self.on_end = on_end
        self.ended = threading.Event()
        # set once the kernel has applied the INIT reply (it does so inside our write):
        # tuning the connection before that (read_ahead_kb) would be undone by it
        self.init_applied = threading.Event()
        if server.params is not None:  # a successor: INIT was answered long ago
            self.init_applied.set()
        self._workers: list[threading.Thread] = []
        self._live = 0  # workers started and not returned
        self._waiting = 0  # workers waiting for a request
        self._lock = threading.Lock()
        self._storing = False
        self._backing_refused = False
        if server.iomodes is not None:
            server.backing_open = self.backing_open
        if store_chunks:
            self._stores = queue.SimpleQueue()  # bounded by _queue_store
            server.store = self._queue_store

    def start(self, first: int = 0,
              run: Callable[[Callable[[], None], str], None] | None = None) -> None:
        """Start the worker threads (daemon threads: a process that exits ends them).

        ``first`` > 0 (a successor taking over, whose callers wait): start that many
        now and the others from a thread of their own, so that neither the caller nor
        the first requests wait for every thread's start (starting 16 while the first
        ones already serve took 0.1-0.4 s, each start waiting for the GIL). ``run(fn,
        name)`` runs those first ones, and the start of the others, on threads started
        in advance instead (``first`` + 1 of them): a thread's start waits for the new
        thread to be scheduled, 10-70 ms on a loaded node."""
        if first <= 0 and run is None:  # a new connection: more workers as requests need
            now = min(_FIRST_WORKERS, self.threads)
            with self._lock:
                self._live = self._waiting = now  # waiting from their start on
            self._spawn(range(now))
            return
        with self._lock:
            self._live = self._waiting = self.threads
        now = min(first, self.threads) if first > 0 else self.threads
        if run is not None:
            for i in range(now):
                run(self._serve, f"fuse-{i}")
        else:
            self._spawn(range(now))
        if now < self.threads:
            rest = range(now, self.threads)
            if run is not None:
                run(lambda: self._spawn(rest), "fuse-spawn")
            else:
                threading.Thread(target=self._spawn, args=(rest,), name="fuse-spawn",
                                 daemon=True).start()

    def _spawn(self, numbers: range) -> None:
        for i in numbers:
            t = threading.Thread(target=self._serve, name=f"fuse-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def _grow(self, number: int) -> None:
        try:
            self._spawn(range(number, number + 1))
        except RuntimeError as err:  # no thread to be had (pids.max): serve with fewer
            with self._lock:
                self._live -= 1
                self._waiting -= 1
            log.warning("FUSE worker %d not started: %s", number, err)

    def _took_request(self, grow: bool) -> int:
        """A worker took a request: the number of the worker to start (counted live and
        waiting from now on) if ``grow`` (the request needs an answer) and none is left
        waiting and fewer than ``threads`` run, else -1."""
        with self._lock:
            self._waiting -= 1
            if (not grow or self._waiting > 0 or self._live >= self.threads
                    or self.server.destroyed):
                return -1
            self._live += 1
            self._waiting += 1
            return self._live - 1

    def resend(self) -> bool:
        """Ask the kernel to resend requests taken but never answered on this connection
        (a dead predecessor's). False if the kernel cannot (before Linux 6.9)."""
        try:
            os.write(self.fd, P.notify_resend())
        except OSError as err:
            log.warning("FUSE_NOTIFY_RESEND failed (%s); requests the previous daemon had "
                        "read are lost and their callers wait until interrupted", err)
            return False
        return True

    def backing_open(self, path: str) -> int:
        """Register ``path`` as a passthrough backing file of this connection; its
        backing id, or 0 when the kernel refuses (logged once: no passthrough then).
        The id belongs to the connection, not to this process: a successor answers
        opens with the ids its predecessor registered."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            log.info("passthrough backing file %s: %s", path, err)
            return 0
        try:
            # a mutable argument: ioctl's return value (the id) comes back
            return fcntl.ioctl(self.fd, P.DEV_IOC_BACKING_OPEN, bytearray(P.backing_map(fd)))
        except OSError as err:
            if not self._backing_refused:
                self._backing_refused = True
                log.warning("the kernel refused a passthrough backing file (%s: %s); files "
                            "are read through the daemon and no more are copied", path, err)
                self.server.passthrough_refused()
            return 0
        finally:
            os.close(fd)

    def backing_close(self, backing: int) -> None:
        """Drop a backing id (files open with it keep their backing file)."""
        try:
            fcntl.ioctl(self.fd, P.DEV_IOC_BACKING_CLOSE, bytearray(P.backing_id(backing)))
        except OSError as err:
            log.debug("closing backing id %d: %s", backing, err)

    def notify(self, message: bytes) -> None:
        """Write a notification (e.g. ``notify_inval_entry``); ENOENT (nothing cached)
        and a connection that is gone are not errors."""
        try:
            os.write(self.fd, message)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENODEV, errno.ENOTCONN):
                raise

    def _queue_store(self, nodeid: int, inst: RafsInstance, plan: ReadPlan, fresh: Fresh) -> None:
        assert self._stores is not None
        if not self._storing:  # started at the first miss: none on a start's path
            with self._lock:
                if not self._storing:
                    self._storing = True
                    threading.Thread(target=self._store_loop, name="fuse-store",
                                     daemon=True).start()
        queued = self._stores.qsize()
        if queued >= _STORE_QUEUE:
            return  # a hint: the reads will come to us instead
        if queued >= _STORE_KEEPS:
            fresh = {}  # a backlog: its chunks are read again when stored, not held here
        self._stores.put((nodeid, inst, plan, fresh))

    def _store_loop(self) -> None:
        """FUSE_NOTIFY_STORE the chunks around each queued miss, minus what the read
        itself returned. A thread of its own: the kernel makes a store wait for pages
        that reads in flight have locked, and those reads need the workers."""
        assert self._stores is not None
        recent: OrderedDict[tuple[int, int], None] = OrderedDict()
        while not self.ended.is_set():
            nodeid, inst, plan, fresh = self._stores.get()
            try:
                start, end = inst.chunk_bounds(plan)
                if (nodeid, start) in recent:
                    continue  # two readers missed one chunk: stored once
                recent[(nodeid, start)] = None
                if len(recent) > 1024:
                    recent.popitem(last=False)
                for a, b in ((start, plan.offset), (plan.end, end)):
                    if b > a:
                        data = inst.chunk_range(plan, fresh, a, b)
                        os.writev(self.fd, [P.notify_store(nodeid, a, len(data)), data])
            except OSError as err:
                if err.errno in (errno.ENODEV, errno.EBADF):
                    return
                log.debug("storing inode %d at %d in the page cache: %s", nodeid, plan.offset, err)
            except Exception as err:  # noqa: BLE001 - a hint; the reads report real errors
                log.debug("storing inode %d at %d in the page cache: %s", nodeid, plan.offset, err)

    def wait(self, timeout: float | None = None) -> bool:
        """True once every worker has returned (the connection ended)."""
        return self.ended.wait(timeout)

    def _buffer_size(self) -> int:
        params = self.server.params
        if params is not None:
            return params.buffer_size
        # before INIT: big enough for any request the negotiated parameters allow
        wants = self.server.wants
        return max(P.MIN_READ_BUFFER, wants.max_pages * 4096 + 4096, wants.max_write + 4096)

    def _serve(self) -> None:
        fd, handle, parse = self.fd, self.server.handle, P.parse_request
        # An anonymous map, not a bytearray (which zero-fills): only the pages requests
        # are read into become resident. 16 threads' 1 MiB buffers were 16 MB of every
        # daemon's memory, though requests are headers and names (replies carry the data).
        # Private: pages it gives back are freed (a shared anonymous map's stay in shmem).
        # No swap reserved for the megabyte requests never reach (a map of its own, too:
        # the kernel does not merge it with the allocator's, so its pages can be told).
        buf = mmap.mmap(-1, self._buffer_size(),
                        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        view = memoryview(buf)
        lock = self._lock
        waiting = True  # counted as waiting by whoever started this worker
        try:
            while True:
                if not waiting:
                    with lock:
                        self._waiting += 1
                waiting = True
                try:
                    n = os.readv(fd, [buf])
                except OSError as err:
                    if err.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue  # interrupted, or a request aborted before we got it
                    with lock:
                        self._waiting -= 1
                    if err.errno != errno.ENODEV:  # ENODEV: unmounted, the normal end
                        log.error("reading /dev/fuse: %s", err)
                    return
                waiting = False
                forget = n >= 8 and view[4] in _UNANSWERED and not view[5] and not view[6] \
                    and not view[7]
                more = self._took_request(grow=not forget)
                if more >= 0:  # started before this request is served: it may be long
                    self._grow(more)
                if forget:
                    if n > _KEPT_BUFFER:
                        buf.madvise(mmap.MADV_DONTNEED, _KEPT_BUFFER, len(buf) - _KEPT_BUFFER)
                    continue  # FORGET, BATCH_FORGET: nothing to answer or to keep
                try:
                    req = parse(view[:n])
                except P.ProtocolError as err:
                    log.error("bad FUSE request: %s", err)
                    continue
                out = handle(req)
                if out is None:
                    continue
                try:
                    os.writev(fd, out)
                except OSError as err:
                    if err.errno == errno.ENODEV:
                        return
                    if err.errno != errno.ENOENT:  # ENOENT: the caller was interrupted
                        log.error("FUSE reply to %s failed: %s", P.opcode_name(req.opcode), err)
                else:
                    if req.opcode == P.INIT:
                        self.init_applied.set()
                if self.server.destroyed:
                    return
        finally:
            view.release()  # the map goes with its last reference
            with self._lock:
                self._live -= 1
                last = self._live == 0
            if last:
                self.ended.set()
                if self.on_end is not None:
                    self.on_end()
