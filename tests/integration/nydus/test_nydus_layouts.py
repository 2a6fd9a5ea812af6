"""Remote mounts in every shape containerd asks for, through the snapshotter's socket.

- a View of the image (what ``ctr snapshots view`` and image checks use): overlay with
  the RAFS mount and the view's own empty dir as lowers, read-only;
- ``daemon_mode = "none"``: one ``fuse.nydus-overlayfs`` mount carrying ``extraoption``
  (bootstrap, daemon config, snapshot dir) for a runtime that starts its own daemon,
  which our helper mounts as overlay;
- layers committed on top of the image (a build on a Nydus image): their ``fs`` dirs sit
  above the RAFS mount in ``lowerdir``, newest first, whiteouts and all.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pynydus.api import mount_pb2
from pynydus.api import snapshots_pb2 as pb
from pynydus.host.mount import MountSpec, mount_all, unmount_all
from tests.harness.snapshotter import Snapshotter

from .support import pull_nydus_image

pytestmark = [pytest.mark.root]


def _mount(m: mount_pb2.Mount, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    mount_all([MountSpec(m.type, m.source, tuple(m.options))], str(target))


def _on_rafs(snap: Snapshotter, path: str) -> bool:
    """``path`` is the image served by a daemon: another filesystem than the root's, with
    the image's files."""
    return (os.stat(path).st_dev != os.stat(snap.root).st_dev
            and os.path.isfile(os.path.join(path, "etc/hello.txt")))


def _lowers(m: mount_pb2.Mount) -> list[str]:
    opt = next(o for o in m.options if o.startswith("lowerdir="))
    return opt[len("lowerdir="):].split(":")


def test_remote_view_is_the_image_read_only(snap: Snapshotter, image: dict, tmp_path: Path) -> None:
    top = pull_nydus_image(snap, image)
    stub = snap.stub()
    (m,) = stub.View(pb.ViewSnapshotRequest(key="default/v1", parent=top)).mounts
    assert m.type == "overlay"
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in m.options), m
    lowers = _lowers(m)
    assert len(lowers) == 2 and _on_rafs(snap, lowers[0]), lowers
    assert lowers[1].endswith("/fs"), lowers  # overlay wants two lowers when it has no upper
    (again,) = stub.Mounts(pb.MountsRequest(key="default/v1")).mounts
    assert (again.type, again.source, list(again.options)) == (m.type, m.source, list(m.options))
    target = tmp_path / "view"
    _mount(m, target)
    try:
        assert (target / "etc/hello.txt").read_text() == "hello from a lazily pulled image\n"
        assert hashlib.sha256((target / "data/big.bin").read_bytes()).hexdigest() == image["big_sha"]
        with pytest.raises(OSError) as err:
            (target / "etc/new").write_text("x")
        assert err.value.errno == errno.EROFS
    finally:
        unmount_all(str(target))
    info = stub.Stat(pb.StatSnapshotRequest(key="default/v1")).info
    assert info.kind == pb.VIEW and info.parent == top


