#!/usr/bin/env python3
"""Churn and scale of the snapshotter's daemons: many images pulled, mounted and removed.

Drives a real snapshotter (our harness) through its gRPC socket the way containerd does for
a Nydus image (Prepare of the data layer answered AlreadyExists, Prepare + Commit of the
bootstrap layer, Prepare of a container layer, which mounts the image), for ``--images``
images per cycle and ``--cycles`` cycles, in each daemon mode. The images share one data blob
in a local docker-registry; each has its own snapshots, RAFS instance and, in dedicated
mode, its own pynydusd. Every image reads a file through its RAFS mount.

Measured (figures in docs/benchmarks.md, "Churn and scale"):

* start: the pull (the bootstrap layer's Commit mounts the image early: in dedicated mode
  it takes the spare daemon or starts one) and the container layer's Prepare (which waits
  for that mount), back to back (the next image right after the previous one) and after
  a pause (``--pause`` s, the spare refilled);
* memory with all images of a cycle mounted: per image daemon RSS and PSS (dedicated),
  the shared daemon's RSS and PSS, the snapshotter's RSS;
* remove: the Remove calls of all the images of a cycle (container, bootstrap and data
  snapshots, one after another as containerd's GC does), then Cleanup, which unmounts the
  images and stops their daemons (``remove_s`` + ``cleanup_s`` is what removal costs);
* after each cycle: the shared daemon's and the snapshotter's RSS (against "warm": after
  the five images of the pause series, which import and set up what any image needs),
  and the files, directories, mounts and daemon processes under the root against the
  start.

* memory as images are added: after the 10th, 50th, ... image of a cycle is pulled
  (``--samples``, a 1 s settle each), the mean RSS and PSS of the image daemons and the
  PSS of all the snapshotter's pynydusd processes (template and standby included) per
  image;
* ``--template on,off`` runs each mode with daemons forked from the template and spawned
  (``PYNYDUS_DAEMON_TEMPLATE=0``), one after the other.

``python bench/churn.py --images 100 --cycles 2 --json out.json`` (root; ~10 min);
``--modes shared`` for one mode; ``--quick`` for CI's smoke. It ends with the issue's
targets against the last cycle's figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc

from pynydus import labels as L
from pynydus.api import snapshots_pb2 as pb
from pynydus.host.mountinfo import mountpoints_under
from pynydus.rafs.builder import build
from pynydus.registry.client import RegistryClient
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter

REPO = "bench/churn"


def _rollup(pid: int) -> dict[str, int]:
    """Rss and Pss of ``pid`` in KiB (smaps_rollup); zeros if it is gone."""
    out = {"rss": 0, "pss": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(line.split()[1])
    return out


def _inventory(root: Path) -> dict[str, int]:
    """Files and directories under ``root`` (not inside mounts) and the mounts there."""
    mounts = set(mountpoints_under(str(root)))
    files = dirs = 0
    tops = sorted(str(p.relative_to(root)) for p in root.glob("*/*") if p.is_dir())
    for top, subdirs, names in os.walk(root):
        kept = []
        for d in subdirs:
            p = os.path.join(top, d)
            if p in mounts:
                continue
            kept.append(d)
        subdirs[:] = kept
        dirs += len(kept)
        files += len(names)
    return {"files": files, "dirs": dirs, "mounts": len(mounts), "depth2": tops}


def _stale_dirs(snap: Snapshotter) -> list[str]:
    """Per-daemon directories (socket/, logs/, config/, daemons/ ``<id>``) of daemons that
    are not running."""
    live = set()
    for pid in snap.daemon_pids():
        with contextlib.suppress(OSError, ValueError, IndexError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            live.add(Path(argv[argv.index(b"--apisock") + 1].decode()).parent.name)
    return sorted(f"{top}/{d.name}" for top in ("socket", "logs", "config", "daemons")
                  if (snap.root / top).is_dir()
                  for d in (snap.root / top).iterdir() if d.is_dir() and d.name not in live)


def _shared_pid(snap: Snapshotter) -> int | None:
    for rec in snap.daemon_records():
        if rec.get("mode") == "shared" and rec.get("pid"):
            return int(rec["pid"])
    return None


class Images:
    """Pull, mount and remove images through the snapshotter, as containerd would."""

    def __init__(self, snap: Snapshotter, ref: str, blob_id: str, boot: Path) -> None:
        self.snap, self.ref, self.blob_id, self.boot = snap, ref, blob_id, boot
        self.stub = snap.stub()

    def pull(self, ns: str) -> str:
        cri = {L.CRI_IMAGE_REF: self.ref, L.CRI_LAYER_DIGEST: "sha256:" + self.blob_id}
        blob_chain = f"{ns}/sha256:blobchain"
        try:
            self.stub.Prepare(pb.PrepareSnapshotRequest(key=f"{ns}/1/extract-blob", labels={
                L.TARGET_SNAPSHOT_REF: blob_chain, L.NYDUS_BLOB: "true", **cri}))
            raise RuntimeError("the data layer was not answered AlreadyExists")
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        key, chain = f"{ns}/2/extract-boot", f"{ns}/sha256:bootchain"
        labels = {L.TARGET_SNAPSHOT_REF: chain, L.NYDUS_BOOTSTRAP: "true", **cri}
        (m,) = self.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=blob_chain,
                                                           labels=labels)).mounts
        upper = (str(m.source) if m.type == "bind" else
                 next(o.split("=", 1)[1] for o in m.options if o.startswith("upperdir=")))
        os.makedirs(os.path.join(upper, "image"))
        Path(upper, "image", "image.boot").write_bytes(self.boot.read_bytes())
        self.stub.Commit(pb.CommitSnapshotRequest(key=key, name=chain, labels=labels))
        return chain

    def mount(self, ns: str, chain: str) -> float:
        """The container layer's Prepare (which mounts the image); its seconds. A file is
        then read through the RAFS mount."""
        t0 = time.perf_counter()
        (m,) = self.stub.Prepare(pb.PrepareSnapshotRequest(key=f"{ns}/3/c", parent=chain)).mounts
        took = time.perf_counter() - t0
        lower = next(o.split("=", 1)[1] for o in m.options if o.startswith("lowerdir="))
        Path(lower.split(":")[0], "etc", "hello.txt").read_bytes()
        return took

    def remove(self, ns: str, chain: str) -> None:
        for key in (f"{ns}/3/c", chain, f"{ns}/sha256:blobchain"):
            self.stub.Remove(pb.RemoveSnapshotRequest(key=key))


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _memory(snap: Snapshotter) -> dict[str, Any]:
    """Mean RSS/PSS (KiB) of the image daemons, and the PSS of every pynydusd of the
    snapshotter (image daemons, standby, shared daemon, template) over the images."""
    image_pids = snap.image_daemon_pids()
    per_image = [_rollup(p) for p in image_pids]
    everything = [_rollup(p) for p in snap.daemon_pids() + snap.template_pids()]
    n = max(1, len(image_pids))
    return {"image_daemons": len(image_pids),
            "image_daemon_rss_kib": statistics.mean(r["rss"] for r in per_image) if per_image else 0,
            "image_daemon_pss_kib": statistics.mean(r["pss"] for r in per_image) if per_image else 0,
            "all_pss_per_image_kib": sum(r["pss"] for r in everything) / n,
            "template_pss_kib": sum(_rollup(p)["pss"] for p in snap.template_pids())}


def run_mode(mode: str, n: int, cycles: int, pause: float, image: dict[str, Any],
             template: str = "on", samples: tuple[int, ...] = ()) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="pyn-churn-", dir="/var/tmp"))
    config = work / "config.toml"
    config.write_text(f'version = 1\ndaemon_mode = "{mode}"\n')
    snap = Snapshotter(config=config, log_level="info", tag="churn",
                       env={"PYNYDUS_DAEMON_TEMPLATE": "1" if template == "on" else "0"})
    snap.start()
    try:
        images = Images(snap, image["ref"], image["blob_id"], image["boot"])
        time.sleep(4)  # the spare (dedicated) or the shared daemon is up and settled
        shared = _shared_pid(snap)
        start = {"inventory": _inventory(snap.root), "daemons": len(snap.daemon_pids()),
                 "snapshotter_rss_kib": snap.rss_kib(),
                 "shared_daemon": _rollup(shared) if shared else None}
        out: dict[str, Any] = {"mode": mode, "template": template, "images": n,
                               "start": start, "cycles": []}
        # after a pause: each image once the previous one is settled (spare refilled)
        paused, paused_pulls = [], []
        for i in range(5):
            ns = f"pause{i}"
            time.sleep(pause)
            t0 = time.perf_counter()
            chain = images.pull(ns)
            paused_pulls.append(time.perf_counter() - t0)
            paused.append(images.mount(ns, chain))
            images.remove(ns, chain)
        snap.stub().Cleanup(pb.CleanupRequest())
        time.sleep(pause)
        shared = _shared_pid(snap)  # warm: what the first images imported and set up
        out["warm"] = {"snapshotter_rss_kib": snap.rss_kib(),
                       "shared_daemon": _rollup(shared) if shared else None}
        out["start_after_pause_s"] = {"median": statistics.median(paused), "max": max(paused)}
        out["pull_after_pause_s"] = {"median": statistics.median(paused_pulls),
                                     "max": max(paused_pulls)}
        for c in range(cycles):
            names = [f"c{c}i{i}" for i in range(n)]
            chains, pulls, curve = {}, [], []
            for k, ns in enumerate(names, 1):  # pulled back to back (the Commit mounts it)
                t0 = time.perf_counter()
                chains[ns] = images.pull(ns)
                pulls.append(time.perf_counter() - t0)
                if k in samples and k < n:
                    time.sleep(1.0)  # the early mount under way finishes
                    curve.append({"images": k, **_memory(snap)})
            starts = [images.mount(ns, chains[ns]) for ns in names]  # back to back
            time.sleep(2)
            memory = _memory(snap)
            curve.append({"images": n, **memory})
            shared = _shared_pid(snap)
            mounted = {
                "pull_back_to_back_s": {"median": statistics.median(pulls),
                                        "p90": _pct(pulls, 0.9), "max": max(pulls)},
                "start_back_to_back_s": {"median": statistics.median(starts),
                                         "p90": _pct(starts, 0.9), "max": max(starts)},
                **memory,
                "memory_curve": curve,
                "shared_daemon": _rollup(shared) if shared else None,
                "snapshotter_rss_kib": snap.rss_kib(),
            }
            t0 = time.perf_counter()
            for ns in names:
                images.remove(ns, chains[ns])
            removed = time.perf_counter() - t0
            t1 = time.perf_counter()
            snap.stub().Cleanup(pb.CleanupRequest())
            cleanup = time.perf_counter() - t1
            time.sleep(pause)  # the spare refilled, daemons gone
            shared = _shared_pid(snap)
            deadline = time.monotonic() + 30  # removed images' daemons exit in the background
            while _stale_dirs(snap) and time.monotonic() < deadline:
                time.sleep(0.2)
            after = {"inventory": _inventory(snap.root), "daemons": len(snap.daemon_pids()),
                     "stale_dirs": _stale_dirs(snap),
                     "snapshotter_rss_kib": snap.rss_kib(),
                     "shared_daemon": _rollup(shared) if shared else None}
            out["cycles"].append({"mounted": mounted, "remove_s": removed,
                                  "cleanup_s": cleanup, "after": after})
            print(json.dumps({"mode": mode, "template": template, "cycle": c,
                              **out["cycles"][-1]}), flush=True)
        return out
    finally:
        snap.close()
        shutil.rmtree(work, ignore_errors=True)


def make_image(work: Path, reg: Registry) -> dict[str, Any]:
    src = work / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/hello.txt").write_text("hello from a churned image\n")
    (src / "data").mkdir()
    for i in range(200):
        (src / "data" / f"f{i}").write_bytes(os.urandom(4096))
    result = build(str(src), str(work / "image.boot"), str(work / "blobs"),
                   compressor="lz4_block")
    (blob,) = result.blobs
    with RegistryClient(reg.host, scheme="http") as client:
        client.push_blob(REPO, Path(blob.path), "sha256:" + blob.blob_id)
    return {"ref": f"{reg.host}/{REPO}:latest", "blob_id": blob.blob_id,
            "boot": work / "image.boot"}


def summary(results: list[dict[str, Any]]) -> list[str]:
    """The issue's targets against the figures of the last cycle of each mode (markdown)."""
    rows = ["| mode | figure | measured | target | verdict |", "|---|---|---|---|---|"]

    def row(mode: str, what: str, value: float, target: float, unit: str) -> None:
        verdict = "meets" if value <= target else "MISSES"
        rows.append(f"| {mode} | {what} | {value:.2f} {unit} | <= {target:g} {unit} | {verdict} |")

    for r in results:
        last, n = r["cycles"][-1], r["images"]
        mode = r["mode"] if r.get("template", "on") == "on" else f"{r['mode']} (spawned)"
        m = last["mounted"]
        row(mode, "pull, back to back (median)", m["pull_back_to_back_s"]["median"], 0.2, "s")
        row(mode, "container start, back to back (p90)", m["start_back_to_back_s"]["p90"],
            0.2, "s")
        row(mode, f"remove {n} images + Cleanup", last["remove_s"] + last["cleanup_s"],
            5.0 * n / 100, "s")
        if r["mode"] == "dedicated":
            row(mode, "PSS per image daemon", m["image_daemon_pss_kib"] / 1024, 10, "MB")
        else:
            row(mode, "shared daemon RSS after removal / warm",
                last["after"]["shared_daemon"]["rss"] / r["warm"]["shared_daemon"]["rss"],
                1.1, "x")
        row(mode, "snapshotter RSS after / warm",
            last["after"]["snapshotter_rss_kib"] / r["warm"]["snapshotter_rss_kib"], 1.1, "x")
        row(mode, "directories of stopped daemons left", len(last["after"]["stale_dirs"]), 0, "")
        start, end = r["start"], last["after"]
        for what in ("files", "dirs", "mounts"):
            a, b = start["inventory"][what], end["inventory"][what]
            row(mode, f"{what} under the root, end / start ({a} -> {b})", b / max(1, a), 1.1, "x")
        row(mode, f"daemon processes, end / start ({start['daemons']} -> {end['daemons']})",
            end["daemons"] / max(1, start["daemons"]), 1.1, "x")
    return rows


