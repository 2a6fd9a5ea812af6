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
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus import labels as L
from pynydus.host.mount import unmount_all
from pynydus.manager.client import _UnixConnection
from pynydus.registry.client import RegistryClient
from tests.harness import leaks
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
    return leaks.hits(data, NEEDLES)


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

        found = leaks.find_leaks(NEEDLES, [snap.workdir, auth_image["work"]])
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
                found += [f"API {path}: {h}" for h in hits(api_get(sock, path))]
        assert not found, "the registry secret leaked:\n" + "\n".join(found)
        # the scan can find it: the metastore keeps the labels (in a 0700 root)
        assert hits((snap.root / "metadata.db").read_bytes()) or hits(
            (snap.root / "metadata.db-wal").read_bytes() if (snap.root / "metadata.db-wal").exists()
            else b""), "the scan would not see the secret where it must be"
    finally:
        unmount_all(str(rootfs))
