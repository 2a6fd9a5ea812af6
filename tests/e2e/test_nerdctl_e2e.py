"""nerdctl (the ``nerdctl`` peer of ``scripts/peers.sh``) with our snapshotter as containerd's
``nydus`` proxy plugin, as docs/nydus.md of nerdctl sets it up.

* ``nerdctl --snapshotter nydus pull``: nerdctl labels the layers for a remote
  snapshotter (the ``cri.*`` labels of containerd's ``AppendInfoHandlerWrapper`` on 1.6's
  client-side pull; on 2.x its pull goes through the transfer service, which labels them
  because the proxy exports ``enable_remote_snapshot_annotations``): only the bootstrap
  layer is downloaded, no data blob reaches containerd's content store.
* ``nerdctl --snapshotter nydus run --net none``: the container starts with only the
  bootstrap fetched, and reads its files lazily: a small file costs a small part of the
  data blobs, and the whole check script sees the reference rootfs.

Against containerd 1.6 and 2.x (``containerd_version``).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pynydus.convert.converter import ConvertOptions, convert
from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.peers import peer_bin
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter

SNAP = "nydus"
IMAGE_REF = "containerd.io/snapshot/cri.image-ref"


@pytest.fixture(scope="module")
def nydus_image(registry: Registry, layered_image: tuple[str, oci.BuiltImage]) -> dict:
    """The layered check image converted: its reference, data blobs (digest -> size)
    and bootstrap layer digest."""
    src, _ = layered_image
    ref = registry.ref("e2e/layered", "nydus-nerdctl")
    convert(ConvertOptions(source=src, target=ref, source_insecure=True, target_insecure=True))
    manifest = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True, capture_output=True, text=True).stdout)
    layers = manifest["layers"]
    data = {ly["digest"]: ly["size"] for ly in layers
            if "containerd.io/snapshot/nydus-blob" in ly.get("annotations", {})}
    (boot,) = [ly["digest"] for ly in layers
               if "containerd.io/snapshot/nydus-bootstrap" in ly.get("annotations", {})]
    return {"ref": ref, "data": data, "boot": boot}


class Nerdctl:
    """``nerdctl`` against one private containerd, with state of its own."""

    def __init__(self, ctrd: Containerd) -> None:
        self.bin = str(peer_bin("nerdctl", "nerdctl"))
        self.ctrd = ctrd
        self.data_root = ctrd.workdir / "nerdctl"
        self.env = {**os.environ, "NERDCTL_TOML": str(ctrd.workdir / "nerdctl.toml")}

    def run(self, *args: str, timeout: float = 180) -> str:
        argv = [self.bin, "--address", str(self.ctrd.socket), "--namespace",
                self.ctrd.namespace, "--data-root", str(self.data_root), "--hosts-dir",
                str(self.ctrd.certs_d), "--cgroup-manager", "cgroupfs",
                "--insecure-registry", "--snapshotter", SNAP, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=self.env, check=False)
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
        return proc.stdout


def snapshot_labels(ctrd: Containerd) -> list[dict[str, str]]:
    out = []
    for line in ctrd.ctr_out("snapshots", "--snapshotter", SNAP, "ls").splitlines()[1:]:
        info = json.loads(ctrd.ctr_out("snapshots", "--snapshotter", SNAP, "info",
                                       line.split()[0]))
        out.append(info.get("Labels") or {})
    return out


def test_nerdctl_pull_and_run_are_lazy(snapshotter: Snapshotter, containerd: Containerd,
                                       registry: Registry, nydus_image: dict) -> None:
    ref, data, boot = nydus_image["ref"], nydus_image["data"], nydus_image["boot"]
    nerdctl = Nerdctl(containerd)
    before = {d: (registry.blob_gets(d), registry.blob_bytes(d)) for d in data}
    boot_gets = registry.blob_gets(boot)
    nerdctl.run("pull", "--quiet", ref)
    # only the bootstrap was downloaded; containerd's content store has no data layer
    assert {d: (registry.blob_gets(d), registry.blob_bytes(d)) for d in data} == before
    assert registry.blob_gets(boot) > boot_gets
    content = containerd.ctr_out("content", "ls", "-q")
    assert boot in content and not any(d in content for d in data)
    # the remote-snapshotter labels reached the snapshotter
    mine = [lb for lb in snapshot_labels(containerd) if lb.get(IMAGE_REF) == ref]
    assert any("containerd.io/snapshot/nydus-bootstrap" in lb for lb in mine), mine
    # a container that reads one small file (and busybox) leaves the 1 MiB file unfetched
    out = nerdctl.run("run", "--rm", "--net", "none", ref, "cat", "/app/v3.txt")
    assert out.strip() == "three"
    assert snapshotter.image_daemon_pids()

    def fetched() -> int:
        return sum(registry.blob_bytes(d) - before[d][1] for d in data)
    small = fetched()
    assert 0 < small < sum(data.values()) - len(images.BIG) // 2, (small, data)
    # the whole rootfs is the reference one, the big file fetched now
    out = nerdctl.run("run", "--rm", "--net", "none", ref, "sh", "-c", images.CHECK_SCRIPT)
    assert out.strip() == images.expected_check_output()
    assert fetched() - small >= len(images.BIG) // 2


def test_nerdctl_images_and_rmi(containerd: Containerd, nydus_image: dict) -> None:
    """The pulled image is listed and removed as any other."""
    nerdctl = Nerdctl(containerd)
    ref = nydus_image["ref"]
    nerdctl.run("pull", "--quiet", ref)
    assert ref in nerdctl.run("images", "--format", "{{.Repository}}:{{.Tag}}")
    nerdctl.run("rmi", ref)
    assert ref not in nerdctl.run("images", "--format", "{{.Repository}}:{{.Tag}}")
