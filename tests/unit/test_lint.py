"""`ruff check` and `mypy` (settings in pyproject.toml) pass on the whole checkout.

They run as tests so that every change run through the test suite is linted, and CI
(`.ci/run` -> `scripts/test.sh`) runs them like any other test. By hand:
`.venv/bin/ruff check src tests bench scripts fuzz` and `.venv/bin/mypy src`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINTED = [d for d in ("src", "tests", "bench", "scripts", "fuzz") if (ROOT / d).is_dir()]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_ruff_check_passes() -> None:
    r = _run("ruff", "check", "--output-format", "concise", *LINTED)
    assert r.returncode == 0, f"ruff check found problems:\n{r.stdout}{r.stderr}"


def test_mypy_passes_on_src() -> None:
    r = _run("mypy", "src")
    assert r.returncode == 0, f"mypy found problems:\n{r.stdout}{r.stderr}"
