"""Upstream Nydus (nydus-rs, the version pinned in scripts/peers.lock) as the referee.

* :func:`nydus_image` runs ``nydus-image`` and returns its output; a failing command
  raises :class:`UpstreamFailed` carrying the exact output (ANSI colours removed), which
  is what the compatibility matrix records as evidence.
* :func:`check_view` parses ``nydus-image check -v -J``: every inode upstream sees (kind,
  nlink, size, mtime) with its chunks (digest, blob index, compressed and uncompressed
  extent), plus the blob ids it reports.
* :func:`inspect_request` asks ``nydus-image inspect -R`` (stats, blobs, prefetch).
* :class:`Nydusd` is upstream's daemon serving one bootstrap over FUSE from a ``localfs``
  blob directory with a blob cache; started with the harness's ``Proc`` (own session, PID
  recorded, stopped by PID) and always unmounted on stop.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from tests.harness.peers import peer_bin
from tests.harness.pynydusd import api_call, force_unmount, fuse_mounted
from tests.harness.util import HarnessError, Proc, Service, wait_until

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def nydus_image_bin() -> Path:
    return peer_bin("nydus-rs", "nydus-image")


def nydusd_bin() -> Path:
    return peer_bin("nydus-rs", "nydusd")


class UpstreamFailed(AssertionError):
    """An upstream command failed; ``output`` is what it printed (the evidence)."""

    def __init__(self, argv: list[str], rc: int, output: str) -> None:
        self.argv, self.rc, self.output = argv, rc, output
        super().__init__(f"upstream {' '.join(argv)} exited {rc}:\n{output}")


def clean(text: str) -> str:
    return _ANSI.sub("", text)


def nydus_image(*args: str | Path, timeout: float = 300, cwd: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
    """``nydus-image ARGS`` at log level warn; UpstreamFailed unless it exits 0."""
    argv = [str(nydus_image_bin()), *(str(a) for a in args)]
    if len(argv) > 1 and argv[1] in ("create", "merge", "check", "inspect", "unpack"):
        argv[2:2] = ["--log-level", "warn"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                       cwd=cwd, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise UpstreamFailed(argv[1:], r.returncode, clean(r.stdout + r.stderr).strip())
    return r


# --------------------------------------------------------------------------- check -v


@dataclass(frozen=True)
class UpChunk:
    digest: str
    index: int
    blob_index: int
    file_offset: int
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int


@dataclass
class UpInode:
    kind: str  # dir, file, hardlink, symlink, or "" (devices, fifos, sockets)
    ino: int
    nlink: int
    size: int
    blocks: int
    mtime: int
    mtime_nsec: int
    chunks: list[UpChunk] = field(default_factory=list)


@dataclass
class CheckView:
    inodes: dict[bytes, UpInode]
    blobs: list[str]
    output: str


_INODE = re.compile(
    r'^inode: (?P<kind>\w*) (?P<path>".*"): index \d+ ino (?P<ino>\d+) real_ino \d+ '
    r"i_parent \d+ child_index \d+ child_count \d+ i_nlink (?P<nlink>\d+) "
    r"i_size (?P<size>\d+) i_blocks (?P<blocks>\d+) .* i_mtime (?P<mtime>\d+) "
    r"i_mtime_nsec (?P<nsec>\d+)$")
_CHUNK = re.compile(
    r"^\s+chunk: id (?P<id>[0-9a-f]+), index (?P<index>\d+), blob_index (?P<blob>\d+), "
    r"file_offset (?P<fo>\d+), compressed (?P<co>\d+)/(?P<cs>\d+), "
    r"uncompressed (?P<uo>\d+)/(?P<us>\d+)$")


def rust_debug_str(text: str) -> bytes:
    """Decode a Rust ``{:?}`` string literal (quotes included) of a path to bytes."""
    assert text[0] == text[-1] == '"', text
    out = bytearray()
    i, s = 0, text[1:-1]
    simple = {"n": b"\n", "r": b"\r", "t": b"\t", "0": b"\0", "\\": b"\\", '"': b'"', "'": b"'"}
    while i < len(s):
        c = s[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        e = s[i + 1]
        if e in simple:
            out += simple[e]
            i += 2
        elif e == "x":
            out.append(int(s[i + 2:i + 4], 16))
            i += 4
        elif e == "u":
            end = s.index("}", i)
            out += chr(int(s[i + 3:end], 16)).encode()
            i = end + 1
        else:
            raise ValueError(f"unknown escape \\{e} in {text!r}")
    return bytes(out)


def check_view(bootstrap: Path, blob_dir: Path | None = None, *, workdir: Path) -> CheckView:
    """``nydus-image check -v -J`` of ``bootstrap`` (with ``-D blob_dir``), parsed."""
    out_json = workdir / f"check-{bootstrap.name}.json"
    args: list[str | Path] = ["check", "-v", "-J", out_json]
    if blob_dir is not None:
        args += ["-D", blob_dir]
    r = nydus_image(*args, bootstrap)
    inodes: dict[bytes, UpInode] = {}
    cur: UpInode | None = None
    for line in clean(r.stdout).splitlines():
        m = _INODE.match(line)
        if m:
            cur = UpInode(m["kind"], int(m["ino"]), int(m["nlink"]), int(m["size"]),
                          int(m["blocks"]), int(m["mtime"]), int(m["nsec"]))
            inodes[rust_debug_str(m["path"])] = cur
            continue
        m = _CHUNK.match(line)
        if m:
            assert cur is not None, line
            cur.chunks.append(UpChunk(m["id"], int(m["index"]), int(m["blob"]), int(m["fo"]),
                                      int(m["co"]), int(m["cs"]), int(m["uo"]), int(m["us"])))
    if not inodes:
        raise AssertionError(f"no inode in upstream check output:\n{clean(r.stdout)[:2000]}")
    report = json.loads(out_json.read_text())
    return CheckView(inodes, list(report.get("blobs", [])), clean(r.stdout + r.stderr))


def inspect_request(bootstrap: Path, request: str, blob_dir: Path | None = None) -> Any:
    """``nydus-image inspect -R REQUEST`` (stats, blobs, prefetch): its JSON answer."""
    extra: list[str | Path] = ["-D", blob_dir] if blob_dir is not None else []
    r = nydus_image("inspect", "-R", request, *extra, bootstrap)
    text = clean(r.stdout)
    start = min(i for i in (text.find("{"), text.find("[")) if i >= 0)
    return json.loads(text[start:])


# --------------------------------------------------------------------------- nydusd


def localfs_config(blob_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """nydusd v1 JSON config: localfs backend, blob cache, no prefetch, xattrs on."""
    return {
        "device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                   "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}}},
        "mode": "direct", "digest_validate": False, "enable_xattr": True,
        "fs_prefetch": {"enable": False},
    }


class Nydusd(Service):
    """Upstream ``nydusd`` serving ``bootstrap`` at ``mountpoint`` (FUSE)."""

    def __init__(self, workdir: Path, *, name: str, bootstrap: Path, blob_dir: Path,
                 cache_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.name = name
        self.mountpoint = workdir / f"{name}.mnt"
        self.apisock = workdir / f"{name}.sock"
        self.log = workdir / f"{name}.log"
        cache = cache_dir or workdir / f"{name}.cache"
        cache.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.json"
        self.config_path.write_text(json.dumps(localfs_config(blob_dir, cache)))
        # --rlimit-nofile 0: nydusd raises RLIMIT_NOFILE to 1,000,000 by default, which a
        # container without CAP_SYS_RESOURCE refuses (EPERM) and nydusd then exits.
        argv = [str(nydusd_bin()), "--config", str(self.config_path),
                "--mountpoint", str(self.mountpoint), "--bootstrap", str(bootstrap),
                "--apisock", str(self.apisock), "--log-level", "info", "--rlimit-nofile", "0"]
        self.proc = Proc(name, argv, workdir, self.log)

    def start(self, timeout: float = 30.0) -> Self:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc.start()
        wait_until(self._ready, timeout, f"upstream nydusd {self.name} at {self.mountpoint}",
                   interval=0.02)
        return self

    def _ready(self) -> bool:
        if not self.proc.running():
            raise HarnessError(f"upstream nydusd exited with {self.proc.returncode()}:\n"
                               f"{clean(self.proc.log_tail())}")
        if not self.apisock.exists() or not fuse_mounted(self.mountpoint):
            return False
        status, info = api_call(self.apisock, "GET", "/api/v1/daemon", timeout=2)
        return status == 200 and isinstance(info, dict) and info.get("state") == "RUNNING"

    def log_text(self) -> str:
        try:
            return clean(self.log.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        self.proc.stop(15)
        force_unmount(self.mountpoint)
