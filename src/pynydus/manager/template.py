"""The manager's side of the daemon template (``pynydusd template``, daemon/template.py).

:class:`DaemonTemplate` starts (or adopts) the template process and asks it to fork
daemons: :meth:`DaemonTemplate.spawn` takes the argv the manager would have executed and
returns the pid of a daemon running exactly that command line, or None, in which case
the caller spawns the daemon itself. None is also the answer while no usable template
runs: one that died, refused (it runs other code than ours: an upgrade), or could not
start. Each fall-back is logged once, with why; a new template is tried again after
:data:`RETRY_AFTER` seconds.

The template lives in ``<root>/template/`` (control socket and log). It is stopped with
the snapshotter, and a snapshotter killed without a stop leaves it running: the next one
adopts it if it answers ``hello`` with our version, command and environment, and
replaces it otherwise. Daemons it forked are independent of it: they outlive it and are
adopted after a restart like spawned ones (their records, pids and command lines are
the same).

Interface for other users of daemons (takeover successors, spares): construct with the
directory, the daemon command (as ``resolve_daemon_binary`` gives it), the log level and
the log rotation size (MB, the daemons' ``--log-rotation-size``: ``template.log`` rotates as
their logs do);
``start()``; ``spawn(argv, stdout_path) -> pid | None``; ``close()``; ``pid``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

from pynydus import __version__
from pynydus.daemon.template import SUBCOMMAND, daemon_env, env_digest, read_line
from pynydus.host.proc import is_live

log = logging.getLogger(__name__)

# How long a spawn waits for a template that is still importing
READY_TIMEOUT = 15.0
# After a template failed, daemons are spawned directly for this long before a new one
RETRY_AFTER = 30.0
_REQUEST_TIMEOUT = 15.0


class TemplateError(Exception):
    pass


def request(control: str, message: dict[str, Any], timeout: float = _REQUEST_TIMEOUT) -> dict[str, Any]:
    """One request to the template at ``control``; TemplateError if it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(control)
            s.sendall(json.dumps(message).encode() + b"\n")
            data = read_line(s)
    except OSError as err:
        raise TemplateError(f"no answer on {control}: {err}") from err
    except ValueError as err:
        raise TemplateError(f"bad answer from {control}: {err}") from err
    if not data:
        raise TemplateError(f"{control} closed the connection without an answer")
    try:
        reply = json.loads(data)
    except ValueError as err:
        raise TemplateError(f"bad answer from {control}: {data[:200]!r}") from err
    if not isinstance(reply, dict):
        raise TemplateError(f"bad answer from {control}: {data[:200]!r}")
    return reply


