#!/usr/bin/env python3
"""Image conversion end to end: ``pynydus convert`` vs ``ctr-remote images convert --estargz``.

One image (default 500 MB of file data in 5 layers, gzip'ed; half compressible
text-like files, half incompressible binary files, no file repeated) is built
offline and pushed to a private loopback ``docker-registry``. Then, in the same run:

* **pynydus**: ``pynydus convert --source REG/src --target REG/nydus`` with an empty
  layer cache and a target repository without the blobs: pull, convert, push.
* **ctr-remote** (stargz-snapshotter's converter, the lazy-pull competitor):
  ``ctr content fetch`` (pull without unpacking) + ``ctr-remote images convert
  --estargz --oci`` + ``ctr-remote images push``, against a private containerd.
* **pynydus, warm**: the same convert again into a fresh repository (every layer
  from the local cache, only pushing), and once more into the same repository
  (nothing to do but manifests).

Each tool runs ``--repeat`` times (default 3), the two alternating and each going
first in turn; every round has a fresh registry holding only the source image (so no
run finds the blobs of an earlier one), pynydus an empty layer cache, ctr-remote a
fresh containerd, and the page cache is dropped before each run. Reported: medians
of wall seconds per phase (every run in the JSON), the ratio ctr-remote/pynydus of
those medians, and the CPU the tool's processes used divided by wall time ("cores
busy"; the machine's other tenants do not count). The image layout is cached in
/var/tmp by its parameters, so a rerun does not rebuild it.

    bench/convert_bench.py                    # full run: 500 MB, 5 layers, 3 rounds
    bench/convert_bench.py --quick            # CI smoke: 5 x 4 MB
    bench/convert_bench.py --size-mb 200 --layers 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import oci
from tests.harness.containerd import Containerd
from tests.harness.registry import Registry

CTR_REMOTE = shutil.which("ctr-remote") or "/usr/bin/ctr-remote"
FILE_SIZE = 4 << 20


def _text_corpus(rng: random.Random, n: int) -> bytes:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4000)]
    words = rng.choices(vocab, k=n // 5)
    return " ".join(words).encode()[:n]


def build_image(size_mb: int, layers: int, workdir: Path) -> oci.BuiltImage:
    """Deterministic layered image: each layer ``size_mb/layers`` MB of 4 MiB files."""
    rng = random.Random(20261127)
    corpus = _text_corpus(rng, 8 << 20)
    per_layer = size_mb * 1_000_000 // layers
    built = []
    for li in range(layers):
        layer = oci.Layer(f"bench-{li}")
        done, fi = 0, 0
        while done < per_layer:
            size = min(FILE_SIZE, per_layer - done)
            if fi % 2 == 0:  # text-like: slices of the corpus at random offsets + noise
                parts, got = [], 0
                while got < size:
                    off = rng.randrange(0, len(corpus) - 65536)
                    piece = corpus[off:off + 65536] + rng.randbytes(64)
                    parts.append(piece)
                    got += len(piece)
                data = b"".join(parts)[:size]
            else:
                data = rng.randbytes(size)
            layer.file(f"data/l{li}/f{fi:04d}.bin", data)
            done += size
            fi += 1
        built.append(layer)
    return oci.Image(built).write_layout(workdir / "layout")


def cached_image(size_mb: int, layers: int) -> oci.BuiltImage:
    cache = Path(f"/var/tmp/pynydus-bench-convert-{size_mb}mb-{layers}l-v1")
    meta = cache / "built.json"
    if meta.exists():
        d = json.loads(meta.read_text())
        return oci.BuiltImage(Path(d["layout"]), d["tag"], d["manifest_digest"],
                              d["config_digest"], d["layers"], d["diff_ids"])
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    img = build_image(size_mb, layers, cache)
    meta.write_text(json.dumps({"layout": str(img.layout), "tag": img.tag,
                                "manifest_digest": img.manifest_digest,
                                "config_digest": img.config_digest, "layers": img.layers,
                                "diff_ids": img.diff_ids}))
    return img


def _proc_cpu(pid: int) -> float:
    """utime+stime of a live process in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(argv: list[str], *, extra_pid: int | None = None) -> tuple[float, float]:
    """Run argv; return (wall seconds, CPU seconds of it and its children [+ extra_pid])."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    extra0 = _proc_cpu(extra_pid) if extra_pid else 0.0
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}… failed ({r.returncode}):\n{r.stderr[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if extra_pid:
        cpu += _proc_cpu(extra_pid) - extra0
    return wall, cpu


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _med(runs: list[dict[str, float]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def run(size_mb: int, layers: int, repeat: int, out_json: str | None) -> dict[str, object]:
    t_build = time.monotonic()
    image = cached_image(size_mb, layers)
    build_s = time.monotonic() - t_build
    src_bytes = image.size
    res: dict[str, object] = {
        "image": {"size_mb_file_data": size_mb, "layers": layers,
                  "compressed_bytes": src_bytes, "build_seconds": round(build_s, 1)},
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "kernel": platform.release(), "loadavg_start": os.getloadavg()[0]},
        "repeat": repeat,
    }
    py = sys.executable
    ours_runs: list[dict[str, float]] = []
    ctr_runs: list[dict[str, float]] = []
    order: list[list[str]] = []
    layers_summary: list[object] = []

    def pynydus_round(reg: Registry, tmp: str) -> None:
        src = reg.ref("bench/src")

        def ours(target: str, cache: str) -> tuple[float, float]:
            return timed([py, "-m", "pynydus.cli.main", "convert", "--source", src,
                          "--target", target, "--cache-dir", cache, "--progress", "quiet",
                          "--output-json", os.path.join(tmp, "summary.json")])

        cache = os.path.join(tmp, "cache")  # empty: a new temporary directory per round
        drop_caches()
        wall, cpu = ours(reg.ref("bench/nydus"), cache)
        summary = json.loads(Path(tmp, "summary.json").read_text())
        layers_summary[:] = summary["images"][0]["layers"]
        warm_new, _ = ours(reg.ref("bench/nydus2"), cache)
        warm_same, _ = ours(reg.ref("bench/nydus2"), cache)
        ours_runs.append({"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                          "cores_busy": round(cpu / wall, 2), "warm_new_repo": round(warm_new, 2),
                          "warm_same_repo": round(warm_same, 2)})

    def ctr_round(reg: Registry, tmp: str) -> None:
        src = reg.ref("bench/src")
        with Containerd() as ctrd:  # empty content store
            base = ["-a", str(ctrd.socket), "-n", ctrd.namespace]
            pid = ctrd.pid
            drop_caches()
            f_wall, f_cpu = timed(["ctr", *base, "content", "fetch", "--plain-http", src],
                                  extra_pid=pid)
            c_wall, c_cpu = timed([CTR_REMOTE, *base, "images", "convert", "--estargz", "--oci",
                                   src, reg.ref("bench/esgz")], extra_pid=pid)
            p_wall, p_cpu = timed([CTR_REMOTE, *base, "images", "push", "--plain-http",
                                   reg.ref("bench/esgz")], extra_pid=pid)
        total = f_wall + c_wall + p_wall
        cpu = f_cpu + c_cpu + p_cpu
        ctr_runs.append({"seconds": round(total, 2), "fetch_seconds": round(f_wall, 2),
                         "convert_seconds": round(c_wall, 2), "push_seconds": round(p_wall, 2),
                         "cpu_seconds": round(cpu, 2), "cores_busy": round(cpu / total, 2)})

    tools = {"pynydus": pynydus_round, "ctr-remote": ctr_round}
    names = list(tools)
    for rnd in range(repeat):
        k = rnd % len(names)
        order.append(names[k:] + names[:k])
        for name in order[-1]:
            with Registry() as reg, tempfile.TemporaryDirectory(prefix="pyn-cvb-") as tmp:
                oci.push(image, reg.ref("bench/src"))
                tools[name](reg, tmp)
    res["host"]["loadavg_end"] = os.getloadavg()[0]  # type: ignore[index]
    res["order"] = order
    res["pynydus_cold"] = {"seconds": _med(ours_runs, "seconds"),
                           "cpu_seconds": _med(ours_runs, "cpu_seconds"),
                           "cores_busy": _med(ours_runs, "cores_busy"), "runs": ours_runs}
    res["pynydus_layers"] = layers_summary
    res["pynydus_warm_new_repo"] = {"seconds": _med(ours_runs, "warm_new_repo")}
    res["pynydus_warm_same_repo"] = {"seconds": _med(ours_runs, "warm_same_repo")}
    res["ctr_remote"] = {k: _med(ctr_runs, k) for k in ctr_runs[0]} | {"runs": ctr_runs}
    cold, ctr = res["pynydus_cold"], res["ctr_remote"]
    assert isinstance(cold, dict) and isinstance(ctr, dict)
    res["ratio_ctr_remote_over_pynydus"] = round(ctr["seconds"] / cold["seconds"], 2)
    res["pynydus_source_mb_per_s"] = round(src_bytes / 1e6 / cold["seconds"], 1)
    if out_json:
        Path(out_json).write_text(json.dumps(res, indent=2))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="5 layers x 4 MB (CI smoke)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool, alternating (3)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("convert_bench needs root (containerd, drop_caches)", file=sys.stderr)
        return 2
    size, layers = (20, 5) if args.quick else (args.size_mb, args.layers)
    res = run(size, layers, args.repeat, args.json)
    cold, ctr = res["pynydus_cold"], res["ctr_remote"]
    assert isinstance(cold, dict) and isinstance(ctr, dict)
    print(f"image: {size} MB file data, {layers} layers, "
          f"{res['image']['compressed_bytes'] / 1e6:.1f} MB compressed")  # type: ignore[index]
    print(f"pynydus convert (cold):   {cold['seconds']:7.2f} s  cpu {cold['cpu_seconds']} s, "
          f"cores busy {cold['cores_busy']}")
    print(f"ctr-remote estargz:       {ctr['seconds']:7.2f} s  (fetch {ctr['fetch_seconds']}, "
          f"convert {ctr['convert_seconds']}, push {ctr['push_seconds']})  "
          f"cpu {ctr['cpu_seconds']} s, cores busy {ctr['cores_busy']}")
    print(f"load average (1 min) at start/end: {res['host']['loadavg_start']:.1f}/"  # type: ignore[index]
          f"{res['host']['loadavg_end']:.1f} on {os.cpu_count()} CPUs")  # type: ignore[index]
    print(f"medians of {res['repeat']} runs per tool, alternating: {res['order']}")
    print(f"ratio ctr-remote / pynydus: {ctr['seconds']:.2f} s / {cold['seconds']:.2f} s = "
          f"{res['ratio_ctr_remote_over_pynydus']:.2f}x")
    print(f"pynydus warm, new repo:   {res['pynydus_warm_new_repo']['seconds']:7.2f} s")  # type: ignore[index]
    print(f"pynydus warm, same repo:  {res['pynydus_warm_same_repo']['seconds']:7.2f} s")  # type: ignore[index]
    return 0


if __name__ == "__main__":
    sys.exit(main())
