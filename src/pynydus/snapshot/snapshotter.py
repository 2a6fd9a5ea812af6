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

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pynydus import labels as L
from pynydus.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplementedFeature,
    q,
)
from pynydus.host import checks
from pynydus.host.diskusage import disk_usage
from pynydus.host.mountinfo import mountpoints_under
from pynydus.snapshot import processor
from pynydus.snapshot.filters import Filter, snapshot_adaptor
from pynydus.snapshot.metastore import Info, Kind, MetaStore, Snapshot, Usage
from pynydus.snapshot.mounts import Mount, native_mounts, remote_mounts

if TYPE_CHECKING:
    from pynydus.manager.filesystem import NydusFilesystem
    from pynydus.tarfs.manager import TarfsManager

log = logging.getLogger(__name__)

_TEMP_PREFIX = "new-"
#: Cleanup stops this many daemons at a time (each mostly waits for its process to exit).
_PARALLEL_STOPS = 32


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
                 fs: NydusFilesystem | None = None, tarfs: TarfsManager | None = None) -> None:
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
        self._overlay_extra = ("index=off",) if checks.overlay_supports_index() else ()
        self._cleanup_lock = threading.Lock()
        # Early mounts started by Commit (see commit); close() waits for them.
        self._early_lock = threading.Lock()
        self._early: set[threading.Thread] = set()
        self._closing = False
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
        snap = self._create(Kind.ACTIVE, key, parent, labels)
        decision = self._decide(snap, labels)
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
                return self._remote(snap, decision.remote, labels)
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
                return self._remote(snap, meta, labels)
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
            return MountsTarget(snap, self.ms.labels_by_ids((snap.id,))[0], None)
        labels, *parents = self.ms.labels_by_ids((snap.id, *snap.parent_ids))
        layers = [processor.Layer(pid, pl) for pid, pl in zip(snap.parent_ids, parents, strict=True)]
        tarfs = self.tarfs is not None and self.tarfs.needs_mounts(layers)
        return MountsTarget(snap, labels, processor.bootstrap_layer(layers),
                            tuple(layers) if tarfs else ())

    def mounts_of(self, target: MountsTarget) -> list[Mount]:
        """The mounts of a ``mounts_target``; starts the image's Nydus instance or its
        tarfs mounts if it needs them (``target.needs_instance``) and waits for them."""
        if target.meta is not None:
            return self._remote(target.snap, target.meta, target.labels)
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
        for info in self.ms.walk():
            if flt.match(snapshot_adaptor(info.name, info.parent, info.kind, info.labels)):
                yield info

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
        tmp: Path | None = None
        try:
            with self.ms.transaction() as db:
                tmp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.snapshots_dir))
                (tmp / "fs").mkdir(0o755)
                os.chmod(tmp / "fs", 0o755)  # mkdir's mode is masked by umask
                if kind == Kind.ACTIVE:
                    (tmp / "work").mkdir(0o711)
                    os.chmod(tmp / "work", 0o711)
                snap = self.ms.create(db, kind, key, parent, labels)
                if snap.parent_ids:
                    # The new layer's root belongs to whoever owns the parent's root,
                    # so a chown in a lower layer is not undone by the upper dir.
                    st = os.stat(self.upper_path(snap.parent_ids[0]))
                    os.lchown(tmp / "fs", st.st_uid, st.st_gid)
                os.rename(tmp, self.snapshots_dir / snap.id)
            return snap
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _decide(self, snap: Snapshot, labels: Mapping[str, str]) -> processor.Decision:
        if not self.features.any:
            return processor.DEFAULT
        return processor.choose(labels, self._ancestors(snap), self.features)

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

    def _ancestors(self, snap: Snapshot) -> list[processor.Layer]:
        """The parents of ``snap``, nearest first, with their labels (one metastore read)."""
        return [processor.Layer(pid, labels) for pid, labels in
                zip(snap.parent_ids, self.ms.labels_by_ids(snap.parent_ids), strict=True)]

    def _undo_create(self, key: str) -> None:
        """Forget a snapshot whose Prepare/View failed after it was recorded."""
        try:
            with self.ms.transaction() as db:
                sid, _ = self.ms.remove(db, key)
            self._remove_dirs([sid])
        except Exception as err:  # noqa: BLE001 - the original error matters more
            log.warning("undo of %s failed: %s", key, err)

    def _remote(self, snap: Snapshot, meta: processor.Layer,
                labels: Mapping[str, str]) -> list[Mount]:
        """Mount the image's RAFS instance (if not yet) and overlay the snapshot on it.
        ``meta``: the bootstrap layer as the caller read it (labels are not read again)."""
        if self.fs is None:
            raise FailedPrecondition(
                f"snapshot {q(meta.id)} is a Nydus image's bootstrap layer: serving Nydus "
                'images needs fs_driver = "fusedev" (this snapshotter runs tarfs only)')
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
        once: each stop waits for a process to exit (about 0.5 s), and one after another
        that made removing 100 images take 48 s."""
        fs = self.fs
        if fs is None:
            return
        mounted = [n for n in names if fs.has_instance(n)]

        def umount(name: str) -> None:
            try:  # the image's daemon goes with its bootstrap snapshot
                fs.umount(name)
            except Exception as err:  # noqa: BLE001 - one bad instance must not stop cleanup
                log.warning("cleanup: cannot unmount RAFS instance of %s: %s", name, err)

        if len(mounted) <= 1:
            for name in mounted:
                umount(name)
            return
        with ThreadPoolExecutor(min(len(mounted), _PARALLEL_STOPS),
                                thread_name_prefix="cleanup-umount") as pool:
            list(pool.map(umount, mounted))

    def _remove_dirs(self, names: list[str]) -> list[str]:
        removed = []
        self._umount_all(names)
        for name in names:
            path = self.snapshots_dir / name
            if self.tarfs is not None:
                try:  # its conversion stops, its EROFS mount goes
                    self.tarfs.detach(name)
                except Exception as err:  # noqa: BLE001 - one bad layer must not stop cleanup
                    log.warning("cleanup: cannot detach tarfs layer %s: %s", name, err)
            busy = mountpoints_under(str(path))
            if busy:
                log.warning("cleanup: leaving %s, still mounted: %s", path, ", ".join(busy))
                continue
            try:
                shutil.rmtree(path)
                removed.append(name)
            except FileNotFoundError:
                continue
            except OSError as err:
                log.warning("cleanup: cannot remove %s: %s", path, err)
        return removed
