"""pynydusd's counters, and how they are shown: nydusd's JSON shapes for the API, Prometheus.

Counters live with the work they count and are plain values here: ``FsStats`` per mounted
image (FUSE operations, counted once per request by the FUSE layer), ``CacheStats`` per
daemon (blob cache and backend requests). The render functions take those values, never
the daemon, so this module depends on nothing else of the daemon.

Histograms use nydusd's buckets (``nydus-utils/src/metrics.rs``): request sizes <1K, 1K,
4K, 16K, 64K, 128K, 512K, 1M and more; FUSE read latency up to 200 us, 1 ms, 20 ms, 50 ms,
500 ms, 1 s, 2 s and more; backend latency up to 1, 20, 50, 100, 500, 1000, 2000 ms and more.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from pynydus.errors import NotFound

# nydusd's StatsFop order, the index of each counter in the fop_* arrays
FOPS: Final = ("getattr", "readlink", "open", "release", "read", "statfs", "getxattr",
               "listxattr", "opendir", "lookup", "readdir", "readdirplus", "access", "forget",
               "batch_forget")
_FOP_INDEX: Final = {op: i for i, op in enumerate(FOPS)}
_SIZE_BOUNDS: Final = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 128 << 10, 512 << 10, 1 << 20)
_FS_LATENCY_US: Final = (200, 1_000, 20_000, 50_000, 500_000, 1_000_000, 2_000_000)
_BACKEND_LATENCY_MS: Final = (1, 20, 50, 100, 500, 1_000, 2_000)
BUCKETS: Final = 8


def size_bucket(size: int) -> int:
    """nydusd's request-size bucket of ``size`` bytes (0: <1K ... 7: 1M and more)."""
    return bisect.bisect_right(_SIZE_BOUNDS, size)


def fs_latency_bucket(micros: int) -> int:
    """nydusd's FUSE latency bucket (0: <=200 us ... 7: >2 s)."""
    return bisect.bisect_left(_FS_LATENCY_US, micros)


def backend_latency_bucket(millis: int) -> int:
    """nydusd's backend latency bucket (0: <=1 ms ... 7: >2 s)."""
    return bisect.bisect_left(_BACKEND_LATENCY_MS, millis)


def _zeros() -> list[int]:
    return [0] * BUCKETS


@dataclass
class FsStats:
    """One image's FUSE counters, shaped for nydusd's ``GET /api/v1/metrics``."""

    nr_opens: int = 0  # files open now (release decrements)
    data_read: int = 0
    block_count_read: list[int] = field(default_factory=_zeros)
    fop_hits: list[int] = field(default_factory=lambda: [0] * len(FOPS))
    fop_errors: list[int] = field(default_factory=lambda: [0] * len(FOPS))
    fop_cumulative_latency_total: list[int] = field(default_factory=lambda: [0] * len(FOPS))
    read_latency_dist: list[int] = field(default_factory=_zeros)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, op: str, *, error: bool = False, size: int = 0,
               latency_us: int | None = None) -> None:
        """Count one FUSE request ``op``: a hit, or an error; a successful read also adds
        its ``size`` (bytes returned) and, when measured, its latency."""
        i = _FOP_INDEX[op]
        with self.lock:
            if error:
                self.fop_errors[i] += 1
                return
            self.fop_hits[i] += 1
            if op == "read":
                self.data_read += size
                self.block_count_read[size_bucket(size)] += 1
            elif op == "open":
                self.nr_opens += 1
            elif op == "release":
                self.nr_opens = max(0, self.nr_opens - 1)
            if latency_us is not None:
                self.fop_cumulative_latency_total[i] += latency_us
                self.read_latency_dist[fs_latency_bucket(latency_us)] += 1


@dataclass
class CacheStats:
    """One daemon's blob cache and backend counters (all its images together)."""

    hits: int = 0  # chunks served from the cache file
    misses: int = 0  # chunks that had to be fetched
    backend_requests: int = 0  # ranged requests, failed ones included (nydusd's read_count)
    backend_bytes: int = 0
    backend_errors: int = 0
    backend_latency_ms: int = 0
    # per request-size bucket: cumulative latency, requests, and requests per latency bucket
    backend_latency_ms_by_size: list[int] = field(default_factory=_zeros)
    backend_requests_by_size: list[int] = field(default_factory=_zeros)
    backend_latency_by_size: list[list[int]] = field(
        default_factory=lambda: [_zeros() for _ in range(BUCKETS)])
    prefetch_bytes: int = 0
    prefetch_requests: int = 0
    digest_failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def backend_read(self, size: int, millis: int, *, error: bool = False,
                     prefetch: bool = False) -> None:
        """Count one ranged backend request of ``size`` bytes that took ``millis``."""
        s, lat = size_bucket(size), backend_latency_bucket(millis)
        with self.lock:
            self.backend_requests += 1
            self.backend_errors += error
            self.backend_bytes += size
            self.backend_latency_ms += millis
            self.backend_latency_ms_by_size[s] += millis
            self.backend_requests_by_size[s] += 1
            self.backend_latency_by_size[s][lat] += 1
            if prefetch:
                self.prefetch_bytes += size
                self.prefetch_requests += 1


class PrefetchView(Protocol):
    """What the blobcache metrics show of the prefetcher."""

    threads: int
    begin: float
    end: float


# --- nydusd's JSON bodies -----------------------------------------------------------------


