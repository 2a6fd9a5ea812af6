"""Build OCI images offline (standard library only) and push them with skopeo.

A ``Layer`` is a list of entries (files, directories, symlinks, hardlinks, whiteouts,
opaque markers) written in the order given, with missing parent directories added in
front. ``Image`` turns layers into an OCI image layout directory (``oci-layout``,
``index.json``, ``blobs/sha256``) with deterministic digests: sorted JSON, tar mtimes
from the entries (default 0), gzip with mtime 0. ``push`` copies the layout to a
registry unchanged with ``skopeo copy``.

Whiteouts follow the OCI image spec: deleting ``a/b`` in a layer is an empty regular
file ``a/.wh.b``; an opaque directory ``d`` (lower content hidden) is marked by
``d/.wh..wh..opq``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .util import HarnessError, run

MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
BUSYBOX = Path("/bin/busybox")


def _norm(path: str) -> str:
    p = posixpath.normpath("/" + path).lstrip("/")
    if not p or p == ".":
        raise ValueError(f"layer entry path {path!r} names the root")
    return p


@dataclass(frozen=True)
class Entry:
    """One tar member. ``kind``: file, dir, symlink, hardlink (``target`` is the path of
    the first link, inside the image), whiteout or opaque (markers, empty files)."""

    path: str
    kind: str
    data: bytes = b""
    mode: int = 0o644
    target: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()

    def tarinfo(self) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(self.path)
        ti.mode, ti.uid, ti.gid, ti.mtime = self.mode, self.uid, self.gid, self.mtime
        ti.uname = ti.gname = ""
        if self.kind in ("file", "whiteout", "opaque"):
            ti.type, ti.size = tarfile.REGTYPE, len(self.data)
        elif self.kind == "dir":
            ti.type = tarfile.DIRTYPE
        elif self.kind == "symlink":
            ti.type, ti.linkname = tarfile.SYMTYPE, self.target
        elif self.kind == "hardlink":
            ti.type, ti.linkname = tarfile.LNKTYPE, self.target
        else:
            raise ValueError(f"unknown entry kind {self.kind!r} for {self.path}")
        if self.xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in self.xattrs}
        return ti


class Layer:
    """A layer under construction; the builder methods return ``self`` to chain."""

    def __init__(self, name: str = "", media_type: str = MT_LAYER_GZIP) -> None:
        self.name = name
        self.media_type = media_type
        self.entries: list[Entry] = []
        self._dirs: set[str] = set()

    def _parents(self, path: str) -> None:
        parent = posixpath.dirname(path)
        if parent and parent not in self._dirs:
            self._parents(parent)
            self._add(Entry(parent, "dir", mode=0o755))

    def _add(self, e: Entry) -> Layer:
        self._parents(e.path)
        if e.kind == "dir":
            if e.path in self._dirs:
                return self
            self._dirs.add(e.path)
        self.entries.append(e)
        return self

    def file(self, path: str, data: bytes | str, mode: int = 0o644, *, uid: int = 0,
             gid: int = 0, mtime: int = 0, xattrs: dict[str, str] | None = None) -> Layer:
        raw = data.encode() if isinstance(data, str) else data
        return self._add(Entry(_norm(path), "file", raw, mode, uid=uid, gid=gid, mtime=mtime,
                               xattrs=tuple(sorted((xattrs or {}).items()))))

    def dir(self, path: str, mode: int = 0o755, *, uid: int = 0, gid: int = 0) -> Layer:
        return self._add(Entry(_norm(path), "dir", mode=mode, uid=uid, gid=gid))

    def symlink(self, path: str, target: str) -> Layer:
        return self._add(Entry(_norm(path), "symlink", mode=0o777, target=target))

    def hardlink(self, path: str, target: str) -> Layer:
        """``path`` becomes another name of ``target`` (added earlier in this layer)."""
        return self._add(Entry(_norm(path), "hardlink", target=_norm(target)))

    def whiteout(self, path: str) -> Layer:
        """Delete ``path`` (file or whole directory) of the layers below."""
        p = _norm(path)
        marker = posixpath.join(posixpath.dirname(p), WHITEOUT_PREFIX + posixpath.basename(p))
        return self._add(Entry(marker, "whiteout", mode=0o644))

    def opaque(self, path: str, mode: int = 0o755) -> Layer:
        """Make directory ``path`` opaque: its content in lower layers is hidden."""
        p = _norm(path)
        self.dir(p, mode)
        return self._add(Entry(posixpath.join(p, OPAQUE_MARKER), "opaque", mode=0o644))

    def add_tree(self, src: Path, prefix: str = "") -> Layer:
        """Add a directory tree from the host (sorted, owners/modes kept, mtime 0,
        hardlinks within the tree kept as hardlinks)."""
        seen: dict[tuple[int, int], str] = {}
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, src)
            for n in sorted(dirnames + filenames):
                full = os.path.join(dirpath, n)
                rel = _norm(posixpath.join(prefix, "" if rel_dir == "." else rel_dir, n))
                st = os.lstat(full)
                mode = st.st_mode & 0o7777
                if os.path.islink(full):
                    self.symlink(rel, os.readlink(full))
                elif os.path.isdir(full):
                    self.dir(rel, mode, uid=st.st_uid, gid=st.st_gid)
                elif os.path.isfile(full):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in seen:
                        self.hardlink(rel, seen[key])
                        continue
                    seen[key] = rel
                    self.file(rel, Path(full).read_bytes(), mode, uid=st.st_uid, gid=st.st_gid)
        return self

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for e in self.entries:
                ti = e.tarinfo()
                tf.addfile(ti, io.BytesIO(e.data) if ti.isreg() else None)
        return buf.getvalue()


def busybox_layer(name: str = "busybox") -> Layer:
    """A minimal rootfs: Debian's static busybox with a symlink per applet, /etc/passwd."""
    if not BUSYBOX.exists():
        raise HarnessError(f"{BUSYBOX} missing: install Debian package busybox-static "
                           "(scripts/setup.sh does)")
    applets = run([str(BUSYBOX), "--list-full"]).stdout.split()
    layer = Layer(name)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "var", "run", "proc",
              "sys", "dev"):
        layer.dir(d)
    layer.dir("tmp", 0o1777)
    layer.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for app in sorted(set(applets)):
        if app != "bin/busybox":
            layer.symlink(app, "/bin/busybox")
    layer.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
               "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    layer.file("etc/group", "root:x:0:\nnogroup:x:65534:\n")
    layer.file("etc/hostname", "pynydus-test\n")
    return layer


