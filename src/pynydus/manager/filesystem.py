"""The snapshotter's view of Nydus images: mount a RAFS instance per image.

``mount(snapshot_id, labels)`` is called for the image's bootstrap (meta) layer
snapshot when a container layer is prepared over it. It finds the bootstrap that
containerd unpacked into ``snapshots/<id>/fs/image/image.boot``, writes the
per-image daemon config and starts a dedicated daemon on ``snapshots/<id>/mnt``
(daemon mode ``dedicated``) or mounts the image into the shared daemon at
``<root>/mnt/<id>`` (mode ``shared``). It is idempotent: every container of an
image shares that one instance. ``umount`` is called when the meta layer
snapshot is removed; a dedicated daemon lives exactly as long as that snapshot.

With ``fs_driver = "blobfile"`` (ours, experimental) the daemons run with
``--blob-files``: their FUSE mount shows each blob of their images as one flat file
(a dedicated daemon's at ``snapshots/<id>/blobs``), and the image is the kernel's
EROFS mount of its bootstrap over those files at ``snapshots/<id>/mnt``: the kernel
answers lookups, walks and cached reads, the daemon only moves blob ranges. The EROFS
mount is made after the daemon serves the image and taken away before it stops; a
restarted daemon's images are mounted again (containers started before keep the dead
mount, as with a FUSE tree: only failover could save them, which this driver lacks).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from pynydus import labels as L
from pynydus.config import SnapshotterConfig
from pynydus.errors import ConfigError, FailedPrecondition, NotFound, NydusError, Unavailable, q
from pynydus.host import erofs
from pynydus.host.mount import unmount
from pynydus.host.mountinfo import mountpoints_under
from pynydus.logs import nydusd_level
from pynydus.manager.client import DaemonClient
from pynydus.manager.daemonconfig import load_template, supplement, write_config
from pynydus.manager.manager import (
    DaemonManager,
    LiveDaemon,
    resolve_daemon_binary,
    set_niceness,
)
from pynydus.manager.prefetchlookup import PrefetchListLookup
from pynydus.manager.prefetchrecord import ListRecorder
from pynydus.manager.registryaccess import build_keychain, check_access
from pynydus.manager.renewal import CredentialRenewal
from pynydus.manager.store import DaemonRecord, DaemonStore, RafsRecord
from pynydus.manager.supervisor import Supervisor
from pynydus.manager.template import DaemonTemplate
from pynydus.rafs.format import VERSION_HEAD_SIZE, bootstrap_version
from pynydus.rafs.read import has_spans, open_bootstrap
from pynydus.registry.hosts import check_all
from pynydus.registry.keychain import Keychain
from pynydus.signature import Verifier
from pynydus.system.controller import DaemonView, PrefetchLists, views_by_daemon

log = logging.getLogger(__name__)

SHARED_DAEMON_ID = "shared_daemon"
_BOOTSTRAP_WAIT = 1.0  # seconds for containerd to finish writing the bootstrap
# A spare daemon starts at this nice value and runs at 0 once RUNNING or needed.
_STANDBY_NICENESS = 10
# After an image takes the spare, the next one starts this much later (seconds);
# PYNYDUS_STANDBY_REFILL_DELAY overrides it (tests make it long, so that cutting it short
# is told apart from waiting it out without a race).
# Forked from the template a spare costs milliseconds of CPU: it is refilled at once.
_STANDBY_REFILL_DELAY = float(os.environ.get("PYNYDUS_STANDBY_REFILL_DELAY") or 3.0)
_STANDBY_REFILL_DELAY_FORKED = float(os.environ.get("PYNYDUS_STANDBY_REFILL_DELAY") or 0.0)
# PYNYDUS_DAEMON_TEMPLATE=0: spawn every daemon (no template process forking them)
_USE_TEMPLATE = os.environ.get("PYNYDUS_DAEMON_TEMPLATE", "1") != "0"
# How long an image waits for a spare that is starting before starting its own daemon.
_STANDBY_WAIT = 10.0
# Umount calls to the shared daemon in flight at once (umount_many)
_PARALLEL_UMOUNTS = 8
# How long close() waits for mounts under way (a daemon start, a standby's wait).
_CLOSE_MOUNT_WAIT = 30.0
# fs_driver blobfile: the EROFS mount's read-ahead window (KiB). The kernel's default
# bdi window is 128 KiB; a larger one keeps several FUSE reads of the blob file in
# flight (bench/erofs_blobs.py)
BLOBFILE_READ_AHEAD_KB = 8192


def bootstrap_path(snapshot_dir: str) -> str:
    """``fs/image/image.boot`` (what nydusify writes), or the legacy ``fs/image.boot``."""
    for rel in ("fs/image/image.boot", "fs/image.boot"):
        path = os.path.join(snapshot_dir, rel)
        if os.path.exists(path):
            return path
    return os.path.join(snapshot_dir, "fs/image/image.boot")


def bootstrap_ready(path: str) -> bool:
    """A complete RAFS bootstrap: v5 magic at 0, or v6 magic at 1024 and block-aligned size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(VERSION_HEAD_SIZE)
    except OSError:
        return False
    version = bootstrap_version(head)
    if version == 5:
        return size >= 8
    return version == 6 and (size % 4096 == 0 or size % 512 == 0)


