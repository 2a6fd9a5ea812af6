"""Running the snapshotter as a process: config, logging, the server, signals, graceful stop."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pynydus import __version__
from pynydus.config import SnapshotterConfig, load_config
from pynydus.errors import HostCheckError, Unavailable
from pynydus.grpcwire import server as h2server
from pynydus.host import checks, systemd
from pynydus.host.exclusive import SocketClaim, claim_socket, lock_root
from pynydus.logs import LEVELS, RotatingLog, dump_stacks_on
from pynydus.manager.filesystem import NydusFilesystem
from pynydus.manager.registryaccess import build_keychain
from pynydus.registry import Credentials
from pynydus.registry.crikeychain import CriKeychain
from pynydus.registry.keychain import Keychain
from pynydus.registry.transport import shared_ssl_context
from pynydus.snapshot.detect import Detector, client_factory
from pynydus.snapshot.imageproxy import ImageServiceProxy
from pynydus.snapshot.service import Snapshots, grpcio_server
from pynydus.snapshot.snapshotter import Snapshotter, SnapshotterOptions

if TYPE_CHECKING:
    from pynydus.tarfs.manager import TarfsManager

log = logging.getLogger("pynydus.snapshotter")

# How long in-flight calls may take to finish after SIGTERM before we stop anyway.
_GRACE_SECONDS = 30.0

# Which server carries the service: "h2" (ours, pynydus.grpcwire) or "grpcio".
SERVER_ENV = "PYNYDUS_SNAPSHOTS_SERVER"
# Calls served at once (the grpcio server's pool has as many threads).
_WORKERS = 16


def setup_logging(cfg: SnapshotterConfig) -> None:
    """stdout when log.log_to_stdout, else a rotating file in log.dir (lumberjack's rotation:
    size, backups, age, local time, gzip); warnings also on stderr."""
    level = LEVELS[cfg.log.level]
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    if cfg.log.log_to_stdout:
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(fmt)
        root.addHandler(handler)
        return
    log_dir = Path(cfg.log_dir())
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = RotatingLog(
        str(log_dir / "nydus-snapshotter.log"),
        max_bytes=cfg.log.log_rotation_max_size << 20,
        max_backups=cfg.log.log_rotation_max_backups,
        max_age_days=cfg.log.log_rotation_max_age,
        local_time=cfg.log.log_rotation_local_time,
        compress=cfg.log.log_rotation_compress,
    )
    handler.setFormatter(fmt)
    root.addHandler(handler)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(fmt)
    root.addHandler(err)


def make_filesystem(cfg: SnapshotterConfig, keychain: Keychain | None = None
                    ) -> NydusFilesystem | None:
    """The Nydus filesystem for the configured fs_driver (fusedev is the default, blobfile
    serves the same images as kernel EROFS over blob files: host-checked here); None
    for blockdev, which serves OCI images through tarfs only (``make_tarfs``).
    ``keychain``: the registry credential sources (default: ``build_keychain(cfg)``)."""
    driver = str(cfg.daemon.fs_driver)
    if driver == "fusedev":
        Path(cfg.root).mkdir(parents=True, exist_ok=True)
        return NydusFilesystem(cfg, keychain=keychain)
    if driver == "blobfile":
        from pynydus.tarfs.backing import probe_backing

        Path(cfg.root).mkdir(parents=True, exist_ok=True)
        if probe_backing(cfg.root, "fs_driver blobfile") != "file":
            raise HostCheckError("daemon.fs_driver: fs_driver blobfile needs EROFS file-backed "
                                 "mounts (Linux 6.12+): use fs_driver = \"fusedev\"")
        return NydusFilesystem(cfg, keychain=keychain)
    if driver == "blockdev":
        return None  # the configuration has checked that tarfs is on
    why = {"fscache": "it needs /dev/cachefiles (EROFS over fscache), which pynydus does not "
                      "drive"}.get(driver, "pynydus serves Nydus images over FUSE only")
    raise HostCheckError(f"daemon.fs_driver: fs_driver {driver} is not supported by pynydus yet "
                         f"({why}); use fs_driver = \"fusedev\" (or \"blockdev\" with tarfs)")


def make_tarfs(cfg: SnapshotterConfig, keychain: Keychain | None = None) -> TarfsManager | None:
    """The tarfs driver when ``experimental.tarfs.enable_tarfs`` (beside fusedev, or as
    fs_driver blockdev); checks the kernel's EROFS (HostCheckError)."""
    if not cfg.experimental.tarfs.enable_tarfs:
        return None
    from pynydus.tarfs.manager import TarfsManager, TarfsOptions

    Path(cfg.root).mkdir(parents=True, exist_ok=True)
    return TarfsManager(TarfsOptions.from_config(cfg), keychain=keychain)


