#!/usr/bin/env python3
"""pynydusd before/after: two checkouts' pynydusd beside upstream nydusd, alternating.

The two phases of ``bench/daemon_bench.py`` that carry pynydusd's own CPU most (its
read path and its metadata answers), run for three daemons in one run, the order
rotating each round so each goes first equally often:

  walk     os.walk + lstat of 50,000 files (500 directories), caches dropped before
           each walk; each daemon mounted once (localfs backend), walked ``--repeat``
           times. Daemon CPU (utime+stime) per walk beside the wall time.
  random   16 reader threads x ``--reads`` 4 KiB preads at random aligned offsets of a
           ``--mib`` MiB file (POSIX_FADV_RANDOM), empty blob cache, loopback registry;
           a new daemon per run. Daemon CPU per run, FUSE reads that reached the daemon
           and backend requests beside the wall time.

``base`` is pynydusd run from the sources in ``--base-src`` (``PYTHONPATH``: a checkout
of the baseline commit, e.g. ``git archive main | tar -x -C DIR``, then ``DIR/src``);
``cand`` is this checkout's; ``nydusd`` is upstream 2.2 (``scripts/peers.sh``). Medians
per daemon, and each pynydusd's median over nydusd's, are printed as JSON, with the
1-minute load before and after each phase. ``--spy`` records the candidate with py-spy
(only the samples holding the GIL: where pynydusd's Python time goes) next to the JSON.

    sudo .venv/bin/python bench/daemon_ab.py --base-src /var/tmp/base/src --json ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.daemon_bench import (
    MiB,
    drop_caches,
    localfs_cfg,
    make_walk_tree,
    nydusd_argv_tail,
    random_reads,
    registry_cfg,
    walk_stat,
    write_data,
)
from pynydus.daemon.metrics import FOPS
from pynydus.rafs.builder import build
from pynydus.registry.client import RegistryClient
from tests.harness.peers import peer_bin
from tests.harness.pynydusd import Pynydusd
from tests.harness.registry import Registry
from tests.harness.util import make_workdir, remove_tree


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Runner:
    def __init__(self, wd: Path, base_src: str, kinds: list[str]) -> None:
        self.wd, self.base_src, self.kinds = wd, base_src, kinds
        self.n = 0

    def daemon(self, kind: str, boot: Path, cfg: dict[str, Any]) -> Pynydusd:
        self.n += 1
        tag = f"{kind}{self.n}"
        if kind == "nydusd":
            d = Pynydusd(self.wd, name=tag, bootstrap=boot, config=cfg,
                         extra_args=tuple(nydusd_argv_tail()))
            d.proc.argv[0] = str(peer_bin("nydus-rs", "nydusd"))
        else:
            d = Pynydusd(self.wd, name=tag, bootstrap=boot, config=cfg)
            if kind == "base":
                d.proc.env = {**os.environ, "PYTHONPATH": self.base_src}
        d.start()
        return d

    def rounds(self, repeat: int) -> list[list[str]]:
        k = self.kinds
        return [k[r % len(k):] + k[:r % len(k)] for r in range(repeat)]


def spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([exe, "record", "-p", str(pid), "-o", str(out), "-f", "raw",
                             "-r", "200", "--threads", "--nonblocking", "--gil"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(args: argparse.Namespace) -> dict[str, Any]:
    wd = make_workdir("dab")
    kinds = ["base", "cand", "nydusd"]
    r = Runner(wd, args.base_src, kinds)
    res: dict[str, Any] = {"config": vars(args), "load1": [load1()]}
    try:
        (wd / "seq-src").mkdir()
        write_data(wd / "seq-src" / "big.bin", args.mib * MiB, seed=1)
        seq = build(str(wd / "seq-src"), str(wd / "seq.boot"), str(wd / "sb"),
                    compressor="lz4_block")
        make_walk_tree(wd / "walk-src", args.files)
        build(str(wd / "walk-src"), str(wd / "walk.boot"), str(wd / "wb"), compressor="lz4_block")
        res["load1"].append(load1())

        ds = {k: r.daemon(k, wd / "walk.boot", localfs_cfg(wd / "wb", wd / f"wcache-{k}"))
              for k in kinds}
        try:
            for order in r.rounds(args.repeat):
                for k in order:
                    drop_caches()
                    c0 = cpu_s(ds[k].pid)
                    took, files = walk_stat(ds[k].mountpoint)
                    assert files == args.files, files
                    res.setdefault("walk", {}).setdefault(k, []).append(
                        {"s": round(took, 3), "cpu_s": round(cpu_s(ds[k].pid) - c0, 2)})
            res["rss_kib_after_walks"] = {k: ds[k].rss_kib() for k in kinds}
        finally:
            for d in ds.values():
                d.stop()
        res["load1"].append(load1())

        registry = Registry(wd / "registry")
        registry.start()
        try:
            blob = seq.blob_ids[-1]
            with RegistryClient(registry.host, scheme="http", timeout=120) as c:
                c.push_blob("bench/seq", str(wd / "sb" / blob), f"sha256:{blob}")
            for rnd, order in enumerate(r.rounds(args.repeat)):
                for k in order:
                    d = r.daemon(k, wd / "seq.boot", registry_cfg(
                        registry.host, "bench/seq", wd / f"rcache-{k}-{rnd}"))
                    try:
                        drop_caches()
                        sp = spy(d.pid, wd / f"spy-{rnd}.txt") if args.spy and k == "cand" else None
                        if sp is not None:
                            time.sleep(1.0)  # py-spy attached
                        c0 = cpu_s(d.pid)
                        took, reads, lat = random_reads(d.mountpoint / "big.bin", args.mib * MiB,
                                                        16, args.reads, seed=7)
                        run_cpu = cpu_s(d.pid) - c0
                        if sp is not None:
                            sp.send_signal(2)
                            sp.wait(30)
                        lat.sort()
                        row = {"s": round(took, 3), "iops": round(reads / took),
                               "cpu_s": round(run_cpu, 2), "p50_ms": round(lat[len(lat) // 2], 2),
                               "p99_ms": round(lat[int(len(lat) * 0.99)], 2)}
                        if k != "nydusd":
                            row["daemon_reads"] = d.get("/api/v1/metrics")["fop_hits"][
                                FOPS.index("read")]
                            row["backend_reads"] = d.backend_metrics()["read_count"]
                        res.setdefault("random", {}).setdefault(k, []).append(row)
                    finally:
                        d.stop()
        finally:
            registry.stop()
        res["load1"].append(load1())
        if args.spy:
            for f in wd.glob("spy-*.txt"):
                shutil.copy(f, Path(args.json or ".").resolve().parent / f.name)
    finally:
        if not args.keep:
            remove_tree(wd)
    summary: dict[str, Any] = {}
    for phase in ("walk", "random"):
        med = {k: {"s": statistics.median(x["s"] for x in runs),
                   "cpu_s": statistics.median(x["cpu_s"] for x in runs)}
               for k, runs in res[phase].items()}
        for k in ("base", "cand"):
            med[k]["time_vs_nydusd"] = round(med[k]["s"] / med["nydusd"]["s"], 2)
        summary[phase] = med
    res["summary"] = summary
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-src", required=True, help="the baseline's src directory")
    p.add_argument("--mib", type=int, default=256, help="size of the random-read file")
    p.add_argument("--files", type=int, default=50_000)
    p.add_argument("--reads", type=int, default=300, help="random reads per reader")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--spy", action="store_true", help="py-spy (GIL samples) on the candidate")
    p.add_argument("--json", help="write all figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("daemon_ab needs root (FUSE mounts, drop_caches)", file=sys.stderr)
        return 2
    res = run(args)
    print(json.dumps(res["summary"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
