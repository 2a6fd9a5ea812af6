"""The failover benchmark must keep running: ``bench/failover_bench.py --kills 2``.

Checks that it exits 0 (no read error across the kills), prints its table and writes
one stall per kill and the split of the gap into its phases; not the figures themselves
(CI machines vary).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root]

REPO = Path(__file__).resolve().parents[3]


def test_failover_bench_runs_without_read_errors(tmp_path: Path) -> None:
    out_json = tmp_path / "failover.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "failover_bench.py"), "--kills", "2",
                        "--json", str(out_json)],
                       capture_output=True, text=True, timeout=400, cwd=REPO, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "| read errors (exceptions or wrong bytes) | 0 |" in r.stdout, r.stdout
    data = json.loads(out_json.read_text())
    assert data["errors"] == 0 and data["takeovers_logged"] == 2
    assert len(data["stall_s"]["all"]) == 2 and all(s > 0 for s in data["stall_s"]["all"])
    # the gap split into its phases, from each takeover's timeline in the snapshotter log
    assert list(data["phases_s"]) == ["noticed", "successor", "request", "state_received",
                                      "restored", "resent", "serving", "first_read"]
    assert all(p["p50"] >= 0 for p in data["phases_s"].values()), data["phases_s"]
