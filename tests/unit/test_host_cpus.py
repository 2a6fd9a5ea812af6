"""host.cpus: the CPU a thread got and the time it waited for one (the tarfs driver logs
both per conversion, to tell a CPU-bound conversion from one the machine held back)."""

from __future__ import annotations

import threading
import time

from pynydus.host.cpus import thread_cpu_and_wait


def _spin(seconds: float) -> None:
    t = time.thread_time()
    while time.thread_time() - t < seconds:
        pass


def test_thread_cpu_grows_with_the_threads_own_work() -> None:
    cpu0, wait0 = thread_cpu_and_wait()
    _spin(0.05)
    cpu1, wait1 = thread_cpu_and_wait()
    assert cpu1 - cpu0 >= 0.04
    assert wait1 >= wait0 >= 0.0


def test_thread_cpu_is_per_thread() -> None:
    got: list[tuple[float, float]] = []

    def sleeper() -> None:
        a = thread_cpu_and_wait()
        time.sleep(0.1)  # while the main thread spins
        b = thread_cpu_and_wait()
        got.append((b[0] - a[0], b[1] - a[1]))

    t = threading.Thread(target=sleeper)
    t.start()
    _spin(0.1)
    t.join()
    cpu, wait = got[0]
    assert 0.0 <= cpu < 0.05  # the main thread's spinning is not the sleeper's
    assert wait >= 0.0
