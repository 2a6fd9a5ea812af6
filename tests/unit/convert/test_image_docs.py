"""The sans-I/O image documents: platform selection, manifest parsing, the Nydus
manifest/config/index exactly as upstream lays them out."""

from __future__ import annotations

import json

import pytest

from pynydus.convert import image as img
from pynydus.errors import FormatError, InvalidArgument, NotFound

OCI_M = "application/vnd.oci.image.manifest.v1+json"
D = "sha256:" + "a" * 64


def _manifest(layers: list[tuple[str, str]], mt: str = OCI_M) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": mt,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D,
                   "size": 10},
        "layers": [{"mediaType": m, "digest": d, "size": 5} for m, d in layers]}).encode()


def _index(*plats: dict[str, object]) -> dict[str, object]:
    return {"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_M, "digest": f"sha256:{i:064x}", "size": 1, "platform": p}
        for i, p in enumerate(plats)]}


def test_parse_platform() -> None:
    assert img.parse_platform("linux/arm64/v8") == img.Platform("linux", "arm64", "v8")
    with pytest.raises(InvalidArgument):
        img.parse_platform("linux")


def test_select_manifests_by_platform_default_and_all() -> None:
    idx = _index({"os": "linux", "architecture": "arm64", "variant": "v8"},
                 {"os": "linux", "architecture": "amd64"},
                 {"os": "linux", "architecture": "amd64", "os.features": ["nydus.remoteimage.v1"]})
    assert img.select_manifests(idx, None, False)[0]["platform"]["architecture"] == "amd64"
    arm = img.select_manifests(idx, img.parse_platform("linux/arm64"), False)
    assert arm[0]["platform"]["variant"] == "v8"
    assert len(img.select_manifests(idx, None, True)) == 2  # the Nydus entry is skipped
    with pytest.raises(NotFound, match="linux/s390x.*has: linux/arm64/v8, linux/amd64"):
        img.select_manifests(idx, img.parse_platform("linux/s390x"), False)


def test_parse_manifest_accepts_layer_compressions() -> None:
    si = img.parse_manifest(OCI_M, D, _manifest([
        ("application/vnd.oci.image.layer.v1.tar+gzip", D),
        ("application/vnd.oci.image.layer.v1.tar+zstd", D),
        ("application/vnd.oci.image.layer.v1.tar", D),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", D)]))
    assert [lyr.compression for lyr in si.layers] == ["gzip", "zstd", "none", "gzip"]


def test_parse_manifest_rejects_what_it_cannot_convert() -> None:
    with pytest.raises(InvalidArgument, match=r"layer sha256:a+: unsupported media type "
                                              r"\"application/x-foo\""):
        img.parse_manifest(OCI_M, D, _manifest([("application/x-foo", D)]))
    with pytest.raises(InvalidArgument, match="already a Nydus image"):
        img.parse_manifest(OCI_M, D, _manifest([("application/vnd.oci.image.layer.nydus.blob.v1", D)]))
    with pytest.raises(InvalidArgument, match="has no layers"):
        img.parse_manifest(OCI_M, D, _manifest([]))
    with pytest.raises(FormatError, match="not JSON"):
        img.parse_manifest(OCI_M, D, b"{nope")


def _source() -> img.SourceImage:
    si = img.parse_manifest(OCI_M, D, _manifest([("application/vnd.oci.image.layer.v1.tar+gzip",
                                                   "sha256:" + "b" * 64)]))
    img.attach_config(si, json.dumps({"architecture": "arm64", "os": "linux",
                                      "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "c" * 64]},
                                      "history": [{"created_by": "x"}]}).encode())
    return si


def test_attach_config_checks_diff_ids_and_fills_platform() -> None:
    si = _source()
    assert si.platform == {"architecture": "arm64", "os": "linux"}
    with pytest.raises(FormatError, match="0 diff_ids for 1 layers"):
        img.attach_config(si, b'{"rootfs": {"diff_ids": []}}')


def test_nydus_manifest_layout_and_key_order() -> None:
    si = _source()
    blob = img.BlobLayer("sha256:" + "1" * 64, 100)
    boot = img.BlobLayer("sha256:" + "2" * 64, 50)
    cfg = img.BlobLayer("sha256:" + "3" * 64, 20)
    doc = img.nydus_manifest(si, [blob], boot, cfg, fs_version=6, subject=si.descriptor())
    assert list(doc) == ["schemaVersion", "mediaType", "config", "layers", "subject"]
    assert doc["layers"] == [
        {"mediaType": "application/vnd.oci.image.layer.nydus.blob.v1", "digest": blob.digest,
         "size": 100, "annotations": {"containerd.io/snapshot/nydus-blob": "true"}},
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": boot.digest,
         "size": 50, "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true",
                                     "containerd.io/snapshot/nydus-fs-version": "6"}}]
    assert doc["subject"] == {"mediaType": OCI_M, "digest": D, "size": si.size}
    merged = img.nydus_manifest(si, [blob], boot, cfg, fs_version=6, merge_platform=True)
    assert merged["config"]["mediaType"] == "application/vnd.nydus.image.config.v1+json"
    assert img.dumps(doc) == json.dumps(doc, separators=(",", ":")).encode()


def test_nydus_config_rewrites_diff_ids_and_appends_history() -> None:
    si = _source()
    cfg = img.nydus_config(si.config_doc, [img.BlobLayer("sha256:" + "1" * 64, 1)], "sha256:" + "9" * 64)
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "1" * 64, "sha256:" + "9" * 64]}
    assert cfg["history"] == [{"created_by": "x"}, {"created_by": "Nydus Converter",
                                                   "comment": "Nydus Bootstrap Layer"}]
    assert si.config_doc["rootfs"]["diff_ids"] == ["sha256:" + "c" * 64]  # source untouched


def test_merged_index_keeps_source_entries_and_replaces_stale_nydus_ones() -> None:
    src = _index({"os": "linux", "architecture": "amd64"},
                 {"os": "linux", "architecture": "amd64", "os.features": ["nydus.remoteimage.v1"]})
    entry = img.nydus_index_entry(b"{}", {"mediaType": OCI_M}, D, {"os": "linux",
                                                                   "architecture": "amd64"})
    assert entry["platform"]["os.features"] == ["nydus.remoteimage.v1"]
    assert entry["artifactType"] == "application/vnd.nydus.image.manifest.v1+json"
    out = img.merged_index(src, [], [entry])
    assert out["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [d["digest"] for d in out["manifests"]] == [src["manifests"][0]["digest"], D]
