"""Credential renewal (``[remote.auth] credential_renewal_interval``) with real short-lived
credentials: running images keep reading after the credentials they were mounted with
expired, in both daemon modes, with every source.

Our token server stands in front of real ``docker-registry`` instances (distribution's
token auth). Its tokens are refused by the registry ``TOKEN_TTL`` seconds after issue (the
JWT's ``exp`` is set back by the registry's 60 s leeway), and the passwords it mints
(what a cloud registry hands out: the password is itself a token) are refused by the
token server ``PASSWORD_TTL`` seconds after minting. Each image has a registry of its own,
so that each source alone has its credentials:

- snapshot labels: a static password; the daemon renews its short tokens itself;
- the CRI keychain: the test "pulls" the image again through the snapshotter's image
  service proxy with a freshly minted password every 2 s, as kubelet does for new pods;
- a docker ``credHelpers`` program that mints a password each time it is asked;
- a kubelet credential provider plugin that answers with a bearer token (an empty
  username: a registry token the daemon uses as is), cached for 3 s;
- the kubeconfig keychain: a pull secret the API server rotates (a fresh password on
  each list).

Every image has its own files (one chunk each, no read amplification), read one a round
for ``READ_SECONDS``: each read is a registry request with the daemon's current
credentials, long after the first ones expired. A source that stops answering is a
warning naming the image and a ``failure`` in ``snapshotter_credential_renewals_total``;
the image's reads fail with EIO once its credentials expire (in bounded time, not a hang)
and work again once the source answers again. No secret reaches a log, a command line or
a file others can read.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from pynydus.host.mount import unmount_all
from pynydus.manager.daemonconfig import DEFAULT_TEMPLATE
from pynydus.rafs.builder import build
from pynydus.registry.client import RegistryClient
from tests.harness.criapi import cri_pb2, cri_pb2_grpc
from tests.harness.leaks import find_leaks
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import make_workdir, remove_tree, wait_until
from tests.integration.registry.servers import SERVICE, TokenServer

from .support import REPO, FakeKubeAPI, container_rootfs, pull_nydus_image, pull_secret

pytestmark = [pytest.mark.root]

TOKEN_TTL = 3  # registry tokens, seconds
PASSWORD_TTL = 10.0  # minted passwords
BEARER_TTL = 10  # the kubelet plugin's bearer tokens
INTERVAL = "2s"  # credential_renewal_interval
READ_SECONDS = 24.0  # reads span this long: 2+ password lifetimes, 8 token lifetimes
FILES = 48
LEEWAY = 60  # seconds distribution accepts a token past its exp

LABEL_USER, LABEL_PW = "labeluser", "label-" + secrets.token_hex(10)
MINT_USER, MINT_KEY = "minted", "mintkey-" + secrets.token_hex(10)
PLUGIN_USER, PLUGIN_PW = "pluginuser", "plugin-" + secrets.token_hex(10)


@dataclass
class Img:
    """One Nydus image: its tree, bootstrap and blob, pushed to ``registry``."""

    name: str
    src: Path
    boot: Path
    blobs: list[Path]
    blob_ids: list[str]
    registry: Registry | None = None

    @property
    def ref(self) -> str:
        assert self.registry is not None
        return f"{self.registry.host}/{REPO}:latest"

    def as_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "boot": self.boot, "blob_ids": self.blob_ids}


def make_image(work: Path, name: str) -> Img:
    src = work / name / "src"
    (src / "files").mkdir(parents=True)
    for i in range(FILES):
        (src / f"files/f{i:02d}").write_bytes(os.urandom(8192))
    boot, blobs = work / name / "image.boot", work / name / "blobs"
    result = build(str(src), str(boot), str(blobs), compressor="lz4_block")
    return Img(name, src, boot, [Path(b.path) for b in result.blobs],
               [b.blob_id for b in result.blobs])


def push(img: Img, reg: Registry, user: str, password: str) -> None:
    img.registry = reg
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    with RegistryClient(reg.host, scheme="http", auth=auth) as client:
        for blob, blob_id in zip(img.blobs, img.blob_ids, strict=True):
            client.push_blob(REPO, blob, "sha256:" + blob_id)


def program(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o700)
    return path


def private_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def minting_helper(bin_dir: Path, ts: TokenServer, host: str, key_file: Path,
                   switch: Path) -> None:
    """``docker-credential-mint``: a fresh password from the token server's mint endpoint
    for each ``get`` (the key in a 0600 file); fails while ``switch`` says "fail"."""
    program(bin_dir / "docker-credential-mint", f"""
        import base64, json, sys, urllib.request
        server = sys.stdin.read().strip()
        if sys.argv[1:] != ["get"] or server != {host!r}:
            print("credentials not found in native keychain")
            sys.exit(1)
        if open({str(switch)!r}).read().strip() == "fail":
            print("mint service unreachable", file=sys.stderr)
            sys.exit(2)
        key = base64.b64encode(open({str(key_file)!r}).read().strip().encode()).decode()
        req = urllib.request.Request("http://{ts.host}/mint",
                                     headers={{"Authorization": "Basic " + key}})
        doc = json.load(urllib.request.urlopen(req, timeout=5))
        print(json.dumps({{"ServerURL": server, "Username": doc["username"],
                          "Secret": doc["password"]}}))
        """)


def bearer_plugin(plugins: Path, ts: TokenServer, host: str, secret: Path) -> None:
    """A kubelet credential provider that answers with a registry bearer token (empty
    username), fetched from the token server with a static account, cached 3 s."""
    program(plugins / "bearer", f"""
        import base64, json, sys, urllib.request
        json.load(sys.stdin)
        basic = base64.b64encode(open({str(secret)!r}).read().strip().encode()).decode()
        url = ("http://{ts.host}/token?service={SERVICE}"
               "&scope=repository:{REPO}:pull")
        req = urllib.request.Request(url, headers={{"Authorization": "Basic " + basic}})
        token = json.load(urllib.request.urlopen(req, timeout=5))["token"]
        print(json.dumps({{
            "kind": "CredentialProviderResponse",
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "cacheKeyType": "Registry", "cacheDuration": "3s",
            "auth": {{{host!r}: {{"username": "", "password": token}}}}}}))
        """)


class FakeContainerd(cri_pb2_grpc.ImageServiceServicer):
    """containerd's ImageService as far as the snapshotter's proxy forwards PullImage."""

    def PullImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        return cri_pb2.PullImageResponse(image_ref="sha256:" + "0" * 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/metrics", timeout=10).read()
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def renewals(samples: dict[str, float], ref: str, result: str) -> float:
    return samples.get(f'snapshotter_credential_renewals_total{{image_ref="{ref}",'
                       f'result="{result}"}}', 0.0)


def template(path: Path) -> Path:
    """The built-in daemon config without read amplification: each file read is one
    registry request (nothing is fetched ahead with the credentials of the moment)."""
    cfg = json.loads(json.dumps(DEFAULT_TEMPLATE))
    cfg["amplify_io"] = 0
    cfg["device"]["backend"]["config"].update({"timeout": 5, "connect_timeout": 3,
                                               "retry_limit": 1})
    path.write_text(json.dumps(cfg))
    return path


def node_config(d: Path, mode: str, auth: str) -> tuple[Path, int]:
    """The snapshotter's config (and its metrics port): ``auth`` lines of
    ``[remote.auth]`` beside ``credential_renewal_interval``."""
    port = free_port()
    config = d / "config.toml"
    config.write_text(textwrap.dedent(f"""\
        version = 1
        daemon_mode = "{mode}"
        [daemon]
        nydusd_config = "{template(d / 'nydusd.json')}"
        [metrics]
        address = "127.0.0.1:{port}"
        [remote.auth]
        credential_renewal_interval = "{INTERVAL}"
        """) + textwrap.dedent(auth))
    return config, port


def short_token_server(work: Path, **kw: Any) -> TokenServer:
    """Tokens the registry refuses ``expires_in`` seconds after issue."""
    work.mkdir(parents=True, exist_ok=True)
    ts = TokenServer(work, exp_offset=-LEEWAY, **kw)
    return ts


def read_file(rootfs: Path, img: Img, i: int) -> None:
    got = (rootfs / f"files/f{i:02d}").read_bytes()
    want = (img.src / f"files/f{i:02d}").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), (img.name, i)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    d = make_workdir("renew")
    try:
        yield d
    finally:
        remove_tree(d)


@pytest.fixture(scope="module")
def node(work: Path) -> Iterator[dict[str, Any]]:
    """Token servers, one registry per source with the source's image, the programs."""
    with ExitStack() as stack:
        ts = short_token_server(work / "ts", users={LABEL_USER: LABEL_PW},
                                expires_in=TOKEN_TTL, mint_user=MINT_USER,
                                mint_key=MINT_KEY, mint_ttl=PASSWORD_TTL)
        stack.callback(ts.stop)
        ts_bearer = short_token_server(work / "tsb", users={PLUGIN_USER: PLUGIN_PW},
                                       expires_in=BEARER_TTL)
        stack.callback(ts_bearer.stop)
        images: dict[str, Img] = {}
        for name in ("labels", "cri", "helper", "kubelet", "kubesecret", "broken"):
            img = make_image(work / "images", name)
            server = ts_bearer if name == "kubelet" else ts
            reg = stack.enter_context(Registry(work / f"reg-{name}",
                                               auth_yaml=server.registry_auth_yaml()))
            user, pw = (PLUGIN_USER, PLUGIN_PW) if name == "kubelet" else (LABEL_USER, LABEL_PW)
            push(img, reg, user, pw)
            images[name] = img
        ctrd_sock = work / "ctrd.sock"
        ctrd = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        cri_pb2_grpc.add_ImageServiceServicer_to_server(FakeContainerd(), ctrd)
        ctrd.add_insecure_port(f"unix://{ctrd_sock}")
        ctrd.start()
        stack.callback(lambda: ctrd.stop(0).wait(10))
        yield {"ts": ts, "ts_bearer": ts_bearer, "images": images, "ctrd": ctrd_sock}


