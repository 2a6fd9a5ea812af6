"""Prefetch lists at pull: find an image's list in the registry and hand it to its daemon.

An image's list (an OCI artifact referring to the image manifest, ``pynydus optimize
--push``) is looked up in the background as soon as its pull reaches the snapshotter
(the Prepare of its first layer), so that it is at hand when the image is mounted at
the end of the pull; the mount takes that lookup, or starts one beside it. The
manifest digest comes from containerd's label (else one HEAD of the reference), the
referrers from one request (``registry.artifact.ReferrersFinder``: the referrers API, or
the fallback tag once the registry is known to lack it; answers cached). A list found is
fetched (inline in its manifest when small), checked, and handed to the daemon that
serves the image (``PUT /api/v1/prefetch``), which prefetches in its order. No list, a
registry without one, or any failure: nothing happens (a debug line), and the mount never
waits for the lookup.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from pynydus import labels as L
from pynydus.daemon import prefetchlist
from pynydus.daemon.config import parse_daemon_config
from pynydus.daemon.prefetchlist import PrefetchList
from pynydus.daemon.registry_backend import client_from_config
from pynydus.errors import NydusError, Unavailable
from pynydus.registry import media
from pynydus.registry.artifact import ReferrersFinder, Subject, fetch_artifact, push_artifact
from pynydus.registry.reference import parse_reference

if TYPE_CHECKING:
    from pynydus.daemon.config import RegistryConfig
    from pynydus.registry.client import RegistryClient
    from pynydus.registry.reference import Reference

log = logging.getLogger(__name__)

# The registry client is imported with this module, before the snapshotter starts its
# threads: imported by a first lookup's thread, it held the pull's next Prepare for
# 0.5-0.9 s (that Prepare waited on a module the lookup was importing).

# A lookup started at a pull's first Prepare is taken by its mount for this long (a pull
# of a large bootstrap over a slow link takes a while); later mounts look up again.
_EARLY_KEEP = 60.0


class PrefetchListLookup:
    """Looks up images' prefetch lists, each on a thread of its own."""

    def __init__(self) -> None:
        self.finder = ReferrersFinder()
        self._lists: dict[str, PrefetchList] = {}  # artifact digest -> list
        # one client per registry and credentials: building one (an SSL context, a
        # connection pool) costs more than the lookup itself
        self._clients: dict[tuple[str, ...], RegistryClient] = {}
        self._lock = threading.Lock()
        # lookups under way or done, by (image, manifest digest label): (start, future)
        self._started: dict[tuple[str, str], tuple[float, Future[PrefetchList | None]]] = {}
        self._closed = False

    def close(self) -> None:
        """Lookups under way end quietly (their threads are daemon threads: a registry
        that does not answer never holds the snapshotter's exit)."""
        with self._lock:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()

    def _client(self, reg: RegistryConfig) -> RegistryClient:
        key = (reg.host, reg.scheme, reg.auth, reg.registry_token, str(reg.skip_verify),
               ",".join(m.host for m in reg.mirrors))
        with self._lock:
            if self._closed:
                raise Unavailable("prefetch list lookup: closed")
            client = self._clients.get(key)
            if client is None:
                if len(self._clients) >= 32:
                    self._clients.pop(next(iter(self._clients))).close()
                client = self._clients[key] = client_from_config(reg)
            return client

    def start(self, image_ref: str, labels: Mapping[str, str],
              daemon_cfg: Mapping[str, Any] | Callable[[], Mapping[str, Any]]
              ) -> Future[PrefetchList | None]:
        """Look the list of ``image_ref`` up in the background (the registry and
        credentials of its daemon config, or of the config ``daemon_cfg()`` makes on the
        lookup's thread); the future holds it, or None. A lookup of the same image (and
        manifest digest label) started in the last few minutes is taken instead: the
        pull's first Prepare starts it, the mount at the pull's end takes it."""
        key = (image_ref, labels.get(L.CRI_MANIFEST_DIGEST, ""))
        now = time.monotonic()
        with self._lock:
            found = self._started.get(key)
            if found is not None and now - found[0] < _EARLY_KEEP and not found[1].cancelled():
                return found[1]
            fut: Future[PrefetchList | None] = Future()
            self._started[key] = (now, fut)
            for k in [k for k, (t, _) in self._started.items() if now - t >= _EARLY_KEEP]:
                del self._started[k]
        labels = dict(labels)

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            if self._closed:
                fut.set_result(None)
                return
            try:
                cfg = dict(daemon_cfg() if callable(daemon_cfg) else daemon_cfg)
            except Exception as err:  # noqa: BLE001 - no config: no lookup
                log.debug("prefetch list of %s: no daemon config (%s)", image_ref, err)
                fut.set_result(None)
                return
            fut.set_result(self._lookup_quietly(image_ref, labels, cfg))

        threading.Thread(target=run, name="prefetch-list", daemon=True).start()
        return fut

    def forget(self, image_ref: str, labels: Mapping[str, str]) -> None:
        """Drop the kept lookup of an image (its mount failed, or it was unmounted): the
        next mount looks up afresh."""
        with self._lock:
            self._started.pop((image_ref, labels.get(L.CRI_MANIFEST_DIGEST, "")), None)

    @staticmethod
    def deliver(pending: Future[PrefetchList | None], send: Callable[[dict[str, Any]], None],
                what: str) -> None:
        """Once ``pending`` has a list, ``send`` its JSON document (to the daemon), on
        the lookup's thread, or on a thread of its own when the list is already here
        (never on the caller's: a mount does not wait for the daemon's answer)."""

        def done(f: Future[PrefetchList | None]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            plist = f.result()
            if not plist:
                return
            try:
                send(json.loads(plist.to_json()))
                log.info("%s: prefetch list handed to the daemon (%d chunk runs, %d bytes)",
                         what, len(plist.ranges), plist.compressed_bytes)
            except Exception as err:  # noqa: BLE001 - a prefetch is a hint
                log.warning("%s: the daemon did not take the prefetch list: %s", what, err)

        if pending.done():
            threading.Thread(target=done, args=(pending,), name="prefetch-list-send",
                             daemon=True).start()
        else:
            pending.add_done_callback(done)

    def _lookup_quietly(self, image_ref: str, labels: dict[str, str],
                        daemon_cfg: dict[str, Any]) -> PrefetchList | None:
        try:
            return self.lookup(image_ref, labels, daemon_cfg)
        except Exception as err:  # noqa: BLE001 - no list is the ordinary case
            log.debug("prefetch list of %s: none (%s)", image_ref, err)
            return None

    def _registry(self, image_ref: str, daemon_cfg: Mapping[str, Any], what: str
                  ) -> tuple[RegistryConfig, Reference, RegistryClient] | None:
        """The registry config of an image's daemon config, its reference and a client
        (None: the image is not served from a registry)."""
        cfg, _ = parse_daemon_config(json.dumps(daemon_cfg), what)
        if cfg.backend.type != "registry":
            return None
        reg = cfg.backend.registry
        return reg, parse_reference(image_ref), self._client(reg)

    def lookup(self, image_ref: str, labels: Mapping[str, str],
               daemon_cfg: Mapping[str, Any]) -> PrefetchList | None:
        """The newest prefetch list referring to ``image_ref``'s manifest, or None."""
        at = self._registry(image_ref, daemon_cfg, "prefetch list lookup")
        if at is None:
            return None
        reg, ref, client = at
        digest = labels.get(L.CRI_MANIFEST_DIGEST) or ref.digest
        if not digest:
            digest = client.head_manifest(reg.repo, ref.tag or "latest").digest
        found = self.finder.find(client, reg.host, reg.repo, digest, prefetchlist.ARTIFACT_TYPE)
        if not found:
            log.debug("prefetch list of %s (%s): none", image_ref, digest)
            return None
        artifact = str(found[0]["digest"])
        with self._lock:
            cached = self._lists.get(artifact)
        if cached is not None:
            return cached
        data = fetch_artifact(client, reg.repo, artifact, prefetchlist.MEDIA_TYPE,
                              prefetchlist.MAX_BYTES)
        try:
            plist = prefetchlist.parse(data, f"prefetch list {artifact} of {image_ref}")
        except NydusError as err:
            log.warning("%s", err)
            return None
        with self._lock:
            self._lists[artifact] = plist
            if len(self._lists) > 256:
                self._lists.pop(next(iter(self._lists)))
        return plist

    def push(self, image_ref: str, labels: Mapping[str, str], daemon_cfg: Mapping[str, Any],
             plist: PrefetchList) -> str | None:
        """Push ``plist`` beside ``image_ref`` (an artifact whose subject is its manifest,
        as ``pynydus optimize --push`` does) with the registry and credentials of its
        daemon config, unless a list refers to the manifest already (another node's);
        the artifact's digest, or None."""
        at = self._registry(image_ref, daemon_cfg, "prefetch list push")
        if at is None:
            return None
        reg, ref, client = at
        target = labels.get(L.CRI_MANIFEST_DIGEST) or ref.digest or ref.tag or "latest"
        m = client.get_manifest(reg.repo, target, accept=(
            media.OCI_MANIFEST, media.DOCKER_MANIFEST, media.OCI_INDEX, media.DOCKER_MANIFEST_LIST))
        # asked afresh: the lookup's finder may still hold its answer from the mount
        if ReferrersFinder().find(client, reg.host, reg.repo, m.digest, prefetchlist.ARTIFACT_TYPE):
            log.info("prefetch list of %s: one was pushed meanwhile; not pushing ours", image_ref)
            return None
        return push_artifact(client, reg.repo, Subject(m.media_type, m.digest, len(m.data)),
                             prefetchlist.ARTIFACT_TYPE, prefetchlist.MEDIA_TYPE, plist.to_json(),
                             {"org.opencontainers.image.description":
                              "pynydus prefetch list (recorded on a node)"})
