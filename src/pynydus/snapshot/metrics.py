"""Prometheus metrics of the snapshotter, served at ``/v1/metrics`` on ``[metrics] address``.

Two sets. Ours: latency and errors per Snapshots RPC, the daemons the manager supervises.
Upstream's names (nydus-snapshotter ``pkg/metrics``), so that dashboards and alerts made
for it work unchanged:

- ``snapshotter_snapshot_operation_elapsed_milliseconds{snapshot_operation}`` for
  PREPARE, MOUNTS, REMOVE and CLEANUP, with upstream's buckets;
- the process: ``snapshotter_cpu_usage_percentage``, ``_memory_usage_kilobytes``,
  ``_cpu_system_time_seconds``/``_cpu_user_time_seconds`` (since the previous scrape, as
  upstream reports them per collection), ``_fd_counts``, ``_run_time_seconds``,
  ``_thread_counts``;
- the blob cache: ``snapshotter_cache_usage_kilobytes``, ``_cache_blobs_in_use``,
  ``_cache_blobs_deleted_total``, ``_cache_blob_deletion_errors_total``;
- per daemon and image, asked of the daemons' APIs: ``nydusd_counts{version}``,
  ``nydusd_rss_kilobytes{daemon_id}``, ``nydusd_image_info{daemon_id,image_ref}``,
  ``nydusd_total_read_bytes``/``nydusd_read_hits``/``nydusd_read_errors{image_ref}``,
  ``nydusd_cache_*{image_ref}`` and ``nydusd_hung_io_counts``.

Upstream collects the daemon metrics on a timer (``collect_interval``); here they are
collected when scraped, each daemon asked with a short timeout (one that does not answer
is left out of that scrape). With ``credential_renewal_interval``:
``snapshotter_credential_renewals_total{image_ref,result}`` and
``snapshotter_credential_store_entries{image_ref}``. Not exported: the const histograms of
read sizes and latencies, daemon lifetime events.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pynydus.host.proc import proc_status, rss_kib

if TYPE_CHECKING:
    from pynydus.manager.filesystem import NydusFilesystem
    from pynydus.manager.renewal import CredentialRenewal

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
RPC_SECONDS = Histogram(
    "snapshotter_rpc_duration_seconds", "Latency of Snapshots API calls", ["method"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RPC_ERRORS = Counter("snapshotter_rpc_errors", "Snapshots API calls that failed", ["method", "code"],
                     registry=REGISTRY)
OCI_FALLBACKS = Counter("snapshotter_oci_fallbacks", "Images unpacked as OCI because they could "
                        "not be served lazily, by cause", ["cause"], registry=REGISTRY)

# --- upstream's names ----------------------------------------------------------------

OPERATION_MS = Histogram(
    "snapshotter_snapshot_operation_elapsed_milliseconds", "The elapsed time of snapshot operations",
    ["snapshot_operation"], registry=REGISTRY,
    buckets=(0.5, 1, 5, 10, 50, 100, 150, 200, 250, 300, 350, 400, 600, 1000),
)
# Snapshots RPC -> upstream's snapshot_operation label (upstream times these four)
UPSTREAM_OPERATIONS = {"Prepare": "PREPARE", "Mounts": "MOUNTS", "Remove": "REMOVE",
                       "Cleanup": "CLEANUP"}
_FOP_READ = 4  # index of "read" in the daemons' fop_hits/fop_errors arrays
_HUNG_IO_SECONDS = 10.0  # [metrics] hung_io_interval (only its default is accepted)
_DAEMON_TIMEOUT = 2.0  # seconds a daemon gets to answer a scrape's questions


class _ProcessCollector(Collector):
    """The snapshotter process, from /proc/self and getrusage."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.last = (time.monotonic(), *_cpu_times())

    def collect(self) -> Iterator[Any]:
        now, user, system = time.monotonic(), *_cpu_times()
        then, user0, system0 = self.last
        self.last = (now, user, system)
        elapsed = max(now - then, 1e-9)
        yield _gauge("snapshotter_cpu_usage_percentage",
                     "CPU use of the snapshotter since the previous scrape, percent",
                     100.0 * ((user - user0) + (system - system0)) / elapsed)
        yield _gauge("snapshotter_cpu_user_time_seconds", "User CPU time since the previous scrape",
                     user - user0)
        yield _gauge("snapshotter_cpu_system_time_seconds",
                     "System CPU time since the previous scrape", system - system0)
        status = proc_status("self")
        yield _gauge("snapshotter_memory_usage_kilobytes", "Resident memory of the snapshotter",
                     status.get("VmRSS", 0))
        yield _gauge("snapshotter_thread_counts", "Threads of the snapshotter", status.get("Threads", 0))
        try:
            fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            fds = 0
        yield _gauge("snapshotter_fd_counts", "Open file descriptors of the snapshotter", fds)
        yield _gauge("snapshotter_run_time_seconds", "Seconds since the snapshotter started",
                     now - self.started)


