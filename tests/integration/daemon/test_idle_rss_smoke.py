"""The idle-RSS benchmark must keep running: ``bench/idle_rss.py``.

A small tree and two rounds (so the order rotates): a row per daemon, each printed
idle RSS the median of the JSON's samples and each "vs nydusd" ratio the quotient of
the two medians, not only a table printed. The figures themselves are not checked: CI
machines vary.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_idle_rss_prints_each_ratio_as_the_quotient_of_its_medians(tmp_path: Path) -> None:
    out_json = tmp_path / "rss.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "idle_rss.py"), "--files", "300",
                        "--repeat", "2", "--json", str(out_json)],
                       capture_output=True, text=True, timeout=400, cwd=REPO, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    runs = json.loads(out_json.read_text())
    assert set(runs) == {"pynydusd", "nydusd"}
    assert all(len(v) == 2 for v in runs.values()), runs
    # the order rotated: each daemon went first in one round
    firsts = [ln.split()[2].rstrip(":") for ln in r.stdout.splitlines()
              if ln.startswith("round ")]
    assert firsts == ["pynydusd", "nydusd", "nydusd", "pynydusd"], r.stdout
    rows = {c[0]: c for c in ([x.strip() for x in ln.split("|")[1:-1]]
                              for ln in r.stdout.splitlines() if ln.startswith("| "))}
    med = {k: statistics.median(x["mb"] for x in v) for k, v in runs.items()}
    for name, m in med.items():
        assert m > 0, (name, runs[name])
        assert rows[name][4] == f"{m:.1f} MB", (rows[name], m)
    assert rows["nydusd"][5] == "1.00x"
    assert rows["pynydusd"][5] == f"{med['pynydusd'] / med['nydusd']:.2f}x", (rows, med)
