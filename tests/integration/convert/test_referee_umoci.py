"""The converted image, refereed by an extraction that is not ours.

The source OCI image is fetched back from the registry with skopeo and unpacked with
``umoci unpack`` (its own tar reader, whiteout and hardlink handling). The Nydus image our
converter pushed is served by ``pynydusd`` from the registry (a real FUSE mount), and by
the kernel's EROFS from the same bootstrap and blobs. Each must equal umoci's rootfs
file by file (``tests/harness/treediff.py``: paths, so whiteouts applied; type, mode,
uid/gid, content, symlink targets, device numbers, xattrs, link counts, hardlink groups,
mtimes). None of pynydus's own readers (check-image, OverlayView) is involved.

Expected differences, each named where it is allowed: an mtime of 0 in the source is
shown by pynydusd as its start time (nydusd does the same), and the mount roots' own
mtimes are not the image's on either side.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.rafs.read import bootstrap_from_bytes
from tests.harness import tools
from tests.harness.pynydusd import Pynydusd
from tests.harness.registry import Registry
from tests.harness.treediff import Entry, scan, tree_diff
from tests.harness.util import make_workdir, remove_tree

from .conftest import client_for
from .test_pynydusd_mount import _converted

pytestmark = [pytest.mark.root]


@pytest.fixture(scope="module")
def umoci_rootfs(registry: Registry, layered: str) -> Iterator[Path]:
    """skopeo copy of the source image out of the registry, then ``umoci unpack``."""
    tools.require("skopeo", "umoci")
    work = make_workdir("umoci")
    try:
        layout = work / "layout"
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{layered}", f"oci:{layout}:src"], check=True,
                       capture_output=True, timeout=300)
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:src", str(work / "bundle")],
                       check=True, capture_output=True, timeout=300)
        yield work / "bundle" / "rootfs"
    finally:
        remove_tree(work)


def _mtime_comparable(rel: str, ref: Entry) -> bool:
    return rel != "" and ref.mtime != 0


@pytest.fixture
def mountdir() -> Iterator[Path]:
    d = make_workdir("ref")
    yield d
    remove_tree(d)


def test_pynydusd_serves_what_umoci_unpacks(registry: Registry, layered: str, umoci_rootfs: Path,
                                            mountdir: Path) -> None:
    boot = _converted(registry, layered, str(mountdir / "cache"), "nydus/refereed")
    (mountdir / "image.boot").write_bytes(boot)
    cfg = {"device": {"backend": {"type": "registry", "config": {
               "scheme": "http", "host": registry.host, "repo": "nydus/refereed",
               "timeout": 10, "connect_timeout": 10, "retry_limit": 2}},
               "cache": {"type": "blobcache", "config": {"work_dir": str(mountdir / "blobcache")}}},
           "mode": "direct", "enable_xattr": True}
    with Pynydusd(mountdir, bootstrap=mountdir / "image.boot", config=cfg) as d:
        diffs = tree_diff(umoci_rootfs, d.mountpoint, compare_mtime=_mtime_comparable)
    assert not diffs, "pynydusd's tree differs from umoci's unpack:\n" + "\n".join(diffs[:60])


def test_kernel_erofs_serves_what_umoci_unpacks(registry: Registry, layered: str,
                                                umoci_rootfs: Path, mountdir: Path) -> None:
    tools.require("fsck.erofs")
    from tests.integration.rafs.erofs_harness import fsck, materialize, mounted

    boot = _converted(registry, layered, str(mountdir / "cache"), "nydus/refereed-kernel")
    boot_path = mountdir / "image.boot"
    boot_path.write_bytes(boot)
    devices = []
    with bootstrap_from_bytes(boot) as bs, client_for(registry) as c:
        for b in bs.blobs:  # device order = blob table order
            raw = mountdir / f"{b.blob_id}.blob"
            raw.write_bytes(b"".join(c.get_blob("nydus/refereed-kernel", "sha256:" + b.blob_id)))
            dev = mountdir / f"{b.blob_id}.dev"
            materialize(raw, dev)
            devices.append(dev)
    fsck(boot_path, devices)
    with mounted(boot_path, devices) as mnt:
        diffs = tree_diff(umoci_rootfs, mnt, compare_mtime=lambda rel, e: rel != "")
    assert not diffs, "EROFS's tree differs from umoci's unpack:\n" + "\n".join(diffs[:60])


def test_the_referee_sees_a_difference(umoci_rootfs: Path, tmp_path: Path) -> None:
    """tree_diff is not blind: a copy of umoci's rootfs with one change of each kind."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(umoci_rootfs), str(copy)], check=True)
    (copy / "app/hello.txt").write_text("hello v1\n")  # the whiteout-era content
    (copy / "app/gone.txt").write_text("to be deleted\n")  # a whiteout not applied
    (copy / "app/hard2.txt").unlink()
    (copy / "app/hard2.txt").write_text("hardlinked\n")  # same content, no longer a link
    subprocess.run(["chown", "0:0", str(copy / "app/owned.txt")], check=True)
    os.removexattr(copy / "app/xattr.txt", "user.pynydus.test")
    os.chmod(copy / "app/ro.txt", 0o444)
    os.remove(copy / "app/sym")
    os.symlink("hello.txt", copy / "app/sym")
    diffs = "\n".join(tree_diff(umoci_rootfs, copy, compare_mtime=lambda rel, e: False))
    for expected in ("/app/hello.txt: digest", "/app/gone.txt: only in", "hardlink group only in",
                     "/app/owned.txt: uid", "/app/xattr.txt: xattrs", "/app/ro.txt: mode",
                     "/app/sym: link"):
        assert expected in diffs, diffs
    # and umoci's side has what the comparisons are about
    ref = scan(umoci_rootfs)
    assert dict(ref["app/xattr.txt"].xattrs) == {"trusted.pynydus.note": b"t",
                                                 "user.pynydus.test": b"value-1"}
    assert ref["app/hard1.txt"].ino == ref["app/hard2.txt"].ino
    assert (ref["app/owned.txt"].uid, ref["app/ro.txt"].mode) == (1000, 0o400)
    assert "app/gone.txt" not in ref and "app/opq/old1.txt" not in ref and "app/opq/new.txt" in ref
