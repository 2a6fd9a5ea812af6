"""``pynydus convert`` against a real docker-registry: the converted image holds what
the source holds (``check-image``), looks the way upstream's snapshotter expects, and
a second convert does no work."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

from pynydus.convert.pack import bootstrap_from_layer, read_toc
from pynydus.rafs.read import bootstrap_from_bytes
from tests.harness.registry import Registry

from .conftest import client_for, convert_args, pynydus, sha

NYDUS_BLOB_MT = "application/vnd.oci.image.layer.nydus.blob.v1"


def _manifest(reg: Registry, repo: str, ref: str) -> tuple[str, bytes, dict]:
    with client_for(reg) as c:
        m = c.get_manifest(repo, ref)
    return m.digest, m.data, json.loads(m.data)


def _blob(reg: Registry, repo: str, digest: str) -> bytes:
    with client_for(reg) as c:
        return b"".join(c.get_blob(repo, digest))


def test_convert_then_check_image_passes(registry: Registry, layered: str, cache_dir: str,
                                         tmp_path: Path) -> None:
    dst = registry.ref("nydus/layered", "v1")
    summary = tmp_path / "summary.json"
    r = pynydus(*convert_args(layered, dst, cache_dir, "--output-json", str(summary)))
    assert r.rc == 0, r.err
    assert r.out.strip().startswith(dst + "@sha256:")
    doc = json.loads(summary.read_text())
    layers = doc["images"][0]["layers"]
    assert len(layers) == 5
    for lyr in layers:
        assert {"source_size", "blob_size", "chunks", "deduplicated_bytes", "seconds"} <= set(lyr)
        assert not lyr["cached"]
    # the top layer duplicates a 1 MiB file of a lower layer: converted again against
    # the lower layers, its blob does not store that file's chunk a second time
    top = layers[-1]
    assert top["rebuilt_against_lower_layers"]
    assert top["deduplicated_bytes"] >= 1 << 20
    assert top["blob_size"] < 1 << 20
    assert not any(lyr["rebuilt_against_lower_layers"] for lyr in layers[:-1])
    _, _, m = _manifest(registry, "nydus/layered", "v1")
    data_blobs = [lyr["digest"] for lyr in m["layers"][:-1]]
    before = {d: registry.blob_gets(d) for d in data_blobs}
    c = pynydus("check-image", "--source", layered, "--target", dst)
    assert c.rc == 0, c.err + c.out
    assert "OK" in c.out
    # every data blob is read in one ranged GET, not one per file (these are small)
    assert {d: registry.blob_gets(d) - before[d] for d in data_blobs} == \
        {d: 1 for d in data_blobs}


def test_manifest_layout_is_upstreams(registry: Registry, layered: str, cache_dir: str) -> None:
    dst = registry.ref("nydus/layout", "v1")
    assert pynydus(*convert_args(layered, dst, cache_dir)).rc == 0
    _, _, src = _manifest(registry, "src/layered", "latest")
    _, _, m = _manifest(registry, "nydus/layout", "v1")
    assert m["schemaVersion"] == 2
    assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert "subject" not in m
    blobs, boot = m["layers"][:-1], m["layers"][-1]
    assert len(blobs) == len(src["layers"])
    for b in blobs:
        assert b["mediaType"] == NYDUS_BLOB_MT
        assert b["annotations"] == {"containerd.io/snapshot/nydus-blob": "true"}
    assert boot["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert boot["annotations"] == {"containerd.io/snapshot/nydus-bootstrap": "true",
                                   "containerd.io/snapshot/nydus-fs-version": "6"}
    # bootstrap layer: gzip tar with image/image.boot (0444)
    boot_gz = _blob(registry, "nydus/layout", boot["digest"])
    tar = gzip.decompress(boot_gz)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        member = tf.getmember("image/image.boot")
        assert member.mode == 0o444
        metas = {m.name: tf.extractfile(m).read() for m in tf.getmembers()  # type: ignore[union-attr]
                 if m.name.endswith(".blob.meta")}
    # one cache-form blob meta per data blob: ci padded to 4 KiB + the 4096-byte header
    with bootstrap_from_bytes(bootstrap_from_layer(boot_gz)) as bs:
        assert set(metas) == {f"image/{b.blob_id}.blob.meta" for b in bs.blobs}
        for b in bs.blobs:
            meta = metas[f"image/{b.blob_id}.blob.meta"]
            assert len(meta) == -(-b.ci_uncompressed_size // 4096) * 4096 + 4096
            assert meta[-4096:-4092] == meta[-4:] == (0xB10BB10B).to_bytes(4, "little")
    # config: diff ids = blob digests + uncompressed bootstrap tar digest; history appended
    cfg = json.loads(_blob(registry, "nydus/layout", m["config"]["digest"]))
    assert cfg["rootfs"]["diff_ids"] == [b["digest"] for b in blobs] + [sha(tar)]
    assert cfg["history"][-1] == {"created_by": "Nydus Converter",
                                  "comment": "Nydus Bootstrap Layer"}
    assert m["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    # merged bootstrap: blob ids are the pushed layer digests (what nydusd fetches)
    with bootstrap_from_bytes(bootstrap_from_layer(boot_gz)) as bs:
        ids = ["sha256:" + b.blob_id for b in bs.blobs]
        assert bs.prefetch_all or bs.prefetch_list
    assert set(ids) <= {b["digest"] for b in blobs}
    # every layer blob is an inline blob: its TOC lists image.boot
    for b in blobs:
        data = _blob(registry, "nydus/layout", b["digest"])
        _, entries = read_toc(io.BytesIO(data), len(data))
        assert "image.boot" in [e.entry_name for e in entries]


def test_second_convert_converts_and_uploads_nothing(registry: Registry, layered: str,
                                                    cache_dir: str, tmp_path: Path) -> None:
    dst = registry.ref("nydus/again", "v1")
    first = pynydus(*convert_args(layered, dst, cache_dir))
    assert first.rc == 0, first.err
    before = len(registry.requests())
    summary = tmp_path / "again.json"
    second = pynydus(*convert_args(layered, dst, cache_dir, "--output-json", str(summary)))
    assert second.rc == 0, second.err
    assert first.out == second.out  # same manifest digest
    new = registry.requests()[before:]
    layer_gets = [p for m, p, _ in new if m == "GET" and "/src/layered/blobs/" in p]
    assert len(layer_gets) == 1  # the config only: no layer is downloaded again
    assert not [p for m, p, _ in new if m in ("POST", "PATCH") and "/uploads/" in p]
    assert all(lyr["cached"] for lyr in json.loads(summary.read_text())["images"][0]["layers"])


def test_check_image_names_the_first_difference(registry: Registry, layered: str,
                                                cache_dir: str, workdir: Path) -> None:
    from tests.harness import oci

    other = oci.Image([oci.Layer("x").file("app/hello.txt", "hello v1\n")])
    ref = registry.ref("src/other")
    oci.push(other.write_layout(workdir / "other"), ref)
    dst = registry.ref("nydus/other", "v1")
    assert pynydus(*convert_args(ref, dst, cache_dir)).rc == 0
    r = pynydus("check-image", "--source", layered, "--target", dst)
    assert r.rc == 1
    assert "FAILED: /app/" in r.err
