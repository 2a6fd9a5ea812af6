"""Process, port, mount and directory helpers shared by the harness components.

Rules this module enforces for everything the harness starts:

* A process is started by us (``Proc.start``), its PID is recorded in the work
  directory together with its executable, and it is stopped by that PID only
  (SIGTERM, then SIGKILL after a timeout). Nothing is ever stopped by name.
* Work directories are short (``/var/tmp/pyn-<tag>-XXXX``) because unix socket
  paths are limited to 108 bytes and containerd/shim paths grow from them.
* A work directory carries ``owner.pid`` (the Python process that made it). When
  that owner is gone, ``sweep_stale`` may stop the recorded processes, unmount
  what is mounted below the directory and remove it: this is what makes the demo
  idempotent after a crash or a kill -9 of pytest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

WORK_PARENT = Path(os.environ.get("PYNYDUS_HARNESS_TMP", "/var/tmp"))
WORK_PREFIX = "pyn-"


class HarnessError(RuntimeError):
    """A harness component did not start, stop or answer as expected."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``pred`` until it returns true; raise HarnessError naming ``what`` on timeout.

    Exceptions from ``pred`` count as "not yet" (the last one is chained), except
    HarnessError, which ends the wait at once."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except HarnessError:
            raise  # the probe decided it will never succeed (e.g. the process exited)
        except Exception as err:  # noqa: BLE001 - probing, any failure means "not ready"
            last = err
        time.sleep(interval)
    raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}") from last


def make_workdir(tag: str) -> Path:
    """A fresh short private directory ``/var/tmp/pyn-<tag>-XXXX`` owned by this process."""
    WORK_PARENT.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{tag}-", dir=WORK_PARENT))
    (d / "owner.pid").write_text(f"{os.getpid()}\n")
    return d


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def proc_exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def all_cmdlines() -> Iterator[tuple[int, bytes]]:
    """(pid, raw NUL-separated command line) of every process on the machine; a process
    that exits while the list is read is left out."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            yield int(entry), Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue


def pynydusd_pids(root: Path | str, *, template: bool | None = None) -> list[int]:
    """PIDs of the pynydusd processes whose command line names ``root`` (sorted);
    ``template`` True/False: only daemon templates (``pynydusd template``) / only the
    others."""
    needle = str(root).encode()
    return sorted(pid for pid, cmd in all_cmdlines() if b"pynydusd" in cmd and needle in cmd
                  and (template is None or (b"\0template\0" in cmd) == template))


@contextlib.contextmanager
def root_logging_of(setup: Callable[[], None]) -> Iterator[logging.Logger]:
    """The root logger as ``setup()`` left it; afterwards its level and handlers are as
    before (handlers that ``setup`` added are closed)."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup()
        yield root
    finally:
        for h in root.handlers:
            if h not in saved[1]:
                h.close()
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


