"""Compatibility matrix cell 5: the nydusd HTTP API across implementations.

* upstream ``nydusctl`` drives ``pynydusd``: ``info``, ``metrics backend|cache|fsstats``
  (text and ``--raw``), ``set log-level``, ``mount``/``umount`` through the API. Our
  ``nydusctl`` prints the same bytes as upstream's against the same daemon.
* our daemon manager (:mod:`pynydus.manager`) drives upstream ``nydusd``: start it,
  wait for RUNNING, mount an image (built by our builder) through the API, read it,
  read the metrics, unmount, stop.

Upstream's binaries come from ``scripts/peers.sh``; a missing one is a failure naming
that script. Everything mounts FUSE, so these tests need root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pynydus.manager.client import DaemonClient
from pynydus.manager.manager import DaemonManager
from pynydus.manager.store import DaemonRecord, DaemonStore
from pynydus.rafs.builder import build
from tests.harness.peers import peer_bin
from tests.harness.pynydusd import Pynydusd, force_unmount, fuse_mounted
from tests.harness.util import make_workdir, remove_tree, stop_recorded

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: FUSE mounts"),
]

OUR_NYDUSCTL = str(Path(sys.executable).with_name("nydusctl"))


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = make_workdir("capi")
    try:
        yield d
    finally:
        stop_recorded(d)
        remove_tree(d)


@pytest.fixture
def image(workdir: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """(bootstrap, blob dir, {path: content}) of a small image from our builder."""
    src = workdir / "src"
    files = {"etc/hello.txt": b"hello from pynydus\n", "data/big.bin": os.urandom(3 << 20),
             "data/small.txt": b"x" * 5000}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (workdir / "blobs").mkdir()
    build(str(src), str(workdir / "image.boot"), str(workdir / "blobs"), compressor="zstd")
    return workdir / "image.boot", workdir / "blobs", files


def daemon_config(blob_dir: Path, cache_dir: Path) -> dict[str, Any]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    return {"device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                       "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}}},
            "mode": "direct", "digest_validate": False, "enable_xattr": True}


def nydusctl(exe: str, sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe, "--sock", str(sock), *args], capture_output=True, text=True,
                          timeout=60, check=False, stdin=subprocess.DEVNULL)


def upstream_nydusctl() -> str:
    return str(peer_bin("nydus-rs", "nydusctl"))


# --------------------------------------------------------------------------- nydusctl → pynydusd

REPORTS = [("info",), ("--raw", "info"), ("metrics", "backend"), ("--raw", "metrics", "backend"),
           ("metrics", "cache"), ("metrics", "--raw", "cache"), ("metrics", "fsstats"),
           ("--raw", "metrics", "fsstats")]


def test_upstream_nydusctl_reads_pynydusd_and_ours_prints_the_same(
        workdir: Path, image: tuple[Path, Path, dict[str, bytes]]) -> None:
    boot, blobs, files = image
    with Pynydusd(workdir, name="dedicated", bootstrap=boot,
                  config=daemon_config(blobs, workdir / "cache")) as d:
        assert (d.mountpoint / "etc/hello.txt").read_bytes() == files["etc/hello.txt"]
        assert (d.mountpoint / "data/big.bin").read_bytes() == files["data/big.bin"]
        up = upstream_nydusctl()
        for args in REPORTS:
            theirs = nydusctl(up, d.apisock, *args)
            ours = nydusctl(OUR_NYDUSCTL, d.apisock, *args)
            assert theirs.returncode == 0, (args, theirs.stdout + theirs.stderr)
            assert ours.returncode == 0, (args, ours.stdout + ours.stderr)
            assert ours.stdout == theirs.stdout, args
        info = nydusctl(up, d.apisock, "info").stdout
        assert "Status:                 \"RUNNING\"" in info
        assert "\tInstance Mountpoint:  /\n\tType:  Rafs\n" in info
        assert "\tMode:  direct\n" in info
        raw = json.loads(nydusctl(up, d.apisock, "--raw", "info").stdout)
        config = raw["backend_collection"]["/"]["config"]
        assert config["version"] == 2 and config["backend"]["type"] == "localfs"
        backend = nydusctl(up, d.apisock, "metrics", "backend").stdout
        assert 'Backend Type:       "localfs"' in backend
        fs = json.loads(nydusctl(up, d.apisock, "--raw", "metrics", "fsstats").stdout)
        assert fs["data_read"] >= len(files["data/big.bin"])
        for exe in (up, OUR_NYDUSCTL):
            r = nydusctl(exe, d.apisock, "set", "log-level", "debug")
            assert r.returncode == 0 and r.stdout == "", r.stderr
            bad = nydusctl(exe, d.apisock, "set", "log-level", "chatty")
            assert bad.returncode == 1 and "log_level" in bad.stderr, bad.stderr


def test_upstream_nydusctl_mounts_and_unmounts_in_pynydusd(
        workdir: Path, image: tuple[Path, Path, dict[str, bytes]]) -> None:
    boot, blobs, files = image
    cfg = workdir / "mount.json"
    cfg.write_text(json.dumps(daemon_config(blobs, workdir / "cache")))
    up = upstream_nydusctl()
    with Pynydusd(workdir, name="shared") as d:
        for exe, sub in ((up, "/theirs"), (OUR_NYDUSCTL, "/ours")):
            r = nydusctl(exe, d.apisock, "mount", "-s", str(boot), "-c", str(cfg), "-m", sub,
                         "-t", "rafs")
            assert r.returncode == 0, r.stdout + r.stderr
            got = (d.mountpoint / sub.lstrip("/") / "data/small.txt").read_bytes()
            assert got == files["data/small.txt"]
        info = json.loads(nydusctl(up, d.apisock, "--raw", "info").stdout)
        assert set(info["backend_collection"]) == {"/theirs", "/ours"}
        listing = nydusctl(up, d.apisock, "info").stdout
        assert listing.count("\tType:  Rafs\n") == 2
        assert nydusctl(up, d.apisock, "umount", "/theirs").returncode == 0
        assert nydusctl(OUR_NYDUSCTL, d.apisock, "umount", "/ours").returncode == 0
        info = json.loads(nydusctl(OUR_NYDUSCTL, d.apisock, "--raw", "info").stdout)
        assert info["backend_collection"] == {}
        # a second umount: the daemon's 404 is a failure (exit 1) for both clients
        for exe in (up, OUR_NYDUSCTL):
            again = nydusctl(exe, d.apisock, "umount", "/ours")
            assert again.returncode == 1 and "not mounted" in again.stderr, again.stderr


def test_nydusctl_usage_errors_and_unreachable_daemon_exit_like_upstreams(
        workdir: Path) -> None:
    up = upstream_nydusctl()
    missing = workdir / "no.sock"
    for args, rc in ((("info",), 1), (("metrics", "bogus"), 2), (("set", "colour", "x"), 2),
                     (("set", "log-level"), 2), (("mount", "-s", "x"), 2)):
        theirs = nydusctl(up, missing, *args)
        ours = nydusctl(OUR_NYDUSCTL, missing, *args)
        assert theirs.returncode == ours.returncode == rc, (args, theirs.stderr, ours.stderr)
    no_sock = [subprocess.run([exe, "info"], capture_output=True, text=True, timeout=30,
                              check=False) for exe in (up, OUR_NYDUSCTL)]
    assert [r.returncode for r in no_sock] == [2, 2]
    assert "--sock" in no_sock[1].stderr


# --------------------------------------------------------------------------- our manager → nydusd

def test_our_manager_drives_upstream_nydusd(
        workdir: Path, image: tuple[Path, Path, dict[str, bytes]]) -> None:
    boot, blobs, files = image
    nydusd = str(peer_bin("nydus-rs", "nydusd"))
    store = DaemonStore(workdir / "daemons.db")
    # nydusd raises RLIMIT_NOFILE to 1,000,000 at start; this container's hard limit is
    # lower and setrlimit fails with EPERM, so a wrapper adds --rlimit-nofile 0 (leave
    # it unchanged). It must follow the subcommand: nydusd 2.2 does not recognise
    # "fuse" after a global option.
    wrapper = workdir / "nydusd"
    wrapper.write_text(f'#!/bin/sh\nexec {nydusd} "$@" --rlimit-nofile 0\n')
    wrapper.chmod(0o755)
    manager = DaemonManager(store, command=[str(wrapper)])
    rec = DaemonRecord(id="up-nydusd", mode="shared", mountpoint=str(workdir / "mnt"),
                       api_socket=str(workdir / "api.sock"), config_path="", bootstrap="",
                       log_file=str(workdir / "nydusd.log"))
    try:
        live = manager.start_daemon(rec)
        client: DaemonClient = live.client
        assert client.state() == "RUNNING"
        assert fuse_mounted(rec.mountpoint)
        config = json.dumps(daemon_config(blobs, workdir / "cache"))
        client.mount("/img1", str(boot), config)
        root = Path(rec.mountpoint) / "img1"
        for rel, data in files.items():
            assert (root / rel).read_bytes() == data, rel
        info = client.info()
        assert set(info["backend_collection"]) == {"/img1"}
        assert info["state"] == "RUNNING"
        fs = client.metrics()
        assert fs["data_read"] >= sum(len(d) for d in files.values())
        backend = client.metrics("backend")
        assert backend["backend_type"] == "localfs" and backend["read_count"] >= 1
        cache = client.blobcache_metrics()
        assert cache["store_path"] == str(workdir / "cache")
        client.set_log_level("debug")
        client.umount("/img1")
        assert client.info()["backend_collection"] == {}
    finally:
        manager.destroy_daemon(rec.id)
        manager.close()
        force_unmount(rec.mountpoint)
    assert not fuse_mounted(rec.mountpoint)
    assert store.daemons() == []
