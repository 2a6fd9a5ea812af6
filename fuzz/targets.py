"""The fuzz targets: one function per parser of untrusted bytes, ``bytes -> None``.

A target may raise only pynydus's own errors (:class:`pynydus.errors.NydusError`:
FormatError for malformed data, ConfigError for a bad config, NotFound...); anything
else is a finding. Each target also bounds its own work (a sparse limit of 1 MiB, a
walk of at most 400 inodes) so that one input stays well under the campaign's 1 s
timeout: what it checks is the parser, not how long a legitimately huge input takes.

The targets import pynydus lazily (:func:`load`), so that atheris can instrument the
modules as they are imported.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

Target = Callable[[bytes], None]

#: Entries of a bootstrap walked per input (every inode of the seeds; the mutations
#: that matter are in the superblock, the inodes and the tables they reach).
MAX_ENTRIES = 64
#: Names looked up per directory (each a binary search over the dirents).
MAX_LOOKUPS = 8
#: Bytes per map_read: FUSE's largest read (a 2 MiB range over 4 KiB chunks made 512
#: chunk records per file, a cost of the request, not of the image).
READ_SIZE = 128 << 10
#: Real size a sparse tar member may claim in the tar targets.
SPARSE_LIMIT = 1 << 20
#: Bytes of file data read per tar input (a gzip bomb is the decoder's concern, not ours).
TAR_READ_MAX = 4 << 20


@dataclass(frozen=True)
class Spec:
    name: str
    doc: str
    fn: Target
    max_len: int  # libFuzzer's -max_len for this target


def _bootstrap(data: bytes) -> None:
    from pynydus.errors import NotFound
    from pynydus.rafs.read import bootstrap_from_bytes

    bs = bootstrap_from_bytes(data)
    for ino in bs.prefetch_list[:MAX_ENTRIES]:
        bs.stat(ino)
    for n, (_path, ino) in enumerate(bs.walk(), start=1):
        st = bs.stat(ino)
        bs.xattrs(ino)
        if st.is_symlink:
            bs.readlink(ino)
        elif st.is_reg:
            bs.chunks(ino)
            bs.map_read(ino, max(0, st.size // 2 - 100), READ_SIZE)
        elif st.is_dir:
            for i, entry in enumerate(bs.readdir(ino)):
                if i >= MAX_LOOKUPS:  # the walk reads every entry; a few binary searches
                    break
                try:
                    bs.lookup(ino, entry.name)
                except NotFound:
                    pass  # an unsorted directory may hide names from the binary search
        if n >= MAX_ENTRIES:
            break


# Blob meta inputs: a 16-byte prefix says what the bootstrap's blob entry claims,
# the rest is what was read from the blob (or the cache file).
_META_PREFIX = struct.Struct("<BBIIIH")  # cached, ci compressor, features, chunks, ci size, pad


def _blob_meta(data: bytes) -> None:
    from pynydus.rafs.format import Compressor, Digester
    from pynydus.rafs.format import blobmeta as M
    from pynydus.rafs.read import BlobInfo

    if len(data) < _META_PREFIX.size:
        return
    cached, comp, features, chunks, ci_size, _ = _META_PREFIX.unpack_from(data)
    raw = data[_META_PREFIX.size :]
    ci_comp = (Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.ZSTD)[comp % 3]
    chunks &= 0xFFFF
    if cached & 1:
        ci_len = ci_size & 0xFFFFF
        blob = BlobInfo(0, "e" * 64, Compressor.ZSTD, Digester.SHA256, 1 << 20, chunks,
                        chunks * 100, chunks << 20, features=features, ci_compressor=ci_comp,
                        ci_offset=0, ci_compressed_size=ci_len, ci_uncompressed_size=ci_len)
        meta = M.parse_cached_blob_meta(raw, blob)
    else:
        packed = max(0, len(raw) - M.BLOB_CCT_HEADER_SIZE)
        blob = BlobInfo(0, "d" * 64, Compressor.ZSTD, Digester.BLAKE3, 1 << 20, chunks,
                        packed + chunks * 100, chunks << 20, features=features,
                        ci_compressor=ci_comp, ci_offset=chunks * 100,
                        ci_compressed_size=packed, ci_uncompressed_size=ci_size & 0xFFFFF)
        meta = M.parse_blob_meta(raw, blob)
    for i in range(min(meta.chunk_count, 4096)):
        meta.chunk(i)
    meta.contexts()


def _blob_toc(data: bytes) -> None:
    from pynydus.rafs.format import blobmeta as M

    for entry in M.unpack_toc(data):
        _ = entry.entry_name


def _read_tar(source: io.BytesIO) -> None:
    from pynydus.rafs.source import TarSource

    budget = TAR_READ_MAX
    for _entry, reader in TarSource(source, max_sparse_size=SPARSE_LIMIT):
        while reader is not None and budget > 0:
            piece = reader.read(min(budget, 1 << 16))
            if not piece:
                break
            budget -= len(piece)


def _tar(data: bytes) -> None:
    _read_tar(io.BytesIO(data))


def _tar_pax(data: bytes) -> None:
    """The input is one PAX header's data, before a small regular member."""
    from fuzz import tarblocks as T

    _read_tar(io.BytesIO(T.header(b"pax", b"x", len(data)) + T.pad(data)
                         + T.header(b"f", b"0", 5) + T.pad(b"hello") + bytes(1024)))


