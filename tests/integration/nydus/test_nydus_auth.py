"""A lazy pull from a registry that needs credentials, and where the secret must not go.

The image's blob is in a registry with htpasswd (basic) auth; containerd's CRI hands the
credentials to the snapshotter as the snapshot labels ``pullusername``/``pullsecret``.
The daemon serving the image must fetch with them (the data reads back), and afterwards
the secret (the password, and ``user:password`` in base64 as HTTP and nydusd configs
carry it) must be in none of these:

- a log file (snapshotter and daemon logs are at debug level here),
- the command line of any process on the machine (``/proc/*/cmdline``), nor in a mount
  option (``/proc/self/mountinfo``),
- a file under the snapshotter's or the registry's directory that another user could
  read (mode o+r with every directory above it o+x),
- an answer of the daemon's HTTP API (daemon info, backend, config, metrics).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus import labels as L
from pynydus.host.mount import unmount_all
from pynydus.manager.client import _UnixConnection
from pynydus.registry.client import RegistryClient
from tests.harness.registry import Registry, write_htpasswd
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import make_workdir, remove_tree

from .support import REPO, container_rootfs, pull_nydus_image

pytestmark = [pytest.mark.root]

USER = "lazyuser"
PASSWORD = "pw-" + secrets.token_hex(12)  # unique: any hit is this test's secret
AUTH = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()  # as nydusd configs carry it
NEEDLES = {PASSWORD.encode(): "password", AUTH.encode(): "base64(user:password)"}


@pytest.fixture(scope="module")
def auth_image(image: dict) -> Iterator[dict]:
    """The session image's blob, in a second registry that wants USER/PASSWORD."""
    work = make_workdir("authreg")
    try:
        htpasswd = write_htpasswd(work / "htpasswd", USER, PASSWORD)
        with Registry(work / "reg", htpasswd=htpasswd) as reg:
            with RegistryClient(reg.host, scheme="http", auth=AUTH) as client:
                for blob, blob_id in zip(image["blobs"], image["blob_ids"], strict=True):
                    client.push_blob(REPO, blob, "sha256:" + blob_id)
            yield {**image, "ref": f"{reg.host}/{REPO}:latest", "registry": reg, "work": work}
    finally:
        remove_tree(work)


def hits(data: bytes) -> list[str]:
    return [what for needle, what in NEEDLES.items() if needle in data]


def world_readable(path: Path) -> bool:
    """Another user can read ``path``: o+r on it and o+x on every directory above."""
    if not os.stat(path).st_mode & stat.S_IROTH:
        return False
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in path.parents)


def scan_files(*roots: Path) -> tuple[list[str], list[str]]:
    """(log files with the secret, world-readable files with the secret) under ``roots``."""
    in_logs, readable = [], []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = Path(dirpath, name)
                if not p.is_file() or p.is_symlink():
                    continue
                try:
                    found = hits(p.read_bytes())
                except OSError:
                    continue
                if not found:
                    continue
                if name.endswith(".log") or "/logs/" in str(p):
                    in_logs.append(f"{p}: {found}")
                if world_readable(p):
                    readable.append(f"{p} ({oct(p.stat().st_mode & 0o777)}): {found}")
    return in_logs, readable


def scan_cmdlines() -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        found = hits(cmd)
        if found:
            shown = cmd.replace(b"\0", b" ")[:200]
            out.append(f"pid {pid} {shown!r}: {found}")
    return out


def api_get(sock: str, path: str) -> bytes:
    conn = _UnixConnection(sock, 10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status in (200, 204), (path, resp.status, body[:300])
        return body
    finally:
        conn.close()


def test_lazy_pull_with_credentials_leaks_no_secret(snap: Snapshotter, auth_image: dict,
                                                    tmp_path: Path) -> None:
    reg: Registry = auth_image["registry"]
    blob = "sha256:" + auth_image["blob_ids"][0]
    # the registry really wants the credentials
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{reg.host}/v2/{REPO}/blobs/{blob}", timeout=10)
    assert err.value.code == 401

    creds = {L.PULL_USERNAME: USER, L.PULL_SECRET: PASSWORD}
    top = pull_nydus_image(snap, auth_image, extra_labels=creds)
    rootfs = tmp_path / "rootfs"
    container_rootfs(snap, top, "default/3/c1", rootfs)
    try:
        big = (rootfs / "data/big.bin").read_bytes()
        assert hashlib.sha256(big).hexdigest() == auth_image["big_sha"]
        assert reg.blob_gets(blob) > 0  # fetched lazily, with the credentials

        leaks = [f"/proc/*/cmdline: {c}" for c in scan_cmdlines()]
        mountinfo = Path("/proc/self/mountinfo").read_bytes()
        leaks += [f"/proc/self/mountinfo: {h}" for h in hits(mountinfo)]
        in_logs, readable = scan_files(snap.workdir, auth_image["work"])
        leaks += [f"log: {x}" for x in in_logs] + [f"world-readable: {x}" for x in readable]
        records = [r for r in snap.daemon_records() if r["mode"] != "standby"]
        assert records, snap.daemon_records()
        for rec in records:
            sock = rec["api_socket"]
            info = json.loads(api_get(sock, "/api/v1/daemon"))
            mountpoints = list(info.get("backend_collection", {})) or ["/"]
            paths = ["/api/v1/daemon", "/api/v2/daemon", "/api/v1/config", "/api/v1/metrics",
                     "/api/v1/metrics/backend", "/api/v1/metrics/blobcache", "/metrics"]
            paths += [f"/api/v1/daemon/backend?mountpoint={mp}" for mp in mountpoints]
            paths += [f"/api/v1/config?id={mp}" for mp in mountpoints]
            for path in paths:
                leaks += [f"API {path}: {h}" for h in hits(api_get(sock, path))]
        assert not leaks, "the registry secret leaked:\n" + "\n".join(leaks)
        # the scan can find it: the metastore keeps the labels (in a 0700 root)
        assert hits((snap.root / "metadata.db").read_bytes()) or hits(
            (snap.root / "metadata.db-wal").read_bytes() if (snap.root / "metadata.db-wal").exists()
            else b""), "the scan would not see the secret where it must be"
    finally:
        unmount_all(str(rootfs))
