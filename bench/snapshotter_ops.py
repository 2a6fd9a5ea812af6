#!/usr/bin/env python3
"""Per-operation latency of the snapshots API through containerd: pynydus vs overlayfs.

One private containerd runs two snapshotters side by side: its built-in ``overlayfs``
and ``pynydus snapshotter`` as proxy plugin ``nydus``. A small gRPC client speaks
containerd's own ``containerd.services.snapshots.v1.Snapshots`` service on containerd's
socket (the ``snapshotter`` field picks the plugin, the ``containerd-namespace`` header
the namespace), so no ``ctr`` process start-up is measured. Per iteration and per
snapshotter (the order alternates every iteration so drift hits both alike):

    Prepare(a, parent=top of a 3-layer chain) Mounts(a) Stat(a) Commit(c, a) View(v, c)
    List() Remove(v) Remove(c)

Reported: p50/p95 per operation for both, the ratio nydus/overlayfs of the p50s, and the
same operations sent straight to the socket of a second pynydus instance ("direct": the
part of the proxied latency that is our snapshotter). Then List over N snapshots (default 10,000 active
snapshots per snapshotter) through containerd and direct, and the snapshotter's VmRSS
when idle (fresh, after the operations, after the List phase) and its peak (VmHWM).

What containerd does in between matters for reading the figures: its metadata layer
answers Remove from its bolt database (the backend Remove happens later in its garbage
collector), calls the backend for Prepare/View/Commit/Mounts/Stat, and serves List by
walking its database and calling the backend's Stat once per snapshot.

With ``--peers grpcio,stargz`` the same containerd also proxies to pynydus on grpcio's
server (plugin ``nydus-grpcio``, the fallback kept by PYNYDUS_SNAPSHOTS_SERVER=grpcio) and
to the Go stargz snapshotter (plugin ``stargz``: what a compiled proxy snapshotter costs
through containerd on this machine), interleaved like the others. ``nydus-snapshotter``
adds upstream's ``containerd-nydus-grpc`` (plugin ``nydus-go``) and, unless
``--no-direct``, a second instance of it called straight ("nydus-go-direct", beside
"nydus-direct"); ``base=SRC`` runs pynydus from another tree's ``src/`` directory as
plugin ``nydus-base``: a change measured against its parent in one containerd.

    bench/snapshotter_ops.py                 # full run (about 3-6 minutes)
    bench/snapshotter_ops.py --quick         # CI smoke: small counts
    bench/snapshotter_ops.py --iterations 200 --list-count 2000 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc

from pynydus.api import snapshots_pb2 as pb
from pynydus.api import snapshots_pb2_grpc
from pynydus.snapshot.server import SERVER_ENV
from tests.harness.containerd import VERSIONS, Containerd, binaries
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import HarnessError, Proc, remove_tree, unmount_under, wait_until

# containerd removes backend snapshots in its garbage collector, which by default may use
# only 2% of the time (pause_threshold 0.02): after 10,000 removals it would take many
# minutes to reach the backends. Allow it up to half the time so the run can wait for it.
GC_TOML = """
  [plugins."io.containerd.gc.v1.scheduler"]
    pause_threshold = 0.5
    deletion_threshold = 0
    mutation_threshold = 100
    schedule_delay = "0s"
    startup_delay = "100ms"
