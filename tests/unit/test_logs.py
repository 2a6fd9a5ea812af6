"""Log levels and rotation (lumberjack's semantics): size, backups, age, local time, gzip."""

from __future__ import annotations

import datetime
import gzip
import logging
import os
import re
from pathlib import Path

import pytest

from pynydus.logs import LEVELS, RotatingLog, level_of, nydusd_level
from tests.harness.util import root_logging_of


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


def test_without_background_the_rotating_call_cleans_up_and_no_thread_starts(
        tmp_path: Path) -> None:
    import threading

    h = RotatingLog(str(tmp_path / "x.log"), max_bytes=500, max_backups=1, compress=True,
                    background=False)
    log = _logger(h)
    before = threading.active_count()
    for i in range(30):
        log.info("line %03d %s", i, "." * 80)
        # right after each call: at most one backup, compressed
        backups = [n for n in _files(tmp_path) if n != "x.log"]
        assert len(backups) <= 1 and all(n.endswith(".log.gz") for n in backups)
    assert backups and threading.active_count() == before and h._mill is None
    h.close()


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


def test_opening_a_log_cleans_up_the_backups_already_there(tmp_path: Path) -> None:
    """As lumberjack on open: what aged while the process was down goes, what a crash left
    uncompressed is compressed, before any new rotation."""
    old = tmp_path / "x-2001-01-01T00-00-00.000.log"
    old.write_text("ancient\n")
    os.utime(old, (0, 0))
    recent_stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S.000")
    plain = tmp_path / f"x-{recent_stamp}.log"
    plain.write_text("left plain by a crash\n")
    h = RotatingLog(str(tmp_path / "x.log"), max_bytes=1 << 20, max_age_days=1, compress=True)
    h.close()  # waits for the clean-up
    assert _files(tmp_path) == sorted(["x.log", plain.name + ".gz"])
    assert gzip.decompress((tmp_path / (plain.name + ".gz")).read_bytes()) == \
        b"left plain by a crash\n"


def test_snapshotter_log_rotates_as_configured(tmp_path: Path) -> None:
    """[log] log_rotation_*: the snapshotter's own log rotates at max_size MB into gzipped
    backups and drops those older than max_age days (by count:
    test_rotates_by_size_and_keeps_max_backups)."""
    from pynydus.config import load_config
    from pynydus.snapshot.server import setup_logging

    logs = tmp_path / "logs"
    logs.mkdir()
    aged = logs / "nydus-snapshotter-2001-01-01T00-00-00.000.log.gz"
    aged.write_bytes(gzip.compress(b"ancient\n"))
    os.utime(aged, (0, 0))
    config = tmp_path / "config.toml"
    config.write_text(f'version = 1\nroot = "{tmp_path}/root"\n[log]\ndir = "{logs}"\n'
                      "log_rotation_max_size = 1\nlog_rotation_max_backups = 4\n"
                      "log_rotation_max_age = 3\nlog_rotation_compress = true\n")
    cfg, _ = load_config(config)
    line = "x" * 1000
    with root_logging_of(lambda: setup_logging(cfg)) as root:
        # only the file handler: the stderr one takes warnings, and these are infos
        for i in range(3600):  # 3.6 MB: three rotations at 1 MB
            root.info("%05d %s", i, line)
    names = _files(logs)
    backups = [n for n in names if n != "nydus-snapshotter.log"]
    assert "nydus-snapshotter.log" in names and aged.name not in names, names
    assert len(backups) == 3 and all(n.endswith(".log.gz") for n in backups), names
    assert all((logs / n).stat().st_size < 1 << 20 for n in names)
    newest = gzip.decompress((logs / max(backups)).read_bytes()).decode()
    assert len(newest) <= 1 << 20 and newest.endswith(f"{line}\n")
    assert "03599 " in (logs / "nydus-snapshotter.log").read_text()


def test_pynydusd_rotates_its_log_at_the_rotation_size(tmp_path: Path) -> None:
    """pynydusd --log-rotation-size N (what the snapshotter passes from [daemon]
    log_rotation_size) rotates its --log-file at N MB; 0 never rotates."""
    from pynydus.daemon import main as dmain

    log_file = tmp_path / "nydusd.log"
    args = dmain.build_parser().parse_args(
        ["--log-file", str(log_file), "--log-rotation-size", "1"])
    with root_logging_of(lambda: dmain._setup_logging(args)) as root:
        for i in range(1500):
            root.warning("%05d %s", i, "y" * 1000)
    backups = [n for n in _files(tmp_path) if n != "nydusd.log"]
    assert len(backups) == 1 and backups[0].startswith("nydusd-"), backups
    assert (tmp_path / backups[0]).stat().st_size <= 1 << 20


def test_the_daemon_command_carries_the_rotation_size(tmp_path: Path) -> None:
    from pynydus.manager.manager import DaemonManager
    from pynydus.manager.store import DaemonRecord, DaemonStore

    store = DaemonStore(tmp_path / "daemons.db")
    rec = DaemonRecord(id="d1", mode="dedicated", mountpoint="/m", api_socket="/a.sock",
                       config_path="/c.json", bootstrap="/b.boot", log_file="/l/nydusd.log")
    try:
        cmd = DaemonManager(store, command=["pynydusd"], log_rotation_size=7).build_command(rec)
        i = cmd.index("--log-rotation-size")
        assert cmd[i + 1] == "7" and cmd[cmd.index("--log-file") + 1] == "/l/nydusd.log"
        plain = DaemonManager(store, command=["pynydusd"]).build_command(rec)
        assert "--log-rotation-size" not in plain  # 0: nydusd's own default, no rotation
    finally:
        store.close()


def test_sigusr1_logs_every_threads_stack_whatever_the_level() -> None:
    import signal
    import threading
    import time

    from pynydus.logs import dump_stacks_on

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("test-stacks")
    log.propagate = False
    log.handlers[:] = [Keep()]
    log.setLevel(logging.ERROR)  # an INFO record would be dropped by log.info()
    parked = threading.Event()

    def parked_here() -> None:
        parked.wait(30)

    t = threading.Thread(target=parked_here, name="parked-worker")
    t.start()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        assert dump_stacks_on(signal.SIGUSR1, logger="test-stacks")
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 10  # the dump thread logs it
        while not records and time.monotonic() < deadline:
            time.sleep(0.01)
        (rec,) = records
        text = rec.getMessage()
        # the count is the dump's own: threads of other tests may come and go meanwhile
        assert re.match(r"SIGUSR1: stacks of \d+ threads, pid \d+\n", text), text[:200]
        assert "thread 'parked-worker'" in text and "in parked_here" in text
        assert "thread 'MainThread'" in text and "in test_sigusr1_logs" in text
        assert "daemon thread 'stack-dump'" in text
    finally:
        signal.signal(signal.SIGUSR1, previous)
        parked.set()
        t.join()


def test_stack_dumps_need_the_main_thread() -> None:
    import threading

    from pynydus.logs import dump_stacks_on

    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(dump_stacks_on()))
    t.start()
    t.join()
    assert got == [False]