def kill_pid(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """Send ``sig`` to ``pid``, wait up to ``timeout``, then SIGKILL. True if it is gone.

    Only call this for a PID this harness started (or found in a state directory
    it owns, after checking the executable)."""
    if not pid_alive(pid):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


class Proc:
    """One long-running child process: started detached (own session), output to a
    log file, PID recorded as ``<workdir>/pids/<name>.pid`` (``PID EXE``), stopped by PID."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path, log: Path,
                 env: dict[str, str] | None = None, stdout: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        self.log = log
        self.stdout_path = stdout
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise HarnessError(f"{self.name} is not started")
        return self.popen.pid

    @property
    def pidfile(self) -> Path:
        return self.workdir / "pids" / f"{self.name}.pid"

    def start(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            raise HarnessError(f"{self.name} already running as pid {self.popen.pid}")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as files:
            err: IO[bytes] = files.enter_context(open(self.log, "ab"))
            out = files.enter_context(open(self.stdout_path, "ab")) if self.stdout_path else err
            err.write(f"=== {time.strftime('%H:%M:%S')} start {' '.join(self.argv)}\n".encode())
            err.flush()
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=self.env, start_new_session=True, close_fds=True)
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.write_text(f"{self.popen.pid} {self.argv[0]}\n")

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        """Stop by PID (``sig`` then SIGKILL after ``timeout``); idempotent. Returns the
        exit status (negative signal number when killed)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(10)
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        return self.popen.returncode

    def kill9(self) -> None:
        self.stop(timeout=0.1, sig=signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            data = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(data[-lines:])


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 300,
        input: str | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run a short command, capturing text output; on failure raise HarnessError with it."""
    try:
        r = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                           timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as err:
        raise HarnessError(f"timed out after {timeout}s: {' '.join(argv)}") from err
    if check and r.returncode != 0:
        raise HarnessError(
            f"command failed (exit {r.returncode}): {' '.join(argv)}\n"
            f"stdout: {r.stdout.strip()}\nstderr: {r.stderr.strip()}")
    return r


def _unescape_mountinfo(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts_under(*roots: Path) -> list[str]:
    """Mount points at or below any of ``roots``, deepest (and latest) first."""
    prefixes = [str(Path(r).resolve()) for r in roots]
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape_mountinfo(line.split()[4])
            if any(mp == p or mp.startswith(p + "/") for p in prefixes):
                found.append(mp)
    found.reverse()
    found.sort(key=lambda m: m.count("/"), reverse=True)
    return found


def unmount_under(*roots: Path) -> list[str]:
    """Unmount everything at or below ``roots`` (lazy as a last resort). Returns what it
    unmounted. Idempotent."""
    done: list[str] = []
    for _ in range(5):
        mps = mounts_under(*roots)
        if not mps:
            break
        for mp in mps:
            r = subprocess.run(["umount", mp], capture_output=True, check=False)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
            done.append(mp)
    return done


def remove_tree(path: Path) -> None:
    """rm -rf that first unmounts anything below ``path`` (never crosses into a mount)."""
    if not path.exists():
        return
    unmount_under(path)
    if mounts_under(path):
        raise HarnessError(f"cannot remove {path}: still mounted: {mounts_under(path)}")
    shutil.rmtree(path, ignore_errors=True)


def processes_using(path: Path) -> list[int]:
    """PIDs (other than ours) whose command line names ``path`` or something below it:
    daemons a snapshotter started for snapshots under its root, for example."""
    target = str(path).rstrip("/")
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        argv = proc_cmdline(int(entry.name))
        if any(a == target or target + "/" in a for a in argv) and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_processes_using(path: Path, timeout: float = 10.0) -> list[int]:
    """Stop (SIGTERM, then SIGKILL) every process ``processes_using(path)`` finds. Only for
    a directory this harness created: whatever names it was started for our test."""
    pids = processes_using(path)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        kill_pid(pid, timeout=timeout)
    return pids


def recorded_pids(workdir: Path) -> Iterator[tuple[int, str]]:
    """(pid, exe) pairs from ``<workdir>/pids/*.pid`` files written by ``Proc.start``."""
    piddir = workdir / "pids"
    if not piddir.is_dir():
        return
    for f in sorted(piddir.glob("*.pid")):
        try:
            pid_s, exe = f.read_text().split(maxsplit=1)
            yield int(pid_s), exe.strip()
        except (OSError, ValueError):
            continue


def stop_recorded(workdir: Path) -> None:
    """Stop every process recorded in ``workdir`` whose command line still names the
    recorded executable (guards against PID reuse)."""
    for pid, exe in recorded_pids(workdir):
        argv = proc_cmdline(pid)
        if pid_alive(pid) and argv and (argv[0] == exe or os.path.basename(argv[0]) ==
                                        os.path.basename(exe) or exe in argv[:2]):
            kill_pid(pid)


def sweep_stale(tag: str | None = None) -> list[Path]:
    """Clean up harness work directories whose owning process is gone.

    For each ``/var/tmp/pyn-<tag>-*`` with a dead ``owner.pid`` and no ``keep`` marker:
    kill containerd shims of its task bundles, stop the processes recorded in it and any
    process still working below it (e.g. FUSE daemons), unmount, remove. On a shared
    machine this reaches other people's crashed runs too: call it only where every
    harness run is yours (CI, the demo machine) -- it is opt-in everywhere."""
    from . import containerd as _ctrd  # local import: containerd imports util

    cleaned: list[Path] = []
    if not WORK_PARENT.is_dir():
        return cleaned
    pattern = f"{WORK_PREFIX}{tag}-*" if tag else f"{WORK_PREFIX}*"
    for d in sorted(WORK_PARENT.glob(pattern)):
        owner = d / "owner.pid"
        try:
            opid = int(owner.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if pid_alive(opid) and opid != os.getpid():
            continue
        if opid == os.getpid() or (d / "keep").exists():
            continue
        _ctrd.cleanup_state_dir(d)
        stop_recorded(d)
        kill_processes_using(d)
        remove_tree(d)
        cleaned.append(d)
    return cleaned


class Service:
    """Context manager for a component the tests start: ``start()`` on entry; on exit,
    or when the start fails half-way, ``teardown()`` (``stop()`` unless overridden)."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.teardown()
            raise

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()
