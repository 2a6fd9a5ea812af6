"""Source layouts and output modes: zstd/uncompressed layers, Docker manifests,
multi-platform indexes (--platform, --all-platforms, --merge-platform), referrers,
chunk dicts."""

from __future__ import annotations

import json
from pathlib import Path

from pynydus.convert.pack import bootstrap_from_layer
from tests.harness import oci
from tests.harness.registry import Registry

from .conftest import (
    client_for,
    convert_and_check,
    convert_args,
    layer_blob,
    push_layers,
    pynydus,
)


def _layers(tag: str) -> list[oci.Layer]:
    return [
        oci.Layer("base").file("etc/os", f"{tag}\n").file("data/a.txt", "a" * 5000)
        .file("data/gone.txt", "bye\n").dir("data/opq").file("data/opq/old", "old\n"),
        oci.Layer("mid").whiteout("data/gone.txt").opaque("data/opq")
        .file("data/opq/new", "new\n").file("data/h1", "linked\n").hardlink("data/h2", "data/h1"),
        oci.Layer("top").file("data/arch", f"{tag}\n", 0o600, uid=7, gid=8),
    ]


def test_zstd_plain_and_docker_layers(registry: Registry, cache_dir: str) -> None:
    base, mid, top = _layers("mixed")
    with client_for(registry) as c:
        push_layers(c, "src/mixed", "v1", [layer_blob(base, "zstd"), layer_blob(mid, "plain"),
                                           layer_blob(top, "gzip")])
        push_layers(c, "src/docker", "v1", [layer_blob(base, "docker"),
                                            layer_blob(top, "docker")], docker=True)
    for repo in ("mixed", "docker"):
        src, dst = registry.ref(f"src/{repo}", "v1"), registry.ref(f"nydus/{repo}", "v1")
        convert_and_check(src, dst, cache_dir)
    with client_for(registry) as c:
        m = json.loads(c.get_manifest("nydus/docker", "v1").data)
    # a Docker source keeps Docker media types (upstream without --oci)
    assert m["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert m["layers"][-1]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert m["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert m["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.nydus.blob.v1"


def _push_index(registry: Registry, repo: str) -> None:
    entries = []
    with client_for(registry) as c:
        for arch in ("amd64", "arm64"):
            layers = [layer_blob(lyr, "gzip") for lyr in _layers(arch)]
            digest, raw, doc = push_layers(c, repo, None, layers, arch=arch)
            entries.append({"mediaType": doc["mediaType"], "digest": digest, "size": len(raw),
                            "platform": {"architecture": arch, "os": "linux"}})
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": entries}
        c.put_manifest(repo, "v1", index["mediaType"], json.dumps(index).encode())


def test_platform_selection_and_all_platforms(registry: Registry, cache_dir: str) -> None:
    _push_index(registry, "src/multi")
    src = registry.ref("src/multi", "v1")
    one = registry.ref("nydus/multi", "arm64")
    r = pynydus(*convert_args(src, one, cache_dir, "--platform", "linux/arm64"))
    assert r.rc == 0, r.err
    with client_for(registry) as c:
        m = c.get_manifest("nydus/multi", "arm64")
        assert m.media_type == "application/vnd.oci.image.manifest.v1+json"
        boot = bootstrap_from_layer(b"".join(c.get_blob(
            "nydus/multi", json.loads(m.data)["layers"][-1]["digest"])))
    assert boot
    c1 = pynydus("check-image", "--source", src, "--target", one, "--platform", "linux/arm64")
    assert c1.rc == 0, c1.err + c1.out
    every = registry.ref("nydus/multi", "all")
    r = pynydus(*convert_args(src, every, cache_dir, "--all-platforms"))
    assert r.rc == 0, r.err
    with client_for(registry) as c:
        idx = c.get_manifest("nydus/multi", "all")
    assert idx.media_type == "application/vnd.oci.image.index.v1+json"
    plats = sorted(d["platform"]["architecture"] for d in json.loads(idx.data)["manifests"])
    assert plats == ["amd64", "arm64"]
    for arch in ("amd64", "arm64"):
        c3 = pynydus("check-image", "--source", src, "--target", every,
                     "--platform", f"linux/{arch}")
        assert c3.rc == 0, c3.err + c3.out
    bad = pynydus(*convert_args(src, every, cache_dir, "--platform", "linux/s390x"))
    assert bad.rc != 0 and "no manifest for platform linux/s390x" in bad.err


def test_merge_platform_adds_marked_nydus_manifests(registry: Registry, cache_dir: str) -> None:
    _push_index(registry, "src/merge")
    src = registry.ref("src/merge", "v1")
    dst = registry.ref("nydus/merge", "v1")
    r = pynydus(*convert_args(src, dst, cache_dir, "--all-platforms", "--merge-platform"))
    assert r.rc == 0, r.err
    with client_for(registry) as c:
        src_idx = json.loads(c.get_manifest("src/merge", "v1").data)
        idx = json.loads(c.get_manifest("nydus/merge", "v1").data)
        originals = [d for d in idx["manifests"] if "artifactType" not in d]
        nydus = [d for d in idx["manifests"] if "artifactType" in d]
        assert [d["digest"] for d in originals] == [d["digest"] for d in src_idx["manifests"]]
        assert len(nydus) == 2
        for d in nydus:
            assert d["platform"]["os.features"] == ["nydus.remoteimage.v1"]
            assert d["artifactType"] == "application/vnd.nydus.image.manifest.v1+json"
            m = json.loads(c.get_manifest("nydus/merge", d["digest"]).data)
            assert m["config"]["mediaType"] == "application/vnd.nydus.image.config.v1+json"
        for d in originals:  # copied into the target repository, so the index is complete
            c.get_manifest("nydus/merge", d["digest"])
    ok = pynydus("check-image", "--source", src, "--target", dst, "--platform", "linux/arm64")
    assert ok.rc == 0, ok.err + ok.out


def test_with_referrer_sets_subject_and_fallback_tag(registry: Registry, layered: str,
                                                     cache_dir: str) -> None:
    dst = registry.ref("src/layered", "nydus-ref")  # same repository: referrers live there
    r = pynydus(*convert_args(layered, dst, cache_dir, "--with-referrer"))
    assert r.rc == 0, r.err
    with client_for(registry) as c:
        src = c.get_manifest("src/layered", "latest")
        m = c.get_manifest("src/layered", "nydus-ref")
        doc = json.loads(m.data)
        assert doc["subject"] == {"mediaType": src.media_type, "digest": src.digest,
                                  "size": len(src.data)}
        # docker-registry 2.8 has no referrers API: the tag-schema fallback index
        refs = c.get_referrers("src/layered", src.digest)
    assert [d["digest"] for d in refs["manifests"]] == [m.digest]


def test_chunk_dict_bootstrap_dedups_against_another_image(registry: Registry, cache_dir: str,
                                                            workdir: Path, tmp_path: Path) -> None:
    shared = bytes(range(256)) * 8192  # 2 MiB, two chunks
    a = oci.Image([oci.Layer("a").file("lib/shared.so", shared).file("a.txt", "a\n")])
    b = oci.Image([oci.Layer("b").file("usr/lib/shared.so", shared).file("b.txt", "b\n")])
    oci.push(a.write_layout(workdir / "dict-a"), registry.ref("src/dict-a"))
    oci.push(b.write_layout(workdir / "dict-b"), registry.ref("src/dict-b"))
    dst_a, dst_b = registry.ref("nydus/dict", "a"), registry.ref("nydus/dict", "b")
    assert pynydus(*convert_args(registry.ref("src/dict-a"), dst_a, cache_dir)).rc == 0
    with client_for(registry) as c:
        ma = json.loads(c.get_manifest("nydus/dict", "a").data)
        boot = bootstrap_from_layer(b"".join(c.get_blob("nydus/dict", ma["layers"][-1]["digest"])))
    dict_path = tmp_path / "dict.boot"
    dict_path.write_bytes(boot)
    summary = tmp_path / "b.json"
    r = pynydus(*convert_args(registry.ref("src/dict-b"), dst_b, cache_dir,
                              "--chunk-dict-bootstrap", str(dict_path),
                              "--output-json", str(summary)))
    assert r.rc == 0, r.err
    with client_for(registry) as c:
        mb = json.loads(c.get_manifest("nydus/dict", "b").data)
    # the dict's blob is appended after the image's own blob (upstream's manifest rewrite)
    assert [lyr["digest"] for lyr in mb["layers"][:-1]] == \
        [mb["layers"][0]["digest"], ma["layers"][0]["digest"]]
    lyr = json.loads(summary.read_text())["images"][0]["layers"][0]
    assert lyr["deduplicated_bytes"] >= len(shared)
    ok = pynydus("check-image", "--source", registry.ref("src/dict-b"), "--target", dst_b)
    assert ok.rc == 0, ok.err + ok.out


def test_prefetch_files_end_up_in_the_prefetch_table(registry: Registry, cache_dir: str,
                                                      tmp_path: Path) -> None:
    from pynydus.rafs.read import bootstrap_from_bytes

    base, _, top = _layers("prefetch")
    with client_for(registry) as c:
        push_layers(c, "src/prefetch", "v1", [layer_blob(base, "gzip"), layer_blob(top, "gzip")])
    listing = tmp_path / "prefetch.txt"
    listing.write_text("/data/arch\n/etc/os\n")
    dst = registry.ref("nydus/prefetch", "v1")
    r = pynydus(*convert_args(registry.ref("src/prefetch", "v1"), dst, cache_dir,
                              "--prefetch-files", str(listing)))
    assert r.rc == 0, r.err
    with client_for(registry) as c:
        m = json.loads(c.get_manifest("nydus/prefetch", "v1").data)
        boot = bootstrap_from_layer(b"".join(c.get_blob("nydus/prefetch",
                                                        m["layers"][-1]["digest"])))
    with bootstrap_from_bytes(boot) as bs:
        want = {bs.lookup_path("/data/arch"), bs.lookup_path("/etc/os")}
        assert set(bs.prefetch_list) == want
