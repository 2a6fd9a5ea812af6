"""Support for the snapshotter integration suite: process, client, mounts, file trees.

Theory of operation. Every test talks to a real ``pynydus snapshotter`` process over its
unix socket, exactly as containerd's proxy plugin would, and knows nothing of its
internals beyond the on-disk layout the contract fixes (``<root>/snapshots/<id>/fs``,
``work`` for actives). The mounts it answers are performed with the real mount(2)
(through mount(8)), files are written into them (an *applier*), and the combined view of
a later snapshot is compared with a plain directory that received the same appliers (a
*checker*). That is the idea of containerd's ``snapshots/testsuite``; the code here is
our own.

Everything started here is owned here: the process is stopped by its PID (SIGTERM, then
SIGKILL), every mount below the private base directory is unmounted, and the directory
is removed, whatever the outcome of the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

from pynydus.api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from tests.harness.util import pynydusd_pids

# The name containerd puts in every request of a proxy snapshotter; ours ignores it.
SNAPSHOTTER_NAME = "nydus"

# Upstream caps the root at 70 bytes (unix socket paths of daemons live below it).
MAX_ROOT_LEN = 70

# Start-up must be quick (no daemons, no network); a slow box gets some slack.
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
RPC_TIMEOUT = 30.0

KIND_ACTIVE = snapshots_pb2.ACTIVE
KIND_VIEW = snapshots_pb2.VIEW
KIND_COMMITTED = snapshots_pb2.COMMITTED

OVERLAY_VOLATILE = "containerd.io/snapshot/overlay.volatile"
GC_ROOT = "containerd.io/gc.root"


def pynydus_command() -> list[str]:
    """The console script beside the interpreter running the tests, else ``python -m``."""
    script = Path(sys.executable).parent / "pynydus"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "pynydus.cli.main"]


# --------------------------------------------------------------------------------------
# gRPC client


class SnapshotterClient:
    """Thin synchronous client of ``containerd.services.snapshots.v1.Snapshots``.

    Methods return the protobuf messages (``Mount`` lists, ``Info``, ``UsageResponse``)
    and let ``grpc.RpcError`` through untouched, so tests can assert on ``.code()`` and
    ``.details()``.
    """

    def __init__(self, address: Path, timeout: float = RPC_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel("unix:" + str(address))
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        req = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=SNAPSHOTTER_NAME, key=key, parent=parent, labels=dict(labels or {})
        )
        return list(self.stub.Prepare(req, timeout=self.timeout).mounts)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        req = snapshots_pb2.ViewSnapshotRequest(
            snapshotter=SNAPSHOTTER_NAME, key=key, parent=parent, labels=dict(labels or {})
        )
        return list(self.stub.View(req, timeout=self.timeout).mounts)

    def mounts(self, key: str) -> list[mount_pb2.Mount]:
        req = snapshots_pb2.MountsRequest(snapshotter=SNAPSHOTTER_NAME, key=key)
        return list(self.stub.Mounts(req, timeout=self.timeout).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None,
               parent: str = "") -> None:
        req = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=SNAPSHOTTER_NAME, name=name, key=key, labels=dict(labels or {}),
            parent=parent,
        )
        self.stub.Commit(req, timeout=self.timeout)

    def remove(self, key: str) -> None:
        req = snapshots_pb2.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER_NAME, key=key)
        self.stub.Remove(req, timeout=self.timeout)

    def stat(self, key: str) -> snapshots_pb2.Info:
        req = snapshots_pb2.StatSnapshotRequest(snapshotter=SNAPSHOTTER_NAME, key=key)
        return self.stub.Stat(req, timeout=self.timeout).info

    def update(
        self, info: snapshots_pb2.Info, paths: Sequence[str] | None = None
    ) -> snapshots_pb2.Info:
        req = snapshots_pb2.UpdateSnapshotRequest(snapshotter=SNAPSHOTTER_NAME)
        req.info.CopyFrom(info)
        if paths:
            req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(paths)))
        return self.stub.Update(req, timeout=self.timeout).info

    def list(self, *filters: str) -> list[snapshots_pb2.Info]:
        req = snapshots_pb2.ListSnapshotsRequest(
            snapshotter=SNAPSHOTTER_NAME, filters=list(filters)
        )
        out: list[snapshots_pb2.Info] = []
        for chunk in self.stub.List(req, timeout=self.timeout):
            out.extend(chunk.info)
        return out

    def names(self, *filters: str) -> set[str]:
        return {i.name for i in self.list(*filters)}

    def usage(self, key: str) -> snapshots_pb2.UsageResponse:
        req = snapshots_pb2.UsageRequest(snapshotter=SNAPSHOTTER_NAME, key=key)
        return self.stub.Usage(req, timeout=self.timeout)

    def cleanup(self) -> None:
        self.stub.Cleanup(
            snapshots_pb2.CleanupRequest(snapshotter=SNAPSHOTTER_NAME), timeout=self.timeout
        )


def info_copy(info: snapshots_pb2.Info, **changes: object) -> snapshots_pb2.Info:
    """A copy of ``info`` with fields replaced (``labels`` replaces the whole map)."""
    new = snapshots_pb2.Info()
    new.CopyFrom(info)
    for name, value in changes.items():
        if name == "labels":
            new.labels.clear()
            new.labels.update(dict(value))  # type: ignore[call-overload]
        else:
            setattr(new, name, value)
    return new


def ts_ns(ts: object) -> int:
    """A protobuf Timestamp as integer nanoseconds since the epoch."""
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)  # type: ignore[attr-defined]


def info_tuple(info: snapshots_pb2.Info) -> tuple[object, ...]:
    """Everything an Info says, in a comparable form."""
    return (
        info.name,
        info.parent,
        info.kind,
        ts_ns(info.created_at),
        ts_ns(info.updated_at),
        tuple(sorted(info.labels.items())),
    )


# --------------------------------------------------------------------------------------
# the process


@dataclass
class SnapshotterProcess:
    """One ``pynydus snapshotter`` subprocess on a private root and socket.

    ``restart()`` stops it and starts a new process on the same root and socket.
    """

    base: Path
    extra_args: list[str] = field(default_factory=list)
    config: Path | None = None
    umask: int = 0o022
    # run as ``python -m pynydus.cli.main`` instead of the console script
    as_module: bool = False
    # pass --root/--address (False: the config file must name them)
    path_flags: bool = True
    root: Path = field(init=False)
    address: Path = field(init=False)
    work: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    client: SnapshotterClient | None = field(init=False, default=None)
    generation: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.root = self.base / "root"
        self.address = self.base / "sn.sock"
        self.work = self.base / "w"
        self.work.mkdir(exist_ok=True)
        assert len(str(self.root).encode()) <= MAX_ROOT_LEN, self.root

    # logs of the current generation
    @property
    def stdout_path(self) -> Path:
        return self.base / f"stdout.{self.generation}.log"

    @property
    def stderr_path(self) -> Path:
        return self.base / f"stderr.{self.generation}.log"

    def command(self) -> list[str]:
        base_cmd = (
            [sys.executable, "-m", "pynydus.cli.main"] if self.as_module else pynydus_command()
        )
        cmd = base_cmd + ["snapshotter"]
        if self.path_flags:
            cmd += ["--root", str(self.root), "--address", str(self.address)]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        return cmd + self.extra_args

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for readiness."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.generation += 1
        # The umask is set by a shell that then execs (same PID), not by preexec_fn:
        # running Python between fork and exec in a process with live gRPC threads
        # lets gRPC's fork handlers restart its poller in the child, which aborts
        # (SIGABRT, "epoll_wait error: Bad file descriptor") when the fds are closed.
        argv = ["/bin/sh", "-c", f'umask {self.umask:03o} && exec "$@"', "sh", *self.command()]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.base,
                start_new_session=True,
            )
        return self.proc

    def start(self) -> SnapshotterClient:
        """Start and wait until the socket exists and ``List`` answers."""
        proc = self.spawn()
        deadline = time.monotonic() + READY_TIMEOUT
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"snapshotter exited with {proc.returncode} before it was ready\n" + self.logs()
                )
            if self.address.exists():
                client = SnapshotterClient(self.address, timeout=2.0)
                try:
                    client.list()
                except grpc.RpcError as err:
                    last = err
                    client.close()
                else:
                    client.timeout = RPC_TIMEOUT
                    self.client = client
                    return client
            time.sleep(0.02)
        raise RuntimeError(
            f"snapshotter not ready after {READY_TIMEOUT}s (last error: {last!r})\n" + self.logs()
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Signal our PID, wait, SIGKILL after ``timeout``. Returns the exit status."""
        if self.client is not None:
            self.client.close()
            self.client = None
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    def restart(self) -> SnapshotterClient:
        status = self.stop()
        assert status == 0, f"snapshotter exited with {status} on SIGTERM\n" + self.logs()
        return self.start()

    def logs(self) -> str:
        parts = []
        for p in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(OSError):
                parts.append(f"--- {p.name} ---\n" + p.read_text(errors="replace")[-20000:])
        return "\n".join(parts)

    def all_log_text(self) -> str:
        """stdout/stderr of every generation plus any log file under ``<root>/logs``."""
        texts = []
        for p in sorted(self.base.glob("std*.log")):
            texts.append(p.read_text(errors="replace"))
        logs_dir = self.root / "logs"
        if logs_dir.is_dir():
            for p in logs_dir.rglob("*"):
                if p.is_file():
                    with contextlib.suppress(OSError):
                        texts.append(p.read_text(errors="replace"))
        return "\n".join(texts)

    def snapshot_dirs(self) -> set[str]:
        d = self.root / "snapshots"
        return set(os.listdir(d)) if d.is_dir() else set()


