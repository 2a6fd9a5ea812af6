#!/usr/bin/env python3
"""Idle RSS of pynydusd builds beside upstream nydusd, alternating, as daemon_bench.py
measures it: VmRSS of a daemon serving the 50,000-file walk image (localfs backend)
right after it is ready and after three tree walks (os.walk + lstat, page cache dropped
before each); the figure is the larger of the two. Each round starts every daemon once,
in an order that rotates between rounds; medians over ``--repeat`` rounds. Also the
anonymous / file-backed split of the after-walk RSS (``RssAnon``, ``RssFile``): the
bootstrap's pages are file-backed in every daemon.

    sudo .venv/bin/python bench/idle_rss.py                       # this checkout's pynydusd
    sudo .venv/bin/python bench/idle_rss.py --pynydusd base=/work/main/.venv/bin/pynydusd \\
        --pynydusd new=.venv/bin/pynydusd                          # two builds, alternating

Data lives under ``/var/tmp/pyn-idlerss-*`` and is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.daemon_bench import (
    drop_caches,
    localfs_cfg,
    make_walk_tree,
    nydusd_argv_tail,
    start_to_ready,
    stop_proc,
    walk_stat,
)
from pynydus.rafs.builder import build
from tests.harness.peers import peer_bin
from tests.harness.pynydusd import PYNYDUSD
from tests.harness.util import make_workdir, remove_tree, stop_recorded

WALKS = 3  # daemon_bench's --repeat: the walks before its after-walk figure


def memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile (KiB) and the thread count of ``pid``."""
    want = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "Threads": "threads"}
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in want:
                out[want[key]] = int(value.split()[0])
    return out


def one(wd: Path, cfg: Path, name: str, exe: str, tag: str) -> dict[str, Any]:
    extra: tuple[str, ...] = ()
    if exe == "nydusd":
        exe, extra = str(peer_bin("nydus-rs", "nydusd")), tuple(nydusd_argv_tail())
    drop_caches()
    _, p = start_to_ready(wd, wd / "walk.boot", cfg, "d0000/f000", tag, exe=exe, extra=extra)
    try:
        ready = memory(p.pid)
        for _ in range(WALKS):
            drop_caches()
            walk_stat(wd / f"{tag}.mnt")
        walked = memory(p.pid)
    finally:
        stop_proc(p, wd / f"{tag}.mnt")
    return {"ready": ready, "walked": walked, "mb": max(ready["rss"], walked["rss"]) / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pynydusd", action="append", default=[], metavar="NAME=PATH",
                    help="a pynydusd to measure (repeatable; default: this checkout's)")
    ap.add_argument("--peer", choices=["nydusd", "none"], default="nydusd")
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write every sample here")
    args = ap.parse_args(argv)
    daemons = dict(a.split("=", 1) for a in args.pynydusd) or {"pynydusd": PYNYDUSD}
    if args.peer == "nydusd":
        daemons["nydusd"] = "nydusd"
    wd = make_workdir("idlerss")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in daemons}
    try:
        make_walk_tree(wd / "walk-src", args.files)
        build(str(wd / "walk-src"), str(wd / "walk.boot"), str(wd / "walk-blobs"),
              compressor="lz4_block")
        cfg = wd / "walk.json"
        cfg.write_text(json.dumps(localfs_cfg(wd / "walk-blobs", wd / "walk-cache")))
        names = list(daemons)
        for r in range(args.repeat):
            for name in names[r % len(names):] + names[:r % len(names)]:
                got = one(wd, cfg, name, daemons[name], f"{name}{r}")
                runs[name].append(got)
                print(f"round {r} {name}: ready {got['ready']}, after walks {got['walked']}",
                      flush=True)
    finally:
        stop_recorded(wd)
        remove_tree(wd)
    load = os.getloadavg()[0]
    print(f"\nidle RSS, {args.files} files, medians of {args.repeat} (load1 at the end {load:.1f})")
    print("| daemon | after start | after walks | anon / file after walks | idle RSS | vs nydusd |")
    print("|---|---|---|---|---|---|")
    peer = statistics.median(x["mb"] for x in runs["nydusd"]) if "nydusd" in runs else 0.0
    for name, rs in runs.items():
        mb = statistics.median(x["mb"] for x in rs)
        ready = statistics.median(x["ready"]["rss"] for x in rs) / 1024
        walked = statistics.median(x["walked"]["rss"] for x in rs) / 1024
        anon = statistics.median(x["walked"]["anon"] for x in rs) / 1024
        file = statistics.median(x["walked"]["file"] for x in rs) / 1024
        ratio = f"{mb / peer:.2f}x" if peer else "-"
        print(f"| {name} | {ready:.1f} MB | {walked:.1f} MB | {anon:.1f} / {file:.1f} MB | "
              f"{mb:.1f} MB | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
