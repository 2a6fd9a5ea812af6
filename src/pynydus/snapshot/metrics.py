"""Prometheus metrics of the snapshotter, served at ``/v1/metrics`` on ``[metrics] address``.

Operation latency per Snapshots RPC (upstream times Prepare, Mounts, Remove and
Cleanup), errors per RPC, and the daemons the manager supervises.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
RPC_SECONDS = Histogram(
    "snapshotter_rpc_duration_seconds", "Latency of Snapshots API calls", ["method"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RPC_ERRORS = Counter("snapshotter_rpc_errors", "Snapshots API calls that failed", ["method", "code"],
                     registry=REGISTRY)


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
