"""Log levels and rotation (lumberjack's semantics): size, backups, age, local time, gzip."""

from __future__ import annotations

import datetime
import gzip
import logging
import os
from pathlib import Path

import pytest

from pynydus.logs import LEVELS, RotatingLog, level_of, nydusd_level


def _logger(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"test-logs-{id(handler)}")
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    return log


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_levels_are_one_vocabulary() -> None:
    assert level_of("WARN") == level_of("warning") == logging.WARNING
    assert level_of("trace") == logging.DEBUG and level_of("panic") == logging.CRITICAL
    with pytest.raises(ValueError, match="unknown log level 'shout'"):
        level_of("shout")
    assert [nydusd_level(n) for n in LEVELS] == ["trace", "debug", "info", "warn", "warn",
                                                  "error", "error", "error"]


def test_rotates_by_size_and_keeps_max_backups(tmp_path: Path) -> None:
    h = RotatingLog(str(tmp_path / "x.log"), max_bytes=1000, max_backups=2, compress=False)
    log = _logger(h)
    for i in range(60):
        log.info("line %03d %s", i, "." * 80)  # ~90 bytes: a rotation every ~11 lines
    h.close()
    names = _files(tmp_path)
    backups = [n for n in names if n != "x.log"]
    assert "x.log" in names and len(backups) == 2
    assert all(n.startswith("x-") and n.endswith(".log") for n in backups)
    assert all(os.path.getsize(tmp_path / n) <= 1000 for n in names)
    assert "line 059" in (tmp_path / "x.log").read_text()


def test_compresses_backups_with_gzip(tmp_path: Path) -> None:
    h = RotatingLog(str(tmp_path / "x.log"), max_bytes=500, max_backups=0, compress=True)
    log = _logger(h)
    for i in range(30):
        log.info("line %03d %s", i, "." * 80)
    h.close()
    gz = [n for n in _files(tmp_path) if n.endswith(".log.gz")]
    assert gz and not [n for n in _files(tmp_path) if n not in gz and n != "x.log"]
    text = b"".join(gzip.decompress((tmp_path / n).read_bytes()) for n in sorted(gz)).decode()
    assert "line 000" in text  # nothing lost: backups (0 = keep all) plus the live file


def test_deletes_backups_older_than_max_age(tmp_path: Path) -> None:
    old = tmp_path / "x-2001-01-01T00-00-00.000.log"
    old.write_text("ancient\n")
    recent_stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S.000")
    recent = tmp_path / f"x-{recent_stamp}-1.log"
    recent.write_text("recent\n")
    unrelated = tmp_path / "y-2001-01-01T00-00-00.000.log"
    unrelated.write_text("someone else's\n")
    h = RotatingLog(str(tmp_path / "x.log"), max_bytes=200, max_age_days=7, compress=False)
    log = _logger(h)
    for i in range(10):
        log.info("line %03d %s", i, "." * 80)
    h.close()
    assert not old.exists() and recent.exists() and unrelated.exists()


def test_local_time_false_names_backups_in_utc(tmp_path: Path) -> None:
    h = RotatingLog(str(tmp_path / "x.log"), max_bytes=200, local_time=False)
    log = _logger(h)
    for i in range(5):
        log.info("line %03d %s", i, "." * 80)
    h.close()
    (stamp, _), *_ = h.backups()
    utc = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert abs((stamp - utc).total_seconds()) < 60


def test_zero_size_never_rotates(tmp_path: Path) -> None:
    h = RotatingLog(str(tmp_path / "x.log"), max_bytes=0, max_backups=1)
    log = _logger(h)
    for i in range(100):
        log.info("line %03d %s", i, "." * 80)
    h.close()
    assert _files(tmp_path) == ["x.log"]
