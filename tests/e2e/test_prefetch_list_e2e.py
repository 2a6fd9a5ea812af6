"""Prefetch lists end to end: learned on one node, pushed beside the image, used by another.

Node A (a snapshotter and containerd of its own) pulls a Nydus image through the CRI, as
kubelet does; no list exists, so its daemon prefetches nothing. ``pynydus optimize IMAGE
--run --push`` starts a throwaway container of it (``ctr run``), reads the trace of the
daemon serving it and pushes the list as an OCI artifact referring to the image, whose
digest does not change (distribution has no referrers API: the fallback tag holds it).
Node B (new snapshotter, containerd and cache) pulls the same image: its snapshotter finds
the list and its daemon prefetches those chunks right after the mount, before any
container reads; the same start-up on B then asks the registry for less than on A.

The learned path without ``optimize``: node A's snapshotter is configured to record
(``[experimental.prefetch_list] record``, ``push``): its first container of the image
is the start-up recorded, and the snapshotter pushes the list itself; node B prefetches
it. Both through containerd 1.6 and 2.x.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pynydus.cli.main import main
from pynydus.cli.optimize_cmd import find_daemon
from pynydus.convert.converter import ConvertOptions, convert
from pynydus.daemon import prefetchlist
from pynydus.manager.client import DaemonClient
from pynydus.registry import RegistryClient
from pynydus.registry.referrers import fallback_tag
from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.cri import CriImages
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter

NS = "k8s.io"
VERSIONS = [pytest.param("1.6", id="ctrd1.6"), pytest.param("2", id="ctrd2")]


def _daemon(snap: Snapshotter, ref: str) -> tuple[DaemonClient, str]:
    deadline = time.monotonic() + 30
    while True:
        try:
            sock, mp = find_daemon(str(snap.root), ref)
            return DaemonClient(sock), mp
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _run(ctrd: Containerd, ref: str, cid: str) -> str:
    try:
        return ctrd.ctr_out("run", "--rm", "--snapshotter", "nydus", ref, cid, "sh", "-c",
                            images.CHECK_SCRIPT, timeout=180).strip()
    finally:
        ctrd.ctr("tasks", "rm", "-f", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)


@pytest.mark.parametrize("containerd_version", VERSIONS)
def test_a_list_learned_on_one_node_prefetches_on_another(
        registry: Registry, layered_image: tuple[str, oci.BuiltImage],
        containerd_version: str) -> None:
    src, _ = layered_image
    repo = f"e2e/pflist-{containerd_version}"  # each version's run has its own image
    ref = registry.ref(repo, "nydus")
    convert(ConvertOptions(source=src, target=ref, source_insecure=True, target_insecure=True))
    with RegistryClient(registry.host, scheme="http") as c:
        digest = c.head_manifest(repo, "nydus").digest

    with Snapshotter() as snap, Containerd(snap.socket, registry_hosts=[registry.host], cri=True,
                                           namespace=NS, version=containerd_version) as ctrd:
        CriImages(str(ctrd.socket)).pull(ref)
        client, mp = _daemon(snap, ref)
        time.sleep(1.0)  # a lookup that found nothing left the daemon alone
        assert client.metrics("blobcache", mp)["prefetch_data_amount"] == 0
        assert main(["optimize", ref, "--run", "--address", str(ctrd.socket), "--namespace", NS,
                     "--ctr", ctrd.ctr_bin, "--node-root", str(snap.root), "--push",
                     "--cmd", "sh", "-c", images.CHECK_SCRIPT]) == 0
        a_reads = client.metrics("backend", mp)["read_count"]
        assert a_reads > 0
        trace = client.metrics("trace", mp)
    plist = prefetchlist.from_trace(trace)
    assert any(p.startswith("/app/") for p in plist.files)

    with RegistryClient(registry.host, scheme="http") as c:
        assert c.head_manifest(repo, "nydus").digest == digest  # the image is unchanged
        index = c.get_manifest(repo, fallback_tag(digest)).data
        assert prefetchlist.ARTIFACT_TYPE.encode() in index

    _node_b_prefetches(registry, ref, containerd_version, plist, a_reads)


def _node_b_prefetches(registry: Registry, ref: str, containerd_version: str,
                       plist: prefetchlist.PrefetchList, a_reads: int) -> None:
    """A new node pulls ``ref``: its daemon prefetches ``plist`` before any container
    reads, and the start-up then asks the registry for less than on node A."""
    with Snapshotter() as snap, Containerd(snap.socket, registry_hosts=[registry.host], cri=True,
                                           namespace=NS, version=containerd_version) as ctrd:
        CriImages(str(ctrd.socket)).pull(ref)
        client, mp = _daemon(snap, ref)
        deadline = time.monotonic() + 60
        while client.metrics("blobcache", mp)["prefetch_data_amount"] < plist.compressed_bytes:
            assert time.monotonic() < deadline, "node B's daemon did not prefetch the list"
            time.sleep(0.1)
        before = client.metrics("backend", mp)["read_count"]
        assert _run(ctrd, ref, "pf-b") == images.expected_check_output()
        b_reads = client.metrics("backend", mp)["read_count"] - before
        assert b_reads < a_reads, (b_reads, a_reads)


@pytest.mark.parametrize("containerd_version", VERSIONS)
def test_a_node_records_its_first_containers_list_and_pushes_it(
        registry: Registry, layered_image: tuple[str, oci.BuiltImage], tmp_path: Path,
        containerd_version: str) -> None:
    """experimental.prefetch_list.record, .push and .record_timeout: node A's snapshotter
    learns the list from its first container of the image and pushes it; node B uses it."""
    src, _ = layered_image
    repo = f"e2e/pfrec-{containerd_version}"
    ref = registry.ref(repo, "nydus")
    convert(ConvertOptions(source=src, target=ref, source_insecure=True, target_insecure=True))
    with RegistryClient(registry.host, scheme="http") as c:
        digest = c.head_manifest(repo, "nydus").digest
    cfg = tmp_path / "snapshotter.toml"
    cfg.write_text('version = 1\n[experimental.prefetch_list]\nrecord = true\npush = true\n'
                   'record_timeout = "20s"\n')
    with Snapshotter(config=cfg) as snap, Containerd(
            snap.socket, registry_hosts=[registry.host], cri=True, namespace=NS,
            version=containerd_version) as ctrd:
        CriImages(str(ctrd.socket)).pull(ref)
        client, mp = _daemon(snap, ref)
        assert _run(ctrd, ref, "pf-a") == images.expected_check_output()
        a_reads = client.metrics("backend", mp)["read_count"]
        deadline = time.monotonic() + 60
        while True:  # the start-up goes quiet, the snapshotter records and pushes
            with RegistryClient(registry.host, scheme="http") as c:
                try:
                    index = c.get_manifest(repo, fallback_tag(digest)).data
                except Exception:  # noqa: BLE001 - not pushed yet
                    index = b""
            if prefetchlist.ARTIFACT_TYPE.encode() in index:
                break
            assert time.monotonic() < deadline, "node A did not push a list"
            time.sleep(0.2)
        (saved,) = (snap.root / "prefetch-lists").iterdir()
        plist = prefetchlist.parse(saved.read_bytes())
        assert any(p.startswith("/app/") for p in plist.files) and plist.compressed_bytes
    with RegistryClient(registry.host, scheme="http") as c:
        assert c.head_manifest(repo, "nydus").digest == digest  # the image is unchanged
    _node_b_prefetches(registry, ref, containerd_version, plist, a_reads)