class DaemonTemplate:
    def __init__(self, directory: str, command: Sequence[str], log_level: str = "info",
                 log_rotation_size: int = 0) -> None:
        self.directory = directory
        self.command = list(command)
        self.log_level = log_level
        self.log_rotation_size = log_rotation_size  # MB; 0: never
        # the environment daemons get (that of the snapshotter's start): a template is
        # started with it, and one started with another is not adopted
        self.env = daemon_env(os.environ)
        self.control = os.path.join(directory, "control.sock")
        self.log_file = os.path.join(directory, "template.log")
        self.pid = 0
        self.proc: subprocess.Popen[bytes] | None = None  # ours; None when adopted
        self.ready = False
        self.failed_at = 0.0  # monotonic time of the last failure; 0: none
        self._lock = threading.Lock()
        self.forked = 0  # daemons it forked for us

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Adopt the template a previous snapshotter left if it runs our code, else
        start one (in the background: it is ready once it answers ``hello``)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        self.ready = False
        if os.path.exists(self.control):
            try:
                hello = request(self.control, {"op": "hello"}, timeout=5)
            except TemplateError as err:
                log.info("no daemon template answers on %s (%s): starting one", self.control, err)
            else:
                why = self._mismatch(hello)
                if not why:
                    self.pid, self.proc, self.ready = int(hello["pid"]), None, True
                    log.info("daemon template pid %d adopted", self.pid)
                    return
                log.info("daemon template pid %s %s: replacing it", hello.get("pid"), why)
                self._stop_other(int(hello.get("pid") or 0))
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        cmd = [*self.command, SUBCOMMAND, "--control", self.control, "--log-file", self.log_file,
               "--log-level", self.log_level]
        if self.log_rotation_size:
            cmd += ["--log-rotation-size", str(self.log_rotation_size)]
        with open(self.log_file + ".stderr", "ab") as errlog:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errlog,
                                         stderr=errlog, start_new_session=True, close_fds=True,
                                         env=self.env)
        self.pid = self.proc.pid
        log.info("daemon template starting: pid %d: %s", self.pid, " ".join(cmd))

    def _mismatch(self, hello: dict[str, Any]) -> str:
        """Why a template that answered ``hello`` must not fork our daemons ('' if none)."""
        if hello.get("version") != __version__:
            return f"runs pynydus {hello.get('version')}, not {__version__}"
        exec_prefix = hello.get("exec") or []
        if exec_prefix[-len(self.command):] != self.command:
            return f"runs {exec_prefix}, not {self.command}"
        if hello.get("env") != env_digest(self.env):
            return "was started with another environment"
        if not hello.get("cmdline"):
            return "cannot give its children their command lines"
        if hello.get("log") != [self.log_level, self.log_rotation_size]:
            return f"logs at {hello.get('log')}, not {[self.log_level, self.log_rotation_size]}"
        return ""

    def _stop_other(self, pid: int) -> None:
        with contextlib.suppress(TemplateError):
            request(self.control, {"op": "exit"}, timeout=5)
        deadline = time.monotonic() + 5
        while pid and is_live(pid, self.control) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid and is_live(pid, self.control):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def close(self) -> None:
        """Stop the template (daemons it forked run on); its log stays."""
        with self._lock:
            self.ready = False
            pid, proc, self.proc, self.pid = self.pid, self.proc, None, 0
        if not pid:
            return
        with contextlib.suppress(TemplateError):
            request(self.control, {"op": "exit"}, timeout=5)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        else:
            self._stop_other(pid)
        for name in (self.control, self.log_file + ".stderr"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def replace(self, command: Sequence[str]) -> None:
        """Stop this template and start one of ``command`` (a hot upgrade: daemons of a
        new binary must not be forked from the old one)."""
        self.close()
        with self._lock:
            self.command = list(command)
            self.failed_at = 0.0
            self._start_locked()

    # --- forking -------------------------------------------------------------------------

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise TemplateError(f"it exited during start-up (status {self.proc.returncode}); "
                                    f"see {self.log_file}(.stderr)")
            if os.path.exists(self.control):
                try:
                    hello = request(self.control, {"op": "hello"}, timeout=5)
                except TemplateError:
                    pass
                else:
                    why = self._mismatch(hello)
                    if why:
                        raise TemplateError(why)
                    self.ready = True
                    return
            if time.monotonic() > deadline:
                raise TemplateError(f"not ready after {READY_TIMEOUT:.0f} s")
            time.sleep(0.02)

    def spawn(self, argv: Sequence[str], stdout: str) -> int | None:
        """A daemon running ``argv`` (stdout and stderr appended to ``stdout``) forked from
        the template: its pid; None if the caller must spawn it (logged)."""
        if list(argv[:len(self.command)]) != self.command:
            return None
        with self._lock:
            if not self.pid:
                if self.failed_at and time.monotonic() - self.failed_at >= RETRY_AFTER:
                    self.failed_at = 0.0
                    self._start_locked()  # for the next daemons: this one is not kept waiting
                return None
            try:
                if not self.ready:
                    self._wait_ready()
                reply = request(self.control, {"op": "spawn", "command": self.command,
                                               "args": list(argv[len(self.command):]),
                                               "stdout": stdout})
                if "pid" not in reply:
                    raise TemplateError(str(reply.get("error") or reply))
            except TemplateError as err:
                self._fail(err)
                return None
            self.forked += 1
            return int(reply["pid"])

    def _fail(self, err: TemplateError) -> None:
        """The template cannot fork: stop it, spawn directly until RETRY_AFTER passed."""
        log.warning("daemon template pid %d: %s; spawning daemons directly (a new template "
                    "is tried in %.0f s)", self.pid, err, RETRY_AFTER)
        pid, proc = self.pid, self.proc
        self.pid, self.proc, self.ready = 0, None, False
        self.failed_at = time.monotonic()
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(TemplateError):
                    request(self.control, {"op": "exit"}, timeout=2)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        elif pid:
            self._stop_other(pid)
