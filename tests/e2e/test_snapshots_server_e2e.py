"""The snapshots API through a real containerd (1.6 and 2.x) whose proxy plugin ``nydus`` is our
snapshotter (Go's gRPC client: HPACK dynamic table, BDP pings, WINDOW_UPDATEs, calls
multiplexed on one connection), on whichever server ``serve`` picks by default."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pynydus.api import snapshots_pb2 as pb
from pynydus.api import snapshots_pb2_grpc
from tests.harness.containerd import Containerd
from tests.harness.snapshotter import Snapshotter

REPO = Path(__file__).resolve().parents[2]
GC_ROOT = "containerd.io/gc.root"  # keeps containerd's GC off our parentless snapshots


class Ctrd:
    """containerd's Snapshots service for snapshotter ``nydus`` in our namespace."""

    def __init__(self, ctrd: Containerd) -> None:
        self.channel = grpc.insecure_channel("unix:" + str(ctrd.socket))
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self.md = (("containerd-namespace", ctrd.namespace),)

    def prepare(self, key: str, labels: dict[str, str] | None = None) -> list[object]:
        req = pb.PrepareSnapshotRequest(snapshotter="nydus", key=key,
                                        labels={GC_ROOT: "x", **(labels or {})})
        return list(self.stub.Prepare(req, metadata=self.md, timeout=60).mounts)

    def stat(self, key: str) -> pb.Info:
        req = pb.StatSnapshotRequest(snapshotter="nydus", key=key)
        return self.stub.Stat(req, metadata=self.md, timeout=60).info

    def usage(self, key: str) -> pb.UsageResponse:
        return self.stub.Usage(pb.UsageRequest(snapshotter="nydus", key=key), metadata=self.md,
                               timeout=120)

    def list(self) -> list[pb.Info]:
        req = pb.ListSnapshotsRequest(snapshotter="nydus")
        return [i for r in self.stub.List(req, metadata=self.md, timeout=120) for i in r.info]


@pytest.fixture(scope="module")
def ctrd(containerd_version: str) -> Iterator[Ctrd]:
    with Snapshotter(log_level="info") as snap, Containerd(snap.socket,
                                                           version=containerd_version) as ctr:
        ctr.wait_snapshotter()
        client = Ctrd(ctr)
        try:
            yield client
        finally:
            client.channel.close()


def test_list_of_1000_through_containerd_stats_every_snapshot(ctrd: Ctrd) -> None:
    """containerd (1.6 and 2.x) answers List from its database plus one backend Stat per snapshot:
    1,000 Stat calls over one HTTP/2 connection, with our responses exceeding the
    64 KiB windows the client starts with many times over."""
    pad = {"pynydus.test/pad": "p" * 300}
    keys = {f"list-{i:04}" for i in range(1000)}
    for key in sorted(keys):
        ctrd.prepare(key, pad)
    start = time.monotonic()
    infos = ctrd.list()
    took = time.monotonic() - start
    listed = {i.name for i in infos if i.name.startswith("list-")}
    assert listed == keys, f"missing {sorted(keys - listed)[:5]}"
    assert all(i.labels["pynydus.test/pad"] == "p" * 300 for i in infos if i.name in keys)
    print(f"List of {len(infos)} through containerd: {took * 1e3:.0f} ms")


def _upper_dir(mounts: list[object]) -> str:
    m = mounts[0]
    for opt in m.options:  # type: ignore[attr-defined]
        if opt.startswith("upperdir="):
            return opt[len("upperdir="):]
    return m.source  # type: ignore[attr-defined,no-any-return]


def test_stat_calls_are_answered_while_a_slow_call_runs(ctrd: Ctrd, tmp_path: Path) -> None:
    """Usage of an active snapshot walks its upper directory; Stat calls containerd
    multiplexes beside it on the same connection must not queue behind it. The Usage is
    held inside the snapshotter for as long as the test wants: its walk reaches a gate
    FUSE mount (tests/harness/gatefs.py) that answers only when released."""
    upper = _upper_dir(ctrd.prepare("slow-usage"))
    ctrd.prepare("quick")
    for d in range(3):
        sub = os.path.join(upper, f"d{d}")
        os.mkdir(sub)
        for f in range(10):
            os.close(os.open(os.path.join(sub, str(f)), os.O_CREAT | os.O_WRONLY, 0o644))
    gate, control = Path(upper) / "gate", tmp_path / "control"
    gate.mkdir()
    control.mkdir()
    gatefs = subprocess.Popen([sys.executable, "-m", "tests.harness.gatefs", str(gate),
                               str(control)], cwd=REPO)
    usage: dict[str, object] = {}
    worker = threading.Thread(target=lambda: usage.update(r=ctrd.usage("slow-usage")))
    try:
        deadline = time.monotonic() + 30
        while not (control / "mounted").exists() or not os.path.ismount(gate):
            assert time.monotonic() < deadline, "gate FUSE mount did not come up"
            time.sleep(0.01)
        (control / "armed").touch()
        worker.start()
        while not (control / "entered").exists():
            assert time.monotonic() < deadline, "Usage did not reach the gate"
            time.sleep(0.01)
        for _ in range(20):  # all answered while the Usage is provably in flight
            assert ctrd.stat("quick").name == "quick"
        assert worker.is_alive() and not usage
        (control / "release").touch()
        worker.join(60)
        assert not worker.is_alive()
        assert usage["r"].inodes == 1 + 3 + 30 + 1  # type: ignore[attr-defined]
    finally:
        (control / "release").touch()
        subprocess.run(["fusermount3", "-u", "-z", str(gate)], capture_output=True, check=False)
        gatefs.wait(20)
