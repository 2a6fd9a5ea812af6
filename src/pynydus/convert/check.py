"""``pynydus check-image``: does a Nydus image hold exactly what its source image holds?

Both images are pulled from their registries. The source's layers are streamed
through :class:`.overlay_view.OverlayView` (overlay semantics, content hashed, no
data kept), in a child process when a second CPU is usable. Meanwhile the Nydus
image's bootstrap layer is unpacked and opened with the RAFS reader; its blobs are
read once, in offset order, in large ranges, and every chunk is decompressed,
checked against its digest and handed to the files that use it as it streams past
(:mod:`.chunkstream`), which hash their contents. Then every path of both trees is
compared in sorted order: type, permission bits, owner, mtime (files), size,
content sha256, symlink target, device numbers, xattrs, and hardlink groups (same
inode in the Nydus image). The first difference
is reported by path; the check does not stop at a registry or format error either:
those are raised as the pynydus error they are.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from pynydus.errors import FormatError, InvalidArgument, NotFound, q
from pynydus.rafs.format import decode_rdev
from pynydus.rafs.read import Bootstrap, FileChunk, bootstrap_from_bytes
from pynydus.registry import RegistryClient, media, parse_reference
from pynydus.registry.reference import Reference

from . import image as img
from .chunkstream import FileDigests, file_digest, stream_digests
from .endpoints import registry_spec
from .overlay_view import FileRecord, OverlayView, kind_of_mode
from .pack import bootstrap_from_layer

__all__ = ["CheckOptions", "CheckResult", "check_image"]

@dataclass
class CheckOptions:
    source: str
    target: str
    source_insecure: bool = False
    target_insecure: bool = False
    source_auth: str | None = None
    target_auth: str | None = None
    platform: str | None = None


@dataclass
class CheckResult:
    ok: bool
    first_difference: str
    paths: int
    files: int
    bytes_compared: int
    source_manifest: str
    target_manifest: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _resolve(client: RegistryClient, ref: Reference, platform: str | None,
             nydus: bool) -> tuple[str, dict[str, Any]]:
    """The single-platform manifest ``ref`` names: (digest, document)."""
    try:
        top = client.get_manifest(ref.repository, ref.object)
    except NotFound as err:
        raise NotFound(f"image {ref}: not found ({err})") from err
    if top.media_type not in media.INDEX_TYPES:
        return top.digest, img.load_document(top.data, f"manifest {top.digest}")
    index = img.parse_index(top.data, f"image index {top.digest}")
    want = img.parse_platform(platform) if platform else img.Platform("linux", "amd64")
    for d in index.get("manifests") or []:
        marked = img.is_nydus_platform(d.get("platform")) or \
            d.get("artifactType") == media.NYDUS_MANIFEST_ARTIFACT
        if want.matches(d.get("platform")):
            m = client.get_manifest(ref.repository, d["digest"])
            doc = img.load_document(m.data, f"manifest {m.digest}")
            if nydus == (marked or img.is_nydus_manifest(doc)):
                return m.digest, doc
    kind = "Nydus" if nydus else "OCI"
    raise NotFound(f"image {ref}: no {kind} manifest for platform {want}")


def _describe(rec: FileRecord) -> str:
    return f"{rec.kind} mode {rec.mode:o} uid {rec.uid} gid {rec.gid}"


def _compare(path: str, want: FileRecord, got: FileRecord) -> str | None:
    shown = "/" + path
    if want.kind != got.kind:
        return f"{shown}: type {got.kind} in the Nydus image, {want.kind} in the source"
    if want.mode != got.mode:
        return f"{shown}: mode {got.mode:o} in the Nydus image, {want.mode:o} in the source"
    if (want.uid, want.gid) != (got.uid, got.gid):
        return (f"{shown}: owner {got.uid}:{got.gid} in the Nydus image, "
                f"{want.uid}:{want.gid} in the source")
    if want.kind != "dir" and want.mtime != got.mtime:
        return f"{shown}: mtime {got.mtime} in the Nydus image, {want.mtime} in the source"
    if want.kind in ("reg", "symlink") and want.size != got.size:
        return f"{shown}: size {got.size} in the Nydus image, {want.size} in the source"
    if want.kind == "reg" and want.sha256 != got.sha256:
        return f"{shown}: content differs (sha256 {got.sha256[:16]}…, source {want.sha256[:16]}…)"
    if want.link != got.link:
        return f"{shown}: symlink target {got.link!r} in the Nydus image, {want.link!r} in the source"
    if want.kind in ("char", "block") and want.rdev != got.rdev:
        return f"{shown}: device {got.rdev} in the Nydus image, {want.rdev} in the source"
    if want.xattrs != got.xattrs:
        return (f"{shown}: xattrs {sorted(got.xattrs)} in the Nydus image, "
                f"{sorted(want.xattrs)} in the source")
    return None


def _nydus_view(bs: Bootstrap, client: RegistryClient, repo: str
                ) -> tuple[dict[str, FileRecord], dict[str, int], int]:
    """Every path of the Nydus image as a :class:`FileRecord`; file contents are hashed
    from the blobs read once in order (:mod:`.chunkstream`), every chunk checked against
    its digest."""
    out: dict[str, FileRecord] = {}
    inos: dict[str, int] = {}
    files = FileDigests()
    wanted: list[FileChunk] = []
    total = 0
    sized: dict[int, int] = {}
    for raw_path, ino in bs.walk():
        path = raw_path.decode("utf-8", "surrogateescape").strip("/")
        st = bs.stat(ino)
        rec = FileRecord(kind_of_mode(st.mode), st.mode & 0o7777, st.uid, st.gid, st.mtime,
                         xattrs=dict(bs.xattrs(ino)))
        if st.is_reg:
            rec.size = st.size
            if ino not in sized:
                sized[ino] = st.size
                chunks = bs.chunks(ino) if st.size else []
                files.add(ino, chunks, st.size)
                wanted += chunks
                total += st.size
        elif st.is_symlink:
            rec.link = bs.readlink(ino)
            rec.size = len(rec.link)
        elif rec.kind in ("char", "block"):
            rec.rdev = decode_rdev(st.rdev)
        out[path] = rec
        inos[path] = ino

    def fetch(blob_id: str, offset: int, length: int) -> bytes:
        return client.read_blob_range(repo, "sha256:" + blob_id, offset, length)

    digesters = [b.digester for b in bs.blobs]
    stream_digests(files, wanted, fetch, lambda c: digesters[c.blob_index])
    digests = files.digests()
    for ino in files.deferred():  # gave up their waiting chunks: read on their own
        digests[ino] = file_digest(bs.chunks(ino), fetch, lambda c: digesters[c.blob_index])
    for path, rec in out.items():
        if rec.kind == "reg":
            rec.sha256 = str(digests[inos[path]])
    return out, inos, total


def check_image(opts: CheckOptions) -> CheckResult:
    """Compare ``opts.target`` (Nydus) with ``opts.source`` (OCI); never raises for a
    content difference (see :attr:`CheckResult.first_difference`)."""
    src_ref, dst_ref = parse_reference(opts.source), parse_reference(opts.target)
    src = registry_spec(src_ref, opts.source_insecure, opts.source_auth).client()
    dst = registry_spec(dst_ref, opts.target_insecure, opts.target_auth).client()
    with src, dst:
        src_digest, src_doc = _resolve(src, src_ref, opts.platform, nydus=False)
        dst_digest, dst_doc = _resolve(dst, dst_ref, opts.platform, nydus=True)
        if not img.is_nydus_manifest(dst_doc):
            raise InvalidArgument(f"target {q(str(dst_ref))}: last layer is not a Nydus bootstrap")
        # The source side (pull, decompress, parse, hash every layer) runs in a child
        # process when a second CPU is usable, beside the Nydus side here.
        layers = list(src_doc.get("layers") or [])
        pool = _source_pool()
        source: Future[dict[str, FileRecord]] | None = None
        if pool is not None:
            source = pool.submit(_source_paths, opts, layers)
        boot_desc = dst_doc["layers"][-1]
        boot = bootstrap_from_layer(b"".join(dst.get_blob(dst_ref.repository,
                                                          boot_desc["digest"])))
        bs = bootstrap_from_bytes(boot)
        try:
            try:
                got, inos, total = _nydus_view(bs, dst, dst_ref.repository)
            finally:
                bs.close()
            want = source.result() if source is not None else _source_paths(opts, layers, src)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    diff = ""
    for path in sorted(set(want) | set(got)):
        if path not in got:
            diff = f"/{path}: missing in the Nydus image ({_describe(want[path])} in the source)"
        elif path not in want:
            diff = f"/{path}: only in the Nydus image ({_describe(got[path])})"
        else:
            w = want[path]
            if not path and w.implicit:
                continue
            if w.implicit:
                # an implied directory: only its type is defined by the source
                if got[path].kind != "dir":
                    diff = f"/{path}: type {got[path].kind} in the Nydus image, dir in the source"
            else:
                diff = _compare(path, w, got[path]) or ""
        if diff:
            break
    if not diff:
        groups: dict[int, set[int]] = {}
        for path, rec in want.items():
            if rec.group:
                groups.setdefault(rec.group, set()).add(inos[path])
        for g, found in sorted(groups.items()):
            if len(found) != 1:
                names = sorted("/" + p for p, r in want.items() if r.group == g)
                diff = f"{', '.join(names)}: hardlinked in the source, separate inodes in the Nydus image"
                break
    files = sum(1 for r in want.values() if r.kind == "reg")
    return CheckResult(not diff, diff, len(want), files, total, src_digest, dst_digest)


def _source_pool() -> ProcessPoolExecutor | None:
    """A one-process pool for the source side, or None with a single usable CPU
    (``PYNYDUS_CHECK_SOURCE=inline`` or ``=process`` overrides)."""
    how = os.environ.get("PYNYDUS_CHECK_SOURCE", "")
    if how == "inline" or (how != "process" and len(os.sched_getaffinity(0)) < 2):
        return None
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def _source_paths(opts: CheckOptions, layers: list[dict[str, Any]],
                  client: RegistryClient | None = None) -> dict[str, FileRecord]:
    """The source image's paths: its ``layers`` pulled and applied with overlay
    semantics (:class:`.overlay_view.OverlayView`), each layer's digest verified."""
    ref = parse_reference(opts.source)
    own = client is None
    src = client or registry_spec(ref, opts.source_insecure, opts.source_auth).client()
    try:
        view = OverlayView()
        for lyr in layers:
            img.layer_compression(str(lyr.get("mediaType")), str(lyr.get("digest")))
            stream = io.BufferedReader(_IterIO(src.get_blob(ref.repository, lyr["digest"])),
                                       1 << 20)
            try:
                view.apply_layer(stream)
            except ValueError as err:
                raise FormatError(f"source layer {lyr['digest']}: {err}") from err
            while stream.read(1 << 20):  # to the end: the digest is verified there
                pass
        return view.paths
    finally:
        if own:
            src.close()


class _IterIO(io.RawIOBase):
    def __init__(self, it: Iterator[bytes]) -> None:
        self._it, self._buf = it, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._buf:
            self._buf = next(self._it, b"")
            if not self._buf:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
