"""A memory cgroup for the daemons (``[cgroup] enable``, ``memory_limit``).

As upstream: one cgroup ``system.slice/nydusd`` holding every daemon process, with
``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1, hybrid hosts). A cgroup that
already holds processes keeps them and gets the new limit; an empty one is
recreated. It is deleted at shutdown only if empty, since running daemons outlive
the snapshotter.

``PYNYDUS_CGROUP_ROOT`` moves the cgroup mount point from ``/sys/fs/cgroup`` (tests use
it to run the v2 path on a cgroup v1 host).
"""

from __future__ import annotations

import logging
import os

from pynydus.errors import HostCheckError

log = logging.getLogger(__name__)

CGROUP_ROOT = os.environ.get("PYNYDUS_CGROUP_ROOT") or "/sys/fs/cgroup"


class MemoryCgroup:
    def __init__(self, limit: int | None, name: str = "system.slice/nydusd", root: str = CGROUP_ROOT) -> None:
        self.limit = limit
        unified = os.path.exists(os.path.join(root, "cgroup.controllers"))
        if unified:
            with open(os.path.join(root, "cgroup.subtree_control")) as f:
                controllers = f.read().split()
            if "memory" not in controllers:
                raise HostCheckError(
                    f"cgroup v2: the memory controller is not enabled in {root}/cgroup.subtree_control"
                )
            self.path = os.path.join(root, name)
            self.limit_file = "memory.max"
        elif os.path.isdir(os.path.join(root, "memory")):
            self.path = os.path.join(root, "memory", name)
            self.limit_file = "memory.limit_in_bytes"
        else:
            raise HostCheckError(f"no memory cgroup controller under {root}; disable [cgroup] enable")
        os.makedirs(self.path, exist_ok=True)
        self._write(self.limit_file, self._limit_text())
        log.info("daemon cgroup %s, memory limit %s", self.path, self._limit_text())

    def _limit_text(self) -> str:
        if self.limit is None or self.limit < 0:
            return "max" if self.limit_file == "memory.max" else "-1"
        return str(self.limit)

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def add_pid(self, pid: int) -> None:
        try:
            self._write("cgroup.procs", str(pid))
        except OSError as err:
            log.warning("cannot put daemon pid %d into cgroup %s: %s", pid, self.path, err)

    def pids(self) -> list[int]:
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]

    def close(self) -> None:
        """Delete the cgroup if no process is left in it."""
        try:
            if not self.pids():
                os.rmdir(self.path)
        except OSError as err:
            log.debug("cgroup %s kept: %s", self.path, err)
