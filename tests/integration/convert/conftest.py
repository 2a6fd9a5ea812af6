"""Fixtures for the converter's integration tests: real ``docker-registry`` instances
(plain and htpasswd), test images pushed to them, and a ``pynydus`` CLI runner.

Images are built offline with ``tests/harness`` (whiteouts, opaque dirs, hardlinks in
a lower and a middle layer, xattrs) or pushed directly with our registry client when
a test needs a layout skopeo would not make (zstd/uncompressed layers, Docker
manifests, bogus media types, multi-platform indexes).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import zstandard

from pynydus.registry import RegistryClient
from tests.harness import images, oci, tools
from tests.harness.registry import Registry, write_htpasswd
from tests.harness.util import make_workdir, remove_tree

if TYPE_CHECKING:
    from pynydus.convert.overlay_view import OverlayView

USER, PASSWORD = "conv", "s3cret-pw"


@pytest.fixture(scope="session", autouse=True)
def _tools_present() -> None:
    """A missing registry or skopeo fails these tests (setup.sh installs both)."""
    tools.require("/usr/bin/docker-registry", "skopeo")


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    d = make_workdir("cvt")
    yield d
    remove_tree(d)


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    with Registry() as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(workdir: Path) -> Iterator[Registry]:
    htp = write_htpasswd(workdir / "htpasswd", USER, PASSWORD)
    with Registry(htpasswd=htp) as reg:
        yield reg


def xattr_layer() -> oci.Layer:
    return (oci.Layer("xattrs")
            .file("app/xattr.txt", "has xattrs\n",
                  xattrs={"user.pynydus.test": "value-1", "trusted.pynydus.note": "t"})
            .file("app/part-of-big.bin", images.BIG[: 300_000] + b"tail")
            .file("app/dated.txt", "dated\n", mtime=1_700_000_000)
            .file("app/dup-of-big.bin", images.BIG))  # same content as a lower layer's file


def make_test_image() -> oci.Image:
    """busybox + the e2e layered image's three layers + a layer with xattrs and a
    file duplicating a lower layer's (cross-layer dedup)."""
    base = images.layered_image()
    return oci.Image(base.layers + [xattr_layer()], cmd=base.cmd)


@pytest.fixture(scope="session")
def layered(registry: Registry, workdir: Path) -> str:
    built = make_test_image().write_layout(workdir / "layered")
    ref = registry.ref("src/layered")
    oci.push(built, ref)
    return ref


@dataclass
class Run:
    rc: int
    out: str
    err: str


