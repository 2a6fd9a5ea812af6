"""The check-image benchmark's ``--quick`` mode runs end to end, so it cannot rot, and
the ratios it prints are the quotients of the figures its JSON holds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_check_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "check_bench.py"), "--quick",
                        "--json", str(out)], capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())["images"]["quick"]
    assert res["files"] > 2000
    assert res["convert_median"] > 0 and res["check_median"] > 0
    assert res["convert_cpu_median"] > 0 and res["check_cpu_median"] > 0
    m = re.search(r"check/convert ([0-9.]+) \(CPU s: convert ([0-9.]+), check ([0-9.]+), "
                  r"ratio ([0-9.]+)\)", r.stdout)
    assert m is not None, r.stdout
    assert float(m[1]) == res["ratio_check_over_convert"] == \
        round(res["check_median"] / res["convert_median"], 2)
    assert float(m[4]) == res["cpu_ratio_check_over_convert"] == \
        round(res["check_cpu_median"] / res["convert_cpu_median"], 2)
