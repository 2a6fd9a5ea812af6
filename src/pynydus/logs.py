"""Logging shared by the snapshotter and pynydusd: one level vocabulary, one rotating file.

Levels. The snapshotter's ``log.level`` takes logrus names, nydusd's ``--log-level`` and its
``PUT /api/v1/daemon`` take Rust ``log`` names; ``LEVELS`` holds both vocabularies once.

Rotation. ``RotatingLog`` rotates as lumberjack does for upstream's snapshotter (and so also
serves pynydusd's ``--log-rotation-size``): when a record would grow the file past
``max_bytes``, the file is renamed to ``<stem>-<timestamp><ext>`` (local time or UTC,
millisecond resolution) and a new one is opened. Backups are then, on a thread the handler
owns, gzip-compressed (``compress``), deleted beyond the ``max_backups`` newest (0 keeps all)
and deleted when their timestamp is older than ``max_age_days`` (0 keeps all). The age is
the one in the backup's name, as lumberjack reads it, not its mtime. Until it is compressed a
backup is a plain file, and a crash in between leaves it so. As lumberjack does on open, the
clean-up also runs when the handler opens a log that already has backups: a restarted
snapshotter or daemon compresses what a crash left plain and drops what aged while it was
down, without waiting for its next rotation. ``background=False`` does the clean-up in the
call that rotates (or opens) instead, for a process that must hold no thread: the daemon
template forks, and a fork copies no thread but every lock one holds.

Stacks. ``dump_stacks_on(SIGUSR1)`` makes the snapshotter and pynydusd log every thread's
stack when signalled (``kill -USR1 <pid>``), whatever the log level: what an operator asks
of a process that hangs, without attaching a debugger (py-spy ``dump`` works too, from
outside). The dump goes through logging, so it lands in the rotating log file, not on a
file descriptor that a rotation may have closed (faulthandler's way). The signal handler
only writes a byte to a pipe: Python runs handlers in the main thread between any two
bytecodes, also in the middle of that thread's own logging call (the handler's lock is
re-entrant, a rotation half done) or of a lock it holds, so logging there corrupts or
deadlocks. A thread reading the pipe takes the stacks and logs them; signals that arrive
while a dump is pending make one dump.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import datetime

__all__ = ["LEVELS", "NYDUSD_LEVELS", "RotatingLog", "dump_stacks_on", "level_of",
           "nydusd_level", "thread_stacks"]

LEVELS: Final[Mapping[str, int]] = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}

# What nydusd's --log-level accepts (Rust's log crate); pynydusd accepts every LEVELS name.
NYDUSD_LEVELS: Final = ("trace", "debug", "info", "warn", "error")


def level_of(name: str) -> int:
    """The logging level of a level name, case-insensitive; ValueError for an unknown one."""
    try:
        return LEVELS[name.lower()]
    except KeyError:
        known = ", ".join(LEVELS)
        raise ValueError(f"unknown log level {name!r} (known: {known})") from None


def nydusd_level(name: str) -> str:
    """The nydusd ``--log-level`` closest to a snapshotter level (nydusd knows five)."""
    level_of(name)  # unknown names are errors
    name = name.lower()
    return name if name in NYDUSD_LEVELS else {"warning": "warn"}.get(name, "error")


# lumberjack's backup timestamp, "2006-01-02T15-04-05.000"
_STAMP_FORMAT: Final = "%Y-%m-%dT%H-%M-%S"
_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d)\.(\d{3})")


class RotatingLog(logging.FileHandler):
    """A log file rotated by size, with timestamped, optionally gzipped, bounded backups.

    ``max_bytes`` 0 never rotates. Thread-safe as any logging handler; ``close()`` waits
    for compression and clean-up that are under way. ``background`` False: no thread, the
    clean-up runs in the logging call that rotates. A FileHandler, not a
    ``logging.handlers`` one: every pynydusd opens its log with this class, and that
    module (with pickle, for its socket handlers) is 0.6 MB of a daemon's RSS; datetime,
    gzip and shutil are imported when a backup is named, read or compressed.
    """

    def __init__(self, filename: str, *, max_bytes: int, max_backups: int = 0,
                 max_age_days: int = 0, local_time: bool = True, compress: bool = False,
                 background: bool = True) -> None:
        super().__init__(filename, "a", encoding="utf-8", delay=False)
        self.max_bytes = max_bytes
        self.max_backups = max_backups
        self.max_age_days = max_age_days
        self.local_time = local_time
        self.compress = compress
        self.background = background
        self._wake = threading.Condition()
        self._pending = False
        self._closing = False
        self._mill: threading.Thread | None = None
        if (compress or max_backups > 0 or max_age_days > 0) and self.backups():
            self._start_mill()

    # --- rotation (emit runs under the handler's lock) -------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.shouldRollover(record):
                self.doRollover()
            super().emit(record)
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        if self.max_bytes <= 0 or self.stream is None:
            return False
        size = self.stream.tell()
        return size > 0 and size + len(self.format(record)) + 1 > self.max_bytes

    def doRollover(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None  # type: ignore[assignment]
        if os.path.exists(self.baseFilename):
            os.rename(self.baseFilename, self._backup_name())
        self.stream = self._open()
        self._start_mill()

    def _now(self) -> datetime.datetime:
        import datetime

        if self.local_time:
            return datetime.datetime.now()
        return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)

    def _backup_name(self) -> str:
        stem, ext = os.path.splitext(self.baseFilename)
        now = self._now()
        stamp = f"{now.strftime(_STAMP_FORMAT)}.{now.microsecond // 1000:03d}"
        name = f"{stem}-{stamp}{ext}"
        n = 1
        while os.path.exists(name) or os.path.exists(name + ".gz"):  # two in one millisecond
            name = f"{stem}-{stamp}-{n}{ext}"
            n += 1
        return name

    # --- backups: compress, count, age (on the mill thread) ------------------------------

    def backups(self) -> list[tuple[datetime.datetime, str]]:
        """(timestamp, path) of this log's backups, newest first."""
        directory = os.path.dirname(self.baseFilename) or "."
        stem, ext = os.path.splitext(os.path.basename(self.baseFilename))
        import datetime

        found = []
        for name in os.listdir(directory):
            if not name.startswith(stem + "-"):
                continue
            rest = name[len(stem) + 1:].removesuffix(".gz")
            match = _STAMP.match(rest)
            if match is None or rest[match.end():].lstrip("-0123456789") != ext:
                continue
            stamp = datetime.datetime.strptime(match[1], _STAMP_FORMAT)
            stamp = stamp.replace(microsecond=int(match[2]) * 1000)
            found.append((stamp, os.path.join(directory, name)))
        found.sort(reverse=True)
        return found

    def _start_mill(self) -> None:
        if not self.background:
            self._mill_once()
            return
        with self._wake:
            self._pending = True
            if self._mill is None:
                self._mill = threading.Thread(target=self._mill_loop, name="log-mill", daemon=True)
                self._mill.start()
            self._wake.notify()

    def _mill_loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                self._pending = False
            self._mill_once()

    def _mill_once(self) -> None:
        try:
            self.mill()
        except OSError as err:  # never take the process down over old logs
            logging.getLogger(__name__).warning("log rotation clean-up: %s", err)

    def mill(self) -> None:
        """Apply compress, max_backups and max_age_days to the backups now on disk."""
        import datetime
        import gzip
        import shutil

        backups = self.backups()
        doomed: set[str] = set()
        if self.max_backups > 0:
            doomed |= {path for _, path in backups[self.max_backups:]}
        if self.max_age_days > 0:
            cutoff = self._now() - datetime.timedelta(days=self.max_age_days)
            doomed |= {path for stamp, path in backups if stamp < cutoff}
        for _, path in backups:
            if path in doomed:
                os.unlink(path)
            elif self.compress and not path.endswith(".gz"):
                tmp = path + ".gz.tmp"
                with open(path, "rb") as src, gzip.open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, path + ".gz")
                os.unlink(path)

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
            mill = self._mill
        if mill is not None and mill is not threading.current_thread():
            mill.join()
        super().close()