def pynydus(*args: str, timeout: float = 600, stdin: str | None = None,
            env: dict[str, str] | None = None) -> Run:
    r = subprocess.run([sys.executable, "-m", "pynydus.cli.main", *args], capture_output=True,
                       text=True, timeout=timeout, check=False, input=stdin,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return Run(r.returncode, r.stdout, r.stderr)


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def convert_args(src: str, dst: str, cache: str, *extra: str) -> list[str]:
    return ["convert", "--source", src, "--target", dst, "--cache-dir", cache,
            "--progress", "plain", *extra]


def convert_and_check(src: str, dst: str, cache: str) -> None:
    """Convert ``src`` to ``dst`` and have ``check-image`` compare them; both succeed."""
    r = pynydus(*convert_args(src, dst, cache))
    assert r.rc == 0, r.err
    c = pynydus("check-image", "--source", src, "--target", dst)
    assert c.rc == 0, c.err + c.out


# ----------------------------------------------------------------- direct pushes
def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


@dataclass
class PushedImage:
    ref: str
    manifest_digest: str
    manifest: dict[str, object]


def push_layers(client: RegistryClient, repo: str, tag: str | None,
                layers: list[tuple[str, bytes, bytes]], *, docker: bool = False,
                arch: str = "amd64", extra_config: dict[str, object] | None = None
                ) -> tuple[str, bytes, dict[str, object]]:
    """Push (media_type, blob, uncompressed tar) layers + config + manifest.
    Returns (manifest digest, manifest bytes, manifest doc)."""
    descs = []
    for mt, blob, _ in layers:
        client.push_blob(repo, blob, sha(blob))
        descs.append({"mediaType": mt, "digest": sha(blob), "size": len(blob)})
    cfg = {"architecture": arch, "os": "linux",
           "config": {"Cmd": ["/bin/sh"]},
           "rootfs": {"type": "layers", "diff_ids": [sha(t) for _, _, t in layers]},
           "history": [{"created_by": "test"}], **(extra_config or {})}
    cbytes = json.dumps(cfg).encode()
    client.push_blob(repo, cbytes, sha(cbytes))
    mt = ("application/vnd.docker.distribution.manifest.v2+json" if docker
          else "application/vnd.oci.image.manifest.v1+json")
    cfg_mt = ("application/vnd.docker.container.image.v1+json" if docker
              else "application/vnd.oci.image.config.v1+json")
    doc: dict[str, object] = {"schemaVersion": 2, "mediaType": mt,
                              "config": {"mediaType": cfg_mt, "digest": sha(cbytes),
                                         "size": len(cbytes)},
                              "layers": descs}
    mbytes = json.dumps(doc).encode()
    digest = client.put_manifest(repo, tag or sha(mbytes), mt, mbytes)
    return digest, mbytes, doc


def layer_blob(layer: oci.Layer, compression: str) -> tuple[str, bytes, bytes]:
    tar = layer.tar()
    if compression == "gzip":
        return oci.MT_LAYER_GZIP, gzip.compress(tar, mtime=0), tar
    if compression == "zstd":
        return ("application/vnd.oci.image.layer.v1.tar+zstd",
                zstandard.ZstdCompressor().compress(tar), tar)
    if compression == "docker":
        return ("application/vnd.docker.image.rootfs.diff.tar.gzip",
                gzip.compress(tar, mtime=0), tar)
    return oci.MT_LAYER_TAR, tar, tar


def client_for(reg: Registry, auth: str | None = None) -> RegistryClient:
    return RegistryClient(reg.host, scheme="http", auth=auth)


# ----------------------------------------------------------------- mounted trees
def source_view(reg: Registry, repo: str, ref: str) -> OverlayView:
    """The source image's layers applied with overlay semantics (check-image's model)."""
    from pynydus.convert.overlay_view import OverlayView

    view = OverlayView()
    with client_for(reg) as c:
        src = json.loads(c.get_manifest(repo, ref).data)
        for lyr in src["layers"]:
            view.apply_layer(io.BytesIO(b"".join(c.get_blob(repo, lyr["digest"]))))
    return view


def assert_tree_matches(root: Path, view: OverlayView, *, zero_mtime: bool = True) -> None:
    """A mounted tree has exactly the view's paths with its types, modes, owners,
    contents, mtimes, link targets, xattrs and hardlink identity. ``zero_mtime=False``:
    a source mtime of 0 is not compared (pynydusd, like nydusd, shows its start time)."""
    seen = {""}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = str(full.relative_to(root))
            seen.add(rel)
            want = view.paths.get(rel)
            assert want is not None, f"/{rel} is in the mount but not in the source"
            st = os.lstat(full)
            assert stat.S_IMODE(st.st_mode) == want.mode, rel
            assert (st.st_uid, st.st_gid) == (want.uid, want.gid), rel
            if stat.S_ISREG(st.st_mode):
                assert want.kind == "reg", rel
                assert hashlib.sha256(full.read_bytes()).hexdigest() == want.sha256, rel
                if want.mtime or zero_mtime:
                    assert st.st_mtime_ns // 10**9 == want.mtime, rel
            elif stat.S_ISLNK(st.st_mode):
                assert want.kind == "symlink" and os.readlink(full).encode() == want.link, rel
            elif stat.S_ISDIR(st.st_mode):
                assert want.kind == "dir", rel
            for key, value in want.xattrs.items():
                assert os.getxattr(full, key, follow_symlinks=False) == value, (rel, key)
    assert seen == set(view.paths), sorted(set(view.paths) ^ seen)
    groups: dict[int, set[int]] = {}
    for p, rec in view.paths.items():
        if rec.group:
            groups.setdefault(rec.group, set()).add(os.lstat(root / p).st_ino)
    assert groups and all(len(inos) == 1 for inos in groups.values()), groups
