"""``pynydusd``: nydusd's command line, for a drop-in daemon.

``pynydusd [fuse] --mountpoint DIR [--bootstrap FILE --config FILE] [--apisock SOCK] ...``
Flags upstream has and we do not implement are accepted with a warning when they
cannot change what is served, and refused with an error when they would.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
from collections.abc import Sequence

from pynydus import __version__
from pynydus.errors import ConfigError, NydusError
from pynydus.logs import LEVELS, RotatingLog

log = logging.getLogger("pynydusd")

_SUBCOMMANDS = ("fuse", "singleton", "virtiofs", "nbd", "uffd")
# rotated daemon logs kept (--log-rotation-size)
_LOG_BACKUPS = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pynydusd", description="Serve a Nydus (RAFS) image over FUSE, "
                                "fetching data chunks lazily into a blob cache.")
    p.add_argument("-V", "--version", action="version", version=f"pynydusd {__version__}")
    p.add_argument("-A", "--apisock", help="HTTP API unix socket")
    p.add_argument("-C", "--config", help="daemon config (nydusd JSON v1, JSON/TOML v2)")
    p.add_argument("-B", "--bootstrap", help="RAFS bootstrap to serve at the mountpoint root")
    p.add_argument("-M", "--mountpoint", help="FUSE mountpoint")
    p.add_argument("-D", "--localfs-dir", help="localfs backend and blob cache in this directory")
    p.add_argument("--id", help="daemon id (with --supervisor)")
    p.add_argument("--supervisor", help="failover supervisor socket (accepted, not used)")
    p.add_argument("--upgrade", action="store_true", help="failover/upgrade start (not supported)")
    p.add_argument("--failover-policy", choices=["none", "resend", "flush"], default="resend")
    p.add_argument("--thread-num", "--fuse-threads", type=int, default=4, dest="thread_num")
    p.add_argument("--prefetch-files", help="file with one absolute path per line to prefetch")
    p.add_argument("-l", "--log-level", default="info", type=str.lower, choices=list(LEVELS))
    p.add_argument("-L", "--log-file", help="log file (default stderr)")
    p.add_argument("--log-rotation-size", type=int, default=0, help="MB; 0 = no rotation")
    p.add_argument("--rlimit-nofile", type=int, default=1_000_000)
    p.add_argument("--readonly", action="store_true", default=True)
    p.add_argument("--writable", action="store_true", help="not supported")
    p.add_argument("-m", "--virtual-mountpoint", default="/")
    p.add_argument("-s", "--shared-dir", help="passthroughfs (not supported)")
    p.add_argument("--backend-source", help="accepted for nydus-snapshotter's backend-source (ignored)")
    p.add_argument("--fscache", help="singleton: fscache dir (not supported)")
    p.add_argument("--fscache-threads", type=int)
    p.add_argument("--fscache-tag")
    return p


def _setup_logging(args: argparse.Namespace) -> None:
    level = LEVELS[args.log_level]
    handler: logging.Handler
    if args.log_file:
        # nydusd keeps a few rotated files; 0 MB never rotates
        handler = RotatingLog(args.log_file, max_bytes=max(0, args.log_rotation_size) << 20,
                              max_backups=_LOG_BACKUPS)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO: one line per chunk fetch would flood the daemon
    # log at the default level (nydusd logs backend requests only when debugging).
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG
                                         else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = "fuse"
    if argv and argv[0] in _SUBCOMMANDS:
        sub = argv.pop(0)
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        return _run(sub, args)
    except NydusError as err:
        log.error("%s", err)
        print(f"pynydusd: {err}", file=sys.stderr)
        return err.exit_code


def _run(sub: str, args: argparse.Namespace) -> int:
    from pynydus.daemon.daemon import Daemon, DaemonOptions, load_config_file, localfs_config

    if sub != "fuse":
        raise ConfigError(f"subcommand {sub!r} is not supported by pynydusd (it serves FUSE only; "
                          f"fscache needs /dev/cachefiles)")
    if args.writable or args.shared_dir:
        raise ConfigError("--writable and --shared-dir (passthroughfs) are not supported")
    if args.virtual_mountpoint not in ("/", ""):
        raise ConfigError("--virtual-mountpoint other than / is not supported")
    for flag, on in (("--upgrade", args.upgrade), ("--supervisor", args.supervisor),
                     ("--backend-source", args.backend_source)):
        if on:
            log.warning("%s is accepted but not supported: failover hand-over is not implemented; "
                        "the daemon starts normally", flag)
    if not args.mountpoint:
        raise ConfigError("--mountpoint is required")
    if args.config and args.localfs_dir:
        raise ConfigError("--config and --localfs-dir exclude each other")
    if args.prefetch_files and not args.bootstrap:
        raise ConfigError("--prefetch-files needs --bootstrap")
    if not 1 <= args.thread_num <= 1024:
        raise ConfigError(f"--thread-num must be 1..1024, got {args.thread_num}")
    config = None
    if args.config:
        config = load_config_file(args.config)
    elif args.localfs_dir:
        config = localfs_config(args.localfs_dir)
    prefetch = None
    if args.prefetch_files:
        try:
            with open(args.prefetch_files, encoding="utf-8") as f:
                prefetch = tuple(line.strip() for line in f if line.strip())
        except OSError as err:
            raise ConfigError(f"--prefetch-files {args.prefetch_files}: {err.strerror}") from err
    if args.rlimit_nofile:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(args.rlimit_nofile, hard) if hard != resource.RLIM_INFINITY else args.rlimit_nofile
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
        except (ValueError, OSError):
            pass
    daemon = Daemon(DaemonOptions(
        mountpoint=args.mountpoint, apisock=args.apisock or "", bootstrap=args.bootstrap or "",
        config=config, daemon_id=args.id or "", supervisor=args.supervisor or "",
        thread_num=args.thread_num, prefetch_files=prefetch, upgrade=args.upgrade,
    ))
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())
