"""The HTTP API on the unix socket, shared mode, and start-up with an invalid config.

Contract: nydusd's shapes (GET /api/v1/daemon with state RUNNING, the metrics bodies
with their keys, 204 for an idle /inflight, errors as {"code", "message"}); a daemon
started without --bootstrap serves images mounted through POST /api/v1/mount as
subdirectories of its one FUSE mount, DELETE unmounts one and leaves the others; a
config with a wrong field is a non-zero exit whose message names the field, and
nothing is mounted.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.pynydusd import PYNYDUSD, fuse_mounted

from .conftest import Image, StartFn, build_image, localfs_config
from .test_localfs import V6_BOOT
from .trees import compare_trees

FOPS = ["getattr", "readlink", "open", "release", "read", "statfs", "getxattr", "listxattr",
        "opendir", "lookup", "readdir", "readdirplus", "access", "forget", "batch_forget"]


def test_daemon_info_and_metrics_shapes(full_image: Image, start_daemon: StartFn,
                                        workdir: Path) -> None:
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=localfs_config(full_image.blob_dir, workdir / "cache"),
                     extra_args=("--id", "dmn-1", "--supervisor", str(workdir / "sup.sock")))
    info = d.get("/api/v1/daemon")
    assert info["state"] == "RUNNING"
    assert info["id"] == "dmn-1"
    assert set(info["version"]) >= {"package_ver", "git_commit", "build_time", "profile", "rustc"}
    mount = info["backend_collection"]["/"]
    assert mount["backend_type"] == "Rafs" and mount["mountpoint"] == "/"
    assert "auth" not in json.dumps(mount["config"])  # no secrets in the API

    (d.mountpoint / "files/multi-chunk").read_bytes()
    fs = d.get("/api/v1/metrics")
    assert set(fs) >= {"files_account_enabled", "access_pattern_enabled", "measure_latency", "id",
                       "nr_opens", "data_read", "block_count_read", "fop_hits", "fop_errors",
                       "fop_cumulative_latency_total", "read_latency_dist"}
    assert len(fs["fop_hits"]) == len(FOPS) == len(fs["fop_errors"])
    assert fs["fop_hits"][FOPS.index("read")] >= 1
    assert fs["data_read"] >= (full_image.src / "files/multi-chunk").stat().st_size
    # the histograms hold every read (nydusd's buckets), each counted once
    reads = fs["fop_hits"][FOPS.index("read")]
    assert sum(fs["block_count_read"]) == reads == sum(fs["read_latency_dist"])
    assert fs["fop_cumulative_latency_total"][FOPS.index("read")] > 0
    backend = d.get("/api/v1/metrics/backend")
    assert set(backend) >= {"backend_type", "read_count", "read_errors", "read_amount_total",
                            "read_cumulative_latency_millis_total",
                            "read_cumulative_latency_millis_dist", "read_count_block_size_dist",
                            "read_latency_sizes_dist"}
    assert backend["backend_type"] == "localfs" and backend["read_count"] >= 1
    assert sum(backend["read_count_block_size_dist"]) == backend["read_count"]
    assert sum(map(sum, backend["read_latency_sizes_dist"])) == backend["read_count"]
    cache = d.get("/api/v1/metrics/blobcache")
    assert set(cache) >= {"id", "underlying_files", "store_path", "partial_hits", "whole_hits",
                          "total", "entries_count", "prefetch_data_amount",
                          "prefetch_requests_count", "prefetch_workers",
                          "prefetch_unmerged_chunks", "prefetch_cumulative_time_millis",
                          "prefetch_begin_time_secs", "prefetch_begin_time_millis",
                          "prefetch_end_time_secs", "prefetch_end_time_millis",
                          "buffered_backend_size", "data_all_ready"}
    assert cache["store_path"] == str(workdir / "cache")
    assert any(f.endswith(".blob.data.chunk_map") for f in cache["underlying_files"])
    assert cache["data_all_ready"] is False
    assert d.api("GET", "/api/v1/metrics/inflight") == (204, None)
    assert [f["path"] for f in d.get("/api/v1/metrics/files")] == ["/files/multi-chunk"]
    prom = d.api("GET", "/metrics")[1].decode()
    for name in ("nydusd_state", "nydusd_backend_read_bytes_total", "nydusd_cache_hits_total",
                 "nydusd_mounted_images"):
        assert name in prom
    assert 'nydusd_state{state="RUNNING"} 1.0' in prom
    backend_info = d.get("/api/v1/daemon/backend?mountpoint=/")
    assert backend_info["version"] == 6 and backend_info["blobs"] == [full_image.blob_id]


def test_localfs_dir_flag_serves_and_caches(full_image: Image, start_daemon: StartFn,
                                            workdir: Path) -> None:
    """``--localfs-dir DIR``: blobs are read from DIR and cached there; ``--readonly``
    (always so) makes writes fail with EROFS."""
    import errno

    d = start_daemon(bootstrap=full_image.bootstrap,
                     extra_args=("--localfs-dir", str(full_image.blob_dir), "--readonly"))
    assert compare_trees(full_image.src, d.mountpoint) == []
    assert (full_image.blob_dir / f"{full_image.blob_id}.blob.data.chunk_map").exists()
    with pytest.raises(OSError) as err:
        (d.mountpoint / "files/new").write_bytes(b"x")
    assert err.value.errno == errno.EROFS


def test_errors_log_level_and_exit(full_image: Image, start_daemon: StartFn,
                                   workdir: Path) -> None:
    d = start_daemon(bootstrap=full_image.bootstrap,
                     config=localfs_config(full_image.blob_dir, workdir / "cache"))
    status, body = d.api("GET", "/api/v1/nope")
    assert status == 404 and set(body) == {"code", "message"}
    status, body = d.api("PUT", "/api/v1/daemon", {"log_level": "shout"})
    assert status == 400 and "log_level" in body["message"]
    assert d.api("PUT", "/api/v1/daemon", {"log_level": "debug"}) == (204, None)
    status, body = d.api("PUT", "/api/v1/daemon/fuse/takeover")
    assert status == 400 and "--upgrade" in body["message"]  # a daemon started normally
    status, body = d.api("PUT", "/api/v1/daemon/fuse/sendfd")
    assert status == 400 and "--supervisor" in body["message"]
    # a dedicated daemon refuses API mounts
    status, body = d.api("POST", "/api/v1/mount?mountpoint=/x",
                         {"source": str(V6_BOOT), "fs_type": "rafs", "config": "{}"})
    assert status == 400
    assert d.api("PUT", "/api/v1/daemon/exit") == (204, None)
    assert d.wait_exit(15) == 0
    assert not fuse_mounted(d.mountpoint)


def _mount_body(boot: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    return {"source": str(boot), "fs_type": "rafs", "config": json.dumps(cfg)}


def test_shared_mode_two_images_then_umount_one(full_image: Image, start_daemon: StartFn,
                                                workdir: Path) -> None:
    (workdir / "noblobs").mkdir()
    d = start_daemon()  # no --bootstrap, no --config: shared mode
    assert os.listdir(d.mountpoint) == []
    assert d.api("POST", "/api/v1/mount?mountpoint=/a",
                 _mount_body(full_image.bootstrap,
                             localfs_config(full_image.blob_dir, workdir / "cache"))) == (204, None)
    assert d.api("POST", "/api/v1/mount?mountpoint=/b",
                 _mount_body(V6_BOOT, localfs_config(workdir / "noblobs",
                                                     workdir / "cache"))) == (204, None)
    assert sorted(os.listdir(d.mountpoint)) == ["a", "b"]
    # as nydusd (fuse-backend-rs Vfs): st_ino = (slot << 56) | nid, first image in slot 1
    from pynydus.rafs.read import open_bootstrap

    bs = open_bootstrap(str(full_image.bootstrap))
    try:
        nid = bs.lookup_path("/files/tiny")
    finally:
        bs.close()
    assert os.stat(d.mountpoint / "a/files/tiny").st_ino == (1 << 56) | nid
    assert os.stat(d.mountpoint / "b/etc").st_ino >> 56 == 2
    assert compare_trees(full_image.src, d.mountpoint / "a") == []
    assert os.readlink(d.mountpoint / "b/bin") == "usr/bin"
    assert len(list((d.mountpoint / "b/etc").iterdir())) > 50
    info = d.get("/api/v1/daemon")
    assert set(info["backend_collection"]) == {"/a", "/b"}
    # per-image metrics with ?id=
    assert d.get("/api/v1/metrics?id=/a")["data_read"] > 0
    assert d.get("/api/v1/metrics?id=/b")["data_read"] == 0
    # mounting the same name twice is an error, the first stays
    status, body = d.api("POST", "/api/v1/mount?mountpoint=/a",
                         _mount_body(V6_BOOT, localfs_config(workdir / "noblobs",
                                                             workdir / "cache")))
    assert status == 400 and "already" in body["message"]

    assert d.api("DELETE", "/api/v1/mount?mountpoint=/a") == (204, None)
    assert os.listdir(d.mountpoint) == ["b"]
    assert not (d.mountpoint / "a").exists()
    assert (d.mountpoint / "b/etc").is_dir()
    assert set(d.get("/api/v1/daemon")["backend_collection"]) == {"/b"}
    status, _ = d.api("DELETE", "/api/v1/mount?mountpoint=/a")
    assert status == 404
    # and /a can come back
    assert d.api("POST", "/api/v1/mount?mountpoint=/a",
                 _mount_body(full_image.bootstrap,
                             localfs_config(full_image.blob_dir, workdir / "cache"))) == (204, None)
    assert (d.mountpoint / "a/files/tiny").read_bytes() == \
        (full_image.src / "files/tiny").read_bytes()


def test_shared_mode_bad_mount_requests(start_daemon: StartFn, workdir: Path) -> None:
    d = start_daemon()
    status, body = d.api("POST", "/api/v1/mount?mountpoint=/x",
                         {"source": str(workdir / "missing.boot"), "fs_type": "rafs",
                          "config": json.dumps(localfs_config(workdir, workdir / "c"))})
    assert status == 404 and "missing.boot" in body["message"]
    status, body = d.api("POST", "/api/v1/mount?mountpoint=/x",
                         {"source": str(V6_BOOT), "fs_type": "rafs",
                          "config": json.dumps({"device": {"backend": {"type": "registry",
                                                                       "config": {}}}})})
    assert status == 400 and "host" in body["message"]
    status, _ = d.api("POST", "/api/v1/mount", {})
    assert status == 400
    assert os.listdir(d.mountpoint) == []


# --------------------------------------------------------------------- invalid config

BAD_CONFIGS = [
    # (config text, words the error must contain)
    (('{"device": {"backend": {"type": "registry", "config": {"repo": "r"}}, '
      '"cache": {"type": "blobcache", "config": {"work_dir": "/tmp"}}}}'), ["host"]),
    (('{"device": {"backend": {"type": "localfs", "config": {"dir": "/tmp"}}, '
      '"cache": {"type": "blobcache", "config": {"work_dir": "/tmp"}}}, "enable_xattr": "yes"}'),
     ["enable_xattr"]),
    (('{"device": {"backend": {"type": "localfs", "config": {"dir": "/tmp"}}, '
      '"cache": {"type": "memcache", "config": {}}}}'), ["memcache"]),
    (('{"device": {"backend": {"type": "localfs", "config": {"dir": "/tmp"}}, '
      '"cache": {"type": "blobcache", "config": {"work_dir": "/tmp"}}}, '
      '"fs_prefetch": {"enable": true, "threads_count": 0}}'), ["threads_count"]),
    (('{"device": {"backend": {"type": "registry", "config": {"host": "h", "repo": "r", '
      '"scheme": "ftp"}}, "cache": {"type": "blobcache", "config": {"work_dir": "/tmp"}}}}'),
     ["scheme"]),
    ('{"device": ', ["JSON"]),
]


@pytest.mark.parametrize("text,words", BAD_CONFIGS)
def test_invalid_config_exits_nonzero_naming_the_field(full_image: Image, workdir: Path,
                                                       text: str, words: list[str]) -> None:
    cfg = workdir / "bad.json"
    cfg.write_text(text)
    mnt = workdir / "mnt"
    mnt.mkdir()
    t0 = time.monotonic()
    r = subprocess.run([PYNYDUSD, "--mountpoint", str(mnt), "--bootstrap",
                        str(full_image.bootstrap), "--config", str(cfg),
                        "--apisock", str(workdir / "api.sock")],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode != 0
    for w in words:
        assert w in r.stderr, r.stderr
    assert time.monotonic() - t0 < 15
    assert not fuse_mounted(mnt)
    assert not (workdir / "api.sock").exists()


def test_bad_command_lines(workdir: Path, full_image: Image) -> None:
    """Errors before the mount exist (no bootstrap, a garbage one) exit with a message,
    not with a crash (they used to SIGSEGV in pyfuse3.close)."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    (workdir / "garbage.boot").write_bytes(b"not a bootstrap" * 100)
    for argv, words in (
            (["--mountpoint", str(mnt), "--no-such-flag"], ["unrecognized", "--no-such-flag"]),
            (["--bootstrap", str(full_image.bootstrap)], ["--mountpoint"]),
            (["--mountpoint", str(mnt), "--bootstrap", str(workdir / "nope.boot"),
              "--config", str(workdir / "nope.json")], ["nope.json"]),
            (["--mountpoint", str(mnt), "--thread-num", "0", "-D", str(workdir)],
             ["--thread-num"]),
            (["--mountpoint", str(mnt), "--bootstrap", str(workdir / "nope.boot"),
              "-D", str(workdir)], ["nope.boot"]),
            (["--mountpoint", str(mnt), "--bootstrap", str(workdir / "garbage.boot"),
              "-D", str(workdir), "--apisock", str(workdir / "api.sock")], ["magic"]),
    ):
        r = subprocess.run([PYNYDUSD, *argv], capture_output=True, text=True, timeout=30,
                           check=False)
        assert r.returncode > 0, (argv, r.returncode)
        for w in words:
            assert w in r.stderr, (argv, r.stderr)
        assert not fuse_mounted(mnt)
        assert not (workdir / "api.sock").exists()


