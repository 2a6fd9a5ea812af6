"""The warm-sequential A/B benchmark must keep running: ``bench/warm_seq_ab.py``.

Checks the shape of what it prints and writes (a row per contender and native, each
ratio the quotient of the medians the JSON holds), not the figures: CI machines vary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_warm_seq_ab_small_run_prints_a_row_per_contender(tmp_path: Path) -> None:
    out_json = tmp_path / "ab.json"
    before = set(Path("/var/tmp").glob("pyn-seqab-*"))
    src = str(REPO / "src")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "warm_seq_ab.py"), "--mib", "8",
                        "--repeat", "2", "--variant", f"a={src}", "--variant",
                        f"b={src},ra=2048", "--json", str(out_json)],
                       capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    data = json.loads(out_json.read_text())
    rows = {c[0]: c for c in ([x.strip() for x in ln.split("|")[1:-1]]
                              for ln in r.stdout.splitlines() if ln.startswith("| "))}
    for name in ("a", "b", "native"):
        assert len(data[name]["runs_s"]) == 2
        assert rows[name][1] == f"{data[name]['mb_s']}"
    ratio = data["b"]["mb_s"] / data["native"]["mb_s"]
    assert abs(float(rows["b"][2].rstrip("x")) - ratio) < 0.02, (rows["b"], ratio)
    assert len(data["a"]["cpu_s"]) == 2 and rows["native"][3] == "-"
    assert set(Path("/var/tmp").glob("pyn-seqab-*")) <= before  # it cleaned up its data