def _sha256(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """containerd's snapshot names for committed layers: ChainID(L0) = DiffID(L0),
    ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else _sha256(f"{out[-1]} {d}".encode()))
    return out


@dataclass
class BuiltImage:
    """What ``Image.write_layout`` produced."""

    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layers: list[dict[str, object]]
    diff_ids: list[str]

    @property
    def chain_ids(self) -> list[str]:
        return chain_ids(self.diff_ids)

    @property
    def size(self) -> int:
        return sum(int(str(d["size"])) for d in self.layers)


@dataclass
class Image:
    layers: list[Layer]
    cmd: list[str] = field(default_factory=lambda: ["/bin/sh"])
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=lambda: list(DEFAULT_ENV))
    workdir: str = "/"
    labels: dict[str, str] = field(default_factory=dict)
    created: str = "1970-01-01T00:00:00Z"
    annotations: dict[str, str] = field(default_factory=dict)  # of the manifest

    def write_layout(self, layout: Path, tag: str = "latest") -> BuiltImage:
        """Write an OCI image layout at ``layout`` (replaced if it exists)."""
        if layout.exists():
            shutil.rmtree(layout)
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

        def put(b: bytes) -> str:
            d = _sha256(b)
            (blobs / d.split(":", 1)[1]).write_bytes(b)
            return d

        descs: list[dict[str, object]] = []
        diff_ids: list[str] = []
        for layer in self.layers:
            raw = layer.tar()
            diff_ids.append(_sha256(raw))
            if layer.media_type == MT_LAYER_GZIP:
                blob = gzip.compress(raw, 6, mtime=0)
            elif layer.media_type == MT_LAYER_ZSTD:
                import zstandard

                blob = zstandard.ZstdCompressor(level=3).compress(raw)
            else:
                blob = raw
            descs.append({"mediaType": layer.media_type, "digest": put(blob), "size": len(blob)})
        cfg: dict[str, object] = {
            "architecture": "amd64", "os": "linux", "created": self.created,
            "config": {"Env": self.env, "Cmd": self.cmd, "WorkingDir": self.workdir},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": self.created, "created_by": f"pynydus harness {lyr.name}"}
                        for lyr in self.layers],
        }
        cfg_inner = cfg["config"]
        assert isinstance(cfg_inner, dict)
        if self.entrypoint is not None:
            cfg_inner["Entrypoint"] = self.entrypoint
        if self.labels:
            cfg_inner["Labels"] = self.labels
        cfg_bytes = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
        cdig = put(cfg_bytes)
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                    "config": {"mediaType": MT_CONFIG, "digest": cdig, "size": len(cfg_bytes)},
                    "layers": descs}
        if self.annotations:
            manifest["annotations"] = dict(self.annotations)
        mbytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        mdig = put(mbytes)
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": MT_MANIFEST, "digest": mdig, "size": len(mbytes),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
        (layout / "index.json").write_text(json.dumps(index))
        return BuiltImage(layout, tag, mdig, cdig, descs, diff_ids)


def push(image: BuiltImage, ref: str, *, creds: str | None = None) -> None:
    """Copy the OCI layout to ``docker://ref`` over plain HTTP, blobs unchanged."""
    if shutil.which("skopeo") is None:
        raise HarnessError("skopeo missing: run scripts/setup.sh")
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
            "--preserve-digests"]
    if creds:
        argv += ["--dest-creds", creds]
    argv += [f"oci:{image.layout}:{image.tag}", f"docker://{ref}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0 and "preserve-digests" in r.stderr:
        # skopeo < 1.6 has no --preserve-digests; it keeps digests anyway without conversion
        argv.remove("--preserve-digests")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0:
        raise HarnessError(f"skopeo copy to {ref} failed: {r.stderr.strip()}")
