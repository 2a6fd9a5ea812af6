"""Seed corpora, made from small images our builder writes, the fixtures' tars and
hand-spelled documents (``python -m fuzz seeds``). Kept small (the repo holds them);
the big fixture bootstraps join a campaign at run time (:data:`FIXTURE_SEEDS`)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fuzz import tarblocks as T

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PYNYDUS_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"

#: Seeds too big for the repo, read from the fixtures when a campaign starts.
FIXTURE_SEEDS = {
    "rafs_v5": [FIXTURES / "snapshotter-testdata/v5-bootstrap-file-size-736032/image/image.boot"],
    "rafs_v6": [FIXTURES / "snapshotter-testdata/v6-bootstrap-chunk-pos-438272/image/image.boot"],
}


def _tree(root: str) -> None:
    """A small tree with every kind of entry the builder writes."""
    j = os.path.join
    os.makedirs(j(root, "d/sub"))
    with open(j(root, "d/a.txt"), "wb") as f:
        f.write(b"hello\n" * 50)
    with open(j(root, "big"), "wb") as f:
        f.write(bytes(range(256)) * 400)  # two chunks at 64 KiB
    with open(j(root, "sparse"), "wb") as f:
        f.truncate(200_000)
    os.symlink("d/a.txt", j(root, "link"))
    os.link(j(root, "d/a.txt"), j(root, "d/sub/hard"))
    os.mkfifo(j(root, "fifo"))
    os.setxattr(j(root, "d/a.txt"), "user.k", b"v")


def _layer_tar(root: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(root, arcname=".")
    return buf.getvalue()


def _builds(tmp: str) -> dict[str, bytes]:
    """Bootstraps and blob tails our builder writes for the small tree."""
    from pynydus.rafs.builder import build

    src = os.path.join(tmp, "src")
    _tree(src)
    out: dict[str, bytes] = {}
    tar = os.path.join(tmp, "layer.tar")
    with open(tar, "wb") as f:
        f.write(_layer_tar(src))
    for name, source, kw in [
        ("dir-lz4", src, {"compressor": "lz4_block"}),
        ("dir-zstd-compact", src, {"compressor": "zstd", "compact_inodes": True}),
        ("tar-none-sha256", tar, {"type": "tar-rafs", "digester": "sha256"}),
        ("tarfs", tar, {"type": "tar-tarfs"}),
    ]:
        blobs = os.path.join(tmp, name)
        os.makedirs(blobs)
        boot = os.path.join(tmp, name + ".boot")
        build(source, boot, blobs, chunk_size=0x10000, **kw)  # type: ignore[arg-type]
        out["boot-" + name] = Path(boot).read_bytes()
        for blob in Path(blobs).iterdir():
            data = blob.read_bytes()
            out["toc-" + name] = data[-min(4096, len(data)):]
    return out


def _synthetic(module: str, fn: str, **kw: object) -> bytes:
    sys.path.insert(0, str(ROOT / "tests/unit/rafs"))
    try:
        mod = __import__(module)
        return getattr(mod, fn)(**kw)  # type: ignore[no-any-return]
    finally:
        sys.path.pop(0)


def _blob_meta() -> dict[str, bytes]:
    sys.path.insert(0, str(ROOT / "tests/unit/rafs"))
    try:
        import test_rafs_fuzz as F
    finally:
        sys.path.pop(0)
    from fuzz.targets import _META_PREFIX

    out = {}
    for label, data, blob, cached in F._blob_meta_inputs():
        prefix = _META_PREFIX.pack(cached, {0: 0, 1: 1, 3: 2}[int(blob.ci_compressor)],
                                   blob.features, blob.chunk_count,
                                   blob.ci_uncompressed_size, 0)
        out[label] = prefix + data
    return out


def _tars() -> dict[str, bytes]:
    out = {p.stem: p.read_bytes() for p in (FIXTURES / "tar").glob("*.tar") if p.stat().st_size}
    end = bytes(1024)
    recs = T.pax_data((b"path", b"p/" + b"n" * 120), (b"mtime", b"1.25"),
                      (b"SCHILY.xattr.user.a", b"x"), (b"LIBARCHIVE.xattr.user.b", b"eQ"))
    out["pax"] = T.header(b"pax", b"x", len(recs)) + T.pad(recs) + T.header(
        b"f", b"0", 3) + T.pad(b"abc") + end
    glob = T.pax_data((b"mtime", b"7"), (b"SCHILY.xattr.user.g", b"G"))
    out["pax-global"] = T.header(b"g", b"g", len(glob)) + T.pad(glob) + T.header(
        b"d/", b"5", 0) + end
    out["gnu-long"] = (T.header(b"././@LongLink", b"L", 200) + T.pad(b"l" * 199 + b"\0")
                       + T.header(b"././@LongLink", b"K", 150) + T.pad(b"k" * 150)
                       + T.header(b"x", b"1", 0) + end)
    h = bytearray(T.header(b"sparse", b"S", 1024))
    h[257:265] = b"ustar  \0"
    h[386:410] = b"%011o\0%011o\0" % (0, 512)
    h[410:434] = b"%011o\0%011o\0" % (2048, 512)
    h[483:495] = b"%011o\0" % 3000
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    out["gnu-sparse"] = bytes(h) + b"A" * 512 + b"B" * 512 + end
    out["sparse-01"] = _sparse_pax() + end
    out["sparse-10"] = _sparse_10(b"2\n0\n512\n2048\n512\n", b"A" * 512 + b"B" * 512) + end
    charset = T.pax_data((b"hdrcharset", b"BINARY"), (b"path", b"\xff\xfe"))
    out["hdrcharset"] = T.header(b"pax", b"x", len(charset)) + T.pad(charset) + T.header(
        b"f", b"0", 0) + end
    out["devices"] = T.header(b"c", b"3", 0) + T.header(b"b", b"4", 0) + T.header(
        b"p", b"6", 0) + end
    return out


def _sparse_pax() -> bytes:
    recs = T.pax_data((b"GNU.sparse.map", b"0,512,2048,512"), (b"GNU.sparse.size", b"3000"),
                      (b"GNU.sparse.numblocks", b"2"), (b"GNU.sparse.name", b"s01"))
    return T.header(b"pax", b"x", len(recs)) + T.pad(recs) + T.header(
        b"GNUSparseFile/x", b"0", 1024) + b"A" * 512 + b"B" * 512


def _sparse_10(map_text: bytes, data: bytes) -> bytes:
    recs = T.pax_data((b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                      (b"GNU.sparse.name", b"s"), (b"GNU.sparse.realsize", b"3000"))
    body = T.pad(map_text) + data
    return T.header(b"pax", b"x", len(recs)) + T.pad(recs) + T.header(
        b"GNUSparseFile.0/s", b"0", len(body)) + T.pad(body)


def _layers(tars: dict[str, bytes]) -> dict[str, bytes]:
    import zstandard

    base = tars["all-entry-type"]
    small = tars["pax"]
    z = zstandard.ZstdCompressor(level=3)
    return {
        "gzip": gzip.compress(base, mtime=0),
        "gzip-members": gzip.compress(small[:1024], mtime=0) + gzip.compress(small[1024:], mtime=0),
        "zstd": z.compress(base),
        "zstd-frames": z.compress(small[:1024]) + z.compress(small[1024:]),
        "zstd-stream": zstandard.ZstdCompressor(write_content_size=False).compress(small),
        "plain": small,
    }


def _h2() -> dict[str, bytes]:
    from hpack import Encoder

    from pynydus.grpcwire.connection import (
        CONTINUATION,
        DATA,
        END_HEADERS,
        END_STREAM,
        GOAWAY,
        HEADERS,
        PING,
        PRIORITY,
        RST_STREAM,
        SETTINGS,
        WINDOW_UPDATE,
        frame,
    )

    enc = Encoder()
    headers = [(":method", "POST"), (":scheme", "http"), (":path",
               "/containerd.services.snapshots.v1.Snapshots/Stat"), (":authority", "x"),
               ("content-type", "application/grpc"), ("te", "trailers"),
               ("grpc-timeout", "5S")]
    block = enc.encode(headers)
    msg = b"\0" + struct.pack(">I", 6) + b"\x0a\x04name"
    settings = frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 20) + struct.pack(">HI", 3, 100))
    call = frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, END_STREAM, 1, msg)
    second = frame(HEADERS, 0, 3, enc.encode(headers)[:5]) + frame(
        CONTINUATION, END_HEADERS, 3, enc.encode(headers)[5:]) + frame(DATA, END_STREAM, 3, msg)
    return {
        "unary": settings + call,
        "two-calls": settings + call + second + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1000)),
        "control": settings + frame(SETTINGS, 1, 0) + frame(PING, 0, 0, bytes(8)) + frame(
            PRIORITY, 0, 5, struct.pack(">IB", 1, 16)) + frame(RST_STREAM, 0, 1, bytes(4))
        + frame(GOAWAY, 0, 0, bytes(8)),
        "padded": settings + frame(HEADERS, END_HEADERS | 0x8 | 0x20, 1,
                                   b"\x02" + struct.pack(">IB", 0, 1) + block + b"\0\0")
        + frame(DATA, END_STREAM | 0x8, 1, b"\x01" + msg + b"\0"),
    }


def _hpack() -> dict[str, bytes]:
    from hpack import Encoder

    enc = Encoder()
    a = enc.encode([(":path", "/a/b"), ("x-custom", "value" * 10), ("grpc-timeout", "1m")])
    b = enc.encode([(":path", "/a/b"), ("x-custom", "value" * 10)])  # dynamic table hits
    plain = Encoder()
    plain.huffman = False  # literal strings
    c = plain.encode([("user-agent", "grpc-go/1.60"), ("te", "trailers")])
    return {"huffman-indexed": a + b"\xff\xff\xff" + b, "literal": c,
            "table-size": b"\x3f\xe1\x1f" + a}


def _configs() -> dict[str, bytes]:
    v1 = {"device": {"backend": {"type": "registry", "config": {
        "scheme": "https", "host": "r.example", "repo": "lib/x", "auth": "dTpw",
        "timeout": 5, "connect_timeout": 5, "retry_limit": 2, "mirrors": [
            {"host": "http://m.example", "headers": {"X-A": "b"}, "health_check_interval": 5}],
        "proxy": {"url": "http://p", "fallback": True, "ping_url": "http://p/ping"}}},
        "cache": {"type": "blobcache", "config": {"work_dir": "/var/cache/x"}}},
        "mode": "direct", "digest_validate": False, "iostats_files": False,
        "enable_xattr": True, "fs_prefetch": {"enable": True, "threads_count": 4,
                                              "merging_size": 131072, "bandwidth_rate": 0}}
    v2 = {"version": 2, "id": "d1", "backend": {"type": "localfs", "localfs": {
        "dir": "/var/lib/blobs"}}, "cache": {"type": "filecache", "filecache": {
            "work_dir": "/c"}}, "rafs": {"mode": "direct", "validate": True,
                                          "prefetch": {"enable": True, "threads": 2}}}
    toml_v2 = (b'version = 2\nid = "x"\n[backend]\ntype = "registry"\n[backend.registry]\n'
               b'scheme = "http"\nhost = "h:5000"\nrepo = "r"\n[cache]\ntype = "blobcache"\n'
               b'[cache.blobcache]\nwork_dir = "/w"\n[rafs]\nmode = "cached"\n')
    snap = (b'version = 1\nroot = "/var/lib/containerd-nydus"\naddress = '
            b'"/run/containerd-nydus/containerd-nydus-grpc.sock"\ndaemon_mode = "dedicated"\n'
            b'cleanup_on_close = false\n[system]\nenable = false\n[daemon]\nnydusd_config = '
            b'"/etc/nydus/nydusd-config.fusedev.json"\nfs_driver = "fusedev"\nrecover_policy = '
            b'"restart"\nthreads_number = 4\n[log]\nlevel = "info"\nlog_to_stdout = false\n'
            b'log_rotation_max_size = 100\n[cgroup]\nenable = true\nmemory_limit = "10%"\n'
            b'[metrics]\naddress = ":9110"\n[remote]\nconvert_vpc_registry = false\n'
            b'[remote.auth]\ncredential_renewal_interval = "10m"\n[snapshot]\n'
            b'enable_nydus_overlayfs = false\nsync_remove = false\n[cache_manager]\n'
            b'gc_period = "24h"\ncache_dir = ""\n[image]\npublic_key_file = ""\n'
            b'[experimental]\nenable_stargz = false\n[experimental.tarfs]\nenable_tarfs = false\n')
    return {"nydusd-v1": json.dumps(v1).encode(), "nydusd-v2": json.dumps(v2).encode(),
            "nydusd-v2-toml": toml_v2, "snapshotter": snap,
            "snapshotter-minimal": b"version = 1\n"}


def _documents() -> tuple[dict[str, bytes], dict[str, bytes]]:
    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [digest(b"a"), digest(b"b")]},
        "config": {"Env": ["PATH=/bin"]}, "history": [{"created_by": "x"}]}).encode()
    oci = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": digest(config), "size": len(config)},
                      "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                  "digest": digest(b"A"), "size": 10},
                                 {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                                  "digest": digest(b"B"), "size": 20,
                                  "annotations": {"containerd.io/uncompressed": digest(b"b")}}],
                      "annotations": {"k": "v"}}).encode()
    docker = json.dumps({"schemaVersion": 2, "mediaType":
                         "application/vnd.docker.distribution.manifest.v2+json",
                         "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                    "digest": digest(config), "size": len(config)},
                         "layers": [{"mediaType":
                                     "application/vnd.docker.image.rootfs.diff.tar.gzip",
                                     "digest": digest(b"A"), "size": 10}]}).encode()
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [
                            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                             "digest": digest(oci), "size": len(oci),
                             "platform": {"architecture": "amd64", "os": "linux"}},
                            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                             "digest": digest(docker), "size": len(docker),
                             "platform": {"architecture": "arm64", "os": "linux",
                                          "variant": "v8"}},
                            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                             "digest": digest(b"n"), "size": 1, "artifactType":
                             "application/vnd.nydus.image.manifest.v1+json", "platform": {
                                 "architecture": "amd64", "os": "linux",
                                 "os.features": ["nydus.remoteimage.v1"]}}]}).encode()
    return ({"oci": oci + b"\0" + config, "docker": docker + b"\0" + config},
            {"index": index, "empty": b'{"schemaVersion":2,"manifests":[]}'})


def _write(root: Path, target: str, seeds: dict[str, bytes]) -> None:
    d = root / target
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for name, data in seeds.items():
        (d / name).write_bytes(data)


def write_seeds(root: Path, only: Iterable[str] | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="pyn-fuzz-seeds-", dir="/var/tmp") as tmp:
        built = _builds(tmp)
    tars = _tars()
    manifests, indexes = _documents()
    configs = _configs()
    corpora = {
        "rafs_v5": {"synthetic-v5": _synthetic("test_rafs_fuzz", "synthetic_v5", files=4)},
        "rafs_v6": {"synthetic-v6": _synthetic("test_rafs_fuzz", "synthetic"),
                    **{k: v for k, v in built.items() if k.startswith("boot-")}},
        "blob_meta": _blob_meta(),
        "blob_toc": {k: v for k, v in built.items() if k.startswith("toc-")},
        "tar": tars,
        "tar_pax": {"records": T.pax_data((b"path", b"a/b"), (b"mtime", b"-1.5"),
                                          (b"SCHILY.xattr.user.x", b"\0\1")),
                    "sparse-00": T.pax_data((b"GNU.sparse.size", b"10"), (b"GNU.sparse.offset",
                                            b"0"), (b"GNU.sparse.numbytes", b"5")),
                    "sparse-01": T.pax_data((b"GNU.sparse.map", b"0,5"),
                                            (b"GNU.sparse.size", b"9")),
                    "sizes": T.pax_data((b"size", b"3"), (b"uid", b"7"), (b"gid", b"x"),
                                        (b"linkpath", b"t"))},
        "tar_sparse": {"two": T.pad(b"2\n0\n512\n2048\n512\n") + b"A" * 512 + b"B" * 512,
                       "none": T.pad(b"0\n")},
        "layer": _layers(tars),
        "h2": _h2(),
        "hpack": _hpack(),
        "nydusd_config": {k: v for k, v in configs.items() if k.startswith("nydusd")},
        "snapshotter_toml": {k: v for k, v in configs.items() if k.startswith("snapshotter")},
        "manifest": manifests,
        "index": indexes,
    }
    for target, seeds in corpora.items():
        if only is None or target in only:
            _write(root, target, seeds)
