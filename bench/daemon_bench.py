#!/usr/bin/env python3
"""pynydusd read-path benchmark: FUSE daemon vs the same tree on native overlayfs.

Every figure is measured in this run, against a baseline measured in this run, and
printed as a ratio. Phases (full sizes; ``--quick`` shrinks them for the CI smoke):

  warm sequential   one 1 GiB file, every chunk already in the blob cache, kernel page
                    cache dropped (``echo 3 > /proc/sys/vm/drop_caches``) before each
                    pass; pynydusd (localfs backend) vs overlayfs (lowerdir = the
                    source tree on the host filesystem). Target: >= 50 % of native.
  warm tree walk    os.walk + lstat of 50,000 files in 500 directories, caches
                    dropped; pynydusd vs overlayfs. Target: <= 3x native time.
  cold sequential   the 1 GiB file through the registry backend of a loopback
                    ``docker-registry``, empty blob cache, page cache dropped. Target:
                    >= 200 MB/s. Baseline: the same blob fetched by plain ranged GETs,
                    page cache dropped as well, counted in the same file bytes (the
                    blob carries the file's bytes; both rates are file bytes per
                    second, so the ratio is a ratio of times).
  cold random       16 reader threads, 4 KiB preads at random 4 KiB-aligned offsets
                    of the 1 GiB file (readahead off: POSIX_FADV_RANDOM), empty blob
                    cache, registry backend. Target: >= 2,000 IOPS.
  start to ready    spawn of ``pynydusd`` for the 50,000-file image until a stat
                    below the mountpoint answers. Target: < 1 s.
  idle RSS          VmRSS of that daemon, idle after start and after one full walk.
                    Target: < 80 MB.

The peer (``--peer nydusd``, the default; ``--peer none`` leaves it out): upstream's
``nydusd`` 2.2 (``scripts/peers.sh nydus-rs``) runs every phase beside pynydusd on the
same bootstrap, blob cache layout and backend (localfs warm, the loopback registry
cold), with 4 FUSE threads (upstream's snapshotter's ``threads_number``; pynydusd's
default) and ``--rlimit-nofile 0`` (this container refuses its raise to 1,000,000).
A second table holds pynydusd against it. Targets: warm sequential >= 0.8x nydusd,
cold sequential >= 1.0x, random IOPS >= 0.8x, tree walk <= 1.5x its time, idle RSS
<= 2x; start to ready is reported. ``--peer pyfuse3`` runs pynydusd on libfuse's session
(``PYNYDUSD_FUSE=pyfuse3``) as the peer instead, against our own FUSE session (the
default), with the same alternation: the evidence for keeping or dropping pyfuse3.

Every measurement is repeated ``--repeat`` times (cold phases too, each with a new
daemon and an empty blob cache) with the native and pynydusd runs alternating, each
going first in turn; medians are reported, every run is in the JSON, and each printed
ratio is the quotient of the two figures printed beside it.

File data is half random, half runs of one byte per 4 KiB block, so lz4_block both
compresses and stores raw chunks, as in real images. Data lives under
``/var/tmp/pyn-dbench-*`` and is removed at the end (``--keep`` to keep it).

    bench/daemon_bench.py                  # full run (about 3-5 minutes, ~4 GB of disk)
    bench/daemon_bench.py --quick          # CI smoke: 32 MiB file, 2,000 files
    bench/daemon_bench.py --json out.json  # also write every figure as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pynydus.rafs.builder import build
from pynydus.registry.client import RegistryClient
from tests.harness.peers import peer_bin
from tests.harness.pynydusd import PYNYDUSD, Pynydusd, force_unmount
from tests.harness.registry import Registry
from tests.harness.util import make_workdir, remove_tree, stop_recorded

MiB = 1 << 20
TARGETS = {
    "warm_seq_ratio": ">= 0.50 of native",
    "walk_ratio": "<= 3.0x native",
    "cold_seq_mb_s": ">= 200 MB/s",
    "cold_random_iops": ">= 2000 IOPS",
    "start_to_ready_s": "< 1 s",
    "idle_rss_mb": "< 80 MB",
}
# pynydusd against upstream nydusd, as pynydusd's figure over nydusd's (times: nydusd's
# time over pynydusd's is not used; a tree walk's ratio is pynydusd's time over nydusd's)
PEER_TARGETS = {
    "warm_seq": (">= 0.8x nydusd", lambda r: r >= 0.8),
    "cold_seq": (">= 1.0x nydusd", lambda r: r >= 1.0),
    "cold_random": (">= 0.8x nydusd", lambda r: r >= 0.8),
    "walk": ("<= 1.5x nydusd's time", lambda r: r <= 1.5),
    "start_to_ready": ("-", None),
    "idle_rss": ("<= 2x nydusd", lambda r: r <= 2.0),
}
NYDUSD_THREADS = 4


def nydusd_argv_tail() -> list[str]:
    return ["--thread-num", str(NYDUSD_THREADS), "--rlimit-nofile", "0"]


PEER_KIND = ["nydusd"]  # set from --peer: "nydusd" (upstream) or "pyfuse3"


def pyfuse3_env() -> dict[str, str]:
    """pynydusd's environment with libfuse's session (pyfuse3) instead of our own."""
    return {**os.environ, "PYNYDUSD_FUSE": "pyfuse3"}


def nydusd_daemon(wd: Path, name: str, bootstrap: Path, config: dict[str, Any]) -> Pynydusd:
    """The peer with the harness's daemon wrapper (same flags, API and stop): upstream
    nydusd, or with ``--peer pyfuse3`` pynydusd on libfuse."""
    if PEER_KIND[0] == "pyfuse3":
        d = Pynydusd(wd, name=name, bootstrap=bootstrap, config=config)
        d.proc.env = pyfuse3_env()
        return d
    d = Pynydusd(wd, name=name, bootstrap=bootstrap, config=config,
                 extra_args=tuple(nydusd_argv_tail()))
    d.proc.argv[0] = str(peer_bin("nydus-rs", "nydusd"))
    return d


# ------------------------------------------------------------------------------ helpers

def drop_caches() -> None:
    """Flush dirty pages, then drop page cache, dentries and inodes (whole machine)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def write_data(path: Path, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    block = 4096
    with open(path, "wb") as f:
        left = size
        buf = bytearray()
        while left > 0:
            n = min(block, left)
            buf += rnd.randbytes(n) if rnd.random() < 0.5 else bytes([rnd.randrange(256)]) * n
            left -= n
            if len(buf) >= 8 * MiB:
                f.write(buf)
                buf.clear()
        f.write(buf)


def make_walk_tree(root: Path, files: int, per_dir: int = 100) -> None:
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    payload = os.urandom(4096)
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir()
        with open(d / f"f{i % per_dir:03d}", "wb") as f:
            f.write(payload[: (i * 37) % 3000])


@contextmanager
def overlay(lower: Path, base: Path) -> Iterator[Path]:
    """The tree on native overlayfs: lowerdir = ``lower``, fresh upper/work dirs."""
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def seq_read(path: Path, bufsize: int = MiB) -> tuple[float, int]:
    """Read the whole file once; (seconds, bytes)."""
    n = 0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            b = os.read(fd, bufsize)
            if not b:
                break
            n += len(b)
    finally:
        os.close(fd)
    return time.perf_counter() - t0, n


def walk_stat(root: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return time.perf_counter() - t0, n


def random_reads(path: Path, size: int, readers: int, reads_each: int, seed: int
                 ) -> tuple[float, int, list[float]]:
    """``readers`` threads, ``reads_each`` 4 KiB preads at random aligned offsets each.
    Returns (seconds, reads, per-read latencies in ms)."""
    pages = size // 4096
    lat: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(readers + 1)

    def reader(k: int) -> None:
        rnd = random.Random(seed * 1000 + k)
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        mine = []
        try:
            start.wait()
            for _ in range(reads_each):
                off = rnd.randrange(pages) * 4096
                t = time.perf_counter()
                if len(os.pread(fd, 4096, off)) != 4096:
                    raise OSError(f"short read at {off}")
                mine.append((time.perf_counter() - t) * 1e3)
        except BaseException as err:  # noqa: BLE001 - reported by the caller
            errors.append(err)
        finally:
            os.close(fd)
            with lock:
                lat.extend(mine)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(readers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return took, len(lat), lat


def alternating(fns: dict[str, Callable[[], tuple[float, int]]], repeat: int,
                before: Callable[[], None]) -> dict[str, tuple[float, int, list[float]]]:
    """Run each of ``fns`` ``repeat`` times, interleaved, the order rotating so that each
    goes first equally often; ``before`` runs before every run. Returns, per name,
    (median seconds, the count of the last run, every run's seconds)."""
    names = list(fns)
    runs: dict[str, list[float]] = {n: [] for n in names}
    counts: dict[str, int] = {}
    for rep in range(repeat):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            before()
            took, counts[name] = fns[name]()
            runs[name].append(took)
    return {n: (statistics.median(runs[n]), counts[n], runs[n]) for n in names}


def wait_settled(d: Pynydusd, materialized: int = 0, timeout: float = 300) -> float:
    """Wait until ``d``'s blob cache holds every chunk (misses are persisted behind the
    reads: delayed persist) and, with ``materialized``, until that many files are
    materialized for passthrough (copied behind the reads, at the lowest priority; a
    daemon that does not report it is not waited for). The seconds it took."""
    t0 = time.monotonic()
    while True:
        m = d.get("/api/v1/metrics/blobcache")
        done = m.get("materialized_files", materialized)
        if m["data_all_ready"] and not m.get("materialize_pending") and done >= materialized:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"blob cache not settled after {timeout} s: {m}"
        time.sleep(0.1)


def localfs_cfg(blob_dir: Path, cache: Path) -> dict[str, Any]:
    return {"device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                       "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}},
            "mode": "direct", "enable_xattr": True}


def registry_cfg(host: str, repo: str, cache: Path) -> dict[str, Any]:
    return {"device": {"backend": {"type": "registry",
                                   "config": {"scheme": "http", "host": host, "repo": repo,
                                              "timeout": 30, "connect_timeout": 5,
                                              "retry_limit": 2}},
                       "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}},
            "mode": "direct", "enable_xattr": True}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start_to_ready(wd: Path, boot: Path, cfg: Path, probe: str, tag: str,
                   exe: str = PYNYDUSD, extra: tuple[str, ...] = (),
                   env: dict[str, str] | None = None) -> tuple[float, Any]:
    """Spawn the daemon ``exe`` (pynydusd, or upstream nydusd with its ``extra`` flags);
    seconds until ``lstat(mnt/probe)`` answers from the FUSE mount."""
    mnt = wd / f"{tag}.mnt"
    mnt.mkdir(exist_ok=True)
    with open(wd / f"{tag}.log", "ab") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen([exe, "--mountpoint", str(mnt), "--bootstrap", str(boot),
                              "--config", str(cfg), "--apisock", str(wd / f"{tag}.sock"),
                              *extra],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, env=env)
    (wd / "pids").mkdir(exist_ok=True)
    (wd / "pids" / f"{tag}.pid").write_text(f"{p.pid} {exe}\n")
    parent_dev = os.stat(wd).st_dev
    target = mnt / probe
    while True:
        if p.poll() is not None:
            raise RuntimeError(f"{exe} exited with {p.returncode}; see {wd / tag}.log")
        try:
            if os.stat(mnt).st_dev != parent_dev:
                os.lstat(target)
                return time.perf_counter() - t0, p
        except OSError:
            pass
        time.sleep(0.001)


def stop_proc(p: Any, mnt: Path) -> None:
    p.terminate()
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
    force_unmount(mnt)
    # forget the PID so no later clean-up can mistake a reused PID for our daemon
    (mnt.parent / "pids" / f"{mnt.name.removesuffix('.mnt')}.pid").unlink(missing_ok=True)


# -------------------------------------------------------------------------------- phases

def run(args: argparse.Namespace) -> dict[str, Any]:
    seq_size = args.seq_mib * MiB
    wd = make_workdir("dbench")
    res: dict[str, Any] = {"config": {"seq_mib": args.seq_mib, "files": args.files,
                                      "readers": args.readers, "reads_each": args.reads,
                                      "repeat": args.repeat, "quick": args.quick},
                           "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                    "python": platform.python_version()}}
    daemons: list[Pynydusd] = []
    registry: Registry | None = None
    peer = args.peer != "none"
    up: dict[str, Any] = {}  # the peer's figures, phase by phase
    peer_env: dict[str, str] | None = None
    peer_extra: tuple[str, ...] = ()
    if peer:
        PEER_KIND[0] = args.peer
        res["peer"] = args.peer
        res[args.peer] = up
        if args.peer == "nydusd":
            nydusd_exe = str(peer_bin("nydus-rs", "nydusd"))  # fails now, naming peers.sh
            peer_extra = tuple(nydusd_argv_tail())
        else:
            nydusd_exe, peer_env = PYNYDUSD, pyfuse3_env()
    try:
        # ---- data and images
        t0 = time.perf_counter()
        seq_src = wd / "seq-src"
        seq_src.mkdir()
        os.chmod(seq_src, 0o755)
        write_data(seq_src / "big.bin", seq_size, seed=1)
        walk_src = wd / "walk-src"
        make_walk_tree(walk_src, args.files)
        res["prepare_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        seq_img = build(str(seq_src), str(wd / "seq.boot"), str(wd / "seq-blobs"),
                        compressor="lz4_block")
        walk_img = build(str(walk_src), str(wd / "walk.boot"), str(wd / "walk-blobs"),
                         compressor="lz4_block")
        res["build_seconds"] = round(time.perf_counter() - t0, 2)
        res["walk_image"] = {"inodes": walk_img.inodes, "bootstrap_bytes": walk_img.bootstrap_size}
        seq_blob = seq_img.blob_ids[-1]
        res["seq_blob"] = {"compressed": seq_img.blobs[-1].compressed_size,
                           "uncompressed": seq_img.blobs[-1].uncompressed_size,
                           "chunks": seq_img.blobs[-1].chunk_count}
        print(f"prepared {args.seq_mib} MiB file and {args.files} files in "
              f"{res['prepare_seconds']} s, built images in {res['build_seconds']} s",
              flush=True)

        # ---- warm sequential: overlayfs vs pynydusd with a fully populated blob cache
        d = Pynydusd(wd, name="warm", bootstrap=wd / "seq.boot",
                     config=localfs_cfg(wd / "seq-blobs", wd / "warm-cache"))
        daemons.append(d)
        d.start()
        seq_read(d.mountpoint / "big.bin")  # populate the blob cache
        waited = wait_settled(d, materialized=1)
        print(f"blob cache full and the file materialized {waited:.2f} s after the read",
              flush=True)
        warm_fns: dict[str, Callable[[], tuple[float, int]]] = {
            "pynydusd": lambda: seq_read(d.mountpoint / "big.bin")}
        if peer:
            u = nydusd_daemon(wd, "nwarm", wd / "seq.boot",
                              localfs_cfg(wd / "seq-blobs", wd / "nwarm-cache"))
            daemons.append(u)
            u.start()
            seq_read(u.mountpoint / "big.bin")  # populate its blob cache
            warm_fns["nydusd"] = lambda: seq_read(u.mountpoint / "big.bin")
        with overlay(seq_src, wd / "ovl-seq") as ovl:
            got = alternating({"native": lambda: seq_read(ovl / "big.bin"), **warm_fns},
                              args.repeat, drop_caches)
        (nat, n, nat_runs), (fus, n2, fus_runs) = got["native"], got["pynydusd"]
        assert n == n2 == seq_size
        if peer:
            nyd, n3, nyd_runs = got["nydusd"]
            assert n3 == seq_size
            up["warm_seq"] = {"mb_s": round(n3 / nyd / 1e6, 1),
                              "runs_s": [round(x, 3) for x in nyd_runs]}
            u.stop()
        res["warm_seq"] = {"native_mb_s": round(n / nat / 1e6, 1),
                           "pynydusd_mb_s": round(n / fus / 1e6, 1),
                           "native_runs_s": [round(x, 3) for x in nat_runs],
                           "pynydusd_runs_s": [round(x, 3) for x in fus_runs]}
        res["warm_seq_ratio"] = round(res["warm_seq"]["pynydusd_mb_s"]
                                      / res["warm_seq"]["native_mb_s"], 3)
        d.stop()
        print(f"warm sequential: native {res['warm_seq']['native_mb_s']} MB/s, pynydusd "
              f"{res['warm_seq']['pynydusd_mb_s']} MB/s", flush=True)

        # ---- tree walk + start to ready + idle RSS on the walk image
        cfg_path = wd / "walk.json"
        cfg_path.write_text(json.dumps(localfs_cfg(wd / "walk-blobs", wd / "walk-cache")))
        starts = []
        for i in range(args.repeat):
            if i == 0:
                drop_caches()  # the first start reads the bootstrap from disk
            took, p = start_to_ready(wd, wd / "walk.boot", cfg_path, "d0000/f000", f"start{i}")
            starts.append(took)
            if i < args.repeat - 1:
                stop_proc(p, wd / f"start{i}.mnt")
        mnt = wd / f"start{args.repeat - 1}.mnt"
        rss_ready = rss_kib(p.pid)
        q, qmnt = None, wd / f"nstart{args.repeat - 1}.mnt"
        try:
            walk_fns: dict[str, Callable[[], tuple[float, int]]] = {
                "pynydusd": lambda: walk_stat(mnt)}
            if peer:
                nstarts = []
                for i in range(args.repeat):
                    took, q = start_to_ready(wd, wd / "walk.boot", cfg_path, "d0000/f000",
                                             f"nstart{i}", exe=nydusd_exe,
                                             extra=peer_extra, env=peer_env)
                    nstarts.append(took)
                    if i < args.repeat - 1:
                        stop_proc(q, wd / f"nstart{i}.mnt")
                assert q is not None
                nrss_ready = rss_kib(q.pid)
                walk_fns["nydusd"] = lambda: walk_stat(qmnt)
            with overlay(walk_src, wd / "ovl-walk") as ovl:
                got = alternating({"native": lambda: walk_stat(ovl), **walk_fns},
                                  args.repeat, drop_caches)
            (nat, n, nat_runs), (fus, n2, fus_runs) = got["native"], got["pynydusd"]
            rss_walked = rss_kib(p.pid)
            if q is not None:
                nyd, n3, nyd_runs = got["nydusd"]
                assert n3 == args.files, n3
                nrss_walked = rss_kib(q.pid)
                up["walk"] = {"s": round(nyd, 3), "runs_s": [round(x, 3) for x in nyd_runs]}
                up["start_to_ready"] = {"s": round(statistics.median(nstarts), 3),
                                        "runs_s": [round(x, 3) for x in nstarts]}
                up["idle_rss"] = {"mb": round(max(nrss_ready, nrss_walked) / 1024, 1),
                                  "after_start_kib": nrss_ready, "after_walk_kib": nrss_walked}
        finally:
            stop_proc(p, mnt)
            if q is not None:
                stop_proc(q, qmnt)
        assert n == n2 == args.files, (n, n2)
        res["walk"] = {"files": n, "native_s": round(nat, 3), "pynydusd_s": round(fus, 3),
                       "native_runs_s": [round(x, 3) for x in nat_runs],
                       "pynydusd_runs_s": [round(x, 3) for x in fus_runs]}
        res["walk_ratio"] = round(res["walk"]["pynydusd_s"] / res["walk"]["native_s"], 2)
        res["start_to_ready"] = {"runs_s": [round(x, 3) for x in starts],
                                 "cold_first_s": round(starts[0], 3)}
        res["start_to_ready_s"] = round(statistics.median(starts), 3)
        res["idle_rss"] = {"after_start_kib": rss_ready, "after_walk_kib": rss_walked}
        res["idle_rss_mb"] = round(max(rss_ready, rss_walked) / 1024, 1)
        print(f"walk: native {nat:.2f} s, pynydusd {fus:.2f} s; start {res['start_to_ready_s']}"
              f" s; RSS {res['idle_rss_mb']} MB", flush=True)

        # ---- cold reads over a loopback registry: each run a new daemon, an empty cache
        registry = Registry(wd / "registry")
        registry.start()
        seq_desc = seq_img.blobs[-1]
        with RegistryClient(registry.host, scheme="http", timeout=120) as c:
            c.push_blob("bench/seq", str(wd / "seq-blobs" / seq_blob), f"sha256:{seq_blob}")
        cold_runs: list[dict[str, Any]] = []
        run_no = [0]

        def cold_daemon(tag: str, kind: str = "pynydusd") -> Pynydusd:
            run_no[0] += 1
            cfg = registry_cfg(registry.host, "bench/seq", wd / f"{tag}-cache-{run_no[0]}")
            if kind == "nydusd":
                dm = nydusd_daemon(wd, f"{tag}{run_no[0]}", wd / "seq.boot", cfg)
            else:
                dm = Pynydusd(wd, name=f"{tag}{run_no[0]}", bootstrap=wd / "seq.boot",
                              config=cfg)
            daemons.append(dm)
            dm.start()
            return dm

        def cold_seq_pynydusd() -> tuple[float, int]:
            dm = cold_daemon("coldseq")
            gets0 = registry.blob_gets(f"sha256:{seq_blob}")
            drop_caches()
            took, n = seq_read(dm.mountpoint / "big.bin")
            m = dm.backend_metrics()
            cold_runs.append({"seconds": round(took, 3), "bytes": n,
                              "backend_requests": m["read_count"],
                              "backend_bytes": m["read_amount_total"],
                              "registry_gets": registry.blob_gets(f"sha256:{seq_blob}") - gets0})
            dm.stop()
            return took, n

        def cold_seq_nydusd() -> tuple[float, int]:
            dm = cold_daemon("ncoldseq", "nydusd")
            gets0 = registry.blob_gets(f"sha256:{seq_blob}")
            drop_caches()
            took, n = seq_read(dm.mountpoint / "big.bin")
            up_cold_runs.append({"seconds": round(took, 3), "bytes": n, "registry_gets":
                                 registry.blob_gets(f"sha256:{seq_blob}") - gets0})
            dm.stop()
            return took, n

        up_cold_runs: list[dict[str, Any]] = []

        def cold_seq_http() -> tuple[float, int]:
            """The blob by plain 4 MiB ranged GETs, page cache dropped like the daemon's
            run; returns the file bytes the blob carries, so both rates count the same."""
            with RegistryClient(registry.host, scheme="http", timeout=120) as c:
                drop_caches()
                t0 = time.perf_counter()
                got = 0
                for off in range(0, seq_desc.compressed_size, 4 * MiB):
                    ln = min(4 * MiB, seq_desc.compressed_size - off)
                    got += len(c.read_blob_range("bench/seq", f"sha256:{seq_blob}", off, ln))
                took = time.perf_counter() - t0
            assert got == seq_desc.compressed_size
            return took, seq_size

        cold_fns = {"http": cold_seq_http, "pynydusd": cold_seq_pynydusd}
        if peer:
            cold_fns["nydusd"] = cold_seq_nydusd
        got = alternating(cold_fns, args.repeat,
                          lambda: None)  # each run drops the caches itself, after its set-up
        (http_s, n_http, http_runs), (cold_s, n, _) = got["http"], got["pynydusd"]
        assert n == n_http == seq_size
        cold_s, http_s = round(cold_s, 6), round(http_s, 6)  # the rates below are of these
        res["cold_seq"] = {**cold_runs[-1], "runs": cold_runs,
                           "seconds": cold_s, "plain_http_seconds": http_s,
                           "plain_http_runs_s": [round(x, 3) for x in http_runs],
                           "blob_bytes": seq_desc.compressed_size,
                           "plain_http_mb_s": round(seq_size / http_s / 1e6, 1)}
        res["cold_seq_mb_s"] = round(seq_size / cold_s / 1e6, 1)
        if peer:
            nyd_s, n3, _ = got["nydusd"]
            assert n3 == seq_size
            nyd_s = round(nyd_s, 6)
            up["cold_seq"] = {"mb_s": round(seq_size / nyd_s / 1e6, 1), "seconds": nyd_s,
                              "runs": up_cold_runs}
        print(f"cold sequential: {res['cold_seq_mb_s']} MB/s of file data "
              f"(plain ranged GETs of the blob: {res['cold_seq']['plain_http_mb_s']} MB/s of "
              f"the same file data; medians of {args.repeat})", flush=True)

        rnd_runs: list[dict[str, Any]] = []
        lat: list[float] = []

        def cold_random_pynydusd() -> tuple[float, int]:
            dm = cold_daemon("coldrnd")
            drop_caches()
            took, reads, lats = random_reads(dm.mountpoint / "big.bin", seq_size, args.readers,
                                             args.reads, seed=7)
            m = dm.backend_metrics()
            rnd_runs.append({"seconds": round(took, 3), "reads": reads,
                             "backend_requests": m["read_count"],
                             "backend_bytes": m["read_amount_total"]})
            lat.extend(lats)
            dm.stop()
            return took, reads

        up_rnd_runs: list[dict[str, Any]] = []
        up_lat: list[float] = []

        def cold_random_nydusd() -> tuple[float, int]:
            dm = cold_daemon("ncoldrnd", "nydusd")
            drop_caches()
            took, reads, lats = random_reads(dm.mountpoint / "big.bin", seq_size, args.readers,
                                             args.reads, seed=7)
            up_rnd_runs.append({"seconds": round(took, 3), "reads": reads})
            up_lat.extend(lats)
            dm.stop()
            return took, reads

        with overlay(seq_src, wd / "ovl-rnd") as ovl:
            def cold_random_native() -> tuple[float, int]:
                drop_caches()
                took, reads, _ = random_reads(ovl / "big.bin", seq_size, args.readers,
                                              args.reads, seed=7)
                return took, reads

            rnd_fns = {"native": cold_random_native, "pynydusd": cold_random_pynydusd}
            if peer:
                rnd_fns["nydusd"] = cold_random_nydusd
            got = alternating(rnd_fns, args.repeat, lambda: None)
        (ntook, nreads, nruns), (took, reads, _) = got["native"], got["pynydusd"]
        lat.sort()
        res["cold_random"] = {"readers": args.readers, "reads": reads, "seconds": round(took, 3),
                              "p50_ms": round(lat[len(lat) // 2], 2),
                              "p99_ms": round(lat[int(len(lat) * 0.99)], 2),
                              "runs": rnd_runs, "native_runs_s": [round(x, 3) for x in nruns],
                              "native_iops": round(nreads / ntook)}
        res["cold_random_iops"] = round(reads / took)
        if peer:
            ntook, nreads, _ = got["nydusd"]
            up_lat.sort()
            up["cold_random"] = {"iops": round(nreads / ntook), "seconds": round(ntook, 3),
                                 "p50_ms": round(up_lat[len(up_lat) // 2], 2),
                                 "p99_ms": round(up_lat[int(len(up_lat) * 0.99)], 2),
                                 "runs": up_rnd_runs}
        print(f"cold random: {res['cold_random_iops']} IOPS (native "
              f"{res['cold_random']['native_iops']}; medians of {args.repeat})", flush=True)
    finally:
        for dm in daemons:
            dm.stop()
        if registry is not None:
            registry.stop()
        stop_recorded(wd)
        for mnt_dir in list(wd.glob("*.mnt")):
            force_unmount(mnt_dir)
        if args.keep:
            print(f"kept {wd}")
        else:
            remove_tree(wd)
    return res


def verdict(key: str, value: float) -> str:
    ok = {"warm_seq_ratio": value >= 0.5, "walk_ratio": value <= 3.0,
          "cold_seq_mb_s": value >= 200, "cold_random_iops": value >= 2000,
          "start_to_ready_s": value < 1.0, "idle_rss_mb": value < 80}[key]
    return "meets" if ok else "MISSES"


def report(res: dict[str, Any]) -> str:
    ws, wk, cs, cr = res["warm_seq"], res["walk"], res["cold_seq"], res["cold_random"]
    rows = [
        ("warm sequential read", f"{ws['native_mb_s']} MB/s", f"{ws['pynydusd_mb_s']} MB/s",
         f"{ws['pynydusd_mb_s'] / ws['native_mb_s']:.2f}x", "warm_seq_ratio",
         res["warm_seq_ratio"]),
        (f"tree walk + lstat ({wk['files']} files)", f"{wk['native_s']} s",
         f"{wk['pynydusd_s']} s", f"{wk['pynydusd_s'] / wk['native_s']:.2f}x", "walk_ratio",
         res["walk_ratio"]),
        ("cold sequential read (registry)", f"{cs['plain_http_mb_s']} MB/s (raw HTTP)",
         f"{res['cold_seq_mb_s']} MB/s",
         f"{res['cold_seq_mb_s'] / cs['plain_http_mb_s']:.2f}x", "cold_seq_mb_s",
         res["cold_seq_mb_s"]),
        (f"cold 4 KiB random, {cr['readers']} readers", f"{cr['native_iops']} IOPS",
         f"{res['cold_random_iops']} IOPS",
         f"{res['cold_random_iops'] / max(cr['native_iops'], 1):.2f}x", "cold_random_iops",
         res["cold_random_iops"]),
        ("start to ready", "-", f"{res['start_to_ready_s']} s", "-", "start_to_ready_s",
         res["start_to_ready_s"]),
        ("idle RSS (mounted, after walk)", "-", f"{res['idle_rss_mb']} MB", "-", "idle_rss_mb",
         res["idle_rss_mb"]),
    ]
    out = ["| measurement | native (overlayfs) | pynydusd | pynydusd/native | target | verdict |",
           "|---|---|---|---|---|---|"]
    for name, nat, ours, ratio, key, val in rows:
        out.append(f"| {name} | {nat} | {ours} | {ratio} | {TARGETS[key]} | "
                   f"{verdict(key, val)} |")
    return "\n".join(out)


def vs_nydusd(res: dict[str, Any]) -> dict[str, float]:
    """pynydusd over nydusd per phase (rates and RSS: ours / theirs; times: ours /
    theirs as well, so a walk ratio above 1 is slower); sets ``res["vs_nydusd"]``."""
    up = res.get(res.get("peer", "nydusd"))
    if not up:
        return {}
    ours = {"warm_seq": res["warm_seq"]["pynydusd_mb_s"], "cold_seq": res["cold_seq_mb_s"],
            "cold_random": res["cold_random_iops"], "walk": res["walk"]["pynydusd_s"],
            "start_to_ready": res["start_to_ready_s"], "idle_rss": res["idle_rss_mb"]}
    theirs = {"warm_seq": up["warm_seq"]["mb_s"], "cold_seq": up["cold_seq"]["mb_s"],
              "cold_random": up["cold_random"]["iops"], "walk": up["walk"]["s"],
              "start_to_ready": up["start_to_ready"]["s"], "idle_rss": up["idle_rss"]["mb"]}
    out = {k: ours[k] / theirs[k] for k in ours}
    res["vs_peer" if res.get("peer") == "pyfuse3" else "vs_nydusd"] = out
    return out


def peer_report(res: dict[str, Any]) -> str:
    """pynydusd against upstream nydusd, phase by phase: the second table."""
    ratios = vs_nydusd(res)
    if not ratios:
        return ""
    kind = res.get("peer", "nydusd")
    up = res[kind]
    rows = [
        ("warm sequential read", f"{up['warm_seq']['mb_s']} MB/s",
         f"{res['warm_seq']['pynydusd_mb_s']} MB/s", "warm_seq"),
        ("cold sequential read (registry)", f"{up['cold_seq']['mb_s']} MB/s",
         f"{res['cold_seq_mb_s']} MB/s", "cold_seq"),
        (f"cold 4 KiB random, {res['cold_random']['readers']} readers",
         f"{up['cold_random']['iops']} IOPS", f"{res['cold_random_iops']} IOPS", "cold_random"),
        (f"tree walk + lstat ({res['walk']['files']} files)", f"{up['walk']['s']} s",
         f"{res['walk']['pynydusd_s']} s", "walk"),
        ("start to ready", f"{up['start_to_ready']['s']} s", f"{res['start_to_ready_s']} s",
         "start_to_ready"),
        ("idle RSS (mounted, after walk)", f"{up['idle_rss']['mb']} MB",
         f"{res['idle_rss_mb']} MB", "idle_rss"),
    ]
    if kind == "pyfuse3":
        out = ["| our FUSE session vs pyfuse3 | pyfuse3 | own session | own/pyfuse3 |",
               "|---|---|---|---|"]
        for name, theirs, ours, key in rows:
            out.append(f"| {name} | {theirs} | {ours} | {ratios[key]:.2f}x |")
        return "\n".join(out)
    out = ["| vs upstream | nydusd 2.2 | pynydusd | pynydusd/nydusd | target | verdict |",
           "|---|---|---|---|---|---|"]
    for name, theirs, ours, key in rows:
        target, ok = PEER_TARGETS[key]
        verdict_ = "-" if ok is None else ("meets" if ok(ratios[key]) else "MISSES")
        out.append(f"| {name} | {theirs} | {ours} | {ratios[key]:.2f}x | {target} | "
                   f"{verdict_} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (CI smoke)")
    p.add_argument("--seq-mib", type=int, help="size of the sequential file (default 1024)")
    p.add_argument("--files", type=int, help="files in the walk tree (default 50000)")
    p.add_argument("--readers", type=int, default=16)
    p.add_argument("--reads", type=int, help="random reads per reader (default 1000)")
    p.add_argument("--repeat", type=int, help="passes per measurement, median (default 3)")
    p.add_argument("--json", help="write all figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--peer", choices=["nydusd", "pyfuse3", "none"], default="nydusd",
                   help="run upstream nydusd (default), or pynydusd on pyfuse3 (libfuse), "
                        "beside pynydusd in every phase")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("daemon_bench needs root (FUSE and overlay mounts, drop_caches)", file=sys.stderr)
        return 2
    q = args.quick
    args.seq_mib = args.seq_mib or (32 if q else 1024)
    args.files = args.files or (2000 if q else 50_000)
    args.reads = args.reads or (50 if q else 1000)
    args.repeat = args.repeat or (1 if q else 3)
    res = run(args)
    print()
    print(f"pynydusd benchmark ({'quick' if q else 'full'}: {args.seq_mib} MiB file, "
          f"{args.files} files, {args.readers} readers x {args.reads} reads, "
          f"median of {args.repeat}; {res['host']['cpus']} CPUs, kernel {res['host']['kernel']})")
    print(report(res))
    if args.peer != "none":
        print()
        print(peer_report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
