"""The snapshotter: containerd's snapshot semantics over directories and overlayfs.

Theory of operation (the same as containerd's overlayfs snapshotter):

- Every snapshot has an integer id and a directory ``snapshots/<id>`` holding
  ``fs`` (the layer's upper dir) and, while active, ``work`` (overlay's workdir).
- Prepare/View build the directory under a temporary name first, then record the
  snapshot in the metastore and rename the directory to its id inside that one
  transaction; any failure removes the temporary directory and records nothing.
- Commit keeps the id (the data never moves) and records the disk usage.
- Remove deletes the record in one transaction; the directory goes after it
  commits (``sync_remove``) or at the next Cleanup, which deletes every directory
  that has no record: removed snapshots and leftovers of crashes alike.

The label decision table (``processor.choose``) picks, per Prepare, whether a layer
is a plain directory or is served by a remote filesystem (Nydus, or the kernel's EROFS
over the layer tars with tarfs); with neither attached every layer is a plain directory.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pynydus import labels as L
from pynydus.errors import (
    AlreadyExists,
    FailedPrecondition,
    FormatError,
    InvalidArgument,
    NotFound,
    NotImplementedFeature,
    PermissionDenied,
    Unavailable,
    q,
)
from pynydus.host import checks
from pynydus.host.diskusage import disk_usage
from pynydus.host.mountinfo import mountpoints_under
from pynydus.snapshot import detect, ocifill, processor
from pynydus.snapshot.filters import Filter, snapshot_adaptor
from pynydus.snapshot.metastore import Info, Kind, MetaStore, Snapshot, Usage
from pynydus.snapshot.metrics import OCI_FALLBACKS
from pynydus.snapshot.mounts import Mount, native_mounts, remote_mounts

if TYPE_CHECKING:
    from pynydus.manager.filesystem import NydusFilesystem
    from pynydus.registry import Credentials
    from pynydus.tarfs.manager import TarfsManager

log = logging.getLogger(__name__)

_TEMP_PREFIX = "new-"
# Cleanup removes this many snapshot directories at a time
_PARALLEL_RMTREES = 8
# seconds the first read of an image with an OCI form may take before it falls back
_PROBE_TIMEOUT = 30.0
# longest cause kept in the nydus-oci-fallback label
_CAUSE_LEN = 512


# free bytes below which the cache disk counts as full (one default chunk)
_CACHE_FULL_BELOW = 1 << 20


def _cache_full(cache_dir: str) -> bool:
    try:
        st = os.statvfs(cache_dir)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _CACHE_FULL_BELOW


def _cause_kind(err: BaseException, cache_dir: str = "") -> str:
    """The metric label of a fallback cause. A full cache disk is seen on the disk, as
    the daemon's read fails with EIO whatever the reason."""
    text = str(err)
    chain: BaseException | None = err
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno == errno.ENOSPC:
            return "cache-full"
        chain = chain.__cause__
    if cache_dir and _cache_full(cache_dir):
        return "cache-full"
    if "ranged reads" in text:
        return "ranged-read"
    if isinstance(err, FormatError) or "bootstrap" in text:
        return "bootstrap"
    if isinstance(err, Unavailable) or "daemon" in text:
        return "daemon"
    return "other"


def _matching(infos: Iterable[Info], flt: Filter) -> Iterator[Info]:
    if not flt.clauses:  # no filter: every snapshot, without a field lookup for each
        yield from infos
        return
    for info in infos:
        if flt.match(snapshot_adaptor(info.name, info.parent, info.kind, info.labels)):
            yield info


@dataclass(frozen=True)
class SnapshotterOptions:
    # Remove deletes the directory at once instead of leaving it to Cleanup
    # (upstream default false: containerd's GC calls Cleanup soon after).
    sync_remove: bool = False
    # Add overlay 'volatile' to every active mount (no fsync of the upper dir).
    volatile: bool = False
    # Unmount what this snapshotter mounted when it stops.
    cleanup_on_close: bool = False
    # Remote mounts as one "fuse.<helper>" mount carrying extraoption (for runtimes
    # that start the daemon themselves); "" means plain overlay.
    nydus_overlayfs_type: str = ""
    # Start serving a Nydus image when its bootstrap layer is committed (end of the pull)
    # instead of at the first container's Prepare.
    mount_on_commit: bool = True
    # An image with OCI layers that cannot be served lazily is unpacked as OCI
    # (``snapshot.oci_fallback``); false: Prepare fails with the cause.
    oci_fallback: bool = True


