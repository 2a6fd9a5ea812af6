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
                        "--repeat", "2", "--json", str(out_json)],
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
    # each printed ratio is the quotient of the two figures printed beside it, which are
    # the JSON's; the cold baseline counts the same (file) bytes as the daemon's run
    cells = {ln.split("|")[1].strip().split(" (")[0].split(",")[0]:
             [c.strip() for c in ln.split("|")[1:-1]] for ln in table}
    ws, wk, cs, cr = data["warm_seq"], data["walk"], data["cold_seq"], data["cold_random"]
    expect = {
        "warm sequential read": (f"{ws['native_mb_s']} MB/s", f"{ws['pynydusd_mb_s']} MB/s",
                                 ws["pynydusd_mb_s"] / ws["native_mb_s"]),
        "tree walk + lstat": (f"{wk['native_s']} s", f"{wk['pynydusd_s']} s",
                              wk["pynydusd_s"] / wk["native_s"]),
        "cold sequential read": (f"{cs['plain_http_mb_s']} MB/s", f"{data['cold_seq_mb_s']} MB/s",
                                 data["cold_seq_mb_s"] / cs["plain_http_mb_s"]),
        "cold 4 KiB random": (f"{cr['native_iops']} IOPS", f"{data['cold_random_iops']} IOPS",
                              data["cold_random_iops"] / cr["native_iops"]),
    }
    for row, (native, ours, ratio) in expect.items():
        c = cells[row]
        assert c[1].startswith(native) and c[2] == ours and c[3] == f"{ratio:.2f}x", (row, c)
    seq_bytes = data["config"]["seq_mib"] << 20
    assert cs["bytes"] == seq_bytes
    assert cs["plain_http_mb_s"] == round(seq_bytes / cs["plain_http_seconds"] / 1e6, 1)
    assert data["cold_seq_mb_s"] == round(seq_bytes / cs["seconds"] / 1e6, 1)
    assert cs["blob_bytes"] < seq_bytes  # the GETs moved fewer bytes than the file has
    n = data["config"]["repeat"]
    assert len(cs["runs"]) == len(cs["plain_http_runs_s"]) == n
    assert len(cr["runs"]) == len(cr["native_runs_s"]) == n
    assert len(ws["native_runs_s"]) == len(ws["pynydusd_runs_s"]) == n
    assert set(Path("/var/tmp").glob("pyn-dbench-*")) <= before  # it cleaned up its data
