"""Daemon manager: spawn, supervise, recover and stop nydusd-compatible daemons.

Each daemon is a separate process (``pynydusd`` by default, upstream ``nydusd``
works too) in its own session, so it outlives a snapshotter restart: running
containers keep reading. Its record (pid, API socket, mountpoint) is persisted
before it is started; a restarted snapshotter reconnects to live daemons and
starts again the ones that died meanwhile.

A monitor thread notices dead daemons (our children are reaped; adopted ones are
checked through /proc) and applies the recover policy: ``restart`` starts a new
process on the same mountpoint and socket (after unmounting the dead FUSE mount)
and, for a shared daemon, mounts its images again; ``none`` only reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pynydus.errors import FailedPrecondition, Unavailable
from pynydus.host.mount import unmount
from pynydus.host.mountinfo import is_mountpoint, mountpoints_under
from pynydus.manager.client import RUNNING, DaemonClient
from pynydus.manager.store import DaemonRecord, DaemonStore

log = logging.getLogger(__name__)

# How long a new daemon may take to answer RUNNING.
START_TIMEOUT = 15.0
_MONITOR_PERIOD = 0.5


def resolve_daemon_binary(configured: str) -> list[str]:
    """The command that starts a daemon. ``nydusd`` (upstream's default) or empty means
    our ``pynydusd``; anything else is used as given (an upstream nydusd path)."""
    if configured and configured != "nydusd":
        path = shutil.which(configured) or configured
        if not os.access(path, os.X_OK):
            raise FailedPrecondition(f"daemon.nydusd_path {configured!r} is not an executable")
        return [path]
    sibling = os.path.join(os.path.dirname(sys.executable), "pynydusd")
    if os.access(sibling, os.X_OK):
        return [sibling]
    return [sys.executable, "-m", "pynydus.daemon.main"]


@dataclass
class LiveDaemon:
    record: DaemonRecord
    proc: subprocess.Popen[bytes] | None = None  # None when adopted after a restart
    state: str = "STARTING"
    restarts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def client(self) -> DaemonClient:
        return DaemonClient(self.record.api_socket)


def _pid_alive(pid: int, api_socket: str) -> bool:
    """Is ``pid`` a live (non-zombie) process serving ``api_socket``?"""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        if stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"Z":
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return api_socket.encode() in f.read()
    except (OSError, ValueError):
        return False


class DaemonManager:
    def __init__(self, store: DaemonStore, *, command: list[str], log_level: str = "info",
                 recover_policy: str = "restart", thread_num: int = 0,
                 log_rotation_size: int = 0,
                 on_restarted: Callable[[LiveDaemon], None] | None = None,
                 cgroup: object | None = None) -> None:
        self.store = store
        self.command = command
        self.log_level = log_level
        self.recover_policy = recover_policy
        self.thread_num = thread_num
        self.log_rotation_size = log_rotation_size  # MB, daemon.log_rotation_size; 0: never
        self.on_restarted = on_restarted
        self.cgroup = cgroup
        self.daemons: dict[str, LiveDaemon] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._stopping: list[threading.Thread] = []  # daemons exiting in the background
        self._monitor = threading.Thread(target=self._watch, name="daemon-monitor", daemon=True)
        self.deaths = 0

    # --- lifecycle of the manager ------------------------------------------------------

    def start_monitor(self) -> None:
        self._monitor.start()

    def close(self) -> None:
        self._stop.set()
        if self._monitor.is_alive():
            self._monitor.join(timeout=5)
        with self._lock:
            stopping, self._stopping = self._stopping, []
        deadline = time.monotonic() + 20  # daemons of removed images finish exiting
        for t in stopping:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    # --- one daemon ---------------------------------------------------------------------

    def build_command(self, rec: DaemonRecord) -> list[str]:
        """nydusd's command line, in upstream's order (fuse subcommand first)."""
        cmd = [*self.command, "fuse"]
        if rec.thread_num:
            cmd += ["--thread-num", str(rec.thread_num)]
        cmd += ["--mountpoint", rec.mountpoint]
        if rec.mode == "dedicated":
            cmd += ["--config", rec.config_path, "--bootstrap", rec.bootstrap]
            if rec.prefetch_files:
                cmd += ["--prefetch-files", rec.prefetch_files]
        cmd += ["--log-level", self.log_level, "--apisock", rec.api_socket]
        if self.log_rotation_size:
            cmd += ["--log-rotation-size", str(self.log_rotation_size)]
        if rec.log_file:
            cmd += ["--log-file", rec.log_file]
        return cmd

    def start_daemon(self, rec: DaemonRecord, *, niceness: int = 0) -> LiveDaemon:
        """Spawn ``rec``'s daemon, persist it, wait until it is RUNNING.

        ``niceness`` > 0 starts it at a lower CPU priority (a spare daemon whose start
        must not compete with containers starting now); it runs at normal priority once
        RUNNING, or earlier when someone calls :func:`set_niceness` on it.
        On failure the process is killed, its mount cleared and the record removed.
        """
        with self._lock:
            live = self.daemons.get(rec.id) or LiveDaemon(rec)
            self.daemons[rec.id] = live
        self._spawn(live)
        if niceness:
            set_niceness(rec.pid, niceness)
        try:
            self._wait_running(live)
        except Unavailable as err:
            tail = _log_tail(rec)  # its log goes with it: what it said goes into ours
            self.destroy_daemon(rec.id)
            what = str(err).split("; see ")[0]  # that log is gone now
            if tail:
                log.error("daemon %s failed to start; the end of its log:\n%s", rec.id, tail)
                raise Unavailable(f"{what}; its log ended with: {tail[-600:]}") from err
            raise Unavailable(what) from err
        except BaseException:
            self.destroy_daemon(rec.id)
            raise
        if niceness:
            set_niceness(rec.pid, 0)
        return live

    def _spawn(self, live: LiveDaemon) -> None:
        rec = live.record
        clear_vestige(rec)  # first: a dead FUSE mount makes the mountpoint unusable
        for d in (os.path.dirname(rec.api_socket), os.path.dirname(rec.log_file), rec.mountpoint):
            if d:
                os.makedirs(d, exist_ok=True)
        cmd = self.build_command(rec)
        log.info("starting daemon %s: %s", rec.id, " ".join(cmd))
        # What the daemon prints before its own logging is up (argument errors, crashes)
        # goes to <log>.stderr; the daemon keeps its copy of the fd, we close ours.
        # A daemon's start is on a container's critical path: let Python keep its
        # bytecode cache even where the snapshotter's environment turned it off.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        with open(rec.log_file + ".stderr" if rec.log_file else os.devnull, "ab") as errlog:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                                    start_new_session=True, close_fds=True, env=env)
        live.proc = proc
        live.state = "STARTING"
        rec.pid = proc.pid
        rec.command = list(self.command)  # which build runs it, across snapshotter upgrades
        self.store.put_daemon(rec)
        if self.cgroup is not None:
            add = getattr(self.cgroup, "add_pid", None)
            if add is not None:
                add(proc.pid)

    def _wait_running(self, live: LiveDaemon, final: bool = True) -> None:
        rec = live.record

        def alive() -> bool:
            return live.proc.poll() is None if live.proc is not None else _pid_alive(rec.pid, rec.api_socket)

        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(rec.api_socket):
            if not alive():
                raise Unavailable(f"daemon {rec.id} exited during start-up; see {rec.log_file}(.stderr)")
            if time.monotonic() > deadline:
                raise Unavailable(f"daemon {rec.id}: no API socket after {START_TIMEOUT:.0f}s")
            time.sleep(0.01)
        try:
            live.client.wait_until(RUNNING, max(0.5, deadline - time.monotonic()), alive)
        except Unavailable as err:
            raise Unavailable(f"daemon {rec.id} did not become RUNNING: {err}; see {rec.log_file}") from err
        live.state = RUNNING if final else "RECOVERING"

    def destroy_daemon(self, daemon_id: str, *, wait: bool = True) -> None:
        """Stop a daemon (SIGTERM, then SIGKILL), unmount, forget it. Idempotent.

        With ``wait=False`` (an image removed) its mount is taken away at once and the
        process finishes exiting in the background (its files go once it has): a stop
        waits about 0.5 s for the process, and containerd removes images one by one."""
        with self._lock:
            live = self.daemons.pop(daemon_id, None)
        self.store.delete_daemon(daemon_id)
        if live is None:
            return
        rec = live.record
        live.state = "DESTROYED"
        pid = live.proc.pid if live.proc is not None else rec.pid
        running = live.proc is not None or _pid_alive(rec.pid, rec.api_socket)
        if running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        if running and not wait:
            clear_vestige(rec)  # the mountpoint is free when we return
            t = threading.Thread(target=self._finish_stop, args=(live, pid),
                                 name=f"stop-{daemon_id}", daemon=True)
            with self._lock:
                self._stopping = [s for s in self._stopping if s.is_alive()] + [t]
            t.start()
            return
        self._finish_stop(live, pid if running else 0)

    def _finish_stop(self, live: LiveDaemon, pid: int) -> None:
        """Wait for a signalled daemon to exit (SIGKILL after 10 s), then clear what it
        leaves. ``pid`` 0: it was not running."""
        rec = live.record
        if pid:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if live.proc is not None:
                    if live.proc.poll() is not None:
                        break
                elif not _pid_alive(pid, rec.api_socket):
                    break
                time.sleep(0.02)
            else:
                log.warning("daemon %s (pid %d) ignored SIGTERM; killing it", rec.id, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
                if live.proc is not None:
                    live.proc.wait(timeout=5)
        clear_vestige(rec)
        remove_daemon_files(rec)
        log.info("daemon %s stopped", rec.id)

    # --- recovery -------------------------------------------------------------------------

    def recover(self) -> tuple[list[LiveDaemon], list[DaemonRecord]]:
        """Re-attach to persisted daemons. Returns (live ones, dead ones).

        Dead ones are not restarted here: the caller decides (it knows the images).
        """
        live, dead = [], []
        for rec in self.store.daemons():
            ld = LiveDaemon(rec)
            if _pid_alive(rec.pid, rec.api_socket):
                try:
                    if ld.client.state() == RUNNING:
                        ld.state = RUNNING
                        with self._lock:
                            self.daemons[rec.id] = ld
                        live.append(ld)
                        log.info("daemon %s (pid %d) is alive; reconnected", rec.id, rec.pid)
                        add = getattr(self.cgroup, "add_pid", None)
                        if add is not None:
                            add(rec.pid)
                        continue
                except Unavailable as err:
                    log.warning("daemon %s (pid %d) does not answer: %s", rec.id, rec.pid, err)
            dead.append(rec)
        return live, dead

    def restart(self, rec: DaemonRecord) -> LiveDaemon:
        with self._lock:
            live = self.daemons.get(rec.id) or LiveDaemon(rec)
            self.daemons[rec.id] = live
        live.restarts += 1
        self._spawn(live)
        self._wait_running(live, final=False)
        if self.on_restarted is not None:
            self.on_restarted(live)  # e.g. the shared daemon mounts its images again
        live.state = RUNNING
        return live

    # --- supervision ----------------------------------------------------------------------

    def wait_ready(self, daemon_id: str, timeout: float) -> LiveDaemon:
        """Wait until the daemon is RUNNING by our account (started, and recovered if
        it was restarted) and by its own; Unavailable otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            live = self.daemons.get(daemon_id)
            if live is not None and live.state == RUNNING:
                live.client.wait_until(RUNNING, max(0.5, deadline - time.monotonic()))
                return live
            if time.monotonic() > deadline:
                state = live.state if live is not None else "gone"
                raise Unavailable(f"daemon {daemon_id} is not ready (state {state})")
            time.sleep(0.02)

    def _dead(self) -> list[LiveDaemon]:
        out = []
        with self._lock:
            items = list(self.daemons.values())
        for live in items:
            if live.state not in (RUNNING, "RECOVERING"):
                continue
            rec = live.record
            gone = (live.proc.poll() is not None) if live.proc is not None else not _pid_alive(rec.pid, rec.api_socket)
            if gone:
                out.append(live)
        return out

    def _watch(self) -> None:
        while not self._stop.wait(_MONITOR_PERIOD):
            for live in self._dead():
                self.deaths += 1
                rec = live.record
                code = live.proc.returncode if live.proc is not None else None
                log.error("daemon %s (pid %d) died (exit %s); recover policy %s", rec.id, rec.pid, code,
                          self.recover_policy)
                live.state = "DIED"
                if self.recover_policy != "restart":
                    continue
                try:
                    self.restart(rec)
                    log.info("daemon %s restarted as pid %d", rec.id, live.record.pid)
                except Exception as err:  # noqa: BLE001 - keep supervising the others
                    log.error("daemon %s: restart failed: %s", rec.id, err)


def set_niceness(pid: int, niceness: int) -> None:
    """Set the nice value of every thread of ``pid`` (Linux keeps one per thread; threads
    started later inherit their creator's). Best effort: the process may be gone."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except OSError:
            pass


def _log_tail(rec: DaemonRecord, size: int = 4096) -> str:
    """The last ``size`` bytes of a daemon's stderr and log file (whichever exist)."""
    parts = []
    for path in (rec.log_file + ".stderr", rec.log_file) if rec.log_file else ():
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - size))
                data = f.read().decode("utf-8", "replace").strip()
        except OSError:
            continue
        if data:
            parts.append(data)
    return "\n".join(parts)