def make_base() -> Path:
    """A short private directory under /tmp (the root must stay ≤ 70 bytes)."""
    return Path(tempfile.mkdtemp(prefix="pn-", dir="/tmp"))


def teardown_base(base: Path, procs: Iterable[SnapshotterProcess] = ()) -> None:
    """Stop our processes, unmount everything below ``base``, remove it."""
    for p in procs:
        with contextlib.suppress(Exception):
            p.stop()
    stop_daemons_below(base)
    unmount_below(base)
    shutil.rmtree(base, ignore_errors=True)


def stop_daemons_below(base: Path) -> None:
    """Kill the pynydusd processes our snapshotters left working under ``base`` (daemons
    outlive a snapshotter by design; a kill -9'd snapshotter cannot stop even its standby)."""
    for pid in pynydusd_pids(base):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------
# mounts


def _unescape_mountinfo(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mountpoints_below(base: Path) -> list[Path]:
    """Mount points at or below ``base`` from /proc/self/mountinfo, deepest first."""
    prefix = str(base).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape_mountinfo(line.split()[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(Path(mp))
    return sorted(set(found), key=lambda p: (-len(p.parts), str(p)))


def unmount(target: Path) -> None:
    """Unmount ``target`` (every mount stacked on it); lazily if it stays busy."""
    for attempt in range(50):
        if target not in mountpoints_below(target):
            return
        r = subprocess.run(["umount", str(target)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            if attempt >= 10:
                subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
            else:
                time.sleep(0.05)
    raise RuntimeError(f"cannot unmount {target}")


def unmount_below(base: Path) -> None:
    for _ in range(5):
        mps = mountpoints_below(base)
        if not mps:
            return
        for mp in mps:
            with contextlib.suppress(Exception):
                unmount(mp)


def _run_mount(argv: list[str], cwd: str | None = None) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)!r} failed ({r.returncode}): {r.stderr.strip()}")


# mount(2) takes the overlay options in one page
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _compact_lowerdirs(options: list[str]) -> tuple[str | None, list[str]]:
    """Make lowerdir entries relative to their common directory (containerd does the same
    when the options do not fit in a page); returns (cwd for the mount, new options)."""
    idx = [i for i, o in enumerate(options) if o.startswith("lowerdir=")]
    if not idx:
        return None, options
    dirs = options[idx[0]][len("lowerdir=") :].split(":")
    common = os.path.commonpath(dirs)
    if common in ("", "/") or len(dirs) < 2:
        return None, options
    rel = [os.path.relpath(d, common) for d in dirs]
    new = list(options)
    new[idx[0]] = "lowerdir=" + ":".join(rel)
    return common, new


def mount_one(m: mount_pb2.Mount, target: Path) -> None:
    opts = list(m.options)
    if m.type == "bind":
        flag = "--rbind" if "rbind" in opts else "--bind"
        _run_mount(["mount", flag, m.source, str(target)])
        if "ro" in opts:
            # the kernel ignores MS_RDONLY on the first bind; containerd remounts too
            _run_mount(["mount", "-o", "remount,ro,bind", str(target)])
        return
    cwd = None
    if m.type == "overlay" and len(",".join(opts)) >= _PAGE_SIZE - 512:
        cwd, opts = _compact_lowerdirs(opts)
    argv = ["mount", "-t", m.type]
    if opts:
        argv += ["-o", ",".join(opts)]
    _run_mount(argv + [m.source or "none", str(target)], cwd=cwd)


def mount_all(mounts: Sequence[mount_pb2.Mount], target: Path) -> None:
    """Perform the mounts a snapshotter returned onto ``target``, in order (containerd's
    ``mount.All``). On failure, what was mounted is undone."""
    target.mkdir(parents=True, exist_ok=True)
    assert mounts, "the snapshotter returned no mounts"
    done = 0
    try:
        for m in mounts:
            mount_one(m, target)
            done += 1
    except BaseException:
        for _ in range(done):
            unmount(target)
        raise


# --------------------------------------------------------------------------------------
# interpreting mounts (the contract's layout)


def mount_options(m: mount_pb2.Mount) -> dict[str, str]:
    """``key=value`` options as a dict; bare flags map to ``""``."""
    out = {}
    for o in m.options:
        k, _, v = o.partition("=")
        out[k] = v
    return out


def upper_dir(mounts: Sequence[mount_pb2.Mount]) -> Path:
    """The directory an active snapshot writes to: bind source or overlay upperdir."""
    assert len(mounts) == 1, mounts
    m = mounts[0]
    if m.type == "bind":
        return Path(m.source)
    return Path(mount_options(m)["upperdir"])


def snapshot_id_of(path: Path, root: Path) -> str:
    """``<root>/snapshots/<id>/fs`` → ``<id>`` (asserting the layout)."""
    rel = path.relative_to(root / "snapshots")
    assert len(rel.parts) == 2 and rel.parts[1] in ("fs", "work"), path
    return rel.parts[0]


# --------------------------------------------------------------------------------------
# appliers: small filesystem changes, applied the same way to a mount and a plain dir

Applier = Callable[[Path], None]


def _p(root: Path, rel: str) -> Path:
    return root / rel.lstrip("/")


def create_file(rel: str, data: bytes, mode: int) -> Applier:
    def apply(root: Path) -> None:
        p = _p(root, rel)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)

    return apply


def create_dir(rel: str, mode: int) -> Applier:
    def apply(root: Path) -> None:
        p = _p(root, rel)
        os.mkdir(p)
        os.chmod(p, mode)

    return apply


def remove_all(rel: str) -> Applier:
    def apply(root: Path) -> None:
        p = _p(root, rel)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    return apply


def chown(rel: str, uid: int, gid: int) -> Applier:
    def apply(root: Path) -> None:
        os.lchown(_p(root, rel), uid, gid)

    return apply


def link(old: str, new: str) -> Applier:
    def apply(root: Path) -> None:
        os.link(_p(root, old), _p(root, new))

    return apply


def symlink(target: str, rel: str) -> Applier:
    def apply(root: Path) -> None:
        os.symlink(target, _p(root, rel))

    return apply


def chmod(rel: str, mode: int) -> Applier:
    def apply(root: Path) -> None:
        os.chmod(_p(root, rel), mode)

    return apply


def apply_all(*appliers: Applier) -> Applier:
    def apply(root: Path) -> None:
        for a in appliers:
            a(root)

    return apply


# --------------------------------------------------------------------------------------
# checkers: compare two trees (type, permissions, owner, content, link targets, xattrs,
# hard-link groups). Times and directory sizes are not compared (they legitimately differ).


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    payload: bytes | str | None
    xattrs: tuple[tuple[str, bytes], ...]


def _xattrs(p: Path) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        if n.startswith(("trusted.overlay.", "security.")):
            continue
        with contextlib.suppress(OSError):
            out.append((n, os.getxattr(p, n, follow_symlinks=False)))
    return tuple(out)


def tree(root: Path) -> tuple[dict[str, Entry], frozenset[frozenset[str]]]:
    """Entries below ``root`` (not root itself) and the groups of hard-linked paths."""
    entries: dict[str, Entry] = {}
    by_inode: dict[tuple[int, int], set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            payload: bytes | str | None = None
            if stat.S_ISREG(st.st_mode):
                kind, payload = "file", p.read_bytes()
                by_inode.setdefault((st.st_dev, st.st_ino), set()).add(rel)
            elif stat.S_ISDIR(st.st_mode):
                kind = "dir"
            elif stat.S_ISLNK(st.st_mode):
                kind, payload = "symlink", os.readlink(p)
            else:
                kind = f"special:{stat.S_IFMT(st.st_mode):o}"
            entries[rel] = Entry(
                kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, payload, _xattrs(p)
            )
    links = frozenset(frozenset(g) for g in by_inode.values() if len(g) > 1)
    return entries, links


def diff_trees(expected: Path, actual: Path) -> list[str]:
    """Human-readable differences; empty when the trees are equal."""
    exp, exp_links = tree(expected)
    act, act_links = tree(actual)
    problems = []
    for rel in sorted(exp.keys() - act.keys()):
        problems.append(f"missing {rel!r}")
    for rel in sorted(act.keys() - exp.keys()):
        problems.append(f"unexpected {rel!r} ({act[rel].kind})")
    for rel in sorted(exp.keys() & act.keys()):
        e, a = exp[rel], act[rel]
        for attr in ("kind", "mode", "uid", "gid", "payload", "xattrs"):
            ev, av = getattr(e, attr), getattr(a, attr)
            if ev != av:
                if attr == "mode":
                    ev, av = oct(ev), oct(av)
                problems.append(f"{rel!r}: {attr} expected {ev!r}, got {av!r}")
    if exp_links != act_links:
        problems.append(
            f"hard links: expected {sorted(map(sorted, exp_links))}, "
            f"got {sorted(map(sorted, act_links))}"
        )
    return problems


def assert_trees_equal(expected: Path, actual: Path, what: str = "") -> None:
    problems = diff_trees(expected, actual)
    assert not problems, f"{what or actual} differs from {expected}:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------------------
# disk usage the way containerd computes it (continuity fs.DiskUsage): walk the tree
# including its root, count each inode once, size = allocated 512-byte blocks.


def disk_usage(root: Path) -> tuple[int, int]:
    """(size in bytes, inodes) of the tree at ``root``."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def visit(p: str) -> None:
        nonlocal size
        st = os.lstat(p)
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            size += st.st_blocks * 512

    visit(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            visit(os.path.join(dirpath, name))
    return size, len(seen)


# --------------------------------------------------------------------------------------
# scenario helpers shared by the test modules (containerd testsuite's helpers, our code)

_counter = iter(range(1, 1_000_000))


def create_snapshot(
    client: SnapshotterClient,
    mounter: object,
    parent: str,
    applier: Applier,
    labels: Mapping[str, str] | None = None,
) -> str:
    """Prepare on ``parent``, mount, apply, unmount, commit; returns the committed name."""
    n = next(_counter)
    name, key = f"layer-{n}", f"layer-{n}-prepare"
    mounts = client.prepare(key, parent, labels)
    target = mounter.mount(mounts)  # type: ignore[attr-defined]
    try:
        applier(target)
    finally:
        mounter.unmount(target)  # type: ignore[attr-defined]
    client.commit(name, key, labels)
    return name


def check_snapshot(client: SnapshotterClient, mounter: object, name: str, expected: Path) -> None:
    """Mount a view of committed ``name`` and compare it with the tree ``expected``."""
    view = f"{name}-view"
    mounts = client.view(view, name)
    target = mounter.mount(mounts)  # type: ignore[attr-defined]
    try:
        assert_trees_equal(expected, target, f"view of {name!r}")
    finally:
        mounter.unmount(target)  # type: ignore[attr-defined]
        client.remove(view)


def check_snapshots(
    client: SnapshotterClient, mounter: object, flat: Path, *appliers: Applier
) -> list[str]:
    """Build a chain, one committed layer per applier, applying the same changes to the
    plain directory ``flat``; after each layer the view must equal ``flat``."""
    flat.mkdir(parents=True, exist_ok=True)
    parent = ""
    chain = []
    for i, a in enumerate(appliers, 1):
        parent = create_snapshot(client, mounter, parent, a)
        a(flat)
        try:
            check_snapshot(client, mounter, parent, flat)
        except AssertionError as err:
            raise AssertionError(f"layer {i} of {len(appliers)}: {err}") from err
        chain.append(parent)
    return chain


def assert_consistent(proc: SnapshotterProcess, expected: Iterable[str]) -> None:
    """The metastore and the disk agree: List returns exactly ``expected``; Stat of each
    says what List says; after Cleanup there is exactly one directory per snapshot under
    ``<root>/snapshots``, and every path an active or view mounts exists."""
    client = proc.client
    assert client is not None
    expected = set(expected)
    infos = client.list()
    names = [i.name for i in infos]
    assert len(names) == len(set(names)), f"List returned duplicates: {sorted(names)}"
    assert set(names) == expected, (
        f"List: missing {sorted(expected - set(names))}, unexpected {sorted(set(names) - expected)}"
    )
    for info in infos:
        assert info_tuple(client.stat(info.name)) == info_tuple(info), info.name
    client.cleanup()
    dirs = proc.snapshot_dirs()
    assert len(dirs) == len(expected), (
        f"{len(dirs)} entries under {proc.root / 'snapshots'} for {len(expected)} snapshots: "
        f"{sorted(dirs)}"
    )
    for d in dirs:
        assert (proc.root / "snapshots" / d / "fs").is_dir(), f"snapshots/{d} has no fs/"
    for info in infos:
        if info.kind == KIND_COMMITTED:
            continue
        for m in client.mounts(info.name):
            paths = [m.source] if m.type == "bind" else []
            for k, v in mount_options(m).items():
                if k in ("upperdir", "workdir"):
                    paths.append(v)
                elif k == "lowerdir":
                    paths.extend(v.split(":"))
            for p in paths:
                assert Path(p).is_dir(), f"{info.name}: mount path {p} does not exist"
