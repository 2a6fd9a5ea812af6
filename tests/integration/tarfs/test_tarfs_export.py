"""``export_mode``: block images of tarfs layers and images, with dm-verity data.

Contract (upstream's docs/tarfs.md and ``ExportBlockData``): ``layer_*`` modes write
``<cache>/<layer blob id>.layer.disk`` for every layer and label the layer
``nydus-layer-block``; ``image_*`` modes write ``<cache>/<top blob id>.image.disk`` when
a container is prepared and label the top layer ``nydus-image-block``. A disk is the
bootstrap with every tar at its mapped block address: EROFS mounts it alone. With
verity (``*_with_verity``, ``*_verity_only``; upstream writes the disk for these too)
the label is ``<data blocks>,<hash offset>,sha256:<root hash>`` and the hash tree
follows the data in the same file. Device-mapper is absent here, so the tree is checked
in userspace by ``veritysetup verify`` (cryptsetup-bin), and ``veritysetup format`` of
the same data must give the same root hash; a flipped byte must fail the check.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pynydus import labels as L
from pynydus.host.erofs import mount_erofs, umount_erofs
from pynydus.tarfs.verity import parse_block_info
from tests.harness import tools
from tests.harness.snapshotter import Snapshotter

from .support import check_rootfs, labels_of, pull_oci, rootfs

pytestmark = [pytest.mark.root]

MODES = ["layer_verity_only", "image_verity_only", "layer_block", "image_block",
         "layer_block_with_verity", "image_block_with_verity"]


def _verity_args(info: str) -> tuple[list[str], str]:
    blocks, offset, root = parse_block_info(info)
    return (["--no-superblock", "--format=1", "-s", "", "--hash=sha256",
             "--data-block-size=512", "--hash-block-size=4096", "--data-blocks", str(blocks),
             "--hash-offset", str(offset)], root)


def verify(disk: Path, info: str) -> subprocess.CompletedProcess[str]:
    args, root = _verity_args(info)
    return subprocess.run(["veritysetup", "verify", *args, str(disk), str(disk), root],
                          capture_output=True, text=True, timeout=300, check=False)


def _same_root_as_veritysetup_format(disk: Path, info: str, tmp: Path) -> None:
    blocks, _, root = parse_block_info(info)
    data = tmp / "data"
    with open(disk, "rb") as src, open(data, "wb") as dst:
        dst.write(src.read(blocks * 512))
    args, _ = _verity_args(info)
    args = [a for a in args if a not in ("--hash-offset",)]
    args.remove(str(parse_block_info(info)[1]))
    r = subprocess.run(["veritysetup", "format", *args, str(data), str(tmp / "hash")],
                       capture_output=True, text=True, timeout=300, check=True)
    assert f"Root hash:      \t{root}" in r.stdout, r.stdout


def _mounted_disk_has(disk: Path, tmp: Path, present: dict[str, bytes], absent: list[str]) -> None:
    mnt = tmp / "disk-mnt"
    mnt.mkdir(exist_ok=True)
    mount_erofs(str(disk), [], str(mnt), "file")  # flat: no devices
    try:
        for rel, data in present.items():
            assert (mnt / rel).read_bytes() == data, rel
        for rel in absent:
            assert not (mnt / rel).exists(), rel
    finally:
        umount_erofs(str(mnt))


@pytest.mark.parametrize("mode", MODES)
def test_export_mode_writes_disks_and_labels(
        start_tarfs: Callable[..., Snapshotter], oci_image: dict, tmp_path: Path,
        mode: str) -> None:
    tools.require("veritysetup")
    snap = start_tarfs("blockdev-file", export_mode=mode)
    built = oci_image["built"]
    top = pull_oci(snap, oci_image)
    with rootfs(snap, top, "default/c", tmp_path / "r") as root:
        check_rootfs(root)
    cache = snap.root / "cache"
    verity = "verity" in mode
    if mode.startswith("layer"):
        checked = []
        for chain, desc in zip(built.chain_ids, built.layers, strict=True):
            blob = str(desc["digest"]).split(":", 1)[1]
            disk = cache / f"{blob}.layer.disk"
            assert disk.is_file(), sorted(p.name for p in cache.iterdir())
            info = labels_of(snap, f"default/{chain}").get(L.NYDUS_LAYER_BLOCK, "")
            checked.append((disk, info))
        assert not list(cache.glob("*.image.disk"))
        # the top layer alone: its own files, and its parents' not there
        _mounted_disk_has(checked[-1][0], tmp_path, {"app/v3.txt": b"three\n"},
                          ["app/keep.txt"])
    else:
        top_blob = str(built.layers[-1]["digest"]).split(":", 1)[1]
        disk = cache / f"{top_blob}.image.disk"
        assert disk.is_file(), sorted(p.name for p in cache.iterdir())
        assert not list(cache.glob("*.layer.disk"))
        checked = [(disk, labels_of(snap, top).get(L.NYDUS_IMAGE_BLOCK, ""))]
        _mounted_disk_has(disk, tmp_path, {"app/hello.txt": b"hello v2\n",
                                           "app/v3.txt": b"three\n", "app/keep.txt": b"keep\n"},
                          ["app/gone.txt", "app/dir-gone"])
    for disk, info in checked:
        if not verity:
            assert info == "", info  # upstream's empty value; containerd stores no empty label
            continue
        r = verify(disk, info)
        assert r.returncode == 0, r.stdout + r.stderr
        _same_root_as_veritysetup_format(disk, info, tmp_path)
    if verity:  # a flipped byte in the data must fail the check
        disk, info = checked[-1]
        bad = tmp_path / "bad.disk"
        shutil.copyfile(disk, bad)
        with open(bad, "r+b") as f:
            f.seek(2048)
            b = f.read(1)
            f.seek(2048)
            f.write(bytes([b[0] ^ 0xFF]))
        assert verify(bad, info).returncode != 0
