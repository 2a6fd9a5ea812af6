"""``bench/lazy_pull.py --keep-logs``: each run's directory keeps the snapshotter's log and
every daemon's, which all are named ``nydusd.log`` in a directory of their own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import lazy_pull


def test_kept_logs_keep_every_daemons_log(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for did in ("image-daemon", "standby-daemon"):
        (root / "logs" / did).mkdir(parents=True)
        (root / "logs" / did / "nydusd.log").write_text(f"log of {did}\n")
    (tmp_path / "snap.log").write_text("snapshotter\n")
    snap = SimpleNamespace(log=tmp_path / "snap.log", root=root)
    dst = tmp_path / "kept"
    lazy_pull.save_logs(snap, dst, 1.0, 2.0, 3.0)  # type: ignore[arg-type]
    assert (dst / "image-daemon-nydusd.log").read_text() == "log of image-daemon\n"
    assert (dst / "standby-daemon-nydusd.log").read_text() == "log of standby-daemon\n"
    assert (dst / "snapshotter.log").read_text() == "snapshotter\n"
    assert json.loads((dst / "times.json").read_text())["run_end"] == 3.0