class _NydusCollector(Collector):
    """The blob cache and the daemons, asked when scraped."""

    def __init__(self, fs: NydusFilesystem) -> None:
        self.fs = fs

    def collect(self) -> Iterator[Any]:
        fs = self.fs
        yield _gauge("snapshotter_cache_usage_kilobytes", "Disk space of the blob cache",
                     _disk_kib(fs.cache_dir))
        yield _gauge("snapshotter_cache_blobs_in_use",
                     "Blobs the last cache GC found in use", fs.cache_gc.in_use)
        deleted = CounterMetricFamily("snapshotter_cache_blobs_deleted",
                                      "Blobs the cache GC deleted")
        deleted.add_metric([], fs.cache_gc.deleted)
        yield deleted
        errors = CounterMetricFamily("snapshotter_cache_blob_deletion_errors",
                                     "Cache files the cache GC could not delete")
        errors.add_metric([], fs.cache_gc.errors)
        yield errors
        if fs.renewal is not None:
            yield from self._renewal(fs.renewal)
        yield from self._daemons()

    @staticmethod
    def _renewal(renewal: CredentialRenewal) -> Iterator[Any]:
        renewals = CounterMetricFamily("snapshotter_credential_renewals",
                                       "Credential renewal attempts by image and result",
                                       labels=["image_ref", "result"])
        for image, result, n in renewal.metrics():
            renewals.add_metric([image, result], n)
        yield renewals
        entries = GaugeMetricFamily("snapshotter_credential_store_entries",
                                    "Images whose credentials renewal keeps fresh",
                                    labels=["image_ref"])
        for image in sorted(renewal.stats.tracked):
            entries.add_metric([image], 1)
        yield entries

    def _daemons(self) -> Iterator[Any]:
        counts = GaugeMetricFamily("nydusd_counts", "Running daemons by version", labels=["version"])
        rss = GaugeMetricFamily("nydusd_rss_kilobytes", "Resident memory of a daemon",
                                labels=["daemon_id"])
        info = GaugeMetricFamily("nydusd_image_info", "The images each daemon serves",
                                 labels=["daemon_id", "image_ref"])
        per_image = {name: GaugeMetricFamily(name, doc, labels=["image_ref"]) for name, doc in (
            ("nydusd_total_read_bytes", "Bytes read from the image"),
            ("nydusd_read_hits", "Read requests served"),
            ("nydusd_read_errors", "Read requests that failed"),
            ("nydusd_cache_partial_hits", "Blob cache partial hits"),
            ("nydusd_cache_whole_hits", "Blob cache hits"),
            ("nydusd_cache_total_requests", "Blob cache requests"),
            ("nydusd_cache_entries_count", "Blob cache entries"),
            ("nydusd_cache_prefetch_data_bytes", "Bytes prefetched"),
            ("nydusd_cache_prefetch_requests_count", "Prefetch requests"),
            ("nydusd_cache_prefetch_workers", "Prefetch workers"),
            ("nydusd_cache_prefetch_unmerged_chunks", "Prefetch chunks not merged"),
            ("nydusd_cache_buffered_backend_size", "Bytes buffered from the backend"))}
        cache_keys = {"partial_hits": "nydusd_cache_partial_hits",
                      "whole_hits": "nydusd_cache_whole_hits",
                      "total": "nydusd_cache_total_requests",
                      "entries_count": "nydusd_cache_entries_count",
                      "prefetch_data_amount": "nydusd_cache_prefetch_data_bytes",
                      "prefetch_requests_count": "nydusd_cache_prefetch_requests_count",
                      "prefetch_workers": "nydusd_cache_prefetch_workers",
                      "prefetch_unmerged_chunks": "nydusd_cache_prefetch_unmerged_chunks",
                      "buffered_backend_size": "nydusd_cache_buffered_backend_size"}
        versions: dict[str, int] = {}
        hung = 0
        for view in self.fs.daemon_views():
            if view.state != "RUNNING":
                continue
            client = self.fs.daemon_client(view.id, _DAEMON_TIMEOUT)
            if client is None:
                continue
            try:
                version = str((client.info().get("version") or {}).get("package_ver", "unknown"))
                versions[version] = versions.get(version, 0) + 1
                rss.add_metric([view.id], rss_kib(view.pid))
                now = time.time()
                hung += sum(1 for r in client.inflight() or []
                            if now - float(r.get("timestamp_secs", now)) > _HUNG_IO_SECONDS)
                for inst in view.instances:
                    ref = inst["image_id"]
                    info.add_metric([view.id, ref], 1)
                    sid = f"/{inst['snapshot_id']}" if view.shared else None
                    fsm = client.fs_metrics(sid)
                    per_image["nydusd_total_read_bytes"].add_metric([ref], fsm.get("data_read", 0))
                    per_image["nydusd_read_hits"].add_metric([ref], _at(fsm.get("fop_hits"), _FOP_READ))
                    per_image["nydusd_read_errors"].add_metric(
                        [ref], _at(fsm.get("fop_errors"), _FOP_READ))
                    cache = client.blobcache_metrics(sid)
                    for key, name in cache_keys.items():
                        per_image[name].add_metric([ref], float(cache.get(key, 0) or 0))
            except Exception as err:  # noqa: BLE001 - one daemon must not spoil the scrape
                log.debug("metrics of daemon %s: %s", view.id, err)
        for version, n in versions.items():
            counts.add_metric([version], n)
        yield counts
        yield rss
        yield info
        yield from per_image.values()
        yield _gauge("nydusd_hung_io_counts",
                     f"FUSE requests waiting longer than {_HUNG_IO_SECONDS:g} s", hung)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _at(values: Any, i: int) -> float:
    try:
        return float(values[i])
    except (TypeError, IndexError, ValueError):
        return 0.0


