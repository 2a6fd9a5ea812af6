"""The snapshotter's Prometheus endpoint under upstream's metric names (nydus-snapshotter
``pkg/metrics``), on a snapshotter serving a Nydus image in both daemon modes: the
operation histogram, the process, the blob cache and what each daemon reports."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.api import snapshots_pb2 as pb
from pynydus.host.mount import unmount_all
from tests.harness.snapshotter import Snapshotter

from .support import container_rootfs, pull_nydus_image

pytestmark = pytest.mark.root


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value for every sample."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def one(samples: dict[str, float], pattern: str) -> tuple[str, float]:
    found = [(k, v) for k, v in samples.items() if re.fullmatch(pattern, k)]
    assert len(found) == 1, (pattern, [k for k in samples if k.split("{")[0] in pattern])
    return found[0]


@pytest.fixture(params=["dedicated", "shared"])
def served(request: pytest.FixtureRequest, image: dict, tmp_path: Path
           ) -> Iterator[tuple[Snapshotter, int, Path]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.toml"
    config.write_text(f'version = 1\ndaemon_mode = "{request.param}"\n'
                      f'[metrics]\naddress = "127.0.0.1:{port}"\n')
    snap = Snapshotter(config=config)
    snap.start()
    rootfs = tmp_path / "rootfs"
    try:
        top = pull_nydus_image(snap, image)
        container_rootfs(snap, top, "default/3/c1", rootfs)
        yield snap, port, rootfs
    finally:
        unmount_all(str(rootfs))
        snap.close()


def test_operations_process_and_daemons(served: tuple[Snapshotter, int, Path], image: dict) -> None:
    _snap, port, rootfs = served
    big = (rootfs / "data/big.bin").read_bytes()
    m = scrape(port)
    op = "snapshotter_snapshot_operation_elapsed_milliseconds"
    assert m[f'{op}_count{{snapshot_operation="PREPARE"}}'] == 3.0
    assert m[f'{op}_bucket{{le="1000.0",snapshot_operation="PREPARE"}}'] <= 3.0
    assert m["snapshotter_memory_usage_kilobytes"] > 10_000
    assert m["snapshotter_thread_counts"] >= 2 and m["snapshotter_fd_counts"] >= 3
    assert m["snapshotter_run_time_seconds"] > 0
    assert 0 <= m["snapshotter_cpu_usage_percentage"] <= 100 * 64
    assert m["snapshotter_cache_usage_kilobytes"] >= len(big) // 1024 * 0.9  # big.bin is cached

    ref = image["ref"]
    key, _ = one(m, r'nydusd_image_info\{daemon_id="[^"]+",image_ref="' + re.escape(ref) + r'"\}')
    daemon_id = re.search(r'daemon_id="([^"]+)"', key).group(1)  # type: ignore[union-attr]
    assert m[f'nydusd_rss_kilobytes{{daemon_id="{daemon_id}"}}'] > 1000
    _, running = one(m, r'nydusd_counts\{version="[^"]+"\}')
    assert running >= 1
    assert m[f'nydusd_total_read_bytes{{image_ref="{ref}"}}'] >= len(big)
    assert m[f'nydusd_read_hits{{image_ref="{ref}"}}'] >= 1
    assert m[f'nydusd_read_errors{{image_ref="{ref}"}}'] == 0
    assert m[f'nydusd_cache_total_requests{{image_ref="{ref}"}}'] >= 1
    assert m["nydusd_hung_io_counts"] == 0


def test_cache_gc_counters_after_the_image_goes(served: tuple[Snapshotter, int, Path]) -> None:
    snap, port, rootfs = served
    (rootfs / "data/big.bin").read_bytes()
    unmount_all(str(rootfs))
    stub = snap.stub()
    for key in ("default/3/c1", "default/sha256:bootchain", "default/sha256:blobchain"):
        stub.Remove(pb.RemoveSnapshotRequest(key=key))
    stub.Cleanup(pb.CleanupRequest())
    m = scrape(port)
    op = "snapshotter_snapshot_operation_elapsed_milliseconds"
    assert m[f'{op}_count{{snapshot_operation="REMOVE"}}'] == 3.0
    assert m[f'{op}_count{{snapshot_operation="CLEANUP"}}'] == 1.0
    assert m["snapshotter_cache_blobs_deleted_total"] >= 1
    assert m["snapshotter_cache_blob_deletion_errors_total"] == 0
    assert m["snapshotter_cache_blobs_in_use"] == 0
    assert m["snapshotter_cache_usage_kilobytes"] < 64
    assert not [k for k in m if k.startswith("nydusd_image_info")]
