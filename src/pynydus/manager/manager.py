"""Daemon manager: spawn, supervise, recover and stop nydusd-compatible daemons.

Each daemon is a separate process (``pynydusd`` by default, upstream ``nydusd``
works too) in its own session, so it outlives a snapshotter restart: running
containers keep reading. Its record (pid, API socket, mountpoint) is persisted
before it is started; a restarted snapshotter reconnects to live daemons and
starts again the ones that died meanwhile.

A monitor thread notices dead daemons at once (it waits on their pidfds; our
children are reaped, adopted ones are checked through /proc) and applies the recover
policy: ``restart`` starts a new process on the same mountpoint and socket (after
unmounting the dead FUSE mount) and, for a shared daemon, mounts its images again;
``failover`` hands the dead daemon's FUSE connection, which the supervisor holds, to a
successor, so that readers of the mount only wait (docs/failover.md); ``none`` only
reports.

Failover keeps one successor started in advance (a "spare": ``pynydusd --upgrade``,
waiting in INIT, no mount of its own), because a Python daemon needs 0.4-2 s to start
and a reader of a dead daemon's mount waits that long. A death takes the spare (or, if
two daemons die at once, starts another), which takes the connection over and serves
it; a new spare starts in the background. A takeover that fails falls back to a
restart: the supervisor lets the connection go (callers get ENOTCONN, never a hang)
and a new daemon mounts afresh. ``upgrade`` replaces every daemon by one of a new
binary through the same hand-over.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.client import HTTPException
from typing import TYPE_CHECKING, Self

from pynydus.daemon.template import daemon_env
from pynydus.errors import FailedPrecondition, NydusError, Unavailable
from pynydus.host.mount import unmount
from pynydus.host.mountinfo import mountpoints_under
from pynydus.host.proc import is_live
from pynydus.manager.client import INIT, READY, RUNNING, DaemonClient
from pynydus.manager.store import DaemonRecord, DaemonStore
from pynydus.manager.supervisor import TAKEOVER_NICENESS, Supervisor

if TYPE_CHECKING:
    from pynydus.manager.template import DaemonTemplate

log = logging.getLogger(__name__)

# How long a new daemon may take to answer RUNNING.
START_TIMEOUT = 15.0
_MONITOR_PERIOD = 0.5
# Successors kept started in advance under the failover policy.
SPARES = 1
SPARE = "spare"  # DaemonRecord.mode of a spare
_SPARE_DELAY = 1.0  # seconds after a takeover before the next spare starts
# Tests only: seconds a takeover waits between takeover and start (a snapshotter killed
# in the middle of one must leave a daemon its successor can finish).
_TAKEOVER_PAUSE = float(os.environ.get("PYNYDUS_TEST_TAKEOVER_PAUSE") or 0)


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
    # None when adopted after a restart or forked by the template (not our child then)
    proc: subprocess.Popen[bytes] | None = None
    state: str = "STARTING"
    restarts: int = 0
    takeovers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The daemon itself has said RUNNING since ``state`` was last set (any change of our
    # account clears it): ``wait_ready`` need not ask it again on every Prepare and Mounts.
    confirmed: bool = False

    def __setattr__(self, name: str, value: object) -> None:
        if name == "state":
            object.__setattr__(self, "confirmed", False)
        object.__setattr__(self, name, value)

    @property
    def client(self) -> DaemonClient:
        return DaemonClient(self.record.api_socket)


class DaemonManager:
    def __init__(self, store: DaemonStore, *, command: list[str], log_level: str = "info",
                 recover_policy: str = "restart", thread_num: int = 0,
                 log_rotation_size: int = 0,
                 on_restarted: Callable[[LiveDaemon], None] | None = None,
                 cgroup: object | None = None, supervisor: Supervisor | None = None,
                 failover_policy: str = "resend",
                 spare_record: Callable[[str], DaemonRecord] | None = None,
                 on_taken_over: Callable[[LiveDaemon], None] | None = None,
                 template: DaemonTemplate | None = None) -> None:
        self.store = store
        self.command = command
        self.log_level = log_level
        self.recover_policy = recover_policy
        self.thread_num = thread_num
        self.log_rotation_size = log_rotation_size  # MB, daemon.log_rotation_size; 0: never
        self.on_restarted = on_restarted
        self.cgroup = cgroup
        # failover: the supervisor holds the connections, spares succeed dead daemons
        self.supervisor = supervisor
        self.failover_policy = failover_policy
        self.spare_record = spare_record
        self.on_taken_over = on_taken_over
        # forks daemons from a pre-imported process (daemon/template.py); None: spawn them
        self.template = template
        self.spares: list[LiveDaemon] = []
        self._spares_lock = threading.Lock()
        self._spares_changed = threading.Condition(self._spares_lock)
        self._refilling = 0
        self._spare_now = threading.Event()  # cuts a delayed spare start's wait short
        self.daemons: dict[str, LiveDaemon] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._stopping: list[threading.Thread] = []  # daemons exiting in the background
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._pidfds: dict[int, int] = {}
        self._monitor = threading.Thread(target=self._watch, name="daemon-monitor", daemon=True)
        self.deaths = 0

    # --- lifecycle of the manager ------------------------------------------------------

    def start_monitor(self) -> None:
        self._monitor.start()
        self.refill_spares()

    def close(self) -> None:
        """Stop supervising (a takeover under way is finished first) and stop the spares."""
        self._stop.set()
        self._spare_now.set()
        self._wake()
        if self._monitor.is_alive():
            self._monitor.join(timeout=30)
        with self._lock:
            stopping, self._stopping = self._stopping, []
        deadline = time.monotonic() + 20  # daemons of removed images finish exiting
        for t in stopping:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        while self._refilling and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._spares_lock:
            spares, self.spares = self.spares, []
        for spare in spares:
            self.destroy_daemon(spare.record.id)
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()

    @property
    def failover(self) -> bool:
        return self.recover_policy == "failover" and self.supervisor is not None

    # --- one daemon ---------------------------------------------------------------------

    def build_command(self, rec: DaemonRecord) -> list[str]:
        """nydusd's command line, in upstream's order (fuse subcommand first)."""
        cmd = [*self.command, "fuse"]
        if rec.thread_num:
            cmd += ["--thread-num", str(rec.thread_num)]
        if rec.mode == SPARE:  # a successor: its mountpoint and images come with the state
            cmd += ["--upgrade", "--failover-policy", self.failover_policy]
        else:
            cmd += ["--mountpoint", rec.mountpoint]
        if rec.blob_files:
            cmd.append("--blob-files")
        if rec.mode == "dedicated":
            cmd += ["--config", rec.config_path, "--bootstrap", rec.bootstrap]
            if rec.prefetch_files:
                cmd += ["--prefetch-files", rec.prefetch_files]
        if self.supervisor is not None and rec.mode != SPARE:
            cmd += ["--id", rec.id, "--supervisor", self.supervisor.path(rec.id)]
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
            self._hand_to_supervisor(live)
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

    def _hand_to_supervisor(self, live: LiveDaemon) -> None:
        """Failover: make sure the supervisor holds the daemon's connection (upstream
        calls sendfd once the daemon runs; ours also sends by itself)."""
        if self.supervisor is None or live.record.mode == SPARE:
            return
        self.supervisor.add(live.record.id)
        live.client.send_fd()

    def _spawn(self, live: LiveDaemon) -> None:
        rec = live.record
        clear_vestige(rec)  # first: a dead FUSE mount makes the mountpoint unusable
        for d in (os.path.dirname(rec.api_socket), os.path.dirname(rec.log_file), rec.mountpoint):
            if d:
                os.makedirs(d, exist_ok=True)
        if self.supervisor is not None and rec.mode != SPARE:
            self.supervisor.add(rec.id)  # listening before the daemon sends to it
        cmd = self.build_command(rec)
        log.info("starting daemon %s: %s", rec.id, " ".join(cmd))
        # What the daemon prints before its own logging is up (argument errors, crashes)
        # goes to <log>.stderr; the daemon keeps its copy of the fd, we close ours.
        # A daemon's start is on a container's critical path: let Python keep its
        # bytecode cache even where the snapshotter's environment turned it off.
        stdout = rec.log_file + ".stderr" if rec.log_file else os.devnull
        pid = self.template.spawn(cmd, stdout) if self.template is not None else None
        live.proc = None  # forked by the template: its child, not ours
        if pid is None:
            env = daemon_env(os.environ)
            with open(stdout, "ab") as errlog:
                live.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errlog,
                                             stderr=errlog, start_new_session=True,
                                             close_fds=True, env=env)
            pid = live.proc.pid
            with contextlib.suppress(OSError):  # a boosted thread's priority is not for daemons
                if os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 0:
                    set_niceness(pid, 0)
        live.state = "STARTING"
        rec.pid = pid
        rec.command = list(self.command)  # which build runs it, across snapshotter upgrades
        self.store.put_daemon(rec)
        self._wake()
        if self.cgroup is not None:
            add = getattr(self.cgroup, "add_pid", None)
            if add is not None:
                add(pid)

    def _wait_running(self, live: LiveDaemon, final: bool = True, state: str = RUNNING) -> None:
        rec = live.record

        def alive() -> bool:
            return _running(live)

        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(rec.api_socket):
            if not alive():
                raise Unavailable(f"daemon {rec.id} exited during start-up; see {rec.log_file}(.stderr)")
            if time.monotonic() > deadline:
                raise Unavailable(f"daemon {rec.id}: no API socket after {START_TIMEOUT:.0f}s")
            time.sleep(0.01)
        try:
            live.client.wait_until(state, max(0.5, deadline - time.monotonic()), alive)
        except Unavailable as err:
            raise Unavailable(f"daemon {rec.id} did not become {state}: {err}; see {rec.log_file}") from err
        live.state = state if final else "RECOVERING"
        live.confirmed = final and state == RUNNING

    def destroy_daemon(self, daemon_id: str, *, wait: bool = True) -> None:
        """Stop a daemon (SIGTERM, then SIGKILL), unmount, forget it. Idempotent.

        With ``wait=False`` (an image removed) its mount is taken away at once and the
        process finishes exiting in the background (its files go once it has): a stop
        waits about 0.5 s for the process, and containerd removes images one by one."""
        with self._lock:
            live = self.daemons.pop(daemon_id, None)
        self.store.delete_daemon(daemon_id)
        if live is not None:
            self._stop_daemon(live, wait)

    def destroy_daemons(self, daemon_ids: list[str]) -> None:
        """``destroy_daemon(wait=False)`` of each, their records deleted in one transaction."""
        with self._lock:
            lives = [self.daemons.pop(d, None) for d in daemon_ids]
        self.store.delete_many(daemon_ids=daemon_ids)
        for live in lives:
            if live is not None:
                self._stop_daemon(live, wait=False)

    def _stop_daemon(self, live: LiveDaemon, wait: bool) -> None:
        rec = live.record
        daemon_id = rec.id
        live.state = "DESTROYED"
        if self.supervisor is not None:
            self.supervisor.remove(daemon_id)  # before the unmount: no one else holds it then
        pid = live.proc.pid if live.proc is not None else rec.pid
        running = _running(live)  # (a child reaped is not signalled: its pid may be reused)
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
        if pid and not _wait_exit(pid, rec.api_socket, live.proc, 10):
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
        Under the failover policy a live daemon hands its connection to our supervisor
        again, and a successor that a previous snapshotter left after its takeover
        (READY) is started; one left before it (INIT) holds nothing and counts as dead.
        Spares are stopped (new ones start with the monitor)."""
        live, dead = [], []
        for rec in self._adopt_successors(self.store.daemons()):
            ld = LiveDaemon(rec)
            if rec.mode == SPARE:
                with self._lock:
                    self.daemons[rec.id] = ld
                self.destroy_daemon(rec.id)
                continue
            if is_live(rec.pid, rec.api_socket):
                try:
                    state = ld.client.state()
                    if state == READY and self.failover:
                        log.info("daemon %s (pid %d) took over but was not started; starting it",
                                 rec.id, rec.pid)
                        ld.client.start()
                        state = ld.client.state()
                    if state == RUNNING:
                        ld.state = RUNNING
                        with self._lock:
                            self.daemons[rec.id] = ld
                        try:
                            self._hand_to_supervisor(ld)
                        except NydusError as err:  # keep serving; a death restarts it
                            log.warning("daemon %s cannot hand its FUSE connection to the "
                                        "supervisor (%s); if it dies it is restarted, not "
                                        "taken over", rec.id, err)
                        live.append(ld)
                        log.info("daemon %s (pid %d) is alive; reconnected", rec.id, rec.pid)
                        add = getattr(self.cgroup, "add_pid", None)
                        if add is not None:
                            add(rec.pid)
                        continue
                    log.warning("daemon %s (pid %d) is %s; stopping it", rec.id, rec.pid, state)
                except Unavailable as err:
                    log.warning("daemon %s (pid %d) does not answer: %s", rec.id, rec.pid, err)
                _kill_pid(rec.pid, rec.api_socket)
            dead.append(rec)
        return live, dead

    def _adopt_successors(self, records: list[DaemonRecord]) -> list[DaemonRecord]:
        """``records`` after giving each dead daemon the spare that took it over, if one
        did before the previous snapshotter could write that down: such a spare runs
        (READY or RUNNING) and names the daemon as its id."""
        by_id = {r.id: r for r in records}
        out = []
        for rec in records:
            if rec.mode != SPARE or not is_live(rec.pid, rec.api_socket):
                out.append(rec)
                continue
            try:
                info = DaemonClient(rec.api_socket, timeout=5).info()
            except NydusError:
                out.append(rec)
                continue
            target = by_id.get(str(info.get("id") or ""))
            if (info.get("state") not in (READY, RUNNING) or target is None
                    or target.mode == SPARE or is_live(target.pid, target.api_socket)):
                out.append(rec)
                continue
            log.info("daemon %s (pid %d) was taken over by spare %s (pid %d)", target.id,
                     target.pid, rec.id, rec.pid)
            target.pid, target.api_socket, target.log_file = rec.pid, rec.api_socket, rec.log_file
            self.store.replace_daemon(target, rec.id)
        return out

    def restart(self, rec: DaemonRecord) -> LiveDaemon:
        with self._lock:
            live = self.daemons.get(rec.id) or LiveDaemon(rec)
            self.daemons[rec.id] = live
        live.restarts += 1
        if self.supervisor is not None:
            self.supervisor.drop(rec.id)  # the old connection must end before the unmount
        self._spawn(live)
        self._wait_running(live, final=False)
        if self.on_restarted is not None:
            self.on_restarted(live)  # e.g. the shared daemon mounts its images again
        self._hand_to_supervisor(live)
        live.state = RUNNING
        return live

    # --- failover ------------------------------------------------------------------------

    def refill_spares(self, delay: float = 0.0) -> None:
        """Start spares in the background until ``SPARES`` wait (failover only), after
        ``delay`` seconds."""
        if not self.failover or self.spare_record is None or self._stop.is_set():
            return
        with self._spares_lock:
            if len(self.spares) + self._refilling >= SPARES:
                return
            self._refilling += 1
        threading.Thread(target=self._start_spare_bg, args=(delay,), name="spare-daemon",
                         daemon=True).start()

    def _start_spare_bg(self, delay: float = 0.0) -> None:
        spare: LiveDaemon | None = None
        try:
            if delay:
                self._spare_now.wait(delay)
            if not self._stop.is_set():
                spare = self._start_spare()
        except Exception as err:  # noqa: BLE001 - a failover then starts its successor itself
            if not self._stop.is_set():
                log.warning("could not start a spare daemon: %s", err)
        with self._spares_lock:
            self._refilling -= 1
            if spare is not None and not self._stop.is_set():
                self.spares.append(spare)
                spare = None
            self._spares_changed.notify_all()
        if spare is not None:
            self.destroy_daemon(spare.record.id)

    def _start_spare(self) -> LiveDaemon:
        """A successor in INIT, started now (with the current command)."""
        assert self.spare_record is not None
        rec = self.spare_record(f"{SPARE}-{secrets.token_hex(8)}")
        rec.mode = SPARE
        live = LiveDaemon(rec)
        with self._lock:
            self.daemons[rec.id] = live
        try:
            self._spawn(live)
            self._wait_running(live, state=INIT)
        except BaseException:
            self.destroy_daemon(rec.id)
            raise
        live.state = SPARE
        return live

    def _successor(self, fresh: bool = False) -> LiveDaemon:
        """The spare whose process lives and runs the current command, else a successor
        started now (always with ``fresh``: an upgrade's). A spare killed together with
        its daemon may still look alive (not reaped yet): its takeover then fails on the
        connection and ``take_over`` starts another."""
        with self._spares_lock:
            if not self.spares and self._refilling and not fresh:
                # one is on its way: it is further along than a successor started now
                self._spare_now.set()
                deadline = time.monotonic() + START_TIMEOUT
                while not self.spares and self._refilling and time.monotonic() < deadline:
                    self._spares_changed.wait(0.05)
            spare = self.spares.pop(0) if self.spares and not fresh else None
            if not self._refilling:
                self._spare_now.clear()
        if spare is not None and _running(spare) and spare.record.command == self.command:
            return spare
        if spare is not None:
            self.destroy_daemon(spare.record.id)
        log.info("no spare daemon is ready; starting a successor now")
        return self._start_spare()

    def _adopt(self, live: LiveDaemon, successor: LiveDaemon) -> str:
        """Make ``successor`` the process of ``live``'s daemon (record persisted);
        returns the API socket the daemon had."""
        rec = live.record
        old_socket = rec.api_socket
        rec.pid = successor.record.pid
        rec.api_socket = successor.record.api_socket
        rec.log_file = successor.record.log_file
        live.proc = successor.proc
        with self._lock:
            self.daemons.pop(successor.record.id, None)
        self.store.replace_daemon(rec, successor.record.id)
        self._wake()
        return old_socket

    def _hand_over(self, rec: DaemonRecord, successor: LiveDaemon) -> dict[str, float]:
        """Give ``rec``'s connection to ``successor`` and start it (one API call); its
        timeline. With the test pause: takeover, pause, start (two calls)."""
        assert self.supervisor is not None
        client = successor.client
        if not _TAKEOVER_PAUSE:
            return client.takeover(self.supervisor.path(rec.id), rec.id, start=True)
        client.takeover(self.supervisor.path(rec.id), rec.id)
        time.sleep(_TAKEOVER_PAUSE)
        client.start()
        return {}

    def take_over(self, live: LiveDaemon, noticed: float = 0.0) -> bool:
        """Hand a dead daemon's connection to a successor; False (with a log line saying
        why) if it cannot be done and the daemon must be restarted instead.

        Readers of the mount wait from the death until the successor serves, so this path
        runs at a raised CPU priority (this thread and the successor, see ``Boost``) and
        does nothing it can do later: the records are written once the successor serves
        (a snapshotter killed before that finds the successor by its spare record,
        ``recover``). ``noticed``: when the monitor saw the death (for the timeline)."""
        rec = live.record
        assert self.supervisor is not None
        held = self.supervisor.held(rec.id)
        if held is None:
            log.error("daemon %s: the supervisor holds no FUSE connection for it; falling back "
                      "to restart", rec.id)
            return False
        t0 = time.monotonic()
        dead_pid = rec.pid
        with Boost() as boost:
            for attempt in (1, 2):
                try:
                    successor = self._successor()
                except Exception as err:  # noqa: BLE001 - reported, then restarted
                    log.error("daemon %s: no successor could be started (%s); falling back to "
                              "restart", rec.id, err)
                    return False
                chosen = time.monotonic()
                boost.process(successor.record.pid, successor.record.api_socket)
                try:
                    timeline = self._hand_over(rec, successor)
                    break
                except NydusError as err:
                    # its API does not answer: it died (a spare killed with its daemon)
                    cut = isinstance(err.__cause__, (OSError, HTTPException))
                    _kill_pid(successor.record.pid, successor.record.api_socket)
                    if successor.proc is not None:
                        successor.proc.wait(timeout=5)
                    self.destroy_daemon(successor.record.id)
                    if attempt == 1 and cut:
                        log.warning("daemon %s: successor pid %d does not answer (%s); "
                                    "starting another", rec.id, successor.record.pid, err)
                        continue
                    log.error("daemon %s: takeover by pid %d failed: %s; falling back to "
                              "restart", rec.id, successor.record.pid, err)
                    return False
        old_socket = self._adopt(live, successor)
        live.takeovers += 1
        live.state = RUNNING
        if old_socket != rec.api_socket:
            try:
                os.unlink(old_socket)
            except OSError:
                pass
        done = time.monotonic()
        log.info("daemon %s (pid %d) taken over by pid %d in %.3f s", rec.id, dead_pid, rec.pid,
                 done - t0)
        steps = {"noticed": noticed or t0, "successor": chosen, **timeline, "recorded": done}
        log.info("daemon %s takeover timeline (CLOCK_MONOTONIC): %s", rec.id,
                 " ".join(f"{k}={v:.6f}" for k, v in steps.items()))
        if self.on_taken_over is not None:
            try:
                self.on_taken_over(live)
            except Exception as err:  # noqa: BLE001 - it serves; a missing image is logged
                log.error("daemon %s: after the takeover: %s", rec.id, err)
        # a Python start takes a CPU for 0.3-1 s: not while the readers catch up
        self.refill_spares(delay=_SPARE_DELAY)
        return True

    def upgrade(self, command: list[str] | None = None) -> list[str]:
        """Hot upgrade: replace every daemon by one running ``command`` (default: the
        configured one, e.g. after the binary was replaced on disk) through the
        failover hand-over: the old daemon gives the supervisor its connection, the new
        one takes it over, the old one exits without unmounting, the new one serves.
        Readers wait for milliseconds. Returns the ids of the daemons upgraded; raises
        FailedPrecondition without the failover policy. A daemon whose hand-over fails
        before its old process exits keeps running the old binary (logged)."""
        if not self.failover:
            raise FailedPrecondition("hot upgrade hands FUSE connections over: it needs "
                                     "recover_policy = \"failover\"")
        if command is not None:
            self.command = command
        if self.template is not None:  # it must not fork successors of the old binary
            if self.command == resolve_daemon_binary(""):
                self.template.replace(self.command)
            else:  # not our pynydusd: spawned
                self.template.close()
        with self._spares_lock:
            old_spares, self.spares = self.spares, []
        for spare in old_spares:  # they run the old binary
            self.destroy_daemon(spare.record.id)
        done = []
        with self._lock:
            targets = [ld for ld in self.daemons.values() if ld.state == RUNNING]
        for live in targets:
            if self._upgrade_one(live):
                done.append(live.record.id)
        self.refill_spares()
        return done

    def _upgrade_one(self, live: LiveDaemon) -> bool:
        rec = live.record
        assert self.supervisor is not None
        with live.lock:
            live.state = "UPGRADING"  # the monitor leaves it alone while the old one exits
            try:
                live.client.send_fd()
                successor = self._successor(fresh=True)
            except Exception as err:  # noqa: BLE001 - the old daemon keeps serving
                log.error("upgrade of daemon %s: %s; it keeps running", rec.id, err)
                live.state = RUNNING
                return False
            t0 = time.monotonic()
            old = replace(rec)
            old_proc = live.proc
            try:
                successor.client.takeover(self.supervisor.path(rec.id), rec.id)
            except NydusError as err:
                log.error("upgrade of daemon %s: takeover refused (%s); it keeps running",
                          rec.id, err)
                self.destroy_daemon(successor.record.id)
                live.state = RUNNING
                return False
            try:
                with Boost() as boost:  # readers wait from the exit to the start
                    boost.process(successor.record.pid, successor.record.api_socket)
                    live.client.exit()
                    _wait_gone(old.pid, old.api_socket, old_proc, 10)
                    successor.client.start()
                self._adopt(live, successor)
            except NydusError as err:
                log.error("upgrade of daemon %s failed after the old daemon stopped: %s; "
                          "falling back to restart", rec.id, err)
                _kill_pid(successor.record.pid, successor.record.api_socket)
                self.destroy_daemon(successor.record.id)
                _kill_pid(rec.pid, rec.api_socket)
                live.state = "DIED"
                self.restart(rec)
                return False
            live.takeovers += 1
            live.state = RUNNING
            log.info("daemon %s upgraded: pid %d -> %d (%s) in %.3f s", rec.id, old.pid, rec.pid,
                     " ".join(self.command), time.monotonic() - t0)
            return True

    # --- supervision ----------------------------------------------------------------------

    def wait_ready(self, daemon_id: str, timeout: float) -> LiveDaemon:
        """Wait until the daemon is RUNNING by our account (started, and recovered if
        it was restarted) and by its own; Unavailable otherwise. The daemon is asked
        once per change of our account, not on every call: Prepare and Mounts of an
        image call this, and a request to a daemon busy serving the container's first
        reads cost milliseconds on the container's start (a death is seen by the
        monitor's pidfd, which changes our account)."""
        deadline = time.monotonic() + timeout
        while True:
            live = self.daemons.get(daemon_id)
            if live is not None and live.state == RUNNING:
                if not live.confirmed:
                    live.client.wait_until(RUNNING, max(0.5, deadline - time.monotonic()))
                    live.confirmed = live.state == RUNNING
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
            if not _running(live):
                out.append(live)
        return out

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _wait_for_news(self) -> None:
        """Sleep until a watched daemon exits, the set of daemons changes, or a period
        passed: a pidfd becomes readable the moment its process dies."""
        with self._lock:
            pids = {ld.record.pid for ld in self.daemons.values()
                    if ld.state in (RUNNING, "RECOVERING") and ld.record.pid > 0}
        for pid in list(self._pidfds):
            if pid not in pids:
                os.close(self._pidfds.pop(pid))
        for pid in pids - set(self._pidfds):
            try:
                self._pidfds[pid] = os.pidfd_open(pid)
            except OSError:
                pass  # gone already: the scan finds it
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for fd in self._pidfds.values():
            poller.register(fd, select.POLLIN)
        poller.poll(_MONITOR_PERIOD * 1000)
        try:
            os.read(self._wake_r, 4096)
        except OSError:
            pass

    def _watch(self) -> None:
        # it sleeps until a death and then hands the connection over while readers wait:
        # at the failover's priority from the wake-up on (what it spawns does not inherit
        # it, see _spawn)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TAKEOVER_NICENESS)
        while not self._stop.is_set():
            self._wait_for_news()
            if self._stop.is_set():
                return
            noticed = time.monotonic()
            for live in self._dead():
                self.deaths += 1
                rec = live.record
                code = live.proc.returncode if live.proc is not None else None
                log.error("daemon %s (pid %d) died (exit %s); recover policy %s", rec.id, rec.pid, code,
                          self.recover_policy)
                live.state = "DIED"
                if self.recover_policy == "none":
                    continue
                if self.failover and self.take_over(live, noticed):
                    continue
                try:
                    self.restart(rec)
                    log.info("daemon %s restarted as pid %d", rec.id, live.record.pid)
                except Exception as err:  # noqa: BLE001 - keep supervising the others
                    log.error("daemon %s: restart failed: %s", rec.id, err)


