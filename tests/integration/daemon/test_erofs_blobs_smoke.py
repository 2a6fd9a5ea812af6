"""``bench/erofs_blobs.py --quick`` must keep running: both ways of serving an image (the
FUSE tree and kernel EROFS over ``pynydusd --blob-files``) measured in every phase.

Checks the shape of the JSON (a positive figure per mode and phase, one run per
repetition), not the figures: CI machines vary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
MODES = {"fusedev", "erofs"}


def test_erofs_blobs_quick_measures_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "eblobs.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "erofs_blobs.py"), "--quick",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    data = json.loads(out.read_text())
    for key in ("warm_seq_mb_s", "walk_s", "cold_seq_mb_s", "cold_random_iops"):
        assert set(data[key]) == MODES, key
        assert all(v > 0 for v in data[key].values()), (key, data[key])
    for key in ("warm_seq_runs", "walk_runs", "cold_seq_runs", "cold_random_runs"):
        assert all(len(runs) == 1 for runs in data[key].values()), (key, data[key])
    for mode in MODES:
        (mem,) = data["memory_after_cold_seq"][mode]
        assert mem["rss_mb"] > 0 and mem["cache_file_mb"] >= 0 and mem["mount_file_mb"] >= 0
