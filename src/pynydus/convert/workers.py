"""Worker processes that convert layers: ``python -m pynydus.convert.workers``.

The builder is CPU-bound Python, so layers run in separate processes to use every
core. We start plain subprocesses rather than a multiprocessing pool: nothing
re-imports the caller's ``__main__`` (a library caller or a test needs no
``if __name__ == "__main__"`` guard) and nothing is forked from a process that has
threads running.

Protocol on the worker's stdin/stdout, one frame = 8-byte big-endian length +
pickle: the parent sends a :class:`~.layer.LayerJob`, the worker answers any
number of ``("progress", index, nbytes)`` then one ``("done", LayerResult)`` or
``("error", exception)``, and waits for the next job; EOF on stdin ends it. The
worker's own prints go to stderr.

:class:`WorkerPool` owns its processes: :meth:`WorkerPool.close` ends them (EOF,
then kill by PID after a grace period) and is idempotent.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from pynydus.errors import NydusError, Unavailable

from .layer import LayerJob, LayerResult, convert_layer

__all__ = ["WorkerPool"]

_LEN = struct.Struct(">Q")


def _send(f: IO[bytes], msg: Any) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_LEN.pack(len(data)) + data)
    f.flush()


def _recv(f: IO[bytes]) -> Any:
    head = f.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError
    n = _LEN.unpack(head)[0]
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


class WorkerPool:
    """``n`` worker processes; :meth:`run` yields results as layers finish."""

    def __init__(self, n: int, on_progress: Callable[[int, int], None] | None = None) -> None:
        self._progress = on_progress
        self._procs: list[subprocess.Popen[bytes]] = []
        env = dict(os.environ)
        for _ in range(max(1, n)):
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", "pynydus.convert.workers"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, env=env))
        self._closed = False

    def run(self, jobs: Sequence[LayerJob]) -> Iterator[LayerResult]:
        """Convert ``jobs`` across the workers; yield each result when it is ready.

        The first error stops handing out jobs and is raised (after the layers in
        flight finish or their worker dies)."""
        todo: queue.Queue[LayerJob] = queue.Queue()
        for job in jobs:
            todo.put(job)
        out: queue.Queue[tuple[str, Any]] = queue.Queue()
        failed = threading.Event()

        def serve(proc: subprocess.Popen[bytes]) -> None:
            assert proc.stdin is not None and proc.stdout is not None
            while not failed.is_set():
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    break
                try:
                    _send(proc.stdin, job)
                    while True:
                        msg = _recv(proc.stdout)
                        if msg[0] == "progress":
                            if self._progress:
                                self._progress(msg[1], msg[2])
                            continue
                        out.put((msg[0], msg[1]))
                        if msg[0] == "error":
                            failed.set()
                        break
                except (EOFError, OSError, pickle.UnpicklingError) as err:
                    failed.set()
                    out.put(("error", Unavailable(
                        f"convert layer {job.layer.digest}: worker process "
                        f"{proc.pid} died ({type(err).__name__})")))
                    return
            out.put(("idle", None))

        threads = [threading.Thread(target=serve, args=(p,), daemon=True,
                                    name=f"convert-worker-{p.pid}") for p in self._procs]
        for t in threads:
            t.start()
        idle = 0
        first_error: BaseException | None = None
        while idle < len(threads):
            kind, value = out.get()
            if kind == "idle":
                idle += 1
            elif kind == "error":
                first_error = first_error or value
            elif first_error is None:
                yield value
        for t in threads:
            t.join()
        if first_error is not None:
            raise first_error

    def close(self) -> None:
        """End the workers (EOF, then SIGKILL by PID after 5 s). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            try:
                if p.stdin is not None:
                    p.stdin.close()
            except OSError:
                pass
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()

    def __enter__(self) -> WorkerPool:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ProgressBatcher:
    """Progress callback of a worker: byte counts sent to the parent per MiB."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._pending = 0

    def __call__(self, index: int, event: str, value: int) -> None:
        if event == "bytes":
            self._pending += value
            if self._pending >= 1 << 20:
                self.flush(index)

    def flush(self, index: int) -> None:
        if self._pending:
            _send(self._out, ("progress", index, self._pending))
            self._pending = 0


def _worker_main() -> int:
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints must not corrupt the protocol
    sys.stdout = sys.stderr
    while True:
        try:
            job: LayerJob = _recv(proto_in)
        except EOFError:
            return 0
        batcher = _ProgressBatcher(proto_out)
        try:
            res: LayerResult = convert_layer(job, batcher)
            batcher.flush(job.index)
            _send(proto_out, ("done", res))
        except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
            exc: BaseException = err
            if not isinstance(err, NydusError):
                exc = NydusError(f"convert layer {job.layer.digest}: {type(err).__name__}: {err}")
            try:
                pickle.loads(pickle.dumps(exc))
            except Exception:  # noqa: BLE001 - any unpicklable error travels as text
                exc = NydusError(str(exc))
            _send(proto_out, ("error", exc))


if __name__ == "__main__":
    sys.exit(_worker_main())
