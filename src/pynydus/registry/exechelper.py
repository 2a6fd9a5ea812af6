"""Running credential programs (``docker-credential-*``, kubelet credential provider
plugins) so that a broken one cannot hang or flood the snapshotter.

Each run is bounded: ``timeout`` seconds of wall time, ``max_output`` bytes of stdout
(and as much stderr, kept for the message). The program gets its own session, so on
timeout or overflow its whole process group is killed, grandchildren too (a helper that
forks and leaves a child holding the pipe would otherwise keep us reading). Failures are
:class:`CredentialSourceError` naming the program; its stderr is quoted (cut short), never
its stdout, which may hold a secret.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pynydus.errors import Unavailable

MAX_OUTPUT = 1 << 20
_STDERR_QUOTE = 300


class CredentialSourceError(Unavailable):
    """A credential source (a helper program, a plugin, an API) failed; the message names it."""


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: bytes
    stderr: bytes

    def stderr_text(self) -> str:
        text = self.stderr.decode(errors="replace").strip()
        return text[:_STDERR_QUOTE] + ("..." if len(text) > _STDERR_QUOTE else "")


def run_bounded(argv: Sequence[str], stdin: bytes, *, timeout: float, what: str,
                env: Mapping[str, str] | None = None, max_output: int = MAX_OUTPUT) -> Ran:
    """Run ``argv`` with ``stdin``; its exit status and output. CredentialSourceError
    naming ``what`` when it cannot be started, runs longer than ``timeout`` seconds or
    writes more than ``max_output`` bytes."""
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                env=None if env is None else dict(env), close_fds=True)
    except OSError as err:
        raise CredentialSourceError(f"{what}: cannot run {argv[0]}: {err.strerror or err}") \
            from err
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, errb = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    problem = ""
    sel = selectors.DefaultSelector()
    try:
        try:
            proc.stdin.write(stdin)
        except BrokenPipeError:
            pass  # it exited without reading; its status tells
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        for f in (proc.stdout, proc.stderr):
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"no answer within {timeout:g} s"
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = out if key.fileobj is proc.stdout else errb
                buf += chunk
                if len(buf) > max_output:
                    problem = f"wrote more than {max_output} bytes"
                    break
            if problem:
                break
        if not problem:
            left = max(0.0, deadline - time.monotonic())
            try:
                proc.wait(left)
            except subprocess.TimeoutExpired:
                problem = f"no answer within {timeout:g} s (closed its output, did not exit)"
    finally:
        sel.close()
        if problem or proc.poll() is None:
            _kill_group(proc)
        proc.stdout.close()
        proc.stderr.close()
    if problem:
        raise CredentialSourceError(f"{what}: {problem}; killed")
    return Ran(proc.returncode, bytes(out), bytes(errb))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
