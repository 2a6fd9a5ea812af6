"""The convert benchmark's ``--quick`` mode runs end to end, so it cannot rot."""

from __future__ import annotations

import json
import os
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
    assert "ratio ctr-remote / pynydus" in r.stdout
