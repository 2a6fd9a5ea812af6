"""``pynydus`` command line: one entry point, one subcommand per program.

Entry points stay thin: parse arguments, build the component, run it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pynydus import __version__
from pynydus.cli.pipes import quiet_on_closed_pipe
from pynydus.errors import NydusError


def _add_snapshotter(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "snapshotter",
        help="containerd proxy snapshotter (containerd-nydus-grpc)",
        description="Serve containerd's snapshots API on a unix socket.",
    )
    p.add_argument("--root", help="working directory (config key root)")
    p.add_argument("--address", help="gRPC unix socket (config key address)")
    p.add_argument("--config", help="TOML configuration file in nydus-snapshotter's format")
    p.add_argument("--log-level", choices=["trace", "debug", "info", "warn", "warning", "error",
                                            "fatal", "panic"], help="config key log.level")
    p.add_argument("--log-to-stdout", action="store_true", default=None,
                   help="log to stdout instead of <log.dir>/nydus-snapshotter.log")
    p.add_argument("--nydusd", dest="nydusd_path", help="config key daemon.nydusd_path")
    p.add_argument("--nydusd-config", "--config-path", dest="nydusd_config",
                   help="config key daemon.nydusd_config")
    p.add_argument("--nydus-image", dest="nydusimage_path", help="config key daemon.nydusimage_path")
    p.add_argument("--daemon-mode", help="config key daemon_mode")
    p.add_argument("--fs-driver", help="config key daemon.fs_driver")
    p.set_defaults(func=_run_snapshotter)


def _run_snapshotter(args: argparse.Namespace) -> int:
    from pynydus.snapshot.server import run

    overrides = {
        "root": args.root,
        "address": args.address,
        "log.level": args.log_level,
        "log.log_to_stdout": args.log_to_stdout,
        "daemon.nydusd_path": args.nydusd_path,
        "daemon.nydusd_config": args.nydusd_config,
        "daemon.nydusimage_path": args.nydusimage_path,
        "daemon_mode": args.daemon_mode,
        "daemon.fs_driver": args.fs_driver,
    }
    return run(args.config, overrides)


def _add_image(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pynydus.cli.image_cmd import add_image

    add_image(sub)


def _add_convert_and_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pynydus.cli.convert_cmd import _add_convert

    _add_convert(sub)


def _add_ctl(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pynydus.cli.ctl import add_ctl

    add_ctl(sub)


def _add_optimize(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pynydus.cli.optimize_cmd import add_optimize

    add_optimize(sub)


# Each subcommand's module, in the order --help lists them; a module may add several.
_ADDERS = (_add_snapshotter, _add_image, _add_convert_and_check, _add_ctl, _add_optimize)
_ADDER_OF = {"snapshotter": _add_snapshotter, "image": _add_image,
             "convert": _add_convert_and_check, "check-image": _add_convert_and_check,
             "ctl": _add_ctl, "optimize": _add_optimize}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Given the arguments, and when their first word names a
    subcommand, only that subcommand's module is imported (a short ``image build`` does not
    pay for the snapshotter's or the control client's imports); otherwise all of them."""
    parser = argparse.ArgumentParser(
        prog="pynydus",
        description="Nydus image acceleration for containerd: snapshotter, image builder, converter.",
    )
    parser.add_argument("--version", action="version", version=f"pynydus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    only = _ADDER_OF.get(argv[0]) if argv else None
    for add in (only,) if only else _ADDERS:
        add(sub)
    return parser


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(words).parse_args(words)
    try:
        rc: int = args.func(args)
        return rc
    except NydusError as err:
        print(f"pynydus {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