def make_detector(cfg: SnapshotterConfig, keychain: Keychain | None = None) -> Detector | None:
    """Referrer/index detection (``experimental.enable_referrer_detect``/``_index_detect``),
    or None when both are off; registry credentials from ``keychain`` (default: the
    labels, then the docker config)."""
    x = cfg.experimental
    if not (x.enable_referrer_detect or x.enable_index_detect):
        return None
    factory = None
    if keychain is not None:
        def creds(image_ref: str, labels: Mapping[str, str]) -> Credentials | None:
            found = keychain.lookup(image_ref, labels).found
            return found.credentials if found else None
        factory = client_factory(creds)
    return Detector(referrer=x.enable_referrer_detect, index=x.enable_index_detect,
                    client_factory=factory)


def snapshotter_options(cfg: SnapshotterConfig) -> SnapshotterOptions:
    """What the Snapshots calls take from the configuration."""
    helper = ""
    if cfg.snapshot.enable_nydus_overlayfs or str(cfg.daemon_mode) == "none":
        helper = "fuse." + (cfg.snapshot.nydus_overlayfs_path or "nydus-overlayfs")
    return SnapshotterOptions(
        sync_remove=cfg.snapshot.sync_remove,
        volatile=cfg.snapshot.enable_overlayfs_volatile,
        cleanup_on_close=cfg.cleanup_on_close,
        nydus_overlayfs_type=helper,
        oci_fallback=cfg.snapshot.oci_fallback,
    )


def _build_tls_context() -> None:
    """Build the registry clients' shared TLS context (the CA bundle: 0.05-0.25 s) before
    any thread serves: left to the first client, it was built during a pull, on the path
    of that pull's second Prepare (+0.1-0.24 s, docs/benchmarks.md "Lean start")."""
    try:
        shared_ssl_context(True)
    except Exception as err:  # noqa: BLE001 - the first client that needs it reports it
        log.warning("registry TLS context: %s", err)


def serve(snapshotter: Snapshotter, address: str, *, workers: int = _WORKERS, uid: int = 0,
          gid: int = 0, server: str | None = None,
          on_fatal: Callable[[BaseException], None] | None = None,
          image_proxy: ImageServiceProxy | None = None) -> Any:
    """Start serving on unix socket ``address``, which ``claim_socket`` has made free.
    ``image_proxy``: the CRI ImageService served beside the Snapshots service.

    ``server`` (default: $PYNYDUS_SNAPSHOTS_SERVER, else "h2") picks the implementation;
    both return an object whose ``stop(grace)`` returns an event set once stopped.
    ``on_fatal`` is called if our server can no longer serve. Unavailable if its threads
    cannot be started (a pids limit).
    """
    kind = server or os.environ.get(SERVER_ENV) or "h2"
    if kind not in ("h2", "grpcio"):
        raise ValueError(f"{SERVER_ENV}={kind!r}: expected \"h2\" or \"grpcio\"")
    path = Path(address)
    core = Snapshots(snapshotter)
    if kind == "h2":
        methods = core.methods()
        if image_proxy is not None:
            methods.update(image_proxy.methods())
        try:
            return h2server.serve(methods, path, workers=workers, uid=uid, gid=gid,
                                  inline=core.inline, on_fatal=on_fatal)
        except RuntimeError as err:  # "can't start new thread"
            path.unlink(missing_ok=True)
            raise Unavailable(f"cannot start the server's {workers} threads: {err} (is the "
                              f"process at a pids, TasksMax or memory limit?)") from err
    log.info("snapshots service on grpcio (%s=grpcio)", SERVER_ENV)
    return grpcio_server(core, path, workers=workers, uid=uid, gid=gid,
                         extra=image_proxy.grpcio_handlers() if image_proxy else ())


