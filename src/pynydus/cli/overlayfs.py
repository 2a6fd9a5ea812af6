"""``nydus-overlayfs``: the mount helper containerd runs for ``fuse.nydus-overlayfs``.

containerd hands a mount of type ``fuse.nydus-overlayfs`` to ``mount.fuse3``,
which runs ``nydus-overlayfs overlay <target> -o <options>``. The options are an
ordinary overlay mount plus entries meant for a sandbox runtime
(``extraoption=`` with the image's bootstrap and daemon config, and
``io.katacontainers.volume=``); we drop those and mount overlay. Flag words get
their real meaning (``rw`` clears read-only; upstream's helper maps both ``ro``
and ``rw`` to the read-only bit, which we do not copy). Long options are handled
by mounting relative to the layers' common directory, as containerd does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pynydus.cli.pipes import quiet_on_closed_pipe
from pynydus.host.mount import MountSpec, mount

_DROPPED = ("extraoption=", "io.katacontainers.volume=")


def filter_options(options: str) -> tuple[str, ...]:
    return tuple(o for o in options.split(",") if o and not o.startswith(_DROPPED))


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 4 or args[2] != "-o":
        print("usage: nydus-overlayfs overlay <target> -o <options>", file=sys.stderr)
        return 2
    source, target, _, options = args
    if source != "overlay":
        print(f"nydus-overlayfs: only overlay mounts are supported, got source {source!r}", file=sys.stderr)
        return 2
    try:
        mount(MountSpec("overlay", "overlay", filter_options(options)), target)
    except OSError as err:
        print(f"nydus-overlayfs: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
