"""``pynydus ctl`` against a real snapshotter serving a Nydus image and its pynydusd: the
system controller's daemons and records, the snapshotter's metrics, each daemon's info,
metrics, backend and blob cache (nydusctl's reports), the health probe; tables by default,
``--json`` answers equal to what the servers say."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.host.mount import unmount_all
from tests.harness.snapshotter import Snapshotter

from .support import container_rootfs, pull_nydus_image
from .test_system_controller import call

pytestmark = pytest.mark.root

PYNYDUS = Path(sys.executable).parent / "pynydus"


def ctl(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(PYNYDUS), "ctl", *args], check=False,
                          capture_output=True, text=True, timeout=60)
    if ok:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def ctl_json(*args: str) -> object:
    return json.loads(ctl(*args, "--json").stdout)


class Node:
    def __init__(self, snap: Snapshotter, config: Path, system: Path, port: int,
                 mode: str) -> None:
        self.snap, self.config, self.system, self.port, self.mode = snap, config, system, port, mode


@pytest.fixture(params=["dedicated", "shared"])
def node(request: pytest.FixtureRequest, image: dict, tmp_path: Path) -> Iterator[Node]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.toml"
    snap = Snapshotter(config=config)
    system = snap.workdir / "system.sock"
    config.write_text(f'version = 1\ndaemon_mode = "{request.param}"\n'
                      f'[system]\nenable = true\naddress = "{system}"\n'
                      f'[metrics]\naddress = "127.0.0.1:{port}"\n')
    snap.start()
    rootfs = tmp_path / "rootfs"
    try:
        top = pull_nydus_image(snap, image)
        container_rootfs(snap, top, "default/3/c1", rootfs)
        assert (rootfs / "data/small.txt").read_text() == "small\n"
        yield Node(snap, config, system, port, request.param)
    finally:
        unmount_all(str(rootfs))
        snap.close()


def test_ctl_reads_the_snapshotter_and_its_daemons(node: Node, image: dict) -> None:
    sock = ("--sock", str(node.system))
    # daemons: a table naming the serving daemon and its image; --json is the API's answer
    _, before = call(node.system, "GET", "/api/v1/daemons")
    daemons = ctl_json("daemons", *sock)
    _, after = call(node.system, "GET", "/api/v1/daemons")
    # the API's answer: memory and reads move on, and a spare daemon may start meanwhile
    ids = {d["id"] for d in daemons}  # type: ignore[union-attr]
    assert {d["id"] for d in before} <= ids <= {d["id"] for d in after}  # type: ignore[union-attr]
    (serving,) = [d for d in daemons if d["instances"]]  # type: ignore[union-attr]
    text = ctl("daemons", *sock).stdout
    header, *rows = text.splitlines()
    assert header.split() == ["ID", "PID", "STATE", "RSS", "READ", "INSTANCES", "IMAGES"]
    (row,) = [r for r in rows if r.startswith(serving["id"] + " ")]
    assert str(serving["pid"]) in row.split() and "RUNNING" in row and image["ref"] in row
    # the columns, not their widths: a spare starting meanwhile widens STATE
    assert ctl("--config", str(node.config), "daemons").stdout.split("\n")[0].split() == \
        header.split()

    # records: the store's daemons and the image's instance
    records = ctl_json("records", *sock)
    ((sid, _),) = serving["instances"].items()
    assert [i["snapshot_id"] for i in records["instances"]] == [sid]  # type: ignore[index]
    assert serving["id"] in {d["id"] for d in records["daemons"]}  # type: ignore[index]
    text = ctl("records", *sock).stdout
    assert "DAEMON" in text and "SNAPSHOT" in text and image["ref"] in text and sid in text

    # metrics: the exporter's samples, histogram buckets only with --all
    metrics = ["--metrics-address", f"127.0.0.1:{node.port}"]
    samples = ctl_json("metrics", *metrics, "snapshotter_snapshot_operation")
    prepares = [s for s in samples if s["name"].endswith("_count")  # type: ignore[union-attr]
                and s["labels"] == {"snapshot_operation": "PREPARE"}]
    assert [s["value"] for s in prepares] == [3.0]
    text = ctl("metrics", *metrics).stdout
    assert text.splitlines()[0].split() == ["METRIC", "LABELS", "VALUE"]
    assert "snapshotter_snapshot_operation_elapsed_milliseconds_count" in text
    assert "_bucket" not in text and "_bucket" in ctl("--config", str(node.config), "metrics",
                                                       "--all").stdout

    # a daemon's API, by id or by socket: nydusctl's reports, --json the API's answers
    did = serving["id"]
    image_id = ["--id", sid] if node.mode == "shared" else []
    info = ctl_json("daemon", did, "info", *sock)
    assert info["state"] == "RUNNING"  # type: ignore[index]
    text = ctl("daemon", serving["api_socket"], "info").stdout
    assert "Status:                 \"RUNNING\"" in text and "Instances:" in text
    fs = ctl_json("daemon", did, "metrics", *image_id, *sock)
    assert fs["data_read"] >= len("small\n")  # type: ignore[index]
    assert "Read Data:" in ctl("daemon", did, "metrics", *image_id, *sock).stdout
    backend = ctl_json("daemon", did, "backend", *image_id, *sock)
    assert backend["backend_type"] == "registry" and backend["read_count"] > 0  # type: ignore[index]
    assert "Backend Type:" in ctl("daemon", did, "backend", *image_id, *sock).stdout
    cache = ctl_json("daemon", did, "blobcache", *image_id, *sock)
    assert "partial_hits" in cache  # type: ignore[operator]
    assert "Partial Hits:" in ctl("daemon", did, "blobcache", *image_id, *sock).stdout

    # errors: exit 1 naming what failed
    proc = ctl("daemon", "no-such-daemon", "info", *sock, ok=False)
    assert proc.returncode == 1 and "not found" in proc.stderr and did in proc.stderr
    proc = ctl("daemons", "--sock", str(node.system) + ".gone", ok=False)
    assert proc.returncode == 1 and "system controller" in proc.stderr


def test_health_is_ready_only_while_the_snapshotter_serves(node: Node) -> None:
    address = ("--address", str(node.snap.socket))
    assert ctl("health", *address).stdout.startswith("ok: snapshots service on ")
    assert ctl_json("health", *address)["ok"] is True  # type: ignore[index]
    node.snap.stop()
    proc = ctl("health", *address, "--timeout", "3", ok=False)
    assert proc.returncode == 1 and proc.stdout.startswith("not ready: ")
    node.snap.start()
    assert ctl("health", *address).returncode == 0
