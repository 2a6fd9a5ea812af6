"""pynydusd: the daemon process that owns one FUSE mount and its images.

Life cycle (nydusd's states): INIT while starting, READY once the FUSE mount and
the ``--bootstrap`` image (if any) are in place, RUNNING once the FUSE loop
serves requests. SIGTERM/SIGINT or ``PUT /api/v1/daemon/exit`` stop the loop,
unmount and exit. A mountpoint left behind by a crashed daemon (a dead FUSE
connection) is unmounted before mounting again.

Two FUSE sessions serve the mount: our own (``fuseloop``: worker threads reading
``/dev/fuse``, the default) or pyfuse3's (libfuse3 on trio in the main thread, file
reads in trio's worker threads), chosen with ``PYNYDUSD_FUSE=loop|pyfuse3``. Only our
own can hand its connection to a successor (docs/failover.md). The API and the
prefetch workers have their own threads.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pynydus import __version__
from pynydus.daemon import fuseproto, metrics, prefetchlist, trace
from pynydus.daemon.api import ApiServer
from pynydus.daemon.blobcache import Backend, LocalFsBackend
from pynydus.daemon.config import BackendConfig, NydusdConfig, parse_daemon_config
from pynydus.daemon.fuseloop import FuseSession, mount_fuse
from pynydus.daemon.fuseops import RafsServer
from pynydus.daemon.instance import RafsInstance
from pynydus.daemon.iomode import IoModes
from pynydus.daemon.materialize import Materializer
from pynydus.daemon.metrics import CacheStats
from pynydus.daemon.prefetch import Prefetcher, WireGate
from pynydus.daemon.takeover import (
    DaemonState,
    MountState,
    StateError,
    close_fd,
    request_takeover,
    send_state,
)
from pynydus.daemon.vfs import ROOT_ID, Vfs
from pynydus.errors import (
    FailedPrecondition,
    FormatError,
    InvalidArgument,
    NotFound,
    NotImplementedFeature,
    NydusError,
    Unavailable,
)
from pynydus.host.mount import unmount
from pynydus.host.mountinfo import is_mountpoint
from pynydus.logs import level_of

log = logging.getLogger("pynydusd")


@dataclass(frozen=True)
class DaemonOptions:
    """What the command line asks of a daemon (``main.daemon_options``)."""

    mountpoint: str
    apisock: str = ""
    apisock_group: str = ""  # "": the socket is 0600, for root and our uid only
    bootstrap: str = ""
    config: NydusdConfig | None = None
    daemon_id: str = ""
    supervisor: str = ""
    thread_num: int = 4
    prefetch_files: tuple[str, ...] | None = None
    # "loop" (our own FUSE session) or "pyfuse3" (libfuse3); PYNYDUSD_FUSE overrides
    fuse_session: str = "loop"
    # the text --config was read from (handed to a successor with the state)
    config_text: str = ""
    # --upgrade: start in INIT and take a predecessor's connection over (takeover, start)
    upgrade: bool = False
    failover_policy: str = "resend"
    # --blob-files: the mount shows each blob as a flat file (daemon/blobfs.py), for
    # kernel EROFS mounts of the bootstraps over them, not the RAFS tree
    blob_files: bool = False


def make_backend(cfg: BackendConfig, defer: bool = False) -> Backend:
    """The backend a config names; a registry client is created lazily per image (on
    its own thread at once, or with ``defer`` when warmed or first needed, see
    ``RegistryBackend``)."""
    if cfg.type == "localfs":
        return LocalFsBackend(cfg.localfs.dir, cfg.localfs.blob_file, cfg.localfs.alt_dirs)
    if cfg.type == "registry":
        from pynydus.daemon.registry_backend import RegistryBackend

        return RegistryBackend(cfg.registry, defer=defer)
    raise NotImplementedFeature(f"backend type {cfg.type!r} is not supported")


def import_registry_client() -> None:
    """Import the registry client and what its first client imports (httpcore, which
    httpx imports only when a client is made), in the calling thread. Run by a daemon
    that may serve from a registry before it starts any thread: imported later, on the
    thread that builds the first client, it took 0.5-0.9 s under load while another
    thread waiting on a module being imported (the import lock of that module) or on
    the GIL stalled (the first chunk miss, a takeover's restore). A daemon whose config
    names another backend never imports it (~16 MB of RSS, httpx and ssl)."""
    import pynydus.daemon.registry_backend
    import pynydus.registry.client  # noqa: F401


# Seconds a successor waits before building its images' registry clients (see _restore).
_SUCCESSOR_CLIENT_DEFER = 2.0
# Worker threads a successor starts before it answers start (parked in advance, see
# Parked); the others start behind.
_SUCCESSOR_FIRST_WORKERS = 2


class Parked:
    """Threads started in advance that each wait to run one function: a spare's first
    FUSE workers, so that its takeover does not wait for threads to be scheduled."""

    def __init__(self, n: int) -> None:
        self._work: queue.SimpleQueue[tuple[Callable[[], None], str] | None] = queue.SimpleQueue()
        self._n = n
        for i in range(n):
            threading.Thread(target=self._wait, name=f"parked-{i}", daemon=True).start()

    def _wait(self) -> None:
        item = self._work.get()
        if item is not None:
            fn, name = item
            threading.current_thread().name = name
            fn()

    def run(self, fn: Callable[[], None], name: str) -> None:
        self._work.put((fn, name))

    def close(self) -> None:
        for _ in range(self._n):
            self._work.put(None)


class MemoryTrimmer:
    """Give memory freed by unmounted images back to the system, once things are quiet.

    An image's instance leaves free but resident heap behind (malloc keeps freed
    memory of its arenas, one per thread that allocated): the shared daemon grew by
    ~60 KB per image mounted and removed. ``request()`` schedules, ``delay`` seconds
    later and once for any number of requests meanwhile, a collection and
    ``malloc_trim(0)``, which hands free pages of every arena back, and logs the RSS.

    What stays after that is bounded by how many images were mounted at once, not by
    how many ever were (measured: ~27 KB per image of the peak, flat over cycles;
    docs/benchmarks.md, "Churn and scale"): the images' objects are gone (the live
    Python heap is back within a few KB), but pymalloc returns an arena (1 MiB) only
    when every object in it is freed, and keeps the emptied 16 KiB pools of the others
    resident; glibc keeps partly used pages the same way (PYTHONMALLOC=malloc measured
    no better). Anything a cache keeps from that time pins an arena: the API does not
    use urlsplit, whose cache kept the last 128 mount URLs."""

    def __init__(self, delay: float = 1.0) -> None:
        self.delay = delay
        self._lock = threading.Lock()
        self._pending = False
        self.trims = 0

    def request(self) -> None:
        with self._lock:
            if self._pending:
                return
            self._pending = True
        t = threading.Timer(self.delay, self._trim)
        t.daemon = True
        t.name = "memory-trim"
        t.start()

    def _trim(self) -> None:
        with self._lock:
            self._pending = False
        import gc

        from pynydus.host.libc import LIBC

        gc.collect()
        trim = getattr(LIBC, "malloc_trim", None)
        if trim is None:  # not glibc
            return
        trim(0)
        self.trims += 1
        from pynydus.host.proc import rss_kib

        log.info("memory trimmed after unmounts: RSS %d KiB", rss_kib(os.getpid()))


# The kernel's readahead window for our mount. The default (128 KiB) makes the kernel
# ask in 64 KiB pieces; 1 MiB gives chunk-sized requests (max_pages 256), one at a time
# ahead of a sequential reader; 4 MiB keeps four in flight for the workers, so the
# round trips overlap (warm sequential after a cache drop +7-30 % in three runs at
# load 9-21). 8 MiB measured no better, and a page fault in a mapped file reads the
# whole window around it (docs/benchmarks.md, "Warm sequential reads after a cache drop").
READAHEAD_KB = 4096


def tune_readahead(mountpoint: str, kb: int) -> None:
    """Set read_ahead_kb of the FUSE connection's bdi (found via mountinfo, since a
    stat of the mountpoint would wait for the loop that is not running yet)."""
    from pynydus.host.mountinfo import read_mountinfo

    for entry in reversed(read_mountinfo()):
        if entry.mountpoint == mountpoint and entry.device:
            try:
                with open(f"/sys/class/bdi/{entry.device}/read_ahead_kb", "w") as f:
                    f.write(str(kb))
            except OSError as err:
                log.info("cannot set read_ahead_kb of %s: %s", mountpoint, err)
            return


def clean_stale_mountpoint(path: str) -> None:
    """Unmount whatever a dead daemon left at ``path`` (ENOTCONN on access)."""
    if is_mountpoint(path):
        log.warning("mountpoint %s is still mounted (stale daemon?); unmounting it", path)
        try:
            unmount(path)
        except OSError:
            unmount(path, lazy=True)


class Daemon:
    """The controller behind the API and the FUSE session."""

    def __init__(self, opts: DaemonOptions) -> None:
        self.opts = opts
        self.state = "INIT"
        self.vfs = Vfs()
        self.cache_stats = CacheStats()
        self.api: ApiServer | None = None
        self.started = time.time()
        self.mounts_info: dict[str, dict[str, Any]] = {}
        self.auth_overrides: dict[str, str] = {}
        self.trimmer = MemoryTrimmer()
        self.prefetcher: Prefetcher | None = None
        self._lock = threading.Lock()
        # our own session
        self.server: RafsServer | None = None
        self.session: FuseSession | None = None
        self.fuse_fd = -1
        self.fuse_mountpoint = ""
        self._stop = threading.Event()
        # the supervisor holds our connection (sendfd done): exit leaves the mount to it
        self.handed_over = False
        self._keep_mount = False
        self._flush_resent = False
        self.daemon_id = opts.daemon_id
        self.supervisor = opts.supervisor  # a takeover may name another
        # a successor's takeover: when each step ended (CLOCK_MONOTONIC, comparable with
        # the manager's and a benchmark's clocks): request, state_received, restored,
        # resent, serving
        self.timeline: dict[str, float] = {}
        self._parked: Parked | None = None  # a spare's first FUSE workers
        # the pyfuse3 session
        self.fs: Any = None
        self.trio_token: Any = None

    @property
    def inflight(self) -> dict[int, tuple[int, str, float]]:
        """FUSE requests waiting for the backend (for metrics and the prefetcher)."""
        if self.server is not None:
            return self.server.inflight
        if self.fs is not None:
            inflight: dict[int, tuple[int, str, float]] = self.fs.inflight
            return inflight
        return {}

    # --- setup ------------------------------------------------------------------------

    def _instance(self, bootstrap: str, cfg: NydusdConfig, defer: bool = False) -> RafsInstance:
        if not os.path.isfile(bootstrap):
            raise NotFound(f"bootstrap {bootstrap} does not exist")
        # the gate lets a prefetch list wait for the image's foreground requests
        inst = RafsInstance(bootstrap, cfg, WireGate(make_backend(cfg.backend, defer)),
                            self.cache_stats)
        if not defer:  # a successor's first reads go first; its maps load as they need them
            inst.load_span_maps()
        return inst

    def _start_prefetch(self, inst: RafsInstance, files: list[str] | None) -> None:
        p = inst.config.rafs.prefetch
        if not p.enable and files is None:
            return
        if self.prefetcher is None:
            self.prefetcher = Prefetcher(p.threads, p.bandwidth_limit,
                                         busy=lambda: bool(self.inflight))
        self.prefetcher.submit(inst, files, p.prefetch_all and p.enable)

    @property
    def enable_xattr(self) -> bool:
        if self.vfs.dedicated is not None:  # also a successor's, restored from the state
            return self.vfs.dedicated.config.rafs.enable_xattr
        return self.opts.config.rafs.enable_xattr if self.opts.config else True

    def make_fs(self) -> Any:
        """The pyfuse3 operations, sized by --thread-num, with the config's enable_xattr."""
        from pynydus.daemon.fusefs import RafsFs

        return RafsFs(self.vfs, thread_num=self.opts.thread_num, enable_xattr=self.enable_xattr)

    def session_threads(self) -> int:
        """Worker threads of our session: each may wait for the backend on a cold read,
        so as many as pyfuse3 allowed reads in flight (4 per --thread-num, at least 16)."""
        return max(self.opts.thread_num, 4) * 4

    def _new_session(self, fd: int) -> FuseSession:
        assert self.server is not None
        return FuseSession(fd, self.server, threads=self.session_threads(),
                           on_end=self._stop.set,
                           store_chunks=True)

    def run(self) -> int:
        """Mount, serve until told to stop, unmount. Returns the exit code."""
        cfg = self.opts.config
        # a shared daemon (no config) and a successor may be handed registry images
        if cfg is None or cfg.backend.type == "registry" or self.opts.upgrade:
            import_registry_client()
        if self.opts.upgrade:
            return self._run_successor()
        mp = os.path.abspath(self.opts.mountpoint)
        clean_stale_mountpoint(mp)  # before mkdir: a dead FUSE mount cannot even be stat'ed
        os.makedirs(mp, exist_ok=True)
        if self.opts.apisock:
            self.api = ApiServer(self.opts.apisock, self, group=self.opts.apisock_group)
            self.api.start()
        try:
            if self.opts.bootstrap:
                if self.opts.config is None:
                    raise InvalidArgument("--bootstrap needs --config")
                inst = self._instance(self.opts.bootstrap, self.opts.config)
                self.vfs.dedicated = inst
                self.mounts_info["/"] = {"source": self.opts.bootstrap, "mounted_time": time.time(),
                                         "config": self.opts.config_text, "slot": 0}
            if self.opts.fuse_session == "pyfuse3":
                self._run_pyfuse3(mp)
            else:
                self._run_loop(mp)
        finally:
            self.state = "STOPPED"
            if self.prefetcher:
                self.prefetcher.stop()
            self._stop_materializing()
            for inst in self.vfs.instances():
                inst.close()
            if self.api:
                self.api.close()
        log.info("stopped")
        return 0

    # --- our own session ------------------------------------------------------------------

    def _run_loop(self, mp: str) -> None:
        if self.opts.blob_files:
            from pynydus.daemon.blobfs import BlobFileServer

            self.server = BlobFileServer(self.vfs)
        else:
            offer = self._offer_passthrough()
            self.server = RafsServer(self.vfs, enable_xattr=self.enable_xattr,
                                     wants=fuseproto.PASSTHROUGH_WANTS if offer else None)
            if offer:
                self._equip_passthrough(IoModes.new())
        self.fuse_fd = mount_fuse(mp)
        self.fuse_mountpoint = mp
        try:
            self.session = self._new_session(self.fuse_fd)
            self.state = "READY"
            if self.vfs.dedicated is not None:
                self._start_prefetch(self.vfs.dedicated,
                                     list(self.opts.prefetch_files) if self.opts.prefetch_files else None)
            self.session.start()
            self.state = "RUNNING"
            log.info("pynydusd %s serving %s", __version__, self.opts.mountpoint)
            threading.Thread(target=self._tune_after_init, args=(mp,), name="readahead",
                             daemon=True).start()
            self._wait_for_stop()
        finally:
            self._unmount(mp)

    def _offer_passthrough(self) -> bool:
        """INIT offers passthrough unless the daemon's one image turns it off (a shared
        daemon's images each decide for their files). The blob-file mount never does:
        the kernel's EROFS above its files and containerd's overlay above that would
        exceed the kernel's stack depth of 2."""
        cfg = self.opts.config
        return cfg is None or cfg.rafs.passthrough

    def _equip_passthrough(self, table: IoModes) -> None:
        assert self.server is not None
        self.server.iomodes = table
        self.server.materializer = Materializer()

    def _stop_materializing(self) -> None:
        if self.server is not None and self.server.materializer is not None:
            self.server.materializer.close()

    def _wait_for_stop(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("signal %d: unmounting and exiting", signum)
            self._stop.set()

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _tune_after_init(self, mp: str) -> None:
        # INIT sets the window to what the kernel offered; raise it once the kernel has
        # applied our INIT reply (the server's "initialized" comes before the reply is
        # written, and a window set in between was reset to 128 KiB)
        if self.session is not None and self.session.init_applied.wait(30):
            tune_readahead(mp, READAHEAD_KB)
            self._push_state("started")

    def _unmount(self, mp: str) -> None:
        """End the mount: unmount (lazily if busy) and close our fd, which ends the
        connection once nothing uses the mount. After ``exit`` of a daemon whose
        supervisor holds the connection, leave the mount to the successor instead."""
        if self.fuse_fd < 0:
            return
        if self._keep_mount:
            log.info("leaving %s mounted: the supervisor holds the connection", mp)
            logging.shutdown()
            # no cleanup that could fail a request on its way: the successor resends
            # whatever our threads had read and not answered
            os._exit(0)
        try:
            unmount(mp)
        except OSError:
            try:
                unmount(mp, lazy=True)
            except OSError as err:
                log.warning("cannot unmount %s: %s", mp, err)
        if self.session is not None:
            self.session.wait(2.0)
        os.close(self.fuse_fd)
        self.fuse_fd = -1

    # --- failover: hand-over to the supervisor and takeover by a successor ------------------

    def state_value(self) -> DaemonState:
        """What a successor needs to serve our connection (see takeover.py)."""
        if self.server is None or self.server.params is None:
            raise Unavailable(f"daemon is {self.state}: no FUSE connection to hand over yet")
        with self._lock:
            mounts = []
            for mp, info in sorted(self.mounts_info.items()):
                if mp == "/":
                    slot = 0
                else:
                    hit = self.vfs.slot_by_name(self._name(mp))
                    if hit is None:
                        continue
                    slot = hit[0]
                mounts.append(MountState(mountpoint=mp, slot=slot, source=info["source"],
                                         config=info.get("config", ""),
                                         mounted_time=info["mounted_time"]))
            return DaemonState(daemon_id=self.daemon_id, mountpoint=self.fuse_mountpoint,
                               init=self.server.params, next_slot=self.vfs.next_slot,
                               mounts=tuple(mounts), failover_policy=self.opts.failover_policy)

    def send_fd(self) -> None:
        """``PUT /api/v1/daemon/fuse/sendfd``: give the supervisor our connection and state."""
        if not self.supervisor:
            raise FailedPrecondition("no --supervisor to send the FUSE connection to")
        if self.session is None or self.fuse_fd < 0:
            raise FailedPrecondition(f"daemon is {self.state} without a FUSE connection of its "
                                     f"own to send (pyfuse3 sessions cannot be handed over)")
        state = self.state_value()
        table = self.server.iomodes if self.server is not None else None
        try:
            send_state(self.supervisor, state, self.fuse_fd,
                       table_fd=table.fd if table is not None else -1)
        except (OSError, EOFError) as err:
            raise Unavailable(f"sending the FUSE connection to {self.supervisor}: {err}") from err
        self.handed_over = True
        log.debug("state (%d mounts) and FUSE fd sent to %s", len(state.mounts), self.supervisor)

    def _push_state(self, why: str) -> None:
        """Keep the supervisor's copy current (after start and every mount change)."""
        if not self.supervisor or self.session is None:
            return
        try:
            self.send_fd()
        except NydusError as err:
            log.warning("state not sent to the supervisor (%s): %s", why, err)

    def takeover(self, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """``PUT /api/v1/daemon/fuse/takeover`` (``--upgrade`` only): get the connection and
        state from the supervisor and restore the images; INIT -> READY. On failure the
        daemon stays in INIT and holds nothing (the supervisor falls back to a restart).

        An optional body ``{"supervisor": path, "id": daemon id}`` (our extension; upstream
        sends none) names whose connection to take, so that a spare started in advance
        can succeed any daemon. With ``"start": true`` in it the daemon also starts
        (resend, serve: READY -> RUNNING) before answering, which saves the failover a
        second API call, and the answer is ``{"timeline": {...}}``: the CLOCK_MONOTONIC
        time at which each step ended (see ``timeline``)."""
        self.timeline = {"request": time.monotonic()}
        if not self.opts.upgrade:
            raise FailedPrecondition("takeover needs a daemon started with --upgrade")
        body = body or {}
        supervisor = str(body.get("supervisor") or self.supervisor)
        wanted = str(body.get("id") or self.opts.daemon_id)
        if not supervisor:
            raise FailedPrecondition("takeover needs --supervisor (or a supervisor in the body)")
        with self._lock:
            if self.state != "INIT":
                raise FailedPrecondition(f"daemon is {self.state}: takeover happens once, in INIT")
            try:
                blob, fd, table_fd = request_takeover(supervisor, wanted)
            except (OSError, EOFError) as err:
                raise Unavailable(f"takeover from {supervisor}: {err}") from err
            self.timeline["state_received"] = time.monotonic()
            try:
                if fd < 0:
                    raise StateError("the supervisor holds no FUSE connection for us")
                state = DaemonState.decode(blob)
                mine = self.opts.mountpoint and os.path.abspath(self.opts.mountpoint)
                if mine and mine != state.mountpoint:
                    raise StateError(f"the state is for {state.mountpoint}, this daemon was "
                                     f"started for {mine}")
                self._restore(state)
                taken, table_fd = table_fd, -1  # _adopt_table owns it from here
                table = self._adopt_table(state, taken)
            except BaseException as err:
                if fd >= 0:
                    os.close(fd)
                close_fd(table_fd)
                for inst in self.vfs.instances():
                    inst.close()
                self.vfs = Vfs()
                self.mounts_info.clear()
                if isinstance(err, (StateError, NydusError)):
                    raise FailedPrecondition(f"takeover state refused: {err}") from err
                raise
            self.fuse_fd = fd
            self.fuse_mountpoint = state.mountpoint
            self.daemon_id = state.daemon_id
            self.supervisor = supervisor
            self.handed_over = True  # the supervisor holds the connection too
            self.server = RafsServer(self.vfs, enable_xattr=self.enable_xattr, params=state.init)
            if table is not None:
                self._equip_passthrough(table)
            self.session = self._new_session(fd)
            self._flush_resent = self.opts.failover_policy == "flush"
            self.state = "READY"
            self.timeline["restored"] = time.monotonic()
        log.info("took over %s (daemon %s, %d images, FUSE 7.%d)", state.mountpoint,
                 state.daemon_id, len(state.mounts), state.init.minor)
        if not body.get("start"):
            return None
        self.start()
        return {"timeline": dict(self.timeline)}

    @staticmethod
    def _adopt_table(state: DaemonState, table_fd: int) -> IoModes | None:
        """The open-mode table a passthrough connection's predecessor left (the fd is
        taken). Without one the successor cannot tell which inodes are open cached, and
        makes none newly eligible (``IoModes.blind_table``)."""
        if not state.init.has(fuseproto.PASSTHROUGH):
            close_fd(table_fd)
            return None
        if table_fd < 0:
            log.warning("takeover: no open-mode table came with a passthrough connection; "
                        "no file becomes newly passthrough")
            return IoModes.blind_table()
        try:
            return IoModes.adopt(table_fd)
        except (OSError, ValueError) as err:
            raise StateError(f"the open-mode table: {err}") from err

    def _restore(self, state: DaemonState) -> None:
        for m in state.mounts:
            cfg, warnings = parse_daemon_config(m.config, f"takeover of {m.mountpoint} config")
            for w in warnings:
                log.debug("%s", w)
            # the registry client is built once the first reads are served (~0.15 s
            # of CPU and the GIL otherwise taken from them), or when a read misses
            inst = self._instance(m.source, cfg, defer=True)
            if m.slot == 0:
                self.vfs.dedicated = inst
            else:
                self.vfs.add(self._name(m.mountpoint), inst, slot=m.slot)
            self.mounts_info[m.mountpoint] = {"source": m.source, "mounted_time": m.mounted_time,
                                              "config": m.config, "slot": m.slot}
        self.vfs.next_slot = state.next_slot

    def _run_successor(self) -> int:
        """``--upgrade``: serve the API in INIT until takeover and start, then serve the
        connection taken over until stopped."""
        if not self.opts.apisock:
            raise InvalidArgument("--upgrade needs --apisock (takeover comes through the API)")
        # the first workers, the start of the others, the registry clients' build
        self._parked = Parked(_SUCCESSOR_FIRST_WORKERS + 2)
        self.api = ApiServer(self.opts.apisock, self, group=self.opts.apisock_group)
        self.api.start()
        log.info("pynydusd %s waiting for takeover (supervisor %s)", __version__,
                 self.supervisor or "named by the takeover")
        try:
            self._wait_for_stop()
        finally:
            self.state = "STOPPED"
            if self._parked is not None:
                self._parked.close()
            self._stop_materializing()
            if self.fuse_fd >= 0:
                self._unmount(self.fuse_mountpoint)
            if self.prefetcher:
                self.prefetcher.stop()
            for inst in self.vfs.instances():
                inst.close()
            self.api.close()
        log.info("stopped")
        return 0

    # --- the pyfuse3 session --------------------------------------------------------------

    def _run_pyfuse3(self, mp: str) -> None:
        import pyfuse3
        import trio

        self.fs = self.make_fs()
        options = {"fsname=rafs", "subtype=rafs", "ro", "default_permissions", "allow_other"}
        pyfuse3.init(self.fs, mp, options)
        try:
            self.state = "READY"
            if self.vfs.dedicated is not None:
                self._start_prefetch(self.vfs.dedicated,
                                     list(self.opts.prefetch_files) if self.opts.prefetch_files else None)
            trio.run(self._main)
        finally:
            # pyfuse3.close() without a successful init() dereferences a NULL session
            # and kills the process with SIGSEGV, so only close what was opened.
            try:
                pyfuse3.close(unmount=True)
            except Exception:
                log.exception("closing the FUSE session")

    async def _main(self) -> None:
        import pyfuse3
        import trio

        self.trio_token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals, nursery.cancel_scope)
            nursery.start_soon(self._tune_readahead)
            self.state = "RUNNING"
            log.info("pynydusd %s serving %s (pyfuse3)", __version__, self.opts.mountpoint)
            await pyfuse3.main(min_tasks=max(2, self.opts.thread_num), max_tasks=256)
            nursery.cancel_scope.cancel()

    async def _tune_readahead(self) -> None:
        import trio

        # FUSE_INIT (answered by the loop) resets the window to what libfuse negotiated,
        # so set it once the loop has run, and once more in case INIT came late.
        for delay in (0.05, 0.5):
            await trio.sleep(delay)
            await trio.to_thread.run_sync(tune_readahead, os.path.abspath(self.opts.mountpoint),
                                          READAHEAD_KB)

    async def _signals(self, scope: Any) -> None:
        import pyfuse3
        import trio

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting and exiting", signum)
                pyfuse3.terminate()
                return

    # --- Controller (API) -----------------------------------------------------------------

    def daemon_info(self) -> dict[str, Any]:
        collection = {}
        for mp, info in self.mounts_info.items():
            inst = self._inst_for(mp)
            collection[mp] = {"backend_type": "Rafs", "mountpoint": mp,
                              "mounted_time": _offset_datetime(info["mounted_time"]),
                              "config": inst.config.redacted() if inst else None}
        return {
            "version": {"package_ver": __version__, "git_commit": f"pynydus-{__version__}",
                        "build_time": "", "profile": "release", "rustc": "python"},
            "id": self.daemon_id or None,
            "supervisor": self.supervisor or None,
            "state": self.state,
            "backend_collection": collection,
        }

    def set_log_level(self, level: str) -> None:
        try:
            logging.getLogger().setLevel(level_of(level))
        except ValueError as err:
            raise InvalidArgument(f"log_level: {err}") from None

    def exit(self) -> None:
        """Stop and exit. A daemon whose supervisor holds its connection leaves the mount
        in place for a successor (nydusd: Running -Stop-> Ready -Exit-> Die, no umount);
        any other unmounts, as on SIGTERM."""
        if self.handed_over and self.session is not None:
            self._keep_mount = True
            self._stop.set()
            return
        if self.fs is not None and self.trio_token is not None:
            import pyfuse3
            import trio

            trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self.trio_token)
            return
        if self.server is None:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._stop.set()

    def start(self) -> None:
        """READY -> RUNNING. After a takeover: ask the kernel to resend what the
        predecessor had read and not answered, then serve."""
        with self._lock:
            if self.state not in ("READY", "RUNNING"):
                raise Unavailable(f"daemon is {self.state}, cannot start")
            if self.state == "RUNNING" or self.session is None or not self.opts.upgrade:
                return
            assert self.server is not None
            if self._flush_resent:
                self.server.fail_resent = True
            resent = self.session.resend()
            self.timeline["resent"] = time.monotonic()
            parked, self._parked = self._parked, None
            self.session.start(first=_SUCCESSOR_FIRST_WORKERS,
                               run=parked.run if parked is not None else None)
            self.state = "RUNNING"
            self.timeline["serving"] = time.monotonic()
            if parked is not None:
                parked.run(self._warm_backends, "warm-backends")
            else:
                threading.Thread(target=self._warm_backends, name="warm-backends",
                                 daemon=True).start()
        log.info("serving %s (resend %s)", self.fuse_mountpoint,
                 "requested" if resent else "unavailable")

    def _warm_backends(self) -> None:
        """A successor's: build its images' registry clients once the first reads are
        served (see ``_restore``)."""
        if self._stop.wait(_SUCCESSOR_CLIENT_DEFER):
            return
        for inst in self.vfs.instances():
            warm = getattr(inst.backend, "warm", None)
            if warm is not None:
                warm()

    @staticmethod
    def _name(mountpoint: str) -> bytes:
        name = mountpoint.strip("/")
        if not name or "/" in name:
            raise InvalidArgument(f"mountpoint {mountpoint!r}: expected one path component like /<id>")
        return name.encode()

    def _inst_for(self, mountpoint: str) -> RafsInstance | None:
        if mountpoint in ("/", "") and self.vfs.dedicated is not None:
            return self.vfs.dedicated
        try:
            hit = self.vfs.slot_by_name(self._name(mountpoint))
        except InvalidArgument:
            return None
        return hit[1] if hit else None

    def mount(self, mountpoint: str, body: dict[str, Any]) -> None:
        if self.vfs.dedicated is not None:
            raise InvalidArgument("this daemon serves one image at its root (--bootstrap); "
                                  "start it without --bootstrap for API mounts")
        if body.get("fs_type", "rafs") != "rafs":
            raise NotImplementedFeature(f"fs_type {body.get('fs_type')!r}: only rafs is supported")
        source = body.get("source")
        if not isinstance(source, str) or not source:
            raise InvalidArgument("source: expected the bootstrap path")
        config_text = body.get("config")
        if not isinstance(config_text, str):
            raise InvalidArgument("config: expected the daemon config as a JSON string")
        cfg, warnings = parse_daemon_config(config_text, f"mount {mountpoint} config")
        for w in warnings:
            log.warning("%s", w)
        name = self._name(mountpoint)
        inst = self._instance(source, cfg)
        try:
            self.vfs.add(name, inst)
        except BaseException:
            inst.close()
            raise
        with self._lock:
            self.mounts_info[mountpoint] = {"source": source, "mounted_time": time.time(),
                                            "config": config_text}
        self._push_state(f"mount {mountpoint}")
        files = body.get("prefetch_files")
        self._start_prefetch(inst, list(files) if isinstance(files, list) else None)
        log.info("mounted %s at %s", source, mountpoint)

    def prefetch_list(self, mountpoint: str, body: dict[str, Any]) -> None:
        """Prefetch the image at ``mountpoint`` in the order of a prefetch list (the
        JSON document of ``daemon.prefetchlist``), limited by its config's prefetch
        bandwidth; returns at once. Its blobs the image lacks are skipped."""
        inst = self._inst_for(mountpoint)
        if inst is None:
            raise NotFound(f"no image mounted at {mountpoint}")
        try:
            plist = prefetchlist.parse(json.dumps(body).encode(), f"prefetch list for {mountpoint}")
        except FormatError as err:
            raise InvalidArgument(str(err)) from err
        p = inst.config.rafs.prefetch
        with self._lock:
            if self.prefetcher is None:
                self.prefetcher = Prefetcher(p.threads, p.bandwidth_limit,
                                             busy=lambda: bool(self.inflight))
        self.prefetcher.submit_list(inst, plist)
        log.info("prefetching %s from a list: %d chunk runs, %d bytes", mountpoint,
                 len(plist.ranges), plist.compressed_bytes)

    def remount(self, mountpoint: str, body: dict[str, Any]) -> None:
        self.umount(mountpoint)
        self.mount(mountpoint, body)

    def umount(self, mountpoint: str) -> None:
        name = self._name(mountpoint)
        slot, inst = self.vfs.remove(name)
        with self._lock:
            self.mounts_info.pop(mountpoint, None)
        if self.server is not None:
            for backing in self.server.forget_image(slot, inst):
                if self.session is not None:
                    self.session.backing_close(backing)
        self._push_state(f"umount {mountpoint}")
        try:
            if self.session is not None:
                self.session.notify(fuseproto.notify_inval_entry(ROOT_ID, name))
            elif self.fs is not None:
                import pyfuse3

                pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name, ignore_enoent=True)
        except Exception as err:  # noqa: BLE001 - best effort: the kernel finds ENOENT anyway
            log.debug("invalidate %s: %s", mountpoint, err)
        inst.close()
        log.info("unmounted %s", mountpoint)
        self.trimmer.request()  # its log line comes after this one

    def _instances_for(self, sid: str | None) -> list[RafsInstance]:
        if sid:
            inst = self._inst_for(sid)
            if inst is None:
                raise NotFound(f"no image mounted at {sid}")
            return [inst]
        return self.vfs.instances()

    def metrics(self, kind: str, sid: str | None, query: dict[str, str]) -> Any:
        instances = self._instances_for(sid)
        if kind == "fs":
            return metrics.fs_json((i.fs_stats for i in instances), access_pattern_enabled=True)
        if kind == "backend":
            return metrics.backend_json(self.cache_stats,
                                        instances[0].config.backend.type if instances else "")
        if kind == "blobcache":
            out = metrics.blobcache_json(
                self.cache_stats,
                underlying_files=[f for i in instances for f in i.underlying_files()],
                store_path=instances[0].config.cache.work_dir if instances else "",
                entries=sum(len(i.bs.blobs) for i in instances),
                all_ready=bool(instances) and all(i.all_cached() for i in instances),
                prefetch=self.prefetcher)
            # ours: files being copied for passthrough (a benchmark waits for 0), and
            # how many were since start
            mat = self.server.materializer if self.server is not None else None
            out["materialize_pending"] = mat.pending if mat is not None else 0
            out["materialized_files"] = mat.done if mat is not None else 0
            return out
        if kind == "inflight":
            return metrics.inflight_json(self.inflight)
        if kind in ("files", "pattern", "trace"):
            return self._trace_metrics(kind, instances, query)
        raise metrics.unknown(kind)

    @staticmethod
    def _trace_metrics(kind: str, instances: list[RafsInstance], query: dict[str, str]) -> Any:
        """The access trace of the one image asked for (``?id=``; the only image without
        it, as nydusd answers): ``files`` (``latest=true``: inodes read since the last such
        query, as ``[[start, end], ...]``), ``pattern``, ``trace``."""
        if not instances:
            return {"truncated": False, "files": [], "chunks": []} if kind == "trace" else []
        if len(instances) > 1:
            raise InvalidArgument(f"metrics/{kind}: {len(instances)} images are mounted; "
                                  f"name one with ?id=/<mountpoint>")
        inst = instances[0]
        paths = functools.partial(trace.paths_of, inst.bs.walk())
        if kind == "pattern":
            return trace.pattern_json(inst.trace)
        if kind == "files":
            if query.get("latest", "").lower() in ("true", "1"):
                return trace.ino_ranges(inst.trace.take_latest())
            return trace.files_json(inst.trace, paths)
        return trace.trace_json(inst.trace, [b.blob_id for b in inst.bs.blobs], paths)

    def prometheus(self) -> bytes:
        return metrics.prometheus_text(metrics.DaemonSnapshot(
            state=self.state, started=self.started, cache=self.cache_stats,
            fs=[i.fs_stats for i in self.vfs.instances()],
            inflight=len(self.inflight)))

    def get_config(self, sid: str | None) -> dict[str, Any]:
        return {"registry_auth": "<redacted>" if self.auth_overrides else ""}

    def update_config(self, sid: str | None, values: dict[str, Any]) -> None:
        """nydusd's hot credential update: ``registry_auth`` (base64 of user:password),
        or pynydusd's ``registry_token`` (a bearer token used as-is, which nydusd cannot
        take at run time); the backends of the image(s) drop the tokens they hold."""
        allowed = {"registry_auth", "registry_token", "proxy_url", "dragonfly_scheduler_endpoint"}
        unknown = set(values) - allowed
        if unknown:
            raise InvalidArgument(f"config keys {sorted(unknown)} cannot be changed at run time")
        auth, token = values.get("registry_auth"), values.get("registry_token")
        if auth is None and token is None:
            return
        if auth is not None and token is not None:
            raise InvalidArgument("registry_auth and registry_token: give one of them")
        if not isinstance(auth if token is None else token, str) or token == "":
            raise InvalidArgument("registry_auth / registry_token: want a non-empty string")
        from pynydus.registry.credentials import Credentials  # httpx: not at start-up

        # checked before any backend takes it: a bad value changes nothing
        creds = Credentials(registry_token=token) if token is not None else \
            Credentials.from_auth_string(str(auth))
        for inst in self._instances_for(sid):
            backend = inst.backend
            if hasattr(backend, "update_auth"):
                backend.update_auth(creds)
        self.auth_overrides[sid or "/"] = "set"

    def backend_info(self, mountpoint: str) -> dict[str, Any]:
        inst = self._inst_for(mountpoint)
        if inst is None:
            raise NotFound(f"no image mounted at {mountpoint}")
        bs = inst.bs
        return {"version": bs.version, "root_ino": bs.root_ino, "block_size": bs.block_size,
                "chunk_size": bs.chunk_size, "flags": bs.flags, "inodes_count": bs.inode_count,
                "blobs": [b.blob_id for b in bs.blobs]}


def _offset_datetime(ts: float) -> str:
    """``ts`` as nydusd writes a mount's time (the Rust time crate's human-readable
    OffsetDateTime, in UTC): ``2026-12-07 05:36:07.183990879 +00:00:00``."""
    whole = int(ts)
    nanos = round((ts - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    day = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole))
    return f"{day}.{nanos:09d} +00:00:00"


def load_config_file(path: str) -> NydusdConfig:
    from pynydus.daemon.config import load_daemon_config

    cfg, warnings = load_daemon_config(path)
    for w in warnings:
        log.warning("%s", w)
    return cfg


def config_file_text(path: str) -> str:
    """The text of a config file already loaded (for the takeover state)."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def localfs_config_text(directory: str) -> str:
    return json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": directory}},
                                  "cache": {"type": "blobcache", "config": {"work_dir": directory}}},
                       "enable_xattr": True})


def localfs_config(directory: str) -> NydusdConfig:
    """``--localfs-dir``: localfs backend and blob cache in one directory."""
    cfg, _ = parse_daemon_config(localfs_config_text(directory), "--localfs-dir")
    return replace(cfg)