def remove_daemon_files(rec: DaemonRecord) -> None:
    """Everything a stopped daemon leaves: its API socket and the directories named by its
    id that hold it, its log (rotated ones included) and its config
    (``<root>/socket/<id>/``, ``<logs>/<id>/``, ``<root>/config/<id>/``), as upstream's
    manager removes them, and a spare's ``<root>/daemons/<id>/`` once nothing is mounted
    in it. A directory not named by the id (a record from elsewhere, an image's snapshot)
    loses only the daemon's own socket."""
    for path in (rec.api_socket,):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    for path in (rec.api_socket, rec.log_file, rec.config_path, rec.mountpoint):
        d = os.path.dirname(path) if path else ""
        if not d or os.path.basename(d) != rec.id or not os.path.isdir(d):
            continue
        if path == rec.mountpoint and mountpoints_under(d):
            log.warning("daemon %s: %s is still mounted; left in place", rec.id, d)
            continue
        shutil.rmtree(d, ignore_errors=True)


def clear_vestige(rec: DaemonRecord) -> None:
    """Unmount a dead daemon's FUSE mount and remove its stale API socket."""
    if rec.mountpoint and is_mountpoint(rec.mountpoint):
        try:
            unmount(rec.mountpoint)
        except OSError:
            try:
                unmount(rec.mountpoint, lazy=True)
            except OSError as err:
                log.warning("cannot unmount %s: %s", rec.mountpoint, err)
    if rec.api_socket and os.path.exists(rec.api_socket):
        try:
            os.unlink(rec.api_socket)
        except OSError:
            pass
