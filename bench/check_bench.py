#!/usr/bin/env python3
"""``pynydus check-image`` against ``pynydus convert`` of the same image, in the same run.

An image is built offline (the lazy-pull benchmark's generators, ``bench/lazy_images.py``),
pushed to a private loopback ``docker-registry`` and converted once (not timed). Then,
``--reps`` times (default 3), alternating which goes first so a change of load on the
shared machine falls on both:

* **convert**: ``pynydus convert`` into a fresh repository with an empty layer cache
  (pull, build, push: what a conversion costs);
* **check**: ``pynydus check-image --source SRC --target NYDUS`` of the first conversion
  (pull the source layers and compare them with every file of the Nydus image read
  from its blobs).

Reported: the median of each (wall and CPU seconds of the command and its children) and
the ratios check/convert (target: at most 1.0). When
upstream's ``nydusify`` is installed (``scripts/peers.sh nydusify``; it does not build by
name through the Go proxy we reach), ``nydusify check`` of the same pair is timed too.

Images (``--images``, comma separated):

  many-files  busybox + 50,000 files of 64 B..4 KiB in 100 directories (lab/many-files)
  docs        busybox + 2,000 text documents of ~100 KB (~200 MB)
  shards      busybox + 40 x 10 MiB incompressible files

    bench/check_bench.py                           # many-files, 3 rounds
    bench/check_bench.py --images many-files,docs --json out.json
    bench/check_bench.py --quick                   # CI smoke: 2,000 small files, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import lazy_images as li

from tests.harness import peers
from tests.harness.registry import Registry

WORK = Path(os.environ.get("PYNYDUS_CHECK_BENCH_DIR", "/var/tmp/pynydus-bench-check"))


def _quick_many(d: Path) -> None:
    li.tree_many(d, count=2000, per_dir=200)


TREES: dict[str, list[tuple[str, Callable[[Path], None]]]] = {
    "many-files": [("busybox", li.tree_busybox), ("many", li.tree_many)],
    "docs": [("busybox", li.tree_busybox), ("docs", li.tree_docs)],
    "shards": [("busybox", li.tree_busybox), ("shards", li.tree_shards)],
    "quick": [("busybox", li.tree_busybox), ("many-quick", _quick_many)],
}


def layout(name: str) -> tuple[Path, dict[str, Any]]:
    """The image's OCI layout under WORK, built once (its generators are seeded)."""
    li.WORK = WORK
    out = WORK / "oci" / name
    meta = WORK / "oci" / f"{name}.json"
    if meta.exists() and (out / "index.json").exists():
        return out, json.loads(meta.read_text())
    dirs = [li.source_tree(lname, fill, False) for lname, fill in TREES[name]]
    info = li.write_layout(out, dirs, ["/bin/sh"])
    meta.write_text(json.dumps(info))
    return out, info


def timed(argv: list[str]) -> tuple[float, float]:
    """Run argv; (wall seconds, CPU seconds of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=7200, check=False)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])}… failed ({r.returncode}):\n"
                         f"{r.stdout[-2000:]}{r.stderr[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def nydusify() -> Path | None:
    try:
        return peers.peer_bin("nydusify", "nydusify")
    except (peers.PeerMissing, KeyError):
        return None


def bench_image(name: str, reps: int, reg: Registry, tmp: Path) -> dict[str, Any]:
    lay, info = layout(name)
    src = reg.ref(f"check/{name}")
    li.push_layout(lay, src)
    py = sys.executable
    exe = [py, "-m", "pynydus.cli.main"]
    ins = ["--source-insecure", "--target-insecure"]
    n = 0

    def convert() -> tuple[str, tuple[float, float]]:
        nonlocal n
        n += 1
        dst = reg.ref(f"check/{name}-nydus{n}")
        took = timed([*exe, "convert", "--source", src, "--target", dst, *ins,
                      "--cache-dir", str(tmp / f"cache-{name}-{n}"), "--progress", "quiet"])
        return dst, took

    target, (first, _) = convert()
    check_argv = [*exe, "check-image", "--source", src, "--target", target, *ins]
    conv: list[tuple[float, float]] = []
    check: list[tuple[float, float]] = []
    upstream: list[float] = []
    nyd = nydusify()
    for i in range(reps):
        order = ["convert", "check"] if i % 2 == 0 else ["check", "convert"]
        for what in order:
            if what == "convert":
                conv.append(convert()[1])
            else:
                check.append(timed(check_argv))
        if nyd is not None:
            upstream.append(timed([str(nyd), "check", "--source", src, "--target", target,
                                   "--source-insecure", "--target-insecure",
                                   "--work-dir", str(tmp / "nydusify")])[0])
    res: dict[str, Any] = {
        "files": info["files"], "compressed_bytes": info["compressed_bytes"],
        "tar_bytes": info["tar_bytes"], "first_convert_seconds": round(first, 2),
        "convert_seconds": [round(w, 2) for w, _ in conv],
        "check_seconds": [round(w, 2) for w, _ in check],
        "convert_cpu_seconds": [round(c, 2) for _, c in conv],
        "check_cpu_seconds": [round(c, 2) for _, c in check],
        "convert_median": round(statistics.median(w for w, _ in conv), 2),
        "check_median": round(statistics.median(w for w, _ in check), 2),
        "convert_cpu_median": round(statistics.median(c for _, c in conv), 2),
        "check_cpu_median": round(statistics.median(c for _, c in check), 2),
    }
    res["ratio_check_over_convert"] = round(res["check_median"] / res["convert_median"], 2)
    res["cpu_ratio_check_over_convert"] = round(res["check_cpu_median"] /
                                                res["convert_cpu_median"], 2)
    if upstream:
        res["nydusify_check_seconds"] = [round(x, 2) for x in upstream]
        res["nydusify_check_median"] = round(statistics.median(upstream), 2)
        res["ratio_check_over_nydusify"] = round(res["check_median"] /
                                                 res["nydusify_check_median"], 2)
    else:
        res["nydusify_check"] = "not installed (scripts/peers.sh nydusify)"
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="many-files", help="comma separated: " + ", ".join(TREES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2,000 small files, one round (CI smoke)")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    names = ["quick"] if a.quick else [n for n in a.images.split(",") if n]
    reps = 1 if a.quick else a.reps
    for n in names:
        if n not in TREES:
            raise SystemExit(f"unknown image {n!r} (known: {', '.join(TREES)})")
    out: dict[str, Any] = {"host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                    "loadavg_start": os.getloadavg()[0]}, "images": {}}
    with Registry(tag="chkreg") as reg, tempfile.TemporaryDirectory(prefix="pyn-chkb-") as tmp:
        for n in names:
            r = bench_image(n, reps, reg, Path(tmp))
            out["images"][n] = r
            extra = (f", nydusify check {r['nydusify_check_median']:.2f} s "
                     f"(ratio {r['ratio_check_over_nydusify']})"
                     if "nydusify_check_median" in r else ", nydusify not installed")
            print(f"{n}: {r['files']} files, {r['compressed_bytes'] / 1e6:.1f} MB gz: "
                  f"convert {r['convert_median']:.2f} s {r['convert_seconds']}, "
                  f"check {r['check_median']:.2f} s {r['check_seconds']}, "
                  f"check/convert {r['ratio_check_over_convert']} (CPU s: convert "
                  f"{r['convert_cpu_median']}, check {r['check_cpu_median']}, ratio "
                  f"{r['cpu_ratio_check_over_convert']}){extra}", flush=True)
    out["host"]["loadavg_end"] = os.getloadavg()[0]
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
