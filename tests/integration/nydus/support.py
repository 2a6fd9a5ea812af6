"""The calls containerd makes for a Nydus image, through the snapshotter's socket."""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from pynydus import labels as L
from pynydus.api import snapshots_pb2 as pb
from pynydus.host.mount import MountSpec, mount_all, unmount_all
from tests.harness.snapshotter import Snapshotter

REPO = "test/nydus-app"


def upper_of(m: object) -> str:
    """The directory containerd unpacks a layer into, from a Prepare's mount."""
    if m.type == "bind":  # type: ignore[attr-defined]
        return str(m.source)  # type: ignore[attr-defined]
    return next(o.split("=", 1)[1] for o in m.options if o.startswith("upperdir="))  # type: ignore[attr-defined]


def pull_nydus_image(snap: Snapshotter, image: dict, ns: str = "default", *,
                     boot: bytes | None = None, extra_labels: dict[str, str] | None = None) -> str:
    """What containerd's unpacker does for a Nydus image; returns the top chain id.

    ``boot`` replaces the bootstrap containerd would unpack (to serve a damaged one);
    ``extra_labels`` go on both layers (e.g. pull credentials)."""
    stub = snap.stub()
    blob_key = f"{ns}/1/extract-blob"
    blob_chain = f"{ns}/sha256:blobchain"
    cri = {L.CRI_IMAGE_REF: image["ref"], L.CRI_LAYER_DIGEST: "sha256:" + image["blob_ids"][0],
           **(extra_labels or {})}
    with pytest.raises(grpc.RpcError) as err:
        stub.Prepare(pb.PrepareSnapshotRequest(key=blob_key, labels={
            L.TARGET_SNAPSHOT_REF: blob_chain, L.NYDUS_BLOB: "true", **cri}))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    boot_key = f"{ns}/2/extract-boot"
    boot_chain = f"{ns}/sha256:bootchain"
    labels = {L.TARGET_SNAPSHOT_REF: boot_chain, L.NYDUS_BOOTSTRAP: "true", **cri}
    resp = stub.Prepare(pb.PrepareSnapshotRequest(key=boot_key, parent=blob_chain, labels=labels))
    (m,) = resp.mounts
    # containerd unpacks the bootstrap layer tar (image/image.boot) into the mount
    upper = upper_of(m)
    os.makedirs(os.path.join(upper, "image"))
    if boot is None:
        shutil.copy(image["boot"], os.path.join(upper, "image", "image.boot"))
    else:
        Path(upper, "image", "image.boot").write_bytes(boot)
    stub.Commit(pb.CommitSnapshotRequest(key=boot_key, name=boot_chain, labels=labels))
    return boot_chain


def container_rootfs(snap: Snapshotter, parent: str, key: str, target: Path) -> None:
    resp = snap.stub().Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent))
    (m,) = resp.mounts
    assert m.type == "overlay"
    lower = next(o for o in m.options if o.startswith("lowerdir="))
    assert "/mnt" in lower, lower  # the RAFS mountpoint of the bootstrap snapshot
    target.mkdir(parents=True, exist_ok=True)
    mount_all([MountSpec(m.type, m.source, tuple(m.options))], str(target))


@contextmanager
def mounted_rootfs(snap: Snapshotter, parent: str, key: str, target: Path) -> Iterator[Path]:
    """``container_rootfs`` for the ``with`` block: the rootfs is unmounted after it."""
    container_rootfs(snap, parent, key, target)
    try:
        yield target
    finally:
        unmount_all(str(target))


def exists(snap: Snapshotter, key: str) -> bool:
    try:
        snap.stub().Stat(pb.StatSnapshotRequest(key=key))
        return True
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND, err
        return False


class FakeKubeAPI:
    """``GET /api/v1/secrets?fieldSelector=type=kubernetes.io/dockerconfigjson`` with a
    bearer token: the cluster's pull secrets, ``secrets`` (a list, or a function giving
    the list of the moment: a secret an operator rotates)."""

    def __init__(self, token: str,
                 secrets: list[dict[str, Any]] | Callable[[], list[dict[str, Any]]]) -> None:
        api = self
        self.token, self.secrets, self.lists = token, secrets, 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                ok = (self.headers.get("Authorization") == f"Bearer {api.token}" and
                      self.path == "/api/v1/secrets?fieldSelector="
                                   "type%3Dkubernetes.io%2Fdockerconfigjson")
                items = api.secrets() if callable(api.secrets) else api.secrets
                body = json.dumps({"kind": "SecretList", "apiVersion": "v1", "items": items}
                                  if ok else {"kind": "Status", "code": 401}).encode()
                api.lists += ok
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def pull_secret(ns: str, name: str, host: str, user: str, password: str) -> dict[str, Any]:
    """A ``kubernetes.io/dockerconfigjson`` secret with ``user:password`` for ``host``."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    cfg = json.dumps({"auths": {host: {"auth": auth}}}).encode()
    return {"metadata": {"namespace": ns, "name": name},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64.b64encode(cfg).decode()}}


def snapshotter_in_mode(tmp_path: Path, mode: str, driver: str = "fusedev") -> Iterator[Snapshotter]:
    """A started snapshotter whose daemon_mode is ``mode`` and fs_driver ``driver``, closed
    afterwards (for fixtures)."""
    config = tmp_path / "config.toml"
    config.write_text(f'version = 1\ndaemon_mode = "{mode}"\n[daemon]\nfs_driver = "{driver}"\n')
    s = Snapshotter(config=config)
    s.start()
    try:
        yield s
    finally:
        s.close()
