#!/usr/bin/env python3
"""RAFS build and merge: ``pynydus image build|merge`` against ``mkfs.erofs`` and ``gzip -d``.

Everything runs in one invocation so ratios compare figures taken on the same machine
under the same load (the shared 2-vCPU VM; every figure carries its 1-minute load
average). Every tool runs as a child process and is measured with ``os.wait4``: wall
seconds, CPU seconds (user + sys of the child) and peak RSS.

1. **build, none**: layer (a) ``mixed`` (a few large files, half incompressible, half
   text-like, plus many small text files; 500 MB) and layer (b) ``small`` (50,000 files),
   each a directory, ``pynydus image build --compressor none`` vs ``mkfs.erofs IMG DIR``
   (uncompressed). Target: pynydus / mkfs.erofs <= 2.
2. **build, lz4_block** of layer (a), pinned to one CPU (``taskset -c 0``): MB of input
   per wall second with the source in the page cache (what one core does; target >= 150
   MB/s), and per CPU second / wall second with caches dropped (adds the disk reads).
3. **build from a gzip tar** of layer (a) (``--type targz-rafs --compressor none``) vs
   ``gzip -dc > /dev/null``, ``unpigz -c`` (containerd's layer decompressor), Python's
   zlib and python-isal (ISA-L, the decoder the builder uses) inflating the same file.
   Target: limited by gzip decoding (ratio to zlib close to 1).
4. **merge** of ten 50,000-file layer bootstraps (built once; half of every layer's
   directories are shared with the other layers, so the overlay has real work). Target < 5 s.
   ``--merge-old`` also times the tree merge (the implementation the record merge
   replaced, still there for v5/tarfs layers) alternating with it, and checks that both
   write the same bytes; ``--merge-layers DIR`` reuses layer bootstraps built earlier.
5. **peak RSS** of ``pynydus image build --compressor lz4_block`` on a 2 GB layer.
   Target < 300 MB.

The peer (``--peer nydus-image``, the default; ``--peer none`` leaves it out): upstream's
``nydus-image`` 2.2 (``scripts/peers.sh nydus-rs``) builds the same inputs with the same
compressor in phases 1-3 (``create -t dir-rafs|targz-rafs --fs-version 6``, its defaults
otherwise: 1 MiB chunks, blake3), alternating with ours, and in phase 4 merges the same
ten layers built by itself (``nydus-image merge``). Target: pynydus / nydus-image <= 1.5x
wall for every build and the merge.

The page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) before every
timed run that reads the source, so each tool reads from disk (off in ``--quick`` and with
``--no-drop-caches``). Short phases are repeated (median of ``--repeat``, default 3).
Data lives under /var/tmp/pynydus-rafs-bench and is removed at the end (``--keep`` keeps it).

    bench/rafs_bench.py                   # full run (about 15 minutes)
    bench/rafs_bench.py --quick           # CI smoke: tiny sizes, < 60 s
    bench/rafs_bench.py --json out.json
    bench/rafs_bench.py --only targz,small,lz4 --baseline-src /var/tmp/pyn-old/src
                                          # some phases; an older tree's builds alongside
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path("/var/tmp/pynydus-rafs-bench")
PYCACHE = Path("/var/tmp/pynydus-bench/pycache")
# What a build imports (older trees given with --baseline-src may lack some of it).
WARM_IMPORTS = ("import importlib\n"
                "for m in ('pynydus.cli.image_cmd', 'pynydus.rafs.builder', 'pynydus.rafs.merge', "
                "'pynydus.rafs.decoder.decodeproc', 'pynydus.rafs.decodeproc'):\n"
                "    try:\n"
                "        importlib.import_module(m)\n"
                "    except ImportError:\n"
                "        pass\n")
# The console script beside this interpreter (the venv's), as users run it.
PYNYDUS = [str(Path(sys.executable).parent / "pynydus")]


@dataclass(frozen=True)
class Sizes:
    mixed_mb: int
    small_files: int
    merge_layers: int
    merge_files: int
    big_mb: int


FULL = Sizes(mixed_mb=500, small_files=50_000, merge_layers=10, merge_files=50_000, big_mb=2000)
QUICK = Sizes(mixed_mb=8, small_files=500, merge_layers=10, merge_files=300, big_mb=24)


@dataclass
class Run:
    wall: float
    cpu: float
    maxrss_mb: float
    load1: float


# -- data ---------------------------------------------------------------------------------

def _corpus(rng: random.Random, n: int) -> bytes:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4000)]
    return " ".join(rng.choices(vocab, k=n // 5 + 1)).encode()[:n]


def _text(rng: random.Random, corpus: bytes, n: int) -> bytes:
    # Slices of one corpus at random offsets: compressible like text, cheap to make,
    # and distinct enough that 1 MiB chunks do not dedup.
    out = bytearray()
    while len(out) < n:
        off = rng.randrange(0, len(corpus) - 4096)
        out += corpus[off:off + min(n - len(out), len(corpus) - off)]
    return bytes(out[:n])


def gen_mixed(root: Path, total_mb: int, seed: int) -> int:
    """80% in 8 large files (alternately random and text), 20% in ~8 KiB text files."""
    rng = random.Random(seed)
    corpus = _corpus(rng, 8 << 20)
    total = total_mb << 20
    big = total * 8 // 10
    root.mkdir(parents=True)
    (root / "big").mkdir()
    for i in range(8):
        size = big // 8
        path = root / "big" / f"file{i}.{'bin' if i % 2 == 0 else 'txt'}"
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 8 << 20)
                f.write(rng.randbytes(n) if i % 2 == 0 else _text(rng, corpus, n))
                left -= n
    left = total - big
    files = 0
    while left > 0:
        d = root / "src" / f"pkg{files // 200:04d}"
        if files % 200 == 0:
            d.mkdir(parents=True)
        n = min(left, rng.randint(512, 16 << 10))
        (d / f"mod{files % 200:03d}.py").write_bytes(_text(rng, corpus, n))
        left -= n
        files += 1
    return files + 8


def gen_small(root: Path, n_files: int, seed: int, shared_half: bool = False) -> None:
    """``n_files`` text files of 0-4 KiB, 100 per directory.

    ``shared_half``: the first half of the directories have the same names in every layer
    (so a merge overlays them), the rest are named after the seed.
    """
    rng = random.Random(seed)
    corpus = _corpus(rng, 1 << 20)
    n_dirs = (n_files + 99) // 100
    root.mkdir(parents=True)
    for d in range(n_dirs):
        name = f"d{d:04d}" if shared_half and d < n_dirs // 2 else f"l{seed}_d{d:04d}"
        dp = root / name
        dp.mkdir()
        for i in range(min(100, n_files - d * 100)):
            (dp / f"f{i:03d}.txt").write_bytes(_text(rng, corpus, rng.randint(0, 4096)))


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# -- measurement --------------------------------------------------------------------------

class Bench:
    def __init__(self, drop: bool, repeat: int) -> None:
        self.drop = drop
        self.repeat = repeat

    def drop_caches(self) -> None:
        if not self.drop:
            return
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")

    def run(self, cmd: list[str], *, stdout: int | None = subprocess.DEVNULL,
            stdin: int | None = None, pre: Sequence[Path] = (), cold: bool = True,
            src: Path = REPO / "src", mkdirs: Sequence[Path] = ()) -> Run:
        """One child: wall, CPU (user+sys), peak RSS. ``pre`` paths are removed first,
        ``mkdirs`` made then (nydus-image wants its blob directory to exist);
        ``src`` is the pynydus source tree the child imports."""
        for p in pre:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        for d in mkdirs:
            d.mkdir(parents=True, exist_ok=True)
        if cold:
            self.drop_caches()
        load1 = os.getloadavg()[0]
        # Byte-compiled modules, as an installed pynydus has them: a shell with
        # PYTHONDONTWRITEBYTECODE would make every run compile ~0.1 s of source.
        env = dict(os.environ, PYTHONPATH=str(src), PYTHONPYCACHEPREFIX=str(PYCACHE))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=stdout, stdin=stdin, stderr=subprocess.PIPE, env=env)
        err = proc.stderr.read() if proc.stderr else b""
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd!r} exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
        return Run(wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, load1)


def _median(runs: list[Run]) -> Run:
    """The median run by wall time."""
    return sorted(runs, key=lambda r: r.wall)[len(runs) // 2]


def build_cmd(src: Path, bootstrap: Path, blob_dir: Path, compressor: str, kind: str | None = None) -> list[str]:
    cmd = [*PYNYDUS, "image", "build", str(src), "--bootstrap", str(bootstrap),
           "--blob-dir", str(blob_dir), "--compressor", compressor]
    if kind:
        cmd += ["--type", kind]
    return cmd


def upstream_build_cmd(src: Path, bootstrap: Path, blob_dir: Path, compressor: str,
                       kind: str | None = None) -> list[str]:
    """``nydus-image create`` of the same input, as upstream's converter runs it."""
    return [str(NYDUS_IMAGE[0]), "create", "--log-level", "warn", "-t", kind or "dir-rafs",
            "--fs-version", "6", "--compressor", compressor, "-B", str(bootstrap),
            "-D", str(blob_dir), str(src)]