def _running(live: LiveDaemon) -> bool:
    """Is ``live``'s process running (our child or not)?"""
    if live.proc is not None:
        return live.proc.poll() is None
    return is_live(live.record.pid, live.record.api_socket)


def _kill_pid(pid: int, api_socket: str) -> None:
    """SIGKILL ``pid`` if it is still the daemon serving ``api_socket``."""
    if is_live(pid, api_socket):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_exit(pid: int, api_socket: str, proc: subprocess.Popen[bytes] | None,
               timeout: float) -> bool:
    """Wait up to ``timeout`` for ``pid`` (the daemon serving ``api_socket``) to exit,
    without polling: its pidfd becomes readable when it does. Reaps our own child.
    True once it is gone."""
    def gone() -> bool:
        return proc.poll() is not None if proc is not None else not is_live(pid, api_socket)

    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return gone() or (proc is not None and _reap(proc, timeout))
    try:
        if gone():  # checked with the pidfd open: the pid is not someone else's now
            return True
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while not gone():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poller.poll(left * 1000) and proc is None:
                return True  # exited (a zombie until its parent, the template, reaps it)
        return True
    finally:
        os.close(pidfd)


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _wait_gone(pid: int, api_socket: str, proc: subprocess.Popen[bytes] | None,
               timeout: float) -> None:
    """Wait until ``pid`` exited (SIGKILL after ``timeout``); reaps our own child."""
    if not _wait_exit(pid, api_socket, proc, timeout):
        log.warning("daemon pid %d did not exit after handing over; killing it", pid)
        _kill_pid(pid, api_socket)
        if proc is not None:
            proc.wait(timeout=5)