def _tar_sparse(data: bytes) -> None:
    """The input is a GNU sparse 1.0 member's data: its map, then the extents."""
    from fuzz import tarblocks as T

    recs = T.pax_data((b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                      (b"GNU.sparse.name", b"s"), (b"GNU.sparse.realsize", b"100000"))
    _read_tar(io.BytesIO(T.header(b"pax", b"x", len(recs)) + T.pad(recs)
                         + T.header(b"GNUSparseFile.0/s", b"0", len(data)) + T.pad(data)
                         + bytes(1024)))


def _layer(data: bytes) -> None:
    """gzip / zstd framing around a tar (the codec is chosen by the magic bytes)."""
    _read_tar(io.BytesIO(data))


def _h2(data: bytes) -> None:
    """Client bytes after the preface, fed in pieces; every request answered."""
    from pynydus.grpcwire.connection import PREFACE, H2Connection, Request

    conn = H2Connection()
    events = conn.receive(PREFACE)
    cut = len(data) // 3
    for piece in (data[:cut], data[cut:]):
        events += conn.receive(piece)
        for ev in events:
            if isinstance(ev, Request):
                if ev.stream_id % 4 == 1:
                    conn.respond(ev.stream_id, b"\0" * 10)
                else:
                    conn.fail(ev.stream_id, 13, "internal \u00e9rror")
        events = []
        conn.data_to_send()
        conn.expired(1e9, 1.0, 1.0)
    conn.goaway()
    conn.data_to_send()


def _hpack(data: bytes) -> None:
    """Header blocks split at 0xFF 0xFF 0xFF, decoded in turn by one decoder."""
    from pynydus.grpcwire.hpackin import Decoder

    dec = Decoder(max_table_size=4096, max_header_list=16 << 10)
    for block in data.split(b"\xff\xff\xff"):
        dec.decode(block)


def _nydusd_config(data: bytes) -> None:
    from pynydus.daemon.config import parse_daemon_config

    parse_daemon_config(data.decode("utf-8", "surrogateescape"), "fuzz")


_TOML_DIR = tempfile.mkdtemp(prefix="pyn-fuzz-toml-", dir="/dev/shm" if os.path.isdir(
    "/dev/shm") else None)


def _snapshotter_toml(data: bytes) -> None:
    from pynydus.config import parse_config

    path = os.path.join(_TOML_DIR, "config.toml")
    with open(path, "wb") as f:
        f.write(data)
    parse_config(path)


def _manifest(data: bytes) -> None:
    """A manifest, then (after a NUL) its config, as the converter reads them; the
    manifest also as the snapshotter's detection reads a referrer's."""
    from pynydus.convert import image as img
    from pynydus.convert.image import read_bootstrap_descriptor
    from pynydus.errors import FormatError

    manifest, _, config = data.partition(b"\0")
    try:
        read_bootstrap_descriptor(manifest, "fuzz manifest")
    except FormatError:
        pass
    si = img.parse_manifest("application/vnd.oci.image.manifest.v1+json",
                            "sha256:" + "0" * 64, manifest)
    img.attach_config(si, config)


def _index(data: bytes) -> None:
    """An image index, manifests picked for a platform and for all platforms, and the
    Nydus manifest beside its first entry as the snapshotter's detection finds it."""
    from pynydus.convert import image as img
    from pynydus.convert.image import nydus_in_index
    from pynydus.errors import NotFound

    index = img.parse_index(data, "fuzz index")
    if index["manifests"]:
        nydus_in_index(data, index["manifests"][0]["digest"], "fuzz index")
    for platform, every in ((None, False), (img.parse_platform("linux/arm64/v8"), False),
                            (None, True)):
        try:
            img.select_manifests(index, platform, every)
        except NotFound:
            pass
    img.merged_index(index, [], [])


SPECS = [
    Spec("rafs_v5", "RAFS v5 bootstrap reader", _bootstrap, 128 << 10),
    Spec("rafs_v6", "RAFS v6 bootstrap reader", _bootstrap, 128 << 10),
    Spec("blob_meta", "blob chunk-info array and header (blob and cache file)", _blob_meta,
         64 << 10),
    Spec("blob_toc", "blob TOC", _blob_toc, 8 << 10),
    Spec("tar", "tar headers, PAX records, GNU long names and sparse maps", _tar, 64 << 10),
    Spec("tar_pax", "one PAX header's records", _tar_pax, 8 << 10),
    Spec("tar_sparse", "a GNU sparse 1.0 map and its extents", _tar_sparse, 8 << 10),
    Spec("layer", "gzip and zstd layer framing", _layer, 64 << 10),
    Spec("h2", "HTTP/2 frames (grpcwire connection)", _h2, 64 << 10),
    Spec("hpack", "HPACK decoder", _hpack, 16 << 10),
    Spec("nydusd_config", "nydusd JSON (and TOML) config", _nydusd_config, 16 << 10),
    Spec("snapshotter_toml", "snapshotter TOML config", _snapshotter_toml, 16 << 10),
    Spec("manifest", "image manifest and config", _manifest, 64 << 10),
    Spec("index", "image index", _index, 64 << 10),
]
TARGETS = {s.name: s for s in SPECS}


def run_one(spec: Spec, data: bytes) -> None:
    """``spec`` on ``data``, pynydus's own errors swallowed: anything else escapes."""
    from pynydus.errors import NydusError

    try:
        spec.fn(data)
    except NydusError:
        pass