"""
OPS = ["Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "List"]
GC_ROOT = "containerd.io/gc.root"  # keeps containerd's GC off our unreferenced snapshots
NYDUS = "nydus"
OVERLAY = "overlayfs"
GO_DIRECT = "nydus-go-direct"  # upstream's Go snapshotter without containerd


class Client:
    """The snapshots API of one snapshotter, through containerd or straight to a proxy."""

    def __init__(self, channel: grpc.Channel, snapshotter: str, namespace: str | None) -> None:
        self.stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        self.sn = snapshotter
        self.md = (("containerd-namespace", namespace),) if namespace else None
        self.labels = {GC_ROOT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def prepare(self, key: str, parent: str = "") -> None:
        self.stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=self.sn, key=key, parent=parent,
                                                    labels=self.labels), metadata=self.md)

    def view(self, key: str, parent: str) -> None:
        self.stub.View(pb.ViewSnapshotRequest(snapshotter=self.sn, key=key, parent=parent,
                                              labels=self.labels), metadata=self.md)

    def mounts(self, key: str) -> None:
        self.stub.Mounts(pb.MountsRequest(snapshotter=self.sn, key=key), metadata=self.md)

    def commit(self, name: str, key: str) -> None:
        self.stub.Commit(pb.CommitSnapshotRequest(snapshotter=self.sn, name=name, key=key,
                                                  labels=self.labels), metadata=self.md)

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=self.sn, key=key), metadata=self.md)

    def stat(self, key: str) -> None:
        self.stub.Stat(pb.StatSnapshotRequest(snapshotter=self.sn, key=key), metadata=self.md)

    def list(self) -> int:
        n = 0
        for resp in self.stub.List(pb.ListSnapshotsRequest(snapshotter=self.sn),
                                   metadata=self.md, timeout=600):
            n += len(resp.info)
        return n


@dataclass
class Samples:
    by_op: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})

    def timed(self, op: str, fn: Callable[[], object], record: bool) -> None:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if record:
            self.by_op[op].append(dt)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def base_chain(c: Client, prefix: str, depth: int = 3) -> str:
    """Committed chain prefix-base0 <- base1 <- ...; returns the top name."""
    parent = ""
    for i in range(depth):
        name = f"{prefix}-base{i}"
        c.prepare(name + "-a", parent)
        c.commit(name, name + "-a")
        parent = name
    return parent


def one_iteration(c: Client, s: Samples, top: str, i: int, record: bool) -> None:
    a, cm, v = f"a{i}", f"c{i}", f"v{i}"
    s.timed("Prepare", lambda: c.prepare(a, top), record)
    s.timed("Mounts", lambda: c.mounts(a), record)
    s.timed("Stat", lambda: c.stat(a), record)
    s.timed("Commit", lambda: c.commit(cm, a), record)
    s.timed("View", lambda: c.view(v, cm), record)
    s.timed("List", c.list, record)
    s.timed("Remove", lambda: c.remove(v), record)
    s.timed("Remove", lambda: c.remove(cm), record)


def rss(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(line.split()[1])
    return out


def settle(snap: Snapshotter, seconds: float) -> dict[str, int]:
    time.sleep(seconds)
    return rss(snap.pid)


def list_phase(clients: dict[str, Client], n: int, top: dict[str, str], reps: int,
               log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    res: dict[str, dict[str, float]] = {}
    created: dict[str, float] = {}
    for name, c in clients.items():
        t0 = time.perf_counter()
        for j in range(n):
            c.prepare(f"l{j}", top[name])
        created[name] = time.perf_counter() - t0
    names = list(clients)
    times: dict[str, list[float]] = {name: [] for name in names}
    counts: dict[str, int] = {}
    for rep in range(reps):  # the List calls interleaved, the order rotating
        for name in iterate_alternating(names, rep):
            t0 = time.perf_counter()
            counts[name] = clients[name].list()
            times[name].append(time.perf_counter() - t0)
    for name in names:
        med = statistics.median(times[name])
        res[name] = {"create_s": created[name], "list_s": med, "listed": counts[name],
                     "list_runs_s": times[name]}
        log(f"  {name:<14} created {n} in {created[name]:6.1f} s, List {counts[name]} in "
            f"{med * 1000:8.1f} ms (median of {reps})")
    return res


def remove_list_phase(clients: dict[str, Client], n: int) -> None:
    for c in clients.values():
        for j in range(n):
            c.remove(f"l{j}")


def start_peers(stack: contextlib.ExitStack, peers: list[str], log_level: str,
                log: Callable[[str], None]) -> dict[str, tuple[Path, int]]:
    """Start the extra proxy snapshotters: plugin name -> (socket, pid to sample RSS of)."""
    out: dict[str, tuple[Path, int]] = {}
    for peer in peers:
        if peer == "grpcio":
            s = stack.enter_context(Snapshotter(log_level=log_level, tag="bench-gsnap",
                                                env={SERVER_ENV: "grpcio"}))
            out["nydus-grpcio"] = (s.socket, s.pid)
        elif peer == "stargz":
            sys.path.insert(0, str(REPO / "bench"))
            from lazy_pull import STARGZ_BIN, Stargz  # the Go proxy of the lazy-pull bench

            if not STARGZ_BIN.exists():
                log(f"stargz peer skipped: {STARGZ_BIN} not built (bench/stargz/build.sh)")
                continue
            sg = stack.enter_context(Stargz(plain_http=[]))
            out["stargz"] = (sg.socket, sg.proc.pid if sg.proc and sg.proc.popen else 0)
        elif peer.startswith("base="):
            # another pynydus tree (its src/ directory) as plugin nydus-base: before/after
            # a change in one containerd, interleaved
            s = stack.enter_context(Snapshotter(log_level=log_level, tag="bench-bsnap",
                                                env={"PYTHONPATH": peer[len("base="):]}))
            out["nydus-base"] = (s.socket, s.pid)
        elif peer == "nydus-snapshotter":
            ns = stack.enter_context(UpstreamNydus(log_level))
            out["nydus-go"] = (ns.socket, ns.proc.pid if ns.proc and ns.proc.popen else 0)
        else:
            raise SystemExit(f"--peers: unknown peer {peer!r} (grpcio, stargz, nydus-snapshotter, "
                             "base=SRC)")
    return out


class UpstreamNydus:
    """Upstream's Go snapshotter, ``containerd-nydus-grpc`` (the ``nydus-snapshotter`` peer
    of ``scripts/peers.sh``), with upstream's daemon ``nydusd`` (the ``nydus-rs`` peer):
    the same program we reimplement, as a proxy plugin ``nydus-go``. For plain snapshots
    it never starts a daemon; the system controller, metrics and cgroups are off."""

    def __init__(self, log_level: str) -> None:
        from tests.harness.peers import peer_bin
        from tests.harness.util import make_workdir

        self.bin = peer_bin("nydus-snapshotter", "containerd-nydus-grpc")
        self.nydusd = peer_bin("nydus-rs", "nydusd")
        self.workdir = make_workdir("bench-gonydus")
        self.root = self.workdir / "root"
        self.socket = self.workdir / "s.sock"
        self.log_level = "warn" if log_level == "warning" else log_level
        self.proc: Proc | None = None

    def __enter__(self) -> Self:
        daemon_cfg = self.workdir / "nydusd.json"
        daemon_cfg.write_text(json.dumps({
            "device": {"backend": {"type": "registry", "config": {}},
                       "cache": {"type": "blobcache", "config": {"work_dir": "cache"}}},
            "mode": "direct", "digest_validate": False, "enable_xattr": True}))
        config = self.workdir / "config.toml"
        config.write_text(
            f'version = 1\nroot = "{self.root}"\naddress = "{self.socket}"\n'
            'daemon_mode = "dedicated"\n'
            "[system]\nenable = false\n"
            f'[daemon]\nnydusd_path = "{self.nydusd}"\nnydusd_config = "{daemon_cfg}"\n'
            'fs_driver = "fusedev"\nrecover_policy = "restart"\n'
            "[cgroup]\nenable = false\n"
            f'[log]\nlog_to_stdout = true\nlevel = "{self.log_level}"\n'
            '[metrics]\naddress = ""\n')
        self.proc = Proc("nydus-go", [str(self.bin), "--config", str(config)],
                         self.workdir, self.workdir / "nydus-go.log")
        self.proc.start()

        def up() -> bool:
            if self.proc is not None and not self.proc.running():
                raise HarnessError(f"containerd-nydus-grpc exited:\n{self.proc.log_tail()}")
            return self.socket.exists()

        wait_until(up, 30, "containerd-nydus-grpc socket")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=20)
        unmount_under(self.workdir)
        remove_tree(self.workdir)


def machine(containerd_bin: str = "containerd") -> str:
    ctrd = subprocess.run([containerd_bin, "--version"], capture_output=True, text=True,
                          check=False).stdout
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = "?"
    return (f"{platform.node()}: Linux {platform.release()}, {os.cpu_count()} CPUs, "
            f"containerd {ctrd.split()[2] if ctrd else '?'}, Python {platform.python_version()}, "
            f"pynydus {commit}")


def iterate_alternating(names: list[str], i: int) -> Iterator[str]:
    """The targets in a rotated order: each one comes first, second, ... equally often."""
    k = i % len(names)
    return iter(names[k:] + names[:k])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 20 iterations, List over 100 snapshots")
    ap.add_argument("--iterations", type=int, default=None, help="measured iterations (500)")
    ap.add_argument("--warmup", type=int, default=None, help="unrecorded iterations first (20)")
    ap.add_argument("--list-count", type=int, default=None,
                    help="snapshots per snapshotter for the List phase (10000)")
    ap.add_argument("--list-reps", type=int, default=3)
    ap.add_argument("--no-direct", action="store_true",
                    help="skip the direct-to-socket measurements of pynydus")
    ap.add_argument("--peers", default="",
                    help="comma list of further proxy snapshotters measured in the same run: "
                         "grpcio (pynydus on grpcio's server, plugin nydus-grpcio), stargz "
                         "(the Go stargz snapshotter built by bench/stargz/build.sh), "
                         "nydus-snapshotter (upstream's containerd-nydus-grpc, plugin "
                         "nydus-go; scripts/peers.sh nydus-snapshotter nydus-rs), base=SRC "
                         "(pynydus from another tree's src/ directory, plugin nydus-base)")
    ap.add_argument("--containerd", choices=VERSIONS, default="1.6",
                    help="containerd to proxy through: Debian's 1.6 or the containerd2 peer "
                         "(scripts/peers.sh containerd2)")
    ap.add_argument("--snapshotter-log-level", default="info")
    ap.add_argument("--json", type=Path, default=None, help="write all figures here")
    a = ap.parse_args()
    iters = a.iterations or (20 if a.quick else 500)
    warm = a.warmup if a.warmup is not None else (3 if a.quick else 20)
    list_n = a.list_count if a.list_count is not None else (100 if a.quick else 10000)
    if os.geteuid() != 0:
        print("snapshotter_ops: needs root (containerd, overlay mounts)", file=sys.stderr)
        return 1
    # SIGTERM (e.g. a test's timeout) unwinds the context managers: nothing is left running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cmd = "bench/snapshotter_ops.py " + " ".join(sys.argv[1:])
    result: dict[str, object] = {"command": cmd.strip(),
                                 "machine": machine(binaries(a.containerd)[0]),
                                 "iterations": iters, "warmup": warm, "list_count": list_n,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # "direct" gets its own snapshotter instance: containerd's garbage collector removes
    # every backend snapshot its metadata does not know, so it would delete ours.
    peers = [p for p in a.peers.split(",") if p]
    with contextlib.ExitStack() as stack:
        snap = stack.enter_context(Snapshotter(log_level=a.snapshotter_log_level, tag="bench-snap"))
        direct_snap = stack.enter_context(
            Snapshotter(log_level=a.snapshotter_log_level, tag="bench-dsnap"))
        peer_sockets = start_peers(stack, peers, a.snapshotter_log_level, log)
        # the peers as containerd has the "nydus" plugin (2.x: with the exports that let it
        # pass remote-snapshot annotations), so that no target is set apart by its config
        exports = ("" if a.containerd == "1.6" else
                   '  [proxy_plugins.{}.exports]\n    enable_remote_snapshot_annotations = "true"\n')
        peer_toml = "".join(f'\n[proxy_plugins.{name}]\n  type = "snapshot"\n'
                            f'  address = "{sock}"\n' + exports.format(name)
                            for name, (sock, _) in peer_sockets.items())
        ctrd = stack.enter_context(Containerd(snap.socket, log_level="warn", version=a.containerd,
                                              extra_toml=GC_TOML + peer_toml, tag="bench-ctrd"))
        mem: dict[str, dict[str, int]] = {"fresh": settle(snap, 1.0)}
        peer_mem = {name: {"fresh": rss(pid)} for name, (_, pid) in peer_sockets.items() if pid}
        ch = grpc.insecure_channel(f"unix://{ctrd.socket}")
        direct_ch = grpc.insecure_channel(f"unix://{direct_snap.socket}")
        clients = {OVERLAY: Client(ch, OVERLAY, ctrd.namespace),
                   NYDUS: Client(ch, NYDUS, ctrd.namespace)}
        for name in peer_sockets:
            ctrd.wait_snapshotter(name)
            clients[name] = Client(ch, name, ctrd.namespace)
        if not a.no_direct:
            clients["nydus-direct"] = Client(direct_ch, "", None)
            if "nydus-go" in peer_sockets:
                # upstream's own socket, straight: what its server costs without containerd
                go_direct = stack.enter_context(UpstreamNydus(a.snapshotter_log_level))
                go_ch = grpc.insecure_channel(f"unix://{go_direct.socket}")
                stack.callback(go_ch.close)
                clients[GO_DIRECT] = Client(go_ch, "", None)
        names = list(clients)
        tops = {n: base_chain(c, "bench") for n, c in clients.items()}
        samples = {n: Samples() for n in names}
        log(f"operations: {warm} warm-up + {iters} measured iterations x {len(names)} targets")
        t0 = time.monotonic()
        for i in range(warm + iters):
            for n in iterate_alternating(names, i):
                try:
                    one_iteration(clients[n], samples[n], tops[n], i, record=i >= warm)
                except grpc.RpcError as err:
                    raise SystemExit(f"{n}: iteration {i}: {err.code()}: {err.details()}") from err
        log(f"  done in {time.monotonic() - t0:.1f} s")
        mem["after_ops"] = settle(snap, 2.0)

        log(f"List over {list_n} snapshots per snapshotter:")
        lists = list_phase(clients, list_n, tops, a.list_reps, log)
        mem["with_list_snapshots"] = settle(snap, 1.0)
        log("removing them (containerd's GC then removes them from the backends) ...")
        t0 = time.perf_counter()
        remove_list_phase(clients, list_n)
        removed = time.perf_counter()
        # The proxy is clean once containerd's GC has called Remove for each of them.
        # containerd 1.6's GC scheduler ignores deletions that happen while a collection
        # runs (and a collection over a proxy takes a while), so it may stop half way until
        # the next deletion: kick it with a scratch Prepare+Remove while we wait.
        kick = 0

        def drained() -> bool:
            nonlocal kick
            if len(snap.list_names()) <= 3:
                return True
            kick += 1
            clients[NYDUS].prepare(f"gc-kick-{kick}")
            clients[NYDUS].remove(f"gc-kick-{kick}")
            return False

        try:
            wait_until(drained, 600, "containerd GC to drain", interval=1.0)
            drained = time.perf_counter()
            lists["gc"] = {"remove_calls_s": removed - t0, "gc_drain_s": drained - removed}
            log(f"  {len(clients)} x {list_n} Remove calls in {removed - t0:.1f} s; containerd's"
                f" GC emptied the pynydus backend {drained - removed:.1f} s later")
        except Exception as err:  # noqa: BLE001 - report, do not fail the figures
            log(f"  warning: {err}")
        mem["idle_after_run"] = settle(snap, 3.0)
        for name, (_, pid) in peer_sockets.items():
            if pid:
                peer_mem[name]["idle_after_run"] = rss(pid)
        ch.close()
        direct_ch.close()

    stats = {n: {op: {"p50_ms": pct(xs, 0.5) * 1e3, "p95_ms": pct(xs, 0.95) * 1e3,
                      "n": len(xs)} for op, xs in samples[n].by_op.items()} for n in names}
    result.update({"ops": stats, "list": lists, "rss_kib": mem, "peers": list(peer_sockets),
                   "peer_rss_kib": peer_mem})
    print(render(result, direct=not a.no_direct))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


def render(r: dict, direct: bool) -> str:  # type: ignore[type-arg]
    ops, lists, mem, peers = r["ops"], r["list"], r["rss_kib"], r.get("peers", [])
    go_direct = GO_DIRECT in ops
    ratio_peers = [p for p in ("nydus-go", "nydus-base") if p in peers]
    lines = [f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ",
             (f"Run: {r['started']}, {r['iterations']} measured iterations "
              f"(+{r['warmup']} warm-up) per snapshotter, order rotating"), "",
             ("| op | overlayfs p50 ms | overlayfs p95 ms | nydus p50 ms | nydus p95 ms "
              "| ratio p50 nydus/overlayfs | ratio p95 |"
              + (" nydus direct p50 ms | direct p95 ms |" if direct else "")
              + (" nydus-go direct p50 ms | direct p95 ms |" if go_direct else "")
              + "".join(f" {p} p50 ms | ratio p50 {p}/overlayfs |" for p in peers)
              + "".join(f" **ratio p50 nydus/{p}** |" for p in ratio_peers)),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if direct else "")
             + ("---:|---:|" if go_direct else "")
             + "---:|---:|" * len(peers) + "---:|" * len(ratio_peers)]
    for op in OPS:
        o, y = ops[OVERLAY][op], ops[NYDUS][op]
        row = (f"| {op} | {o['p50_ms']:.3f} | {o['p95_ms']:.3f} | {y['p50_ms']:.3f} | "
               f"{y['p95_ms']:.3f} | {y['p50_ms'] / o['p50_ms']:.2f}x | "
               f"{y['p95_ms'] / o['p95_ms']:.2f}x |")
        if direct:
            d = ops["nydus-direct"][op]
            row += f" {d['p50_ms']:.3f} | {d['p95_ms']:.3f} |"
        if go_direct:
            d = ops[GO_DIRECT][op]
            row += f" {d['p50_ms']:.3f} | {d['p95_ms']:.3f} |"
        for p in peers:
            row += f" {ops[p][op]['p50_ms']:.3f} | {ops[p][op]['p50_ms'] / o['p50_ms']:.2f}x |"
        for p in ratio_peers:
            row += f" **{y['p50_ms'] / ops[p][op]['p50_ms']:.2f}x** |"
        lines.append(row)
    n = r["list_count"]
    lines += ["", (f"List over {n} active snapshots (median of the List calls; creation is "
                   f"{n} sequential Prepare calls):"), "",
              "| target | create s | List ms | listed | ratio List vs overlayfs |",
              "|---|---:|---:|---:|---:|"]
    for name, v in lists.items():
        if name == "gc":
            continue
        ratio = v["list_s"] / lists[OVERLAY]["list_s"]
        lines.append(f"| {name} | {v['create_s']:.1f} | {v['list_s'] * 1000:.1f} | "
                     f"{v['listed']} | {ratio:.2f}x |")
    if "gc" in lists:
        lines += ["", (f"Removing them: {lists['gc']['remove_calls_s']:.1f} s of Remove calls "
                       "through containerd (its database only); containerd's garbage collector "
                       f"then emptied the pynydus backend in {lists['gc']['gc_drain_s']:.1f} s.")]
    lines += ["", "pynydus snapshotter memory (KiB): "
              + ", ".join(f"{k} VmRSS {v['VmRSS']}" for k, v in mem.items())
              + f"; peak VmHWM {max(v['VmHWM'] for v in mem.values())}"]
    for p, pm in r.get("peer_rss_kib", {}).items():
        lines.append(f"{p} memory (KiB): " + ", ".join(f"{k} VmRSS {v['VmRSS']}" for k, v in pm.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