# --- stack dumps ------------------------------------------------------------------------


def thread_stacks() -> tuple[int, str]:
    """(number of threads, every thread's stack as traceback prints it, innermost last)."""
    threads = {t.ident: t for t in threading.enumerate()}
    frames = sys._current_frames()
    parts = []
    for ident, frame in sorted(frames.items()):
        t = threads.get(ident)
        name = t.name if t is not None else "?"
        kind = "daemon thread" if t is not None and t.daemon else "thread"
        parts.append(f"{kind} {name!r} (ident {ident}):\n"
                     + "".join(traceback.format_stack(frame)).rstrip("\n"))
    return len(frames), "\n".join(parts)


class _StackDumper:
    """The pipe the handlers write to and the thread that dumps (one per process)."""

    def __init__(self) -> None:
        self.loggers: dict[int, str] = {}  # signal -> logger the dump goes to
        self._read, self._write = os.pipe()  # both close-on-exec (PEP 446)
        os.set_blocking(self._write, False)
        threading.Thread(target=self._run, name="stack-dump", daemon=True).start()

    def on_signal(self, signum: int, _frame: object) -> None:
        try:
            os.write(self._write, bytes([signum]))
        except BlockingIOError:  # the pipe is full of requests: a dump is coming anyway
            pass

    def _run(self) -> None:
        while True:
            asked = set(os.read(self._read, 256))
            count, text = thread_stacks()
            for signum in sorted(asked):
                log = logging.getLogger(self.loggers.get(signum, "stacks"))
                record = log.makeRecord(log.name, logging.INFO, __file__, 0,
                                        "%s: stacks of %d threads, pid %d\n%s",
                                        (signal.Signals(signum).name, count, os.getpid(), text),
                                        None)
                log.handle(record)  # not log.info(): the dump was asked for, whatever the level


_dumper: _StackDumper | None = None


def dump_stacks_on(signum: int = signal.SIGUSR1, logger: str = "stacks") -> bool:
    """On ``signum``, log every thread's stack at INFO through ``logger`` (its handlers and
    the root's), even when the level would drop INFO, from the process's stack-dump thread.
    Calling it again for a signal changes the logger. Returns False (nothing installed)
    when not called from the main thread, where signals cannot be handled."""
    global _dumper
    if threading.current_thread() is not threading.main_thread():
        return False
    if _dumper is None:
        _dumper = _StackDumper()
    _dumper.loggers[signum] = logger
    signal.signal(signum, _dumper.on_signal)
    return True