def blob_devices(boot: str, sid: str) -> list[str]:
    """The blob ids of RAFS v6 bootstrap ``boot`` in its device order: the blob files an
    EROFS mount of it needs. FailedPrecondition for what fs_driver blobfile cannot serve:
    RAFS v5 (no EROFS form) and ZRAN or batch blobs (no flat address space)."""
    where = f"snapshot {q(sid)}: fs_driver blobfile"
    if fs_version(boot) != "v6":
        raise FailedPrecondition(f"{where} needs a RAFS v6 image, {boot} is v5")
    bs = open_bootstrap(boot)
    try:
        spans = [b.blob_id for b in bs.blobs if has_spans(b)]
        if spans:
            raise FailedPrecondition(f"{where} cannot serve ZRAN or batch blobs ({spans[0]}): "
                                     'convert the image without --oci-ref, or use fusedev')
        return [b.blob_id for b in bs.blobs]
    finally:
        bs.close()


def fs_version(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    return "v5" if bootstrap_version(head) == 5 else "v6"


class NydusFilesystem:
    """RAFS instances of images, served by daemons the manager supervises."""

    def __init__(self, cfg: SnapshotterConfig, *, keychain: Keychain | None = None) -> None:
        """``keychain``: the credential sources (default: what ``[remote.auth]`` turns on
        that needs no server of ours; the snapshotter adds its CRI keychain)."""
        self.cfg = cfg
        self.keychain = keychain if keychain is not None else build_keychain(cfg)
        self.root = cfg.root
        self.mode = str(cfg.daemon_mode)
        self.blob_files = str(cfg.daemon.fs_driver) == "blobfile"
        if self.mode == "none":
            log.warning("daemon_mode none: images are still served by a dedicated daemon here "
                        "(upstream does the same with fs_driver fusedev)")
        self.cache_dir = cfg.cache_dir()
        os.makedirs(self.cache_dir, exist_ok=True)
        # made now, not by the first image: the root's layout does not change with use
        os.makedirs(cfg.config_dir(), exist_ok=True)
        self.template = load_template(cfg.daemon.nydusd_config)
        self.verifier = Verifier(cfg.image.public_key_file, cfg.image.validate_signature)
        if cfg.remote.mirrors_config.dir:
            # Reported now; only the images of a registry whose file is broken fail to mount.
            for problem in check_all(cfg.remote.mirrors_config.dir):
                log.error("remote.mirrors_config.dir: %s", problem)
        policy = str(cfg.daemon.recover_policy)
        self.supervisor: Supervisor | None = None
        if str(cfg.daemon.failover_policy) == "none":
            raise ConfigError('daemon.failover_policy: "none" is not supported by pynydus yet '
                              '(a successor either resends or fails the requests its '
                              'predecessor had read: "resend" or "flush")')
        if policy == "failover":
            # the supervisor holds every daemon's FUSE connection; a dead daemon's is
            # handed to a successor (docs/failover.md)
            self.supervisor = Supervisor(cfg.supervisor_dir())
        self.cgroup = None
        if cfg.cgroup.enable:
            from pynydus.host.cgroup import MemoryCgroup

            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            self.cgroup = MemoryCgroup(cfg.cgroup.memory_limit_bytes(total))
        self.store = DaemonStore(os.path.join(self.root, "daemons.db"))
        command = resolve_daemon_binary(cfg.daemon.nydusd_path)
        # Dedicated mode (a daemon per image) and failover (spares) fork their pynydusd
        # from a pre-imported template: shared pages, millisecond starts.
        self.forker: DaemonTemplate | None = None
        if (_USE_TEMPLATE and command == resolve_daemon_binary("")
                and (self.mode != "shared" or policy == "failover")):
            self.forker = DaemonTemplate(os.path.join(self.root, "template"), command,
                                           nydusd_level(cfg.log.level),
                                           cfg.daemon.log_rotation_size)
        self.manager = DaemonManager(
            self.store,
            command=command,
            log_level=nydusd_level(cfg.log.level),
            recover_policy=policy,
            thread_num=cfg.daemon.threads_number,
            log_rotation_size=cfg.daemon.log_rotation_size,
            on_restarted=self._restarted,
            cgroup=self.cgroup,
            supervisor=self.supervisor,
            failover_policy=str(cfg.daemon.failover_policy),
            spare_record=self._spare_record,
            on_taken_over=self._remount_missing,
            template=self.forker,
        )
        self.instances: dict[str, RafsRecord] = {r.snapshot_id: r for r in self.store.instances()}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        # Mounts under way; close() waits for them, so every daemon they start has its record.
        self._mounting = 0
        self._mounts_done = threading.Condition(self._lock)
        # Dedicated mode keeps one started daemon in reserve: the next image is mounted
        # into it through the API (milliseconds) instead of waiting for a process start.
        self.use_standby = self.mode != "shared"
        self._standby: LiveDaemon | None = None
        self._standby_lock = threading.Lock()
        self._standby_done = threading.Condition(self._standby_lock)
        self._refill_now = threading.Event()  # cuts a delayed refill's wait short
        self._refilling: DaemonRecord | None = None  # the spare being started, if any
        self._refill_thread: threading.Thread | None = None
        self._closing = False  # set under _lock: no mount starts after it
        # image -> files its next dedicated daemon prefetches (the system controller's
        # PUT /api/v1/prefetch; taken by the mount, as upstream does)
        self.prefetch_lists = PrefetchLists()
        # prefetch lists learned from start-ups, found in the registry at mount
        self.list_lookup = PrefetchListLookup()
        plc = cfg.experimental.prefetch_list
        # lists learned from an image's first container here, when configured
        self.list_recorder = ListRecorder(self.root, self.list_lookup, push=plc.push,
                                          timeout=plc.record_timeout) if plc.record else None
        self.cache_gc = CacheGcStats()  # what Cleanup's cache GC did, for the metrics
        # [remote.auth] credential_renewal_interval: new credentials to running daemons
        interval = cfg.remote.auth.credential_renewal_interval
        self.renewal = CredentialRenewal(self, self.keychain, interval) if interval > 0 \
            else None

    # --- start-up ------------------------------------------------------------------------

    def start(self) -> None:
        """Reconnect to daemons that survived a restart, restart the ones that did not."""
        live, dead = self.manager.recover()
        if self.forker is not None:
            self.forker.start()  # adopted, or importing while the rest starts
        serving = {r.daemon_id for r in self.instances.values()}
        for ld in live:
            if ld.record.mode == "standby" and ld.record.id not in serving:
                current = ld.record.command == self.manager.command
                if self._standby is None and self.use_standby and current:
                    self._standby = ld  # a spare from before the restart: keep it
                else:
                    if not current:  # left by another version (an upgrade): images
                        log.info("standby daemon %s runs %s, not %s: replacing it",  # get ours
                                 ld.record.id, ld.record.command, self.manager.command)
                    self.manager.destroy_daemon(ld.record.id)
                    self._remove_daemon_dir(ld.record.id)
        for rec in dead:
            if rec.mode == "standby" and rec.id not in serving:
                self.manager.destroy_daemon(rec.id)  # a spare is not worth restarting
                continue
            try:
                log.info("restarting daemon %s for %s", rec.id, rec.mountpoint)
                self.manager.restart(rec)
            except Exception as err:  # noqa: BLE001 - the other images must still come up
                log.error("daemon %s could not be restarted: %s", rec.id, err)
        if self.mode == "shared":
            # Started eagerly, as upstream does: the first image then costs an API
            # mount (milliseconds), not a daemon start.
            self._shared_daemon()
            # its images' configs go below (made now: the root's layout does not change
            # with use)
            os.makedirs(os.path.join(self.cfg.config_dir(), SHARED_DAEMON_ID), exist_ok=True)
        if self.blob_files:
            self._mount_missing_erofs()
        self.manager.start_monitor()
        self._refill_standby()
        if self.renewal is not None:
            self.renewal.start()

    def close(self, teardown: bool = False) -> None:
        """Stop supervising. Daemons serving images keep running (containers read through
        them; a restarted snapshotter reconnects), unless ``teardown``. The standby
        daemon serves nothing and is always stopped. Mounts under way are finished (or
        refused, if still waiting for their bootstrap) first, and later ones are refused,
        so that no daemon runs without a record."""
        with self._lock:
            self._closing = True
            deadline = time.monotonic() + _CLOSE_MOUNT_WAIT
            while self._mounting and time.monotonic() < deadline:
                self._mounts_done.wait(deadline - time.monotonic())
            if self._mounting:
                log.warning("closing with %d mounts still under way", self._mounting)
        self._refill_now.set()
        if self.list_recorder is not None:
            self.list_recorder.close()
        if self.renewal is not None:
            self.renewal.close()
        self.list_lookup.close()
        if self._refill_thread is not None:
            self._refill_thread.join(timeout=20)  # it stops what it started once it sees closing
        self.manager.close()
        if self.supervisor is not None:
            self.supervisor.close()  # the daemons keep their connections
        with self._standby_lock:
            spare, self._standby = self._standby, None
        if spare is not None:
            self.manager.destroy_daemon(spare.record.id)
            self._remove_daemon_dir(spare.record.id)
        if self.forker is not None:
            self.forker.close()  # the daemons it forked run on
        if teardown:
            for sid in list(self.instances):
                try:
                    self.umount(sid, wait=True)
                except Exception as err:  # noqa: BLE001 - tear down as much as we can
                    log.warning("teardown of %s: %s", sid, err)
            if SHARED_DAEMON_ID in self.manager.daemons:
                self.manager.destroy_daemon(SHARED_DAEMON_ID)
        if self.cgroup is not None:
            self.cgroup.close()
        self.store.close()

    # --- paths -----------------------------------------------------------------------------

    def snapshot_dir(self, sid: str) -> str:
        return os.path.join(self.root, "snapshots", sid)

    def mountpoint(self, sid: str) -> str:
        """Where containers find snapshot ``sid``'s image (the lower dir of their overlay)."""
        rec = self.instances.get(sid)
        if rec is not None:
            return rec.erofs_mountpoint or rec.mountpoint
        if self.blob_files:
            return self._erofs_target(sid)
        if self.mode == "shared":
            return os.path.join(self.root, "mnt", sid)
        return os.path.join(self.snapshot_dir(sid), "mnt")

    def has_instance(self, sid: str) -> bool:
        return sid in self.instances

    # --- what credential renewal asks (manager.renewal.Instances) -------------------------

    def renewal_targets(self) -> list[RafsRecord]:
        """The instances whose credentials came from a source that may renew them."""
        return [r for r in list(self.instances.values()) if r.credentials_renewable]

    def instance_lock(self, sid: str) -> threading.Lock:
        return self._sid_lock(sid)

    def current(self, sid: str) -> RafsRecord | None:
        return self.instances.get(sid)

    def live_daemon(self, daemon_id: str) -> LiveDaemon | None:
        return self.manager.daemons.get(daemon_id)

    def _sid_lock(self, sid: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(sid, threading.Lock())

    # --- mount / umount ------------------------------------------------------------------

    def mount(self, sid: str, labels: Mapping[str, str]) -> str:
        """Serve the image whose bootstrap is in snapshot ``sid``; returns the mountpoint.

        Idempotent. Raises FailedPrecondition when the labels lack the image
        reference (the registry to fetch from), Unavailable when the daemon fails or
        the snapshotter is closing.
        """
        with self._lock:
            if self._closing:
                raise Unavailable(f"mount of snapshot {q(sid)}: the snapshotter is closing")
            self._mounting += 1
        try:
            return self._mount(sid, labels)
        finally:
            with self._lock:
                self._mounting -= 1
                self._mounts_done.notify_all()

    def _mount(self, sid: str, labels: Mapping[str, str]) -> str:
        with self._sid_lock(sid):
            if sid in self.instances:
                return self.mountpoint(sid)
            image_ref = labels.get(L.CRI_IMAGE_REF) or labels.get(L.STARGZ_REFERENCE)
            if not image_ref:
                raise FailedPrecondition(
                    f"snapshot {q(sid)}: the Nydus image has no image reference label "
                    f"({L.CRI_IMAGE_REF}); pull it through the CRI (kubelet/crictl), "
                    f"'ctr-remote images rpull' or nerdctl, not plain 'ctr images pull'"
                )
            sdir = self.snapshot_dir(sid)
            boot = self._wait_bootstrap(sdir)
            devices = blob_devices(boot, sid) if self.blob_files else []
            self.verifier.verify(labels, boot, f"snapshot {q(sid)} of image {q(image_ref)}")
            creds = self.keychain.lookup(image_ref, labels)
            cfg = self._daemon_cfg(image_ref, sid, labels, creds)
            check_access(image_ref, cfg, labels, creds, f"snapshot {q(sid)}")
            # the lookup the pull's first Prepare started (prefetch_hint), or one now
            listed = self.list_lookup.start(image_ref, labels, cfg)
            try:
                if self.mode == "shared":
                    rec = self._mount_shared(sid, image_ref, boot, cfg)
                else:
                    rec = self._mount_dedicated(sid, image_ref, boot, cfg)
            except BaseException:
                listed.cancel()
                self.list_lookup.forget(image_ref, labels)
                raise
            if self.blob_files:
                try:
                    self._mount_erofs(rec, devices)
                except BaseException:
                    listed.cancel()
                    self.list_lookup.forget(image_ref, labels)
                    self._release_daemon(rec)
                    raise
            if creds.found is not None:
                rec.credential_source = creds.found.source
                rec.credentials_renewable = creds.found.renewable
            stored = self.instances[sid] = self.store.put_instance(rec)
            if self.renewal is not None and creds.found is not None:
                self.renewal.mounted(stored, creds.found.credentials)
            self.list_lookup.deliver(listed, functools.partial(self._send_list, stored),
                                     f"image {q(image_ref)}")
            if self.list_recorder is not None:
                self.list_recorder.after_lookup(listed, image_ref, labels, cfg,
                                                functools.partial(self._daemon_of, stored))
            return self.mountpoint(sid)

    def _daemon_cfg(self, image_ref: str, sid: str, labels: Mapping[str, str],
                    creds: Any = None) -> dict[str, Any]:
        """The daemon config of ``image_ref`` served from snapshot ``sid`` (credentials
        from the keychain unless given)."""
        if creds is None:
            creds = self.keychain.lookup(image_ref, labels)
        return supplement(self.template, image_ref=image_ref, snapshot_id=sid,
                          cache_dir=self.cache_dir, labels=labels,
                          mirrors_dir=self.cfg.remote.mirrors_config.dir,
                          credentials=creds.found.credentials if creds.found else None)

    def prefetch_hint(self, labels: Mapping[str, str]) -> None:
        """A pull of a Nydus image has reached the snapshotter (the Prepare of one of its
        layers): start looking its prefetch list up now, on a thread (this returns at
        once), so that the list is at hand when the image is mounted at the pull's end."""
        image_ref = labels.get(L.CRI_IMAGE_REF) or labels.get(L.STARGZ_REFERENCE)
        if not image_ref or self._closing:
            return
        self.list_lookup.start(image_ref, labels,
                               functools.partial(self._daemon_cfg, image_ref, "", dict(labels)))

    def _daemon_of(self, rec: RafsRecord) -> tuple[DaemonClient, str] | None:
        """The API client of the daemon serving ``rec`` and the image's mountpoint in it
        (``/<id>`` in a daemon it was mounted into through the API, ``/`` in one started
        with it); None once the image is unmounted."""
        live = self.manager.daemons.get(rec.daemon_id)
        if live is None or self.instances.get(rec.snapshot_id) is not rec:
            return None
        sub = os.path.relpath(rec.mountpoint, live.record.mountpoint)
        return live.client, "/" if sub == "." else f"/{sub}"

    def _send_list(self, rec: RafsRecord, doc: dict[str, Any]) -> None:
        """Hand a prefetch list to the daemon serving ``rec``."""
        where = self._daemon_of(rec)
        if where is not None:  # else unmounted meanwhile
            where[0].prefetch_list(where[1], doc)

    def _wait_bootstrap(self, sdir: str) -> str:
        deadline = time.monotonic() + _BOOTSTRAP_WAIT
        while True:
            boot = bootstrap_path(sdir)
            if bootstrap_ready(boot):
                return boot
            if self._closing:
                raise Unavailable(f"mount of {boot}: the snapshotter is closing")
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"no valid RAFS bootstrap at {boot}")
            time.sleep(0.05)

    def _daemon_record(self, did: str, mode: str, mountpoint: str, *, config_path: str = "",
                       bootstrap: str = "") -> DaemonRecord:
        """A new daemon's record: its API socket and log file are named by its id."""
        return DaemonRecord(
            id=did, mode=mode, mountpoint=mountpoint,
            api_socket=os.path.join(self.cfg.socket_dir(), did, "api.sock"),
            config_path=config_path, bootstrap=bootstrap,
            log_file=os.path.join(self.cfg.log_dir(), did, "nydusd.log"),
            thread_num=self.cfg.daemon.threads_number, blob_files=self.blob_files,
        )

    def _spare_record(self, did: str) -> DaemonRecord:
        """A failover successor waiting in INIT: no mountpoint, no image of its own."""
        return self._daemon_record(did, "spare", "")

    def _refill_standby(self, delay: float = 0.0) -> None:
        """Start a spare daemon in the background if dedicated mode has none.

        After an image took the previous spare, its container starts and reads right
        then: the new spare waits ``delay`` seconds (cut short when another image needs
        it) and starts at a low CPU priority, so it does not compete with that start.
        """
        if not self.use_standby or self._closing:
            return
        did = secrets.token_hex(10)
        rec = self._daemon_record(did, "standby", os.path.join(self.root, "daemons", did, "mnt"))
        with self._standby_lock:
            if self._standby is not None or self._refilling is not None:
                return
            self._refilling = rec
            self._refill_now.clear()

        def start() -> None:
            live: LiveDaemon | None = None
            try:
                if delay:
                    self._refill_now.wait(delay)
                if not self._closing:
                    # low priority unless an image is already waiting for it
                    niceness = 0 if self._refill_now.is_set() else _STANDBY_NICENESS
                    live = self.manager.start_daemon(rec, niceness=niceness)
            except Exception as err:  # noqa: BLE001 - images still mount the slow way
                if not self._closing:
                    log.warning("could not start a standby daemon: %s", err)
            with self._standby_lock:
                self._refilling = None
                if live is not None and not self._closing and self._standby is None:
                    self._standby, live = live, None
                self._standby_done.notify_all()
            if live is not None:
                self.manager.destroy_daemon(did)  # not needed any more

        self._refill_thread = threading.Thread(target=start, name="standby-daemon", daemon=True)
        self._refill_thread.start()

    def _remove_daemon_dir(self, did: str) -> None:
        """``<root>/daemons/<id>`` of a former standby daemon, once it is unmounted."""
        path = os.path.join(self.root, "daemons", did)
        if os.path.isdir(path) and not mountpoints_under(path):
            shutil.rmtree(path, ignore_errors=True)

    def _take_standby(self, sid: str, image_ref: str, boot: str, cfg: dict[str, Any],
                      prefetch: list[str] | None = None) -> RafsRecord | None:
        """Mount the image into the spare daemon, which becomes its dedicated daemon."""
        with self._standby_lock:
            starting = self._refilling
            if self._standby is None and starting is not None:
                # A spare is on its way: it is further along than a daemon started now.
                self._refill_now.set()
                deadline = time.monotonic() + _STANDBY_WAIT
                reniced = 0
                while self._refilling is starting and time.monotonic() < deadline:
                    if starting.pid and starting.pid != reniced:  # spawned: full speed now
                        set_niceness(starting.pid, 0)
                        reniced = starting.pid
                    self._standby_done.wait(0.05)
            live, self._standby = self._standby, None
        if live is None:
            return None
        try:
            if live.state != "RUNNING":
                raise Unavailable(f"standby daemon {live.record.id} is {live.state}")
            config_path = os.path.join(self.cfg.config_dir(), live.record.id, "config.json")
            write_config(config_path, cfg)
            live.client.mount(f"/{sid}", boot, json.dumps(cfg), prefetch_files=prefetch)
        except Exception as err:  # noqa: BLE001 - fall back to starting a daemon
            log.warning("standby daemon %s unusable (%s); starting one", live.record.id, err)
            self.manager.destroy_daemon(live.record.id)
            return None
        live.record.mode = "assigned"
        live.record.config_path = config_path
        self.manager.store.put_daemon(live.record)
        return RafsRecord(snapshot_id=sid, daemon_id=live.record.id, image_ref=image_ref,
                          snapshot_dir=self.snapshot_dir(sid),
                          mountpoint=os.path.join(live.record.mountpoint, sid), bootstrap=boot,
                          config_path=config_path)

    def _mount_dedicated(self, sid: str, image_ref: str, boot: str, cfg: dict[str, Any]) -> RafsRecord:
        prefetch = self.prefetch_lists.take(image_ref)  # the system controller's, if any
        taken = self._take_standby(sid, image_ref, boot, cfg, prefetch)
        self._refill_standby(delay=_STANDBY_REFILL_DELAY if self.forker is None
                             else _STANDBY_REFILL_DELAY_FORKED)
        if taken is not None:
            return taken
        did = secrets.token_hex(10)
        config_path = os.path.join(self.cfg.config_dir(), did, "config.json")
        write_config(config_path, cfg)
        prefetch_path = ""
        if prefetch:
            prefetch_path = os.path.join(self.cfg.config_dir(), did, "prefetch-files")
            with open(prefetch_path, "w", encoding="utf-8") as f:
                f.write("".join(p + "\n" for p in prefetch))
        # blobfile: the FUSE mount shows blob files; the image is the EROFS mount at mnt
        mp = os.path.join(self.snapshot_dir(sid), "blobs" if self.blob_files else "mnt")
        rec = self._daemon_record(did, "dedicated", mp, config_path=config_path, bootstrap=boot)
        rec.prefetch_files = prefetch_path
        self.manager.start_daemon(rec)
        return RafsRecord(snapshot_id=sid, daemon_id=did, image_ref=image_ref,
                          snapshot_dir=self.snapshot_dir(sid), mountpoint=mp, bootstrap=boot,
                          config_path=config_path)

    def _shared_daemon(self) -> LiveDaemon:
        live = self.manager.daemons.get(SHARED_DAEMON_ID)
        if live is not None:
            return live
        rec = self._daemon_record(SHARED_DAEMON_ID, "shared", os.path.join(self.root, "mnt"))
        return self.manager.start_daemon(rec)

    def _mount_shared(self, sid: str, image_ref: str, boot: str, cfg: dict[str, Any]) -> RafsRecord:
        live = self._shared_daemon()
        config_path = os.path.join(self.cfg.config_dir(), SHARED_DAEMON_ID, sid, "config.json")
        write_config(config_path, cfg)
        live.client.mount(f"/{sid}", boot, json.dumps(cfg))
        return RafsRecord(snapshot_id=sid, daemon_id=SHARED_DAEMON_ID, image_ref=image_ref,
                          snapshot_dir=self.snapshot_dir(sid),
                          mountpoint=os.path.join(live.record.mountpoint, sid), bootstrap=boot,
                          config_path=config_path)

    def _remount_shared(self, live: LiveDaemon, *, only_missing: bool = False) -> None:
        """After a daemon that serves images through the API restarts (the shared daemon,
        or a standby that became an image's daemon), mount them again in their order.
        ``only_missing``: after a takeover, mount only what the handed-over state lacked
        (a mount whose state did not reach the supervisor before the daemon died)."""
        if live.record.mode not in ("shared", "assigned"):
            return
        have: set[str] = set()
        if only_missing:
            have = set(live.client.info().get("backend_collection") or {})
        for rec in sorted(self.instances.values(), key=lambda r: r.seq):
            if rec.daemon_id != live.record.id or f"/{rec.snapshot_id}" in have:
                continue
            if only_missing:
                log.warning("daemon %s: image %s was not in the state it handed over; "
                            "mounting it again", live.record.id, rec.snapshot_id)
            with open(rec.config_path, encoding="utf-8") as f:
                cfg_text = f.read()
            live.client.mount(f"/{rec.snapshot_id}", rec.bootstrap, cfg_text)

    def _remount_missing(self, live: LiveDaemon) -> None:
        self._remount_shared(live, only_missing=True)

    def _restarted(self, live: LiveDaemon) -> None:
        """A daemon that died was started again: its images are served again (through
        the API for a daemon that got them that way) and, with blob files, mounted
        again as EROFS over the new daemon's files."""
        self._remount_shared(live)
        if not self.blob_files:
            return
        for rec in sorted(self.instances.values(), key=lambda r: r.seq):
            if rec.daemon_id == live.record.id:
                self._umount_erofs(rec)  # over the dead daemon's files: only EIO there
                self._mount_erofs(rec, blob_devices(rec.bootstrap, rec.snapshot_id))

    # --- fs_driver blobfile: kernel EROFS over a daemon's blob files ---------------------

    def _erofs_target(self, sid: str) -> str:
        return os.path.join(self.snapshot_dir(sid), "mnt")

    def _mount_erofs(self, rec: RafsRecord, devices: list[str]) -> None:
        """Mount ``rec``'s bootstrap as EROFS over its daemon's blob files ``devices``
        (blob ids, in the bootstrap's device order); sets ``rec.erofs_mountpoint``."""
        live = self.manager.daemons.get(rec.daemon_id)
        if live is None:
            raise Unavailable(f"snapshot {q(rec.snapshot_id)}: daemon {rec.daemon_id} is gone")
        target = self._erofs_target(rec.snapshot_id)
        os.makedirs(target, exist_ok=True)
        # directio: the EROFS inodes' pages are the one page cache of the data (the
        # blob files are FOPEN_DIRECT_IO); asynchronous reads of the whole window
        erofs.mount_erofs(rec.bootstrap, [os.path.join(live.record.mountpoint, d) for d in devices],
                          target, "file", direct_io=True, read_ahead_kb=BLOBFILE_READ_AHEAD_KB)
        rec.erofs_mountpoint = target

    def _umount_erofs(self, rec: RafsRecord) -> None:
        """Unmount ``rec``'s EROFS mount, detaching it if a container's overlay still uses
        it. Idempotent."""
        if not rec.erofs_mountpoint:
            return
        try:
            erofs.umount_erofs(rec.erofs_mountpoint)
        except OSError:
            try:
                unmount(rec.erofs_mountpoint, lazy=True)
            except OSError as err:
                log.warning("cannot unmount %s: %s", rec.erofs_mountpoint, err)

    def _mount_missing_erofs(self) -> None:
        """At start-up: the EROFS mount of every image whose daemon is alive (one a host
        reboot or an operator took away is made again; the others are left alone)."""
        mounted = set(mountpoints_under(os.path.join(self.root, "snapshots")))
        for rec in sorted(self.instances.values(), key=lambda r: r.seq):
            if not rec.erofs_mountpoint or os.path.realpath(rec.erofs_mountpoint) in mounted:
                continue
            if rec.daemon_id not in self.manager.daemons:
                continue  # restarted below (manager.restart), which mounts it
            try:
                self._mount_erofs(rec, blob_devices(rec.bootstrap, rec.snapshot_id))
            except (OSError, NydusError) as err:
                log.error("EROFS mount of snapshot %s: %s", rec.snapshot_id, err)

    def upgrade_daemons(self, nydusd_path: str = "") -> list[str]:
        """Hot upgrade (``PUT /api/v1/daemons/upgrade``): every daemon is replaced by one
        of ``nydusd_path`` (default: daemon.nydusd_path again, e.g. a new build installed
        there) without unmounting; see ``DaemonManager.upgrade``. Returns the daemon ids
        replaced; FailedPrecondition without the failover policy."""
        command = resolve_daemon_binary(nydusd_path) if nydusd_path else None
        return self.manager.upgrade(command)

    def wait_until_ready(self, sid: str) -> None:
        """The instance's daemon answers RUNNING (NotFound if there is no instance)."""
        rec = self.instances.get(sid)
        if rec is None:
            raise NotFound(f"no RAFS instance for snapshot {q(sid)}")
        # A daemon being restarted after a crash becomes ready within its start time.
        self.manager.wait_ready(rec.daemon_id, timeout=20.0)

    def umount(self, sid: str, *, wait: bool = False) -> None:
        """Stop serving ``sid`` (a dedicated daemon exits: its mount is gone when this
        returns, the process finishes exiting in the background unless ``wait``).
        Idempotent."""
        with self._sid_lock(sid):
            rec = self.instances.pop(sid, None)
            if rec is None:
                return
            self.store.delete_instance(sid)
            self._release_daemon(rec, wait=wait)
            self._drop_files(rec)

    def _release_daemon(self, rec: RafsRecord, *, wait: bool = False) -> None:
        """Take ``rec``'s image away from its daemon (its EROFS mount first, which holds
        the daemon's blob files): the shared daemon unmounts it, a dedicated one stops."""
        self._umount_erofs(rec)
        if rec.daemon_id == SHARED_DAEMON_ID:
            self._umount_shared(rec)
        else:
            self.manager.destroy_daemon(rec.daemon_id, wait=wait)

    def umount_many(self, sids: list[str]) -> None:
        """``umount`` of each, for snapshots that are gone (Cleanup): their records are
        deleted in one transaction each for instances and daemons, not two per image,
        and no daemon's exit is waited for."""
        taken = []
        for sid in sids:
            with self._sid_lock(sid):
                rec = self.instances.pop(sid, None)
            if rec is not None:
                taken.append(rec)
        if not taken:
            return
        self.store.delete_many(snapshot_ids=[r.snapshot_id for r in taken])
        for rec in taken:
            self._umount_erofs(rec)  # before the daemons whose files they hold stop
        self.manager.destroy_daemons([r.daemon_id for r in taken
                                      if r.daemon_id != SHARED_DAEMON_ID])

        def release(rec: RafsRecord) -> None:
            try:
                if rec.daemon_id == SHARED_DAEMON_ID:
                    self._umount_shared(rec)
                self._drop_files(rec)
            except Exception as err:  # noqa: BLE001 - one bad instance must not stop the rest
                log.warning("cannot unmount RAFS instance of %s: %s", rec.snapshot_id, err)

        shared = sum(r.daemon_id == SHARED_DAEMON_ID for r in taken)
        if shared <= 1:
            for rec in taken:
                release(rec)
            return
        # the shared daemon's umount calls overlap (each is a round trip to its API)
        with ThreadPoolExecutor(min(shared, _PARALLEL_UMOUNTS),
                                thread_name_prefix="umount") as pool:
            list(pool.map(release, taken))

    def _umount_shared(self, rec: RafsRecord) -> None:
        live = self.manager.daemons.get(SHARED_DAEMON_ID)
        if live is not None:
            try:
                live.client.umount(f"/{rec.snapshot_id}")
            except (NotFound, Unavailable) as err:
                log.warning("umount %s from the shared daemon: %s", rec.snapshot_id, err)

    def _drop_files(self, rec: RafsRecord) -> None:
        """The config of an instance unmounted, and its former standby daemon's directory."""
        try:
            os.unlink(rec.config_path)
            os.rmdir(os.path.dirname(rec.config_path))
        except OSError:
            pass
        if rec.daemon_id != SHARED_DAEMON_ID:
            self._remove_daemon_dir(rec.daemon_id)
        log.info("unmounted RAFS instance of snapshot %s", rec.snapshot_id)

    # --- the system controller's view (pynydus.system.controller.Daemons) ----------------

    def daemon_views(self) -> list[DaemonView]:
        views = views_by_daemon(list(self.manager.daemons.values()), list(self.instances.values()))
        if self.supervisor is None:
            return views
        return [dataclasses.replace(v, supervisor_path=self.supervisor.path(v.id)) for v in views]

    def daemon_read_bytes(self, daemon_id: str) -> int | None:
        """Bytes the daemon's filesystems have read (its fs metrics), None if it cannot say."""
        live = self.manager.daemons.get(daemon_id)
        if live is None or live.state != "RUNNING":
            return None
        try:
            return int(live.client.fs_metrics().get("data_read", 0))
        except (NydusError, OSError, ValueError) as err:
            log.debug("fs metrics of daemon %s: %s", daemon_id, err)
            return None

    def daemon_client(self, daemon_id: str, timeout: float) -> DaemonClient | None:
        live = self.manager.daemons.get(daemon_id)
        return None if live is None else DaemonClient(live.record.api_socket, timeout)

    def daemon_records(self) -> dict[str, list[dict[str, Any]]]:
        """The store's daemon and instance records, as persisted (``DaemonRecord`` and
        ``RafsRecord`` fields)."""
        return {"daemons": [asdict(r) for r in self.store.daemons()],
                "instances": [asdict(r) for r in self.store.instances()]}

    def set_prefetch(self, image: str, files: list[str]) -> None:
        """Files the next dedicated daemon mounting ``image`` prefetches (consumed once)."""
        self.prefetch_lists.put(image, files)

    def metrics_snapshot(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for live in list(self.manager.daemons.values()):
            states[live.state] = states.get(live.state, 0) + 1
        return {"states": states, "deaths": self.manager.deaths, "instances": len(self.instances)}

    def extraoption(self, sid: str) -> str:
        """base64 JSON that nydus-overlayfs-aware runtimes use to start the daemon themselves."""
        rec = self.instances[sid]
        with open(rec.config_path, encoding="utf-8") as f:
            config_text = f.read()
        payload = {"source": rec.bootstrap, "config": config_text, "snapshotdir": rec.snapshot_dir,
                   "fs_version": fs_version(rec.bootstrap)}
        return base64.b64encode(json.dumps(payload).encode()).decode()

    # --- cache -------------------------------------------------------------------------

    def used_blob_ids(self) -> set[str] | None:
        """Blob ids some live instance uses; None if a daemon could not be asked."""
        used: set[str] = set()
        for rec in list(self.instances.values()):
            live = self.manager.daemons.get(rec.daemon_id)
            if live is None:
                return None
            try:
                sid = None if rec.daemon_id != SHARED_DAEMON_ID else f"/{rec.snapshot_id}"
                files = live.client.blobcache_metrics(sid).get("underlying_files", [])
            except (NotFound, Unavailable):
                return None
            used |= {blob_id_of(os.path.basename(f)) for f in files}
        return used

    def cache_usage(self, blob_id: str) -> tuple[int, int]:
        """(bytes allocated, files) of one blob's cache files."""
        return cache_usage(self.cache_dir, blob_id)

    def gc_cache(self, keep: set[str] | None = None) -> list[str]:
        """Delete cache files of blobs no live instance uses (nor ``keep`` names: the
        tarfs layers' tars share the cache); returns the blob ids removed."""
        used = self.used_blob_ids()
        if used is None:
            log.info("cache GC skipped: a daemon did not report its blobs")
            return []
        self.cache_gc.in_use = len(used)
        return remove_unused(self.cache_dir, used | (keep or set()), self.cache_gc)


@dataclass
class CacheGcStats:
    """Cumulative results of the cache GC (upstream's cache metrics)."""

    in_use: int = 0  # blobs the last GC found in use
    deleted: int = 0  # blobs whose files it deleted
    errors: int = 0  # files it could not delete


CACHE_SUFFIXES = ("", ".chunk_map", ".blob.data", ".blob.data.chunk_map", ".blob.meta", ".image.disk",
                  ".layer.disk")


def cache_usage(cache_dir: str, blob_id: str) -> tuple[int, int]:
    """(bytes allocated, files) of one blob's files in ``cache_dir`` (its materialized
    files too: they count against the cache disk as much as its data)."""
    import glob

    size = files = 0
    paths = [os.path.join(cache_dir, blob_id + suffix) for suffix in CACHE_SUFFIXES]
    paths += glob.glob(os.path.join(glob.escape(cache_dir), glob.escape(blob_id + MATERIALIZED) + "*"))
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        size += st.st_blocks * 512
        files += 1
    return size, files


def remove_unused(cache_dir: str, used: set[str], stats: CacheGcStats | None = None) -> list[str]:
    """Delete the files of ``cache_dir`` that belong to a blob not in ``used``; returns
    the blob ids removed. Files that are no blob's (temp files, other names) stay.
    ``stats`` (if given) counts the deletions and failures."""
    removed = set()
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if not os.path.isfile(path):
            continue
        blob = blob_id_of(name)
        if blob and blob not in used:
            try:
                os.unlink(path)
                removed.add(blob)
            except OSError as err:
                if stats is not None:
                    stats.errors += 1
                log.warning("cache GC: cannot remove %s: %s", path, err)
    if stats is not None:
        stats.deleted += len(removed)
    return sorted(removed)


# pynydusd's materialized files (daemon/materialize.py): ``<blob id>.file.<key>``, and
# their copies in progress (``...<key>.tmp-<pid>``), go with the blob of their first chunk
MATERIALIZED = ".file."


def blob_id_of(filename: str) -> str:
    """The blob id a cache file belongs to ('' if it is not a blob cache file)."""
    head, sep, _ = filename.partition(MATERIALIZED)
    if sep:
        return head if _is_hex64(head) else ""
    for suffix in sorted(CACHE_SUFFIXES, key=len, reverse=True):
        if suffix and filename.endswith(suffix):
            base = filename[: -len(suffix)]
            return base if _is_hex64(base) else ""
    return filename if _is_hex64(filename) else ""


def _is_hex64(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)
