"""Bad input and failures: clear errors, and nothing half-written tagged in the target."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pynydus.errors import NotFound
from tests.harness import oci
from tests.harness.registry import Registry

from .conftest import PASSWORD, USER, client_for, convert_args, layer_blob, push_layers, pynydus
from .faultproxy import FaultProxy, Rule


def _tag_absent(reg: Registry, repo: str, tag: str, auth: str | None = None) -> bool:
    with client_for(reg, auth) as c:
        try:
            c.get_manifest(repo, tag)
        except NotFound:
            return True
    return False


def test_missing_source_tag(registry: Registry, layered: str, cache_dir: str) -> None:
    r = pynydus(*convert_args(registry.ref("src/layered", "no-such-tag"),
                              registry.ref("nydus/missing", "v1"), cache_dir))
    assert r.rc != 0
    assert "src/layered:no-such-tag" in r.err and "not found" in r.err
    assert _tag_absent(registry, "nydus/missing", "v1")


def test_auth_registry_with_and_without_credentials(auth_registry: Registry, workdir: Path,
                                                    cache_dir: str) -> None:
    img = oci.Image([oci.Layer("a").file("etc/secret-image", "x\n")])
    src = auth_registry.ref("src/private")
    oci.push(img.write_layout(workdir / "private"), src, creds=f"{USER}:{PASSWORD}")
    dst = auth_registry.ref("nydus/private", "v1")
    creds = f"{USER}:{PASSWORD}"
    # Secrets off the command line: a file for one side, the environment for the other...
    secret = workdir / "source-auth"
    secret.write_text(creds + "\n")
    secret.chmod(0o600)
    ok = pynydus(*convert_args(src, dst, cache_dir, "--source-auth-file", str(secret)),
                 env={"PYNYDUS_TARGET_AUTH": creds})
    assert ok.rc == 0, ok.err
    assert "warning" not in ok.err
    # ... or stdin, a line per side (base64 works too)
    b64 = base64.b64encode(creds.encode()).decode()
    check = pynydus("check-image", "--source", src, "--target", dst,
                    "--source-auth-stdin", "--target-auth-stdin", stdin=f"{creds}\n{b64}\n")
    assert check.rc == 0, check.err + check.out
    dst2 = auth_registry.ref("nydus/private", "v2")
    bad = pynydus(*convert_args(src, dst2, cache_dir, "--source-auth", f"{USER}:wrong",
                                "--target-auth", creds))
    assert bad.rc == 3, bad.err
    assert "warning: --source-auth puts the password on the command line" in bad.err
    assert "denied" in bad.err or "401" in bad.err or "unauthorized" in bad.err.lower()
    # a good source but a target that refuses our credentials: nothing tagged there
    bad_target = pynydus(*convert_args(src, dst2, cache_dir, "--source-auth", creds,
                                       "--target-auth", f"{USER}:wrong"))
    assert bad_target.rc == 3, bad_target.err
    auth = base64.b64encode(creds.encode()).decode()
    assert _tag_absent(auth_registry, "nydus/private", "v2", auth)


def _descendants(root: int) -> dict[int, bytes]:
    """The command lines of ``root`` and every process under it, now."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{name}/stat").read_text()
                parent[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    out = {}
    for pid in tree:
        with contextlib.suppress(OSError):
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
    return out


def _argv_seen_while(argv: list[str], env: dict[str, str]) -> tuple[int, str, dict[int, bytes]]:
    """Run ``argv``; every command line of it and its children, sampled as it runs."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    seen: dict[int, bytes] = {}
    while proc.poll() is None:
        seen.update(_descendants(proc.pid))
        time.sleep(0.01)
    out, err = proc.communicate()
    return proc.returncode, out + err, seen


def test_credentials_from_files_are_on_no_command_line(auth_registry: Registry, workdir: Path,
                                                       cache_dir: str) -> None:
    """The issue: --source-auth user:password was readable by every user in /proc. With
    the credentials in files, neither convert nor check-image nor anything they start
    (layer workers, decoder processes) carries the password in its argv."""
    img = oci.Image([oci.Layer(f"l{i}").file(f"etc/f{i}", f"{i}\n" * 5000) for i in range(3)])
    src = auth_registry.ref("src/argv")
    creds = f"{USER}:{PASSWORD}"
    oci.push(img.write_layout(workdir / "argv"), src, creds=creds)
    dst = auth_registry.ref("nydus/argv", "v1")
    secret = workdir / "auth"
    secret.write_text(creds + "\n")
    secret.chmod(0o600)
    cli = [sys.executable, "-m", "pynydus.cli.main"]
    rc, out, seen = _argv_seen_while(
        [*cli, *convert_args(src, dst, cache_dir, "--source-auth-file", str(secret),
                             "--target-auth-file", str(secret), "--workers", "2")], {})
    assert rc == 0, out
    assert len(seen) >= 2, seen  # the workers were seen
    rc, out, seen_check = _argv_seen_while(
        [*cli, "check-image", "--source", src, "--target", dst, "--source-auth-file",
         str(secret), "--target-auth-file", str(secret)], {})
    assert rc == 0, out
    for pid, argv in {**seen, **seen_check}.items():
        assert PASSWORD.encode() not in argv, (pid, argv)
        assert base64.b64encode(creds.encode()) not in argv, (pid, argv)


def test_corrupt_source_layer_is_a_digest_error(registry: Registry, workdir: Path,
                                               cache_dir: str) -> None:
    big = bytes(range(256)) * 40000
    img = oci.Image([oci.Layer("c").file("data/big.bin", big)])
    built = img.write_layout(workdir / "corrupt")
    oci.push(built, registry.ref("src/corrupt"))
    digest = str(built.layers[0]["digest"]).split(":", 1)[1]
    data = registry.storage / "docker/registry/v2/blobs/sha256" / digest[:2] / digest / "data"
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))
    r = pynydus(*convert_args(registry.ref("src/corrupt"), registry.ref("nydus/corrupt", "v1"),
                              cache_dir))
    assert r.rc != 0
    assert f"source layer sha256:{digest}: content does not match its digest" in r.err, r.err
    assert _tag_absent(registry, "nydus/corrupt", "v1")
    assert not list(Path(cache_dir, "layers").glob("*.json"))  # nothing cached


def test_unsupported_media_type(registry: Registry, cache_dir: str) -> None:
    layer = oci.Layer("e").file("x", "y")
    _, blob, tar = layer_blob(layer, "gzip")
    with client_for(registry) as c:
        push_layers(c, "src/encrypted", "v1",
                    [("application/vnd.oci.image.layer.v1.tar+gzip+encrypted", blob, tar)])
    r = pynydus(*convert_args(registry.ref("src/encrypted", "v1"),
                              registry.ref("nydus/encrypted", "v1"), cache_dir))
    assert r.rc == 2
    assert "unsupported media type" in r.err and "+encrypted" in r.err
    assert _tag_absent(registry, "nydus/encrypted", "v1")


def test_already_nydus_source_is_refused(registry: Registry, layered: str, cache_dir: str) -> None:
    dst = registry.ref("nydus/twice", "v1")
    assert pynydus(*convert_args(layered, dst, cache_dir)).rc == 0
    r = pynydus(*convert_args(dst, registry.ref("nydus/twice", "v2"), cache_dir))
    assert r.rc == 2 and "already a Nydus image" in r.err


@pytest.fixture
def proxy(registry: Registry) -> FaultProxy:
    p = FaultProxy(("127.0.0.1", registry.port))
    yield p
    p.close()


def test_interrupted_blob_upload_is_retried(registry: Registry, layered: str, cache_dir: str,
                                           proxy: FaultProxy) -> None:
    proxy.rules.append(Rule("PUT", r"/v2/nydus/retried/blobs/uploads/", times=2))
    dst = f"{proxy.host}/nydus/retried:v1"
    r = pynydus(*convert_args(layered, dst, cache_dir))
    assert r.rc == 0, r.err
    assert len(proxy.cut) == 2
    c = pynydus("check-image", "--source", layered, "--target", registry.ref("nydus/retried", "v1"))
    assert c.rc == 0, c.err + c.out


def test_failed_manifest_push_leaves_tag_untouched(registry: Registry, layered: str,
                                                   cache_dir: str, proxy: FaultProxy) -> None:
    proxy.rules.append(Rule("PUT", r"/v2/nydus/cutoff/manifests/v1$", times=-1))
    r = pynydus(*convert_args(layered, f"{proxy.host}/nydus/cutoff:v1", cache_dir))
    assert r.rc != 0
    assert "manifest" in r.err and "nydus/cutoff" in r.err
    assert _tag_absent(registry, "nydus/cutoff", "v1")
    # every blob made it; a rerun without the fault completes the image
    proxy.rules.clear()
    again = pynydus(*convert_args(layered, f"{proxy.host}/nydus/cutoff:v1", cache_dir))
    assert again.rc == 0, again.err
    with client_for(registry) as c:
        doc = json.loads(c.get_manifest("nydus/cutoff", "v1").data)
    assert doc["layers"][-1]["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
