"""The kubeconfig keychain's sans-I/O parts: kubeconfig files and secret lists."""

from __future__ import annotations

import base64
import json
import textwrap
from pathlib import Path

import pytest

from pynydus.errors import ConfigError
from pynydus.registry.credentials import Credentials
from pynydus.registry.kubesecrets import KubeSecrets, find_api, parse_kubeconfig, parse_secret_list
from pynydus.registry.reference import parse_reference


def kubeconfig(user: str, cluster: str = 'server: "https://k.example:6443"') -> str:
    return textwrap.dedent(f"""
        apiVersion: v1
        kind: Config
        current-context: ctx
        clusters:
          - name: c
            cluster: {{{cluster}}}
        users:
          - name: u
            user: {{{user}}}
        contexts:
          - name: other
            context: {{cluster: nope, user: nope}}
          - name: ctx
            context: {{cluster: c, user: u}}
        """)


def test_current_context_with_inline_ca_and_relative_files(tmp_path: Path) -> None:
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----").decode()
    api = parse_kubeconfig(kubeconfig(
        "client-certificate: certs/c.pem, client-key: /abs/k.pem",
        f'server: "https://k.example:6443/", certificate-authority-data: "{ca}"'),
        tmp_path / "config")
    assert api.server == "https://k.example:6443"
    assert api.ca_data == b"-----BEGIN CERTIFICATE-----"
    assert (api.cert_file, api.key_file) == (str(tmp_path / "certs/c.pem"), "/abs/k.pem")
    assert "BEGIN" not in repr(api)


@pytest.mark.parametrize("user, cluster, message", [
    ("exec: {command: aws}", 'server: "https://k"', "exec credentials are not supported"),
    ("auth-provider: {name: gcp}", 'server: "https://k"', "auth-provider credentials"),
    ("token: t", 'server: "k.example"', r"is not an http\(s\) URL"),
    ("token: t", 'server: "https://k", certificate-authority-data: "!!"', "not base64"),
])
def test_unusable_kubeconfigs_are_refused_naming_the_file(tmp_path: Path, user: str,
                                                          cluster: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_kubeconfig(kubeconfig(user, cluster), tmp_path / "kc")
    assert str(tmp_path / "kc") in str(err.value)


def test_where_the_api_is_found(tmp_path: Path) -> None:
    kc = tmp_path / "kc"
    kc.write_text(kubeconfig("token: abc"))
    assert find_api("", {"KUBECONFIG": f"{kc}:/nope", "HOME": "/nonexistent"}).token == "abc"
    assert find_api(str(kc), {}).source == str(kc)
    with pytest.raises(ConfigError, match="does not exist"):
        find_api(str(tmp_path / "missing"), {})
    with pytest.raises(ConfigError, match="no kubeconfig .* and not in a pod"):
        find_api("", {"HOME": str(tmp_path)})


def _secret(ns: str, name: str, data: object) -> dict:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return {"metadata": {"namespace": ns, "name": name},
            "data": {".dockerconfigjson": base64.b64encode(raw).decode()}}


def test_secret_list_sorted_bad_ones_skipped_and_first_match_wins() -> None:
    auth = base64.b64encode(b"u:p").decode()
    body = json.dumps({"items": [
        _secret("b", "s", {"auths": {"r.io": {"auth": base64.b64encode(b"v:q").decode()}}}),
        _secret("a", "broken", b"not json"),
        _secret("a", "s", {"auths": {"r.io": {"auth": auth}}}),
        {"metadata": {"namespace": "c", "name": "nodata"}},
    ]}).encode()
    secrets = parse_secret_list(body, "test")
    assert [k for k, _ in secrets] == ["a/s", "b/s"]
    src = KubeSecrets.__new__(KubeSecrets)
    KubeSecrets.__init__(src, api=None, refresh=1e9)  # type: ignore[arg-type]
    src._secrets, src._fetched = secrets, 1e18
    found = src.find(parse_reference("r.io/app:1"), {})
    assert found is not None and found.credentials == Credentials("u", "p")
    assert found.source == "the kubeconfig keychain (secret a/s)"
    assert src.find(parse_reference("q.io/app:1"), {}) is None