def test_daemon_mode_none_hands_extraoption_to_the_helper(image: dict, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('version = 1\ndaemon_mode = "none"\n')
    with Snapshotter(config=config) as snap:
        top = pull_nydus_image(snap, image)
        (m,) = snap.stub().Prepare(pb.PrepareSnapshotRequest(key="default/3/c1", parent=top)).mounts
        assert (m.type, m.source) == ("fuse.nydus-overlayfs", "overlay"), m
        (extra,) = [o[len("extraoption="):] for o in m.options if o.startswith("extraoption=")]
        payload = json.loads(base64.b64decode(extra))
        assert set(payload) == {"source", "config", "snapshotdir", "fs_version"}, payload
        assert payload["fs_version"] == "v6"
        assert Path(payload["source"]).read_bytes() == Path(image["boot"]).read_bytes()
        assert payload["snapshotdir"] == str(Path(payload["source"]).parents[2])
        daemon_cfg = json.loads(payload["config"])
        backend = daemon_cfg["device"]["backend"]
        assert backend["type"] == "registry"
        assert backend["config"]["host"] == image["registry"].host
        assert backend["config"]["repo"] == "test/nydus-app"
        # the upstream quirk we keep: with fusedev a daemon still serves the image
        assert len(snap.image_daemon_pids()) == 1
        target = tmp_path / "rootfs"
        target.mkdir()
        r = subprocess.run([sys.executable, "-m", "pynydus.cli.overlayfs", "overlay", str(target),
                            "-o", ",".join(m.options)], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        try:
            assert (target / "data/small.txt").read_text() == "small\n"
            (target / "etc/new").write_text("container's own\n")
            upper = next(o for o in m.options if o.startswith("upperdir="))[len("upperdir="):]
            assert Path(upper, "etc/new").read_text() == "container's own\n"
        finally:
            unmount_all(str(target))


def _write_layer(snap: Snapshotter, key: str, parent: str, name: str, tmp_path: Path,
                 change: dict[str, str | None]) -> None:
    """Prepare ``key`` over ``parent``, make ``change`` (path -> text, None deletes),
    commit it as ``name``: what a build step does."""
    stub = snap.stub()
    (m,) = stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent)).mounts
    target = tmp_path / key.replace("/", "_")
    _mount(m, target)
    try:
        for rel, text in change.items():
            p = target / rel
            if text is None:
                p.unlink()
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(text)
    finally:
        unmount_all(str(target))
    stub.Commit(pb.CommitSnapshotRequest(key=key, name=name))


def test_layers_committed_above_the_bootstrap_are_in_the_rootfs(snap: Snapshotter, image: dict,
                                                                tmp_path: Path) -> None:
    top = pull_nydus_image(snap, image)
    _write_layer(snap, "default/3/build1", top, "default/built1", tmp_path, {
        "app/new.txt": "built on nydus\n", "data/small.txt": "changed\n", "etc/hello.txt": None})
    _write_layer(snap, "default/4/build2", "default/built1", "default/built2", tmp_path, {
        "data/small.txt": "changed twice\n", "app/second.txt": "2\n"})
    stub = snap.stub()
    (m,) = stub.Prepare(pb.PrepareSnapshotRequest(key="default/5/run", parent="default/built2")).mounts
    lowers = _lowers(m)
    assert len(lowers) == 3, lowers  # built2, built1, then the RAFS mount
    assert lowers[0].endswith("/fs") and lowers[1].endswith("/fs") and _on_rafs(snap, lowers[2])
    assert os.path.exists(os.path.join(lowers[0], "app/second.txt"))  # newest first
    assert os.path.exists(os.path.join(lowers[1], "app/new.txt"))
    target = tmp_path / "run"
    _mount(m, target)
    try:
        assert (target / "app/new.txt").read_text() == "built on nydus\n"
        assert (target / "app/second.txt").read_text() == "2\n"
        assert (target / "data/small.txt").read_text() == "changed twice\n"
        assert not (target / "etc/hello.txt").exists()  # the build's whiteout hides it
        assert os.readlink(target / "data/link") == "../etc/hello.txt"
        assert hashlib.sha256((target / "data/big.bin").read_bytes()).hexdigest() == image["big_sha"]
        assert sorted(os.listdir(target / "etc")) == []
    finally:
        unmount_all(str(target))
    # a View of the built image sees the same
    (v,) = stub.View(pb.ViewSnapshotRequest(key="default/v-built", parent="default/built2")).mounts
    assert _lowers(v)[:3] == lowers
    view = tmp_path / "view"
    _mount(v, view)
    try:
        assert (view / "data/small.txt").read_text() == "changed twice\n"
        assert not (view / "etc/hello.txt").exists()
    finally:
        unmount_all(str(view))
