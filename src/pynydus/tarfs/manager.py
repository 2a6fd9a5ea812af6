"""The tarfs driver: plain OCI images served by the kernel's EROFS over their layer tars.

Theory of operation (upstream's tarfs, ``docs/tarfs.md``; choices of our own in
``docs/decisions.md``):

- **Pull** (Prepare of a layer, row A7 of the decision table): :meth:`accept_layer`
  says whether the layer goes tarfs (the labels name its image and digest; with
  ``tarfs_hint`` the manifest carries the hint) and gives the label to commit it with
  (``nydus-tarfs=<blob id>``). The snapshotter commits the empty layer at once, as for
  a Nydus data layer, so containerd downloads and unpacks nothing, and
  :meth:`start_layer` converts it in the background (:mod:`.layer`): downloaded,
  uncompressed once, kept as ``<cache>/<blob id>``, described by
  ``<layer>/fs/image/layer.boot``. At most ``max_concurrent_proc`` layers of one image
  convert at once.
- **Run** (Prepare/View/Mounts of a snapshot over tarfs layers): :meth:`lower_dirs`
  waits for their conversions and mounts them: in ``layer`` mode each layer's bootstrap
  with its tar as the one device at ``<layer>/mnt`` (the overlay stacks them as it
  stacks containerd's layer directories); in ``image`` mode (upstream's) the layer
  bootstraps are merged into ``<top layer>/fs/image/image.boot`` and mounted once, with
  every tar a device, at ``<top layer>/mnt``. A mount lives as long as its snapshot's
  directory (:meth:`detach` at Remove/Cleanup) and survives a restart of the snapshotter.
- **Export** (``export_mode``): a block image per layer (``<blob id>.layer.disk``, after
  the conversion) or per image (``<top blob id>.image.disk``, at the first container),
  with the dm-verity tree and root hash in ``nydus-layer-block`` / ``nydus-image-block``
  when asked (:mod:`.export`, :mod:`.verity`).
- **State** is on disk: a layer is converted when its bootstrap exists, mounted when the
  kernel says so. :meth:`start` rebuilds the rest after a restart (conversions that did
  not finish start again).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from pynydus import labels as L
from pynydus.config import SnapshotterConfig, TarfsExportMode, TarfsMountMode
from pynydus.errors import (
    FailedPrecondition,
    FormatError,
    InvalidArgument,
    NotFound,
    NotImplementedFeature,
    NydusError,
    PermissionDenied,
    Unavailable,
    q,
)
from pynydus.host import erofs
from pynydus.host.cpus import thread_cpu_and_wait
from pynydus.host.mountinfo import read_mountinfo
from pynydus.manager.filesystem import cache_usage
from pynydus.registry import RegistryClient
from pynydus.registry.keychain import Keychain
from pynydus.registry.reference import Reference
from pynydus.registry.transport import shared_ssl_context
from pynydus.tarfs import export
from pynydus.tarfs.backing import probe_backing
from pynydus.tarfs.layer import (
    IMAGE_BOOTSTRAP,
    LAYER_BOOTSTRAP,
    Cancelled,
    convert_layer,
    remove_partial,
)
from pynydus.tarfs.source import ImageInfoCache, LayerSource, connect
from pynydus.tarfs.warm import cache_tree

__all__ = ["ExportFlags", "TarfsManager", "TarfsOptions", "export_flags"]

log = logging.getLogger(__name__)

_LIMITERS = 50  # per-image limiters kept, as upstream's LRU
# read-ahead window of file-backed mounts (their bdi's default is 128 KiB; loop devices
# get the backing device's, 2.5 MiB here)
FILE_READ_AHEAD_KB = 4096
_JOIN = 30.0  # seconds close/detach wait for a conversion to stop


class Status(Enum):
    CONVERTING = "converting"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ExportFlags:
    """What an ``export_mode`` asks for (upstream's ``GetTarfsExportFlags``)."""

    image: bool  # whole image (else per layer)
    disk: bool
    verity: bool

    @property
    def any(self) -> bool:
        return self.disk or self.verity


def export_flags(mode: TarfsExportMode) -> ExportFlags:
    m = TarfsExportMode
    return {
        m.DISABLED: ExportFlags(False, False, False),
        m.LAYER_VERITY_ONLY: ExportFlags(False, False, True),
        m.IMAGE_VERITY_ONLY: ExportFlags(True, False, True),
        m.LAYER_BLOCK: ExportFlags(False, True, False),
        m.IMAGE_BLOCK: ExportFlags(True, True, False),
        m.LAYER_BLOCK_WITH_VERITY: ExportFlags(False, True, True),
        m.IMAGE_BLOCK_WITH_VERITY: ExportFlags(True, True, True),
    }[m(mode)]


@dataclass(frozen=True)
class TarfsOptions:
    """What the driver takes from the configuration."""

    snapshots_dir: str
    cache_dir: str
    hint: bool = False
    max_concurrent: int = 0  # per image; 0: no limit
    export: ExportFlags = ExportFlags(False, False, False)
    mount_mode: TarfsMountMode = TarfsMountMode.LAYER
    warm_metadata: bool = True
    insecure: bool = False

    @classmethod
    def from_config(cls, cfg: SnapshotterConfig) -> TarfsOptions:
        t = cfg.experimental.tarfs
        return cls(snapshots_dir=cfg.snapshots_dir(), cache_dir=cfg.cache_dir(),
                   hint=t.tarfs_hint, max_concurrent=t.max_concurrent_proc,
                   export=export_flags(t.export_mode), mount_mode=t.mount_mode,
                   warm_metadata=t.warm_metadata, insecure=cfg.remote.skip_ssl_verify)


class LayerRef(Protocol):
    """A committed snapshot as the decision table hands it over: id and labels."""

    @property
    def id(self) -> str: ...

    @property
    def labels(self) -> Mapping[str, str]: ...


@dataclass(eq=False)
class _Layer:
    sid: str
    name: str  # the committed key, for label updates ("" if unknown)
    blob_id: str
    labels: dict[str, str]
    source: LayerSource | None
    status: Status = Status.CONVERTING
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def is_tarfs_layer(labels: Mapping[str, str]) -> bool:
    return L.NYDUS_TARFS in labels


class TarfsManager:
    """Tarfs layers of this snapshotter: conversions, mounts, exports. Thread-safe."""

    def __init__(self, opts: TarfsOptions,
                 set_labels: Callable[[str, Mapping[str, str]], None] | None = None,
                 *, backing: erofs.Backing | None = None,
                 client: Callable[[Reference, Mapping[str, str]], RegistryClient] | None = None,
                 keychain: Keychain | None = None) -> None:
        """``keychain``: where registry credentials come from (the snapshotter's, shared
        with its Nydus images); ``client`` replaces the registry client (tests)."""
        self.opts = opts
        # (name, labels) -> None: records export results on snapshots (the snapshotter's)
        self.set_labels = set_labels
        self._client = client or (lambda ref, labels: connect(ref, labels, insecure=opts.insecure,
                                                              keychain=keychain))
        os.makedirs(opts.cache_dir, exist_ok=True)
        self.backing: erofs.Backing = backing or probe_backing(opts.cache_dir)
        self.images = ImageInfoCache(self._client)
        # the registry clients' shared TLS context costs up to a second to load: not
        # at the first layer's conversion
        threading.Thread(target=shared_ssl_context, args=(not opts.insecure,), daemon=True,
                         name="tarfs-tls-warmup").start()
        self._lock = threading.Lock()
        self._layers: dict[str, _Layer] = {}
        self._mounted: dict[str, str] = {}  # snapshot id -> bootstrap it mounts
        self._sid_locks: dict[str, threading.Lock] = {}
        self._limiters: OrderedDict[str, threading.BoundedSemaphore] = OrderedDict()
        self._closing = False

    # --- paths ---------------------------------------------------------------------

    def upper(self, sid: str) -> str:
        return os.path.join(self.opts.snapshots_dir, sid, "fs")

    def mountpoint(self, sid: str) -> str:
        return os.path.join(self.opts.snapshots_dir, sid, "mnt")

    def tar_path(self, blob_id: str) -> str:
        return os.path.join(self.opts.cache_dir, blob_id)

    def _sid_lock(self, sid: str) -> threading.Lock:
        with self._lock:
            return self._sid_locks.setdefault(sid, threading.Lock())

    # --- start-up and stop -----------------------------------------------------------

    def start(self, committed: Iterable[tuple[str, str, Mapping[str, str]]]) -> None:
        """Take over after a restart: ``committed`` is every (id, name, labels) of the
        metastore. Layers with a bootstrap are ready, the others convert again; EROFS
        mounts under ``snapshots/*/mnt`` are ours. Leftovers of interrupted work go."""
        for name in os.listdir(self.opts.cache_dir):
            if name.startswith(".tarfs-"):  # the builder's temp tar of a killed conversion
                try:
                    os.unlink(os.path.join(self.opts.cache_dir, name))
                except OSError:
                    pass
        self._adopt_mounts()
        restart = []
        for sid, name, labels in committed:
            if not is_tarfs_layer(labels):
                continue
            layer = self._register(sid, name, labels)
            remove_partial(self.upper(sid))
            if self._converted(layer):
                layer.status = Status.READY
                layer.done.set()
            else:
                restart.append(layer)
        for layer in restart:
            log.info("tarfs: layer %s was not converted before the restart; converting it", layer.sid)
            self._spawn(layer)

    def _adopt_mounts(self) -> None:
        prefix = os.path.realpath(self.opts.snapshots_dir) + "/"
        for e in read_mountinfo():
            if e.fstype != "erofs" or not e.mountpoint.startswith(prefix):
                continue
            sid, _, rest = e.mountpoint[len(prefix):].partition("/")
            if rest != "mnt":
                continue
            source = e.source
            if source.startswith("/dev/loop"):
                source = _loop_backing_file(source) or source
            self._mounted[sid] = source

    def close(self, teardown: bool = False) -> None:
        """Stop: conversions under way are cancelled and joined (a restart converts them
        again). Mounts stay (containers read through them) unless ``teardown``."""
        with self._lock:
            self._closing = True
            layers = list(self._layers.values())
        for layer in layers:
            layer.cancel.set()
        deadline = time.monotonic() + _JOIN
        for layer in layers:
            if layer.thread is not None:
                layer.thread.join(max(0.0, deadline - time.monotonic()))
        if teardown:
            for sid in list(self._mounted):
                self._umount(sid)

    # --- pull: one layer -------------------------------------------------------------

    def accept_layer(self, labels: Mapping[str, str]) -> dict[str, str] | None:
        """The labels to commit a pulled layer with when it goes tarfs, else None
        (containerd unpacks it: the labels lack its source, or ``tarfs_hint`` is on and
        the image has no hint). Asks the registry for the manifest only with the hint."""
        src = LayerSource.from_labels(labels)
        if src is None:
            return None
        if self.opts.hint:
            try:
                if not self.images.get(src, labels).tarfs_hint:
                    return None
            except Exception as err:  # noqa: BLE001 - upstream falls back to unpacking too
                log.warning("tarfs: no hint for %s (%s); the layer is unpacked", src.ref, err)
                return None
        return {L.NYDUS_TARFS: src.blob_id}

    def start_layer(self, sid: str, name: str, labels: Mapping[str, str]) -> None:
        """Convert committed layer ``sid`` (labels as committed) in the background.
        Idempotent while a conversion of ``sid`` runs or is done."""
        layer = self._register(sid, name, labels)
        if layer.thread is None and layer.status is Status.CONVERTING:
            self._spawn(layer)

    def _register(self, sid: str, name: str, labels: Mapping[str, str]) -> _Layer:
        with self._lock:
            layer = self._layers.get(sid)
            if layer is None:
                layer = _Layer(sid, name, labels[L.NYDUS_TARFS], dict(labels),
                               LayerSource.from_labels(labels))
                self._layers[sid] = layer
            elif name and not layer.name:
                layer.name = name
            return layer

    def _converted(self, layer: _Layer) -> bool:
        return (os.path.exists(os.path.join(self.upper(layer.sid), LAYER_BOOTSTRAP))
                and os.path.exists(self.tar_path(layer.blob_id)))

    def _spawn(self, layer: _Layer) -> None:
        with self._lock:
            if self._closing:
                return
            layer.status = Status.CONVERTING
            layer.error = None
            layer.done.clear()
            layer.cancel.clear()
            layer.thread = threading.Thread(target=self._convert, args=(layer,), daemon=True,
                                            name=f"tarfs-{layer.sid}")
            thread = layer.thread
        thread.start()

    def _limiter(self, ref: str) -> threading.BoundedSemaphore | None:
        if self.opts.max_concurrent <= 0:
            return None
        with self._lock:
            sem = self._limiters.get(ref)
            if sem is None:
                sem = self._limiters[ref] = threading.BoundedSemaphore(self.opts.max_concurrent)
                while len(self._limiters) > _LIMITERS:
                    self._limiters.popitem(last=False)
            self._limiters.move_to_end(ref)
            return sem

    def _convert(self, layer: _Layer) -> None:
        t0 = time.monotonic()
        cpu0, wait0 = thread_cpu_and_wait()
        try:
            src = layer.source
            if src is None:
                raise FailedPrecondition(
                    f"tarfs layer {layer.sid}: its labels do not say where it comes from "
                    f"({L.CRI_IMAGE_REF}, {L.CRI_LAYER_DIGEST})")
            sem = self._limiter(src.ref)
            if sem is not None:
                while not sem.acquire(timeout=0.2):
                    if layer.cancel.is_set():
                        raise Cancelled(f"tarfs layer {layer.sid}: cancelled")
            try:
                log.info("tarfs: converting layer %s (%s)", layer.sid, src.layer_digest)
                diff_id = self._diff_id(src, layer)
                with self._client(src.reference, layer.labels) as client:
                    done = convert_layer(client, src, diff_id, self.opts.cache_dir,
                                         self.upper(layer.sid), layer.cancel)
                if self.backing == "file":
                    erofs.forget_pages(done.tar)  # the mounts read it with direct I/O
                # logged before the next conversion may start (max_concurrent_proc's
                # test reads the spans from these lines)
                # (CPU, and the time runnable without one: what the machine's load took)
                cpu, wait = thread_cpu_and_wait()
                log.info("tarfs: layer %s (%s) converted: %d bytes of tar in %.2f s (%.2f s "
                         "CPU in this thread, %.2f s waiting for a CPU)", layer.sid,
                         src.layer_digest, done.tar_bytes, time.monotonic() - t0, cpu - cpu0,
                         wait - wait0)
            finally:
                if sem is not None:
                    sem.release()
            if self.opts.export.any and not self.opts.export.image:
                self._export_layer(layer)
            status, error = Status.READY, None
        except BaseException as err:  # noqa: BLE001 - reported to whoever waits for it
            if not isinstance(err, Cancelled):
                log.warning("tarfs: layer %s failed to convert: %s", layer.sid, err)
            status, error = Status.FAILED, err
        try:
            if (status is Status.READY and self.opts.warm_metadata
                    and self.opts.mount_mode is TarfsMountMode.LAYER):
                # before its waiters wake: their container's first walk finds the layer's
                # metadata cached, as overlayfs's finds what its unpack left (:mod:`.warm`;
                # done beside the container's start, the walk raced it for the CPUs)
                self._warm_layer(layer)
        finally:
            with self._lock:
                layer.status, layer.error = status, error
                layer.thread = None
                layer.done.set()

    def _warm_layer(self, layer: _Layer) -> None:
        """Mount converted ``layer`` and look its tree up once. Best effort: a mount that
        fails here is tried again, and its error reported, when a container needs the
        layer."""
        boot = os.path.join(self.upper(layer.sid), LAYER_BOOTSTRAP)
        t0 = time.monotonic()
        cpu0, _ = thread_cpu_and_wait()
        try:
            with self._sid_lock(layer.sid):
                if layer.cancel.is_set():
                    return
                if self._mounted.get(layer.sid) != boot:
                    self._mount(layer.sid, boot)
            n = cache_tree(self.mountpoint(layer.sid), layer.cancel.is_set)
        except (OSError, NydusError) as err:
            log.warning("tarfs: layer %s not mounted after its conversion: %s", layer.sid, err)
            return
        cpu, _ = thread_cpu_and_wait()
        log.info("tarfs: layer %s mounted, metadata of %d entries cached in %.2f s (%.2f s "
                 "CPU)%s", layer.sid, n, time.monotonic() - t0, cpu - cpu0,
                 " (cancelled)" if layer.cancel.is_set() else "")

    def _diff_id(self, src: LayerSource, layer: _Layer) -> str | None:
        """The diff id the tar must hash to; None (not checked) when the image config
        cannot be had and upstream's check cannot be made either."""
        try:
            return self.images.get(src, layer.labels).diff_ids.get(src.layer_digest)
        except NydusError as err:
            log.warning("tarfs: layer %s: image config of %s unavailable (%s); its diff id "
                        "is not checked", layer.sid, src.ref, err)
            return None

    def wait_ready(self, sid: str, labels: Mapping[str, str] | None = None) -> None:
        """Wait for layer ``sid``'s conversion. A failed one is tried once more (the
        registry may be back); its error is raised if that fails too. Unavailable when
        the snapshotter stops meanwhile."""
        layer = self._layers.get(sid)
        if layer is None:
            if labels is None or not is_tarfs_layer(labels):
                raise NotFound(f"tarfs layer of snapshot {q(sid)} is not known")
            layer = self._register(sid, "", labels)
            if self._converted(layer):
                layer.status = Status.READY
                layer.done.set()
            else:
                self._spawn(layer)
        for attempt in range(2):
            while not layer.done.wait(0.5):
                if self._closing:
                    raise Unavailable(f"tarfs layer {sid}: the snapshotter is closing")
            if layer.status is Status.READY:
                return
            if attempt == 0 and not self._closing and not isinstance(layer.error, Cancelled):
                log.info("tarfs: converting layer %s again after: %s", sid, layer.error)
                self._spawn(layer)
        raise _layer_error(sid, layer.error)

    # --- run: mounts -----------------------------------------------------------------

    def needs_mounts(self, parents: Sequence[LayerRef]) -> bool:
        return any(is_tarfs_layer(p.labels) for p in parents)

    def lower_dirs(self, parents: Sequence[LayerRef], upper: Callable[[str], str]) -> list[str]:
        """The lower directories of a snapshot over ``parents`` (nearest first): the
        ``fs`` dir of a plain layer, the EROFS mount of a tarfs one (converted and
        mounted now if need be; in ``image`` mode one mount for the tarfs layers from
        the nearest one down, when they are all tarfs). Exports the image's block image
        if asked."""
        top = next((i for i, p in enumerate(parents) if is_tarfs_layer(p.labels)), None)
        if top is None:
            return [upper(p.id) for p in parents]
        chain = list(parents[top:])
        whole = all(is_tarfs_layer(p.labels) for p in chain)
        lowers = [upper(p.id) for p in parents[:top]]
        if self.opts.mount_mode is TarfsMountMode.IMAGE and whole:
            lowers.append(self._image_mount(chain))
        else:
            lowers += [self._layer_mount(p) if is_tarfs_layer(p.labels) else upper(p.id)
                       for p in chain]
        if self.opts.export.any and self.opts.export.image and whole:
            self._export_image(chain)
        return lowers

    def _layer_mount(self, p: LayerRef) -> str:
        mnt = self.mountpoint(p.id)
        boot = os.path.join(self.upper(p.id), LAYER_BOOTSTRAP)
        self.wait_ready(p.id, p.labels)  # not under the lock: a conversion takes it to mount
        with self._sid_lock(p.id):
            if self._mounted.get(p.id) == boot:
                return mnt
            self._mount(p.id, boot)
        return mnt

    def _wait_chain(self, chain: Sequence[LayerRef]) -> None:
        """Wait for the conversions of ``chain``, holding no snapshot's lock: a conversion
        takes its layer's to mount it."""
        for p in reversed(chain):
            self.wait_ready(p.id, p.labels)

    def _image_bootstrap(self, chain: Sequence[LayerRef]) -> str:
        """``image.boot`` of the chain's top layer, merged from the layer bootstraps
        (bottom first) unless it is there."""
        top = chain[0]
        out = os.path.join(self.upper(top.id), IMAGE_BOOTSTRAP)
        if os.path.exists(out):
            return out
        self._wait_chain(chain)  # done by the callers already: cheap
        if len(chain) == 1:
            # one layer: its own bootstrap is the image's
            os.link(os.path.join(self.upper(top.id), LAYER_BOOTSTRAP), out + ".tmp")
            os.replace(out + ".tmp", out)
            return out
        from pynydus.rafs.merge import merge

        t0 = time.monotonic()
        merge([os.path.join(self.upper(p.id), LAYER_BOOTSTRAP) for p in reversed(chain)], out)
        log.info("tarfs: merged %d layers into %s in %.2f s", len(chain), out,
                 time.monotonic() - t0)
        return out

    def _image_mount(self, chain: Sequence[LayerRef]) -> str:
        top = chain[0]
        mnt = self.mountpoint(top.id)
        self._wait_chain(chain)
        with self._sid_lock(top.id):
            boot = self._image_bootstrap(chain)
            if self._mounted.get(top.id) == boot:
                return mnt
            self._mount(top.id, boot)
        return mnt

    def _mount(self, sid: str, boot: str) -> None:
        """Mount ``boot`` with its blobs (cache files named by blob id) on ``sid``'s mnt."""
        mnt = self.mountpoint(sid)
        if sid in self._mounted:  # another bootstrap of this snapshot (mount_mode changed)
            self._umount(sid, strict=True)
        os.makedirs(mnt, mode=0o755, exist_ok=True)
        devices = [self.tar_path(b) for b in _blob_ids(boot)]
        for d in devices:
            if not os.path.exists(d):
                raise FailedPrecondition(f"tarfs: {boot} needs {d}, which is gone")
        if self.backing == "file":
            # Direct I/O from the tars and a wide read-ahead window (docs/decisions.md)
            erofs.mount_erofs(boot, devices, mnt, "file", direct_io=True,
                              read_ahead_kb=FILE_READ_AHEAD_KB)
        else:
            erofs.mount_erofs(boot, devices, mnt, self.backing)
        self._mounted[sid] = boot
        log.info("tarfs: mounted %s with %d tars on %s (%s)", boot, len(devices), mnt,
                 self.backing)

    def _umount(self, sid: str, *, strict: bool = False) -> bool:
        """Unmount ``sid``'s mnt; False (logged) while it is still in use, unless
        ``strict`` (then FailedPrecondition)."""
        mnt = self.mountpoint(sid)
        try:
            erofs.umount_erofs(mnt)
        except OSError as err:
            if strict:
                raise FailedPrecondition(f"tarfs: cannot unmount {mnt}: {err}") from err
            log.warning("tarfs: cannot unmount %s: %s", mnt, err)
            return False
        self._mounted.pop(sid, None)
        return True

    # --- export -----------------------------------------------------------------------

    def _export_layer(self, layer: _Layer) -> None:
        out = os.path.join(self.opts.cache_dir, layer.blob_id + ".layer.disk")
        if os.path.exists(out) and L.NYDUS_LAYER_BLOCK in layer.labels:
            return
        boot = os.path.join(self.upper(layer.sid), LAYER_BOOTSTRAP)
        img = export.plan_bootstrap(boot, {layer.blob_id: self.tar_path(layer.blob_id)})
        res = export.export(img, out, verity=self.opts.export.verity,
                            cancelled=layer.cancel.is_set)
        self._label(layer.sid, layer.name, {L.NYDUS_LAYER_BLOCK: res.block_info})

    def _export_image(self, chain: Sequence[LayerRef]) -> None:
        top = chain[0]
        blob = top.labels[L.NYDUS_TARFS]
        out = os.path.join(self.opts.cache_dir, blob + ".image.disk")
        self._wait_chain(chain)
        with self._sid_lock(top.id):
            layer = self._layers.get(top.id)
            known = layer.labels if layer is not None else top.labels
            if os.path.exists(out) and L.NYDUS_IMAGE_BLOCK in known:
                return
            boot = self._image_bootstrap(chain)
            paths = {p.labels[L.NYDUS_TARFS]: self.tar_path(p.labels[L.NYDUS_TARFS]) for p in chain}
            t0 = time.monotonic()
            res = export.export(export.plan_bootstrap(boot, paths), out,
                                verity=self.opts.export.verity)
            log.info("tarfs: exported %s (%d bytes) in %.2f s", out, res.size,
                     time.monotonic() - t0)
            self._label(top.id, layer.name if layer is not None else "",
                        {L.NYDUS_IMAGE_BLOCK: res.block_info})

    def _label(self, sid: str, name: str, labels: Mapping[str, str]) -> None:
        layer = self._layers.get(sid)
        if layer is not None:
            layer.labels.update(labels)
        if not name:
            log.warning("tarfs: cannot label snapshot %s (%s): its name is unknown", sid, labels)
            return
        try:
            if self.set_labels is not None:
                self.set_labels(name, labels)
        except NotFound:
            pass  # removed meanwhile

    # --- removal, cache ---------------------------------------------------------------

    def detach(self, sid: str) -> None:
        """Snapshot ``sid``'s directory is going: stop its conversion, unmount its EROFS
        mount (kept, and logged, while an overlay still uses it). Idempotent."""
        with self._lock:
            layer = self._layers.pop(sid, None)
        if layer is not None:
            layer.cancel.set()
            thread = layer.thread
            if thread is not None:
                thread.join(_JOIN)
        with self._sid_lock(sid):
            if sid in self._mounted or os.path.ismount(self.mountpoint(sid)):
                self._umount(sid)
        with self._lock:
            self._sid_locks.pop(sid, None)

    def used_blob_ids(self) -> set[str]:
        """Blob ids of every tarfs layer snapshot: their tars and disks stay in the cache."""
        with self._lock:
            return {layer.blob_id for layer in self._layers.values()}

    def usage(self, sid: str, labels: Mapping[str, str]) -> tuple[int, int]:
        """(bytes, files) a committed tarfs layer holds besides its recorded usage: its
        tar and block images in the cache and its bootstraps."""
        size, files = cache_usage(self.opts.cache_dir, labels[L.NYDUS_TARFS])
        for rel in (LAYER_BOOTSTRAP, IMAGE_BOOTSTRAP):
            try:
                st = os.stat(os.path.join(self.upper(sid), rel))
            except FileNotFoundError:
                continue
            size += st.st_blocks * 512
            files += 1
        return size, files

    def status(self, sid: str) -> Status | None:
        layer = self._layers.get(sid)
        return None if layer is None else layer.status


def _blob_ids(boot: str) -> list[str]:
    from pynydus.rafs.read import open_bootstrap

    with open_bootstrap(boot) as bs:
        return [b.blob_id for b in bs.blobs]


def _loop_backing_file(dev: str) -> str:
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


_TAXONOMY: tuple[type[NydusError], ...] = (
    NotFound, FailedPrecondition, InvalidArgument, Unavailable, PermissionDenied,
    NotImplementedFeature, FormatError)


def _layer_error(sid: str, err: BaseException | None) -> NydusError:
    """The conversion's error, in its taxonomy class, saying which layer it was."""
    msg = f"tarfs layer of snapshot {q(sid)} could not be converted: {err}"
    cls = next((c for c in _TAXONOMY if isinstance(err, c)), Unavailable)
    out = cls(msg)
    out.__cause__ = err
    return out
