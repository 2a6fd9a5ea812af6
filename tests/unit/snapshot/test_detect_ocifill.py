"""Referrer/index detection (snapshot/detect.py) with a fake registry client, and the OCI
layer unpacking of the fallback (snapshot/ocifill.py)."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any, Self

import pytest

from pynydus import labels as L
from pynydus.convert import image
from pynydus.errors import FormatError, Unavailable
from pynydus.registry import media
from pynydus.snapshot import detect, ocifill

OCI = "sha256:" + "a" * 64
NYDUS = "sha256:" + "b" * 64
BOOT = "sha256:" + "c" * 64
REF = "reg.example/app:v1"


class _Manifest:
    def __init__(self, data: bytes, media_type: str) -> None:
        self.data, self.media_type, self.digest = data, media_type, ""


class FakeClient:
    """Answers what a registry would; counts requests."""

    def __init__(self, *, referrers: list[dict[str, Any]] | None = None,
                 top: dict[str, Any] | None = None, fail: Exception | None = None) -> None:
        self.referrers = referrers or []
        self.top = top
        self.fail = fail
        self.calls: list[str] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def get_referrers(self, repo: str, digest: str,
                      artifact_type: str | None = None) -> dict[str, Any]:
        self.calls.append(f"referrers {digest}")
        if self.fail:
            raise self.fail
        return {"manifests": self.referrers}

    def get_manifest(self, repo: str, ref: str, accept: Any = ()) -> _Manifest:
        self.calls.append(f"manifest {ref}")
        if self.fail:
            raise self.fail
        if ref == NYDUS:
            doc = {"layers": [{"digest": "sha256:" + "d" * 64},
                              {"digest": BOOT, "annotations": {L.NYDUS_BOOTSTRAP: "true",
                                                                L.NYDUS_FS_VERSION: "6"}}]}
            return _Manifest(json.dumps(doc).encode(), media.OCI_MANIFEST)
        if ref == OCI:
            return _Manifest(json.dumps({"layers": [{"digest": "x"}]}).encode(),
                             media.OCI_MANIFEST)
        assert self.top is not None
        return _Manifest(json.dumps(self.top).encode(), media.OCI_INDEX)

    def get_blob(self, repo: str, digest: str) -> list[bytes]:
        self.calls.append(f"blob {digest}")
        return [_tar_gz({"image/image.boot": b"BOOT"})]


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _labels(**extra: str) -> dict[str, str]:
    return {L.CRI_IMAGE_REF: REF, L.CRI_MANIFEST_DIGEST: OCI, **extra}


def _detector(client: FakeClient, **kw: Any) -> detect.Detector:
    return detect.Detector(client_factory=lambda ref, labels: client, **kw)  # type: ignore[arg-type,return-value]


def test_referrer_marked_as_nydus_is_found_with_one_request_per_image() -> None:
    client = FakeClient(referrers=[{"mediaType": media.OCI_MANIFEST, "digest": NYDUS,
                                    "artifactType": media.NYDUS_MANIFEST_ARTIFACT}])
    det = _detector(client, referrer=True, index=False)
    for _ in range(3):  # three layers of one image
        form = det.find(_labels())
        assert form == detect.NydusForm("referrer", "app", NYDUS)
    assert client.calls == [f"referrers {OCI}"]
    assert det.lookups == 1


def test_unmarked_referrer_is_taken_when_its_last_layer_is_a_bootstrap(tmp_path: Path) -> None:
    client = FakeClient(referrers=[{"mediaType": media.OCI_MANIFEST, "digest": NYDUS,
                                    "artifactType": "application/vnd.oci.image.config.v1+json"}])
    det = _detector(client, referrer=True, index=False)
    form = det.find(_labels())
    assert form is not None and form.boot is not None
    added = det.fetch_bootstrap(form, _labels(), str(tmp_path))
    assert (tmp_path / "image" / "image.boot").read_bytes() == b"BOOT"
    assert added == {L.NYDUS_BOOTSTRAP: "true", L.NYDUS_FS_VERSION: "6"}
    # the manifest read at discovery is not read again
    assert client.calls == [f"referrers {OCI}", f"manifest {NYDUS}", f"blob {BOOT}"]


def test_index_entry_for_the_same_platform_is_found() -> None:
    plat = {"os": "linux", "architecture": "amd64"}
    top = {"manifests": [
        {"digest": OCI, "platform": plat},
        {"digest": "sha256:" + "e" * 64, "platform": {"os": "linux", "architecture": "arm64",
                                                      "os.features": ["nydus.remoteimage.v1"]}},
        {"digest": NYDUS, "platform": {**plat, "os.features": ["nydus.remoteimage.v1"]}},
    ]}
    client = FakeClient(top=top)
    det = _detector(client, referrer=True, index=True)
    assert det.find(_labels()) == detect.NydusForm("index", "app", NYDUS)
    assert client.calls == ["manifest v1"]  # found: the referrers are not asked


def test_no_form_is_cached_and_a_failing_registry_means_plain_oci() -> None:
    now = [0.0]
    client = FakeClient()
    det = detect.Detector(referrer=True, index=False, clock=lambda: now[0],
                          client_factory=lambda ref, labels: client)  # type: ignore[arg-type,return-value]
    assert det.find(_labels()) is None
    assert det.find(_labels()) is None
    assert det.lookups == 1
    now[0] += detect.NEGATIVE_TTL + 1
    assert det.find(_labels()) is None
    assert det.lookups == 2
    broken = _detector(FakeClient(fail=Unavailable("registry down")), referrer=True, index=True)
    assert broken.find(_labels()) is None


def _json(doc: object) -> bytes:
    return json.dumps(doc).encode()


# A registry's documents are untrusted: whatever shape they have, detection ends in "no
# Nydus form" (a FormatError naming the place, logged), never in an AttributeError that
# failed the pull's Prepare.
HOSTILE_INDEXES = {
    "a-list": b"[1]",
    "manifests-an-object": b'{"manifests": {}}',
    "entry-a-number": b'{"manifests": [1]}',
    "digest-a-number": b'{"manifests": [{"digest": 7}]}',
    "platform-a-string": _json({"manifests": [{"digest": OCI, "platform": "linux"}]}),
    "features-a-string": _json({"manifests": [
        {"digest": OCI}, {"digest": NYDUS, "platform": {"os.features": "nydus.remoteimage.v1"}}]}),
    "artifact-type-a-list": _json({"manifests": [{"digest": OCI},
                                                 {"digest": NYDUS, "artifactType": []}]}),
}


@pytest.mark.parametrize("data", HOSTILE_INDEXES.values(), ids=HOSTILE_INDEXES.keys())
def test_a_malformed_index_is_a_format_error_and_the_pull_goes_on_as_oci(data: bytes) -> None:
    with pytest.raises(FormatError, match="index of a registry"):
        image.nydus_in_index(data, OCI, "index of a registry")

    class Raw(FakeClient):
        def get_manifest(self, repo: str, ref: str, accept: Any = ()) -> _Manifest:
            return _Manifest(data, media.OCI_INDEX)

    assert _detector(Raw(), referrer=False, index=True).find(_labels()) is None


_BOOT_MARK = {L.NYDUS_BOOTSTRAP: "true"}
# a manifest that is no JSON object, or whose bootstrap layer is no descriptor: FormatError
MALFORMED_MANIFESTS = {
    "not-json": b"{",
    "a-list": b"[1]",
    "digest-a-number": _json({"layers": [{"digest": 7, "annotations": _BOOT_MARK}]}),
    "annotation-a-number": _json({"layers": [{"digest": BOOT,
                                              "annotations": {L.NYDUS_BOOTSTRAP: 1}}]}),
    "size-a-string": _json({"layers": [{"digest": BOOT, "size": "1",
                                        "annotations": _BOOT_MARK}]}),
}
# shapes in which no layer is marked as a bootstrap: no Nydus form
UNMARKED_MANIFESTS = {
    "layers-a-number": b'{"layers": 5}',
    "layer-a-list": b'{"layers": [[]]}',
    "annotations-a-list": _json({"layers": [{"digest": BOOT, "annotations": [L.NYDUS_BOOTSTRAP]}]}),
}


def _referrer_found(data: bytes) -> detect.NydusForm | None:
    class Raw(FakeClient):
        def get_manifest(self, repo: str, ref: str, accept: Any = ()) -> _Manifest:
            return _Manifest(data, media.OCI_MANIFEST)

    client = Raw(referrers=[{"mediaType": media.OCI_MANIFEST, "digest": NYDUS}])
    return _detector(client, referrer=True, index=False).find(_labels())


@pytest.mark.parametrize("data", MALFORMED_MANIFESTS.values(), ids=MALFORMED_MANIFESTS.keys())
def test_a_malformed_referrer_manifest_is_a_format_error_and_no_form(data: bytes) -> None:
    with pytest.raises(FormatError, match="manifest m"):
        image.read_bootstrap_descriptor(data, "manifest m")
    assert _referrer_found(data) is None


@pytest.mark.parametrize("data", UNMARKED_MANIFESTS.values(), ids=UNMARKED_MANIFESTS.keys())
def test_a_referrer_without_a_marked_bootstrap_is_no_form(data: bytes) -> None:
    assert image.read_bootstrap_descriptor(data, "manifest m") is None
    assert _referrer_found(data) is None


def test_well_formed_documents_read_as_before() -> None:
    plat = {"os": "linux", "architecture": "amd64"}
    index = {"manifests": [{"digest": OCI, "platform": plat},
                           {"digest": NYDUS, "artifactType": media.NYDUS_MANIFEST_ARTIFACT,
                            "platform": plat}]}
    assert image.nydus_in_index(json.dumps(index).encode(), OCI, "i") == NYDUS
    assert image.nydus_in_index(json.dumps(index).encode(), "sha256:" + "f" * 64, "i") is None
    boot = {"digest": BOOT, "size": 3, "annotations": {L.NYDUS_BOOTSTRAP: "true"}}
    assert image.read_bootstrap_descriptor(json.dumps({"layers": [boot]}).encode(), "m") == boot
    assert image.read_bootstrap_descriptor(b'{"layers": [{"digest": "x"}]}', "m") is None
    assert image.read_bootstrap_descriptor(b'{"config": {}}', "m") is None


def test_layers_without_cri_labels_are_not_looked_up() -> None:
    client = FakeClient()
    det = _detector(client, referrer=True, index=True)
    assert det.find({L.TARGET_SNAPSHOT_REF: "x"}) is None
    assert client.calls == []


def test_last_layer_is_the_one_cri_lists_alone() -> None:
    assert detect.is_last_layer({L.CRI_LAYER_DIGEST: "sha256:3", L.CRI_IMAGE_LAYERS: "sha256:3"})
    assert not detect.is_last_layer({L.CRI_LAYER_DIGEST: "sha256:2",
                                     L.CRI_IMAGE_LAYERS: "sha256:2,sha256:3"})
    assert not detect.is_last_layer({L.CRI_LAYER_DIGEST: "sha256:2"})


# --------------------------------------------------------------------------- ocifill
def _layer(tmp_path: Path, members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]],
           name: str = "layer.tar.gz") -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            if isinstance(m, tuple):
                tf.addfile(m[0], io.BytesIO(m[1]))
            else:
                tf.addfile(m)
    path = tmp_path / name
    path.write_bytes(gzip.compress(buf.getvalue()))
    return str(path)


def _ti(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **kw: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime, ti.mode = kind, size, 1000, kw.pop("mode", 0o644)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts are device nodes: needs root")
def test_apply_layer_writes_an_overlay_upper_dir(tmp_path: Path) -> None:
    blob = _layer(tmp_path, [
        _ti("app", tarfile.DIRTYPE, mode=0o750),
        (_ti("app/a.txt", size=5, uid=7, gid=8, pax_headers={"SCHILY.xattr.user.k": "v"}),
         b"hello"),
        _ti("app/sym", tarfile.SYMTYPE, linkname="a.txt"),
        _ti("app/hard", tarfile.LNKTYPE, linkname="app/a.txt"),
        _ti("app/.wh.gone"),
        _ti("opq", tarfile.DIRTYPE, mode=0o755),
        _ti("opq/.wh..wh..opq"),
    ])
    dest = tmp_path / "fs"
    dest.mkdir()
    assert ocifill.apply_layer(blob, str(dest)) == 7
    a = dest / "app" / "a.txt"
    assert a.read_bytes() == b"hello"
    st = a.stat()
    assert (st.st_uid, st.st_gid, st.st_nlink, int(st.st_mtime)) == (7, 8, 2, 1000)
    assert os.getxattr(a, "user.k") == b"v"
    assert os.readlink(dest / "app" / "sym") == "a.txt"
    gone = os.lstat(dest / "app" / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(dest / "opq", "trusted.overlay.opaque") == b"y"
    assert stat.S_IMODE((dest / "app").stat().st_mode) == 0o750


def test_apply_layer_refuses_paths_that_leave_the_layer(tmp_path: Path) -> None:
    dest = tmp_path / "fs"
    dest.mkdir()
    escape = _layer(tmp_path, [_ti("up", tarfile.SYMTYPE, linkname="/"),
                               (_ti("up/etc-owned", size=1), b"x")], "escape.tar.gz")
    with pytest.raises(FormatError, match="leaves the layer"):
        ocifill.apply_layer(escape, str(dest))
    assert not (tmp_path / "etc-owned").exists()


def test_oci_layer_digest_of_skipped_layers() -> None:
    assert ocifill.oci_layer_digest({L.NYDUS_BLOB: "true", L.NYDUS_REF: OCI}) == OCI
    assert ocifill.oci_layer_digest({L.NYDUS_DETECTED: f"referrer {NYDUS}",
                                     L.CRI_LAYER_DIGEST: OCI}) == OCI
    assert ocifill.oci_layer_digest({L.NYDUS_BLOB: "true"}) is None


def _gnu_sparse_layer(tmp_path: Path, real: int, extents: list[tuple[int, bytes]],
                      files: int = 1) -> str:
    """A gzip layer GNU tar wrote (``--sparse``, its PAX 1.0 format) of sparse files."""
    src = tmp_path / "src"
    src.mkdir()
    names = ["sparse.bin"] + [f"sparse{i}.bin" for i in range(1, files)]
    for name in names:
        with open(src / name, "wb") as f:
            for off, data in extents:
                f.seek(off)
                f.write(data)
            f.truncate(real)
    out = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "--sparse", "--format=pax", "-czf", str(out), "-C", str(src),
                    *names], check=True)
    return str(out)


def test_a_sparse_member_is_unpacked_with_its_holes_as_holes(tmp_path: Path) -> None:
    real = 1 << 30
    blob = _gnu_sparse_layer(tmp_path, real, [(4096, b"a" * 4096), (real - 4096, b"z" * 100)])
    dest = tmp_path / "fs"
    dest.mkdir()
    assert ocifill.apply_layer(blob, str(dest)) == 1
    f = dest / "sparse.bin"
    assert f.stat().st_size == real
    assert f.stat().st_blocks * 512 < 1 << 20  # 1 GiB of holes, a few KB on disk
    with open(f, "rb") as r:
        assert r.read(4096) == bytes(4096) and r.read(4096) == b"a" * 4096
        r.seek(real - 4096)
        assert r.read() == b"z" * 100 + bytes(4096 - 100)


def test_a_layer_claiming_huge_holes_is_refused_before_writing_them(tmp_path: Path) -> None:
    """88 bytes of gzip claiming a 2^50-byte file: tarfile wrote zeros until the disk was
    full; the layer's holes together are bounded as ``image build`` bounds them."""
    from tests.unit.rafs.builder.test_tarsparse import END, HOSTILE

    blob = tmp_path / "huge.tar.gz"
    blob.write_bytes(gzip.compress(HOSTILE["gnu-base256"] + END))
    dest = tmp_path / "fs"
    dest.mkdir()
    t0 = time.monotonic()
    with pytest.raises(FormatError, match="real size 1125899906842624 exceeds the limit"):
        ocifill.apply_layer(str(blob), str(dest))
    assert time.monotonic() - t0 < 10  # a loaded machine; the old unpack never ended
    used = sum(p.stat().st_blocks for p in dest.rglob("*") if p.is_file())
    assert used * 512 < 1 << 20
    # the same bound over several members, each under it, as for the builder
    three = _gnu_sparse_layer(tmp_path, 1 << 30, [(0, b"a")], files=3)
    with pytest.raises(FormatError, match="holes of the archive's sparse members"):
        ocifill.apply_layer(three, str(dest), max_sparse_size=2 << 30)