def run(config_path: str | None, overrides: Mapping[str, object]) -> int:
    """Load config, start serving, block until SIGTERM/SIGINT, stop gracefully.

    The first signal drains in-flight calls (up to 30 s); a second one exits at once.
    """
    cfg, warnings = load_config(config_path, overrides)
    setup_logging(cfg)
    dump_stacks_on(signal.SIGUSR1)  # kill -USR1: every thread's stack into the log
    for w in warnings:
        log.warning("config: %s", w)
    options = snapshotter_options(cfg)
    # Before anything touches the root: a second instance would adopt (and on stop kill)
    # the first one's daemons, and take over its socket.
    checks.check_root_path(Path(cfg.root))
    root_lock = lock_root(Path(cfg.root))
    claim_socket(Path(cfg.address))
    # the CRI keychain the image service proxy fills, asked after the snapshot labels
    cri = CriKeychain() if cfg.remote.auth.enable_cri_keychain else None
    keychain = build_keychain(cfg, cri=cri)
    fs = make_filesystem(cfg, keychain)
    tarfs = None
    try:
        tarfs = make_tarfs(cfg, keychain)
        snapshotter = Snapshotter(cfg.root, options, fs, tarfs, detector=make_detector(cfg, keychain))
        if fs is not None:
            fs.start()
        _build_tls_context()
    except BaseException:
        if fs is not None:
            fs.close()
        if tarfs is not None:
            tarfs.close()
        raise
    stop = threading.Event()
    failed: list[BaseException] = []

    def on_fatal(err: BaseException) -> None:
        failed.append(err)  # the server cannot serve: stop and exit non-zero, so that a
        stop.set()  # supervisor restarts us instead of keeping a process that answers nothing

    image_proxy = None
    if cri is not None:
        image_proxy = ImageServiceProxy(cfg.remote.auth.image_service_address, cri)
        log.info("CRI image service proxy on %s, forwarding to %s", cfg.address,
                 cfg.remote.auth.image_service_address)
    # The operator's endpoints first: once the snapshots socket answers (what containerd,
    # `pynydus ctl health` and systemd's READY=1 wait for), the system controller and the
    # metrics answer too.
    metrics_server = None
    system_server = None
    try:
        if cfg.metrics.address:
            from pynydus.snapshot import metrics

            metrics.register_process()
            if fs is not None:
                metrics.register_daemons(fs.metrics_snapshot)
                metrics.register_filesystem(fs)
            metrics_server = metrics.serve_metrics(cfg.metrics.address)
        if cfg.system.enable:
            from pynydus.system.controller import Controller
            from pynydus.system.server import SystemServer

            system_server = SystemServer(Controller(fs), cfg.system.address,
                                         uid=cfg.system.uid, gid=cfg.system.gid)
        server = serve(snapshotter, cfg.address, uid=cfg.uid, gid=cfg.gid, on_fatal=on_fatal,
                       image_proxy=image_proxy)
    except BaseException:
        if system_server is not None:
            system_server.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
        snapshotter.close()
        raise
    claim = SocketClaim.of(Path(cfg.address))
    # What start-up made (modules, config, method tables: ~45,000 objects) lives as long
    # as the process: out of the collector's sight, a full collection that a burst of
    # calls triggers walks only what the calls made (it cost one of them ~20-50 ms).
    gc.freeze()
    log.info("pynydus %s snapshotter serving on %s (root %s)", __version__, cfg.address, cfg.root)
    systemd.notify("READY=1", f"STATUS=serving on {cfg.address}", f"MAINPID={os.getpid()}")

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("second signal %d: exiting now", signum)
            os._exit(1)
        log.info("signal %d: stopping, letting in-flight calls finish", signum)
        systemd.notify("STOPPING=1", "STATUS=stopping: letting in-flight calls finish")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(3600):
        pass
    server.stop(_GRACE_SECONDS).wait()
    if image_proxy is not None:
        image_proxy.close()
    if metrics_server is not None:
        metrics_server.shutdown()
    if system_server is not None:
        system_server.stop()
    snapshotter.close()
    claim.release()
    root_lock.release()
    if failed:
        log.error("stopped: the server failed (%r)", failed[0])
        return 1
    log.info("stopped")
    return 0