def test_zstd_image_in_shared_mode_and_localfs_dir_flag(start_daemon: StartFn,
                                                        workdir: Path) -> None:
    """``-D DIR`` (localfs backend and cache in one directory), as nydusd's shortcut."""
    src = workdir / "src"
    src.mkdir()
    os.chmod(src, 0o755)
    (src / "f").write_bytes(b"z" * 3_000_000)
    img = build_image(src, workdir / "img", compressor="zstd")
    d = start_daemon(bootstrap=img.bootstrap, extra_args=("-D", str(img.blob_dir)))
    assert (d.mountpoint / "f").read_bytes() == b"z" * 3_000_000
    assert (img.blob_dir / f"{img.blob_id}.blob.data").exists()


def test_shared_mode_remount_while_old_file_is_open_shows_the_new_image(
        start_daemon: StartFn, workdir: Path) -> None:
    """Unmount /a while a process holds one of its files open, mount another image: the
    new image's file (same nid) must show its own size and bytes. With slots reused
    lowest-first the kernel answered from the old image's cached inode and pages."""
    images = {}
    for name, content in (("x", b"X" * 10_000), ("y", b"Y" * 20_000)):
        src = workdir / f"src-{name}"
        src.mkdir()
        os.chmod(src, 0o755)
        (src / "f").write_bytes(content)
        images[name] = build_image(src, workdir / f"img-{name}")
    d = start_daemon()

    def mount(name: str) -> None:
        img = images[name]
        assert d.api("POST", "/api/v1/mount?mountpoint=/a",
                     _mount_body(img.bootstrap, localfs_config(img.blob_dir,
                                                               workdir / "cache"))) == (204, None)

    mount("x")
    fd = os.open(d.mountpoint / "a/f", os.O_RDONLY)
    try:
        assert os.pread(fd, 5, 0) == b"XXXXX"
        assert d.api("DELETE", "/api/v1/mount?mountpoint=/a") == (204, None)
        mount("y")
        assert os.stat(d.mountpoint / "a/f").st_size == 20_000
        assert (d.mountpoint / "a/f").read_bytes() == b"Y" * 20_000
    finally:
        os.close(fd)
