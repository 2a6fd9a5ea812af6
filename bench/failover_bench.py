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
(median of all gaps) for scale, and how many takeovers the snapshotter logged. The gap
is split into its phases with the timeline each takeover logs (CLOCK_MONOTONIC stamps of
the manager and the successor, comparable with ours): death noticed, successor chosen,
takeover call received, state and fd received, images restored, requests resent and
workers serving, the reader's first read completed; p50 / p99 / max of each, and the
split of the five worst stalls.

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
from tests.harness.failover import spare_waiting, takeovers, timelines
from tests.harness.readloop import ReadLoop, digests
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import make_workdir, remove_tree, wait_until
from tests.integration.nydus.support import REPO as IMAGE_REPO
from tests.integration.nydus.support import container_rootfs, pull_nydus_image

# The steps of a takeover, in order, as the snapshotter logs them (tests.harness.failover
# .timelines); each phase ends at its step and starts at the previous one ("kill" first).
STEPS = [("noticed", "death noticed (pidfd)"),
         ("successor", "successor chosen (the spare)"),
         ("request", "takeover call reached the successor"),
         ("state_received", "state and fd received from the supervisor"),
         ("restored", "images restored, session built"),
         ("resent", "FUSE_NOTIFY_RESEND written"),
         ("serving", "worker threads serving"),
         ("first_read", "first read of the reader completed")]


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


def phases(t_kill: float, timeline: list[dict[str, float]], done: list[float]
           ) -> dict[str, float]:
    """Seconds each phase of one takeover took, from the kill to the reader's first read
    completed after the successor served (empty steps: the snapshotter logged none)."""
    if not timeline:
        return {}
    steps = dict(timeline[0])
    steps["first_read"] = next((t for t in done if t >= steps.get("serving", t_kill)),
                               float("nan"))
    out, last = {}, t_kill
    for name, _ in STEPS:
        if name in steps:
            out[name] = steps[name] - last
            last = steps[name]
    return out


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
                splits: list[dict[str, float]] = []
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
                            split = phases(t_kill, timelines(snap)[before:before + 1], done)
                            splits.append(split)
                            print(f"kill {k + 1}/{args.kills}: stall {stalls[-1]:.3f} s "
                                  f"({' '.join(f'{n} {v:.3f}' for n, v in split.items())}), "
                                  f"errors so far {len(reader.errors)}", flush=True)
                finally:
                    unmount_all(str(rootfs))
                res["takeovers_logged"] = takeovers(snap)
            res["errors"] = len(reader.errors)
            res["error_samples"] = [e for _, e in reader.errors[:5]]
            res["stall_s"] = {"p50": round(pct(stalls, 0.5), 3), "p99": round(pct(stalls, 0.99), 3),
                              "max": round(max(stalls), 3), "all": [round(s, 3) for s in stalls]}
            res["normal_gap_s"] = round(statistics.median(reader.gaps()), 4)
            res["phases_s"] = {}
            for name, _ in STEPS:
                v = [sp[name] for sp in splits if name in sp]
                if v:
                    res["phases_s"][name] = {"p50": round(pct(v, 0.5), 4),
                                             "p99": round(pct(v, 0.99), 4),
                                             "max": round(max(v), 4)}
            worst = sorted(range(len(stalls)), key=lambda j: -stalls[j])[:5]
            res["worst"] = [{"stall": round(stalls[j], 3),
                             **{n: round(v, 4) for n, v in splits[j].items()}} for j in worst]
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
    print("\n| phase (ends when) | p50 | p99 | max |\n|---|---|---|---|")
    for name, what in STEPS:
        f = res["phases_s"].get(name)
        if f:
            print(f"| {what} | {f['p50']:.4f} s | {f['p99']:.4f} s | {f['max']:.4f} s |")
    print("\nworst stalls:", json.dumps(res["worst"]))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
