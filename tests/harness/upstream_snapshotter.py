"""Upstream's snapshotter, ``containerd-nydus-grpc`` (the ``nydus-snapshotter`` peer of
``scripts/peers.sh``), as a subprocess beside containerd, driving a daemon of choice:

    with UpstreamSnapshotter(daemon="nydusd") as up:    # upstream's nydusd (nydus-rs peer)
    with UpstreamSnapshotter(daemon="pynydusd") as up:  # ours, as its daemon.nydusd_path
        Containerd(up.socket, ...)                      # proxy plugin address
        up.restart()                                    # SIGTERM, start again on the root

Its configuration is upstream's own TOML (``misc/snapshotter/config.toml`` of v0.16.1,
written out here with what a test node needs): the system controller, metrics and
cgroups off, ``recover_policy = "restart"`` (``failover`` needs a supervisor that
pynydusd cannot serve, docs/failover.md), logs to stdout. The daemon template
(``daemon.nydusd_config``) is a nydusd v1 JSON with a registry backend over plain HTTP
and a blob cache: the snapshotter fills in host, repository and credentials per image.

nydusd 2.2 raises RLIMIT_NOFILE to 1,000,000 at start, which a container without
CAP_SYS_RESOURCE refuses (EPERM, nydusd exits): its ``nydusd_path`` is a wrapper that
appends ``--rlimit-nofile 0`` (keep the limit) to upstream's command line.

The daemons it starts outlive it (as on a node, so a restart can reconnect); ``close``
stops every process still working below the work directory, unmounts and removes it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Self

from .peers import peer_bin
from .util import (
    HarnessError,
    Proc,
    Service,
    kill_processes_using,
    make_workdir,
    proc_cmdline,
    remove_tree,
    unmount_under,
    wait_until,
)

DAEMONS = ("nydusd", "pynydusd")


def daemon_processes(root: Path) -> dict[int, list[str]]:
    """{pid: argv} of the nydusd-compatible daemons whose command line names a path under
    ``root`` (their API socket lives there): what ``ps`` shows a snapshotter running."""
    out: dict[int, list[str]] = {}
    prefix = str(root)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        argv = proc_cmdline(int(entry.name))
        if ("--apisock" in argv and any(a.startswith(prefix) for a in argv)
                and any(os.path.basename(a) in DAEMONS for a in argv[:2])):
            out[int(entry.name)] = argv
    return out


def pynydusd_bin() -> str:
    exe = Path(sys.executable).with_name("pynydusd")
    if not exe.exists():
        raise HarnessError(f"{exe} missing: pip install -e . in this venv")
    return str(exe)


def registry_template(cache_dir: Path, *, scheme: str = "http", amplify_io: int | None = None,
                      prefetch: bool = False) -> dict[str, Any]:
    """nydusd v1 JSON for a registry backend; host, repo and auth come per image."""
    cfg: dict[str, Any] = {
        "device": {
            "backend": {"type": "registry",
                        "config": {"scheme": scheme, "timeout": 30, "connect_timeout": 10,
                                   "retry_limit": 2}},
            "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}},
        },
        "mode": "direct", "digest_validate": False, "enable_xattr": True, "iostats_files": False,
        "fs_prefetch": {"enable": prefetch, "threads_count": 4, "merging_size": 131072},
    }
    if amplify_io is not None:
        cfg["amplify_io"] = amplify_io
    return cfg


class UpstreamSnapshotter(Service):
    """One ``containerd-nydus-grpc`` process; root and socket survive restarts."""

    def __init__(self, *, daemon: str = "nydusd", daemon_mode: str = "dedicated",
                 log_level: str = "info", tag: str = "ups",
                 template: dict[str, Any] | None = None, threads: int = 4) -> None:
        if daemon not in DAEMONS:
            raise ValueError(f"daemon {daemon!r}: expected one of {DAEMONS}")
        self.bin = peer_bin("nydus-snapshotter", "containerd-nydus-grpc")
        self.daemon = daemon
        self.daemon_mode = daemon_mode
        self.log_level = log_level
        self.threads = threads
        self.workdir = make_workdir(tag)
        self.root = self.workdir / "root"
        self.socket = self.workdir / "s.sock"
        self.log = self.workdir / "snapshotter.log"
        self.config = self.workdir / "config.toml"
        self.daemon_config = self.workdir / "nydusd.json"
        self.cache_dir = self.root / "cache"
        self.template = template or registry_template(self.cache_dir)
        self.proc: Proc | None = None

    # ---------------------------------------------------------------- config
    def daemon_path(self) -> str:
        if self.daemon == "pynydusd":
            return pynydusd_bin()
        wrapper = self.workdir / "nydusd"
        wrapper.write_text(f'#!/bin/sh\nexec {peer_bin("nydus-rs", "nydusd")} "$@" '
                           "--rlimit-nofile 0\n")
        wrapper.chmod(0o755)
        return str(wrapper)

    def _config_text(self) -> str:
        level = "warn" if self.log_level == "warning" else self.log_level
        return "\n".join([
            "version = 1",
            f'root = "{self.root}"',
            f'address = "{self.socket}"',
            f'daemon_mode = "{self.daemon_mode}"',
            "cleanup_on_close = false",
            "[system]",
            "enable = false",
            "[daemon]",
            f'nydusd_config = "{self.daemon_config}"',
            f'nydusd_path = "{self.daemon_path()}"',
            f'nydusimage_path = "{peer_bin("nydus-rs", "nydus-image")}"',
            'fs_driver = "fusedev"',
            'recover_policy = "restart"',
            f"threads_number = {self.threads}",
            "log_rotation_size = 100",
            'failover_policy = "resend"',
            "[cgroup]",
            "enable = false",
            "[log]",
            "log_to_stdout = true",
            f'level = "{level}"',
            "[metrics]",
            'address = ""',
            "[snapshot]",
            "enable_nydus_overlayfs = false",
            "sync_remove = false",
            "[cache_manager]",
            "disable = false",
            'gc_period = "24h"',
            "",
        ])

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.daemon_config.write_text(json.dumps(self.template, indent=1))
        self.config.write_text(self._config_text())
        self.proc = Proc("nydus-go", [str(self.bin), "--config", str(self.config)],
                         self.workdir, self.log)
        self.proc.start()

        def up() -> bool:
            if self.proc is not None and not self.proc.running():
                raise HarnessError(f"containerd-nydus-grpc exited "
                                   f"({self.proc.returncode()}):\n{self.proc.log_tail()}")
            return self.socket.exists()

        wait_until(up, 30, f"containerd-nydus-grpc on {self.socket}", interval=0.05)
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise HarnessError("containerd-nydus-grpc not started")
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM by PID (SIGKILL after ``timeout``); root, socket and daemons stay."""
        if self.proc is None:
            return None
        return self.proc.stop(timeout=timeout)

    def restart(self) -> int | None:
        rc = self.stop()
        self.start()
        return rc

    def teardown(self) -> None:
        self.close()

    def close(self) -> None:
        self.stop()
        kill_processes_using(self.workdir)
        unmount_under(self.workdir)
        remove_tree(self.workdir)

    # ---------------------------------------------------------------- what it runs
    def logged_commands(self) -> list[str]:
        """The daemon command lines the snapshotter logged (``nydusd command: ...``)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return re.findall(r"nydusd command: ([^\"\n]*)", text)

    def log_tail(self, lines: int = 60) -> str:
        return self.proc.log_tail(lines) if self.proc else ""
