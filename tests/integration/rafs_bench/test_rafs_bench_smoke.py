"""The RAFS build/merge benchmark's ``--quick`` mode runs end to end, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.harness import tools

REPO = Path(__file__).resolve().parents[3]



def test_rafs_bench_quick_prints_the_table(tmp_path: Path) -> None:
    tools.require("mkfs.erofs", "unpigz", "taskset")
    out = tmp_path / "bench.json"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(REPO / "bench" / "rafs_bench.py"), "--quick",
                        "--workdir", str(tmp_path / "data"), "--json", str(out)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < 60
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
