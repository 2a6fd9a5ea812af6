"""The daemon benchmark must keep running: ``bench/daemon_bench.py --quick``.

Checks the shape of what it prints and writes (every measurement row with a ratio and
a verdict, every figure in the JSON), not the figures themselves: CI machines vary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
ROWS = ["warm sequential read", "tree walk + lstat", "cold sequential read",
        "cold 4 KiB random", "start to ready", "idle RSS"]
FIGURES = ["warm_seq_ratio", "walk_ratio", "cold_seq_mb_s", "cold_random_iops",
           "start_to_ready_s", "idle_rss_mb"]


def test_daemon_bench_quick_prints_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "daemon.json"
    before = set(Path("/var/tmp").glob("pyn-dbench-*"))
    r = subprocess.run([sys.executable, str(REPO / "bench" / "daemon_bench.py"), "--quick",
                        "--json", str(out_json)],
                       capture_output=True, text=True, timeout=400, cwd=REPO, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    for row in ROWS:
        line = next((ln for ln in table if ln.startswith(f"| {row}")), None)
        assert line is not None, r.stdout
        assert "meets" in line or "MISSES" in line, line
    data = json.loads(out_json.read_text())
    for key in FIGURES:
        assert data[key] > 0, key
    assert data["walk"]["files"] == 2000
    assert data["cold_seq"]["registry_gets"] >= data["cold_seq"]["backend_requests"] > 0
    assert set(Path("/var/tmp").glob("pyn-dbench-*")) <= before  # it cleaned up its data
