"""``pynydusd``: nydusd's command line, for a drop-in daemon.

``pynydusd [fuse] --mountpoint DIR [--bootstrap FILE --config FILE] [--apisock SOCK] ...``
Every flag either does what nydusd's does or, when given with anything but nydusd's
default, stops start-up naming the flag ("... is not supported by pynydusd yet").
``--supervisor``/``--upgrade``/``--failover-policy`` are the failover hand-over
(docs/failover.md); a daemon started with ``--upgrade`` needs no ``--mountpoint``: it
takes its predecessor's over. ``pynydusd template --control SOCK`` is the snapshotter's
pre-imported process that forks daemons (``template.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pynydus import __version__
from pynydus.cli.pipes import quiet_on_closed_pipe
from pynydus.errors import ConfigError, NydusError
from pynydus.host.libc import limit_malloc_arenas
from pynydus.logs import LEVELS, RotatingLog, dump_stacks_on

if TYPE_CHECKING:
    from pynydus.daemon.daemon import DaemonOptions

log = logging.getLogger("pynydusd")

_SUBCOMMANDS = ("fuse", "singleton", "virtiofs", "nbd", "uffd")
# rotated daemon logs kept (--log-rotation-size)
_LOG_BACKUPS = 5
# the arenas glibc's malloc may keep for a daemon (host/libc.limit_malloc_arenas)
_MALLOC_ARENAS = 2


def version_text() -> str:
    """``pynydusd -V``: nydusd's lines (``Git Commit:`` as in the daemon info)."""
    return (f"pynydusd Version: \t{__version__}\nGit Commit: \tpynydus-{__version__}\n"
            f"Build Time: \t\nProfile: \trelease\n"
            f"Python: \t{sys.version.split()[0]}")


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version_text())  # verbatim: argparse's "version" action refills whitespace
        parser.exit()