def curve(results: list[dict[str, Any]]) -> list[str]:
    """Memory and start latency against the number of images (markdown): per cycle, and
    within each cycle as images are added."""
    head = ("| mode | cycle | images churned | mounted | start median / p90 (s) | "
            "PSS per image daemon (MB) | all daemons' PSS per image (MB) | snapshotter RSS "
            "after (MB) | shared daemon RSS after (MB) |")
    rows = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mode = r["mode"] if r.get("template", "on") == "on" else f"{r['mode']} (spawned)"
        for c, cyc in enumerate(r["cycles"]):
            m = cyc["mounted"]
            after = cyc["after"]
            shared = after["shared_daemon"]["rss"] / 1024 if after["shared_daemon"] else 0
            for point in m.get("memory_curve", []):
                last = point["images"] == r["images"]
                starts = (f"{m['start_back_to_back_s']['median']:.3f} / "
                          f"{m['start_back_to_back_s']['p90']:.3f}" if last else "")
                rows.append(
                    f"| {mode} | {c + 1} | {(c + 1) * r['images']} | {point['images']} | "
                    f"{starts} | {point['image_daemon_pss_kib'] / 1024:.1f} | "
                    f"{point['all_pss_per_image_kib'] / 1024:.1f} | "
                    + (f"{after['snapshotter_rss_kib'] / 1024:.0f} | {shared:.0f} |" if last
                       else "| |"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--modes", default="dedicated,shared")
    ap.add_argument("--pause", type=float, default=4.0, help="seconds of a pause")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--quick", action="store_true", help="3 images, one cycle (CI's smoke)")
    ap.add_argument("--template", default="on", help="on, off or on,off: daemons forked "
                    "from the template, spawned, or each mode both ways")
    ap.add_argument("--samples", default="10,50", help="image counts at which memory is "
                    "also sampled during the pulls")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.cycles, args.pause = 3, 1, 1.0
    work = Path(tempfile.mkdtemp(prefix="pyn-churn-img-", dir="/var/tmp"))
    results = []
    try:
        with Registry() as reg:
            image = make_image(work, reg)
            samples = tuple(int(x) for x in args.samples.split(",") if x)
            for mode in args.modes.split(","):
                for template in args.template.split(","):
                    results.append(run_mode(mode, args.images, args.cycles, args.pause, image,
                                            template, samples))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"load": os.getloadavg(), "results": results, "summary": summary(results),
           "curve": curve(results)}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    print("\n".join(doc["curve"]))
    print()
    print("\n".join(doc["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
