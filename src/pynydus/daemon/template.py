"""``pynydusd template``: a pre-imported process that forks daemons.

Every pynydusd of dedicated mode is a Python interpreter that has imported the daemon
(FUSE session, RAFS reader, blob cache, registry client with its TLS context): about
20 MB that would be the same bytes in every process. The template imports all of it
once, freezes its objects out of the garbage collector's reach (``gc.freeze``: a
collection in a child would otherwise write to, and so copy, every page of them) and
forks a daemon per request. A forked daemon shares those pages with the template and
its siblings until it writes to them, and starts in milliseconds instead of the
0.4-2 s of an interpreter start and its imports.

A forked daemon is the daemon a direct spawn would have started: its command line
(``/proc/<pid>/cmdline``, what ``ps`` shows and what the manager's liveness check and
PID bookkeeping read) is the very argv the manager asked for, set with
``prctl(PR_SET_MM)``; it runs ``main(argv)`` in a session of its own with stdin on
/dev/null and stdout/stderr appended to the file the manager named; the manager puts it
into its cgroup and sets its niceness by pid, as for a spawned one. What differs: its
parent is the template (which reaps it), not the snapshotter.

The template holds no thread and no file descriptor but its control socket, a
self-pipe for SIGCHLD and its log. It outlives a snapshotter that is killed (as daemons
do); a restarted snapshotter adopts it only if it runs the same code (``hello``), and it
refuses to fork once a module it imported has changed on disk (an upgrade installed
over it), so that a template of an older version never forks daemons for a newer one.

Control protocol, one request per connection on ``--control`` (a unix socket, 0600,
peers checked with SO_PEERCRED): one JSON line each way.

- ``{"op": "hello"}`` -> ``{"pid", "version", "exec", "env", "cmdline", "log"}``: who it is.
  ``exec`` is what precedes ``template`` in its own command line: the program as the
  kernel started it (``[python3, /usr/bin/pynydusd]`` for the script
  ``/usr/bin/pynydusd``); ``env`` a digest of its environment (:func:`env_digest`);
  ``cmdline`` whether it can give a child its command line (it needs CAP_SYS_RESOURCE);
  ``log`` its own log's ``[level, rotation size in MB]``.
- ``{"op": "spawn", "command": [...], "args": [...], "stdout": PATH}`` -> ``{"pid": N}``
  once the child runs under its command line, or ``{"error": TEXT, "stale": BOOL}``.
  ``command`` is the program the caller would have executed (``exec`` must end with
  it); the child's command line is ``exec + args``, as that execution would have left
  it, and it runs pynydusd's ``main(args)``.
- ``{"op": "exit"}`` -> ``{"ok": true}``; the template exits, its daemons run on.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import gc
import hashlib
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger("pynydusd.template")

SUBCOMMAND = "template"
# A request line may not be longer (argv of a daemon is well under 4 KiB)
MAX_REQUEST = 1 << 20
# How long the template waits for a child to report that it runs under its command line
CHILD_READY_TIMEOUT = 10.0
# Environment variables a daemon does not depend on: the snapshotter drops
# PYTHONDONTWRITEBYTECODE before it starts one; systemd's change with every start of the
# service, pytest's with every phase of a test
_ENV_IGNORED = ("PYTHONDONTWRITEBYTECODE", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES", "INVOCATION_ID", "JOURNAL_STREAM", "WATCHDOG_PID",
                "WATCHDOG_USEC", "PYTEST_CURRENT_TEST")

_PR_SET_MM = 35
_PR_SET_MM_ARG_START = 8
_PR_SET_MM_ARG_END = 9
_PR_SET_MM_MAP = 14
_cmdline_buffers: list[Any] = []  # the command line a child set must stay where it is


def env_digest(env: Mapping[str, str]) -> str:
    """A digest of the environment a daemon starts with (variables that do not change
    what a daemon does left out): a template started under another one is not used."""
    items = sorted((k, v) for k, v in env.items() if k not in _ENV_IGNORED)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def daemon_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment the snapshotter gives a daemon it starts (and the template)."""
    return {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}


# --- the command line of a forked child ---------------------------------------------------


