"""Command-line tools end quietly when their reader goes away.

``pynydus image inspect BOOT | head -1``: once ``head`` exits, the next write to
stdout raises BrokenPipeError (Python ignores SIGPIPE), and so does the flush at
interpreter exit; both would print a traceback. :func:`quiet_on_closed_pipe`
wraps an entry point: it flushes stdout while it can still catch the error, and on
a closed pipe points stdout at /dev/null (so the exit-time flush finds nothing to
fail on) and returns 141, the status a shell reports for a tool killed by SIGPIPE.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import ParamSpec

__all__ = ["CLOSED_PIPE_EXIT", "quiet_on_closed_pipe"]

CLOSED_PIPE_EXIT = 128 + signal.SIGPIPE

P = ParamSpec("P")


def quiet_on_closed_pipe(main: Callable[P, int]) -> Callable[P, int]:
    """``main`` returning :data:`CLOSED_PIPE_EXIT`, silently, if stdout's reader has gone
    (``--help`` and other SystemExits keep their status)."""

    @functools.wraps(main)
    def run(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            rc = main(*args, **kwargs)
        except SystemExit:
            _flush()
            raise
        except BrokenPipeError:
            _silence_stdout()
            return CLOSED_PIPE_EXIT
        return rc if _flush() else CLOSED_PIPE_EXIT

    return run


def _flush() -> bool:
    """Flush stdout; False (and stdout silenced) if its reader has gone."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return False
    return True


def _silence_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture): nothing flushes it at exit
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)
