"""The convert benchmark's ``--quick`` mode runs end to end, so it cannot rot."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import tools

REPO = Path(__file__).resolve().parents[3]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (containerd for ctr-remote)"),
]


def test_convert_bench_quick(tmp_path: Path) -> None:
    tools.require("/usr/bin/ctr-remote")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "convert_bench.py"), "--quick",
                        "--json", str(out)], capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["pynydus_cold"]["seconds"] > 0 and res["ctr_remote"]["seconds"] > 0
    assert len(res["pynydus_layers"]) == 5
    # three runs per tool, alternating, each tool first in turn; medians reported
    assert res["repeat"] == 3 and len(res["order"]) == 3
    assert [o[0] for o in res["order"]] == ["pynydus", "ctr-remote", "pynydus"]
    cold, ctr = res["pynydus_cold"], res["ctr_remote"]
    assert len(cold["runs"]) == len(ctr["runs"]) == 3
    assert cold["seconds"] == round(statistics.median(x["seconds"] for x in cold["runs"]), 2)
    assert ctr["seconds"] == round(statistics.median(x["seconds"] for x in ctr["runs"]), 2)
    # the printed ratio is the quotient of the two JSON figures printed beside it
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("ratio ctr-remote / pynydus"))
    assert line == (f"ratio ctr-remote / pynydus: {ctr['seconds']:.2f} s / {cold['seconds']:.2f} s"
                    f" = {ctr['seconds'] / cold['seconds']:.2f}x"), line
    assert res["ratio_ctr_remote_over_pynydus"] == round(ctr["seconds"] / cold["seconds"], 2)