@dataclass(frozen=True)
class MountsTarget:
    """Snapshot ``snap`` as Mounts sees it: its labels and, when the image is served by
    Nydus, the bootstrap layer (id and labels) whose instance its mounts stand on."""

    snap: Snapshot
    labels: Mapping[str, str]
    meta: processor.Layer | None
    # the parents with their labels when tarfs layers are among them (their mounts are
    # made or waited for), else empty
    tarfs_parents: tuple[processor.Layer, ...] = ()

    @property
    def needs_instance(self) -> bool:
        """Mounts starts (or waits for) a Nydus instance or tarfs mounts; False means a
        metastore read."""
        return self.meta is not None or bool(self.tarfs_parents)


class Snapshotter:
    """containerd Snapshotter over ``root``. Thread-safe; every method is atomic."""

    def __init__(self, root: str | Path, options: SnapshotterOptions | None = None,
                 fs: NydusFilesystem | None = None, tarfs: TarfsManager | None = None,
                 detector: detect.Detector | None = None) -> None:
        self.root = Path(root)
        self.options = options or SnapshotterOptions()
        checks.check_root_path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        checks.check_overlayfs()
        checks.check_d_type(self.root)
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        self.ms = MetaStore(self.root / "metadata.db")
        self._snapshots = str(self.snapshots_dir)
        self.fs = fs
        self.tarfs = tarfs
        self.features = processor.Features(nydus=fs is not None, tarfs=tarfs is not None)
        # referrer/index detection: only with a filesystem to serve what it finds
        self.detector = detector if fs is not None and detector is not None \
            and detector.enabled else None
        self._overlay_extra = ("index=off",) if checks.overlay_supports_index() else ()
        self._cleanup_lock = threading.Lock()
        # Early mounts started by Commit (see commit); close() waits for them.
        self._early_lock = threading.Lock()
        self._early: set[threading.Thread] = set()
        self._closing = False
        # OCI fallback: one fill per image at a time; instances whose first read was checked
        self._fill_locks: dict[str, threading.Lock] = {}
        self._fill_locks_lock = threading.Lock()  # not _cleanup_lock: a Cleanup takes seconds
        self._probed: set[str] = set()
        if tarfs is not None:
            tarfs.set_labels = self._set_labels
            ids = self.ms.id_map()
            tarfs.start(zip(ids, ids.values(), self.ms.labels_by_ids(list(ids)), strict=True))

    # --- paths --------------------------------------------------------------------

    # Plain string joins: Mounts builds several per call, and pathlib's cost ~3 us each.
    def upper_path(self, sid: str) -> str:
        return f"{self._snapshots}/{sid}/fs"

    def work_path(self, sid: str) -> str:
        return f"{self._snapshots}/{sid}/work"

    # --- API ----------------------------------------------------------------------

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create active snapshot ``key`` over committed ``parent`` and return its mounts.

        A second Prepare of the same key is AlreadyExists. When the decision table
        says SKIP (a layer that needs no download) the snapshot is committed at once
        under the ``containerd.io/snapshot.ref`` name and AlreadyExists is raised, as
        containerd's unpacker expects.
        """
        labels = dict(labels or {})
        L.validate(labels)
        if self.fs is not None and (L.is_nydus_data_layer(labels) or L.is_nydus_meta_layer(labels)):
            self.fs.prefetch_hint(labels)  # the image's prefetch list, looked up meanwhile
        snap = self._create(Kind.ACTIVE, key, parent, labels)
        chain = self._ancestors(snap) if self.features.any else []
        decision = processor.choose(labels, chain, self.features) if self.features.any \
            else processor.DEFAULT
        if decision is processor.DEFAULT and self.detector is not None \
                and L.TARGET_SNAPSHOT_REF in labels:
            try:
                decision = self._detected(snap, labels)
            except BaseException:
                self._undo_create(key)
                raise
        if decision.handler is processor.Handler.TARFS:
            decision = self._tarfs_layer(key, snap, labels)
        if decision.handler is processor.Handler.SKIP:
            target = labels.get(L.TARGET_SNAPSHOT_REF, "")
            try:
                self.commit(target, key, labels)
            except BaseException:
                self._undo_create(key)  # else a retry of the key is AlreadyExists: "unpacked"
                raise
            raise AlreadyExists(f"target snapshot {q(target)} already exists")
        if decision.remote is not None:
            try:
                return self._serve(snap, decision.remote, labels, chain)
            except BaseException:
                self._undo_create(key)
                raise
        if L.TARGET_SNAPSHOT_REF not in labels:
            try:
                self._fill_shared(snap, chain)
            except BaseException:
                self._undo_create(key)
                raise
        return self._mounts(snap, labels)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create read-only view ``key`` of committed ``parent`` and return its mounts."""
        labels = dict(labels or {})
        L.validate(labels)
        snap = self._create(Kind.VIEW, key, parent, labels)
        try:
            if not self.features.any:
                return self._mounts(snap, labels)
            ancestors = self._ancestors(snap)
            meta = processor.bootstrap_layer(ancestors)
            if meta is not None:
                return self._serve(snap, meta, labels, ancestors)
            self._fill_shared(snap, ancestors)
            return self._mounts(snap, labels, ancestors)
        except BaseException:
            self._undo_create(key)
            raise

    def mounts(self, key: str) -> list[Mount]:
        """Mounts of active or view snapshot ``key``; FailedPrecondition for a committed one."""
        return self.mounts_of(self.mounts_target(key))

    def mounts_target(self, key: str) -> MountsTarget:
        """What Mounts of ``key`` stands on, read from the metastore alone (key, chain and
        labels: three queries). NotFound if there is no ``key``, FailedPrecondition if it
        is committed."""
        snap = self.ms.get_snapshot(key)
        if snap.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"mounts of snapshot {q(key)}: snapshot is not active or view")
        if not self.features.any:  # no Nydus, no tarfs: the parents' labels do not matter
            return MountsTarget(snap, snap.labels, None)
        layers = self._ancestors(snap)
        tarfs = self.tarfs is not None and self.tarfs.needs_mounts(layers)
        return MountsTarget(snap, snap.labels, processor.bootstrap_layer(layers),
                            tuple(layers) if tarfs else ())

    def mounts_of(self, target: MountsTarget) -> list[Mount]:
        """The mounts of a ``mounts_target``; starts the image's Nydus instance or its
        tarfs mounts if it needs them (``target.needs_instance``) and waits for them."""
        if target.meta is not None:
            return self._serve(target.snap, target.meta, target.labels)
        return self._mounts(target.snap, target.labels, target.tarfs_parents or None)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None,
               parent: str = "") -> None:
        """Commit active ``key`` as ``name``; its labels become ``labels`` (not inherited).

        The usage of the upper directory is measured now and recorded. ``parent``
        (containerd 2.x, sent to snapshotters with the "rebase" capability) must be the
        parent ``key`` already has: a different one is InvalidArgument, as in containerd;
        a parent for a snapshot prepared without one (a rebase) is not implemented.
        """
        labels = dict(labels or {})
        L.validate(labels)
        if parent:
            self._check_commit_parent(key, parent)
        usage = Usage()
        try:
            snap = self.ms.get_snapshot(key)
            if snap.kind == Kind.ACTIVE:
                usage = Usage(*disk_usage(self.upper_path(snap.id)))
        except NotFound:
            pass  # commit_active reports it, after checking the name as containerd does
        with self.ms.transaction() as db:
            sid = self.ms.commit_active(db, key, name, usage, labels)
        if self.fs is not None and L.is_nydus_meta_layer(labels) and self.options.mount_on_commit:
            # The image's bootstrap has just been unpacked: start serving it now, while
            # containerd finishes the pull, so the first container does not wait for a
            # daemon to start. Errors are only logged: Prepare mounts again and reports.
            with self._early_lock:
                if self._closing:
                    return
                thread = threading.Thread(target=self._mount_early, args=(sid, labels),
                                          daemon=True, name=f"mount-{sid}")
                self._early.add(thread)
            thread.start()

    def _check_commit_parent(self, key: str, parent: str) -> None:
        # Rebase is not offered: an unpacker that prepares layers without their parents
        # would hand us Nydus data layers to skip before the chain below them exists, and
        # would apply whiteouts to a bind mount (containerd converts them to overlay
        # whiteouts only for its own overlayfs). docs/decisions.md, "containerd 2.x".
        current = self.ms.get_info(key)[1].parent
        if current == parent:
            return
        if current:
            raise InvalidArgument(f"cannot change parent of active snapshot {q(key)} on "
                                  f"commit from {q(current)} to {q(parent)}")
        raise NotImplementedFeature(
            f"commit snapshot {q(key)} onto parent {q(parent)}: rebase is not supported; "
            'do not declare the "rebase" capability for this proxy plugin')

    def _mount_early(self, sid: str, labels: Mapping[str, str]) -> None:
        assert self.fs is not None
        try:
            cache_dir = getattr(self.fs, "cache_dir", "")
            if self.options.oci_fallback and cache_dir and _cache_full(cache_dir):
                log.info("image snapshot %s: not mounted early, the cache disk (%s) is full "
                         "(Prepare decides)", sid, cache_dir)
                return
            self.fs.mount(sid, labels)
        except Exception as err:  # noqa: BLE001 - a hint; Prepare mounts again and reports
            log.info("early mount of image snapshot %s failed (Prepare will retry): %s", sid, err)
        finally:
            with self._early_lock:
                self._early.discard(threading.current_thread())

    def remove(self, key: str) -> None:
        """Remove ``key``; FailedPrecondition while another snapshot has it as parent.

        The directory is deleted now with ``sync_remove``, otherwise by Cleanup.
        """
        with self.ms.transaction() as db:
            try:
                sid, _ = self.ms.remove(db, key)
            except FailedPrecondition as err:
                raise FailedPrecondition(f"failed to remove snapshot {q(key)}: {err}") from err
        if self.options.sync_remove:
            self._remove_dirs([sid])

    def stat(self, key: str) -> Info:
        return self.ms.get_info(key)[1]

    def update(self, name: str, labels: Mapping[str, str], paths: list[str]) -> Info:
        """Update labels of ``name`` (field paths ``labels`` / ``labels.KEY``; empty = all)."""
        L.validate(labels)
        return self.ms.update_info(name, labels, paths)

    def walk(self, flt: Filter) -> Iterator[Info]:
        """The snapshots ``flt`` matches, in id order (one consistent read)."""
        return _matching(self.ms.walk(), flt)

    def walk_upto(self, flt: Filter, limit: int) -> list[Info] | None:
        """``walk`` read at once if there are at most ``limit`` snapshots (matching or
        not); None if there are more."""
        infos = self.ms.walk_upto(limit)
        return None if infos is None else list(_matching(infos, flt))

    def usage(self, key: str) -> Usage:
        """Active: measured now from the upper dir. Otherwise: recorded at commit, plus,
        for a Nydus data layer, the blob cache files of its blob."""
        sid, info, recorded = self.ms.get_info(key)
        if info.kind == Kind.ACTIVE:
            return Usage(*disk_usage(self.upper_path(sid)))
        digest = info.labels.get(L.CRI_LAYER_DIGEST, "")
        if self.tarfs is not None and L.NYDUS_TARFS in info.labels:
            size, files = self.tarfs.usage(sid, info.labels)
            return Usage(recorded.size + size, recorded.inodes + files)
        if self.fs is not None and L.is_nydus_data_layer(info.labels) and digest.startswith("sha256:"):
            size, files = self.fs.cache_usage(digest[len("sha256:"):])
            return Usage(recorded.size + size, recorded.inodes + files)
        return recorded

    def cleanup(self) -> list[str]:
        """Delete directories under ``snapshots/`` that no snapshot owns; returns their names.

        Idempotent. Directories with something mounted below them are left alone
        (and logged): deleting through a mount would destroy someone's data.
        """
        with self._cleanup_lock:
            orphans = self._orphan_dirs()
            removed = self._remove_dirs(orphans)
            if self.fs is not None or self.tarfs is not None:
                blobs = self._gc_cache()
                if blobs:
                    log.info("cleanup: removed cache of %d unused blobs", len(blobs))
            return removed

    def _gc_cache(self) -> list[str]:
        """Blobs neither a daemon nor a tarfs layer uses leave the (shared) cache."""
        from pynydus.manager.filesystem import remove_unused

        keep = self.tarfs.used_blob_ids() if self.tarfs is not None else set()
        if self.fs is not None:
            return self.fs.gc_cache(keep)
        assert self.tarfs is not None
        return remove_unused(self.tarfs.opts.cache_dir, keep)

    def close(self) -> None:
        """Stop: no early mount starts any more; the filesystem finishes (or refuses) the
        mounts under way and stops supervising; the early-mount threads are joined."""
        with self._early_lock:
            self._closing = True
            early = list(self._early)
        if self.fs is not None:
            self.fs.close(teardown=self.options.cleanup_on_close)
        if self.tarfs is not None:
            self.tarfs.close(teardown=self.options.cleanup_on_close)
        for thread in early:
            thread.join(timeout=30)  # the filesystem refuses their mounts now: they end soon
        self.ms.close()

    # --- internals ----------------------------------------------------------------

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> Snapshot:
        # The temporary directory is made inside the write transaction, so Cleanup
        # (which scans for orphans inside one too) never sees a half-made snapshot.
        # Plain strings and os calls: pathlib's joins cost more than the syscalls here.
        tmp = ""
        try:
            with self.ms.transaction() as db:
                tmp = tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self._snapshots)
                fs = tmp + "/fs"
                os.mkdir(fs, 0o755)
                os.chmod(fs, 0o755)  # mkdir's mode is masked by umask
                if kind == Kind.ACTIVE:
                    work = tmp + "/work"
                    os.mkdir(work, 0o711)
                    os.chmod(work, 0o711)
                snap = self.ms.create(db, kind, key, parent, labels)
                if snap.parent_ids:
                    # The new layer's root belongs to whoever owns the parent's root,
                    # so a chown in a lower layer is not undone by the upper dir.
                    st = os.stat(self.upper_path(snap.parent_ids[0]))
                    os.lchown(fs, st.st_uid, st.st_gid)
                os.rename(tmp, f"{self._snapshots}/{snap.id}")
            return snap
        except BaseException:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _tarfs_layer(self, key: str, snap: Snapshot, labels: dict[str, str]) -> processor.Decision:
        """Row A7: a pulled OCI layer the tarfs driver takes is committed now (SKIP) and
        converted in the background; one it declines is unpacked by containerd."""
        assert self.tarfs is not None
        try:
            added = self.tarfs.accept_layer(labels)
        except Exception:
            self._undo_create(key)
            raise
        if added is None:
            return processor.DEFAULT
        labels.update(added)
        target = labels.get(L.TARGET_SNAPSHOT_REF, "")
        try:
            self.commit(target, key, labels)
        except BaseException:
            self._undo_create(key)
            raise
        self.tarfs.start_layer(snap.id, target, labels)
        raise AlreadyExists(f"target snapshot {q(target)} already exists")

    def _set_labels(self, name: str, labels: Mapping[str, str]) -> None:
        """Set (or, with an empty value, drop) ``labels`` of ``name``: tarfs records its
        block images' verity data on the layers as they are exported."""
        self.ms.update_info(name, labels, [f"labels.{k}" for k in labels])

    def _detected(self, snap: Snapshot, labels: dict[str, str]) -> processor.Decision:
        """Rows A4/A5 (index, referrer detection) for a plain OCI layer being pulled:
        SKIP it when the image has a Nydus form (``labels`` then name it); its top layer
        also gets the Nydus bootstrap in its directory and the bootstrap label, so that
        the image is served from it like any Nydus image. DEFAULT otherwise."""
        assert self.detector is not None
        form = self.detector.find(labels)
        if form is None:
            return processor.DEFAULT
        labels[L.NYDUS_DETECTED] = form.label
        if detect.is_last_layer(labels):
            try:
                labels.update(self.detector.fetch_bootstrap(form, labels,
                                                            self.upper_path(snap.id)))
            except Exception as err:  # noqa: BLE001 - the image is still an OCI image
                log.warning("snapshot %s: Nydus form %s of %s found but its bootstrap cannot "
                            "be fetched, unpacking the layer: %s", snap.id, form.label,
                            labels.get(L.CRI_IMAGE_REF), err)
                labels.pop(L.NYDUS_DETECTED)
                return processor.DEFAULT
            labels[L.NYDUS_BOOTSTRAP] = "true"
        return processor.SKIP

    def _ancestors(self, snap: Snapshot) -> list[processor.Layer]:
        """The parents of ``snap``, nearest first, with their labels (read with the
        chain by the metastore)."""
        return [processor.Layer(pid, labels) for pid, labels in
                zip(snap.parent_ids, snap.parent_labels, strict=True)]

    def _undo_create(self, key: str) -> None:
        """Forget a snapshot whose Prepare/View failed after it was recorded."""
        try:
            with self.ms.transaction() as db:
                sid, _ = self.ms.remove(db, key)
            self._remove_dirs([sid])
        except Exception as err:  # noqa: BLE001 - the original error matters more
            log.warning("undo of %s failed: %s", key, err)

    # --- OCI fallback ----------------------------------------------------------------

    def _serve(self, snap: Snapshot, meta: processor.Layer, labels: Mapping[str, str],
               chain: list[processor.Layer] | None = None) -> list[Mount]:
        """The remote mounts of ``snap``; when the image cannot be served lazily and has
        OCI layers (detected or ZRAN image) and ``oci_fallback`` is on, its layers are
        unpacked as OCI instead (once) and ``snap`` gets plain overlay mounts. A failed
        signature check (``validate_signature``) is never a reason to fall back."""
        try:
            if self.options.oci_fallback and meta.id not in self._probed:
                self._check_cache_disk(snap, meta, chain)
            mounts = self._remote(snap, meta, labels)
            if self.options.oci_fallback and meta.id not in self._probed:
                # once per instance: the first read of an image that could fall back
                if self._fallback_plan(snap, meta, chain) is not None:
                    self._probe(meta.id)
                self._probed.add(meta.id)
            return mounts
        except Exception as err:
            # A bootstrap that fails a required signature is refused, never worked around.
            plan = self._fallback_plan(snap, meta, chain) \
                if self.options.oci_fallback and not isinstance(err, PermissionDenied) else None
            if plan is None:
                raise
            self._fall_back(meta, plan, err)
        return self._mounts(snap, labels)

    def _check_cache_disk(self, snap: Snapshot, meta: processor.Layer,
                          chain: list[processor.Layer] | None) -> None:
        """Unavailable when the cache disk is full and the image, not served yet, could
        fall back: a daemon would fetch every read again, or fail it (a converted
        Nydus image is left to the daemon: it has nothing to fall back to)."""
        assert self.fs is not None
        cache_dir = getattr(self.fs, "cache_dir", "")
        if cache_dir and _cache_full(cache_dir) and not self.fs.has_instance(meta.id) \
                and self._fallback_plan(snap, meta, chain) is not None:
            raise Unavailable(f"the cache disk ({cache_dir}) is full: less than "
                              f"{_CACHE_FULL_BELOW >> 20} MiB free")

    def _fallback_plan(self, snap: Snapshot, meta: processor.Layer,
                       chain: list[processor.Layer] | None = None
                       ) -> list[tuple[processor.Layer, str]] | None:
        """What unpacking the image as OCI takes, layer by layer from the bootstrap layer
        down: (layer, OCI blob digest to unpack; "" to empty the layer; "keep"), or None
        when a layer has no OCI form (a converted Nydus image)."""
        if chain is None:
            chain = self._ancestors(snap)
        ids = [layer.id for layer in chain]
        if meta.id not in ids:
            return None
        plan: list[tuple[processor.Layer, str]] = []
        for layer in chain[ids.index(meta.id):]:
            lb = layer.labels
            digest = ocifill.oci_layer_digest(lb)
            if L.NYDUS_FALLBACK in lb:
                plan.append((layer, "keep"))
            elif digest:
                plan.append((layer, digest))
            elif layer.id == meta.id:
                plan.append((layer, ""))  # a ZRAN image's bootstrap layer: no files
            elif L.is_nydus_data_layer(lb) or L.is_nydus_meta_layer(lb):
                return None
            else:
                plan.append((layer, "keep"))  # unpacked by containerd
        if not any(d not in ("", "keep") for _, d in plan):
            return None
        return plan

    def _probe(self, sid: str) -> None:
        """Read the first byte of the image's first non-empty regular file through its
        mount (a ranged read of the registry, an inflate, a digest check): what a
        container would do first. Raises Unavailable naming what failed."""
        assert self.fs is not None
        root = self.fs.mountpoint(sid)
        box: list[BaseException | None] = []

        def read() -> None:
            try:
                stack = [root]
                seen = 0
                while stack and seen < 10000:
                    with os.scandir(stack.pop()) as it:
                        for e in it:
                            seen += 1
                            if e.is_dir(follow_symlinks=False):
                                stack.append(e.path)
                            elif e.is_file(follow_symlinks=False) and \
                                    e.stat(follow_symlinks=False).st_size > 0:
                                with open(e.path, "rb") as f:
                                    f.read(1)
                                box.append(None)
                                return
                box.append(None)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                box.append(err)

        t = threading.Thread(target=read, daemon=True, name=f"probe-{sid}")
        t.start()
        t.join(_PROBE_TIMEOUT)
        if not box:
            raise Unavailable(f"reading the image of snapshot {q(sid)} took more than "
                              f"{_PROBE_TIMEOUT:.0f} s (ranged reads of its blobs)")
        if box[0] is not None:
            raise Unavailable(f"reading the image of snapshot {q(sid)} failed (ranged reads "
                              f"of its blobs): {box[0]}") from box[0]

    def _fall_back(self, meta: processor.Layer, plan: list[tuple[processor.Layer, str]],
                   err: Exception) -> None:
        assert self.fs is not None
        kind = _cause_kind(err, getattr(self.fs, "cache_dir", ""))
        cause = f"{kind}: {err}"[:_CAUSE_LEN]
        image = meta.labels.get(L.CRI_IMAGE_REF, "")
        log.warning("image %s (snapshot %s) cannot be served lazily, unpacking its OCI "
                    "layers: %s", image, meta.id, cause)
        with self._fill_lock(meta.id):
            if L.NYDUS_FALLBACK in self.ms.labels_by_id(meta.id):
                return  # another Prepare did it meanwhile
            try:
                if self.fs.has_instance(meta.id):
                    self.fs.umount(meta.id)
            except Exception as uerr:  # noqa: BLE001 - the fallback goes on
                log.warning("fallback of %s: cannot unmount its RAFS instance: %s", meta.id, uerr)
            self._probed.discard(meta.id)
            try:
                for layer, digest in plan:
                    if digest != "keep":
                        self._fill(layer, digest, image, cause, drop_bootstrap=layer.id == meta.id)
            except Exception as ferr:
                raise FailedPrecondition(
                    f"image {q(image)} cannot be served lazily ({cause}) and unpacking its "
                    f"OCI layers failed: {ferr}") from ferr
        OCI_FALLBACKS.labels(cause=kind).inc()

    def _fill(self, layer: processor.Layer, digest: str, image: str, cause: str,
              drop_bootstrap: bool = False) -> None:
        """Empty ``layer``'s directory and unpack OCI blob ``digest`` (if any) into it."""
        upper = self.upper_path(layer.id)
        with os.scandir(upper) as entries:
            for entry in list(entries):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        if digest:
            ref = layer.labels.get(L.CRI_IMAGE_REF) or image
            blob = f"{self._snapshots}/{layer.id}/oci-layer.tmp"
            try:
                ocifill.fetch_layer(ref, layer.labels, digest, blob,
                                    self._credentials(ref, layer.labels))
                ocifill.apply_layer(blob, upper)
            finally:
                try:
                    os.unlink(blob)
                except FileNotFoundError:
                    pass
        self.ms.change_labels_by_id(layer.id, {L.NYDUS_FALLBACK: cause},
                                    [L.NYDUS_BOOTSTRAP] if drop_bootstrap else [])

    def _fill_shared(self, snap: Snapshot,
                     ancestors: list[processor.Layer] | None = None) -> None:
        """Layers skipped because their image had a Nydus form, now below an image that is
        not served by one (it shares them and has none): unpack them as OCI."""
        if self.detector is None or not snap.parent_ids:
            return
        chain = self._ancestors(snap) if ancestors is None else ancestors
        todo = [(layer, ocifill.oci_layer_digest(layer.labels)) for layer in chain
                if L.NYDUS_DETECTED in layer.labels and L.NYDUS_FALLBACK not in layer.labels]
        if not todo:
            return
        cause = "shared: a layer skipped for a Nydus form is used by an image without one"
        with self._fill_lock("shared"):
            for layer, digest in todo:
                if L.NYDUS_FALLBACK in self.ms.labels_by_id(layer.id):
                    continue
                if not digest:
                    raise FailedPrecondition(f"snapshot {q(layer.id)} was skipped and has no "
                                             "OCI layer digest to unpack")
                self._fill(layer, digest, "", cause)
        OCI_FALLBACKS.labels(cause="shared").inc()

    def _credentials(self, image_ref: str, labels: Mapping[str, str]) -> Credentials | None:
        """The registry credentials the filesystem's keychain has for ``image_ref``."""
        keychain = getattr(self.fs, "keychain", None)
        if keychain is None:
            return detect.label_credentials(image_ref, labels)
        found = keychain.lookup(image_ref, labels).found
        return found.credentials if found else None

    def _fill_lock(self, key: str) -> threading.Lock:
        with self._fill_locks_lock:
            return self._fill_locks.setdefault(key, threading.Lock())

    def _remote(self, snap: Snapshot, meta: processor.Layer,
                labels: Mapping[str, str]) -> list[Mount]:
        """Mount the image's RAFS instance (if not yet) and overlay the snapshot on it.
        ``meta``: the bootstrap layer as the caller read it (labels are not read again)."""
        if self.fs is None:
            raise FailedPrecondition(
                f"snapshot {q(meta.id)} is a Nydus image's bootstrap layer: serving Nydus "
                'images needs fs_driver = "fusedev" or "blobfile" (this snapshotter runs tarfs only)')
        meta_id = meta.id
        self.fs.mount(meta_id, meta.labels)
        self.fs.wait_until_ready(meta_id)
        above = []  # committed layers stacked on the image (e.g. by a build), newest first
        for pid in snap.parent_ids:
            if pid == meta_id:
                break
            above.append(self.upper_path(pid))
        lowers = [*above, self.fs.mountpoint(meta_id)]
        if snap.kind == Kind.VIEW:
            lowers.append(self.upper_path(snap.id))  # overlay needs two lowers without an upper
        volatile = self.options.volatile or L.is_volatile(labels)
        return remote_mounts(
            snap.kind, self.upper_path(snap.id), self.work_path(snap.id), lowers, volatile=volatile,
            helper_type=self.options.nydus_overlayfs_type,
            extra=self.fs.extraoption(meta_id) if self.options.nydus_overlayfs_type else None,
        )

    def _mounts(self, snap: Snapshot, labels: Mapping[str, str],
                parents: list[processor.Layer] | tuple[processor.Layer, ...] | None = None
                ) -> list[Mount]:
        """Native mounts; ``parents`` (with labels, nearest first) when tarfs is on: its
        layers' EROFS mounts stand in for their directories (made now if need be)."""
        volatile = self.options.volatile or L.is_volatile(labels)
        if self.tarfs is not None and parents is None and snap.parent_ids:
            parents = self._ancestors(snap)
        if self.tarfs is not None and parents and self.tarfs.needs_mounts(parents):
            lowers = self.tarfs.lower_dirs(parents, self.upper_path)
        else:
            lowers = [self.upper_path(pid) for pid in snap.parent_ids]
        return native_mounts(
            snap.kind,
            self.upper_path(snap.id),
            self.work_path(snap.id),
            lowers,
            volatile=volatile,
            extra_options=self._overlay_extra,
        )

    def _orphan_dirs(self) -> list[str]:
        # Inside a write transaction: no snapshot is being created while we scan, and
        # ids are never reused, so what is an orphan now stays one.
        with self.ms.transaction():
            live = self.ms.id_map()
            return sorted(
                entry.name
                for entry in os.scandir(self.snapshots_dir)
                if entry.name not in live and entry.is_dir(follow_symlinks=False)
            )

    def _umount_all(self, names: list[str]) -> None:
        """The RAFS instances of ``names`` unmounted, their dedicated daemons stopped, all at
        once (``umount_many``: records deleted in one transaction, no daemon's exit waited
        for): one after another, waiting for each process, 100 images took 48 s."""
        fs = self.fs
        if fs is None:
            return
        mounted = [n for n in names if fs.has_instance(n)]
        try:  # the images' daemons go with their bootstrap snapshots
            fs.umount_many(mounted)
        except Exception as err:  # noqa: BLE001 - the directories are still cleaned
            log.warning("cleanup: cannot unmount RAFS instances: %s", err)

    def _remove_dirs(self, names: list[str]) -> list[str]:
        removed = []
        self._umount_all(names)
        if self.tarfs is not None:
            for name in names:
                try:  # its conversion stops, its EROFS mount goes
                    self.tarfs.detach(name)
                except Exception as err:  # noqa: BLE001 - one bad layer must not stop cleanup
                    log.warning("cleanup: cannot detach tarfs layer %s: %s", name, err)
        # the mount table read once, not once per directory (300 for 100 images)
        mounts = mountpoints_under(str(self.snapshots_dir)) if names else []

        def remove(name: str) -> str | None:
            path = self.snapshots_dir / name
            prefix = os.path.realpath(path)
            busy = [m for m in mounts if m == prefix or m.startswith(prefix + "/")]
            if busy:
                log.warning("cleanup: leaving %s, still mounted: %s", path, ", ".join(busy))
                return None
            try:
                shutil.rmtree(path)
                return name
            except FileNotFoundError:
                return None
            except OSError as err:
                log.warning("cleanup: cannot remove %s: %s", path, err)
                return None

        if len(names) <= 1:
            done = [remove(n) for n in names]
        else:
            # rmdir waits for the filesystem's journal: several at once overlap those
            # waits (300 directories of 100 images took 4-5 s one after another)
            with ThreadPoolExecutor(min(len(names), _PARALLEL_RMTREES),
                                    thread_name_prefix="cleanup-rm") as pool:
                done = list(pool.map(remove, names))
        removed += [n for n in done if n is not None]
        return removed