def set_cmdline(argv: Sequence[str]) -> None:
    """Make ``/proc/self/cmdline`` read ``argv`` (NUL-separated, as exec would leave it).

    ``PR_SET_MM_MAP`` (the memory map's bounds as they are, the arguments moved) needs no
    capability on a kernel built with checkpoint/restore; the single-field
    ``PR_SET_MM_ARG_START/END`` need CAP_SYS_RESOURCE. OSError if both are refused."""
    data = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    buf = ctypes.create_string_buffer(data, len(data))
    start = ctypes.addressof(buf)
    end = start + len(data)
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]

    def put(option: int, value: int, size: int = 0) -> int:
        if prctl(_PR_SET_MM, option, value, size, 0) != 0:
            return ctypes.get_errno()
        return 0

    err = _set_mm_map(libc, put, start, end)
    if err:
        # the kernel keeps arg_start <= arg_end at every step: move the end first when
        # the new area lies above the old one
        order = [(_PR_SET_MM_ARG_START, start), (_PR_SET_MM_ARG_END, end)]
        err = put(*order[0])
        if err == errno.EINVAL:
            order.reverse()
            err = put(*order[0])
        if not err:
            err = put(*order[1])
    if err:
        raise OSError(err, f"prctl(PR_SET_MM) of the command line: {os.strerror(err)}")
    _cmdline_buffers[:] = [buf]


