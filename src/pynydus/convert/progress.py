"""Progress of a conversion: rich bars per layer at a terminal, log lines otherwise.

The converter calls a :class:`Reporter`; it never prints itself. Both reporters
are driven from the converter's main thread only.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Protocol

__all__ = ["LogReporter", "NullReporter", "Reporter", "RichReporter", "make_reporter"]


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class Reporter(Protocol):
    def layer_started(self, key: str, digest: str, total: int) -> None: ...
    def layer_bytes(self, key: str, n: int) -> None: ...
    def layer_done(self, key: str, summary: dict[str, Any]) -> None: ...
    def info(self, message: str) -> None: ...
    def close(self) -> None: ...


class NullReporter:
    def layer_started(self, key: str, digest: str, total: int) -> None:
        pass

    def layer_bytes(self, key: str, n: int) -> None:
        pass

    def layer_done(self, key: str, summary: dict[str, Any]) -> None:
        pass

    def info(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class LogReporter:
    """One line when a layer starts and when it ends, plus phase messages."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._out = out or sys.stderr
        self._t0 = time.monotonic()

    def _line(self, text: str) -> None:
        print(f"[convert {time.monotonic() - self._t0:7.2f}s] {text}", file=self._out, flush=True)

    def layer_started(self, key: str, digest: str, total: int) -> None:
        self._line(f"layer {_short(digest)}: converting ({_mb(total)})")

    def layer_bytes(self, key: str, n: int) -> None:
        pass

    def layer_done(self, key: str, summary: dict[str, Any]) -> None:
        how = "cached" if summary.get("cached") else f"{summary.get('seconds', 0):.2f}s"
        self._line(f"layer {_short(summary['source_digest'])}: done ({how}), blob "
                   f"{_short(summary['blob_digest'])} {_mb(summary['blob_size'])}, "
                   f"{summary['chunks']} chunks")

    def info(self, message: str) -> None:
        self._line(message)

    def close(self) -> None:
        pass


class RichReporter:
    """A rich progress bar per layer (bytes of the source layer consumed)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeElapsedColumn(), transient=False)
        self._tasks: dict[str, Any] = {}
        self._p.start()

    def layer_started(self, key: str, digest: str, total: int) -> None:
        self._tasks[key] = self._p.add_task(f"layer {_short(digest)}", total=total)

    def layer_bytes(self, key: str, n: int) -> None:
        if key in self._tasks:
            self._p.advance(self._tasks[key], n)

    def layer_done(self, key: str, summary: dict[str, Any]) -> None:
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = self._p.add_task(
                f"layer {_short(summary['source_digest'])}", total=summary["source_size"])
        note = " (cached)" if summary.get("cached") else ""
        self._p.update(task, completed=summary["source_size"],
                       description=f"layer {_short(summary['source_digest'])}{note}")

    def info(self, message: str) -> None:
        self._p.console.print(message)

    def close(self) -> None:
        self._p.stop()


def make_reporter(mode: str = "auto") -> Reporter:
    """``auto``: rich at a TTY, log lines otherwise; ``plain``, ``rich``, ``quiet``."""
    if mode == "quiet":
        return NullReporter()
    if mode == "rich" or (mode == "auto" and sys.stderr.isatty()):
        return RichReporter()
    return LogReporter()
