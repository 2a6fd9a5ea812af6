#!/usr/bin/env python3
"""Lazy pull end to end: time from the start of the pull to the end of the container's
startup command, for the same image pulled several ways, all in one run:

  overlayfs  ``ctr images pull --plain-http REF:oci`` (fetch + unpack every layer), then
             ``ctr run --rm REF`` with containerd's own overlayfs snapshotter: the baseline;
  stargz     ``ctr-remote images rpull --plain-http REF:esgz`` (manifest + TOCs, layers
             become FUSE mounts), then ``ctr run --rm --snapshotter stargz``: the peer
             (bench/stargz: containerd-stargz-grpc built from Debian's Go sources);
  nydus      ``ctr-remote images rpull --plain-http --snapshotter nydus REF:nydus`` (only
             the bootstrap layer is downloaded), then ``ctr run --rm --snapshotter nydus``:
             our snapshotter starts pynydusd, which fetches chunks on demand.
             ``--nydus-pull cri`` pulls through containerd's CRI ImageService instead.
             ``nydus-shared``: the same with one shared pynydusd (images API-mounted);
  tarfs      the OCI image itself through our snapshotter with ``fs_driver = "blockdev"``
             (docs/tarfs.md): the pull (``ctr-remote images rpull``, or the CRI) skips
             every layer, the snapshotter downloads each blob once, decoded to its tar
             as it arrives, and the container runs on kernel EROFS mounts of the tars.
             Not in the default ``--modes``: ``--modes overlayfs,tarfs``. Held against
             overlayfs (targets: many-files >= 2x faster, large no slower).
             ``tarfs-nowarm``: the same with ``warm_metadata = false`` (each layer
             mounted at the container's Prepare, its metadata not looked up before: the
             driver before 8 Dec 2026).
  blobfile   the nydus mode with ``fs_driver = "blobfile"``: the container's image is the
             kernel's EROFS mount of the bootstrap over pynydusd's blob files (on request,
             ``--modes nydus,blobfile``);
  zran       the nydus mode on ``REF:zran`` (``pynydus convert --oci-ref``: only the
             bootstraps were pushed; pynydusd reads the OCI layers themselves); on request
             (``--modes ...,zran``), held against nydus (target <= 1.2x pull+run);
             ``--b-src`` runs mode ``zran-b``'s pynydusd from another source tree (a
             daemon change against its baseline in the same run);
  detected   the OCI reference ``REF:oci`` pulled through the CRI by our snapshotter with
             ``experimental.enable_referrer_detect``: it finds ``REF:nydus-ref`` (``pynydus
             convert --with-referrer``, whose subject is ``REF:oci``) and serves the image
             lazily from it (on request; needs ``--nydus-pull cri``). Held against the
             nydus mode on that Nydus manifest pulled by its own tag (``--nydus-tag
             nydus-ref``): target not slower;
  upstream   the peer: the same pull and run of the same Nydus image through upstream's
             ``containerd-nydus-grpc`` with upstream's ``nydusd`` (``upstream-shared``:
             its shared mode), from ``scripts/peers.sh``, with the daemon template ours
             uses (same ``amplify_io``, no prefetch). Each of our modes is held against
             upstream's in the same daemon mode (``ours / peer``, target <= 1.0).
             ``upstream-pf``: upstream with its own prefetch (``fs_prefetch`` on) of the
             large image converted with the start-up's files as ``--prefetch-files``
             (tag ``nydus-pf``; the other images have none: their plain Nydus form);
  nydus-list our snapshotter on a copy of the Nydus image with a prefetch list learned
             from one run of it (issue 17); ``nydus-stale``: a copy whose list was learned
             from another start-up (``STALE_CMD``: the app changed), held against nydus
             (target: not slower). With ``--floor`` the large image's 100 Mbit/s floor is
             computed (bytes the start-up needs / bandwidth + the bootstrap pull +
             overlayfs's run, everything local) and overlayfs runs on loopback only.

Each repetition is cold: a new containerd (empty content store and snapshots), a new
snapshotter process with an empty root and cache, and the page cache dropped
(``sync; echo 3 > /proc/sys/vm/drop_caches``, the whole machine's) right before the
pull. Modes alternate inside a repetition, each going first in turn (the order rotates
between repetitions), so they share the machine's conditions.

Networks: ``loopback`` (registry on 127.0.0.1, no shaping) and ``100mbit``: the same
registry behind a throttling TCP proxy of this script (127.0.0.1, a token bucket of
100 Mbit/s per direction shared by all connections, as one link would be). A proxy,
not ``tc`` on ``lo``: a root qdisc on ``lo`` would sit in every other loopback user's
path on this shared machine.

Reported per network and image (medians of n): pull, run and pull+run seconds,
pull+run of overlayfs divided by each mode's (``x faster``), bytes the registry sent
(its access log: every GET's response bytes, split pull/run), and the bytes the
startup command reads: the large image's app reports the whole-file sizes of what it
mapped, imported and read; for the busybox images it is busybox plus the files the
command reads. For nydus also pynydusd's own counters (FUSE bytes read, chunks
fetched) and a time breakdown from the snapshotter's and the daemon's logs.

    bench/lazy_pull.py                      # full: large, many-files, small; n=3; both networks
    bench/lazy_pull.py --quick              # smoke: small image, n=1, both networks
    bench/lazy_pull.py -n 5 --images large --networks loopback --json out.json

Images come from ``bench/lazy_images.py`` (built on first use). Everything lives under
/var/tmp/pynydus-bench (``PYNYDUS_BENCH_DIR``) and /var/tmp/pyn-lz*; every process
started here is stopped by PID, mounts below our directories are unmounted.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import lazy_images

from pynydus.manager.client import DaemonClient
from pynydus.manager.daemonconfig import DEFAULT_TEMPLATE
from tests.harness.containerd import Containerd
from tests.harness.cri import CriImages
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.upstream_snapshotter import UpstreamSnapshotter
from tests.harness.util import Proc, make_workdir, remove_tree, unmount_under, wait_until

CTR = "/usr/bin/ctr"
CTR_REMOTE = shutil.which("ctr-remote") or "/usr/bin/ctr-remote"
STARGZ_BIN = lazy_images.WORK / "bin" / "pynydus-stargz"
MODES = ("overlayfs", "stargz", "nydus", "nydus-shared", "upstream", "upstream-shared")
# tarfs runs when asked for (--modes); so does nydus-list: the nydus mode on a copy of the
# Nydus image (tag nydus-list: one annotation more, its own digest) for which a prefetch
# list was learned first (one run of it through our snapshotter, then the list of its
# daemon's trace pushed beside it, as `pynydus optimize --node-root --push` does); the
# snapshotter finds the list at mount and pynydusd prefetches in its order
ALL_MODES = (*MODES, "tarfs", "tarfs-nowarm", "nydus-list", "nydus-stale", "upstream-pf",
             "zran", "zran-b",  # zran: REF:zran (convert --oci-ref); zran-b: --zran-b-tag
             "detected",  # REF:oci served from its Nydus referrer (referrer detection)
             "blobfile")  # the nydus mode with fs_driver blobfile (kernel EROFS over blob files)
LIST_TAG = "nydus-list"
STALE_TAG = "nydus-stale"
# nydus-stale's list is learned from this start-up instead of the image's Cmd: for large
# another python app (other modules, 300 documents it reads), for the busybox images a
# read of other files
STALE_CMD = {
    "large": ("python3 -c 'import email.parser, http.client, xml.dom.minidom, decimal, "
              "argparse, unittest' && cat /opt/docs/g0[0-2]/* > /dev/null"),
    "many-files": "cat /data/d001/* > /dev/null",
    "small": "ls -l /bin > /dev/null",
}
TAG = {"overlayfs": "oci", "stargz": "esgz", "nydus": "nydus", "nydus-shared": "nydus",
       "upstream": "nydus", "upstream-shared": "nydus", "tarfs": "oci", "tarfs-nowarm": "oci",
       "nydus-list": LIST_TAG,
       "nydus-stale": STALE_TAG, "upstream-pf": "nydus-pf", "zran": "zran",
       "zran-b": "zran", "detected": "oci", "blobfile": "nydus"}
# containerd's name of the snapshotter each mode runs with (None: its own overlayfs)
SNAPSHOTTER = {"overlayfs": None, "stargz": "stargz", "nydus": "nydus", "nydus-shared": "nydus",
               "upstream": "nydus", "upstream-shared": "nydus", "tarfs": "nydus",
               "tarfs-nowarm": "nydus",
               "nydus-list": "nydus", "nydus-stale": "nydus", "upstream-pf": "nydus",
               "zran": "nydus", "zran-b": "nydus", "detected": "nydus", "blobfile": "nydus"}
# nydus: the snapshotter's default daemon_mode (dedicated: one pynydusd per image,
# started at the container's Prepare); nydus-shared: one pynydusd started with the
# snapshotter, each image an API mount in it (upstream's shared mode)
DAEMON_MODE = {"nydus": None, "nydus-shared": "shared", "nydus-list": None, "nydus-stale": None,
               "zran": None, "zran-b": None, "detected": None, "blobfile": None}
# daemon.fs_driver of the modes that do not run the default (fusedev)
FS_DRIVER = {"blobfile": "blobfile"}
# the peer: upstream's containerd-nydus-grpc with upstream's nydusd (scripts/peers.sh
# nydus-snapshotter nydus-rs), in each daemon mode, on the same Nydus image, with the
# daemon template ours uses (same amplify_io, no prefetch; plain HTTP)
UPSTREAM_MODE = {"upstream": "dedicated", "upstream-shared": "shared", "upstream-pf": "dedicated"}
# which upstream mode each of ours is held against
VS_UPSTREAM = {"nydus": "upstream", "nydus-shared": "upstream-shared"}
NYDUS_MODES = (*DAEMON_MODE, *UPSTREAM_MODE)  # modes that pull the Nydus image
LABELLED_PULL = (*NYDUS_MODES, "tarfs", "tarfs-nowarm")  # pulled with the layer labels (rpull or the CRI)
# tarfs against overlayfs's pull + unpack + run: (image, at least this many times faster)
TARFS_TARGETS = (("many-files", 2.0), ("large", 1.0))
TARFS_CONFIG = ('version = 1\n[daemon]\nfs_driver = "blockdev"\n[experimental.tarfs]\n'
                "enable_tarfs = true\nmount_tarfs_on_host = true\n")
TARGET_VS_UPSTREAM = 1.0
NETWORKS = ("loopback", "100mbit")
TARGET_X = 10.0
TARGET_ZRAN = 1.2  # zran pull+run / nydus pull+run (issue 16)
# issue 17: large on loopback with a list, s; at 100 Mbit/s, x the floor; bytes fetched
# with a list / bytes the start-up reads
TARGET_LIST_LOOPBACK = 0.6
TARGET_LIST_FLOOR = 1.3
TARGET_LIST_BYTES = 1.2

# 127.0.0.1 - - [27/Nov/2026:18:50:01 +0000] "GET /v2/x/blobs/sha256:.. HTTP/1.1" 200 1234 "" "ua"
_ACCESS = re.compile(r'"(?P<m>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+|-)')
_LOGTIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def say(msg: str) -> None:
    print(f"[lazy_pull {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def use_bytecode() -> None:
    """Let our snapshotter and pynydusd (children of this process) load compiled
    bytecode, as an installed pynydus does: a development shell often sets
    PYTHONDONTWRITEBYTECODE, and then every daemon start compiles pynydus from source
    (0.5 s+ of its start-up). The cache goes to a prefix directory outside the
    repository and is filled once here, before anything is timed."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(lazy_images.WORK / "pycache")
    import pynydus

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(pynydus.__file__).parent)],
                   check=True, timeout=300, stdout=subprocess.DEVNULL)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# --------------------------------------------------------------------- throttling proxy

