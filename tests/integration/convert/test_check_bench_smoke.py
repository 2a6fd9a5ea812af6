"""The check-image benchmark's ``--quick`` mode runs end to end, so it cannot rot."""

from __future__ import annotations

import json
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
    assert "check/convert" in r.stdout
