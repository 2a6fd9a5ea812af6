"""Clean up harness work directories left by crashed runs: ``python -m tests.harness.sweep``.

Only directories under /var/tmp named ``pyn-<tag>-*`` whose ``owner.pid`` process is gone
and that carry no ``keep`` marker; for each, the containerd shims of its task bundles,
the processes recorded in it and any process still working below it are stopped by PID,
its mounts unmounted and the directory removed. ``--tag demo`` limits it to one kind.
On a shared machine this also reaches other people's crashed runs.
"""

from __future__ import annotations

import argparse
import sys

from .util import sweep_stale


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", default=None, help="only pyn-<tag>-* directories")
    a = ap.parse_args()
    for d in sweep_stale(a.tag):
        print(f"removed {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
