"""A private Nydus image through the snapshotter with each credential source it asks itself,
and the bad input of each.

The image's blob is in a ``docker-registry`` with htpasswd (basic) auth, and in one with
distribution's token auth (our JWT token server). The snapshot labels carry
no credentials; the snapshotter finds them through:

- a docker ``credHelpers`` program (``docker-credential-*`` on the snapshotter's PATH);
- kubelet's image credential provider plugins (``[remote.auth]
  enable_kubelet_credential_providers`` with kubelet's config file and bin dir).

The container's reads work, and the password goes to no log, command line or file other
users can read. Bad input fails the image's Prepare with PERMISSION_DENIED naming the
source, in bounded time, while the snapshotter serves another image meanwhile: a wrong
password, a helper that hangs (killed after 10 s), a helper that prints garbage, a plugin
that errs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pynydus.host.mount import unmount_all
from pynydus.registry.client import RegistryClient
from tests.harness.leaks import find_leaks
from tests.harness.registry import Registry, write_htpasswd
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import all_cmdlines, make_workdir, remove_tree, wait_until
from tests.integration.registry.servers import TokenServer

from .support import REPO, FakeKubeAPI, container_rootfs, pull_nydus_image, pull_secret

pytestmark = [pytest.mark.root]

USER = "nodeuser"
PASSWORD = "pw-" + secrets.token_hex(12)
NEEDLES = {PASSWORD.encode(): "password",
           base64.b64encode(f"{USER}:{PASSWORD}".encode()): "base64(user:password)"}


@pytest.fixture(scope="module")
def private(image: dict) -> Iterator[dict]:
    """The session image's blob in a registry that wants USER/PASSWORD."""
    work = make_workdir("credsrc")
    try:
        htpasswd = write_htpasswd(work / "htpasswd", USER, PASSWORD)
        with Registry(work / "reg", htpasswd=htpasswd) as reg:
            auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            with RegistryClient(reg.host, scheme="http", auth=auth) as client:
                for blob, blob_id in zip(image["blobs"], image["blob_ids"], strict=True):
                    client.push_blob(REPO, blob, "sha256:" + blob_id)
            yield {**image, "ref": f"{reg.host}/{REPO}:latest", "registry": reg, "work": work}
    finally:
        remove_tree(work)


@pytest.fixture(scope="module")
def private_token(image: dict) -> Iterator[dict]:
    """The session image's blob in a registry with token auth (USER/PASSWORD at its
    token server)."""
    work = make_workdir("credtok")
    ts = TokenServer(work, users={USER: PASSWORD})
    try:
        with Registry(work / "reg", auth_yaml=ts.registry_auth_yaml()) as reg:
            auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            with RegistryClient(reg.host, scheme="http", auth=auth) as client:
                for blob, blob_id in zip(image["blobs"], image["blob_ids"], strict=True):
                    client.push_blob(REPO, blob, "sha256:" + blob_id)
            yield {**image, "ref": f"{reg.host}/{REPO}:latest", "registry": reg, "work": work,
                   "token_server": ts}
    finally:
        ts.stop()
        remove_tree(work)


