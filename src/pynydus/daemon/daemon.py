"""pynydusd: the daemon process that owns one FUSE mount and its images.

Life cycle (nydusd's states): INIT while starting, READY once the FUSE mount and
the ``--bootstrap`` image (if any) are in place, RUNNING once the FUSE loop
serves requests. SIGTERM/SIGINT or ``PUT /api/v1/daemon/exit`` stop the loop,
unmount and exit. A mountpoint left behind by a crashed daemon (a dead FUSE
connection) is unmounted before mounting again.

Threads: the FUSE loop runs on trio in the main thread; file reads run in trio's
worker threads; the API and the prefetch workers have their own threads.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import pyfuse3
import trio

from pynydus import __version__
from pynydus.daemon import metrics, prefetchlist, trace
from pynydus.daemon.api import ApiServer
from pynydus.daemon.blobcache import Backend, LocalFsBackend
from pynydus.daemon.config import BackendConfig, NydusdConfig, parse_daemon_config
from pynydus.daemon.fusefs import RafsFs, Vfs
from pynydus.daemon.instance import RafsInstance
from pynydus.daemon.metrics import CacheStats
from pynydus.daemon.prefetch import Prefetcher
from pynydus.errors import (
    FormatError,
    InvalidArgument,
    NotFound,
    NotImplementedFeature,
    Unavailable,
)
from pynydus.host.mount import unmount
from pynydus.host.mountinfo import is_mountpoint
from pynydus.logs import level_of

log = logging.getLogger("pynydusd")


@dataclass(frozen=True)
class DaemonOptions:
    mountpoint: str
    apisock: str = ""
    apisock_group: str = ""  # "": the socket is 0600, for root and our uid only
    bootstrap: str = ""
    config: NydusdConfig | None = None
    daemon_id: str = ""
    supervisor: str = ""
    thread_num: int = 4
    prefetch_files: tuple[str, ...] | None = None


def make_backend(cfg: BackendConfig) -> Backend:
    """The backend a config names; a registry client is created lazily per image."""
    if cfg.type == "localfs":
        return LocalFsBackend(cfg.localfs.dir, cfg.localfs.blob_file, cfg.localfs.alt_dirs)
    if cfg.type == "registry":
        from pynydus.daemon.registry_backend import RegistryBackend

        return RegistryBackend(cfg.registry)
    raise NotImplementedFeature(f"backend type {cfg.type!r} is not supported")


def _warm_imports() -> None:
    """Import the registry client (httpx) off the start-up path. It is first needed
    at a chunk miss; a shared daemon starts long before its first API mount, whose
    first read then no longer waits 0.1-0.5 s for the import (bench/lazy_pull.py
    --profile)."""
    try:
        import pynydus.registry.client  # noqa: F401
    except Exception:  # the real import at first use reports it
        log.debug("warming the registry client import failed", exc_info=True)


# The kernel's readahead window for our mount. The default (128 KiB) makes the kernel
# ask in 64 KiB pieces; 1 MiB lets a sequential reader get chunk-sized requests.
READAHEAD_KB = 1024


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
    """The controller behind the API and the FUSE loop."""

    def __init__(self, opts: DaemonOptions) -> None:
        self.opts = opts
        self.state = "INIT"
        self.vfs = Vfs()
        self.cache_stats = CacheStats()
        self.fs: RafsFs | None = None
        self.api: ApiServer | None = None
        self.trio_token: trio.lowlevel.TrioToken | None = None
        self.started = time.time()
        self.mounts_info: dict[str, dict[str, Any]] = {}
        self.auth_overrides: dict[str, str] = {}
        self.prefetcher: Prefetcher | None = None
        self._lock = threading.Lock()

    # --- setup ------------------------------------------------------------------------

    def _instance(self, bootstrap: str, cfg: NydusdConfig) -> RafsInstance:
        if not os.path.isfile(bootstrap):
            raise NotFound(f"bootstrap {bootstrap} does not exist")
        return RafsInstance(bootstrap, cfg, make_backend(cfg.backend), self.cache_stats)

    def _start_prefetch(self, inst: RafsInstance, files: list[str] | None) -> None:
        p = inst.config.rafs.prefetch
        if not p.enable and files is None:
            return
        if self.prefetcher is None:
            self.prefetcher = Prefetcher(p.threads, p.bandwidth_limit,
                                         busy=lambda: bool(self.fs and self.fs.inflight))
        self.prefetcher.submit(inst, files, p.prefetch_all and p.enable)

    def make_fs(self) -> RafsFs:
        """The FUSE operations, sized by --thread-num, with the config's enable_xattr."""
        xattr = self.opts.config.rafs.enable_xattr if self.opts.config else True
        return RafsFs(self.vfs, thread_num=self.opts.thread_num, enable_xattr=xattr)

    def run(self) -> int:
        """Mount, serve until told to stop, unmount. Returns the exit code."""
        threading.Thread(target=_warm_imports, name="warm-imports", daemon=True).start()
        mp = os.path.abspath(self.opts.mountpoint)
        clean_stale_mountpoint(mp)  # before mkdir: a dead FUSE mount cannot even be stat'ed
        os.makedirs(mp, exist_ok=True)
        if self.opts.apisock:
            self.api = ApiServer(self.opts.apisock, self, group=self.opts.apisock_group)
            self.api.start()
        mounted = False
        try:
            if self.opts.bootstrap:
                if self.opts.config is None:
                    raise InvalidArgument("--bootstrap needs --config")
                inst = self._instance(self.opts.bootstrap, self.opts.config)
                self.vfs.dedicated = inst
                self.mounts_info["/"] = {"source": self.opts.bootstrap, "mounted_time": time.time()}
            self.fs = self.make_fs()
            options = {"fsname=rafs", "subtype=rafs", "ro", "default_permissions", "allow_other"}
            pyfuse3.init(self.fs, mp, options)
            mounted = True
            self.state = "READY"
            if self.vfs.dedicated is not None:
                self._start_prefetch(self.vfs.dedicated,
                                     list(self.opts.prefetch_files) if self.opts.prefetch_files else None)
            trio.run(self._main)
        finally:
            self.state = "STOPPED"
            if self.prefetcher:
                self.prefetcher.stop()
            # pyfuse3.close() without a successful init() dereferences a NULL session
            # and kills the process with SIGSEGV (a missing bootstrap crashed the CLI
            # instead of printing its error), so only close what was opened.
            if mounted:
                try:
                    pyfuse3.close(unmount=True)
                except Exception:
                    log.exception("closing the FUSE session")
            for inst in self.vfs.instances():
                inst.close()
            if self.api:
                self.api.close()
        log.info("stopped")
        return 0

    async def _main(self) -> None:
        self.trio_token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals, nursery.cancel_scope)
            nursery.start_soon(self._tune_readahead)
            self.state = "RUNNING"
            log.info("pynydusd %s serving %s", __version__, self.opts.mountpoint)
            await pyfuse3.main(min_tasks=max(2, self.opts.thread_num), max_tasks=256)
            nursery.cancel_scope.cancel()

    async def _tune_readahead(self) -> None:
        # FUSE_INIT (answered by the loop) resets the window to what libfuse negotiated,
        # so set it once the loop has run, and once more in case INIT came late.
        for delay in (0.05, 0.5):
            await trio.sleep(delay)
            await trio.to_thread.run_sync(tune_readahead, os.path.abspath(self.opts.mountpoint),
                                          READAHEAD_KB)

    async def _signals(self, scope: trio.CancelScope) -> None:
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
            "id": self.opts.daemon_id or None,
            "supervisor": self.opts.supervisor or None,
            "state": self.state,
            "backend_collection": collection,
        }

    def set_log_level(self, level: str) -> None:
        try:
            logging.getLogger().setLevel(level_of(level))
        except ValueError as err:
            raise InvalidArgument(f"log_level: {err}") from None

    def exit(self) -> None:
        if self.trio_token is None:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self.trio_token)

    def start(self) -> None:
        if self.state not in ("READY", "RUNNING"):
            raise Unavailable(f"daemon is {self.state}, cannot start")

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
        self.mounts_info[mountpoint] = {"source": source, "mounted_time": time.time()}
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
                                             busy=lambda: bool(self.fs and self.fs.inflight))
        self.prefetcher.submit_list(inst, plist)
        log.info("prefetching %s from a list: %d chunk runs, %d bytes", mountpoint,
                 len(plist.ranges), plist.compressed_bytes)

    def remount(self, mountpoint: str, body: dict[str, Any]) -> None:
        self.umount(mountpoint)
        self.mount(mountpoint, body)

    def umount(self, mountpoint: str) -> None:
        name = self._name(mountpoint)
        _, inst = self.vfs.remove(name)
        self.mounts_info.pop(mountpoint, None)
        try:
            pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name, ignore_enoent=True)
        except Exception as err:  # noqa: BLE001 - best effort: the kernel finds ENOENT anyway
            log.debug("invalidate %s: %s", mountpoint, err)
        inst.close()
        log.info("unmounted %s", mountpoint)

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
            return metrics.blobcache_json(
                self.cache_stats,
                underlying_files=[f for i in instances for f in i.underlying_files()],
                store_path=instances[0].config.cache.work_dir if instances else "",
                entries=sum(len(i.bs.blobs) for i in instances),
                all_ready=bool(instances) and all(i.all_cached() for i in instances),
                prefetch=self.prefetcher)
        if kind == "inflight":
            return metrics.inflight_json(self.fs.inflight) if self.fs else []
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
            inflight=len(self.fs.inflight) if self.fs else 0))

    def get_config(self, sid: str | None) -> dict[str, Any]:
        return {"registry_auth": "<redacted>" if self.auth_overrides else ""}

    def update_config(self, sid: str | None, values: dict[str, Any]) -> None:
        allowed = {"registry_auth", "proxy_url", "dragonfly_scheduler_endpoint"}
        unknown = set(values) - allowed
        if unknown:
            raise InvalidArgument(f"config keys {sorted(unknown)} cannot be changed at run time")
        auth = values.get("registry_auth")
        if auth is not None:
            for inst in self._instances_for(sid):
                backend = inst.backend
                if hasattr(backend, "update_auth"):
                    backend.update_auth(auth)
            self.auth_overrides[sid or "/"] = auth

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


def localfs_config(directory: str) -> NydusdConfig:
    """``--localfs-dir``: localfs backend and blob cache in one directory."""
    text = json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": directory}},
                                  "cache": {"type": "blobcache", "config": {"work_dir": directory}}},
                       "enable_xattr": True})
    cfg, _ = parse_daemon_config(text, "--localfs-dir")
    return replace(cfg)
