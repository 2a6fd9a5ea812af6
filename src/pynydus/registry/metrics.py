"""Plain counters a :class:`~pynydus.registry.client.RegistryClient` keeps.

The daemon exports them to Prometheus (counters and a latency histogram); keeping
them as plain numbers here keeps the client free of the exporter. Updates take a
lock: the daemon reads from many worker threads at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

# Seconds; the same shape as nydusd's backend read latency buckets (1 ms .. 10 s).
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                      1.0, 2.5, 5.0, 10.0)


@dataclass
class RegistryMetrics:
    """Cumulative since the client was made. ``latency_buckets[i]`` counts requests
    whose time to response headers was ``<= LATENCY_BUCKETS[i]`` (non-cumulative per
    bucket; the last slot counts the rest)."""

    requests: int = 0           # HTTP exchanges, incl. token fetches, redirects, retries
    errors: int = 0             # failed exchanges: transport errors and status >= 400
    retries: int = 0            # attempts beyond the first
    bytes_read: int = 0         # blob and manifest body bytes handed to callers
    bytes_written: int = 0      # bytes uploaded (blobs, manifests)
    token_fetches: int = 0      # incl. background renewals
    token_renewals: int = 0     # fetched ahead of expiry by the renewer thread
    redirects: int = 0          # 3xx followed
    redirect_cache_hits: int = 0
    mirror_fallbacks: int = 0   # a mirror failed and the next endpoint was tried
    latency_sum: float = 0.0
    latency_count: int = 0
    latency_buckets: list[int] = field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    status_counts: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def observe(self, latency: float, status: int | None) -> None:
        """One HTTP exchange finished (``status`` None: it failed on the wire)."""
        with self._lock:
            self.requests += 1
            self.latency_sum += latency
            self.latency_count += 1
            i = 0
            while i < len(LATENCY_BUCKETS) and latency > LATENCY_BUCKETS[i]:
                i += 1
            self.latency_buckets[i] += 1
            if status is None or status >= 400:
                self.errors += 1
            if status is not None:
                self.status_counts[status] = self.status_counts.get(status, 0) + 1

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, object]:
        """A consistent copy as plain values (for an exporter or a test)."""
        with self._lock:
            return {
                "requests": self.requests, "errors": self.errors, "retries": self.retries,
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "token_fetches": self.token_fetches, "token_renewals": self.token_renewals,
                "redirects": self.redirects,
                "redirect_cache_hits": self.redirect_cache_hits,
                "mirror_fallbacks": self.mirror_fallbacks,
                "latency_sum": self.latency_sum, "latency_count": self.latency_count,
                "latency_buckets": list(self.latency_buckets),
                "status_counts": dict(self.status_counts),
            }
