"""Prefetch lists learned on a node: recorded from an image's first container here.

With ``[experimental.prefetch_list] record = true``, an image whose lookup at mount found
no list is watched: once its first reader (the node's first container of it) has read
and its reads have gone quiet for ``_QUIET`` seconds (a start-up is the burst of first
reads after the container starts), or ``record_timeout`` after its first read at the
latest, the daemon's access trace becomes a list (``prefetchlist.from_trace``). The list
is written to ``<root>/prefetch-lists/<manifest digest>.json``, and with ``push = true``
pushed beside the image as ``pynydus optimize --push`` does (unless another node's list
appeared meanwhile), so the next node that pulls the image prefetches it. One recording
per image and snapshotter process; everything runs on a daemon thread of its own, and
any failure (a daemon gone, a registry refusing the push) is a log line.

Watching costs one ``GET /api/v1/metrics/pattern`` (the files read so far, without their
paths) every ``_POLL`` seconds until the image is first read, then one trace.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from pynydus import labels as L
from pynydus.daemon import prefetchlist
from pynydus.daemon.prefetchlist import PrefetchList
from pynydus.manager.client import DaemonClient
from pynydus.manager.prefetchlookup import PrefetchListLookup

log = logging.getLogger(__name__)

_POLL = 0.5
_QUIET = 2.0
# An image nobody reads within this long after its mount is not watched any more.
_WAIT_FIRST_READ = 3600.0

# (the daemon's API client, the image's mountpoint in it), or None once it is unmounted
DaemonOf = Callable[[], tuple[DaemonClient, str] | None]


class ListRecorder:
    """Records the lists of images mounted without one (see the module's doc)."""

    def __init__(self, root: str, lookup: PrefetchListLookup, *, push: bool,
                 timeout: float) -> None:
        self.dir = os.path.join(root, "prefetch-lists")
        self.lookup = lookup
        self.push = push
        self.timeout = timeout
        self._watched: set[str] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.recorded: list[tuple[str, PrefetchList]] = []  # (image, list), for tests

    def close(self) -> None:
        self._closed.set()

    def after_lookup(self, pending: Future[PrefetchList | None], image_ref: str,
                     labels: Mapping[str, str], cfg: Mapping[str, Any],
                     daemon_of: DaemonOf) -> None:
        """Once ``pending`` (the image's lookup) found no list, record one."""
        key = labels.get(L.CRI_MANIFEST_DIGEST) or image_ref
        labels, cfg = dict(labels), dict(cfg)

        def done(f: Future[PrefetchList | None]) -> None:
            if f.cancelled() or f.exception() is not None or f.result():
                return
            with self._lock:
                if key in self._watched or self._closed.is_set():
                    return
                self._watched.add(key)
            threading.Thread(target=self._record, args=(image_ref, labels, cfg, daemon_of),
                             name="prefetch-record", daemon=True).start()

        pending.add_done_callback(done)

    def _record(self, image_ref: str, labels: dict[str, str], cfg: dict[str, Any],
                daemon_of: DaemonOf) -> None:
        try:
            trace = self._watch(daemon_of)
            if trace is None:
                return
            plist = prefetchlist.from_trace(trace)
            if not plist:
                return
            path = self._save(labels.get(L.CRI_MANIFEST_DIGEST) or image_ref, plist)
            log.info("prefetch list of %s recorded from its first container: %d files, %d "
                     "chunk runs, %d bytes (%s)", image_ref, len(plist.files),
                     len(plist.ranges), plist.compressed_bytes, path)
            self.recorded.append((image_ref, plist))
            if self.push:
                digest = self.lookup.push(image_ref, labels, cfg, plist)
                if digest:
                    log.info("prefetch list of %s pushed as %s", image_ref, digest)
        except Exception as err:  # noqa: BLE001 - a recording is a bonus
            log.warning("prefetch list of %s: recording failed: %s", image_ref, err)

    def _watch(self, daemon_of: DaemonOf) -> dict[str, Any] | None:
        """The image's trace once its first reader's reads have gone quiet; None if it
        is unmounted, never read, or the snapshotter closes."""
        start = time.monotonic()
        first = 0.0
        count, changed = 0, 0.0
        while not self._closed.wait(_POLL):
            where = daemon_of()
            if where is None:
                return None
            client, mountpoint = where
            now = time.monotonic()
            n = len(client.metrics("pattern", mountpoint) or [])
            if n == 0:
                if now - start > _WAIT_FIRST_READ:
                    return None
                continue
            if not first:
                first = changed = now
            if n != count:
                count, changed = n, now
            if now - changed >= _QUIET or now - first >= self.timeout:
                trace: dict[str, Any] = client.metrics("trace", mountpoint)
                return trace
        return None

    def _save(self, key: str, plist: PrefetchList) -> str:
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, key.replace("/", "_").replace(":", "_") + ".json")
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(plist.to_json())
        os.replace(tmp, path)
        return path
