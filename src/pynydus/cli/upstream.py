"""What the drop-in ``nydus-image`` and ``nydusctl`` share: upstream's command-line
conventions (clap's usage errors, anyhow's ``Error:`` lines, exit codes, Rust's number
formatting) and the refusal of upstream flags that pynydus does not implement.

Exit codes are upstream's: 0 on success, 2 for a usage error (clap), 1 for a failure
(an ``Error:`` line on stderr, as ``fn main() -> anyhow::Result`` prints it). A flag we
do not implement is a usage error naming the flag, never silently accepted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NoReturn

from pynydus import __version__
from pynydus.logs import NYDUSD_LEVELS, level_of

#: upstream prints ``<package_ver>-<git_commit>`` in its JSON outputs
VERSION = f"{__version__}-pynydus"

USAGE_ERROR, FAILURE = 2, 1


class UsageError(Exception):
    """A command line upstream would accept that we cannot honour (exit 2)."""


class ClapParser(argparse.ArgumentParser):
    """argparse with clap's error shape (``error: ...``, usage, exit 2) and no
    abbreviated long options (clap accepts none)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        usage = self.format_usage().strip()
        usage = usage.removeprefix("usage: ")
        sys.stderr.write(f"error: {message}\n\nUsage: {usage}\n\nFor more information try '--help'\n")
        sys.exit(USAGE_ERROR)


def refuse(command: str, flag: str, why: str) -> NoReturn:
    """Stop on an upstream flag (or value) pynydus does not implement."""
    raise UsageError(f"{command}: {flag} is not supported by pynydus: {why}")


def run(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body with upstream's error reporting and exit codes."""
    from pynydus.errors import NydusError

    try:
        return body()
    except UsageError as err:
        sys.stderr.write(f"error: {err}\n\nFor more information try '--help'\n")
        return USAGE_ERROR
    except BrokenPipeError:
        raise  # stdout's reader has gone: pipes.quiet_on_closed_pipe ends quietly
    except (NydusError, OSError, ValueError) as err:
        sys.stderr.write(f"Error: {err}\n")
        return FAILURE
    except KeyboardInterrupt:
        return 130


def setup_logging(level: str, log_file: str | None) -> None:
    """``-l/--log-level`` and ``-L/--log-file``: upstream's log line shape on stderr."""
    handler: logging.Handler = (logging.FileHandler(log_file) if log_file
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_of(level))


def json_value(v: Any) -> str:
    """``serde_json::Value``'s Display: compact JSON, object keys sorted (serde_json's
    map without ``preserve_order``), non-ASCII kept."""
    return json.dumps(v, separators=(",", ":"), sort_keys=True, ensure_ascii=False,
                      default=str)


def rust_f64(x: float) -> str:
    """Rust's ``Display`` for an f64: shortest round-trip digits in plain decimal
    notation, ``0`` (not ``0.0``) for integral values, ``NaN``, ``inf``."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = format(Decimal(repr(float(x))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def hex_int(text: str, what: str) -> int:
    """A number as upstream's create parses ``--chunk-size``: hexadecimal, with or
    without ``0x``."""
    digits = text[2:] if text[:2] in ("0x", "0X") else text
    try:
        return int(digits, 16)
    except ValueError:
        raise ValueError(f"invalid {what} {text}") from None


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",")]


def add_globals(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """nydus-image's global ``-L/--log-file`` and ``-l/--log-level`` (accepted before
    and after the subcommand)."""
    sup = None if defaults else argparse.SUPPRESS
    p.add_argument("-L", "--log-file", default=sup, help="Log file path")
    p.add_argument("-l", "--log-level", default="info" if defaults else sup,
                   choices=NYDUSD_LEVELS, help="Log level:")
