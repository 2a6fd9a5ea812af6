"""The churn benchmark must keep running: ``bench/churn.py --quick`` (3 images, one cycle,
both daemon modes). Checks the shape of what it prints and writes, and the one figure
that does not depend on the machine: no per-daemon directory is left after the images
are removed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.root]


def test_churn_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "churn.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "churn.py"), "--quick",
                        "--json", str(out)], capture_output=True, text=True, timeout=900,
                       cwd=REPO, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    doc = json.loads(out.read_text())
    assert [x["mode"] for x in doc["results"]] == ["dedicated", "shared"]
    for res in doc["results"]:
        (cycle,) = res["cycles"]
        assert cycle["mounted"]["start_back_to_back_s"]["median"] > 0
        assert cycle["remove_s"] > 0 and cycle["cleanup_s"] > 0
        if res["mode"] == "dedicated":
            assert cycle["mounted"]["image_daemons"] == 3
            assert cycle["mounted"]["image_daemon_pss_kib"] > 0
        else:
            assert cycle["mounted"]["shared_daemon"]["rss"] > 0
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
    assert table == doc["curve"] + doc["summary"]
    # each printed memory ratio is the quotient of the two JSON figures it names
    for res in doc["results"]:
        last = res["cycles"][-1]
        want = {"snapshotter RSS after / warm":
                last["after"]["snapshotter_rss_kib"] / res["warm"]["snapshotter_rss_kib"]}
        if res["mode"] == "shared":
            want["shared daemon RSS after removal / warm"] = (
                last["after"]["shared_daemon"]["rss"] / res["warm"]["shared_daemon"]["rss"])
        for what, value in want.items():
            (line,) = [ln for ln in table if ln.startswith(f"| {res['mode']}")
                       and f"| {what} |" in ln]
            assert f"| {value:.2f} x |" in line, (line, value)
    left = [ln for ln in table if "directories of stopped daemons" in ln]
    assert len(left) == 2 and all("| meets |" in ln for ln in left), left
