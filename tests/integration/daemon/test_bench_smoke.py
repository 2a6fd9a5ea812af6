"""The daemon benchmark must keep running: ``bench/daemon_bench.py --quick``.

Checks the shape of what it prints and writes (every measurement row with a ratio and
a verdict, every figure in the JSON, the same phases for upstream nydusd in a second
table), not the figures themselves: CI machines vary.
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
    ours_part = r.stdout.split("| vs upstream |", 1)[0]  # the peer's table comes second
    table = [ln for ln in ours_part.splitlines() if ln.startswith("| ")]
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
    # the peer table: upstream nydusd in every phase, each ratio pynydusd's figure over
    # nydusd's, both printed beside it and both the JSON's
    up, vs = data["nydusd"], data["vs_nydusd"]
    peer_rows = {c[0].split(" (")[0].split(",")[0]: c for c in
                 ([x.strip() for x in ln.split("|")[1:-1]] for ln in r.stdout.split(
                     "| vs upstream |", 1)[1].splitlines()[2:] if ln.startswith("| "))}
    pairs = {
        "warm sequential read": ("warm_seq", f"{up['warm_seq']['mb_s']} MB/s",
                                 f"{ws['pynydusd_mb_s']} MB/s"),
        "cold sequential read": ("cold_seq", f"{up['cold_seq']['mb_s']} MB/s",
                                 f"{data['cold_seq_mb_s']} MB/s"),
        "cold 4 KiB random": ("cold_random", f"{up['cold_random']['iops']} IOPS",
                              f"{data['cold_random_iops']} IOPS"),
        "tree walk + lstat": ("walk", f"{up['walk']['s']} s", f"{wk['pynydusd_s']} s"),
        "start to ready": ("start_to_ready", f"{up['start_to_ready']['s']} s",
                           f"{data['start_to_ready_s']} s"),
        "idle RSS": ("idle_rss", f"{up['idle_rss']['mb']} MB", f"{data['idle_rss_mb']} MB"),
    }
    for row, (key, theirs, ours) in pairs.items():
        c = peer_rows[row]
        assert c[1] == theirs and c[2] == ours and c[3] == f"{vs[key]:.2f}x", (row, c)
        assert c[5] in ("meets", "MISSES", "-"), c
    assert vs["warm_seq"] == ws["pynydusd_mb_s"] / up["warm_seq"]["mb_s"]
    assert vs["walk"] == wk["pynydusd_s"] / up["walk"]["s"]
    assert len(up["cold_seq"]["runs"]) == len(up["cold_random"]["runs"]) == n
    assert up["cold_seq"]["runs"][0]["registry_gets"] > 0  # nydusd read through the registry
