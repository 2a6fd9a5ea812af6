"""CI's short fuzzing run: every target under atheris for a few thousand executions
(or 5 s) from its seeds and past findings (fuzz/regressions), with the campaign's limits
(1 s per input, 256 MB RSS): no finding."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fuzz.targets import SPECS

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_every_target_survives_a_short_run() -> None:
    import atheris  # noqa: F401 - a missing fuzzer is a failure: setup.sh installs it

    out = Path(tempfile.mkdtemp(prefix="pyn-fuzz-smoke-", dir="/var/tmp"))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fuzz", "campaign", "--runs", "3000", "--max-time", "5",
             "--out", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False,
        )
        summary = json.loads((out / "summary.json").read_text())
        assert {r["target"] for r in summary} == {s.name for s in SPECS}
        for r in summary:
            log = Path(r["log"]).read_text(errors="replace")[-3000:]
            assert not r["findings"] and r["exit_code"] == 0, f"{r['target']}: {log}"
            assert r["executions"] > 0, f"{r['target']}: {log}"
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        shutil.rmtree(out, ignore_errors=True)
