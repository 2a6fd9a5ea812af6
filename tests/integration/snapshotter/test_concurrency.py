"""Concurrency: containerd calls a snapshotter from many goroutines at once.

Unpacking several images, starting containers and the garbage collector's Cleanup all
overlap in practice. Every call must succeed or fail with its own reason (never with a
"database is locked"), a key can be created only once, and Cleanup must never take a
directory from a snapshot that is being made.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from .support import SnapshotterClient, SnapshotterProcess, assert_consistent

pytestmark = pytest.mark.root

THREADS = 8


def _clients(proc: SnapshotterProcess, n: int) -> list[SnapshotterClient]:
    return [SnapshotterClient(proc.address) for _ in range(n)]


def test_parallel_chains_all_succeed(snapshotter):
    """8 clients each build a chain of 10 layers on one shared base, with views and
    removals on the way: no call fails, the result is exactly what was asked for."""
    sn = snapshotter.client
    sn.prepare("base-a", "")
    sn.commit("base", "base-a")

    def chain(t: int) -> set[str]:
        client = SnapshotterClient(snapshotter.address)
        try:
            parent, alive = "base", set()
            for i in range(10):
                key, name = f"t{t}-{i}-a", f"t{t}-{i}"
                client.prepare(key, parent, {"t": str(t)})
                client.view(f"{name}-v", parent)
                client.usage(key)
                client.commit(name, key, {"t": str(t)})
                client.remove(f"{name}-v")
                client.list(f"labels.t=={t}")
                alive.add(name)
                parent = name
            client.prepare(f"t{t}-top", parent)
            alive.add(f"t{t}-top")
            return alive
        finally:
            client.close()

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(chain, range(THREADS)))
    expected = {"base"}.union(*results)
    assert_consistent(snapshotter, expected)
    for t in range(THREADS):
        assert sn.stat(f"t{t}-top").parent == f"t{t}-9"


@pytest.mark.parametrize("op", ["prepare", "view", "commit"])
def test_racing_for_one_key_exactly_one_wins(snapshotter, op):
    sn = snapshotter.client
    sn.prepare("p-a", "")
    sn.commit("p", "p-a")
    for t in range(THREADS):
        sn.prepare(f"src{t}", "p")
    barrier = threading.Barrier(THREADS)

    def attempt(t: int) -> str:
        client = SnapshotterClient(snapshotter.address)
        try:
            barrier.wait()
            if op == "prepare":
                client.prepare("contested", "p", {"winner": str(t)})
            elif op == "view":
                client.view("contested", "p", {"winner": str(t)})
            else:
                client.commit("contested", f"src{t}", {"winner": str(t)})
            return "OK"
        except grpc.RpcError as err:
            return err.code().name
        finally:
            client.close()

    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = Counter(pool.map(attempt, range(THREADS)))
    assert outcomes == Counter({"OK": 1, "ALREADY_EXISTS": THREADS - 1}), outcomes
    winner = sn.stat("contested").labels["winner"]
    expected = {"p", "contested"} | {f"src{t}" for t in range(THREADS)}
    if op == "commit":
        expected.discard(f"src{winner}")
    assert_consistent(snapshotter, expected)


def test_cleanup_racing_with_prepare_never_takes_a_live_directory(snapshotter):
    """Cleanup in a loop while snapshots are being prepared and removed: every snapshot
    that exists afterwards still has its directory, and each of its mounts works."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def janitor() -> None:
        client = SnapshotterClient(snapshotter.address)
        try:
            while not stop.is_set():
                client.cleanup()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
        finally:
            client.close()

    def worker(t: int) -> list[str]:
        client = SnapshotterClient(snapshotter.address)
        made = []
        try:
            for i in range(30):
                key = f"w{t}-{i}"
                fs = Path(client.prepare(key, "")[0].source)
                assert fs.is_dir(), f"{key}: directory gone right after Prepare"
                (fs / "probe").write_text(key)
                if i % 4 == 0:
                    client.remove(key)
                else:
                    made.append(key)
            return made
        finally:
            client.close()

    threads = [threading.Thread(target=janitor) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            made = [k for ks in pool.map(worker, range(4)) for k in ks]
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=30)
    assert not errors, errors
    sn = snapshotter.client
    for key in made:
        fs = Path(sn.mounts(key)[0].source)
        assert (fs / "probe").read_text() == key, f"{key}: data lost to a racing Cleanup"
    assert_consistent(snapshotter, set(made))


def test_racing_commits_of_one_key_exactly_one_wins(snapshotter):
    """One active committed under 8 names at once: one Commit wins, the others find
    the key gone (NOT_FOUND) — never two committed snapshots sharing one directory."""
    sn = snapshotter.client
    sn.prepare("k", "")
    barrier = threading.Barrier(THREADS)

    def attempt(t: int) -> str:
        client = SnapshotterClient(snapshotter.address)
        try:
            barrier.wait()
            client.commit(f"name{t}", "k")
            return "OK"
        except grpc.RpcError as err:
            return err.code().name
        finally:
            client.close()

    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = Counter(pool.map(attempt, range(THREADS)))
    assert outcomes == Counter({"OK": 1, "NOT_FOUND": THREADS - 1}), outcomes
    names = sn.names()
    assert len(names) == 1 and names.pop().startswith("name")
    assert_consistent(snapshotter, sn.names())


def test_remove_racing_with_a_child_prepare_never_orphans_the_child(snapshotter):
    """Remove(parent) and Prepare(child of parent) at the same moment: at most one of
    them succeeds, and a child never outlives its parent."""
    sn = snapshotter.client
    rounds = 15
    for r in range(rounds):
        sn.prepare(f"p{r}-a", "")
        sn.commit(f"p{r}", f"p{r}-a")
    barrier = threading.Barrier(2)

    def remove(r: int) -> str:
        client = SnapshotterClient(snapshotter.address)
        try:
            barrier.wait()
            client.remove(f"p{r}")
            return "OK"
        except grpc.RpcError as err:
            return err.code().name
        finally:
            client.close()

    def prepare(r: int) -> str:
        client = SnapshotterClient(snapshotter.address)
        try:
            barrier.wait()
            client.prepare(f"child{r}", f"p{r}")
            return "OK"
        except grpc.RpcError as err:
            return err.code().name
        finally:
            client.close()

    expected = set()
    with ThreadPoolExecutor(2) as pool:
        for r in range(rounds):
            fr, fp = pool.submit(remove, r), pool.submit(prepare, r)
            outcome = (fr.result(timeout=30), fp.result(timeout=30))
            assert outcome in {("OK", "NOT_FOUND"), ("FAILED_PRECONDITION", "OK")}, (r, outcome)
            if outcome[1] == "OK":
                expected |= {f"p{r}", f"child{r}"}
    assert_consistent(snapshotter, expected)
    for info in sn.list("kind==active"):
        assert sn.stat(info.parent).name == info.parent
