#!/usr/bin/env python3
"""The images of the lazy-pull benchmark, built offline, in three formats.

Three images, each pushed to a loopback ``docker-registry`` as ``bench/<name>:oci``
(plain OCI, gzip layers), converted with ``pynydus convert`` to ``bench/<name>:nydus``
(and, on request, with ``--oci-ref`` to ``bench/<name>:zran`` and with ``--with-referrer``
to ``bench/<name>:nydus-ref``, a Nydus manifest whose subject is ``bench/<name>:oci``)
and with ``ctr-remote images convert --estargz --oci`` (inside a private containerd)
to ``bench/<name>:esgz``:

  large       4 layers, ~800 MB of files: Debian bookworm minbase + python3
              (debootstrap against the configured mirror, cached), 40 x 10 MiB
              incompressible shards, 2,000 text documents of ~100 KB, an app.
              Cmd ``python3 /app/main.py``: starts python, imports json/os, reads
              one 100 KB document whole and prints what it touched (the sizes of
              every mapped file, imported module and file it read).
  many-files  busybox base + 50,000 files of 64 B..4 KiB in 100 directories.
              Cmd: ``sh`` reads two of them.
  small       busybox base + a hello script: ~2 MB. Cmd ``/bin/sh /app/hello.sh``.

Optional variants (``--formats``, or ``bench/lazy_pull.py --nydus-tag/--stargz-tag``) of
the large image, whose app reports the files its start-up touched:
``bench/large:nydus-pf`` converted with ``pynydus convert --prefetch-files`` (those files,
recorded by running the Cmd once in an overlayfs container) and ``bench/large:esgzopt``
from ``ctr-remote images optimize --oci`` (eStargz with the Cmd's files first, prefetched).

Everything but the debootstrap layer is generated from seeds, tar mtimes are 0 and
gzip is ``pigz -n``, so the OCI digests repeat from one build to the next. Sources,
layouts, the registry's storage and a state file live under the work directory
(default ``/var/tmp/pynydus-bench``; never under the repository). A second run only
checks that every tag is in the registry.

    bench/lazy_images.py                    # build what is missing (large: ~5-10 min)
    bench/lazy_images.py --only small       # one image
    bench/lazy_images.py --rebuild          # rebuild layouts and re-push (base kept)
    bench/lazy_images.py --rebuild-base     # also debootstrap again

``ensure(...)`` is what ``bench/lazy_pull.py`` calls with a running registry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness.containerd import Containerd
from tests.harness.registry import Registry

WORK = Path(os.environ.get("PYNYDUS_BENCH_DIR", "/var/tmp/pynydus-bench"))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
CTR_REMOTE = shutil.which("ctr-remote") or "/usr/bin/ctr-remote"
PYNYDUS = Path(sys.executable).parent / "pynydus"
BUSYBOX = Path("/bin/busybox")
MiB = 1 << 20
FORMATS = ("oci", "nydus", "esgz")
VARIANTS = ("nydus-pf", "esgzopt")  # large image only, on request
# Bump when what an image contains changes: the state file then forces a rebuild.
RECIPE_VERSION = 1

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = (f"{MT_MANIFEST}, application/vnd.oci.image.index.v1+json, "
          "application/vnd.docker.distribution.manifest.v2+json")


def log(msg: str) -> None:
    print(f"[lazy_images {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ source trees

def _corpus(rng: random.Random, size: int) -> bytes:
    """Log-like pseudo text (compresses about 2:1, like real logs and docs)."""
    alphabet = "etaoinshrdlucmfwypvbgkjqxz"
    vocab = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    parts: list[str] = []
    n = i = 0
    while n < size:
        line = f"{i:07d} {rng.choice(('I', 'W', 'E', 'D'))} {' '.join(rng.choices(vocab, k=rng.randint(3, 16)))}\n"
        parts.append(line)
        n += len(line)
        i += 1
    return "".join(parts).encode()[:size]


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def tree_busybox(d: Path) -> None:
    """A minimal rootfs: Debian's static busybox, a symlink per applet, passwd/group."""
    if not BUSYBOX.exists():
        raise SystemExit("/bin/busybox missing: apt-get install busybox-static")
    for sub in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "var/log", "run", "proc",
                "sys", "dev"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "tmp").mkdir(exist_ok=True)
    os.chmod(d / "tmp", 0o1777)
    shutil.copyfile(BUSYBOX, d / "bin/busybox")
    os.chmod(d / "bin/busybox", 0o755)
    applets = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    for app in sorted(set(applets)):
        p = d / app
        if app != "bin/busybox" and not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.symlink_to("/bin/busybox")
    _write(d / "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    _write(d / "etc/group", b"root:x:0:\n")


def tree_small_app(d: Path) -> None:
    _write(d / "app/hello.sh", b"#!/bin/sh\necho small: ok\n", 0o755)
    _write(d / "app/README", _corpus(random.Random(11), 64 << 10))


def tree_many(d: Path, count: int = 50_000, per_dir: int = 500) -> None:
    rng = random.Random(31)
    corpus = _corpus(rng, 2 * MiB)
    for i in range(count):
        size = int(2 ** rng.uniform(6, 12))  # 64 B .. 4 KiB, log-uniform
        off = rng.randrange(len(corpus) - size)
        _write(d / f"data/d{i // per_dir:03d}/f{i:05d}.txt", corpus[off:off + size])


def tree_shards(d: Path, count: int = 40, size: int = 10 * MiB) -> None:
    rng = random.Random(41)
    for i in range(count):
        _write(d / f"opt/models/shard-{i:03d}.bin", rng.randbytes(size))


def tree_docs(d: Path, count: int = 2000, mean: int = 100 << 10) -> None:
    rng = random.Random(51)
    corpus = _corpus(rng, 16 * MiB)
    for i in range(count):
        size = int(mean * rng.uniform(0.5, 1.5))
        off = rng.randrange(len(corpus) - size)
        _write(d / f"opt/docs/g{i // 100:02d}/doc-{i:05d}.txt",
               f"doc {i}\n".encode() + corpus[off:off + size])


LARGE_MAIN = '''\
"""Start-up of the benchmark's large image: python, two stdlib modules, one document."""
import json
import os
import sys

with open("/app/config.json") as f:
    cfg = json.load(f)
with open(cfg["document"], "rb") as f:
    doc = f.read()
# What this start-up touched, by whole-file size: every mapped file (the interpreter,
# shared libraries), every imported module's code and every file read above.
touched = {"/app/config.json", "/app/main.py", cfg["document"]}
with open("/proc/self/maps") as f:
    for line in f:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            touched.add(parts[5].strip())
for mod in list(sys.modules.values()):
    path = getattr(mod, "__cached__", None) or getattr(mod, "__file__", None)
    if path and os.path.exists(path):
        touched.add(path)
total = sum(os.stat(p).st_size for p in touched if os.path.isfile(p))
print(f"large: ok doc={len(doc)} touched_files={len(touched)} touched_bytes={total}")
'''


def tree_large_app(d: Path) -> None:
    _write(d / "app/main.py", LARGE_MAIN.encode())
    _write(d / "app/config.json", json.dumps({"document": "/opt/docs/g07/doc-00742.txt"}).encode())


def tree_debian(d: Path, rebuild: bool) -> None:
    """debootstrap bookworm minbase + python3, cached (the only non-reproducible layer)."""
    if d.is_dir() and (d / "usr/bin/python3").exists() and not rebuild:
        return
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap missing: scripts/setup.sh installs it")
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)
    log(f"debootstrap {SUITE} minbase + python3 from {MIRROR} (a few minutes)")
    with open(d.parent / "debootstrap.log", "w") as out:
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,ca-certificates",
                        SUITE, str(tmp), MIRROR], check=True, stdout=out, stderr=subprocess.STDOUT)
    trim_debian(tmp)
    tmp.rename(d)