def help_width() -> int:
    """The width of ``--help`` as argparse takes it from ``shutil.get_terminal_size``:
    ``$COLUMNS``, else the terminal on stdout, else 80; less 2."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 80
    return columns - 2


class _HelpFormatter(argparse.HelpFormatter):
    # argparse builds a formatter for every add_argument, and one without a width
    # imports shutil for the terminal's (with bz2, lzma and fnmatch: 0.5 MB of every
    # daemon's resident memory, for a width only --help and usage errors print with)
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         help_width() if width is None else width)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pynydusd", description="Serve a Nydus (RAFS) image over FUSE, "
                                "fetching data chunks lazily into a blob cache.",
                                formatter_class=_HelpFormatter)
    # nydusd's -V block: upstream's snapshotter reads "Git Commit:" from it when it
    # reconnects to live daemons (a restart), and refuses to start without it; the commit
    # is the one the daemon info reports, so no hot upgrade is ever attempted
    p.add_argument("-V", "--version", action=_Version, nargs=0, help="print the version")
    p.add_argument("-A", "--apisock", help="HTTP API unix socket (mode 0600: root and this "
                   "user only)")
    p.add_argument("--apisock-group", help="also let this group (name or gid) use the API "
                   "socket (mode 0660)")
    p.add_argument("-C", "--config", help="daemon config (nydusd JSON v1, JSON/TOML v2)")
    p.add_argument("-B", "--bootstrap", help="RAFS bootstrap to serve at the mountpoint root")
    p.add_argument("-M", "--mountpoint", help="FUSE mountpoint")
    p.add_argument("-D", "--localfs-dir", help="localfs backend and blob cache in this directory")
    p.add_argument("--id", help="daemon id (with --supervisor)")
    p.add_argument("--supervisor", help="failover supervisor socket: the daemon sends its FUSE "
                   "connection and state there, a successor takes them from there")
    p.add_argument("--upgrade", action="store_true", help="start in INIT and wait for "
                   "PUT /api/v1/daemon/fuse/takeover and /start (failover, hot upgrade)")
    p.add_argument("--failover-policy", choices=["none", "resend", "flush"], default="resend",
                   help="after a takeover: resend the requests the predecessor had read "
                   "(default) or fail them (flush)")
    p.add_argument("--blob-files", action="store_true", help="show each blob of the "
                   "image(s) as a flat file of its uncompressed data at the mountpoint (for "
                   "kernel EROFS mounts of the bootstrap with these files as devices)")
    p.add_argument("--thread-num", "--fuse-threads", type=int, default=4, dest="thread_num")
    p.add_argument("--prefetch-files", help="file with one absolute path per line to prefetch")
    p.add_argument("-l", "--log-level", default="info", type=str.lower, choices=list(LEVELS))
    p.add_argument("-L", "--log-file", help="log file (default stderr)")
    p.add_argument("--log-rotation-size", type=int, default=0, help="MB; 0 = no rotation")
    p.add_argument("--rlimit-nofile", type=int, default=1_000_000)
    p.add_argument("--readonly", action="store_true", default=True,
                   help="the mount is read-only (always)")
    p.add_argument("--writable", action="store_true", help="not supported")
    p.add_argument("-m", "--virtual-mountpoint", default="/", help="only / is supported")
    p.add_argument("-s", "--shared-dir", help="passthroughfs (not supported)")
    p.add_argument("--backend-source", help="backend config from a URL (not supported)")
    p.add_argument("--fscache", help="singleton: fscache dir (not supported)")
    p.add_argument("--fscache-threads", type=int, help="not supported")
    p.add_argument("--fscache-tag", help="not supported")
    return p


def log_handler(log_file: str | None, rotation_mb: int, *, background: bool = True
                ) -> logging.Handler:
    """The handler of a pynydusd's log (and of its template's): ``log_file`` rotated at
    ``rotation_mb`` (0 never rotates) as nydusd rotates, a few backups kept; stderr
    without a file. ``background`` False: no clean-up thread (see RotatingLog)."""
    handler: logging.Handler
    if log_file:
        handler = RotatingLog(log_file, max_bytes=max(0, rotation_mb) << 20,
                              max_backups=_LOG_BACKUPS, background=background)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def _setup_logging(args: argparse.Namespace) -> None:
    level = LEVELS[args.log_level]
    handler = log_handler(args.log_file, args.log_rotation_size)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO: one line per chunk fetch would flood the daemon
    # log at the default level (nydusd logs backend requests only when debugging).
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG
                                         else logging.WARNING)


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "template":  # the snapshotter's pre-imported daemon forker
        from pynydus.daemon.template import serve

        return serve(argv[1:], main)
    sub = "fuse"
    if argv and argv[0] in _SUBCOMMANDS:
        sub = argv.pop(0)
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    dump_stacks_on(signal.SIGUSR1)  # kill -USR1: every thread's stack into the log
    try:
        return _run(sub, args)
    except NydusError as err:
        log.error("%s", err)
        print(f"pynydusd: {err}", file=sys.stderr)
        return err.exit_code


def _run(sub: str, args: argparse.Namespace) -> int:
    from pynydus.daemon.daemon import Daemon

    options = daemon_options(sub, args)
    if args.rlimit_nofile:
        raise_nofile_limit(args.rlimit_nofile)
    limit_malloc_arenas(_MALLOC_ARENAS)
    return Daemon(options).run()


def daemon_options(sub: str, args: argparse.Namespace) -> DaemonOptions:
    """What the command line asks of the daemon; ConfigError naming the flag for a flag
    pynydusd does not support (given with anything but nydusd's default) or a bad value.
    Reads the config and prefetch list files; starts nothing."""
    from pynydus.daemon.daemon import (
        DaemonOptions,
        config_file_text,
        load_config_file,
        localfs_config,
        localfs_config_text,
    )

    if sub != "fuse":
        raise ConfigError(f"subcommand {sub!r} is not supported by pynydusd (it serves FUSE only; "
                          f"fscache needs /dev/cachefiles)")
    refused = (
        ("--writable", args.writable, "a writable mount"),
        ("--shared-dir", args.shared_dir, "passthroughfs"),
        ("--virtual-mountpoint", args.virtual_mountpoint not in ("/", ""),
         "an image below the mountpoint's root"),
        ("--failover-policy", args.failover_policy == "none",
         ("a takeover that neither resends nor fails the requests its predecessor had read, "
         "see docs/failover.md")),
        ("--backend-source", args.backend_source, "the backend config from a URL"),
        ("--fscache", args.fscache, "fscache"),
        ("--fscache-threads", args.fscache_threads is not None, "fscache"),
        ("--fscache-tag", args.fscache_tag, "fscache"),
    )
    for flag, given, what in refused:
        if given:
            raise ConfigError(f"{flag} is not supported by pynydusd yet ({what})")
    if not args.mountpoint and not args.upgrade:
        raise ConfigError("--mountpoint is required")
    if args.config and args.localfs_dir:
        raise ConfigError("--config and --localfs-dir exclude each other")
    if args.prefetch_files and not args.bootstrap:
        raise ConfigError("--prefetch-files needs --bootstrap")
    if not 1 <= args.thread_num <= 1024:
        raise ConfigError(f"--thread-num must be 1..1024, got {args.thread_num}")
    config = None
    config_text = ""
    if args.config:
        config = load_config_file(args.config)
        config_text = config_file_text(args.config)
    elif args.localfs_dir:
        config = localfs_config(args.localfs_dir)
        config_text = localfs_config_text(args.localfs_dir)
    prefetch = None
    if args.prefetch_files:
        try:
            with open(args.prefetch_files, encoding="utf-8") as f:
                prefetch = tuple(line.strip() for line in f if line.strip())
        except OSError as err:
            raise ConfigError(f"--prefetch-files {args.prefetch_files}: {err.strerror}") from err
    session = os.environ.get("PYNYDUSD_FUSE") or "loop"
    if session not in ("loop", "pyfuse3"):
        raise ConfigError(f"PYNYDUSD_FUSE={session!r}: expected loop (our FUSE session) or "
                          f"pyfuse3 (libfuse3)")
    if args.blob_files and (session != "loop" or args.supervisor or args.upgrade):
        raise ConfigError("--blob-files needs our own FUSE session and no failover "
                          "(--supervisor, --upgrade, PYNYDUSD_FUSE=pyfuse3)")
    return DaemonOptions(
        fuse_session=session,
        config_text=config_text, upgrade=args.upgrade, failover_policy=args.failover_policy,
        mountpoint=args.mountpoint or "", apisock=args.apisock or "",
        apisock_group=args.apisock_group or "", bootstrap=args.bootstrap or "",
        config=config, daemon_id=args.id or "", supervisor=args.supervisor or "",
        thread_num=args.thread_num, prefetch_files=prefetch, blob_files=args.blob_files,
    )


def raise_nofile_limit(want: int) -> int:
    """``--rlimit-nofile``: raise the soft open-files limit to ``want`` (capped by the hard
    limit; never lowered). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    except (ValueError, OSError) as err:
        log.warning("--rlimit-nofile %d: %s", want, err)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


if __name__ == "__main__":
    sys.exit(main())