_BOOST_HOLD = 2.0  # seconds a successor keeps it after it serves (resent and first reads)


class Boost:
    """Raise the CPU priority (to ``TAKEOVER_NICENESS``) of the calling thread for the
    ``with`` block and of the processes named with ``process`` until ``_BOOST_HOLD`` s
    after it. Best effort (needs CAP_SYS_NICE, as the snapshotter has)."""

    def __init__(self) -> None:
        self._tid = threading.get_native_id()
        self._old: int | None = None
        self._procs: list[tuple[int, str]] = []

    def __enter__(self) -> Self:
        try:
            self._old = os.getpriority(os.PRIO_PROCESS, self._tid)
            os.setpriority(os.PRIO_PROCESS, self._tid, TAKEOVER_NICENESS)
        except OSError:
            self._old = None
        return self

    def process(self, pid: int, api_socket: str) -> None:
        set_niceness(pid, TAKEOVER_NICENESS)
        self._procs.append((pid, api_socket))

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:  # first: threads started from here inherit it
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self._tid, self._old)
        if self._procs:
            procs = list(self._procs)
            timer = threading.Timer(_BOOST_HOLD, _unboost, args=(procs,))
            timer.daemon = True
            timer.start()


def _unboost(procs: list[tuple[int, str]]) -> None:
    for pid, api_socket in procs:
        if is_live(pid, api_socket):  # not a pid used again by another process
            set_niceness(pid, 0)


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
    dirs = []
    for path in (rec.api_socket, rec.log_file, rec.config_path, rec.mountpoint):
        if not path:
            continue
        d = os.path.dirname(path)
        # a daemon taken over runs in its successor's (a spare's) directories; the ones
        # named by its own id sit beside them
        dirs.append((path, d))
        if path != rec.mountpoint:
            dirs.append((path, os.path.join(os.path.dirname(d), rec.id)))
    for path, d in dirs:
        name = os.path.basename(d)
        if not (name == rec.id or name.startswith(f"{SPARE}-")) or not os.path.isdir(d):
            continue
        if path == rec.mountpoint and mountpoints_under(d):
            log.warning("daemon %s: %s is still mounted; left in place", rec.id, d)
            continue
        shutil.rmtree(d, ignore_errors=True)


def clear_vestige(rec: DaemonRecord) -> None:
    """Unmount a dead daemon's FUSE mount and remove its stale API socket."""
    if rec.mountpoint:
        # umount(2) says whether something is mounted there (EINVAL: nothing): no parse
        # of the mount table, which a Cleanup of 100 images did 300 times
        try:
            unmount(rec.mountpoint)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
                try:
                    unmount(rec.mountpoint, lazy=True)
                except OSError as err2:
                    log.warning("cannot unmount %s: %s", rec.mountpoint, err2)
    if rec.api_socket and os.path.exists(rec.api_socket):
        try:
            os.unlink(rec.api_socket)
        except OSError:
            pass