def _cpu_times() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def _disk_kib(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total // 1024


_PROCESS_REGISTERED = False


def register_process() -> None:
    """The process collector (once per process)."""
    global _PROCESS_REGISTERED
    if not _PROCESS_REGISTERED:
        REGISTRY.register(_ProcessCollector())
        _PROCESS_REGISTERED = True


def register_filesystem(fs: NydusFilesystem) -> None:
    """Cache and daemon metrics of ``fs``, under upstream's names."""
    REGISTRY.register(_NydusCollector(fs))


class _DaemonCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        s = self.snapshot()
        g = GaugeMetricFamily("snapshotter_daemons", "Daemons supervised, by state", labels=["state"])
        for state, n in s.get("states", {}).items():
            g.add_metric([state], n)
        yield g
        d = GaugeMetricFamily("snapshotter_daemon_deaths", "Daemon deaths noticed since start")
        d.add_metric([], s.get("deaths", 0))
        yield d
        i = GaugeMetricFamily("snapshotter_rafs_instances", "Images served by daemons")
        i.add_metric([], s.get("instances", 0))
        yield i


def register_daemons(snapshot: Callable[[], dict[str, Any]]) -> None:
    REGISTRY.register(_DaemonCollector(snapshot))


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] not in ("/v1/metrics", "/metrics"):
            self.send_error(404)
            return
        body = generate_latest(REGISTRY)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


def serve_metrics(address: str) -> ThreadingHTTPServer:
    """Serve on ``host:port`` (``:9110`` means every interface, as upstream)."""
    host, _, port = address.rpartition(":")
    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), _Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s/v1/metrics", address)
    return server
