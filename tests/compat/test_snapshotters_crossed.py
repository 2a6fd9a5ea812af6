"""Compatibility matrix cell 4: snapshotters crossed with daemons, through containerd 2.x.

* upstream ``containerd-nydus-grpc`` (v0.16.1) with ``pynydusd`` as its
  ``daemon.nydusd_path``: upstream's snapshotter starts our daemon with its own command
  line, talks to its API, mounts images through it;
* our ``pynydus snapshotter`` with upstream ``nydusd`` (2.2) as ``daemon.nydusd_path``.

Each in dedicated mode (a daemon per image) and shared mode (one daemon, images mounted
through its API), on a node driven as kubelet drives it (containerd 2.x's CRI, ``crictl``):
a Nydus image converted by ``pynydus convert`` into a local registry is pulled lazily
(only the bootstrap layer leaves the registry), a pod and a container run from it and
check their files (content, checksums, modes, links, whiteouts: ``images.CHECK_SCRIPT``),
and the node survives a restart of the snapshotter: the running container keeps reading
and a new container starts after it. ``ps`` shows the crossed daemon doing the work.

Upstream's binaries come from ``scripts/peers.sh``; a missing one is a failure naming
that script. Everything mounts FUSE and runs containers, so these tests need root.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pynydus.convert.converter import ConvertOptions, convert
from pynydus.rafs.read.open import bootstrap_from_bytes
from tests.harness import images, oci, tools
from tests.harness.containerd import Containerd
from tests.harness.cri import Crictl
from tests.harness.peers import peer_bin
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.upstream_snapshotter import UpstreamSnapshotter, daemon_processes
from tests.harness.util import make_workdir, remove_tree, wait_until

pytestmark = [pytest.mark.root, pytest.mark.e2e]

NS = "k8s.io"  # the CRI plugin's namespace
NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
BLOB_META_HEADER = 4096  # after a v6 blob's chunk-info table (rafs-nydusd-spec)


@dataclass(frozen=True)
class Case:
    snapshotter: str  # "upstream" (containerd-nydus-grpc) or "ours" (pynydus snapshotter)
    daemon: str       # "pynydusd" or "nydusd"
    mode: str         # "dedicated" or "shared"

    @property
    def id(self) -> str:
        snap = "nydus-snapshotter" if self.snapshotter == "upstream" else "pynydus-snapshotter"
        return f"{snap}+{self.daemon}-{self.mode}"


CASES = [Case("upstream", "pynydusd", "dedicated"), Case("upstream", "pynydusd", "shared"),
         Case("ours", "nydusd", "dedicated"), Case("ours", "nydusd", "shared")]


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    tools.require("/usr/bin/docker-registry", "skopeo", "runc", "/bin/busybox")
    with Registry(tag="xreg") as reg:
        yield reg


@pytest.fixture(scope="module")
def layouts() -> Iterator[Path]:
    d = make_workdir("ximg")
    try:
        yield d
    finally:
        remove_tree(d)


@pytest.fixture(scope="module")
def pause_ref(registry: Registry, layouts: Path) -> str:
    ref = registry.ref("x/pause", "3.10")
    oci.push(images.pause_image().write_layout(layouts / "pause"), ref)
    return ref


@pytest.fixture(scope="module")
def nydus_ref(registry: Registry, layouts: Path) -> str:
    src = registry.ref("x/layered", "oci")
    oci.push(images.layered_image().write_layout(layouts / "layered"), src)
    target = registry.ref("x/layered", "nydus")
    convert(ConvertOptions(source=src, target=target, source_insecure=True, target_insecure=True))
    return target


@pytest.fixture(scope="module")
def layers(registry: Registry, nydus_ref: str) -> tuple[list[str], str]:
    """(data blob digests, bootstrap layer digest) of the converted image."""
    name, tag = nydus_ref.split("/", 1)[1].rsplit(":", 1)
    req = urllib.request.Request(f"{registry.url}/v2/{name}/manifests/{tag}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        manifest = json.load(r)
    data = [l["digest"] for l in manifest["layers"] if NYDUS_BLOB in l.get("annotations", {})]
    boot = [l["digest"] for l in manifest["layers"]
            if NYDUS_BOOTSTRAP in l.get("annotations", {})]
    assert data and len(boot) == 1, manifest
    return data, boot[0]


@pytest.fixture(scope="module")
def blob_meta_sizes(registry: Registry, nydus_ref: str, layers: tuple[list[str], str]
                    ) -> dict[str, int]:
    """{data blob digest: bytes of its chunk-info table and the 4 KiB blob-meta header
    after it}: what nydusd reads of each blob when it mounts an image (its blob cache
    loads the chunk map of every blob then). Metadata, not file data: a pull that
    mounts the image early (ours does, at the bootstrap's commit) may fetch it."""
    _, boot_digest = layers
    name = nydus_ref.split("/", 1)[1].rsplit(":", 1)[0]
    with urllib.request.urlopen(f"{registry.url}/v2/{name}/blobs/{boot_digest}",
                                timeout=30) as r:
        layer = r.read()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        member = tar.extractfile("image/image.boot")
        assert member is not None
        boot = bootstrap_from_bytes(member.read())
    return {f"sha256:{b.blob_id}": b.ci_compressed_size + BLOB_META_HEADER
            for b in boot.blobs}


class Node:
    """containerd 2.x + a snapshotter (upstream's or ours) + crictl; which daemon runs."""

    def __init__(self, case: Case, snap: Snapshotter | UpstreamSnapshotter,
                 ctrd: Containerd, crictl: Crictl) -> None:
        self.case, self.snap, self.ctrd, self.crictl = case, snap, ctrd, crictl
        self.state: dict[str, object] = {}

    def daemons(self) -> dict[int, list[str]]:
        """{pid: argv} of the daemons this node's snapshotter runs."""
        return daemon_processes(self.snap.root)

    def snapshotter_log(self) -> str:
        return self.snap.log.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def node(request: pytest.FixtureRequest, registry: Registry, pause_ref: str
         ) -> Iterator[Node]:
    case: Case = request.param
    work = make_workdir("xcfg")
    snap: Snapshotter | UpstreamSnapshotter
    try:
        if case.snapshotter == "upstream":
            snap = UpstreamSnapshotter(daemon=case.daemon, daemon_mode=case.mode,
                                       log_level="debug", tag="xups")
        else:
            # nydusd 2.2 raises RLIMIT_NOFILE at start, which this container refuses
            # (EPERM): the wrapper keeps the limit (see tests/harness/upstream_snapshotter)
            wrapper = work / "nydusd"
            wrapper.write_text(f'#!/bin/sh\nexec {peer_bin("nydus-rs", "nydusd")} "$@" '
                               "--rlimit-nofile 0\n")
            wrapper.chmod(0o755)
            cfg = work / "config.toml"
            cfg.write_text(f'version = 1\ndaemon_mode = "{case.mode}"\n'
                           f'[daemon]\nnydusd_path = "{wrapper}"\n')
            snap = Snapshotter(config=cfg, tag="xsnap")
        with snap, Containerd(snap.socket, registry_hosts=[registry.host], cri=True,
                              namespace=NS, sandbox_image=pause_ref, version="2",
                              tag="xctrd") as ctrd:
            crictl = Crictl(ctrd)
            try:
                yield Node(case, snap, ctrd, crictl)
            finally:
                crictl.remove_pods()
    finally:
        remove_tree(work)


@pytest.fixture(scope="module")
def pulled(node: Node, registry: Registry, nydus_ref: str,
           layers: tuple[list[str], str]) -> dict[str, int]:
    data, boot = layers
    before = {d: registry.blob_bytes(d) for d in [*data, boot]}
    node.crictl.pull(nydus_ref)
    after = {d: registry.blob_bytes(d) for d in [*data, boot]}
    return {d: after[d] - before[d] for d in after}


@pytest.fixture(scope="module")
def running(node: Node, pulled: dict[str, int], nydus_ref: str) -> str:
    """A pod with one long-running container from the Nydus image: its id."""
    pod_id = node.crictl.runp("crossed")
    cid = node.crictl.start_sleeper(pod_id, "crossed", "app", nydus_ref)
    node.state["pod"] = pod_id
    return cid


def _check(node: Node, cid: str) -> None:
    out = node.crictl.exec(cid, "sh", "-c", images.CHECK_SCRIPT)
    assert out.strip() == images.expected_check_output(), node.snapshotter_log()


def test_pull_fetches_only_the_bootstrap(node: Node, pulled: dict[str, int],
                                         layers: tuple[list[str], str],
                                         blob_meta_sizes: dict[str, int]) -> None:
    """No chunk of file data leaves the registry at pull. Upstream nydusd reads each
    blob's chunk-info table when it mounts the image; that is all it may fetch then."""
    data, boot = layers
    for d in data:
        allowed = blob_meta_sizes[d] if node.case.daemon == "nydusd" else 0
        assert pulled[d] in (0, allowed), f"data blob {d}: {pulled[d]} bytes fetched at pull"
    assert pulled[boot] > 0
    content = node.ctrd.ctr_out("content", "ls", "-q", timeout=60)
    assert not any(d in content for d in data)


def test_container_runs_on_the_crossed_daemon_and_checks_its_files(
        node: Node, running: str, registry: Registry, layers: tuple[list[str], str]) -> None:
    data, _ = layers
    before = sum(registry.blob_bytes(d) for d in data)
    state = node.crictl.inspect(running)["status"]["state"]
    assert state == "CONTAINER_RUNNING"
    _check(node, running)
    assert sum(registry.blob_bytes(d) for d in data) - before >= 1 << 20, \
        "big.bin's chunks did not come from the registry at run time"
    daemons = node.daemons()
    assert daemons, f"no daemon under {node.snap.root}:\n{node.snapshotter_log()}"
    for argv in daemons.values():
        names = [os.path.basename(a) for a in argv[:2]]
        assert node.case.daemon in names, argv
        assert argv[names.index(node.case.daemon) + 1] == "fuse", argv
    node.state["daemons"] = sorted(daemons)


def node_image_daemons(node: Node) -> list[int]:
    """PIDs of the daemons serving an image: ours from its records (its idle spare left
    out), upstream's all (it keeps no spare)."""
    alive = sorted(node.daemons())
    if not isinstance(node.snap, Snapshotter):
        return alive
    serving_rows, rows = node.snap._daemons_db("SELECT DISTINCT daemon_id FROM instances",
                                               "SELECT record FROM daemons")
    serving = {r[0] for r in serving_rows}
    records = [json.loads(r[0]) for r in rows]
    return sorted(r["pid"] for r in records if r["id"] in serving and r["pid"] in alive)


def test_snapshotter_restart_keeps_the_container_and_starts_a_new_one(
        node: Node, running: str, nydus_ref: str) -> None:
    before = node_image_daemons(node)
    node.snap.restart()
    # the running container keeps reading (its daemon outlived the snapshotter)
    images.assert_quick_check(node.crictl.exec(running, "sh", "-c", images.QUICK_CHECK))
    node.ctrd.wait_snapshotter("nydus", timeout=60)
    # the image's daemon is the same process (a spare of ours may be replaced: one that
    # was still starting when the snapshotter stopped is not adopted)
    assert before and set(before) <= set(node_image_daemons(node)), \
        "the restart replaced the image's daemon"
    pod = str(node.state.get("pod") or node.crictl.runp("crossed"))
    cid = node.crictl.start_sleeper(pod, "crossed", "after-restart", nydus_ref)
    wait_until(lambda: node.crictl.inspect(cid)["status"]["state"] == "CONTAINER_RUNNING",
               30, "the container started after the restart")
    _check(node, cid)
    for argv in node.daemons().values():
        assert node.case.daemon in [os.path.basename(a) for a in argv[:2]], argv
