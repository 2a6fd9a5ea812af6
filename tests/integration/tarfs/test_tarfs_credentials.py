"""tarfs reads a private image's layers with the snapshotter's keychain: the same
``[remote.auth]`` sources as Nydus images (here kubelet's credential provider plugins, a
source the docker config alone would not reach; the snapshotter has no docker config).
The password reaches no log, command line or readable file."""

from __future__ import annotations

import json
import secrets
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.leaks import find_leaks
from tests.harness.oci import MT_LAYER_GZIP, push
from tests.harness.registry import Registry, write_htpasswd
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import make_workdir, remove_tree

from .support import SETUPS, check_rootfs, config_text, pull_oci, rootfs

pytestmark = [pytest.mark.root]

USER = "tarfsuser"


def plugin(bin_dir: Path, host: str, secret: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    p = bin_dir / "node-creds"
    p.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import json, sys
        json.load(sys.stdin)
        print(json.dumps({{
            "kind": "CredentialProviderResponse",
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "cacheKeyType": "Registry", "cacheDuration": "0s",
            "auth": {{{host!r}: {{"username": {USER!r},
                                 "password": open({str(secret)!r}).read()}}}}}}))
        """))
    p.chmod(0o700)


def test_private_layers_are_read_with_the_keychains_credentials(tmp_path: Path) -> None:
    password = "tarfs-" + secrets.token_hex(10)
    work = make_workdir("tarfscred")
    try:
        img = images.layered_image()
        for layer in img.layers:
            layer.media_type = MT_LAYER_GZIP
        built = img.write_layout(work / "layout")
        htpasswd = write_htpasswd(work / "htpasswd", USER, password)
        with Registry(work / "reg", htpasswd=htpasswd) as reg:
            ref = reg.ref("private/tarfs-app")
            push(built, ref, creds=f"{USER}:{password}")
            secret = work / "secret"
            secret.write_text(password)
            secret.chmod(0o600)
            plugin(work / "plugins", reg.host, secret)
            cp = work / "cp.json"
            cp.write_text(json.dumps({
                "kind": "CredentialProviderConfig", "apiVersion": "kubelet.config.k8s.io/v1",
                "providers": [{"name": "node-creds", "matchImages": [reg.host],
                               "defaultCacheDuration": "0s",
                               "apiVersion": "credentialprovider.kubelet.k8s.io/v1"}]}))
            extra = ("[remote.auth]\nenable_kubelet_credential_providers = true\n"
                     f'credential_provider_config = "{cp}"\n'
                     f'credential_provider_bin_dir = "{work / "plugins"}"\n')
            config = work / "config.toml"
            config.write_text(config_text("blockdev-file", extra=extra))
            no_docker = work / "docker"
            no_docker.mkdir()
            with Snapshotter(config=config, env={
                    "PYNYDUS_TARFS_BACKING": SETUPS["blockdev-file"]["backing"],
                    "DOCKER_CONFIG": str(no_docker)}) as snap:
                image = {"ref": ref, "built": built, "registry": reg}
                top = pull_oci(snap, image)
                with rootfs(snap, top, "default/c1", tmp_path / "rootfs") as root:
                    check_rootfs(root)
                leaks = find_leaks({password.encode(): "password"}, [snap.workdir, reg.workdir])
                assert not leaks, "the registry secret leaked:\n" + "\n".join(leaks)
    finally:
        remove_tree(work)
