"""``pynydus convert --sign-key``: the bootstrap layer carries upstream's signature annotation.

The annotation (``containerd.io/snapshot/nydus-signature``) is base64 of RSA PKCS#1 v1.5
over the SHA-256 of ``image/image.boot``, the file containerd unpacks: ``openssl dgst
-verify`` with the public key accepts it. A key that is not RSA stops the run before any
registry work.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

from pynydus.convert.pack import bootstrap_from_layer
from tests.harness import tools
from tests.harness.registry import Registry

from .conftest import client_for, convert_args, pynydus

SIGNATURE = "containerd.io/snapshot/nydus-signature"


def test_sign_key_signs_the_bootstrap_as_upstream_verifies(
        registry: Registry, layered: str, cache_dir: str, tmp_path: Path) -> None:
    key, pub = tmp_path / "key.pem", tmp_path / "pub.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True)
    dst = registry.ref("nydus/signed", "v1")
    r = pynydus(*convert_args(layered, dst, cache_dir, "--sign-key", str(key)))
    assert r.rc == 0, r.err
    with client_for(registry) as c:
        m = json.loads(c.get_manifest("nydus/signed", "v1").data)
        boot_layer = m["layers"][-1]
        boot = bootstrap_from_layer(b"".join(c.get_blob("nydus/signed", boot_layer["digest"])))
    sig = base64.b64decode(boot_layer["annotations"][SIGNATURE])
    (tmp_path / "image.boot").write_bytes(boot)
    (tmp_path / "sig").write_bytes(sig)
    tools.require("openssl")
    v = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature",
                        str(tmp_path / "sig"), str(tmp_path / "image.boot")],
                       capture_output=True, text=True, check=False)
    assert v.returncode == 0 and "Verified OK" in v.stdout, v.stdout + v.stderr
    assert all(SIGNATURE not in (lyr.get("annotations") or {}) for lyr in m["layers"][:-1])


def test_sign_key_that_is_not_rsa_stops_before_registry_work(
        registry: Registry, layered: str, cache_dir: str, tmp_path: Path) -> None:
    ec = tmp_path / "ec.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
                    str(ec)], check=True, capture_output=True)
    before = len(registry.requests())
    r = pynydus(*convert_args(layered, registry.ref("nydus/ec", "v1"), cache_dir,
                              "--sign-key", str(ec)))
    assert r.rc == 2, (r.rc, r.err)
    assert f"sign key {ec}" in r.err and "not an RSA key" in r.err
    assert len(registry.requests()) == before