def _set_mm_map(libc: Any, put: Callable[..., int], arg_start: int, arg_end: int) -> int:
    """PR_SET_MM_MAP with the bounds of /proc/self/stat and the arguments at
    [arg_start, arg_end); an errno, 0 on success."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()

    def field(n: int) -> int:  # proc(5) numbers fields from 1; ours start at field 3
        return int(fields[n - 3])

    sbrk = libc.sbrk
    sbrk.restype = ctypes.c_void_p
    sbrk.argtypes = [ctypes.c_long]
    brk = sbrk(0) or 0
    # struct prctl_mm_map: start/end code, start/end data, start_brk, brk, start_stack,
    # arg start/end, env start/end, auxv pointer, auxv size, exe fd (-1: unchanged)
    packed = struct.pack("11QQII", field(26), field(27), field(45), field(46), field(47), brk,
                         field(28), arg_start, arg_end, field(50), field(51), 0, 0, 0xFFFFFFFF)
    mm_map = ctypes.create_string_buffer(packed, len(packed))
    return put(_PR_SET_MM_MAP, ctypes.addressof(mm_map), len(packed))


def own_cmdline() -> list[str]:
    with open("/proc/self/cmdline", "rb") as f:
        return [os.fsdecode(a) for a in f.read().split(b"\0")[:-1]]


# --- what the template runs -----------------------------------------------------------------


def preload() -> None:
    """Import what a daemon runs and build what every daemon builds the same way, so
    that children share it."""
    import importlib

    import pynydus.daemon.api
    import pynydus.daemon.config
    import pynydus.daemon.daemon
    import pynydus.daemon.fuseloop
    import pynydus.daemon.registry_backend
    import pynydus.host.mountinfo
    import pynydus.registry.client  # noqa: F401
    from pynydus.registry.transport import shared_ssl_context

    # imported where first used: decompressors, digests, the metrics exposition
    for name in ("lz4.block", "zstandard", "blake3", "prometheus_client",
                 "prometheus_client.core"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass

    try:  # the CA bundle a registry client loads (~1 MB of certificates)
        verify: Any = shared_ssl_context(True)
    except Exception as err:  # noqa: BLE001 - a child loads it itself then
        log.info("TLS context not preloaded: %s", err)
        verify = False
    # A client's first construction imports its transport (httpcore, h11, anyio and
    # trio's pieces: ~4 MB of code objects a child would otherwise compile for itself);
    # it opens no connection and starts no thread.
    import httpx

    with httpx.Client(verify=verify, trust_env=False):
        pass
    "registry.example".encode("idna")  # a registry host's first encoding imports idna
    import hmac  # noqa: F401 - digest auth

    # what every daemon's start runs once (argparse's and the config's regular
    # expressions compiled into the re module's cache, their code specialized)
    from pynydus.daemon.main import build_parser

    build_parser().parse_args(["--mountpoint", "/m", "--apisock", "/a", "--thread-num", "4"])


def module_stamps() -> dict[str, tuple[int, int]]:
    """(size, mtime) of the file of every module imported: an upgrade installed over
    the template changes some of them."""
    stamps = {}
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if not path:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        stamps[path] = (st.st_size, st.st_mtime_ns)
    return stamps


def changed_modules(stamps: Mapping[str, tuple[int, int]]) -> list[str]:
    out = []
    for path, stamp in stamps.items():
        try:
            st = os.stat(path)
            now = (st.st_size, st.st_mtime_ns)
        except OSError:
            now = (-1, -1)
        if now != stamp:
            out.append(path)
    return out


class Template:
    """The template's loop: serve the control socket, fork children, reap them."""

    def __init__(self, control: str, exec_prefix: list[str], run: Callable[[list[str]], int],
                 log_handler: logging.Handler | None, log_settings: tuple[str, int] = ("info", 0)
                 ) -> None:
        self.control = control
        self.exec_prefix = exec_prefix
        self.run = run
        self.log_handler = log_handler
        self.log_settings = log_settings
        self.stamps = module_stamps()
        self.env = env_digest(os.environ)
        self.can_set_cmdline = True
        try:
            set_cmdline(own_cmdline())  # the same text: only asks whether we may
        except OSError as err:
            self.can_set_cmdline = False
            log.error("cannot set a child's command line (%s): no daemon will be forked", err)
        self._stop = False
        self.children: set[int] = set()
        os.makedirs(os.path.dirname(control), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.listener.bind(control)
        finally:
            os.umask(old)
        self._inode = os.stat(control).st_ino  # removed at exit only if still ours
        self.listener.listen(64)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._handlers = {sig: signal.getsignal(sig)
                          for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT,
                                      signal.SIGHUP)}

    def serve(self) -> int:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the poll through the pipe
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop)
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        log.info("pynydusd template %d serving %s (%d modules preloaded)", os.getpid(),
                 self.control, len(self.stamps))
        try:
            while not self._stop:
                for fd, _ in poller.poll(1000):
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    elif not self._stop:
                        self._accept()
                self._reap()
        finally:
            self._close()
        log.info("template %d exits; %d daemons it forked run on", os.getpid(),
                 len(self.children))
        return 0

    def _on_stop(self, signum: int, _frame: object) -> None:
        self._stop = True

    def _close(self) -> None:
        signal.set_wakeup_fd(-1)
        with contextlib.suppress(OSError):
            if os.stat(self.control).st_ino == self._inode:
                os.unlink(self.control)
        self.listener.close()

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            log.info("daemon pid %d exited (%s)", pid, _status_text(status))

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5.0)
            try:
                uid = struct.unpack("3i", conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
                if uid not in (0, os.geteuid()):
                    log.warning("control connection from uid %d refused", uid)
                    return
                request = read_line(conn)
                reply = self._handle(json.loads(request), conn)
            except (OSError, ValueError) as err:
                log.warning("control request failed: %s", err)
                return
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _handle(self, req: dict[str, Any], conn: socket.socket) -> dict[str, Any]:
        from pynydus import __version__

        op = req.get("op")
        if op == "hello":
            return {"pid": os.getpid(), "version": __version__, "exec": self.exec_prefix,
                    "env": self.env, "cmdline": self.can_set_cmdline,
                    "log": list(self.log_settings)}
        if op == "exit":
            self._stop = True
            return {"ok": True}
        if op != "spawn":
            return {"error": f"unknown op {op!r}"}
        command, args, stdout = req.get("command"), req.get("args"), req.get("stdout")
        if not (_strings(command) and _strings(args) and isinstance(stdout, str)):
            return {"error": "spawn needs command and args (lists of strings) and stdout"}
        if not command or self.exec_prefix[-len(command):] != command:
            return {"error": f"this template runs {self.exec_prefix}, not {command}"}
        if not self.can_set_cmdline:
            return {"error": "cannot set a child's command line"}
        changed = changed_modules(self.stamps)
        if changed:
            log.warning("modules changed on disk since the template started (%s, ...): "
                        "it forks no more daemons and exits", changed[0])
            self._stop = True
            return {"error": f"stale: {changed[0]} changed on disk", "stale": True}
        return self._fork([str(a) for a in args or ()], stdout, conn)

    def _fork(self, args: list[str], stdout: str, conn: socket.socket) -> dict[str, Any]:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            rc = 70
            try:
                os.close(ready_r)
                conn.close()
                rc = self._become(args, stdout, ready_w)
            except BaseException:  # noqa: BLE001 - report it where a daemon would
                with contextlib.suppress(Exception):
                    traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(rc)
        os.close(ready_w)
        self.children.add(pid)
        try:
            if not select.select([ready_r], [], [], CHILD_READY_TIMEOUT)[0]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                return {"error": f"child {pid} did not start within {CHILD_READY_TIMEOUT:.0f} s"}
            said = os.read(ready_r, 4096)
        finally:
            os.close(ready_r)
        if said != b"ok":
            return {"error": f"child {pid}: {said.decode(errors='replace') or 'exited'}"}
        return {"pid": pid}

    def _become(self, args: list[str], stdout: str, ready_w: int) -> int:
        """In the child: drop the template's state, take the daemon's place, run it."""
        signal.set_wakeup_fd(-1)
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        root = logging.getLogger()
        if self.log_handler is not None:
            root.removeHandler(self.log_handler)
            self.log_handler.close()
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(stdout, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        argv = [*self.exec_prefix, *args]
        try:
            set_cmdline(argv)
        except OSError as err:
            os.write(ready_w, str(err).encode())
            return 70
        os.write(ready_w, b"ok")
        os.close(ready_w)
        sys.argv = [sys.argv[0], *args]
        try:
            rc = self.run(list(args))
        except SystemExit as exit_:
            code = exit_.code
            rc = code if isinstance(code, int) else (0 if code is None else 1)
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
        for t in threading.enumerate():  # what an interpreter's exit would wait for
            if t is not threading.current_thread() and not t.daemon:
                t.join()
        logging.shutdown()
        return rc


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read_line(conn: socket.socket) -> bytes:
    """One message of the control protocol (either way): bytes up to and including the
    newline, or what came before the peer closed; ValueError past ``MAX_REQUEST``."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("message too long")
    return data


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pynydusd template", description="Import the daemon "
                                "once and fork daemons on request (the snapshotter starts it).")
    p.add_argument("--control", required=True, help="control socket (created 0600)")
    p.add_argument("-L", "--log-file", help="log file (default stderr)")
    p.add_argument("-l", "--log-level", default="info", type=str.lower)
    p.add_argument("--log-rotation-size", type=int, default=0,
                   help="MB; 0 = no rotation (as the daemons' logs)")
    return p


def serve(argv: Sequence[str], run: Callable[[list[str]], int]) -> int:
    """``pynydusd template --control SOCK ...``: preload, then fork ``run`` on request."""
    from pynydus.daemon.main import log_handler
    from pynydus.logs import LEVELS

    args = build_parser().parse_args(list(argv))
    if args.log_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.log_file)), exist_ok=True)
    # rotated as the daemons' logs, without their clean-up thread: the template forks
    handler = log_handler(args.log_file, args.log_rotation_size, background=False)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(args.log_level, logging.INFO))
    t0 = time.monotonic()
    preload()
    if threading.active_count() != 1:
        log.error("importing the daemon started threads (%s): a fork would not copy them; "
                  "not serving", [t.name for t in threading.enumerate()])
        return 1
    cmdline = own_cmdline()
    exec_prefix = cmdline[:cmdline.index(SUBCOMMAND)] if SUBCOMMAND in cmdline else cmdline[:1]
    gc.collect()
    gc.freeze()  # children's collections leave the template's objects (and pages) alone
    template = Template(args.control, exec_prefix, run, handler if args.log_file else None,
                        (args.log_level, args.log_rotation_size))
    log.info("preloaded in %.2f s", time.monotonic() - t0)
    return template.serve()
