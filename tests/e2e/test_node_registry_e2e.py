"""Registry access as a node has it, through containerd's CRI and ``crictl``.

* Signatures: images converted with ``pynydus convert --sign-key`` run on a node with
  ``[image] validate_signature``; one signed with another key is refused at container
  create, and ``crictl`` prints the snapshotter's reason.

Against containerd 1.6 and 2.x (``containerd_version``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.convert.converter import ConvertOptions, convert
from tests.harness import images, oci
from tests.harness.cri import Crictl
from tests.harness.node import cri_node
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter

NS = "k8s.io"
SIGNATURE = "containerd.io/snapshot/nydus-signature"


def _rsa(d: Path, name: str) -> tuple[Path, Path]:
    priv, pub = d / f"{name}.pem", d / f"{name}.pub.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(priv), "2048"], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(priv), "-RSAPublicKey_out", "-out", str(pub)],
                   check=True, capture_output=True)
    return priv, pub


def create_fails(crictl: Crictl, pod_id: str, pod: str, name: str, image: str) -> str:
    """``crictl create`` that must fail; its error output."""
    import json

    cfg = crictl.ctrd.workdir / f"ctr-{pod}-{name}.json"
    cfg.write_text(json.dumps({"metadata": {"name": name}, "image": {"image": image},
                               "command": ["/bin/sleep", "inf"], "log_path": f"{name}.log",
                               "linux": {}}))
    r = crictl.run("create", pod_id, str(cfg), str(crictl.ctrd.workdir / f"pod-{pod}.json"),
                   check=False)
    assert r.returncode != 0, f"create of {image} succeeded: {r.stdout}"
    return r.stderr + r.stdout


@pytest.fixture(scope="module")
def signed_refs(registry: Registry, layered_image: tuple[str, oci.BuiltImage],
                small_image: tuple[str, oci.BuiltImage], layouts: Path) -> dict[str, str | Path]:
    """The layered image signed with the node's key, the small one with another key (a
    different image: the same bootstrap signed twice would be one snapshot, whose label
    is the first pull's, and its bytes are what the node's key signed)."""
    keys = layouts / "sigkeys"
    keys.mkdir(exist_ok=True)
    node_key, node_pub = _rsa(keys, "node")
    other_key, _ = _rsa(keys, "other")
    src, _ = layered_image
    good, other = registry.ref("e2e/signed", "node-key"), registry.ref("e2e/signed", "other-key")
    convert(ConvertOptions(source=src, target=good, source_insecure=True,
                           target_insecure=True, sign_key=str(node_key)))
    convert(ConvertOptions(source=small_image[0], target=other, source_insecure=True,
                           target_insecure=True, sign_key=str(other_key)))
    return {"good": good, "other": other, "pub": node_pub}


@pytest.fixture(scope="module")
def strict_node(registry: Registry, pause_ref: str, signed_refs: dict, containerd_version: str,
                layouts: Path) -> Iterator[tuple[Snapshotter, Crictl]]:
    with cri_node(registry, containerd_version,
                  f'version = 1\n[image]\nvalidate_signature = true\n'
                  f'public_key_file = "{signed_refs["pub"]}"\n',
                  sandbox_image=pause_ref) as (snap, ctrd):
        crictl = Crictl(ctrd)
        try:
            yield snap, crictl
        finally:
            crictl.remove_pods()


def test_signed_image_runs_and_one_signed_by_another_key_is_refused(
        strict_node: tuple[Snapshotter, Crictl], signed_refs: dict) -> None:
    snap, crictl = strict_node
    crictl.pull(signed_refs["good"])
    crictl.pull(signed_refs["other"])
    pod = crictl.runp("signed")
    err = create_fails(crictl, pod, "signed", "other", signed_refs["other"])
    assert SIGNATURE in err and "does not verify with the public key" in err, err
    cid = crictl.start_sleeper(pod, "signed", "good", signed_refs["good"])
    out = crictl.exec(cid, "sh", "-c", images.CHECK_SCRIPT)
    assert out.strip() == images.expected_check_output()
    assert len(snap.image_daemon_pids()) == 1
