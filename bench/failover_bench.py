#!/usr/bin/env python3
"""Failover benchmark: N consecutive kill -9 of a serving pynydusd under a reader.

The snapshotter runs with ``recover_policy = "failover"`` (daemon mode ``--mode``); an
image is pulled as containerd's unpacker would, a container rootfs (overlayfs over the
daemon's FUSE mount) is mounted, and a reader thread (``tests.harness.readloop``)
checksums every file of the image again and again, dropping the files' cached pages
after each read so that every pass reaches the daemon. Then, ``--kills`` times: wait
until the spare successor waits in INIT, SIGKILL the daemon serving the image, wait for
the takeover in the snapshotter's log and for two more passes of the reader.

Per kill, the stall is the longest gap between two completed file reads from the kill
to the end of that round. Reported: read errors (exceptions or wrong bytes; target 0),
stall p50 / p99 / max (targets: p99 <= 0.3 s, max <= 1 s), the reader's normal gap
(median of all gaps) for scale, and how many takeovers the snapshotter logged.

    bench/failover_bench.py                 # 100 kills, dedicated mode
    bench/failover_bench.py --mode shared
    bench/failover_bench.py --quick         # 5 kills (CI smoke)
    bench/failover_bench.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pynydus.host.mount import unmount_all
from pynydus.rafs.builder import build
from pynydus.registry.client import RegistryClient
from tests.harness.readloop import ReadLoop, digests
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import make_workdir, remove_tree, wait_until
from tests.integration.nydus.support import REPO as IMAGE_REPO
from tests.integration.nydus.support import container_rootfs, pull_nydus_image

TAKEN_OVER = " taken over by pid "


def make_image(work: Path, reg: Registry) -> dict[str, Any]:
    src = work / "src"
    (src / "data").mkdir(parents=True)
    for i, size in enumerate([4096, 65536, 1 << 20, 3 << 20, 123457, 500000]):
        (src / "data" / f"f{i}.bin").write_bytes(os.urandom(size))
    (src / "etc").mkdir()
    (src / "etc/hello.txt").write_text("hello\n")
    result = build(str(src), str(work / "image.boot"), str(work / "blobs"),
                   compressor="lz4_block")
    with RegistryClient(reg.host, scheme="http") as client:
        for b in result.blobs:
            client.push_blob(IMAGE_REPO, Path(b.path), "sha256:" + b.blob_id)
    return {"src": src, "boot": work / "image.boot",
            "blob_ids": [b.blob_id for b in result.blobs],
            "ref": f"{reg.host}/{IMAGE_REPO}:latest"}


def spare_waiting(snap: Snapshotter) -> bool:
    from pynydus.manager.client import DaemonClient

    for r in snap.daemon_records():
        if r["mode"] == "spare" and r.get("pid") and os.path.exists(r["api_socket"]):
            try:
                return DaemonClient(r["api_socket"], timeout=2).state() == "INIT"
            except Exception:  # noqa: BLE001 - still starting
                return False
    return False


def takeovers(snap: Snapshotter) -> int:
    return snap.log.read_text(errors="replace").count(TAKEN_OVER)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p * (len(s) - 1)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    wd = make_workdir("fobench")
    res: dict[str, Any] = {"kills": args.kills, "mode": args.mode,
                           "host": {"cpus": os.cpu_count(), "kernel": platform.release()}}
    try:
        with Registry(wd / "registry") as reg:
            image = make_image(wd, reg)
            cfg = wd / "config.toml"
            cfg.write_text(f'version = 1\ndaemon_mode = "{args.mode}"\n'
                           '[daemon]\nrecover_policy = "failover"\n')
            with Snapshotter(config=cfg) as snap:
                top = pull_nydus_image(snap, image)
                rootfs = wd / "rootfs"
                container_rootfs(snap, top, "default/3/c1", rootfs)
                stalls: list[float] = []
                try:
                    with ReadLoop(rootfs, digests(image["src"])) as reader:
                        reader.wait_passes(2)
                        for k in range(args.kills):
                            wait_until(lambda: spare_waiting(snap), 120, "a spare in INIT")
                            pids = snap.image_daemon_pids()
                            before = takeovers(snap)
                            t_kill = time.monotonic()
                            os.kill(pids[0], signal.SIGKILL)
                            wait_until(lambda b=before: takeovers(snap) > b, 60,
                                       f"takeover {k + 1}")
                            reader.wait_passes(2, timeout=60)
                            done = reader.done
                            i = next(j for j, t in enumerate(done) if t >= t_kill)
                            window = [b - a for a, b in zip(done[i - 1:], done[i:])]
                            stalls.append(max(window))
                            print(f"kill {k + 1}/{args.kills}: stall {stalls[-1]:.3f} s, "
                                  f"errors so far {len(reader.errors)}", flush=True)
                finally:
                    unmount_all(str(rootfs))
                res["takeovers_logged"] = takeovers(snap)
            res["errors"] = len(reader.errors)
            res["error_samples"] = [e for _, e in reader.errors[:5]]
            res["stall_s"] = {"p50": round(pct(stalls, 0.5), 3), "p99": round(pct(stalls, 0.99), 3),
                              "max": round(max(stalls), 3), "all": [round(s, 3) for s in stalls]}
            res["normal_gap_s"] = round(statistics.median(reader.gaps()), 4)
            res["passes"] = reader.passes
    finally:
        remove_tree(wd)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, help="consecutive kill -9 failovers (default 100)")
    p.add_argument("--mode", choices=["dedicated", "shared"], default="dedicated")
    p.add_argument("--quick", action="store_true", help="5 kills (CI smoke)")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("failover_bench needs root (FUSE and overlay mounts)", file=sys.stderr)
        return 2
    args.kills = args.kills or (5 if args.quick else 100)
    res = run(args)
    s = res["stall_s"]
    print(f"\nfailover benchmark: {res['kills']} kill -9 failovers, {args.mode} mode, "
          f"{res['host']['cpus']} CPUs, kernel {res['host']['kernel']}")
    print("| measurement | value | target |\n|---|---|---|")
    print(f"| read errors (exceptions or wrong bytes) | {res['errors']} | 0 |")
    print(f"| reader stall p50 | {s['p50']} s | - |")
    print(f"| reader stall p99 | {s['p99']} s | <= 0.3 s |")
    print(f"| reader stall max | {s['max']} s | <= 1 s |")
    print(f"| reader's normal gap (median) | {res['normal_gap_s']} s | - |")
    print(f"| takeovers logged | {res['takeovers_logged']} | {res['kills']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