# upstream's nydus-image (set in main from the peers cache when --peer nydus-image)
NYDUS_IMAGE: list[Path] = []


MERGE_TREES = (
    "import sys\n"
    "from pynydus.rafs.merge import merge_trees\n"
    "merge_trees(sys.argv[2:], sys.argv[1])\n"
)

ZLIB_INFLATE = (
    "import sys, zlib\n"
    "if sys.argv[2:] == ['isal']:\n"
    "    from isal import isal_zlib as zlib\n"
    "d = zlib.decompressobj(31)\n"
    "with open(sys.argv[1], 'rb') as f:\n"
    "    while b := f.read(1 << 20):\n"
    "        d.decompress(b)\n"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per short phase (median)")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--workdir", default=str(DATA_ROOT))
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: build,lz4,targz,merge,rss")
    ap.add_argument("--only", default="",
                    help="comma list of phases to run, the others skipped: build (= mixed,small), "
                         "mixed, small, lz4, targz, merge, rss")
    ap.add_argument("--baseline-src", type=Path,
                    help="another pynydus src/ (e.g. a worktree of an older commit): its build runs "
                         "alternate with ours in the build, lz4 and targz phases and are reported too")
    ap.add_argument("--merge-old", action="store_true",
                    help="merge phase: also time the tree merge (merge_trees) of this tree, alternating")
    ap.add_argument("--merge-layers", help="merge phase: use DIR/layer*.boot (built earlier) "
                    "instead of generating and building the layers")
    ap.add_argument("--peer", choices=["nydus-image", "none"], default="nydus-image",
                    help="upstream nydus-image builds and merges the same inputs (default)")
    args = ap.parse_args(argv)
    peer = args.peer == "nydus-image"
    if peer:
        sys.path.insert(0, str(REPO))
        from tests.harness.peers import peer_bin

        NYDUS_IMAGE[:] = [peer_bin("nydus-rs", "nydus-image")]  # fails now, naming peers.sh
    sizes = QUICK if args.quick else FULL
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    if only:
        if only & {"mixed", "small"}:
            only.add("build")
        skip |= {"build", "lz4", "targz", "merge", "rss"} - only
    build_layers = [n for n in ("mixed", "small") if not only & {"mixed", "small"} or n in only]
    base_src: Path | None = args.baseline_src.resolve() if args.baseline_src else None
    # (label, src tree) of every pynydus variant a build phase measures
    variants = [("pynydus", REPO / "src")] + ([("baseline", base_src)] if base_src else [])
    drop = not (args.quick or args.no_drop_caches) and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    b = Bench(drop, args.repeat)
    for _, tree in variants:  # fill the pycache before anything is timed
        b.run([sys.executable, "-c", WARM_IMPORTS], cold=False, src=tree)
    work = Path(args.workdir) / ("quick" if args.quick else "full")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out = work / "out"
    res: dict[str, object] = {"sizes": asdict(sizes), "drop_caches": drop, "repeat": args.repeat,
                              "nproc": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows: list[tuple[str, str, str, str]] = []  # (figure, value, target, load1)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    try:
        mixed = work / "mixed"
        mixed_mb = 0.0
        if ("build" not in skip and "mixed" in build_layers) or not {"lz4", "targz"} <= skip:
            log(f"generating layer (a): {sizes.mixed_mb} MB mixed")
            n_mixed = gen_mixed(mixed, sizes.mixed_mb, seed=1)
            mixed_mb = dir_bytes(mixed) / 1e6
            res["mixed"] = {"files": n_mixed, "mb": mixed_mb}

        if "build" not in skip:
            small = work / "small"
            if "small" in build_layers:
                log(f"generating layer (b): {sizes.small_files} small files")
                gen_small(small, sizes.small_files, seed=2)
            for name, src in [(n, mixed if n == "mixed" else small) for n in build_layers]:
                log(f"build {name}: pynydus none vs mkfs.erofs")
                img = out / "erofs.img"
                bs, blobs = out / "bootstrap", out / "blobs"

                def erofs(src: Path = src, img: Path = img) -> Run:
                    out.mkdir(exist_ok=True)
                    return b.run(["mkfs.erofs", "--quiet", str(img), str(src)], pre=[img])

                def ours(src: Path = src, bs: Path = bs, blobs: Path = blobs,
                         tree: Path = REPO / "src") -> Run:
                    out.mkdir(exist_ok=True)
                    return b.run(build_cmd(src, bs, blobs, "none"), pre=[bs, blobs], src=tree)

                def theirs(src: Path = src, bs: Path = bs, blobs: Path = blobs) -> Run:
                    return b.run(upstream_build_cmd(src, bs, blobs, "none"), pre=[bs, blobs],
                                 mkdirs=[blobs])

                # Alternate the tools so drifting load hits all alike.
                e_runs: list[Run] = []
                n_runs: list[Run] = []
                v_runs: dict[str, list[Run]] = {label: [] for label, _ in variants}
                for _ in range(b.repeat):
                    e_runs.append(erofs())
                    for label, tree in variants:
                        v_runs[label].append(ours(tree=tree))
                    if peer:
                        n_runs.append(theirs())
                e = _median(e_runs)
                res[f"build_{name}"] = {"mkfs_erofs": [asdict(r) for r in e_runs],
                                        **{k: [asdict(r) for r in v] for k, v in v_runs.items()},
                                        "ratio": _median(v_runs["pynydus"]).wall / e.wall}
                if n_runs:
                    nm = _median(n_runs)
                    res[f"build_{name}"]["nydus_image"] = [asdict(r) for r in n_runs]
                    res[f"build_{name}"]["ratio_vs_nydus_image"] = \
                        _median(v_runs["pynydus"]).wall / nm.wall
                rows.append((f"build {name}: mkfs.erofs (wall / cpu)", f"{e.wall:.2f} s / {e.cpu:.2f} s", "baseline", f"{e.load1:.2f}"))
                for label, _ in variants:
                    p = _median(v_runs[label])
                    rows.append((f"build {name}: {label} none (wall / cpu)", f"{p.wall:.2f} s / {p.cpu:.2f} s", "", f"{p.load1:.2f}"))
                    rows.append((f"build {name}: {label} / mkfs.erofs (wall; cpu)",
                                 f"{p.wall / e.wall:.2f}x; {p.cpu / e.cpu:.2f}x", "<= 2x", ""))
                if n_runs:
                    p = _median(v_runs["pynydus"])
                    rows.append((f"build {name}: nydus-image none (wall / cpu)",
                                 f"{nm.wall:.2f} s / {nm.cpu:.2f} s", "peer", f"{nm.load1:.2f}"))
                    rows.append((f"build {name}: pynydus / nydus-image (wall; cpu)",
                                 f"{p.wall / nm.wall:.2f}x; {p.cpu / nm.cpu:.2f}x", "<= 1.5x", ""))
            shutil.rmtree(small, ignore_errors=True)

        if "lz4" not in skip:
            log("build mixed: lz4_block on one CPU")
            bs, blobs = out / "bootstrap", out / "blobs"
            out.mkdir(exist_ok=True)
            l_runs: dict[str, list[Run]] = {label: [] for label, _ in variants}
            # Cold: the source read from disk (caches dropped), as after a reboot.
            # Warm: the source in the page cache, as right after it was unpacked or
            # downloaded; what one core does with the data, without the disk.
            w_runs: dict[str, list[Run]] = {label: [] for label, _ in variants}
            lz4 = ["taskset", "-c", "0"]
            nl_runs: list[Run] = []
            nw_runs: list[Run] = []
            for _ in range(b.repeat):
                for label, tree in variants:
                    l_runs[label].append(b.run([*lz4, *build_cmd(mixed, bs, blobs, "lz4_block")],
                                               pre=[bs, blobs], src=tree))
                    w_runs[label].append(b.run([*lz4, *build_cmd(mixed, bs, blobs, "lz4_block")],
                                               pre=[bs, blobs], src=tree, cold=False))
                if peer:
                    up_cmd = [*lz4, *upstream_build_cmd(mixed, bs, blobs, "lz4_block")]
                    nl_runs.append(b.run(up_cmd, pre=[bs, blobs], mkdirs=[blobs]))
                    nw_runs.append(b.run(up_cmd, pre=[bs, blobs], mkdirs=[blobs], cold=False))
            if peer:  # ours wrote last in each round: leave its blobs for the size below
                b.run([*lz4, *build_cmd(mixed, bs, blobs, "lz4_block")], pre=[bs, blobs],
                      cold=False)
            comp = sum(p.stat().st_size for p in blobs.iterdir())
            res["lz4"] = {"runs": [asdict(r) for r in l_runs["pynydus"]],
                          "warm_runs": [asdict(r) for r in w_runs["pynydus"]], "mb_in": mixed_mb,
                          "blob_mb": comp / 1e6,
                          **({"baseline": [asdict(r) for r in l_runs["baseline"]],
                              "baseline_warm": [asdict(r) for r in w_runs["baseline"]]}
                             if base_src else {})}
            for label, _ in variants:
                m, w = _median(l_runs[label]), _median(w_runs[label])
                who = "" if label == "pynydus" else f" ({label})"
                rows.append((f"lz4_block build{who}, warm cache: MB in / wall s on 1 CPU",
                             f"{mixed_mb / w.wall:.0f} MB/s", ">= 150 MB/s", f"{w.load1:.2f}"))
                rows.append((f"lz4_block build{who}, warm cache: MB in / CPU s",
                             f"{mixed_mb / w.cpu:.0f} MB/s", "", ""))
                rows.append((f"lz4_block build{who}, cold cache: MB in / CPU s", f"{mixed_mb / m.cpu:.0f} MB/s", "", f"{m.load1:.2f}"))
                rows.append((f"lz4_block build{who}, cold cache: MB in / wall s (1 CPU)", f"{mixed_mb / m.wall:.0f} MB/s", "", ""))
            if nl_runs:
                nm, nw = _median(nl_runs), _median(nw_runs)
                m, w = _median(l_runs["pynydus"]), _median(w_runs["pynydus"])
                res["lz4"]["nydus_image"] = [asdict(r) for r in nl_runs]
                res["lz4"]["nydus_image_warm"] = [asdict(r) for r in nw_runs]
                rows.append(("lz4_block build (nydus-image), warm cache: MB in / wall s on 1 CPU",
                             f"{mixed_mb / nw.wall:.0f} MB/s", "peer", f"{nw.load1:.2f}"))
                rows.append(("lz4_block build (nydus-image), cold cache: MB in / wall s (1 CPU)",
                             f"{mixed_mb / nm.wall:.0f} MB/s", "peer", f"{nm.load1:.2f}"))
                rows.append(("lz4_block build: pynydus / nydus-image, warm (wall; cpu)",
                             f"{w.wall / nw.wall:.2f}x; {w.cpu / nw.cpu:.2f}x", "<= 1.5x", ""))
                rows.append(("lz4_block build: pynydus / nydus-image, cold (wall; cpu)",
                             f"{m.wall / nm.wall:.2f}x; {m.cpu / nm.cpu:.2f}x", "<= 1.5x", ""))

        if "targz" not in skip:
            log("gzip tar of layer (a)")
            tgz = work / "mixed.tar.gz"
            with open(tgz, "wb") as f:
                tar = subprocess.Popen(["tar", "-C", str(mixed), "-cf", "-", "."], stdout=subprocess.PIPE)
                subprocess.run(["gzip", "-6"], stdin=tar.stdout, stdout=f, check=True)
                assert tar.wait() == 0
            gz_mb = tgz.stat().st_size / 1e6
            bs, blobs = out / "bootstrap", out / "blobs"
            out.mkdir(exist_ok=True)
            g_runs: list[Run] = []
            u_runs: list[Run] = []  # unpigz: zlib's inflate with reading/writing/CRC on threads
            z_runs: list[Run] = []
            i_runs: list[Run] = []  # ISA-L's inflate (python-isal), which the builder uses
            t_runs: dict[str, list[Run]] = {label: [] for label, _ in variants}
            nt_runs: list[Run] = []
            for _ in range(b.repeat):
                g_runs.append(b.run(["gzip", "-dc", str(tgz)]))
                if shutil.which("unpigz"):
                    u_runs.append(b.run(["unpigz", "-c", str(tgz)]))
                z_runs.append(b.run([sys.executable, "-c", ZLIB_INFLATE, str(tgz)]))
                i_runs.append(b.run([sys.executable, "-c", ZLIB_INFLATE, str(tgz), "isal"]))
                for label, tree in variants:
                    t_runs[label].append(b.run(build_cmd(tgz, bs, blobs, "none", "targz-rafs"),
                                               pre=[bs, blobs], src=tree))
                if peer:
                    nt_runs.append(b.run(upstream_build_cmd(tgz, bs, blobs, "none", "targz-rafs"),
                                         pre=[bs, blobs], mkdirs=[blobs]))
            g, z, i = _median(g_runs), _median(z_runs), _median(i_runs)
            res["targz"] = {"gz_mb": gz_mb, "gzip_dc": [asdict(r) for r in g_runs],
                            "zlib": [asdict(r) for r in z_runs], "isal": [asdict(r) for r in i_runs],
                            **{k: [asdict(r) for r in v] for k, v in t_runs.items()}}
            rows.append(("targz: gzip -dc > /dev/null (wall)", f"{g.wall:.2f} s", "baseline", f"{g.load1:.2f}"))
            u = _median(u_runs) if u_runs else None
            if u is not None:
                res["targz"]["unpigz"] = [asdict(r) for r in u_runs]
                rows.append(("targz: unpigz -c > /dev/null (wall)", f"{u.wall:.2f} s", "baseline", f"{u.load1:.2f}"))
            rows.append(("targz: Python zlib inflate (wall / cpu)", f"{z.wall:.2f} s / {z.cpu:.2f} s", "baseline", f"{z.load1:.2f}"))
            rows.append(("targz: Python isal inflate (wall / cpu)", f"{i.wall:.2f} s / {i.cpu:.2f} s", "baseline", f"{i.load1:.2f}"))
            for label, _ in variants:
                p = _median(t_runs[label])
                rows.append((f"targz: {label} build none (wall / cpu)", f"{p.wall:.2f} s / {p.cpu:.2f} s", "", f"{p.load1:.2f}"))
                rows.append((f"targz: {label} / gzip -dc", f"{p.wall / g.wall:.2f}x", "", ""))
                if u is not None:
                    rows.append((f"targz: {label} / unpigz -c", f"{p.wall / u.wall:.2f}x", "", ""))
                rows.append((f"targz: {label} / zlib inflate (wall; cpu)",
                             f"{p.wall / z.wall:.2f}x; {p.cpu / z.cpu:.2f}x", "~1x (decode-bound)", ""))
                rows.append((f"targz: {label} / isal inflate (wall; cpu)",
                             f"{p.wall / i.wall:.2f}x; {p.cpu / i.cpu:.2f}x", "", ""))
            if nt_runs:
                nm, p = _median(nt_runs), _median(t_runs["pynydus"])
                res["targz"]["nydus_image"] = [asdict(r) for r in nt_runs]
                rows.append(("targz: nydus-image build none (wall / cpu)",
                             f"{nm.wall:.2f} s / {nm.cpu:.2f} s", "peer", f"{nm.load1:.2f}"))
                rows.append(("targz: pynydus / nydus-image (wall; cpu)",
                             f"{p.wall / nm.wall:.2f}x; {p.cpu / nm.cpu:.2f}x", "<= 1.5x", ""))
            tgz.unlink()

        if "merge" not in skip:
            layers = sorted(Path(args.merge_layers).glob("layer*.boot")) if args.merge_layers else []
            up_layers: list[Path] = []  # the same layers built by nydus-image
            for k in range(0 if layers else sizes.merge_layers):
                src = work / f"layer{k}"
                log(f"merge: generating and building layer {k}")
                gen_small(src, sizes.merge_files, seed=100 + k, shared_half=True)
                bs = work / f"layer{k}.boot"
                b.run(build_cmd(src, bs, work / "merge-blobs", "lz4_block"), cold=False)
                if peer:
                    ubs = work / f"up-layer{k}.boot"
                    b.run(upstream_build_cmd(src, ubs, work / "merge-blobs-up", "lz4_block"),
                          cold=False, mkdirs=[work / "merge-blobs-up"])
                    up_layers.append(ubs)
                shutil.rmtree(src)
                layers.append(bs)
            out.mkdir(exist_ok=True)
            merged, merged_old = out / "merged.boot", out / "merged-tree.boot"
            # The tree merge (the implementation before the record merge) alternates with
            # ours, so both see the same load; their outputs must be the same bytes.
            m_runs: dict[str, list[Run]] = {"records": [], "tree": [], "nydus_image": []}
            merged_up = out / "merged-up.boot"
            for _ in range(b.repeat):
                m_runs["records"].append(b.run([*PYNYDUS, "image", "merge", *map(str, layers),
                                                "--bootstrap", str(merged)], pre=[merged]))
                if up_layers:
                    m_runs["nydus_image"].append(b.run(
                        [str(NYDUS_IMAGE[0]), "merge", "--log-level", "warn", "-B",
                         str(merged_up), *map(str, up_layers)], pre=[merged_up]))
                if args.merge_old:
                    m_runs["tree"].append(b.run([sys.executable, "-c", MERGE_TREES, str(merged_old),
                                                 *map(str, layers)], pre=[merged_old]))
            m = _median(m_runs["records"])
            res["merge"] = {"layers": len(layers), "files_per_layer": sizes.merge_files,
                            "runs": [asdict(r) for r in m_runs["records"]],
                            "tree_runs": [asdict(r) for r in m_runs["tree"]],
                            "merged_bytes": merged.stat().st_size}
            name = f"merge {len(layers)} x {sizes.merge_files} files"
            rows.append((f"{name} (wall / cpu)", f"{m.wall:.2f} s / {m.cpu:.2f} s", "< 5 s", f"{m.load1:.2f}"))
            rows.append((f"{name}: peak RSS", f"{m.maxrss_mb:.0f} MB", "", ""))
            if m_runs["nydus_image"]:
                nm = _median(m_runs["nydus_image"])
                res["merge"]["nydus_image_runs"] = [asdict(r) for r in m_runs["nydus_image"]]
                rows.append((f"{name}, nydus-image merge (wall / cpu)",
                             f"{nm.wall:.2f} s / {nm.cpu:.2f} s", "peer", f"{nm.load1:.2f}"))
                rows.append((f"{name}: pynydus / nydus-image (wall; cpu)",
                             f"{m.wall / nm.wall:.2f}x; {m.cpu / nm.cpu:.2f}x", "<= 1.5x", ""))
            if m_runs["tree"]:
                t = _median(m_runs["tree"])
                same = merged.read_bytes() == merged_old.read_bytes()
                res["merge"]["identical_to_tree_merge"] = same
                rows.append((f"{name}, tree merge (wall / cpu)", f"{t.wall:.2f} s / {t.cpu:.2f} s", "", f"{t.load1:.2f}"))
                rows.append((f"{name}, tree merge: peak RSS", f"{t.maxrss_mb:.0f} MB", "", ""))
                rows.append((f"{name}: tree / records (wall; cpu)", f"{t.wall / m.wall:.1f}x; {t.cpu / m.cpu:.1f}x",
                             "", "same bytes" if same else "OUTPUTS DIFFER"))

        if "rss" not in skip:
            shutil.rmtree(mixed, ignore_errors=True)
            big = work / "big"
            log(f"generating {sizes.big_mb} MB layer")
            gen_mixed(big, sizes.big_mb, seed=3)
            big_mb = dir_bytes(big) / 1e6
            bs, blobs = out / "bootstrap", out / "blobs"
            out.mkdir(exist_ok=True)
            log("build big layer: peak RSS")
            r = b.run(build_cmd(big, bs, blobs, "lz4_block"), pre=[bs, blobs])
            res["rss"] = {"mb_in": big_mb, "run": asdict(r)}
            rows.append((f"build {big_mb:.0f} MB lz4_block: peak RSS", f"{r.maxrss_mb:.0f} MB", "< 300 MB", f"{r.load1:.2f}"))
            rows.append((f"build {big_mb:.0f} MB lz4_block (wall / cpu)", f"{r.wall:.1f} s / {r.cpu:.1f} s", "", ""))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    w0 = max(len(r[0]) for r in rows) if rows else 10
    layer_a = res.get("mixed")
    print(f"RAFS build and merge ({'quick' if args.quick else 'full'}; median of {b.repeat}; "
          f"drop caches: {drop}"
          + (f"; layer (a) {layer_a['mb']:.0f} MB in {layer_a['files']} files)"  # type: ignore[index]
             if layer_a else ")"))
    print(f"| {'figure':<{w0}} | value | target | load1 |")
    print(f"|{'-' * (w0 + 2)}|---|---|---|")
    for fig, val, tgt, load in rows:
        print(f"| {fig:<{w0}} | {val} | {tgt} | {load} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
