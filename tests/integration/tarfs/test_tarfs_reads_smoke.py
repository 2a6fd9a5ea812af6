"""The tarfs read benchmark must keep running: ``bench/tarfs_reads.py``.

The lab's small image (``bench/lazy_images.py --only small --formats oci``, cached under
``$PYNYDUS_BENCH_DIR``), overlayfs against file-backed EROFS, two repetitions (the order
rotates): each printed median is the JSON's and each printed ratio the quotient of the
two modes' medians, not only a table printed. The figures themselves are not checked.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import tools

pytestmark = [pytest.mark.root]

REPO = Path(__file__).resolve().parents[3]
PHASES = ["walk first", "walk warm", "read first", "read warm"]


def test_tarfs_reads_prints_each_ratio_as_the_quotient_of_its_medians(tmp_path: Path) -> None:
    tools.require("pigz", "tar")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "lazy_images.py"), "--only", "small",
                        "--formats", "oci"], capture_output=True, text=True, timeout=900,
                       cwd=REPO, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    out_json = tmp_path / "reads.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "tarfs_reads.py"), "--image", "small",
                        "-n", "2", "--modes", "overlayfs,file", "--read-dir", "/app",
                        "--json", str(out_json)],
                       capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    runs = json.loads(out_json.read_text())["runs"]
    assert {m: len(v) for m, v in runs.items()} == {"overlayfs": 2, "file": 2}
    rows = {c[0]: c[1:] for c in ([x.strip() for x in ln.split("|")[1:-1]]
                                  for ln in r.stdout.splitlines() if ln.startswith("| "))}
    med = {m: {ph: statistics.median(run[ph][0] for run in v) for ph in PHASES}
           for m, v in runs.items()}
    for i, ph in enumerate(PHASES):
        assert rows["overlayfs"][i].startswith(f"{med['overlayfs'][ph]:.3f} ["), rows["overlayfs"]
        ratio = med["file"][ph] / med["overlayfs"][ph]
        assert rows["file"][i].startswith(f"{med['file'][ph]:.3f} {ratio:.2f}x ["), (ph, rows)
