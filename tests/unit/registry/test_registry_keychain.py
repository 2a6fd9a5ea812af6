"""Credential sources: docker credential helpers, kubelet credential provider plugins, and
the keychain that asks them in upstream's order. Helpers and plugins are real programs
(small scripts) run the way the snapshotter runs them: bounded in time and output."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pynydus import labels as L
from pynydus.errors import ConfigError
from pynydus.registry import credentials as credmod
from pynydus.registry.credentials import Credentials, DockerConfig
from pynydus.registry.exechelper import CredentialSourceError, run_bounded
from pynydus.registry.keychain import (
    CallableSource,
    DockerConfigSource,
    Found,
    Keychain,
    LabelSource,
)
from pynydus.registry.kubelet import KubeletProviders, parse_provider_config, urls_match


def script(d: Path, name: str, body: str) -> Path:
    p = d / name
    p.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    p.chmod(0o755)
    return p


# ------------------------------------------------------------------ bounded runs
def test_a_program_that_hangs_is_killed_with_its_children(tmp_path: Path) -> None:
    # sh starts in milliseconds even on a loaded machine (a Python child did not always
    # get to write its pid within the limit)
    pidfile = tmp_path / "child.pid"
    prog = tmp_path / "hang"
    prog.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {pidfile}\nsleep 600\n")
    prog.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(CredentialSourceError, match=r"helper x: no answer within 2 s; killed"):
        run_bounded([str(prog)], b"", timeout=2, what="helper x")
    assert time.monotonic() - t0 < 10
    child = int(pidfile.read_text())

    def gone() -> bool:  # SIGKILL is sent; the exit itself needs the CPU (a loaded machine)
        try:
            return Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"
        except FileNotFoundError:
            return True
    deadline = time.monotonic() + 30
    while not gone():
        assert time.monotonic() < deadline, "the grandchild lives on"
        time.sleep(0.01)


def test_a_program_that_floods_is_cut_off(tmp_path: Path) -> None:
    prog = script(tmp_path, "flood", """
        import sys
        while True:
            sys.stdout.write("x" * 65536)
        """)
    with pytest.raises(CredentialSourceError, match="wrote more than 100000 bytes"):
        run_bounded([str(prog)], b"", timeout=10, what="f", max_output=100_000)


def test_a_program_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CredentialSourceError, match="cannot run /nonexistent/prog"):
        run_bounded(["/nonexistent/prog"], b"", timeout=1, what="p")


# ------------------------------------------------------------------ docker helpers
@pytest.fixture
def helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", f"{d}:{os.environ['PATH']}")
    script(d, "docker-credential-good", """
        import json, sys
        server = sys.stdin.read().strip()
        if server == "reg.io":
            print(json.dumps({"ServerURL": server, "Username": "u", "Secret": "s3cret"}))
        elif server == "tok.io":
            print(json.dumps({"ServerURL": server, "Username": "<token>", "Secret": "rt"}))
        else:
            print("credentials not found in native keychain")
            sys.exit(1)
        """)
    script(d, "docker-credential-garbage", """
        print("Username: u Password: hunter2")
        """)
    script(d, "docker-credential-broken", """
        import sys
        print("dbus: no session bus", file=sys.stderr)
        sys.exit(3)
        """)
    script(d, "docker-credential-hang", """
        import time
        time.sleep(600)
        """)
    return d


def test_docker_helpers_answer_or_fail_naming_themselves(helpers: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DockerConfig.parse(json.dumps({
        "credHelpers": {"reg.io": "good", "tok.io": "good", "other.io": "good",
                        "g.io": "garbage", "b.io": "broken", "h.io": "hang"}}),
        Path("/c/config.json"))
    assert cfg.find("reg.io") == (Credentials(username="u", password="s3cret"),
                                  "docker-credential-good (credHelpers of /c/config.json)")
    assert cfg.lookup("tok.io") == Credentials(identity_token="rt")
    assert cfg.lookup("other.io") is None  # "credentials not found" is not an error
    with pytest.raises(CredentialSourceError) as err:
        cfg.lookup("g.io")
    assert "docker-credential-garbage (credHelpers of /c/config.json): its answer is not " \
        "the helper protocol's JSON" in str(err.value)
    assert "hunter2" not in str(err.value)  # stdout is never quoted
    with pytest.raises(CredentialSourceError, match="exited with status 3: dbus: no session"):
        cfg.lookup("b.io")
    monkeypatch.setattr(credmod, "CREDENTIAL_HELPER_TIMEOUT", 0.5)
    with pytest.raises(CredentialSourceError, match="docker-credential-hang .*no answer "
                                                    "within 0.5 s"):
        cfg.lookup("h.io")
    missing = DockerConfig.parse(json.dumps({"credsStore": "absent"}))
    with pytest.raises(CredentialSourceError, match="cannot run docker-credential-absent"):
        missing.lookup("any.io")


# ------------------------------------------------------------------ kubelet plugins
def provider_config(names: list[str], match: str = "*.example.com", ttl: str = "10m") -> str:
    return json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig",
        "providers": [{"name": n, "matchImages": [match, "127.0.0.1:5000"],
                       "defaultCacheDuration": ttl,
                       "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                       "args": ["--flag"], "env": [{"name": "PLUGIN_NAME", "value": n}]}
                      for n in names]})


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    log = tmp_path / "calls.log"
    for name, key_type, duration in (("registry-plugin", "Registry", None),
                                     ("nocache", "Image", "0s")):
        script(d, name, f"""
            import json, os, sys
            req = json.load(sys.stdin)
            open({str(log)!r}, "a").write(os.environ["PLUGIN_NAME"] + " " + req["image"] +
                                          " " + " ".join(sys.argv[1:]) + "\\n")
            resp = {{"kind": "CredentialProviderResponse",
                    "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                    "cacheKeyType": {key_type!r},
                    "auth": {{"*.example.com": {{"username": "wild", "password": "w"}},
                             "reg.example.com/team": {{"username": "team", "password": "t"}},
                             "127.0.0.1:5000": {{"username": "", "password": "tok"}}}}}}
            if {duration!r} is not None:
                resp["cacheDuration"] = {duration!r}
            print(json.dumps(resp))
            """)
    script(d, "wrong-version", """
        import json, sys
        sys.stdin.read()
        print(json.dumps({"apiVersion": "credentialprovider.kubelet.k8s.io/v1beta1",
                          "cacheKeyType": "Image", "auth": {}}))
        """)
    script(d, "garbage", "print('<html>oops</html>')\n")
    script(d, "hang", "import time\ntime.sleep(600)\n")
    return d


def calls(plugins: Path) -> list[str]:
    p = plugins.parent / "calls.log"
    return p.read_text().splitlines() if p.exists() else []


def test_plugin_answers_are_cached_by_their_key_type(plugins: Path) -> None:
    kp = KubeletProviders(parse_provider_config(provider_config(["registry-plugin"]), "c"),
                          str(plugins))
    creds, source, expires = kp.lookup("reg.example.com/team/app:1", "reg.example.com")
    assert creds == Credentials(username="team", password="t")  # the most specific glob
    assert source == "kubelet credential provider 'registry-plugin'"
    assert expires is not None and 590 < expires - time.time() <= 600
    assert calls(plugins) == ["registry-plugin reg.example.com/team/app:1 --flag"]
    # same registry, other image: from the Registry-keyed cache, no new exec
    assert kp.lookup("reg.example.com/other:2", "reg.example.com")[0] == \
        Credentials(username="wild", password="w")
    assert len(calls(plugins)) == 1
    # empty username: a registry token, as upstream's keychain reads it
    assert kp.lookup("127.0.0.1:5000/x:1", "127.0.0.1:5000")[0] == \
        Credentials(registry_token="tok")
    assert kp.lookup("nomatch.io/x:1", "nomatch.io") is None


def test_cache_duration_zero_runs_the_plugin_every_time(plugins: Path) -> None:
    kp = KubeletProviders(parse_provider_config(provider_config(["nocache"]), "c"),
                          str(plugins))
    kp.lookup("a.example.com/x:1", "a.example.com")
    _, _, expires = kp.lookup("a.example.com/x:1", "a.example.com")
    assert expires is None and len(calls(plugins)) == 2


@pytest.mark.parametrize("name, message", [
    ("wrong-version", "answered apiVersion 'credentialprovider.kubelet.k8s.io/v1beta1'"),
    ("garbage", "its answer is not JSON"),
    ("hang", "no answer within 0.5 s; killed"),
    ("absent", "cannot run"),
])
def test_failing_plugins_are_errors_naming_them(plugins: Path, name: str, message: str) -> None:
    # only the hanging plugin gets a short limit: the others are Python programs, whose
    # start alone may take more than 0.5 s on a loaded machine
    kp = KubeletProviders(parse_provider_config(provider_config([name]), "c"), str(plugins),
                          timeout=0.5 if name == "hang" else 30)
    with pytest.raises(CredentialSourceError) as err:
        kp.lookup("a.example.com/x:1", "a.example.com")
    assert f"kubelet credential provider {name!r}" in str(err.value)
    assert message in str(err.value)


def test_a_failing_plugin_does_not_hide_a_working_one(plugins: Path) -> None:
    kp = KubeletProviders(parse_provider_config(provider_config(["garbage", "registry-plugin"]),
                                                "c"), str(plugins))
    assert kp.lookup("a.example.com/x:1", "a.example.com")[1] == \
        "kubelet credential provider 'registry-plugin'"


@pytest.mark.parametrize("change, message", [
    ({"name": "a/b"}, "cannot contain spaces or path separators"),
    ({"apiVersion": "credentialprovider.kubelet.k8s.io/v1alpha1"}, "is not supported"),
    ({"matchImages": []}, "matchImages: at least one"),
    ({"matchImages": [""]}, "matchImages: at least one"),
    ({"defaultCacheDuration": None}, "defaultCacheDuration is required"),
    ({"defaultCacheDuration": "12 hours"}, "expected a duration"),
    ({"env": [{"name": "A"}, {"name": "A"}]}, "duplicate name 'A'"),
])
def test_provider_config_is_validated_as_upstream(change: dict, message: str) -> None:
    doc = json.loads(provider_config(["p"]))
    for k, v in change.items():
        if v is None:
            del doc["providers"][0][k]
        else:
            doc["providers"][0][k] = v
    with pytest.raises(ConfigError, match=message):
        parse_provider_config(json.dumps(doc), "/etc/kubernetes/cp.yaml")


def test_provider_config_in_yaml_as_kubelet_reads_it() -> None:
    (spec,) = parse_provider_config(textwrap.dedent("""
        apiVersion: kubelet.config.k8s.io/v1
        kind: CredentialProviderConfig
        providers:
          - name: ecr-credential-provider
            matchImages:
              - "*.dkr.ecr.*.amazonaws.com"
            defaultCacheDuration: "12h"
            apiVersion: credentialprovider.kubelet.k8s.io/v1
        """), "cp.yaml")
    assert (spec.name, spec.match_images, spec.default_cache_duration) == \
        ("ecr-credential-provider", ("*.dkr.ecr.*.amazonaws.com",), 12 * 3600)


@pytest.mark.parametrize("glob, target, match", [
    # kubelet's keyring_test cases
    ("*.kubernetes.io", "prefix.kubernetes.io", True),
    ("prefix.*.io", "prefix.kubernetes.io", True),
    ("prefix.kubernetes.*", "prefix.kubernetes.io", True),
    ("*-good.kubernetes.io", "prefix-good.kubernetes.io", True),
    ("*.kubernetes.io", "kubernetes.io", False),
    ("*.*.kubernetes.io", "prefix.kubernetes.io", False),
    ("prefix.*.io", "prefix.foo.kubernetes.io", False),
    ("gcr.io/team", "gcr.io/team/app:1", True),
    ("gcr.io/team", "gcr.io/other/app:1", False),
    ("127.0.0.1:*", "127.0.0.1:5000/x", False),  # the port is compared, not globbed
    ("127.0.0.1:5000", "127.0.0.1:5000/x", True),
])
def test_url_globs_match_as_kubelet(glob: str, target: str, match: bool) -> None:
    assert urls_match(glob, target) is match


# ------------------------------------------------------------------ the keychain
def test_keychain_order_and_failures(tmp_path: Path, helpers: Path) -> None:
    cfg_dir = tmp_path / "docker"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps({"credHelpers": {"reg.io": "broken"}}))
    later = CallableSource("later", lambda ref: Found(Credentials("l", "p"), "later source"),
                           renewable=True)
    kc = Keychain([LabelSource(), DockerConfigSource(env={"DOCKER_CONFIG": str(cfg_dir)}),
                   later])
    labels = {L.PULL_USERNAME: "lab", L.PULL_SECRET: "el"}
    hit = kc.lookup("reg.io/a:1", labels)
    assert hit.found is not None and hit.found.source.startswith("snapshot labels")
    hit = kc.lookup("reg.io/a:1", {})
    assert hit.found is not None and hit.found.source == "later source"
    (failure,) = hit.failures
    assert "docker-credential-broken" in failure and "exited with status 3" in failure
    assert hit.asked == ("snapshot labels", "docker config", "later")
    renew = kc.lookup("reg.io/a:1", labels, renewable_only=True)
    assert renew.found is not None and renew.found.source == "later source"
    assert "later" in renew.explain() and "snapshot labels" not in renew.explain()
