#!/usr/bin/env python3
"""Kernel EROFS over lazily fetched blobs against pynydusd's FUSE tree, on daemon_bench's data.

Two ways to serve the same RAFS v6 image, alternating in one run:

  fusedev   pynydusd serves the image's tree over FUSE (what ``fs_driver = "fusedev"``
            runs);
  erofs     ``pynydusd --blob-files`` serves each blob as one flat file of its
            uncompressed data on a FUSE mount (``daemon/blobfs.py``: chunks fetched on
            read through the blob cache), and the kernel mounts the bootstrap as EROFS
            with those files as its devices (file-backed, ``device=``; ``--erofs-opts``
            adds ``directio`` and the read-ahead window).

Phases, as ``bench/daemon_bench.py`` runs them (its helpers, its data: a 1 GiB file half
random, lz4_block; 50,000 small files): warm sequential (blob cache full, page cache
dropped before each pass), tree walk (lstat of every file, caches dropped), cold
sequential and cold random (16 readers, 4 KiB preads at random offsets) through a
loopback registry with an empty blob cache and a new daemon each run. Memory after a
cold sequential read: the daemon's RSS, and the page cache held by the blob cache file
and by the file read through the mount (``fincore``): EROFS keeps the file's pages and
the blob cache file keeps its own (two copies of the data while both are hot).

    bench/erofs_blobs.py                 # full sizes, 3 repetitions
    bench/erofs_blobs.py --quick         # 32 MiB, 2,000 files, 1 repetition
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import daemon_bench as DB

from pynydus.host import erofs
from pynydus.rafs.builder import build
from pynydus.registry.client import RegistryClient
from tests.harness.pynydusd import Pynydusd
from tests.harness.registry import Registry
from tests.harness.util import make_workdir, remove_tree, stop_recorded

MiB = DB.MiB


class Served:
    """One image served one way; ``root`` is where its tree is."""

    def __init__(self, wd: Path, mode: str, tag: str, boot: Path, cfg: dict[str, Any],
                 opts: dict[str, Any]) -> None:
        self.mode = mode
        extra = ("--blob-files",) if mode == "erofs" else ()
        self.daemon = Pynydusd(wd, name=tag, bootstrap=boot, config=cfg, extra_args=extra)
        self.daemon.start()
        self.root = self.daemon.mountpoint
        self.emnt: Path | None = None
        if mode == "erofs":
            self.emnt = wd / f"{tag}.erofs"
            self.emnt.mkdir(exist_ok=True)
            devs = [str(self.daemon.mountpoint / b) for b in blob_ids(boot)]
            erofs.mount_erofs(str(boot), devs, str(self.emnt), "file", **opts)
            self.root = self.emnt

    @property
    def pid(self) -> int:
        return self.daemon.pid

    def stop(self) -> None:
        if self.emnt is not None:
            erofs.umount_erofs(str(self.emnt))
            self.emnt = None
        self.daemon.stop()


def blob_ids(boot: Path) -> list[str]:
    from pynydus.rafs.read import open_bootstrap

    bs = open_bootstrap(str(boot))
    try:
        return [b.blob_id for b in bs.blobs]
    finally:
        bs.close()


def fincore_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux-extra's fincore: a missing program
    or a failed call raises, rather than passing a made-up figure on)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = ["fusedev", "erofs"]
    opts = {"direct_io": "directio" in args.erofs_opts,
            "read_ahead_kb": args.read_ahead_kb or None}
    wd = make_workdir("eblobs")
    res: dict[str, Any] = {"config": vars(args), "load1_start": os.getloadavg()[0]}
    served: list[Served] = []
    registry: Registry | None = None

    def serve(mode: str, tag: str, boot: Path, cfg: dict[str, Any]) -> Served:
        s = Served(wd, mode, tag, boot, cfg, opts)
        served.append(s)
        return s

    def stop(s: Served) -> None:
        s.stop()
        served.remove(s)

    try:
        seq_size = args.seq_mib * MiB
        seq_src = wd / "seq-src"
        seq_src.mkdir()
        DB.write_data(seq_src / "big.bin", seq_size, seed=1)
        walk_src = wd / "walk-src"
        DB.make_walk_tree(walk_src, args.files)
        seq_img = build(str(seq_src), str(wd / "seq.boot"), str(wd / "seq-blobs"),
                        compressor="lz4_block")
        build(str(walk_src), str(wd / "walk.boot"), str(wd / "walk-blobs"),
              compressor="lz4_block")
        print("prepared", flush=True)

        phases = set(args.phases.split(","))
        # warm sequential
        warm = {} if "warm" not in phases else {m: serve(m, f"warm-{m}", wd / "seq.boot",
                         DB.localfs_cfg(wd / "seq-blobs", wd / f"warm-cache-{m}"))
                for m in modes}
        for s in warm.values():
            DB.seq_read(s.root / "big.bin")  # fills the blob cache
        if warm:
            got = DB.alternating({m: (lambda s=s: DB.seq_read(s.root / "big.bin"))
                                  for m, s in warm.items()}, args.repeat, DB.drop_caches)
            res["warm_seq_mb_s"] = {m: round(n / t / 1e6, 1) for m, (t, n, _) in got.items()}
            res["warm_seq_runs"] = {m: r for m, (_, _, r) in got.items()}
            for s in list(warm.values()):
                stop(s)
            print("warm sequential MB/s:", res["warm_seq_mb_s"], flush=True)

        # tree walk (the blob cache of the walk image is filled by the first walk: the
        # bootstrap is all a walk reads through fusedev; through EROFS too)
        walkers = {} if "walk" not in phases else {m: serve(m, f"walk-{m}", wd / "walk.boot",
                            DB.localfs_cfg(wd / "walk-blobs", wd / f"walk-cache-{m}"))
                   for m in modes}
        if walkers:
            got = DB.alternating({m: (lambda s=s: DB.walk_stat(s.root))
                                  for m, s in walkers.items()}, args.repeat, DB.drop_caches)
            res["walk_s"] = {m: round(t, 3) for m, (t, _, _) in got.items()}
            res["walk_runs"] = {m: r for m, (_, _, r) in got.items()}
            res["rss_after_walk_mb"] = {m: round(DB.rss_kib(s.pid) / 1024, 1)
                                        for m, s in walkers.items()}
            for s in list(walkers.values()):
                stop(s)
            print("walk s:", res["walk_s"], flush=True)

        # cold: loopback registry, an empty cache and a new daemon per run
        registry = Registry(wd / "registry")
        registry.start()
        blob = seq_img.blob_ids[-1]
        with RegistryClient(registry.host, scheme="http", timeout=120) as c:
            c.push_blob("bench/seq", str(wd / "seq-blobs" / blob), f"sha256:{blob}")
        n_run = [0]
        memory: dict[str, list[dict[str, float]]] = {m: [] for m in modes}

        def cold(mode: str, body: Callable[[Path], tuple[float, int]],
                 watch: bool = False) -> tuple[float, int]:
            n_run[0] += 1
            assert registry is not None
            cache = wd / f"cold-cache-{n_run[0]}"
            s = serve(mode, f"cold{n_run[0]}-{mode}", wd / "seq.boot",
                      DB.registry_cfg(registry.host, "bench/seq", cache))
            try:
                DB.drop_caches()
                took, n = body(s.root)
                if watch:
                    memory[mode].append({
                        "rss_mb": round(DB.rss_kib(s.pid) / 1024, 1),
                        "cache_file_mb": round(fincore_bytes(cache / f"{blob}.blob.data") / 1e6, 1),
                        "mount_file_mb": round(fincore_bytes(s.root / "big.bin") / 1e6, 1)})
            finally:
                stop(s)
            return took, n

        def cold_seq(root: Path) -> tuple[float, int]:
            return DB.seq_read(root / "big.bin")

        if "cold" in phases:
            got = DB.alternating({m: partial(cold, m, cold_seq, True) for m in modes},
                                 args.repeat, lambda: None)
            res["cold_seq_mb_s"] = {m: round(n / t / 1e6, 1) for m, (t, n, _) in got.items()}
            res["cold_seq_runs"] = {m: r for m, (_, _, r) in got.items()}
            res["memory_after_cold_seq"] = memory
            print("cold sequential MB/s:", res["cold_seq_mb_s"], flush=True)
            print("memory:", json.dumps(memory), flush=True)

        def rnd(root: Path) -> tuple[float, int]:
            took, reads, _ = DB.random_reads(root / "big.bin", seq_size, args.readers,
                                             args.reads, seed=7)
            return took, reads

        if "random" in phases:
            got = DB.alternating({m: partial(cold, m, rnd) for m in modes}, args.repeat,
                                 lambda: None)
            res["cold_random_iops"] = {m: round(n / t) for m, (t, n, _) in got.items()}
            res["cold_random_runs"] = {m: r for m, (_, _, r) in got.items()}
            print("cold random IOPS:", res["cold_random_iops"], flush=True)
    finally:
        for s in served:
            try:
                s.stop()
            except Exception as err:  # noqa: BLE001 - clean up the rest
                print("stop failed:", err, file=sys.stderr)
        if registry is not None:
            registry.stop()
        stop_recorded(wd)
        for m in list(wd.glob("*.erofs")) + list(wd.glob("*.mnt")):
            erofs.umount_erofs(str(m))
            DB.force_unmount(m)
        if args.keep:
            print(f"kept {wd}")
        else:
            remove_tree(wd)
    res["load1_end"] = os.getloadavg()[0]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seq-mib", type=int)
    p.add_argument("--files", type=int)
    p.add_argument("--readers", type=int, default=16)
    p.add_argument("--reads", type=int)
    p.add_argument("--repeat", type=int)
    p.add_argument("--erofs-opts", default="directio", help="comma list: directio or none")
    p.add_argument("--read-ahead-kb", type=int, default=1024,
                   help="read-ahead of the EROFS mounts (0: the kernel's 128 KiB)")
    p.add_argument("--phases", default="warm,walk,cold,random",
                   help="comma list of warm, walk, cold, random")
    p.add_argument("--json")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    q = args.quick
    args.seq_mib = args.seq_mib or (32 if q else 1024)
    args.files = args.files or (2000 if q else 50000)
    args.reads = args.reads or (50 if q else 1000)
    args.repeat = args.repeat or (1 if q else 3)
    t0 = time.monotonic()
    res = run(args)
    res["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_runs")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
