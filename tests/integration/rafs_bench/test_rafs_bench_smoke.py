"""The RAFS build/merge benchmark's ``--quick`` mode runs end to end, so it cannot rot;
its printed ratios (against mkfs.erofs, the inflaters and upstream nydus-image) are the
quotients of the median runs its JSON holds."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from tests.harness import tools

REPO = Path(__file__).resolve().parents[3]



def test_rafs_bench_quick_prints_the_table(tmp_path: Path) -> None:
    tools.require("mkfs.erofs", "unpigz", "taskset")
    out = tmp_path / "bench.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, str(REPO / "bench" / "rafs_bench.py"), "--quick",
                        "--workdir", str(tmp_path / "data"), "--json", str(out)],
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # --quick stays quick: the CPU it and its children used (wall time is what a loaded
    # machine makes of it: 113 s once at load 40, where a quiet one takes 20)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu < 60, f"--quick used {cpu:.0f} s of CPU"
    for figure in ("build mixed: pynydus / mkfs.erofs", "build small: pynydus / mkfs.erofs",
                   "lz4_block build, warm cache: MB in / wall s on 1 CPU",
                   "lz4_block build, cold cache: MB in / CPU s", "targz: pynydus / zlib inflate",
                   "targz: pynydus / unpigz -c",
                   "merge 10 x", "peak RSS"):
        assert figure in r.stdout, r.stdout
    res = json.loads(out.read_text())
    assert res["merge"]["layers"] == 10 and res["rss"]["run"]["maxrss_mb"] > 0
    assert len(res["lz4"]["warm_runs"]) == len(res["lz4"]["runs"]) == 3
    assert not (tmp_path / "data" / "quick").exists()  # cleaned up
    # every printed ratio is the quotient of the median runs the JSON holds
    value = {c[0]: c[1] for c in ([x.strip() for x in ln.split("|")[1:-1]]
                                  for ln in r.stdout.splitlines() if ln.startswith("| "))}

    def med(runs: list[dict[str, float]]) -> dict[str, float]:
        return sorted(runs, key=lambda x: x["wall"])[len(runs) // 2]

    for name in ("mixed", "small"):
        p, e = med(res[f"build_{name}"]["pynydus"]), med(res[f"build_{name}"]["mkfs_erofs"])
        assert value[f"build {name}: pynydus / mkfs.erofs (wall; cpu)"] == \
            f"{p['wall'] / e['wall']:.2f}x; {p['cpu'] / e['cpu']:.2f}x"
        assert res[f"build_{name}"]["ratio"] == p["wall"] / e["wall"]
    t = res["targz"]
    p = med(t["pynydus"])
    for label, key in (("gzip -dc", "gzip_dc"), ("unpigz -c", "unpigz")):
        assert value[f"targz: pynydus / {label}"] == f"{p['wall'] / med(t[key])['wall']:.2f}x"
    for label, key in (("zlib inflate", "zlib"), ("isal inflate", "isal")):
        base = med(t[key])
        assert value[f"targz: pynydus / {label} (wall; cpu)"] == \
            f"{p['wall'] / base['wall']:.2f}x; {p['cpu'] / base['cpu']:.2f}x"
    mixed_mb = res["mixed"]["mb"]
    w, c = med(res["lz4"]["warm_runs"]), med(res["lz4"]["runs"])
    assert value["lz4_block build, warm cache: MB in / wall s on 1 CPU"] == \
        f"{mixed_mb / w['wall']:.0f} MB/s"
    assert value["lz4_block build, cold cache: MB in / CPU s"] == f"{mixed_mb / c['cpu']:.0f} MB/s"
    # upstream nydus-image on the same inputs: each ratio is ours over its median run
    for name in ("mixed", "small"):
        p, n = med(res[f"build_{name}"]["pynydus"]), med(res[f"build_{name}"]["nydus_image"])
        assert value[f"build {name}: pynydus / nydus-image (wall; cpu)"] == \
            f"{p['wall'] / n['wall']:.2f}x; {p['cpu'] / n['cpu']:.2f}x"
        assert res[f"build_{name}"]["ratio_vs_nydus_image"] == p["wall"] / n["wall"]
    nw, nc = med(res["lz4"]["nydus_image_warm"]), med(res["lz4"]["nydus_image"])
    assert value["lz4_block build: pynydus / nydus-image, warm (wall; cpu)"] == \
        f"{w['wall'] / nw['wall']:.2f}x; {w['cpu'] / nw['cpu']:.2f}x"
    assert value["lz4_block build: pynydus / nydus-image, cold (wall; cpu)"] == \
        f"{c['wall'] / nc['wall']:.2f}x; {c['cpu'] / nc['cpu']:.2f}x"
    n, pt = med(t["nydus_image"]), med(t["pynydus"])
    assert value["targz: pynydus / nydus-image (wall; cpu)"] == \
        f"{pt['wall'] / n['wall']:.2f}x; {pt['cpu'] / n['cpu']:.2f}x"
    m, nm = med(res["merge"]["runs"]), med(res["merge"]["nydus_image_runs"])
    assert value["merge 10 x 300 files: pynydus / nydus-image (wall; cpu)"] == \
        f"{m['wall'] / nm['wall']:.2f}x; {m['cpu'] / nm['cpu']:.2f}x"
