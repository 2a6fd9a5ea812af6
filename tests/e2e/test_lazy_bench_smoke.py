"""The lazy-pull benchmark must keep running: ``bench/lazy_pull.py --quick``.

Small image only, one repetition, loopback and the 100 Mbit/s proxy, overlayfs and
nydus (stargz too when its peer binary is already built: the smoke never compiles
Go). Checks the shape of the report, not the figures: every mode produced a row with a
ratio against overlayfs measured in the same run, and nydus fetched its data at run
time, not at pull time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import tools

REPO = Path(__file__).resolve().parents[2]


def test_lazy_pull_quick_prints_ratios(tmp_path: Path) -> None:
    tools.require("/usr/bin/ctr-remote", "skopeo", "pigz")
    out_json = tmp_path / "lazy.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "lazy_pull.py"), "--quick",
                        "--no-build-stargz", "--json", str(out_json)],
                       capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    data = json.loads(out_json.read_text())
    rows = {(row["network"], row["mode"]): row for row in data["rows"]}
    for net in ("loopback", "100mbit"):
        for mode in ("overlayfs", "nydus"):
            row = rows[(net, mode)]
            assert row["image"] == "small" and row["n"] == 1
            assert row["total_s"] > 0 and row["x_vs_overlayfs"] > 0
        assert rows[(net, "overlayfs")]["fetched_pull"] > 1e6  # the whole image at pull
        nydus = rows[(net, "nydus")]
        assert nydus["fetched_pull"] < 0.2e6 < nydus["fetched_run"]  # bootstrap only, then lazily
    assert "| loopback | small | nydus |" in r.stdout
    assert "vs overlayfs" in r.stdout
    # every printed figure and ratio is the JSON's: the quotient of its figures
    printed = {(c[0], c[1], c[2]): c for c in
               ([x.strip() for x in ln.split("|")[1:-1]] for ln in r.stdout.splitlines()
                if ln.startswith("| ") and ln.count("|") == 12)}
    for (net, mode), row in rows.items():
        cells = printed[(net, "small", mode)]
        base = rows[(net, "overlayfs")]["total_s"]
        assert cells[5] == f"**{row['total_s']:.2f}**", cells
        want = "1.00x (base)" if mode == "overlayfs" else f"{base / row['total_s']:.2f}x"
        assert cells[7] == want, cells
        assert row["x_vs_overlayfs"] == base / row["total_s"]
        fetched = row["fetched_pull"] + row["fetched_run"]
        assert row["fetched"] == fetched
        assert cells[10] == f"{fetched / row['workload_read']:.2f}", cells
