"""The snapshotter benchmark must keep running: ``bench/snapshotter_ops.py --quick``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPS = ["Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "List"]


def test_snapshotter_ops_quick_prints_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "ops.json"
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "snapshotter_ops.py"),
                             "--quick", "--json", str(out_json)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the benchmark stops what it started
        stdout, stderr = proc.communicate(timeout=120)
        raise AssertionError(f"benchmark timed out\nstdout:\n{stdout}\nstderr:\n{stderr}")
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines()
            if line.startswith("| ") and line.count("|") > 6}
    for op in OPS:
        assert op in rows, r.stdout
        assert "x |" in rows[op], rows[op]  # the nydus/overlayfs ratio column
    data = json.loads(out_json.read_text())
    for target in ("overlayfs", "nydus"):
        for op in OPS:
            assert data["ops"][target][op]["n"] > 0
    # every printed ratio is the quotient of the figures the JSON holds
    ops = data["ops"]
    for op in OPS:
        cells = [c.strip() for c in rows[op].split("|")[1:-1]]
        y, o = ops["nydus"][op], ops["overlayfs"][op]
        assert cells[5] == f"{y['p50_ms'] / o['p50_ms']:.2f}x", (op, cells)
        assert cells[6] == f"{y['p95_ms'] / o['p95_ms']:.2f}x", (op, cells)
        assert cells[1] == f"{o['p50_ms']:.3f}" and cells[3] == f"{y['p50_ms']:.3f}", cells
    listed = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
              for line in r.stdout.splitlines()
              if line.startswith("| ") and line.count("|") == 6}
    lists = data["list"]
    for name in ("overlayfs", "nydus"):
        cells = listed[name]
        assert cells[4] == f"{lists[name]['list_s'] / lists['overlayfs']['list_s']:.2f}x", cells
        assert cells[2] == f"{lists[name]['list_s'] * 1000:.1f}", cells
        assert len(lists[name]["list_runs_s"]) >= 1
    assert data["list"]["nydus"]["listed"] >= 100
    assert data["rss_kib"]["idle_after_run"]["VmRSS"] > 0