class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` bytes ahead; shared by coroutines."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self.lock:  # FIFO: connections share the link in arrival order
            while True:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


async def _throttle_main(listen_port_file: str, upstream: str, mbit: float) -> None:
    host, port = upstream.rsplit(":", 1)
    rate = mbit * 1e6 / 8
    down, up = TokenBucket(rate, 64 << 10), TokenBucket(rate, 64 << 10)
    piece = 16 << 10  # ~1.3 ms of link time at 100 Mbit/s

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, bucket: TokenBucket) -> None:
        try:
            while data := await r.read(piece):
                await bucket.take(len(data))
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw, up), pipe(ur, cw, down))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    Path(listen_port_file).write_text(str(server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


class Throttle:
    """The proxy as a child process (its own interpreter: the benchmark driver's waits
    must not steal its time slices); ``host`` is what image references use."""

    def __init__(self, upstream: str, mbit: float) -> None:
        self.workdir = make_workdir("lzthr")
        self.upstream, self.mbit = upstream, mbit
        self.proc: Proc | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        port_file = self.workdir / "port"
        self.proc = Proc("throttle", [sys.executable, __file__, "_throttle", str(port_file),
                                      self.upstream, str(self.mbit)], self.workdir,
                         self.workdir / "throttle.log")
        self.proc.start()
        wait_until(lambda: port_file.exists() and port_file.read_text().strip() != "", 10,
                   "throttling proxy")
        self.port = int(port_file.read_text())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=5)
        remove_tree(self.workdir)


# --------------------------------------------------------------------- stargz peer

class Stargz:
    """Our stargz proxy snapshotter build, fresh root each time; SIGTERM unmounts its
    FUSE layers, and anything left below its directory is unmounted here."""

    def __init__(self, plain_http: list[str]) -> None:
        self.workdir = make_workdir("lzsgz")
        self.root = self.workdir / "root"
        self.socket = self.workdir / "s.sock"
        self.plain_http = plain_http
        self.proc: Proc | None = None

    def __enter__(self) -> Self:
        self.proc = Proc("stargz", [str(STARGZ_BIN), "-address", str(self.socket), "-root",
                                    str(self.root), "-plain-http", ",".join(self.plain_http)],
                         self.workdir, self.workdir / "stargz.log")
        self.proc.start()
        wait_until(lambda: self.socket.exists(), 20, "stargz snapshotter socket")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=20)
        unmount_under(self.workdir)
        remove_tree(self.workdir)


def ensure_stargz(build: bool) -> str | None:
    """None when the stargz peer can run, else why not."""
    if not Path(CTR_REMOTE).exists():
        return "ctr-remote missing (Debian package stargz-snapshotter)"
    if STARGZ_BIN.exists():
        return None
    if not build:
        return f"{STARGZ_BIN} not built (bench/stargz/build.sh)"
    say("building the stargz peer (bench/stargz/build.sh, ~2 min cold)")
    r = subprocess.run([str(REPO / "bench/stargz/build.sh"), str(STARGZ_BIN.parent)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"bench/stargz/build.sh failed: {r.stderr.strip()[-400:]}"
    return None


# --------------------------------------------------------------------- one measurement

@dataclass
class Sample:
    network: str
    image: str
    mode: str
    rep: int
    pull_s: float
    run_s: float
    total_s: float
    fetched_pull: int  # bytes the registry sent during the pull
    fetched_run: int   # ... during the run
    requests_run: int
    workload_read: int  # bytes the startup command reads (whole files)
    fuse_read: int = 0  # nydus: bytes pynydusd served through FUSE
    chunks_fetched: int = 0
    backend_requests: int = 0
    load1: float = 0.0
    breakdown: dict[str, float] = field(default_factory=dict)
    # figures the command printed as ``bench:<key>=<seconds>`` (WALK_CMD)
    extra: dict[str, float] = field(default_factory=dict)


# --walk: instead of the image's Cmd, the mounted image's tree is walked twice (first,
# warm: lstat of every entry) and the image's data files are read whole twice, timed in the
# container. The large image has python3; the busybox images use busybox's time (10 ms).
_PY_WALK = """import os, time
def walk():
    for d, ds, fs in os.walk("/"):
        ds[:] = [x for x in ds if not os.path.ismount(os.path.join(d, x))]  # /proc, /sys
        for f in ds + fs:
            os.lstat(os.path.join(d, f))
def read():
    for d, ds, fs in os.walk("/opt"):
        for f in fs:
            with open(os.path.join(d, f), "rb") as h:
                while h.read(1 << 20):
                    pass
for k, fn in (("walk_first", walk), ("walk_warm", walk), ("read_first", read), ("read_warm", read)):
    t = time.monotonic()
    fn()
    print("bench:%s=%.4f" % (k, time.monotonic() - t))
"""
_BB_WALK = ("t() { (time sh -c \"$1 >/dev/null 2>&1\") 2>&1 | "
            "awk '/^real/{sub(\"m\",\" \"); gsub(\"s\",\"\"); print $2*60+$3}'; }; "
            "for k in walk_first walk_warm; do echo bench:$k=$(t 'find / -xdev | wc -l'); done; "
            "for k in read_first read_warm; do "
            "echo bench:$k=$(t 'find {data} -type f | xargs cat | wc -c'); done")
# the files read: the large image's /opt (40 shards of 10 MiB, 2,000 documents of ~100 KB),
# many-files' 50,000 files, small's app
WALK_ARGV = {"large": ["python3", "-c", _PY_WALK],
             "many-files": ["/bin/sh", "-c", _BB_WALK.replace("{data}", "/data")],
             "small": ["/bin/sh", "-c", _BB_WALK.replace("{data}", "/app")]}


def access_bytes(log: Path, start: int, end: int) -> tuple[int, int, int]:
    """(end, response bytes of successful GETs logged in [start, end), their count)."""
    with open(log, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    total = n = 0
    for line in data.decode(errors="replace").splitlines():
        m = _ACCESS.search(line)
        if m and m["m"] == "GET" and m["status"].startswith("2") and m["bytes"] != "-":
            total += int(m["bytes"])
            n += 1
    return end, total, n


def settle_log(log: Path, quiet: float = 0.15, limit: float = 2.0) -> int:
    """The registry writes an access-log line after the response; wait until the log
    stops growing for ``quiet`` seconds so a phase's last requests are counted in it."""
    deadline = time.monotonic() + limit
    size = log.stat().st_size
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = log.stat().st_size
        if now == size:
            break
        size = now
    return size


def _logtime(line: str) -> float | None:
    m = _LOGTIME.match(line)
    if not m:
        return None
    return time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000


def nydus_breakdown(snap: Snapshotter, t_pull: float, t_run: float, t_end: float) -> dict[str, float]:
    """Where the nydus time went, from log timestamps (wall clock, ms resolution).

    ``pull``; ``run_to_spawn`` (ctr run until the snapshotter starts a dedicated
    daemon) and ``spawn_to_serving`` (interpreter start, imports, bootstrap, FUSE
    mount); ``run_to_mounted`` for an API mount into a shared daemon; then
    ``ready_to_first_fetch`` (runc creates the container, the command starts),
    ``fetch_span`` (first to last chunk request) and ``last_fetch_to_end``."""
    def stamps(path: Path, needle: str) -> list[float]:
        out = []
        for line in path.read_text(errors="replace").splitlines():
            if needle in line:
                t = _logtime(line)
                if t is not None and t >= t_pull - 0.001:
                    out.append(t)
        return out

    dlogs = sorted((snap.root / "logs").rglob("*.log")) if (snap.root / "logs").is_dir() else []
    # only a daemon started for an image has --bootstrap (a standby daemon refilled
    # after an image took the previous one has none)
    spawn = [t for line in snap.log.read_text(errors="replace").splitlines()
             if "starting daemon" in line and "--bootstrap" in line
             and (t := _logtime(line)) is not None and t >= t_pull - 0.001]
    serving = [t for d in dlogs for t in stamps(d, " serving ")]
    mounted = [t for d in dlogs for t in stamps(d, "INFO pynydusd: mounted ")]
    fetches = sorted(t for d in dlogs for t in stamps(d, "HTTP Request: GET"))
    out = {"pull": t_run - t_pull}
    prep = container_prepare(snap.log, t_run)
    if prep is not None:
        out.update(run_to_prepare=prep[0] - t_run, prepare=prep[1] - prep[0],
                   prepared_to_end=t_end - prep[1])
    ready = None
    if spawn:
        out["run_to_spawn"] = spawn[0] - t_run
        if serving:
            out["spawn_to_serving"] = serving[0] - spawn[0]
            ready = serving[0]
    elif mounted:
        out["run_to_mounted"] = mounted[0] - t_run
        ready = mounted[0]
    if ready is not None and fetches:
        out["ready_to_first_fetch"] = fetches[0] - ready
        out["fetch_span"] = fetches[-1] - fetches[0]
        out["last_fetch_to_end"] = t_end - fetches[-1]
    elif ready is not None:
        out["ready_to_end"] = t_end - ready
    return {k: round(v, 3) for k, v in out.items()}


_GO_TIME = re.compile(r'time="(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z"')
_OUR_PREPARE = re.compile(r"pynydus\.snapshot\.service: Prepare took ([0-9.]+) ms")


def _go_logtime(line: str) -> float | None:
    m = _GO_TIME.search(line)
    if not m:
        return None
    return calendar.timegm(time.strptime(m[1], "%Y-%m-%dT%H:%M:%S")) + float(m[2] or 0)


def container_prepare(log: Path, t_run: float) -> tuple[float, float] | None:
    """(start, end) wall-clock of the container's Prepare in a snapshotter's log (the
    last Prepare after ``ctr run`` began: the pull's are over by then), ours or
    upstream's; None without debug lines."""
    found = None
    text = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(text):
        m = _OUR_PREPARE.search(line)
        if m:  # ours: one debug line when the call ends, with its duration
            t = _logtime(line)
            if t is not None and t >= t_run - 0.001:
                found = (t - float(m[1]) / 1e3, t)
        elif "[Prepare] snapshot with key" in line:  # upstream: a line as the call starts
            t = _go_logtime(line)
            if t is None or t < t_run - 0.001:
                continue
            # it ends after its mounts are computed ("overlayfs mount options", debug)
            for later in text[i + 1:]:
                if "mount options" in later or "bind mount on" in later:
                    end = _go_logtime(later)
                    if end is not None:
                        found = (t, end)
                    break
    return found


def upstream_breakdown(up: UpstreamSnapshotter, t_pull: float, t_run: float,
                       t_end: float) -> dict[str, float]:
    """The split that both snapshotters' logs give alike: ``pull``, ``run_to_prepare``
    (ctr run until the container's Prepare reaches the snapshotter), ``prepare`` (the
    call: the image's daemon started or found, mounts computed) and ``prepared_to_end``
    (containerd's Mounts, runc, the command's reads through FUSE, exit)."""
    out = {"pull": t_run - t_pull}
    prep = container_prepare(up.log, t_run)
    if prep is not None:
        out.update(run_to_prepare=prep[0] - t_run, prepare=prep[1] - prep[0],
                   prepared_to_end=t_end - prep[1])
    return {k: round(v, 3) for k, v in out.items()}


def nydus_counters(snap: Snapshotter | UpstreamSnapshotter) -> tuple[int, int, int]:
    """(FUSE bytes read, chunks fetched, backend requests) over the snapshotter's live
    daemons, from their nydusd-compatible metrics API."""
    fuse = chunks = requests = 0
    for sock in (snap.root / "socket").glob("*/*.sock"):
        c = DaemonClient(str(sock), timeout=5)
        with contextlib.suppress(Exception):
            fuse += int(c._request("GET", "/api/v1/metrics")["data_read"])
            chunks += int(c._request("GET", "/api/v1/metrics/blobcache")["total"]) - int(
                c._request("GET", "/api/v1/metrics/blobcache")["whole_hits"])
            requests += int(c._request("GET", "/api/v1/metrics/backend")["read_count"])
    return fuse, chunks, requests


PYSPY = Path(sys.executable).parent / "py-spy"


def snapshotter_config(out: Path, profile: bool, amplify_io: int | None,
                       daemon_mode: str | None, prefetch: bool = False,
                       fs_driver: str | None = None, daemon_src: Path | None = None,
                       detect: bool = False) -> Path | None:
    """A snapshotter config for this run, or None for the defaults. ``profile``: the
    ``daemon.nydusd_path`` runs pynydusd under py-spy (raw collapsed stacks in ``out``,
    written when the daemon exits); ``amplify_io``: a daemon template (the built-in one
    with that ``amplify_io``) as ``daemon.nydusd_config``; ``daemon_mode``: dedicated
    (one pynydusd per image, started at the container's Prepare) or shared (one
    pynydusd started with the snapshotter, images mounted through its API); ``prefetch``:
    the template turns ``fs_prefetch`` on (the bootstrap's prefetch table is fetched by
    worker threads at mount); ``fs_driver``: ``daemon.fs_driver`` if not the default;
    ``daemon_src``: pynydusd runs from this source tree (``--b-src``); ``detect``:
    referrer detection on."""
    if not profile and amplify_io is None and daemon_mode is None and not prefetch \
            and fs_driver is None and daemon_src is None and not detect:
        return None
    out.mkdir(parents=True, exist_ok=True)
    lines = ["version = 1"]
    if daemon_mode is not None:
        lines.append(f'daemon_mode = "{daemon_mode}"')
    lines.append("[daemon]")
    if fs_driver is not None:
        lines.append(f'fs_driver = "{fs_driver}"')
    if profile:
        wrapper = out / "pynydusd-pyspy"
        pynydusd = Path(sys.executable).parent / "pynydusd"
        wrapper.write_text(f"""#!/bin/sh
exec {PYSPY} record --nonblocking -r 250 -f raw -o {out}/daemon-$$.txt -- {pynydusd} "$@"
""")
        wrapper.chmod(0o755)
        lines.append(f'nydusd_path = "{wrapper}"')
    elif daemon_src is not None:
        # a script as the venv's pynydusd is: its path stays in the command line, so
        # the daemon template forks these daemons as it forks ours
        wrapper = out / "pynydusd-b"
        wrapper.write_text(f"""#!{sys.executable}
import sys
sys.path.insert(0, {str(daemon_src)!r})
from pynydus.daemon.main import main
sys.exit(main())
""")
        wrapper.chmod(0o755)
        lines.append(f'nydusd_path = "{wrapper}"')
    if amplify_io is not None or prefetch:
        template = json.loads(json.dumps(DEFAULT_TEMPLATE))
        if amplify_io is not None:
            template["amplify_io"] = amplify_io
        if prefetch:
            template["fs_prefetch"]["enable"] = True
        (out / "nydusd-config.json").write_text(json.dumps(template, indent=1))
        lines.append(f'nydusd_config = "{out / "nydusd-config.json"}"')
    if detect:
        lines += ["[experimental]", "enable_referrer_detect = true"]
    cfg = out / "snapshotter.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


@contextlib.contextmanager
def peer(mode: str, plain_http: list[str], profile: Path | None = None,
         amplify_io: int | None = None,
         prefetch: bool = False, keep_logs: bool = False,
         b_src: Path | None = None) -> Iterator[Snapshotter | Stargz | None]:
    if mode in DAEMON_MODE:
        cfg_dir = profile or make_workdir("lzcfg")
        try:
            cfg = snapshotter_config(cfg_dir, profile is not None, amplify_io, DAEMON_MODE[mode],
                                     prefetch, FS_DRIVER.get(mode),
                                     b_src if mode == "zran-b" else None, mode == "detected")
            # info as on a node; debug when the logs are kept (the breakdown needs the
            # daemons' per-request lines)
            level = "debug" if keep_logs or profile is not None else "info"
            with Snapshotter(tag="lzsnap", log_level=level, config=cfg) as snap:
                if profile is None:  # under py-spy a daemon's start is several times slower
                    wait_daemons_ready(snap, timeout=60)
                    yield snap
                    return
                # the snapshotter's own samples too (Prepare, Commit, mounts into daemons)
                spy = subprocess.Popen([str(PYSPY), "record", "--nonblocking", "-r", "250",
                                        "-f", "raw", "-o", str(profile / f"snapshotter-{snap.pid}.txt"),
                                        "--pid", str(snap.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    yield snap
                finally:
                    spy.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        spy.wait(timeout=20)
                    if spy.poll() is None:
                        spy.kill()
                        spy.wait()
                # let py-spy see the daemons exit and write their profiles
                for sock in (snap.root / "socket").glob("*/*.sock"):
                    with contextlib.suppress(Exception):
                        DaemonClient(str(sock), timeout=5)._request("PUT", "/api/v1/daemon/exit")
                time.sleep(3)
        finally:
            if profile is None:
                remove_tree(cfg_dir)
    elif mode in UPSTREAM_MODE:
        template = json.loads(json.dumps(DEFAULT_TEMPLATE))
        template["device"]["backend"]["config"]["scheme"] = "http"
        if amplify_io is not None:
            template["amplify_io"] = amplify_io
        if prefetch or mode == "upstream-pf":
            template["fs_prefetch"]["enable"] = True
        with UpstreamSnapshotter(daemon="nydusd", daemon_mode=UPSTREAM_MODE[mode],
                                 template=template, tag="lzups",
                                 log_level="debug" if keep_logs else "info") as up:
            if UPSTREAM_MODE[mode] == "shared":  # its shared daemon starts with it
                wait_upstream_ready(up, timeout=60)
            yield up
    elif mode in ("tarfs", "tarfs-nowarm"):
        cfg_dir = make_workdir("lzcfg")
        try:
            cfg = cfg_dir / "snapshotter.toml"
            cfg.write_text(TARFS_CONFIG + ("warm_metadata = false\n" if mode == "tarfs-nowarm"
                                           else ""))
            with Snapshotter(tag="lzsnap", log_level="debug" if keep_logs else "info",
                             config=cfg) as snap:
                yield snap
        finally:
            remove_tree(cfg_dir)
    elif mode == "stargz":
        with Stargz(plain_http) as sgz:
            yield sgz
    else:
        yield None


def wait_upstream_ready(up: UpstreamSnapshotter, timeout: float = 30.0) -> None:
    """Upstream's shared daemon answers RUNNING (as wait_daemons_ready, for the peer)."""
    def ready() -> bool:
        socks = list((up.root / "socket").glob("*/api.sock"))
        try:
            return bool(socks) and all(DaemonClient(str(s), timeout=2).state() == "RUNNING"
                                       for s in socks)
        except Exception:  # noqa: BLE001 - not up yet
            return False

    wait_until(ready, timeout, "upstream's shared nydusd")


def wait_daemons_ready(snap: Snapshotter, timeout: float = 30.0) -> None:
    """Wait until the daemons a snapshotter starts on its own (the shared daemon, or the
    standby daemon of dedicated mode) are RUNNING. On a node the snapshotter starts at
    boot, long before a pull; timing a pull that races its start-up would measure that
    race (and the page-cache drop would hit the daemon's imports mid-way)."""
    def ready() -> bool:
        try:
            socks = [r["api_socket"] for r in snap.daemon_records()
                     if r.get("mode") in ("standby", "shared")]
            return bool(socks) and all(DaemonClient(s, timeout=2).state() == "RUNNING"
                                       for s in socks)
        except Exception:  # noqa: BLE001 - not up yet (no record, socket, or answer)
            return False

    wait_until(ready, timeout, "the snapshotter's standby/shared daemon")


_CMD_OK = "lazy-pull-cmd-ok"


class RunFailed(RuntimeError):
    """The container did not print what its image's Cmd prints on success."""


def save_logs(snap: Snapshotter | UpstreamSnapshotter, dst: Path, w0: float, w1: float, w2: float) -> None:
    """The snapshotter's and its daemons' logs (each daemon's ``logs/<id>/nydusd.log`` as
    ``<id>-nydusd.log``: they share the name) and the run's wall-clock stamps."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    shutil.copy(snap.log, dst / "snapshotter.log")
    logs = snap.root / "logs"
    for f in logs.rglob("*"):
        if f.is_file():
            shutil.copy(f, dst / "-".join(f.relative_to(logs).parts))
    (dst / "times.json").write_text(json.dumps({"pull_start": w0, "pull_end": w1, "run_end": w2}))


def measure(mode: str, image: str, ref: str, expect: str, registry: Registry, network: str,
            rep: int, plain_http: list[str], *, drop: bool, nydus_pull: str,
            keep_logs: Path | None = None, profile: Path | None = None,
            amplify_io: int | None = None, prefetch: bool = False,
            cmd: str | None = None, walk: bool = False, b_src: Path | None = None) -> Sample:
    cid = f"lz-{mode}-{rep}"
    sn = SNAPSHOTTER[mode]
    with peer(mode, plain_http, profile, amplify_io, prefetch, keep_logs is not None,
              b_src) as p:
        sock = getattr(p, "socket", None)
        cri = mode in LABELLED_PULL and nydus_pull == "cri"
        ns = "k8s.io" if cri else None
        with Containerd(sock, proxy_name=sn or "nydus", cri=cri,
                        namespace=ns, registry_hosts=plain_http, tag="lzctrd") as ctrd:
            base = ["-a", str(ctrd.socket), "-n", ctrd.namespace]
            if sn is None:
                pull = [CTR, *base, "images", "pull", "--plain-http", ref]
            else:
                pull = [CTR_REMOTE, *base, "images", "rpull", "--plain-http", "--snapshotter", sn, ref]
            run = [CTR, *base, "run", "--rm"] + (["--snapshotter", sn] if sn else []) + [ref, cid]
            if walk:
                run += WALK_ARGV[image]
                expect = "bench:read_warm="
            elif cmd:  # another start-up workload than the image's Cmd
                run += ["/bin/sh", "-c", f"{cmd} && echo {_CMD_OK}"]
                expect = _CMD_OK
            if drop:
                drop_caches()
            load1 = float(Path("/proc/loadavg").read_text().split()[0])
            off0 = registry.access_log.stat().st_size
            t0 = time.monotonic()
            w0 = time.time()
            if cri:
                CriImages(str(ctrd.socket)).pull(ref)
            else:
                subprocess.run(pull, check=True, capture_output=True, timeout=1800)
            t1 = time.monotonic()
            w1 = time.time()
            # the registry logs a request once its response is written, before the
            # client can exit: the log's size now is the pull's end (a stat, ~us)
            off1 = registry.access_log.stat().st_size
            r = subprocess.run(run, capture_output=True, text=True, timeout=1800, check=False)
            t2 = time.monotonic()
            w2 = time.time()
            if r.returncode != 0 or expect not in r.stdout:
                if keep_logs is not None and isinstance(p, Snapshotter):
                    save_logs(p, keep_logs / f"FAILED-{network}-{image}-{mode}-{rep}", w0, w1, w2)
                raise RunFailed(f"{mode} {ref}: run failed (exit {r.returncode}): "
                                f"stdout {r.stdout[-500:]!r} stderr {r.stderr[-500:]!r}")
            end = settle_log(registry.access_log)
            _, fetched_pull, _ = access_bytes(registry.access_log, off0, off1)
            _, fetched_run, n_run = access_bytes(registry.access_log, off1, end)
            m = re.search(r"touched_bytes=(\d+)", r.stdout)
            extra = {k: float(v) for k, v in re.findall(r"bench:(\w+)=([0-9.]+)", r.stdout)}
            s = Sample(network, image, mode, rep, t1 - t0, t2 - t1, t2 - t0, fetched_pull,
                       fetched_run, n_run, int(m[1]) if m else 0, load1=load1, extra=extra)
            if mode in NYDUS_MODES and isinstance(p, Snapshotter | UpstreamSnapshotter):
                s.fuse_read, s.chunks_fetched, s.backend_requests = nydus_counters(p)
            if isinstance(p, Snapshotter | UpstreamSnapshotter):
                if mode in DAEMON_MODE and isinstance(p, Snapshotter):
                    s.breakdown = nydus_breakdown(p, w0, w1, w2)
                elif mode in UPSTREAM_MODE and isinstance(p, UpstreamSnapshotter):
                    s.breakdown = upstream_breakdown(p, w0, w1, w2)
                if keep_logs is not None:
                    save_logs(p, keep_logs / f"{network}-{image}-{mode}-{rep}", w0, w1, w2)
            return s


def learn_list(reg: Registry, repo: str, expect: str, cmd: str | None,
               tag: str = LIST_TAG) -> tuple[str, int]:
    """Copy ``repo:nydus`` to ``repo:TAG`` (a new digest), run it once through our
    snapshotter (loopback; ``cmd`` instead of its Cmd), push the list of its daemon's
    trace beside it; a note and the list's compressed bytes."""
    from pynydus.cli.optimize_cmd import find_daemon, push_list
    from pynydus.daemon import prefetchlist
    from pynydus.registry import RegistryClient

    with RegistryClient(reg.host, scheme="http") as c:
        m = c.get_manifest(repo, "nydus")
        doc = json.loads(m.data)
        doc.setdefault("annotations", {})["pynydus.bench/variant"] = tag
        c.put_manifest(repo, tag, m.media_type, json.dumps(doc).encode())
    ref = f"{reg.host}/{repo}:{tag}"
    with peer("nydus", [reg.host]) as snap, Containerd(
            getattr(snap, "socket", None), proxy_name="nydus", registry_hosts=[reg.host],
            tag="lzctrd") as ctrd:
        assert isinstance(snap, Snapshotter)
        base = ["-a", str(ctrd.socket), "-n", ctrd.namespace]
        subprocess.run([CTR_REMOTE, *base, "images", "rpull", "--plain-http", "--snapshotter",
                        "nydus", ref], check=True, capture_output=True, timeout=1800)
        run = [CTR, *base, "run", "--rm", "--snapshotter", "nydus", ref, "lz-learn"]
        if cmd:
            run += ["/bin/sh", "-c", f"{cmd} && echo {_CMD_OK}"]
            expect = _CMD_OK
        r = subprocess.run(run, capture_output=True, text=True, timeout=1800, check=False)
        if r.returncode != 0 or expect not in r.stdout:
            raise RunFailed(f"learning run of {ref} failed: {r.stderr[-500:]!r}")
        sock, mp = find_daemon(str(snap.root), ref)
        trace = DaemonClient(sock).metrics("trace", mp)
    plist = prefetchlist.from_trace(trace)
    digest = push_list(ref, plist)
    return (f"{repo}:{tag}: list of {len(plist.files)} files, {len(plist.ranges)} chunk "
            f"runs, {plist.compressed_bytes / 1e6:.1f} MB pushed as {digest[:19]}"
            + (f" (learned from `{cmd}`)" if cmd else ""), plist.compressed_bytes)


# --------------------------------------------------------------------- report

def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_x(ratio: float, unit: str = "x") -> str:
    """A ratio for a table cell; "-" where it has no base (no overlayfs row, no reads)."""
    return "-" if math.isnan(ratio) else f"{ratio:.2f}{unit}"


def report(samples: list[Sample], images_state: dict[str, Any], n: int) -> tuple[str, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    lines = [("| network | image | mode | pull s | run s | **pull+run s** | min..max | vs overlayfs "
              "| MB fetched pull / run | MB read by Cmd | fetched / read |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(s.network, s.image) for s in samples},
                  key=lambda k: (NETWORKS.index(k[0]), ["large", "many-files", "small"].index(k[1])))
    for net, img in keys:
        by_mode = {m: [s for s in samples if (s.network, s.image, s.mode) == (net, img, m)]
                   for m in ALL_MODES}
        base = med([s.total_s for s in by_mode["overlayfs"]])
        for mode in ALL_MODES:
            ss = by_mode[mode]
            if not ss:
                continue
            tot = med([s.total_s for s in ss])
            read = med([s.workload_read for s in ss]) or images_state.get(img, {}).get("reads_bytes", 0)
            fetched = med([s.fetched_pull + s.fetched_run for s in ss])
            ratio = base / tot if not math.isnan(base) and tot else float("nan")
            row = {"network": net, "image": img, "mode": mode, "n": len(ss),
                   "pull_s": med([s.pull_s for s in ss]), "run_s": med([s.run_s for s in ss]),
                   "total_s": tot, "min_s": min(s.total_s for s in ss),
                   "max_s": max(s.total_s for s in ss), "x_vs_overlayfs": ratio,
                   "fetched_pull": med([s.fetched_pull for s in ss]),
                   "fetched_run": med([s.fetched_run for s in ss]), "fetched": fetched,
                   "workload_read": read,
                   "fetched_over_read": fetched / read if read else float("nan"),
                   "fuse_read": med([s.fuse_read for s in ss]) if mode in NYDUS_MODES else None}
            rows.append(row)
            lines.append(
                f"| {net} | {img} | {mode} | {row['pull_s']:.2f} | {row['run_s']:.2f} | "
                f"**{tot:.2f}** | {row['min_s']:.2f}..{row['max_s']:.2f} | "
                f"{'1.00x (base)' if mode == 'overlayfs' else fmt_x(ratio)} | "
                f"{row['fetched_pull'] / 1e6:.1f} / {row['fetched_run'] / 1e6:.1f} | "
                f"{read / 1e6:.1f} | {fmt_x(row['fetched_over_read'], '')} |")
    lines += ["", vs_upstream_table(rows)]
    return "\n".join(lines), rows


def walk_table(samples: list[Sample]) -> str:
    """Medians of the ``--walk`` figures per network, image and mode, each with its
    ratio to overlayfs's (``mode / overlayfs``: 1.00 is as fast; target <= 1.1)."""
    keys = ("walk_first", "walk_warm", "read_first", "read_warm")
    lines = ["| network | image | mode | " + " | ".join(f"{k} s (vs overlayfs)" for k in keys)
             + " |", "|---|---|---|" + "---:|" * len(keys)]
    groups = sorted({(s.network, s.image, s.mode) for s in samples if s.extra})
    for net, img, mode in groups:
        def m(md: str, k: str, net: str = net, img: str = img) -> float:
            return med([s.extra[k] for s in samples
                        if (s.network, s.image, s.mode) == (net, img, md) and k in s.extra])
        cells = []
        for k in keys:
            v, b = m(mode, k), m("overlayfs", k)
            cells.append(f"{v:.3f} ({v / b:.2f}x)" if b and not math.isnan(b) else f"{v:.3f}")
        lines.append(f"| {net} | {img} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def vs_upstream_table(rows: list[dict[str, Any]]) -> str:
    """Our modes against upstream's snapshotter + nydusd in the same daemon mode:
    pull+run of ours divided by upstream's (``ours / upstream``, target <= 1.0). Sets
    each of our rows' ``vs_upstream`` (None without an upstream row)."""
    get = {(r["network"], r["image"], r["mode"]): r for r in rows}
    lines = [("| network | image | mode | pull+run s | peer | peer pull+run s | ours / peer "
              "| MB fetched ours / peer |"),
             "|---|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if r["mode"] not in VS_UPSTREAM:
            continue
        up = get.get((r["network"], r["image"], VS_UPSTREAM[r["mode"]]))
        r["vs_upstream"] = r["total_s"] / up["total_s"] if up and up["total_s"] else None
        if up is None:
            continue
        lines.append(f"| {r['network']} | {r['image']} | {r['mode']} | {r['total_s']:.2f} | "
                     f"{up['mode']} | {up['total_s']:.2f} | {r['vs_upstream']:.2f}x | "
                     f"{r['fetched'] / 1e6:.1f} / {up['fetched'] / 1e6:.1f} |")
    return "\n".join(lines)


def checks(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each as PASS/FAIL with the figures, for each nydus mode."""
    out = []
    get = {(r["network"], r["image"], r["mode"]): r for r in rows}
    for r in rows:
        if r.get("vs_upstream") is not None:
            ok = r["vs_upstream"] <= TARGET_VS_UPSTREAM
            out.append(f"{'PASS' if ok else 'FAIL'} {r['image']}/{r['network']}: {r['mode']} "
                       f"pull+run {r['vs_upstream']:.2f}x upstream's {VS_UPSTREAM[r['mode']]} "
                       f"(target <= {TARGET_VS_UPSTREAM:.1f}x)")
    for net in NETWORKS:
        for img, x in TARFS_TARGETS:
            tf = get.get((net, img, "tarfs"))
            if tf and get.get((net, img, "overlayfs")):
                ok = tf["x_vs_overlayfs"] >= x
                out.append(f"{'PASS' if ok else 'FAIL'} {img}/{net}: tarfs "
                           f"{tf['x_vs_overlayfs']:.2f}x faster than overlayfs "
                           f"(target >= {x:.1f}x)")
        for img, zm in itertools.product(("large", "many-files", "small"), ("zran", "zran-b")):
            z, ny = get.get((net, img, zm)), get.get((net, img, "nydus"))
            if z and ny:
                q = z["total_s"] / ny["total_s"]
                out.append(f"{'PASS' if q <= TARGET_ZRAN else 'FAIL'} {img}/{net}: {zm} "
                           f"{z['total_s']:.2f} s = {q:.2f}x nydus {ny['total_s']:.2f} s "
                           f"(target <= {TARGET_ZRAN:.1f}x)")
        det, ny = get.get((net, "large", "detected")), get.get((net, "large", "nydus"))
        if det and ny:
            q = det["total_s"] / ny["total_s"]
            out.append(f"{'PASS' if q <= 1.0 else 'FAIL'} large/{net}: detected "
                       f"{det['total_s']:.2f} s = {q:.2f}x nydus {ny['total_s']:.2f} s "
                       "(target: as fast as the Nydus image pulled by its tag)")
        for m in (x for x in DAEMON_MODE if x not in ("zran", "zran-b", "detected")):
            ny, sg, ov = (get.get((net, "large", x)) for x in (m, "stargz", "overlayfs"))
            if ny and ov and net == "loopback":
                ok = ny["x_vs_overlayfs"] >= TARGET_X
                out.append(f"{'PASS' if ok else 'FAIL'} large/{net}: {m} "
                           f"{ny['x_vs_overlayfs']:.1f}x faster than overlayfs "
                           f"(target >= {TARGET_X:.0f}x)")
            if ny and sg:
                ok = ny["total_s"] < sg["total_s"]
                out.append(f"{'PASS' if ok else 'FAIL'} large/{net}: {m} {ny['total_s']:.2f} s "
                           f"vs stargz {sg['total_s']:.2f} s (target: faster)")
            if ny and ny["workload_read"]:  # not with --walk/--cmd: no reads measured
                ok = ny["fetched_over_read"] <= 1.5
                out.append(f"{'PASS' if ok else 'FAIL'} large/{net}: {m} fetched "
                           f"{ny['fetched'] / 1e6:.1f} MB for {ny['workload_read'] / 1e6:.1f} MB "
                           f"read = {ny['fetched_over_read']:.2f}x (target <= 1.5x)")
            nys, ovs = get.get((net, "small", m)), get.get((net, "small", "overlayfs"))
            if nys and ovs:
                d = nys["total_s"] - ovs["total_s"]
                out.append(f"{'PASS' if d <= 0.2 else 'FAIL'} small/{net}: {m} - overlayfs = "
                           f"{d:+.2f} s (target <= +0.20 s)")
    return out


def floor_s(rows: list[dict[str, Any]], image: str, net: str, list_bytes: int,
            mbit: float) -> float | None:
    """Bytes the start-up needs / bandwidth + the bootstrap pull (nydus-list's) + the
    container's run with everything local (overlayfs's, on loopback)."""
    get = {(r["network"], r["image"], r["mode"]): r for r in rows}
    ny, ov = get.get((net, image, "nydus-list")), get.get(("loopback", image, "overlayfs"))
    if ny is None or ov is None or not list_bytes:
        return None
    wire = list_bytes / (mbit * 1e6 / 8) if net != "loopback" else 0.0
    return wire + ny["pull_s"] + ov["run_s"]


def list_table(rows: list[dict[str, Any]], list_bytes: dict[str, int], mbit: float) -> str:
    """nydus-list and nydus-stale beside nydus (no list), stargz and upstream's prefetch,
    with the floor."""
    get = {(r["network"], r["image"], r["mode"]): r for r in rows}
    modes = ("nydus", "nydus-list", "nydus-stale", "stargz", "upstream", "upstream-pf")
    lines = ["| network | image | " + " | ".join(f"{m} s (MB)" for m in modes)
             + " | floor s | list / floor | list / nydus | stale / nydus |",
             "|---|---|" + "---:|" * (len(modes) + 4)]
    for net, img in sorted({(r["network"], r["image"]) for r in rows},
                           key=lambda k: (NETWORKS.index(k[0]), k[1])):
        cells = []
        for m in modes:
            r = get.get((net, img, m))
            cells.append(f"{r['total_s']:.2f} ({r['fetched'] / 1e6:.1f})" if r else "-")
        fl = floor_s(rows, img, net, list_bytes.get(img, 0), mbit)
        ny, li, st = (get.get((net, img, m)) for m in ("nydus", "nydus-list", "nydus-stale"))
        cells += [f"{fl:.2f}", f"{li['total_s'] / fl:.2f}x"] if fl and li else ["-", "-"]
        cells += [f"{x['total_s'] / ny['total_s']:.2f}x" if x and ny else "-" for x in (li, st)]
        lines.append(f"| {net} | {img} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def list_checks(rows: list[dict[str, Any]], list_bytes: dict[str, int], mbit: float) -> list[str]:
    """Issue 17's targets for the runs with prefetch lists."""
    out = []
    get = {(r["network"], r["image"], r["mode"]): r for r in rows}
    for r in rows:
        net, img, mode = r["network"], r["image"], r["mode"]
        ny = get.get((net, img, "nydus"))
        if mode == "nydus-list":
            if img == "large" and net == "loopback":
                ok = r["total_s"] <= TARGET_LIST_LOOPBACK
                out.append(f"{'PASS' if ok else 'FAIL'} large/loopback: nydus-list pull+run "
                           f"{r['total_s']:.2f} s (target <= {TARGET_LIST_LOOPBACK} s)")
            fl = floor_s(rows, img, net, list_bytes.get(img, 0), mbit)
            if img == "large" and net != "loopback" and fl:
                q = r["total_s"] / fl
                out.append(f"{'PASS' if q <= TARGET_LIST_FLOOR else 'FAIL'} large/{net}: "
                           f"nydus-list {r['total_s']:.2f} s = {q:.2f}x the floor {fl:.2f} s "
                           f"(target <= {TARGET_LIST_FLOOR}x)")
            if r["workload_read"]:  # the data: the pull's bootstrap is not the list's
                q = r["fetched_run"] / r["workload_read"]
                out.append(f"{'PASS' if q <= TARGET_LIST_BYTES else 'FAIL'} {img}/{net}: "
                           f"nydus-list fetched {r['fetched_run'] / 1e6:.1f} MB of data for "
                           f"{r['workload_read'] / 1e6:.1f} MB read = {q:.2f}x "
                           f"(target <= {TARGET_LIST_BYTES}x)")
        if mode in ("nydus-list", "nydus-stale") and ny:
            q = r["total_s"] / ny["total_s"]
            out.append(f"{'PASS' if q <= 1.0 else 'FAIL'} {img}/{net}: {mode} "
                       f"{r['total_s']:.2f} s = {q:.2f}x nydus {ny['total_s']:.2f} s "
                       f"(target: no slower)")
    return out


# --------------------------------------------------------------------- main

def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_throttle":
        asyncio.run(_throttle_main(sys.argv[2], sys.argv[3], float(sys.argv[4])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--repeat", type=int, default=3)
    ap.add_argument("--images", default="large,many-files,small")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"of {', '.join(ALL_MODES)} (zran: `pynydus convert --oci-ref`)")
    ap.add_argument("--networks", default=",".join(NETWORKS))
    ap.add_argument("--mbit", type=float, default=100.0, help="throttled network rate")
    ap.add_argument("--quick", action="store_true", help="small image only, n=1 (CI smoke)")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--no-build-stargz", action="store_true",
                    help="skip stargz instead of building its peer when it is missing")
    ap.add_argument("--nydus-pull", choices=["rpull", "cri"], default="rpull")
    ap.add_argument("--prefetch", action="store_true",
                    help="pynydusd with fs_prefetch on (use with a --nydus-tag converted "
                         "with --prefetch-files)")
    ap.add_argument("--stargz-tag", help="pull this tag for stargz (e.g. an image made with "
                    "ctr-remote images optimize)")
    ap.add_argument("--nydus-tag", help="pull this tag for the nydus modes (another conversion "
                    "of the same image, e.g. with another --chunk-size)")
    ap.add_argument("--zran-tag", help="pull this tag for the zran mode (another "
                    "convert --oci-ref of the same image, e.g. by another version)")
    ap.add_argument("--zran-b-tag", help="pull this tag for the zran-b mode: a second ZRAN "
                    "form in the same run (e.g. the one --zran-tag is held against)")
    ap.add_argument("--b-src", help="the zran-b mode's pynydusd runs from this source tree "
                    "(e.g. a baseline commit's src/, exported with git archive): a daemon "
                    "change held against its baseline in the same run")
    ap.add_argument("--json", help="write every sample and the summary here")
    ap.add_argument("--keep-logs", help="copy each nydus run's snapshotter and daemon logs here")
    ap.add_argument("--profile", help="run pynydusd under py-spy; collapsed stacks go here")
    ap.add_argument("--cmd", help="run this shell command in the container instead of the "
                    "image's Cmd (e.g. a heavier python import); 'read by Cmd' is then unknown")
    ap.add_argument("--walk", action="store_true",
                    help="run a timed tree walk and read of /app (twice each) in the "
                    "container instead of the image's Cmd; medians and ratios to overlayfs "
                    "are printed")
    ap.add_argument("--floor", action="store_true",
                    help="overlayfs on loopback only; check the prefetch-list targets against "
                    "the 100 Mbit/s floor (see nydus-list)")
    ap.add_argument("--amplify-io", type=lambda v: int(v, 0), default=None,
                    help="pynydusd amplify_io for this run (default: the snapshotter's template)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("lazy_pull: needs root (containerd, mounts, drop_caches)", file=sys.stderr)
        return 2
    if a.quick:
        a.repeat, a.images = 1, "small"
    images = [i for i in a.images.split(",") if i]
    modes = [m for m in a.modes.split(",") if m]
    if "detected" in modes and a.nydus_pull != "cri":
        ap.error("--modes detected: referrer detection reads the CRI's labels: --nydus-pull cri")
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(ALL_MODES)})")
    networks = [n for n in a.networks.split(",") if n]
    notes: list[str] = []
    if "stargz" in modes:
        why = ensure_stargz(build=not a.no_build_stargz)
        if why:
            notes.append(f"stargz skipped: {why}")
            say(notes[-1])
            modes.remove("stargz")

    samples: list[Sample] = []
    stop = {"sig": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stop["sig"] = signum
        raise KeyboardInterrupt  # unwinds every context manager: processes, mounts, dirs

    signal.signal(signal.SIGTERM, on_signal)
    use_bytecode()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with lazy_images.bench_registry() as reg:
        learned = ("nydus-list", "nydus-stale")
        formats = tuple(dict.fromkeys(
            ["oci"] + [TAG[m] for m in modes if m not in learned and TAG[m] not in
                       lazy_images.VARIANTS]
            + [t for t in (a.nydus_tag, a.stargz_tag, *(TAG[m] for m in modes))
               if t in lazy_images.VARIANTS and "large" in images]
            + (["nydus"] if any(m in learned or m == "upstream-pf" for m in modes) else [])
            + (["nydus-ref"] if "detected" in modes else [])))
        state = lazy_images.ensure(reg, images, formats=formats)
        list_bytes: dict[str, int] = {}
        for img in images:
            if "nydus-list" in modes:
                note, list_bytes[img] = learn_list(reg, state[img]["repo"], state[img]["expect"],
                                                   a.cmd)
                notes.append(note)
                say(note)
            if "nydus-stale" in modes:
                note, _ = learn_list(reg, state[img]["repo"], state[img]["expect"],
                                     STALE_CMD[img], STALE_TAG)
                notes.append(note)
                say(note)
        for net in networks:
            with contextlib.ExitStack() as stack:
                host = reg.host
                if net == "100mbit":
                    host = stack.enter_context(Throttle(reg.host, a.mbit)).host
                plain = sorted({reg.host, host})
                for img in images:
                    st = state[img]
                    for rep in range(1, a.repeat + 1):
                        k = (rep - 1) % len(modes)  # each mode goes first in turn
                        for mode in modes[k:] + modes[:k]:
                            if a.floor and net != "loopback" and mode == "overlayfs":
                                continue  # the floor needs its run, all local: loopback's
                            tag = TAG[mode]
                            if mode == "zran":
                                tag = a.zran_tag or tag
                            elif mode == "zran-b":
                                tag = a.zran_b_tag or tag
                            elif a.nydus_tag and mode in NYDUS_MODES and mode not in (
                                    "nydus-list", "nydus-stale", "upstream-pf", "detected"):
                                tag = a.nydus_tag
                            elif a.stargz_tag and mode == "stargz":
                                tag = a.stargz_tag
                            if tag in lazy_images.VARIANTS and img != "large":
                                tag = "esgz" if mode == "stargz" else "nydus"  # large only
                            ref = f"{host}/{st['repo']}:{tag}"
                            kw: dict[str, Any] = {
                                "drop": not a.no_drop_caches, "nydus_pull": a.nydus_pull,
                                "keep_logs": Path(a.keep_logs) if a.keep_logs else None,
                                "profile": Path(a.profile) / f"{net}-{img}-{rep}"
                                if a.profile else None, "amplify_io": a.amplify_io,
                                "prefetch": a.prefetch, "cmd": a.cmd, "walk": a.walk,
                                "b_src": Path(a.b_src).resolve() if a.b_src else None}
                            try:
                                s = measure(mode, img, ref, st["expect"], reg, net, rep, plain, **kw)
                            except RunFailed as err:  # counted, reported, repeated once
                                notes.append(f"{net} {img} {mode} rep {rep}: {err}; repeated")
                                say(notes[-1])
                                s = measure(mode, img, ref, st["expect"], reg, net, rep, plain, **kw)
                            if not s.workload_read and not a.cmd and not a.walk:
                                s.workload_read = int(st.get("reads_bytes", 0))
                            samples.append(s)
                            say(f"{net:8} {img:10} {mode:9} rep {rep}: pull {s.pull_s:6.2f} s "
                                f"run {s.run_s:6.2f} s total {s.total_s:6.2f} s  fetched "
                                f"{s.fetched_pull / 1e6:.1f}+{s.fetched_run / 1e6:.1f} MB"
                                + (f"  {s.breakdown}" if s.breakdown else ""))
    table, rows = report(samples, state, a.repeat)
    if "nydus-list" in modes or "nydus-stale" in modes:
        table += "\n\n" + list_table(rows, list_bytes, a.mbit)
    cmd = "bench/lazy_pull.py " + " ".join(sys.argv[1:])
    print(f"\n### Lazy pull end to end ({started}, n={a.repeat}, medians; "
          f"page cache dropped: {not a.no_drop_caches}; nydus pull: {a.nydus_pull})\n")
    print(f"`{cmd}` on {platform.node()} ({os.cpu_count()} CPUs, {platform.release()})\n")
    print(table)
    print()
    if a.walk:
        print(walk_table(samples))
        print()
    for line in checks(rows) + list_checks(rows, list_bytes, a.mbit) + notes:
        print(f"- {line}")
    ny = [s for s in samples if s.mode in NYDUS_MODES and s.breakdown]
    if ny:
        print("\nnydus time breakdown (medians, s):")
        for net in networks:
            for img, mode in [(i, m) for i in images for m in NYDUS_MODES]:
                ss = [s for s in ny if (s.network, s.image, s.mode) == (net, img, mode)]
                if ss:
                    keys = list(ss[0].breakdown)
                    parts = ", ".join(f"{k} {med([s.breakdown.get(k, 0) for s in ss]):.3f}"
                                      for k in keys)
                    print(f"- {net} {img} {mode}: {parts}; FUSE read "
                          f"{med([s.fuse_read for s in ss]) / 1e6:.1f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps({"started": started, "command": cmd, "n": a.repeat,
                                            "rows": rows, "samples": [asdict(s) for s in samples],
                                            "notes": notes, "images": state}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