def fs_json(stats: Iterable[FsStats], *, files_account_enabled: bool = False,
            access_pattern_enabled: bool = False) -> dict[str, Any]:
    """``GET /api/v1/metrics``: the sum of these images' counters."""
    out: dict[str, Any] = {
        "files_account_enabled": files_account_enabled,
        "access_pattern_enabled": access_pattern_enabled,
        "measure_latency": True,
        "id": "",
        "nr_opens": 0,
        "data_read": 0,
        "block_count_read": _zeros(),
        "fop_hits": [0] * len(FOPS),
        "fop_errors": [0] * len(FOPS),
        "fop_cumulative_latency_total": [0] * len(FOPS),
        "read_latency_dist": _zeros(),
    }
    for st in stats:
        with st.lock:
            out["nr_opens"] += st.nr_opens
            out["data_read"] += st.data_read
            for key in ("block_count_read", "fop_hits", "fop_errors",
                        "fop_cumulative_latency_total", "read_latency_dist"):
                out[key] = [a + b for a, b in zip(out[key], getattr(st, key), strict=True)]
    return out


def backend_json(cs: CacheStats, backend_type: str) -> dict[str, Any]:
    """``GET /api/v1/metrics/backend``."""
    with cs.lock:
        return {
            "backend_type": backend_type,
            "read_count": cs.backend_requests,
            "read_errors": cs.backend_errors,
            "read_amount_total": cs.backend_bytes,
            "read_cumulative_latency_millis_total": cs.backend_latency_ms,
            "read_cumulative_latency_millis_dist": list(cs.backend_latency_ms_by_size),
            "read_count_block_size_dist": list(cs.backend_requests_by_size),
            "read_latency_sizes_dist": [list(row) for row in cs.backend_latency_by_size],
        }


def blobcache_json(cs: CacheStats, *, underlying_files: list[str], store_path: str,
                   entries: int, all_ready: bool, prefetch: PrefetchView | None) -> dict[str, Any]:
    """``GET /api/v1/metrics/blobcache``."""
    p = prefetch
    with cs.lock:
        return {
            "id": "",
            "underlying_files": underlying_files,
            "store_path": store_path,
            "partial_hits": 0,
            "whole_hits": cs.hits,
            "total": cs.hits + cs.misses,
            "entries_count": entries,
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
            "data_all_ready": all_ready,
        }


def inflight_json(inflight: dict[int, tuple[int, str, float]]) -> list[dict[str, Any]]:
    """``GET /api/v1/metrics/inflight``: FUSE requests waiting, keyed by request."""
    return [{"inode": ino, "opcode": op, "unique": key, "timestamp_secs": int(ts)}
            for key, (ino, op, ts) in list(inflight.items())]


def unknown(kind: str) -> NotFound:
    return NotFound(f"no metrics named {kind!r}")


# --- Prometheus -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonSnapshot:
    """What ``GET /metrics`` shows of a daemon, taken when it is asked."""

    state: str
    started: float
    cache: CacheStats
    fs: Sequence[FsStats]
    inflight: int


class _Collector:
    def __init__(self, d: DaemonSnapshot) -> None:
        self.d = d

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        d, cs = self.d, self.d.cache
        up = GaugeMetricFamily("nydusd_up_seconds", "Seconds since the daemon started")
        up.add_metric([], time.time() - d.started)
        yield up
        state = GaugeMetricFamily("nydusd_state", "Daemon state (1 for the current one)",
                                  labels=["state"])
        for s in ("INIT", "READY", "RUNNING", "STOPPED"):
            state.add_metric([s], 1.0 if d.state == s else 0.0)
        yield state
        with cs.lock:
            values = {
                "nydusd_backend_read_requests_total": (cs.backend_requests,
                                                       "Ranged requests to the backend"),
                "nydusd_backend_read_bytes_total": (cs.backend_bytes, "Bytes read from the backend"),
                "nydusd_backend_read_errors_total": (cs.backend_errors, "Failed backend reads"),
                "nydusd_cache_hits_total": (cs.hits, "Chunks served from the blob cache"),
                "nydusd_cache_misses_total": (cs.misses, "Chunks fetched into the blob cache"),
                "nydusd_prefetch_bytes_total": (cs.prefetch_bytes, "Bytes fetched by prefetch"),
                "nydusd_digest_failures_total": (cs.digest_failures,
                                                 "Chunks that failed validation"),
            }
        for name, (value, doc) in values.items():
            c = CounterMetricFamily(name.removesuffix("_total"), doc)
            c.add_metric([], value)
            yield c
        reads = CounterMetricFamily("nydusd_fs_read_bytes", "Bytes returned by FUSE reads")
        reads.add_metric([], sum(st.data_read for st in d.fs))
        yield reads
        inflight = GaugeMetricFamily("nydusd_inflight_requests", "FUSE requests in flight")
        inflight.add_metric([], d.inflight)
        yield inflight
        images = GaugeMetricFamily("nydusd_mounted_images", "Images served by this daemon")
        images.add_metric([], len(d.fs))
        yield images


def prometheus_text(snapshot: DaemonSnapshot) -> bytes:
    """``GET /metrics``. prometheus_client (~60 ms to import) is loaded at the first call,
    off the daemon's start-up path."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(_Collector(snapshot))
    out: bytes = generate_latest(registry)
    return out