def secrets_of(ts: TokenServer) -> dict[bytes, str]:
    """Every secret of the run: static and minted passwords (also as base64 user:pw)."""
    out = {MINT_KEY.encode(): "mint key", PLUGIN_PW.encode(): "plugin password",
           LABEL_PW.encode(): "label password"}
    for pw in list(ts.minted):
        out[pw.encode()] = "minted password"
        out[base64.b64encode(f"{MINT_USER}:{pw}".encode())] = "base64(user:minted)"
    return out


def _cri_pull(sock: Path, ref: str, password: str) -> None:
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        cri_pb2_grpc.ImageServiceStub(ch).PullImage(cri_pb2.PullImageRequest(
            image=cri_pb2.ImageSpec(image=ref),
            auth=cri_pb2.AuthConfig(username=MINT_USER, password=password)), timeout=30)


def kubelet_pulls(sock: Path, ref: str, ts: TokenServer, stop: threading.Event) -> None:
    """kubelet starting a pod of the image every 2 s: a PullImage with the credentials of
    the moment (a freshly minted password)."""
    while not stop.wait(2.0):
        _cri_pull(sock, ref, ts.mint())


def blob_gets(img: Img) -> int:
    assert img.registry is not None
    return img.registry.blob_gets(f"sha256:{img.blob_ids[0]}")


