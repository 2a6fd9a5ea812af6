#!/usr/bin/env python3
"""CPU of one layer's tarfs conversion, built as the driver builds it, this tree against another.

The tarfs driver (``fs_driver = "blockdev"``) converts each layer on one thread of the
snapshotter: the registry's stream is decoded on a second thread (not a process: it is no
regular file), and the converting thread parses the tar, tees it to the cache and builds
the ``tar-tarfs`` bootstrap (``pynydus.tarfs.layer``). Under load that thread's CPU is what
stretches a pull (the driver logs its CPU and its time waiting for a CPU per layer).

Here the layer (a gzip blob; default: the many-files image's 50,000-file layer from
``bench/lazy_images.py``'s OCI layout) is read from its file through the same stream
wrapper, so that decoding happens on a thread as in the driver, and built twice per fresh
process (the cheaper of the two counts: the first pays imports and cold caches). This
checkout and ``--baseline-src`` alternate, each going first in turn, for ``-n`` rounds;
medians of the converting thread's CPU, the process's CPU and the wall time. The two
trees' bootstraps and tars must be byte-identical (checked with every round).

    bench/tarfs_build.py --baseline-src /var/tmp/pyn-old/src -n 5
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.environ.get("PYNYDUS_BENCH_DIR", "/var/tmp/pynydus-bench"))


def default_layer() -> Path:
    """The largest blob of the many-files OCI layout (its 50,000-file layer)."""
    blobs = BENCH_DIR / "oci" / "many-files" / "blobs" / "sha256"
    found = sorted(blobs.glob("*"), key=lambda p: p.stat().st_size) if blobs.is_dir() else []
    if not found:
        sys.exit(f"no layer under {blobs}: run bench/lazy_images.py first, or give --layer")
    return found[-1]


def child(src: str, layer: str, out: str) -> None:
    """Build ``layer`` twice with the pynydus of ``src``; print the cheaper build's figures."""
    sys.path.insert(0, src)
    import io
    import threading

    from pynydus.rafs.builder import build
    from pynydus.tarfs.layer import _file_chunks, _Stream

    best: dict[str, float] | None = None
    for _ in range(2):
        w0, t0, p0 = time.monotonic(), time.thread_time(), time.process_time()
        stream = _Stream(_file_chunks(layer), threading.Event(), layer)
        build(io.BufferedReader(stream, 1 << 20), os.path.join(out, "layer.boot"), out,
              type="tar-tarfs", blob_id=os.path.basename(layer))
        got = {"thread_cpu": time.thread_time() - t0, "process_cpu": time.process_time() - p0,
               "wall": time.monotonic() - w0}
        if best is None or got["thread_cpu"] < best["thread_cpu"]:
            best = got
    print(json.dumps(best))


def run(src: Path, layer: Path, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    r = subprocess.run([sys.executable, __file__, "--child", str(src), str(layer), str(out)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-src", type=Path,
                    help="the other tree's src directory (e.g. from git archive)")
    ap.add_argument("--layer", type=Path, help="a layer blob (gzip, zstd or plain tar)")
    ap.add_argument("-n", "--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the rounds and medians here")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.baseline_src is None:
        ap.error("--baseline-src is required")
    layer = args.layer or default_layer()
    trees = {"baseline": args.baseline_src.resolve(), "this": REPO / "src"}
    work = Path(tempfile.mkdtemp(prefix="pyn-tarfs-build-", dir="/var/tmp"))
    rounds: list[dict[str, object]] = []
    try:
        for r in range(args.rounds):
            order = ["baseline", "this"] if r % 2 == 0 else ["this", "baseline"]
            for name in order:
                load = float(Path("/proc/loadavg").read_text().split()[0])
                got = run(trees[name], layer, work / name)
                rounds.append({"round": r + 1, "tree": name, "load1": load, **got})
                print(f"round {r + 1} {name:8} thread CPU {got['thread_cpu']:.3f} s  process "
                      f"CPU {got['process_cpu']:.3f} s  wall {got['wall']:.3f} s  load1 {load}",
                      flush=True)
            same = all(filecmp.cmp(work / "baseline" / f, work / "this" / f, shallow=False)
                       for f in ("layer.boot", layer.name))
            if not same:
                sys.exit(f"round {r + 1}: the trees' bootstraps or tars differ")
        med = {name: {k: statistics.median(float(x[k]) for x in rounds if x["tree"] == name)  # type: ignore[arg-type]
                      for k in ("thread_cpu", "process_cpu", "wall")} for name in trees}
        loads = [float(x["load1"]) for x in rounds]  # type: ignore[arg-type]
        print(f"\nlayer {layer} ({layer.stat().st_size} bytes), {args.rounds} rounds, load1 "
              f"{min(loads)}-{max(loads)}; outputs byte-identical in every round")
        print("| tree | thread CPU s | process CPU s | wall s |\n|---|---:|---:|---:|")
        for name in trees:
            m = med[name]
            ratio = m["thread_cpu"] / med["baseline"]["thread_cpu"]
            print(f"| {name} | {m['thread_cpu']:.3f} ({ratio:.2f}x) | {m['process_cpu']:.3f} | "
                  f"{m['wall']:.3f} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"layer": str(layer), "rounds": rounds,
                                                   "medians": med}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