def trim_debian(tmp: Path) -> None:
    """Drop what image builds drop: package caches, logs, device nodes (the runtime
    makes /dev)."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "var/log/*", "tmp/*", "dev/*"):
        for p in tmp.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.name != "lock":
                p.unlink()
    (tmp / "etc/resolv.conf").write_text("")


# ------------------------------------------------------------------------ OCI layout

@dataclass
class LayerOut:
    digest: str
    diff_id: str
    size: int
    tar_size: int
    files: int


def write_layer(src: Path, blobs: Path) -> LayerOut:
    """Tar ``src`` (sorted, mtime 0, numeric owners, no device nodes) and gzip it with
    ``pigz -n`` into ``blobs``; returns digests and sizes. Streams through disk."""
    tmp_tar = blobs / ".layer.tar"
    files = 0
    h = hashlib.sha256()

    class _Hash:
        def __init__(self, f: Any) -> None:
            self.f = f
            self.n = 0

        def write(self, b: bytes) -> int:
            h.update(b)
            self.n += len(b)
            return int(self.f.write(b))

    with open(tmp_tar, "wb") as raw:
        hw = _Hash(raw)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                rel_dir = os.path.relpath(dirpath, src)
                for name in sorted(dirnames + filenames):
                    full = os.path.join(dirpath, name)
                    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                    ti = tf.gettarinfo(full, arcname=rel)
                    if ti is None or ti.ischr() or ti.isblk() or ti.isfifo():
                        continue
                    ti.mtime, ti.uname, ti.gname, ti.pax_headers = 0, "", "", {}
                    if ti.isreg():
                        files += 1
                        with open(full, "rb") as f:
                            tf.addfile(ti, f)
                    else:
                        tf.addfile(ti)
        tar_size = hw.n
    gz = blobs / ".layer.tar.gz"
    if shutil.which("pigz") is None:  # gzip would write other bytes: other image digests
        raise SystemExit("pigz missing: scripts/setup.sh installs it")
    comp = ["pigz", "-n", "-6", "-c"]
    with open(tmp_tar, "rb") as inp, open(gz, "wb") as out:
        subprocess.run(comp, stdin=inp, stdout=out, check=True)
    tmp_tar.unlink()
    g = hashlib.sha256()
    with open(gz, "rb") as f:
        while chunk := f.read(4 * MiB):
            g.update(chunk)
    digest = g.hexdigest()
    gz.rename(blobs / digest)
    return LayerOut("sha256:" + digest, "sha256:" + h.hexdigest(), (blobs / digest).stat().st_size,
                    tar_size, files)


def write_layout(layout: Path, layer_dirs: list[Path], cmd: list[str]) -> dict[str, Any]:
    """An OCI image layout (tag ``latest``) from rootfs directories, one layer each."""
    shutil.rmtree(layout, ignore_errors=True)
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layers = []
    for d in layer_dirs:
        t0 = time.monotonic()
        lo = write_layer(d, blobs)
        log(f"  layer {d.name}: {lo.files} files, tar {lo.tar_size / 1e6:.1f} MB, "
            f"gz {lo.size / 1e6:.1f} MB ({time.monotonic() - t0:.0f} s)")
        layers.append(lo)

    def put(obj: dict[str, Any]) -> tuple[str, int]:
        b = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        d = hashlib.sha256(b).hexdigest()
        (blobs / d).write_bytes(b)
        return "sha256:" + d, len(b)

    cfg_digest, cfg_size = put({
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": {"Cmd": cmd, "WorkingDir": "/",
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [lo.diff_id for lo in layers]},
    })
    man_digest, man_size = put({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": MT_LAYER, "digest": lo.digest, "size": lo.size} for lo in layers],
    })
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": MT_MANIFEST, "digest": man_digest, "size": man_size,
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    return {"manifest": man_digest, "compressed_bytes": sum(lo.size for lo in layers),
            "tar_bytes": sum(lo.tar_size for lo in layers), "files": sum(lo.files for lo in layers),
            "layers": len(layers)}


# ------------------------------------------------------------------------ the images

@dataclass(frozen=True)
class ImageSpec:
    name: str
    cmd: list[str]
    expect: str                       # the Cmd prints this on success
    layers: list[tuple[str, Callable[[Path], None]]]
    reads: tuple[str, ...] = ()       # files the Cmd reads whole (when it cannot say itself)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def specs(rebuild_base: bool = False) -> dict[str, ImageSpec]:
    return {
        "small": ImageSpec(
            "small", ["/bin/sh", "/app/hello.sh"], "small: ok",
            [("busybox", tree_busybox), ("small-app", tree_small_app)],
            reads=("bin/busybox", "app/hello.sh")),
        "many-files": ImageSpec(
            "many-files",
            ["/bin/sh", "-c", ("cat /data/d042/f21000.txt /data/d007/f03512.txt >/dev/null"
                               " && echo many-files: ok")],
            "many-files: ok",
            [("busybox", tree_busybox), ("many", tree_many)],
            reads=("bin/busybox", "data/d042/f21000.txt", "data/d007/f03512.txt")),
        "large": ImageSpec(
            "large", ["python3", "/app/main.py"], "large: ok",
            [("debian-base", lambda d: tree_debian(d, rebuild_base)), ("shards", tree_shards),
             ("docs", tree_docs), ("large-app", tree_large_app)]),
    }


def source_tree(name: str, fill: Callable[[Path], None], rebuild: bool) -> Path:
    d = WORK / "src" / name
    stamp = d.with_name(name + ".done")
    if name == "debian-base":  # cached separately: debootstrap is slow and not reproducible
        d.parent.mkdir(parents=True, exist_ok=True)
        fill(d)
        return d
    if d.is_dir() and stamp.exists() and stamp.read_text() == str(RECIPE_VERSION) and not rebuild:
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    log(f"generating {d}")
    fill(d)
    stamp.write_text(str(RECIPE_VERSION))
    return d


def reads_bytes(spec: ImageSpec) -> int:
    """Whole-file sizes of ``spec.reads``, each taken from the topmost layer that has it."""
    total = 0
    for rel in spec.reads:
        for lname, _ in reversed(spec.layers):
            p = WORK / "src" / lname / rel
            if p.is_file():
                total += p.stat().st_size
                break
    return total


# ------------------------------------------------------------------------ registry side

def tag_exists(registry_host: str, repo: str, tag: str) -> bool:
    req = urllib.request.Request(f"http://{registry_host}/v2/{repo}/manifests/{tag}", method="HEAD")
    req.add_header("Accept", ACCEPT)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return bool(r.status == 200)
    except urllib.error.HTTPError:
        return False


def manifest_info(registry_host: str, repo: str, tag: str) -> dict[str, Any]:
    """Digest and layer sizes of a pushed image (through a platform index if any)."""
    def get(ref: str) -> tuple[dict[str, Any], str]:
        req = urllib.request.Request(f"http://{registry_host}/v2/{repo}/manifests/{ref}")
        req.add_header("Accept", ACCEPT)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read()), r.headers.get("Docker-Content-Digest", "")
    man, digest = get(tag)
    if "manifests" in man:
        man, _ = get(man["manifests"][0]["digest"])
    return {"digest": digest, "layers": [{"digest": lyr["digest"], "size": lyr["size"],
                                          "annotations": lyr.get("annotations", {})}
                                         for lyr in man["layers"]],
            "compressed_bytes": sum(int(lyr["size"]) for lyr in man["layers"])}


def push_layout(layout: Path, ref: str) -> None:
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci:{layout}:latest", f"docker://{ref}"], check=True, timeout=1800)


def convert_nydus(src: str, dst: str, *extra: str) -> None:
    exe = [str(PYNYDUS)] if PYNYDUS.exists() else [sys.executable, "-m", "pynydus.cli.main"]
    subprocess.run([*exe, "convert", "--source", src, "--target", dst, "--source-insecure",
                    "--target-insecure", "--progress", "plain", *extra], check=True,
                   timeout=3600)


RECORD_TOUCHED = ("exec(open('/app/main.py').read()); "
                  "print('\\n'.join(sorted(touched)))")


def convert_variants(host: str, repo: str, want: list[str]) -> None:
    """``nydus-pf`` and ``esgzopt`` of the large image (see the module docstring)."""
    src = f"{host}/{repo}:oci"
    with Containerd(tag="lzvar") as ctrd:
        base = [CTR_REMOTE, "-a", str(ctrd.socket), "-n", ctrd.namespace]
        ctrd.ctr("images", "pull", "--plain-http", src, timeout=1800)
        if "nydus-pf" in want:
            out = ctrd.ctr_out("run", "--rm", src, "lz-record", "python3", "-c", RECORD_TOUCHED,
                               timeout=600)
            listing = WORK / "large-prefetch.txt"
            listing.write_text("".join(f"{p}\n" for p in out.splitlines() if p.startswith("/")))
            exe = [str(PYNYDUS)] if PYNYDUS.exists() else [sys.executable, "-m", "pynydus.cli.main"]
            subprocess.run([*exe, "convert", "--source", src, "--target", f"{host}/{repo}:nydus-pf",
                            "--source-insecure", "--target-insecure", "--prefetch-files",
                            str(listing), "--progress", "plain"], check=True, timeout=3600)
        if "esgzopt" in want:
            dst = f"{host}/{repo}:esgzopt"
            subprocess.run([*base, "images", "optimize", "--oci", "--period", "10", src, dst],
                           check=True, capture_output=True, timeout=3600)
            subprocess.run([*base, "images", "push", "--plain-http", dst], check=True,
                           capture_output=True, timeout=1800)


def convert_estargz(pairs: list[tuple[str, str]]) -> None:
    """``ctr-remote images convert --estargz --oci`` in a private containerd, then push."""
    with Containerd(tag="lzimg") as ctrd:
        base = [CTR_REMOTE, "-a", str(ctrd.socket), "-n", ctrd.namespace]
        for src, dst in pairs:
            ctrd.ctr("images", "pull", "--plain-http", src, timeout=1800)
            subprocess.run([*base, "images", "convert", "--estargz", "--oci", src, dst],
                           check=True, capture_output=True, timeout=3600)
            subprocess.run([*base, "images", "push", "--plain-http", dst], check=True,
                           capture_output=True, timeout=1800)
            ctrd.ctr("images", "rm", "--sync", src, dst, check=False)


def state_path() -> Path:
    return WORK / "images.json"


def ensure(registry: Registry, names: list[str], *, rebuild: bool = False,
           rebuild_base: bool = False, formats: tuple[str, ...] = FORMATS) -> dict[str, Any]:
    """Make sure ``bench/<name>:{oci,nydus,esgz}`` are in ``registry``; return the state
    (per image: refs' repositories, sizes, digests, bytes the Cmd reads when known)."""
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        state: dict[str, Any] = json.loads(state_path().read_text())
    except (OSError, ValueError):
        state = {}
    all_specs = specs(rebuild_base)
    host = registry.host
    need_esgz: list[tuple[str, str]] = []
    for name in names:
        spec = all_specs[name]
        repo = f"bench/{name}"
        st = state.get(name, {})
        if st.get("recipe") != RECIPE_VERSION:
            st = {}
        fresh = rebuild or rebuild_base or not st or not tag_exists(host, repo, "oci")
        if fresh:
            t0 = time.monotonic()
            log(f"building {name}")
            dirs = [source_tree(lname, fill, rebuild) for lname, fill in spec.layers]
            info = write_layout(WORK / "oci" / name, dirs, spec.cmd)
            push_layout(WORK / "oci" / name, f"{host}/{repo}:oci")
            st = {"recipe": RECIPE_VERSION, "repo": repo, "cmd": spec.cmd, "expect": spec.expect,
                  "oci_build": info, "build_s": round(time.monotonic() - t0, 1)}
            if spec.reads:
                st["reads_bytes"] = reads_bytes(spec)
            log(f"pushed {host}/{repo}:oci ({info['compressed_bytes'] / 1e6:.1f} MB gz, "
                f"{info['tar_bytes'] / 1e6:.1f} MB tar, {info['files']} files)")
        if "nydus" in formats and (fresh or not tag_exists(host, repo, "nydus")):
            t0 = time.monotonic()
            convert_nydus(f"{host}/{repo}:oci", f"{host}/{repo}:nydus")
            st["nydus_convert_s"] = round(time.monotonic() - t0, 1)
        if "nydus-ref" in formats and (fresh or not tag_exists(host, repo, "nydus-ref")):
            # the OCI image's referrer (found by the referrers tag scheme: docker-registry
            # 2.8 has no referrers API), for referrer detection
            convert_nydus(f"{host}/{repo}:oci", f"{host}/{repo}:nydus-ref", "--with-referrer")
        if "zran" in formats and (fresh or not tag_exists(host, repo, "zran")):
            summary = WORK / f"{name}-zran.json"
            convert_nydus(f"{host}/{repo}:oci", f"{host}/{repo}:zran", "--oci-ref",
                          "--output-json", str(summary))
            st["zran_pushed"] = json.loads(summary.read_text())["images"][0]["oci_ref"]
        if "esgz" in formats and (fresh or not tag_exists(host, repo, "esgz")):
            need_esgz.append((f"{host}/{repo}:oci", f"{host}/{repo}:esgz"))
        state[name] = st
    variants = [f for f in formats if f in VARIANTS]
    if variants:
        if "large" not in names:
            raise SystemExit(f"{', '.join(variants)}: only the large image has these variants")
        missing = [v for v in variants if not tag_exists(host, "bench/large", v)]
        if missing:
            log(f"large: {', '.join(missing)}")
            convert_variants(host, "bench/large", missing)
    if need_esgz:
        t0 = time.monotonic()
        log(f"eStargz: {', '.join(d for _, d in need_esgz)}")
        convert_estargz(need_esgz)
        log(f"eStargz done in {time.monotonic() - t0:.0f} s")
    for name in names:
        for fmt in formats:
            if tag_exists(host, f"bench/{name}", fmt):
                state[name][fmt] = manifest_info(host, f"bench/{name}", fmt)
    state_path().write_text(json.dumps(state, indent=1))
    return {n: state[n] for n in names}


def bench_registry() -> Registry:
    """The benchmark's registry: its storage is kept under WORK/registry/data across
    runs (a new loopback port each start; image references carry the port, blobs do
    not); its config and access log are private to this process (/var/tmp/pyn-lzreg-*,
    removed at stop), so two runs at once never count each other's requests."""
    storage = WORK / "registry" / "data"
    storage.mkdir(parents=True, exist_ok=True)
    reg = Registry(tag="lzreg")
    reg.storage = storage
    return reg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="small,many-files,large",
                    help="comma-separated subset of small,many-files,large")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--rebuild-base", action="store_true")
    ap.add_argument("--formats", default=",".join(FORMATS))
    a = ap.parse_args()
    names = [n for n in a.only.split(",") if n]
    with bench_registry() as reg:
        st = ensure(reg, names, rebuild=a.rebuild, rebuild_base=a.rebuild_base,
                    formats=tuple(a.formats.split(",")))
    print(f"{'image':<11} {'format':<6} {'MB (compressed)':>15}  digest")
    for n in names:
        for fmt in FORMATS:
            if fmt in st[n]:
                print(f"{n:<11} {fmt:<6} {st[n][fmt]['compressed_bytes'] / 1e6:>15.1f}  "
                      f"{st[n][fmt]['digest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
