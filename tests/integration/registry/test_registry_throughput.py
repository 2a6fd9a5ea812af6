"""Throughput smoke: ranged reads through RegistryClient vs bare httpx, same registry,
same run. Prints the figures; asserts only a generous ratio so a loaded CI machine
does not flake while a pathological regression (no keep-alive, a copy per byte)
still fails."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from pynydus.registry import RegistryClient, compute_digest
from tests.harness.registry import Registry

MiB = 1 << 20
pytestmark = pytest.mark.slow


def _rate(fn: Callable[[int], None], n: int, threads: int) -> float:
    per = n // threads

    def work(k: int) -> None:
        for i in range(per):
            fn(k * per + i)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return per * threads / (time.perf_counter() - t0)


@pytest.mark.parametrize("size, n, threads", [(MiB, 30, 1), (4096, 160, 4)])
def test_range_read_rate_is_close_to_bare_httpx(registry: Registry, size: int, n: int,
                                                threads: int) -> None:
    data = os.urandom(16 * MiB)
    d = compute_digest(data)
    with RegistryClient(registry.host, scheme="http") as c, httpx.Client() as raw:
        c.push_blob("bench/blob", data, d)
        url = f"{registry.url}/v2/bench/blob/blobs/{d}"
        span = len(data) - size

        def ours(i: int) -> None:
            off = (i * size) % span
            assert len(c.read_blob_range("bench/blob", d, off, size)) == size

        def bare(i: int) -> None:
            off = (i * size) % span
            r = raw.get(url, headers={"Range": f"bytes={off}-{off + size - 1}"})
            assert len(r.content) == size
        ours(0)
        bare(0)  # warm both pools
        ratios = []
        for _ in range(2):  # alternate to share the machine's noise fairly
            b = _rate(bare, n, threads)
            o = _rate(ours, n, threads)
            ratios.append(o / b)
        print(f"\n{size} B ranges, {threads} thread(s): pynydus {o:.0f} req/s "
              f"({o * size / 1e6:.1f} MB/s), bare httpx {b:.0f} req/s; "
              f"ratio {max(ratios):.2f}")
        assert max(ratios) > 0.3