def program(d: Path, name: str, body: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    p.chmod(0o700)
    return p


def helper_answering(d: Path, name: str, host: str, user: str, secret_file: Path) -> None:
    """``docker-credential-<name>``: the secret comes from a 0600 file, not its source."""
    program(d, f"docker-credential-{name}", f"""
        import json, sys
        server = sys.stdin.read().strip()
        if sys.argv[1:] != ["get"] or server != {host!r}:
            print("credentials not found in native keychain")
            sys.exit(1)
        secret = open({str(secret_file)!r}).read().strip()
        print(json.dumps({{"ServerURL": server, "Username": {user!r}, "Secret": secret}}))
        """)


def secret_file(work: Path, value: str) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    p = work / "secret"
    p.write_text(value)
    p.chmod(0o600)
    return p


def read_big(snap: Snapshotter, image: dict, top: str, key: str, rootfs: Path) -> None:
    container_rootfs(snap, top, key, rootfs)
    try:
        data = (rootfs / "data/big.bin").read_bytes()
        assert hashlib.sha256(data).hexdigest() == image["big_sha"]
    finally:
        unmount_all(str(rootfs))


def refused(snap: Snapshotter, image: dict, ns: str, tmp_path: Path) -> tuple[str, float]:
    """Pull and prepare a container: Prepare must fail with PERMISSION_DENIED; its
    message and how long Prepare took."""
    top = pull_nydus_image(snap, image, ns)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        container_rootfs(snap, top, f"{ns}/9/c", tmp_path / ns)
    took = time.monotonic() - t0
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
    return str(err.value.details()), took


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_docker_credential_helper(auth: str, request: pytest.FixtureRequest,
                                  tmp_path: Path) -> None:
    """The helper's user and password reach the registry (basic auth), or the token server
    whose bearer token the daemon then reads with. A wrong password is refused at Prepare
    naming the helper, in bounded time."""
    image: dict = request.getfixturevalue("private" if auth == "basic" else "private_token")
    reg: Registry = image["registry"]
    ts: TokenServer | None = image.get("token_server")
    work = make_workdir("credhelp")
    try:
        bin_dir = work / "bin"
        helper_answering(bin_dir, "node", reg.host, USER, secret_file(work, PASSWORD))
        helper_answering(bin_dir, "wrongpw", reg.host, USER, secret_file(work / "w", "nope"))
        docker = work / "docker"
        docker.mkdir()
        cfg = docker / "config.json"
        cfg.write_text(json.dumps({"credHelpers": {reg.host: "node"}}))
        env = {"DOCKER_CONFIG": str(docker), "PATH": f"{bin_dir}:/usr/bin:/bin"}
        with Snapshotter(env=env) as snap:
            issued = ts.issued if ts else 0
            read_big(snap, image, pull_nydus_image(snap, image), "default/9/c",
                     tmp_path / "r1")
            if ts:
                assert ts.issued > issued, "no token was asked for"
            leaks = find_leaks(NEEDLES, [snap.workdir, work, reg.workdir])
            assert not leaks, "the registry secret leaked:\n" + "\n".join(leaks)
            cfg.write_text(json.dumps({"credHelpers": {reg.host: "wrongpw"}}))
            message, took = refused(snap, image, "ns-wrong", tmp_path)
            assert f"registry {reg.host} refused the credentials from " \
                f"docker-credential-wrongpw (credHelpers of {cfg})" in message, message
            assert took < 30, f"Prepare took {took:.0f} s"
    finally:
        remove_tree(work)


def test_kubelet_credential_provider_plugin(private: dict, tmp_path: Path) -> None:
    reg: Registry = private["registry"]
    work = make_workdir("credplug")
    try:
        plugins = work / "plugins"
        secret = secret_file(work, PASSWORD)
        program(plugins, "node-creds", f"""
            import json, sys
            req = json.load(sys.stdin)
            assert req["image"] == {private["ref"]!r}, req
            print(json.dumps({{
                "kind": "CredentialProviderResponse",
                "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                "cacheKeyType": "Registry", "cacheDuration": "1m",
                "auth": {{{reg.host!r}: {{"username": {USER!r},
                                         "password": open({str(secret)!r}).read()}}}}}}))
            """)
        cp = work / "credential-provider.yaml"
        cp.write_text(textwrap.dedent(f"""
            apiVersion: kubelet.config.k8s.io/v1
            kind: CredentialProviderConfig
            providers:
              - name: node-creds
                matchImages: ["{reg.host}"]
                defaultCacheDuration: 10m
                apiVersion: credentialprovider.kubelet.k8s.io/v1
            """))
        config = work / "config.toml"
        config.write_text(f'version = 1\n[remote.auth]\n'
                          f'enable_kubelet_credential_providers = true\n'
                          f'credential_provider_config = "{cp}"\n'
                          f'credential_provider_bin_dir = "{plugins}"\n')
        empty = work / "docker"
        empty.mkdir()
        with Snapshotter(config=config, env={"DOCKER_CONFIG": str(empty)}) as snap:
            read_big(snap, private, pull_nydus_image(snap, private), "default/9/c",
                     tmp_path / "r1")
            leaks = find_leaks(NEEDLES, [snap.workdir, work, reg.workdir])
            assert not leaks, "the registry secret leaked:\n" + "\n".join(leaks)
    finally:
        remove_tree(work)


def test_failing_sources_are_named_and_bounded_while_others_serve(
        private: dict, image: dict, tmp_path: Path) -> None:
    """A helper that hangs, one that prints garbage and a plugin that errs: each image's
    Prepare fails naming the source and why; meanwhile another image mounts."""
    reg: Registry = private["registry"]
    work = make_workdir("credbad")
    try:
        bin_dir = work / "bin"
        program(bin_dir, "docker-credential-hang", "import time\ntime.sleep(600)\n")
        program(bin_dir, "docker-credential-garbage", "print('user=a password=b')\n")
        plugins = work / "plugins"
        program(plugins, "erring", "import sys\nsys.stdin.read()\n"
                                   "print('no IAM role attached', file=sys.stderr)\n"
                                   "sys.exit(2)\n")
        cp = work / "cp.json"
        cp.write_text(json.dumps({"kind": "CredentialProviderConfig",
                                  "apiVersion": "kubelet.config.k8s.io/v1",
                                  "providers": [{"name": "erring", "matchImages": [reg.host],
                                                 "defaultCacheDuration": "0s",
                                                 "apiVersion": "credentialprovider.kubelet."
                                                               "k8s.io/v1"}]}))
        config = work / "config.toml"
        config.write_text(f'version = 1\n[remote.auth]\n'
                          f'enable_kubelet_credential_providers = true\n'
                          f'credential_provider_config = "{cp}"\n'
                          f'credential_provider_bin_dir = "{plugins}"\n')
        docker = work / "docker"
        docker.mkdir()
        cfg = docker / "config.json"
        cfg.write_text(json.dumps({"credHelpers": {reg.host: "hang"}}))
        env = {"DOCKER_CONFIG": str(docker), "PATH": f"{bin_dir}:/usr/bin:/bin"}
        with Snapshotter(config=config, env=env) as snap:
            # the hanging helper's image, in a thread; the public image meanwhile
            result: dict = {}

            def hung() -> None:
                result["hang"] = refused(snap, private, "ns-hang", tmp_path)
            t = threading.Thread(target=hung)
            t.start()
            helper = str(bin_dir / "docker-credential-hang").encode()
            wait_until(lambda: any(helper in cmd for _pid, cmd in all_cmdlines()), 30,
                       "the hanging helper to run")  # the private Prepare is stuck in it
            t0 = time.monotonic()
            read_big(snap, image, pull_nydus_image(snap, image, "ns-public"), "ns-public/9/c",
                     tmp_path / "public")
            # the hanging Prepare still waits for its helper (killed at 10 s); on a loaded
            # machine the public image may take long, but not longer than that Prepare
            took_public = time.monotonic() - t0
            assert t.is_alive() or took_public < 8, \
                f"the public image waited for the helper ({took_public:.1f} s)"
            t.join(60)
            message, took = result["hang"]
            assert "docker-credential-hang" in message and "no answer within 10 s; killed" \
                in message, message
            assert "kubelet credential provider 'erring': exited with status 2: no IAM role " \
                "attached" in message, message
            assert f"registry {reg.host} requires credentials and none were found" in message
            assert took < 30, f"Prepare took {took:.0f} s"
            cfg.write_text(json.dumps({"credHelpers": {reg.host: "garbage"}}))
            message, _ = refused(snap, private, "ns-garbage", tmp_path)
            assert "docker-credential-garbage" in message and "is not the helper protocol's " \
                "JSON" in message, message
            assert "password=b" not in message
    finally:
        remove_tree(work)


def test_kubeconfig_keychain_reads_the_clusters_pull_secrets(private: dict,
                                                             tmp_path: Path) -> None:
    """``enable_kubeconfig_keychain`` with ``kubeconfig_path``: the image pull secret of
    the registry, listed from the API server the kubeconfig names, opens the private
    image; a kubeconfig whose API refuses its token stops the start naming it."""
    reg: Registry = private["registry"]
    work = make_workdir("kubesec")
    token = "kube-" + secrets.token_hex(8)
    api = FakeKubeAPI(token, [pull_secret("apps", "other", "elsewhere.io", "x", "y"),
                               pull_secret("apps", "regcred", reg.host, USER, PASSWORD)])
    try:
        kubeconfig = work / "kubeconfig"
        kubeconfig.write_text(textwrap.dedent(f"""
            apiVersion: v1
            kind: Config
            current-context: node
            clusters:
              - name: c
                cluster: {{server: "{api.url}"}}
            users:
              - name: u
                user: {{token: "{token}"}}
            contexts:
              - name: node
                context: {{cluster: c, user: u}}
            """))
        kubeconfig.chmod(0o600)
        config = work / "config.toml"
        config.write_text(f'version = 1\n[remote.auth]\nenable_kubeconfig_keychain = true\n'
                          f'kubeconfig_path = "{kubeconfig}"\n')
        empty = work / "docker"
        empty.mkdir()
        with Snapshotter(config=config, env={"DOCKER_CONFIG": str(empty)}) as snap:
            assert api.lists >= 1
            read_big(snap, private, pull_nydus_image(snap, private), "default/9/c",
                     tmp_path / "r1")
            leaks = find_leaks(NEEDLES, [snap.workdir, work, reg.workdir])
            assert not leaks, "the registry secret leaked:\n" + "\n".join(leaks)
        # a token the API refuses: the snapshotter does not start, and says why
        api.token = "other"
        bad = Snapshotter(config=config, env={"DOCKER_CONFIG": str(empty)})
        with pytest.raises(Exception, match=r"(?s)kubeconfig keychain.*HTTP 401"):
            bad.start()
        bad.close()
    finally:
        api.stop()
        remove_tree(work)
