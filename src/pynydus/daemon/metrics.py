"""The daemon's metrics: nydusd's JSON shapes for the API, and Prometheus text."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pynydus.daemon.fusefs import _FOPS

if TYPE_CHECKING:
    from pynydus.daemon.daemon import Daemon
    from pynydus.daemon.instance import RafsInstance


def _fs(inst: RafsInstance, sid: str) -> dict[str, Any]:
    st = inst.fs_stats
    with st.lock:
        return {
            "files_account_enabled": inst.config.rafs.iostats_files,
            "access_pattern_enabled": inst.config.rafs.access_pattern,
            "measure_latency": True,
            "id": sid,
            "nr_opens": st.nr_opens,
            "data_read": st.data_read,
            "block_count_read": [0] * 8,
            "fop_hits": [st.fop_hits.get(op, 0) for op in _FOPS],
            "fop_errors": [st.fop_errors.get(op, 0) for op in _FOPS],
            "fop_cumulative_latency_total": [st.read_latency_us_total if op == "read" else 0 for op in _FOPS],
            "read_latency_dist": [0] * 8,
        }


def json_metrics(daemon: Daemon, kind: str, instances: list[RafsInstance]) -> Any:
    """The body of GET /api/v1/metrics[/kind] for ``instances``."""
    cs = daemon.cache_stats
    if kind == "fs":
        if len(instances) == 1:
            return _fs(instances[0], "")
        agg: dict[str, Any] = {}
        for inst in instances:
            m = _fs(inst, "")
            for k, v in m.items():
                if isinstance(v, list):
                    agg[k] = [a + b for a, b in zip(agg.get(k, [0] * len(v)), v)]
                elif isinstance(v, int) and not isinstance(v, bool):
                    agg[k] = agg.get(k, 0) + v
                else:
                    agg[k] = v
        return agg or _empty_fs()
    if kind == "backend":
        with cs.lock:
            return {
                "backend_type": instances[0].config.backend.type if instances else "",
                "read_count": cs.backend_requests,
                "read_errors": cs.backend_errors,
                "read_amount_total": cs.backend_bytes,
                "read_cumulative_latency_millis_total": int(cs.backend_latency_ms),
                "read_cumulative_latency_millis_dist": [0] * 8,
                "read_count_block_size_dist": [0] * 8,
                "read_latency_sizes_dist": [[0] * 8 for _ in range(8)],
            }
    if kind == "blobcache":
        files: list[str] = []
        ready = True
        for inst in instances:
            files += inst.underlying_files()
            ready = ready and inst.all_cached()
        p = daemon.prefetcher
        with cs.lock:
            return {
                "id": "",
                "underlying_files": files,
                "store_path": instances[0].config.cache.work_dir if instances else "",
                "partial_hits": 0,
                "whole_hits": cs.hits,
                "total": cs.hits + cs.misses,
                "entries_count": sum(len(i.bs.blobs) for i in instances),
                "prefetch_data_amount": cs.prefetch_bytes,
                "prefetch_requests_count": cs.prefetch_requests,
                "prefetch_workers": p.threads if p else 0,
                "prefetch_unmerged_chunks": 0,
                "prefetch_cumulative_time_millis": int(((p.end or p.begin) - p.begin) * 1000) if p else 0,
                "prefetch_begin_time_secs": int(p.begin) if p else 0,
                "prefetch_begin_time_millis": int(p.begin * 1000) % 1000 if p else 0,
                "prefetch_end_time_secs": int(p.end) if p else 0,
                "prefetch_end_time_millis": int(p.end * 1000) % 1000 if p else 0,
                "buffered_backend_size": 0,
                "data_all_ready": ready and bool(instances),
            }
    if kind == "inflight":
        fs = daemon.fs
        if fs is None:
            return []
        return [{"inode": ino, "opcode": op, "unique": key, "timestamp_secs": int(ts)}
                for key, (ino, op, ts) in list(fs.inflight.items())]
    if kind in ("files", "pattern"):
        return []
    from pynydus.errors import NotFound

    raise NotFound(f"no metrics named {kind!r}")


def _empty_fs() -> dict[str, Any]:
    return {"id": "", "nr_opens": 0, "data_read": 0, "fop_hits": [0] * len(_FOPS),
            "fop_errors": [0] * len(_FOPS)}


class _DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        d = self.daemon
        cs = d.cache_stats
        up = GaugeMetricFamily("nydusd_up_seconds", "Seconds since the daemon started")
        up.add_metric([], time.time() - d.started)
        yield up
        state = GaugeMetricFamily("nydusd_state", "Daemon state (1 for the current one)", labels=["state"])
        for s in ("INIT", "READY", "RUNNING", "STOPPED"):
            state.add_metric([s], 1.0 if d.state == s else 0.0)
        yield state
        with cs.lock:
            values = {
                "nydusd_backend_read_requests_total": (cs.backend_requests, "Ranged requests to the backend"),
                "nydusd_backend_read_bytes_total": (cs.backend_bytes, "Bytes read from the backend"),
                "nydusd_backend_read_errors_total": (cs.backend_errors, "Failed backend reads"),
                "nydusd_cache_hits_total": (cs.hits, "Chunks served from the blob cache"),
                "nydusd_cache_misses_total": (cs.misses, "Chunks fetched into the blob cache"),
                "nydusd_prefetch_bytes_total": (cs.prefetch_bytes, "Bytes fetched by prefetch"),
                "nydusd_digest_failures_total": (cs.digest_failures, "Chunks that failed validation"),
            }
        for name, (value, doc) in values.items():
            c = CounterMetricFamily(name.removesuffix("_total"), doc)
            c.add_metric([], value)
            yield c
        reads = CounterMetricFamily("nydusd_fs_read_bytes", "Bytes returned by FUSE reads")
        reads.add_metric([], sum(i.fs_stats.data_read for i in d.vfs.instances()))
        yield reads
        inflight = GaugeMetricFamily("nydusd_inflight_requests", "FUSE requests in flight")
        inflight.add_metric([], len(d.fs.inflight) if d.fs else 0)
        yield inflight
        images = GaugeMetricFamily("nydusd_mounted_images", "Images served by this daemon")
        images.add_metric([], len(d.vfs.instances()))
        yield images


def prometheus_text(daemon: Daemon) -> bytes:
    registry = CollectorRegistry()
    registry.register(_DaemonCollector(daemon))
    out: bytes = generate_latest(registry)
    return out
