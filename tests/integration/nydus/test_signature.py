"""``[image] validate_signature``: only images whose bootstrap signature verifies are mounted.

The snapshotter runs with ``validate_signature = true`` and ``public_key_file``; the
bootstrap layer's snapshot carries ``containerd.io/snapshot/nydus-signature`` as containerd
copies it from the layer annotation. A signed image mounts and reads; an unsigned one and
one signed with another key are refused at Prepare with PERMISSION_DENIED and a message
naming the label (what ``crictl create`` prints); the snapshotter goes on serving.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pynydus import labels as L
from pynydus.signature import load_private_key, sign_bootstrap
from tests.harness.snapshotter import Snapshotter

from .support import container_rootfs, mounted_rootfs, pull_nydus_image

pytestmark = [pytest.mark.root]


def _rsa(d: Path, name: str) -> tuple[Path, Path]:
    priv, pub = d / f"{name}.pem", d / f"{name}.pub.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(priv), "2048"], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(priv), "-RSAPublicKey_out", "-out", str(pub)],
                   check=True, capture_output=True)
    return priv, pub


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sigkeys")
    priv, pub = _rsa(d, "node")
    other, _ = _rsa(d, "other")
    return {"priv": priv, "pub": pub, "other": other}


@pytest.fixture
def snapshotters() -> Iterator[list[Snapshotter]]:
    started: list[Snapshotter] = []
    yield started
    for s in started:
        s.close()


def _signature(key: Path, boot: Path) -> str:
    return sign_bootstrap(load_private_key(str(key)), boot.read_bytes())


def test_validate_signature_mounts_only_signed_bootstraps(
        snapshotters: list[Snapshotter], image: dict, signing: dict[str, Path],
        tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'version = 1\n[image]\nvalidate_signature = true\n'
                      f'public_key_file = "{signing["pub"]}"\n')
    snap = Snapshotter(config=config)
    snapshotters.append(snap)
    snap.start()
    refused = {
        "ns-unsigned": ({}, "the image has no bootstrap signature"),
        "ns-other": ({L.NYDUS_SIGNATURE: _signature(signing["other"], image["boot"])},
                     f"does not verify with the public key {signing['pub']}"),
    }
    for ns, (labels, message) in refused.items():
        top = pull_nydus_image(snap, image, ns, extra_labels=labels)
        with pytest.raises(grpc.RpcError) as err:
            container_rootfs(snap, top, f"{ns}/9/c", tmp_path / ns)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
        assert message in str(err.value.details()), err.value.details()
        assert L.NYDUS_SIGNATURE in str(err.value.details())
    assert not [r for r in snap.daemon_records() if r["mode"] not in ("standby",)], \
        "a refused image got a daemon"

    # the snapshotter keeps serving: the signed image mounts and reads
    good = {L.NYDUS_SIGNATURE: _signature(signing["priv"], image["boot"])}
    top = pull_nydus_image(snap, image, "ns-signed", extra_labels=good)
    with mounted_rootfs(snap, top, "ns-signed/9/c", tmp_path / "rootfs") as rootfs:
        data = (rootfs / "data/big.bin").read_bytes()
        assert hashlib.sha256(data).hexdigest() == image["big_sha"]
