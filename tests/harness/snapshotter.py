"""``pynydus snapshotter`` as a subprocess, the way containerd's proxy plugin sees it.

    with Snapshotter() as snap:          # /var/tmp/pyn-snap-XXXX/{root,s.sock}
        Containerd(snap.socket) ...      # proxy plugin address
        snap.restart()                   # SIGTERM, wait, start again on the same root

Ready means: the process runs, the socket exists and a ``List`` call on it answers
(through ``pynydus.api.snapshots_pb2_grpc``, exactly the service containerd calls).
``PYNYDUS_SNAPSHOTTER_CMD`` (a shell-split command prefix, default ``<venv>/bin/pynydus
snapshotter``) lets the same tests drive another build of the snapshotter.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import grpc

from pynydus.api import snapshots_pb2, snapshots_pb2_grpc

from .util import (
    HarnessError,
    Proc,
    Service,
    kill_processes_using,
    make_workdir,
    pynydusd_pids,
    remove_tree,
    unmount_under,
    wait_until,
)

MAX_ROOT_LEN = 70  # the snapshotter refuses longer roots (mount option lengths)


def snapshotter_command() -> list[str]:
    env = os.environ.get("PYNYDUS_SNAPSHOTTER_CMD")
    if env:
        return shlex.split(env)
    exe = Path(sys.executable).parent / "pynydus"
    if exe.exists():
        return [str(exe), "snapshotter"]
    found = shutil.which("pynydus")
    if found:
        return [found, "snapshotter"]
    return [sys.executable, "-m", "pynydus.cli.main", "snapshotter"]


class Snapshotter(Service):
    """Context manager around one snapshotter process (root and socket survive restarts)."""

    def __init__(self, *, config: Path | None = None, log_level: str = "debug",
                 extra_args: Sequence[str] = (), keep: bool = False,
                 ready_timeout: float = 30.0, tag: str = "snap",
                 env: Mapping[str, str] | None = None) -> None:
        self.workdir = make_workdir(tag)
        self.root = self.workdir / "root"
        self.socket = self.workdir / "s.sock"
        self.log = self.workdir / "snapshotter.log"
        self.config = config
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.keep = keep
        self.ready_timeout = ready_timeout
        self.env = env  # added to ours for the snapshotter process
        self.proc: Proc | None = None
        self._channel: grpc.Channel | None = None
        if len(str(self.root).encode()) > MAX_ROOT_LEN:
            raise HarnessError(f"snapshotter root {self.root} longer than {MAX_ROOT_LEN} bytes")

    @property
    def argv(self) -> list[str]:
        # --log-to-stdout: upstream's flag too; keeps the log in our work directory
        argv = snapshotter_command() + ["--root", str(self.root), "--address", str(self.socket),
                                        "--log-level", self.log_level, "--log-to-stdout"]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        return argv + self.extra_args

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise HarnessError("snapshotter not started")
        return self.proc.pid

    # ---------------------------------------------------------------- gRPC
    def stub(self) -> snapshots_pb2_grpc.SnapshotsStub:
        """A Snapshots client on our socket (the channel is reused until restart)."""
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        return snapshots_pb2_grpc.SnapshotsStub(self._channel)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def list_infos(self, *filters: str, timeout: float = 30) -> list[snapshots_pb2.Info]:
        """All snapshots as the snapshotter itself lists them (containerd-namespaced keys)."""
        req = snapshots_pb2.ListSnapshotsRequest(filters=list(filters))
        out: list[snapshots_pb2.Info] = []
        for resp in self.stub().List(req, timeout=timeout):
            out.extend(resp.info)
        return out

    def list_names(self) -> list[str]:
        return [i.name for i in self.list_infos()]

    # ---------------------------------------------------------------- lifecycle
    def _ready(self) -> bool:
        if self.proc is None or not self.proc.running():
            rc = self.proc.returncode() if self.proc else None
            raise HarnessError(f"snapshotter exited (status {rc}):\n"
                               f"{self.proc.log_tail() if self.proc else ''}")
        if not self.socket.exists():
            return False
        self._close_channel()  # a channel that saw no socket may back off for a while
        self.list_infos(timeout=5)
        return True

    def start(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = Proc("snapshotter", self.argv, self.workdir, self.log,
                         env=None if self.env is None else {**os.environ, **self.env})
        self.proc.start()
        try:
            wait_until(self._ready, self.ready_timeout, f"snapshotter on {self.socket}",
                       interval=0.1)
        except HarnessError as err:
            raise HarnessError(f"{err}\n--- snapshotter log ---\n"
                               f"{self.proc.log_tail()}") from err
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM by PID, wait (SIGKILL after ``timeout``); returns the exit status.
        Root and socket path are kept for a restart."""
        self._close_channel()
        if self.proc is None:
            return None
        return self.proc.stop(timeout=timeout)

    def kill9(self) -> None:
        self._close_channel()
        if self.proc is not None:
            self.proc.kill9()

    def restart(self) -> int | None:
        """Graceful stop, then start on the same root and socket. Returns the old exit status."""
        rc = self.stop()
        self.start()
        return rc

    def daemon_pids(self) -> list[int]:
        """PIDs of the pynydusd processes serving images for this snapshotter (sorted; the
        daemon template, which forks them, is not one)."""
        return pynydusd_pids(self.root, template=False)

    def template_pids(self) -> list[int]:
        """PIDs of the snapshotter's daemon templates (``pynydusd template``)."""
        return pynydusd_pids(self.root, template=True)

    def _daemons_db(self, *queries: str) -> list[list[tuple]]:
        """Rows of each query on the snapshotter's daemons.db, opened read-only (no rows
        before the snapshotter created it)."""
        import sqlite3

        db_path = self.root / "daemons.db"
        if not db_path.exists():
            return [[] for _ in queries]
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        try:
            return [db.execute(query).fetchall() for query in queries]
        finally:
            db.close()

    def daemon_records(self) -> list[dict]:
        """The snapshotter's daemon records (mode, pid, api_socket, ...), read-only."""
        import json

        (rows,) = self._daemons_db("SELECT record FROM daemons")
        return [json.loads(r[0]) for r in rows]

    def image_daemon_pids(self) -> list[int]:
        """PIDs of the daemons that serve an image now (not an idle standby daemon), from
        the snapshotter's daemon records (read-only)."""
        import json

        serving_rows, rows = self._daemons_db("SELECT DISTINCT daemon_id FROM instances",
                                              "SELECT record FROM daemons")
        serving = {r[0] for r in serving_rows}
        records = [json.loads(r[0]) for r in rows]
        alive = set(self.daemon_pids())
        return sorted(r["pid"] for r in records if r["id"] in serving and r["pid"] in alive)

    def rss_kib(self) -> int:
        """Resident set size of the snapshotter process (VmRSS, KiB)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise HarnessError("no VmRSS in /proc status")

    def teardown(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the snapshotter, then every process it left working under its root (FUSE
        daemons outlive a snapshotter stop by design, so that a restart can reattach),
        unmount what is left and remove the work directory; idempotent. With ``keep`` the
        directory (and a ``keep`` marker that stops ``sweep_stale``) stays."""
        self.stop()
        kill_processes_using(self.workdir)
        unmount_under(self.workdir)
        if self.keep:
            (self.workdir / "keep").touch()
        else:
            remove_tree(self.workdir)

