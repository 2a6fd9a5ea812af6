"""Kubernetes' own client, ``crictl``, drives a node whose CRI snapshotter is ours.

kubelet talks to containerd only through the CRI; ``crictl`` sends the same calls. A
Nydus image pulled with ``crictl pull`` fetches only its bootstrap from the registry; a
pod sandbox (``runp``) and a container from the image (``create`` + ``start``) run, the
container's files arriving chunk by chunk; ``stats``, ``imagefsinfo`` and ``rmi`` report
what the snapshotter holds; a private image pulled with ``crictl pull --creds`` runs.
Against containerd 1.6 and 2.x (``containerd_version``).

Pods use the host network (there is no CNI here) and a sandbox ("pause") image built
from busybox and served by the test registry (there is no registry.k8s.io either).
"""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterator

import pytest

from pynydus.convert.converter import ConvertOptions, convert
from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.cri import Crictl
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import make_workdir, remove_tree, wait_until

NS = "k8s.io"  # the CRI plugin's namespace
NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"


def layer_digests(registry: Registry, ref: str) -> tuple[list[str], str]:
    """(data blob digests, bootstrap layer digest) from the image's manifest."""
    name, tag = ref.split("/", 1)[1].rsplit(":", 1)
    req = urllib.request.Request(f"{registry.url}/v2/{name}/manifests/{tag}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        layers = json.load(r)["layers"]
    data = [l["digest"] for l in layers if NYDUS_BLOB in l.get("annotations", {})]
    boot = [l["digest"] for l in layers if NYDUS_BOOTSTRAP in l.get("annotations", {})]
    assert data and len(boot) == 1, layers
    return data, boot[0]


@pytest.fixture(scope="module")
def nydus_ref(registry: Registry, layered_image: tuple[str, oci.BuiltImage]) -> str:
    src, _ = layered_image
    target = registry.ref("e2e/layered", "nydus-cri")
    convert(ConvertOptions(source=src, target=target, source_insecure=True, target_insecure=True))
    return target


@pytest.fixture(scope="module")
def node(registry: Registry, pause_ref: str, containerd_version: str
         ) -> Iterator[tuple[Snapshotter, Containerd, Crictl]]:
    """A node: our snapshotter as the CRI's snapshotter, crictl on containerd's socket."""
    with Snapshotter() as snap, Containerd(
            snap.socket, registry_hosts=[registry.host], cri=True, namespace=NS,
            sandbox_image=pause_ref, stats_period_s=1, version=containerd_version) as ctrd:
        crictl = Crictl(ctrd)
        try:
            yield snap, ctrd, crictl
        finally:
            crictl.remove_pods()


@pytest.fixture(scope="module")
def pulled(node: tuple[Snapshotter, Containerd, Crictl], registry: Registry,
           nydus_ref: str) -> dict:
    _snap, _ctrd, crictl = node
    data, boot = layer_digests(registry, nydus_ref)
    before = {d: registry.blob_bytes(d) for d in [*data, boot]}
    image_id = crictl.pull(nydus_ref)
    after = {d: registry.blob_bytes(d) for d in [*data, boot]}
    return {"data": data, "boot": boot, "before": before, "after": after, "id": image_id}


@pytest.fixture(scope="module")
def pod(node: tuple[Snapshotter, Containerd, Crictl], pulled: dict, nydus_ref: str
        ) -> dict:
    """A pod with one long-running container from the Nydus image, started."""
    _snap, _ctrd, crictl = node
    pod_id = crictl.runp("lazy")
    cid = crictl.start_sleeper(pod_id, "lazy", "app", nydus_ref)
    return {"pod": pod_id, "cid": cid}


def test_crictl_pull_fetches_only_the_bootstrap(node, pulled: dict, nydus_ref: str) -> None:
    _snap, ctrd, crictl = node
    for d in pulled["data"]:
        assert pulled["after"][d] == pulled["before"][d], f"data blob {d} was fetched at pull"
    assert pulled["after"][pulled["boot"]] > pulled["before"][pulled["boot"]]
    content = ctrd.ctr_out("content", "ls", "-q")
    assert not any(d in content for d in pulled["data"])
    assert pulled["id"].startswith("sha256:")
    listed = {tag for img in crictl.images() for tag in img.get("repoTags") or []}
    assert nydus_ref in listed


def test_pod_and_container_run_lazily(node, pulled: dict, pod: dict, registry: Registry) -> None:
    snap, _ctrd, crictl = node
    state = crictl.inspect(pod["cid"])["status"]["state"]
    assert state == "CONTAINER_RUNNING"
    started = {d: registry.blob_bytes(d) for d in pulled["data"]}
    out = crictl.exec(pod["cid"], "sh", "-c", images.CHECK_SCRIPT)
    assert out.strip() == images.expected_check_output()
    fetched = sum(registry.blob_bytes(d) - pulled["after"][d] for d in pulled["data"])
    assert fetched > 0, "the container's files came from nowhere"
    # the 1 MiB big.bin was read only by the check: its chunks came after the start
    assert sum(registry.blob_bytes(d) - started[d] for d in pulled["data"]) >= 1 << 20
    assert len(snap.image_daemon_pids()) == 1


def test_stats_and_imagefsinfo_report_the_snapshotter(node, pulled: dict, pod: dict) -> None:
    """``crictl stats``: the container's writable layer is the Usage of its active snapshot
    in our snapshotter; ``imagefsinfo``: the Usage of the image's snapshots, summed (both
    collected by containerd every second here)."""
    _snap, _ctrd, crictl = node
    crictl.exec(pod["cid"], "sh", "-c", "head -c 300000 /app/big.bin >/written.bin")

    def writable() -> int:
        for s in crictl.stats():
            if s["attributes"]["id"] == pod["cid"]:
                return int(s["writableLayer"]["usedBytes"]["value"])
        return 0

    wait_until(lambda: writable() >= 300000, 30, "crictl stats to show the written file")
    fs = crictl.imagefsinfo()["imageFilesystems"]
    assert fs, "no image filesystem reported"
    used = int(fs[0]["usedBytes"]["value"])
    inodes = int(fs[0]["inodesUsed"]["value"])
    # the bootstrap layer (busybox's ~400 applets among the files) and the pause image
    assert used > 100_000 and inodes > 100, fs[0]


def test_rmi_removes_the_image_and_its_snapshots(node, pulled: dict, pod: dict,
                                                 nydus_ref: str) -> None:
    """Last here. ``crictl rmi`` of an image a container still runs (kubelet's image GC
    checks use itself; the CRI does not): the image goes, the container keeps its rootfs
    and its daemon. Once the pods go, containerd's GC removes every snapshot from ours and
    the image's daemon stops."""
    snap, ctrd, crictl = node
    crictl.rmi(nydus_ref)
    assert nydus_ref not in {t for i in crictl.images() for t in i.get("repoTags") or []}
    assert crictl.exec(pod["cid"], "cat", "/app/keep.txt").strip() == "keep"
    assert snap.image_daemon_pids()
    crictl.remove_pods()
    left = [i["id"] for i in crictl.images()]  # the sandbox image
    if left:
        crictl.rmi(*left)

    def empty() -> bool:
        return not snap.list_names() and not snap.image_daemon_pids()

    wait_until(empty, 60, "snapshots and daemons of the removed images to go")
    assert ctrd.ctr_out("snapshots", "--snapshotter", "nydus", "ls").splitlines()[1:] == []


def test_private_image_pulled_with_creds_runs(registry: Registry, pause_ref: str,
                                             layered_image: tuple[str, oci.BuiltImage],
                                             containerd_version: str) -> None:
    """A registry with basic auth: ``crictl pull`` without credentials fails, with
    ``--creds`` it pulls (bootstrap only) and a pod runs the image. containerd does not
    hand the CRI's credentials to a snapshotter, so the snapshotter reads them where
    upstream's does by default, docker's config.json (``DOCKER_CONFIG``)."""
    user, password = "kube", "pr1vate-pw"
    work = make_workdir("crireg")
    try:
        docker_cfg = work / "docker"
        docker_cfg.mkdir()
        with images.private_nydus_copy(work, layered_image[0], user, password) as (private, ref):
            auth = base64.b64encode(f"{user}:{password}".encode()).decode()
            (docker_cfg / "config.json").write_text(json.dumps(
                {"auths": {private.host: {"auth": auth}}}))
            with Snapshotter(env={"DOCKER_CONFIG": str(docker_cfg)}) as snap, Containerd(
                    snap.socket, registry_hosts=[registry.host, private.host], cri=True,
                    namespace=NS, sandbox_image=pause_ref,
                    version=containerd_version) as ctrd:
                crictl = Crictl(ctrd)
                try:
                    anon = crictl.run("pull", ref, check=False)
                    assert anon.returncode != 0, "an anonymous pull of a private image worked"
                    crictl.pull(ref, creds=f"{user}:{password}")
                    cid = crictl.start_sleeper(crictl.runp("private"), "private", "app", ref)
                    images.assert_quick_check(crictl.exec(cid, "sh", "-c", images.QUICK_CHECK))
                finally:
                    crictl.remove_pods()
    finally:
        remove_tree(work)

