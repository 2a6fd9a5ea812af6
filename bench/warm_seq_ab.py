#!/usr/bin/env python3
"""Warm sequential reads after a cache drop: builds of pynydusd, nydusd and native, A/B.

What ``daemon_bench.py``'s warm phase measures (one file, every chunk in the blob cache,
the page cache dropped before each pass, 1 MiB ``read`` calls), for several contenders in
one run, alternating pass by pass, each first in turn; medians and every run printed,
with the daemon's CPU time (utime + stime) per pass. Each contender is a daemon of its
own with its own blob cache, checked byte for byte against the source file after a cache
drop before the passes. For comparing builds of pynydusd (a source tree each, put first
on ``PYTHONPATH``) and the mount's read-ahead window (``ra=KB``, written to the mount's
bdi after start).

    bench/warm_seq_ab.py --variant before=/tmp/before/src --variant after=src
    bench/warm_seq_ab.py --variant ra1=src --variant ra8=src,ra=8192 --variant nydusd=nydusd

Spec: ``NAME=SRC[,ra=KB][,passthrough=0][,env.VAR=VALUE...]``; ``passthrough=0`` turns
the image's passthrough off (``rafs.passthrough``; a build without the key would refuse
it); SRC ``nydusd`` is upstream's daemon
(``scripts/peers.sh nydus-rs``). A source tree of another commit: ``git archive <rev>
src | tar -x -C /tmp/before``. Needs root. Data under ``/var/tmp/pyn-seqab-*``, removed
at the end.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.daemon_bench import (
    MiB,
    alternating,
    drop_caches,
    localfs_cfg,
    nydusd_daemon,
    overlay,
    seq_read,
    wait_settled,
    write_data,
)
from pynydus.daemon.daemon import tune_readahead
from pynydus.rafs.builder import build
from tests.harness.pynydusd import Pynydusd
from tests.harness.util import make_workdir, remove_tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_variant(wd: Path, spec: str) -> tuple[str, Pynydusd]:
    name, rest = spec.split("=", 1)
    src, *opts = rest.split(",")
    kv = dict(o.split("=", 1) for o in opts)
    cfg = localfs_cfg(wd / "blobs", wd / f"{name}-cache")
    passthrough = kv.get("passthrough", "1") != "0"
    if not passthrough:
        cfg["passthrough"] = False
    if src == "nydusd":
        d = nydusd_daemon(wd, name, wd / "seq.boot", cfg)
    else:
        d = Pynydusd(wd, name=name, bootstrap=wd / "seq.boot", config=cfg)
        d.proc.env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()),
                      **{k[4:]: v for k, v in kv.items() if k.startswith("env.")}}
    d.start()
    seq_read(d.mountpoint / "big.bin")  # fills its blob cache
    if src != "nydusd":  # and, with passthrough, makes its copy for the kernel to read
        print(f"{name}: settled {wait_settled(d, materialized=int(passthrough)):.1f} s "
              f"after the first read", flush=True)
    if "ra" in kv:
        tune_readahead(str(d.mountpoint), int(kv["ra"]))
    return name, d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", required=True,
                   help="NAME=SRC[,ra=KB][,passthrough=0][,env.V=X]")
    p.add_argument("--mib", type=int, default=1024, help="size of the file (default 1024)")
    p.add_argument("--repeat", type=int, default=5, help="passes per contender (median)")
    p.add_argument("--json", help="write every run to this file")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("warm_seq_ab needs root (FUSE and overlay mounts, drop_caches)", file=sys.stderr)
        return 2
    wd = make_workdir("seqab")
    daemons: list[Pynydusd] = []
    try:
        src = wd / "src"
        src.mkdir()
        os.chmod(src, 0o755)
        write_data(src / "big.bin", args.mib * MiB, seed=1)
        build(str(src), str(wd / "seq.boot"), str(wd / "blobs"), compressor="lz4_block")
        fns: dict[str, Callable[[], tuple[float, int]]] = {}
        cpu: dict[str, list[float]] = {}
        for spec in args.variant:
            name, d = start_variant(wd, spec)
            daemons.append(d)
            drop_caches()
            if not filecmp.cmp(src / "big.bin", d.mountpoint / "big.bin", shallow=False):
                raise SystemExit(f"{name}: the file read back differs from its source")
            cpu[name] = []

            def one_pass(d: Pynydusd = d, name: str = name) -> tuple[float, int]:
                before = cpu_seconds(d.pid)
                took, n = seq_read(d.mountpoint / "big.bin")
                cpu[name].append(round(cpu_seconds(d.pid) - before, 3))
                return took, n
            fns[name] = one_pass
        load = [os.getloadavg()[0]]
        with overlay(src, wd / "ovl") as ovl:
            def native() -> tuple[float, int]:
                load.append(os.getloadavg()[0])
                return seq_read(ovl / "big.bin")
            got = alternating({**fns, "native": native}, args.repeat, drop_caches)
        size = args.mib * MiB
        nat = got["native"][0]
        print(f"warm sequential, {args.mib} MiB, median of {args.repeat}, alternating; "
              f"1-minute load {min(load):.1f}-{max(load):.1f}")
        print("| contender | MB/s | x native | daemon CPU s/pass | runs s |")
        print("|---|---|---|---|---|")
        out: dict[str, Any] = {"mib": args.mib, "repeat": args.repeat, "load": load}
        for name, (med, n, runs) in got.items():
            assert n == size, (name, n)
            c = cpu.get(name)
            cpu_cell = f"{statistics.median(c):.2f}" if c else "-"
            print(f"| {name} | {size / med / 1e6:.1f} | {nat / med:.2f}x | {cpu_cell} | "
                  f"{' / '.join(f'{r:.2f}' for r in runs)} |")
            out[name] = {"mb_s": round(size / med / 1e6, 1), "runs_s": runs, "cpu_s": c}
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        for d in daemons:
            d.stop()
        remove_tree(wd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