def read_rounds(mounts: list[tuple[Img, Path]], seconds: float) -> dict[str, float]:
    """Read file i of every mount in round i, the rounds spread over ``seconds``. Returns
    the blob GETs of each image when the second half began, and when (``at``)."""
    t0 = time.monotonic()
    step = seconds / FILES
    half: dict[str, float] = {}
    for i in range(FILES):
        if i == FILES // 2:
            half = {img.name: blob_gets(img) for img, _ in mounts}
            half["at"] = time.monotonic()
        for img, rootfs in mounts:
            read_file(rootfs, img, i)
        time.sleep(max(0.0, t0 + (i + 1) * step - time.monotonic()))
    return half


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_images_keep_reading_after_their_credentials_expired(
        node: dict[str, Any], work: Path, mode: str) -> None:
    """``credential_renewal_interval`` with the labels, the CRI keychain, a docker
    credential helper and a kubelet plugin's bearer tokens, one image each."""
    ts: TokenServer = node["ts"]
    images: dict[str, Img] = node["images"]
    d = work / f"node-{mode}"
    bin_dir, plugins = d / "bin", d / "plugins"
    key_file = private_file(d / "mint.key", f"{MINT_USER}:{MINT_KEY}")
    switch = private_file(d / "switch", "ok")
    minting_helper(bin_dir, ts, images["helper"].registry.host, key_file, switch)  # type: ignore[union-attr]
    bearer_plugin(plugins, node["ts_bearer"], images["kubelet"].registry.host,  # type: ignore[union-attr]
                  private_file(d / "plugin.secret", f"{PLUGIN_USER}:{PLUGIN_PW}"))
    cp = d / "credential-provider.json"
    cp.write_text(json.dumps({
        "kind": "CredentialProviderConfig", "apiVersion": "kubelet.config.k8s.io/v1",
        "providers": [{"name": "bearer", "matchImages": [images["kubelet"].registry.host],  # type: ignore[union-attr]
                       "defaultCacheDuration": "0s",
                       "apiVersion": "credentialprovider.kubelet.k8s.io/v1"}]}))
    docker = d / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps(
        {"credHelpers": {images["helper"].registry.host: "mint"}}))  # type: ignore[union-attr]
    config, port = node_config(d, mode, f"""
        enable_cri_keychain = true
        image_service_address = "{node['ctrd']}"
        enable_kubelet_credential_providers = true
        credential_provider_config = "{cp}"
        credential_provider_bin_dir = "{plugins}"
        """)
    env = {"DOCKER_CONFIG": str(docker), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    mounts: list[tuple[Img, Path]] = []
    with Snapshotter(config=config, env=env) as snap:
        stop = threading.Event()
        kubelet = threading.Thread(target=kubelet_pulls, args=(snap.socket, images["cri"].ref,
                                                               ts, stop))
        try:
            _cri_pull(snap.socket, images["cri"].ref, ts.mint())
            kubelet.start()
            for name in ("labels", "cri", "helper", "kubelet"):
                img = images[name]
                labels = {"containerd.io/snapshot/pullusername": LABEL_USER,
                          "containerd.io/snapshot/pullsecret": LABEL_PW} \
                    if name == "labels" else None
                top = pull_nydus_image(snap, img.as_dict(), f"ns-{name}", extra_labels=labels)
                rootfs = d / f"rootfs-{name}"
                container_rootfs(snap, top, f"ns-{name}/9/c", rootfs)
                mounts.append((img, rootfs))
            started = time.monotonic()
            tokens_before, minted_before = ts.issued, len(ts.minted)
            half = read_rounds(mounts, READ_SECONDS)
            assert half["at"] - started > PASSWORD_TTL  # the first credentials are gone
            took = time.monotonic() - started
            assert took >= 2 * PASSWORD_TTL
            for img, _ in mounts:  # every file of the second half was a registry request,
                gets = blob_gets(img) - half[img.name]  # read with the credentials of then
                assert gets >= FILES // 2, (img.name, gets)
            m = scrape(port)
            for name in ("cri", "helper", "kubelet"):
                ok = renewals(m, images[name].ref, "success")
                assert ok >= 3, (name, ok, took)  # a pass every 2 s, however slow each is
                assert renewals(m, images[name].ref, "failure") == 0, name
                assert m[f'snapshotter_credential_store_entries{{image_ref="{images[name].ref}"}}'] == 1
            # the labels' credentials are the labels': not renewed; the daemon renewed
            # its own tokens (far more than one for the run)
            assert renewals(m, images["labels"].ref, "success") == 0
            assert ts.issued - tokens_before >= took / TOKEN_TTL / 2
            assert len(ts.minted) - minted_before >= 3
            log = snap.log.read_text(errors="replace")
            assert "has new credentials" in log
            leaks = find_leaks(secrets_of(ts), [snap.workdir, d])
            assert not leaks, "a registry secret leaked:\n" + "\n".join(leaks)
        finally:
            stop.set()
            if kubelet.is_alive():
                kubelet.join(60)
            for _, rootfs in mounts:
                unmount_all(str(rootfs))


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_kubeconfig_keychain_renewal_and_a_source_that_stops_answering(
        node: dict[str, Any], work: Path, mode: str) -> None:
    """A pull secret rotated in the cluster reaches the running image; a credential
    helper that starts failing is a named warning and a failure metric, its image's
    reads fail with EIO (bounded) once the password expired, and work again once the
    helper answers again. The other image is not disturbed."""
    ts: TokenServer = node["ts"]
    images: dict[str, Img] = node["images"]
    d = work / f"kube-{mode}"
    bin_dir = d / "bin"
    key_file = private_file(d / "mint.key", f"{MINT_USER}:{MINT_KEY}")
    switch = private_file(d / "switch", "ok")
    broken = images["broken"]
    minting_helper(bin_dir, ts, broken.registry.host, key_file, switch)  # type: ignore[union-attr]
    docker = d / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps(
        {"credHelpers": {broken.registry.host: "mint"}}))  # type: ignore[union-attr]
    token = "kube-" + secrets.token_hex(8)
    kube_host = images["kubesecret"].registry.host  # type: ignore[union-attr]
    # the secret is rotated: a freshly minted password at each list
    api = FakeKubeAPI(token, lambda: [pull_secret("apps", "regcred", kube_host, MINT_USER,
                                                  ts.mint())])
    kubeconfig = private_file(d / "kubeconfig", textwrap.dedent(f"""
        apiVersion: v1
        kind: Config
        current-context: node
        clusters: [{{name: c, cluster: {{server: "{api.url}"}}}}]
        users: [{{name: u, user: {{token: "{token}"}}}}]
        contexts: [{{name: node, context: {{cluster: c, user: u}}}}]
        """))
    config, port = node_config(d, mode, f"""
        enable_kubeconfig_keychain = true
        kubeconfig_path = "{kubeconfig}"
        """)
    env = {"DOCKER_CONFIG": str(docker), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    mounts: list[tuple[Img, Path]] = []
    try:
        with Snapshotter(config=config, env=env) as snap:
            try:
                for name in ("kubesecret", "broken"):
                    top = pull_nydus_image(snap, images[name].as_dict(), f"ns-{name}")
                    rootfs = d / f"rootfs-{name}"
                    container_rootfs(snap, top, f"ns-{name}/9/c", rootfs)
                    mounts.append((images[name], rootfs))
                (kube_img, kube_fs), (bad_img, bad_fs) = mounts
                read_file(bad_fs, bad_img, 0)
                switch.write_text("fail")
                failed_at = time.monotonic()  # the last password minted is older than this
                wait_until(lambda: renewals(scrape(port), bad_img.ref, "failure") >= 1, 30,
                           "a failed renewal counted")
                log = snap.log.read_text(errors="replace")
                assert re.search(rf'credential renewal of image "{re.escape(bad_img.ref)}" '
                                 r"\(snapshot \d+\) failed: no renewable source has "
                                 r"credentials for it \(.*docker-credential-mint.*mint "
                                 r"service unreachable", log), log[-3000:]
                # the kubeconfig image reads on through several password lifetimes
                t0 = time.monotonic()
                for i in range(FILES // 2):
                    read_file(kube_fs, kube_img, i)
                    time.sleep(max(0.0, t0 + (i + 1) * READ_SECONDS / FILES - time.monotonic()))
                # by now the broken image's password has expired: EIO, soon
                assert time.monotonic() - failed_at > PASSWORD_TTL
                t1 = time.monotonic()
                with pytest.raises(OSError) as err:
                    read_file(bad_fs, bad_img, 1)
                assert err.value.errno == errno.EIO
                assert time.monotonic() - t1 < 20, "a read waited for the renewal"
                # the helper answers again: the next pass hands a fresh password over
                switch.write_text("ok")

                def reads_again() -> bool:
                    try:
                        read_file(bad_fs, bad_img, 2)
                        return True
                    except OSError:
                        return False
                wait_until(reads_again, 30, "the image reads after its source recovered",
                           interval=1.0)
                for i in range(FILES // 2, FILES):
                    read_file(kube_fs, kube_img, i)
                m = scrape(port)
                assert renewals(m, kube_img.ref, "success") >= 3
                assert renewals(m, kube_img.ref, "failure") == 0
                assert api.lists >= 3
                leaks = find_leaks(secrets_of(ts), [snap.workdir, d])
                assert not leaks, "a registry secret leaked:\n" + "\n".join(leaks)
            finally:
                for _, rootfs in mounts:
                    unmount_all(str(rootfs))
    finally:
        api.stop()
