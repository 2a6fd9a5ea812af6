"""``pynydus convert``: an image in a registry becomes a Nydus image in a registry.

Theory of operation::

    source manifest/index ──► select platforms ──► config + layer descriptors
    layers (unique) ──► process pool: stream → builder → inline blob (cache) ──┐
                                             each finished blob ──► push (threads)
    all layers of an image ──► merge bootstraps ──► bootstrap layer, config ──► push
    every blob pushed ──► manifests by digest ──► the tag (index or manifest) LAST

Layers are converted in worker processes (the builder is CPU bound Python, so
threads would share one core); blobs are uploaded from threads while later layers
are still converting. Pushing the tag is the very last request, so a failure at
any earlier point leaves the target tag as it was (blobs already uploaded are
content-addressed and harmless). A blob the target has already is not uploaded
(HEAD first); a layer converted before (same digest, same options) comes from the
local cache without being downloaded.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pynydus.errors import FailedPrecondition, InvalidArgument, NotFound, q
from pynydus.registry import RegistryClient, Unauthorized, media, parse_reference
from pynydus.signature import load_private_key, sign_bootstrap

from . import image as img
from .bootstrap import LayerChunks, layer_chunks, merge_layers
from .endpoints import registry_spec
from .layer import BuildOptions, LayerJob, LayerResult, lookup_cache
from .pack import blob_meta_cache_file, bootstrap_layer
from .progress import NullReporter, Reporter
from .workers import WorkerPool

__all__ = ["ConvertOptions", "ConvertReport", "convert", "default_cache_dir"]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pynydus", "convert")


@dataclass
class ConvertOptions:
    source: str
    target: str
    source_insecure: bool = False
    target_insecure: bool = False
    source_auth: str | None = None   # "user:password" or base64 of it
    target_auth: str | None = None
    platform: str | None = None
    all_platforms: bool = False
    build: BuildOptions = field(default_factory=BuildOptions)
    merge_platform: bool = False
    with_referrer: bool = False
    oci: bool = False
    cache_dir: str = field(default_factory=default_cache_dir)
    workers: int = 0                 # 0: one per CPU
    output_json: str | None = None
    sign_key: str | None = None      # PEM RSA private key: sign each bootstrap (signature.py)


@dataclass
class ConvertReport:
    source: str
    target: str
    target_digest: str
    seconds: float
    workers: int
    images: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Pass 2 thresholds: rebuilding costs a second conversion of the layer, worth it
# when it saves at least a chunk's worth of registry bytes or a good share of a
# small layer.
REBUILD_MIN_BYTES = 1 << 20
REBUILD_MIN_FRACTION = 0.25


@dataclass
class _Settle:
    """One image's layers being settled in order (see ``convert_layers``)."""

    image: img.SourceImage
    next: int = 0
    lower: set[bytes] = field(default_factory=set)
    finals: list[LayerResult | None] = field(default_factory=list)
    rebuild: list[int] = field(default_factory=list)


# --------------------------------------------------------------------- helpers
def _fetch_small_blob(client: RegistryClient, repo: str, digest: str) -> bytes:
    return b"".join(client.get_blob(repo, digest))


# --------------------------------------------------------------------- converter
class _Run:
    def __init__(self, opts: ConvertOptions, reporter: Reporter) -> None:
        self.opts = opts
        self.rep = reporter
        # read first: a bad key should stop the run before any registry work
        self.sign_key = load_private_key(opts.sign_key) if opts.sign_key else None
        self.src_ref = parse_reference(opts.source)
        self.dst_ref = parse_reference(opts.target)
        if self.dst_ref.digest:
            raise InvalidArgument(f"target {q(opts.target)}: must be a tag, not a digest")
        self.src_spec = registry_spec(self.src_ref, opts.source_insecure, opts.source_auth)
        self.dst_spec = registry_spec(self.dst_ref, opts.target_insecure, opts.target_auth)
        self.src = self.src_spec.client()
        self.dst = self.dst_spec.client()
        self.src_repo = self.src_ref.repository
        self.dst_repo = self.dst_ref.repository
        self.pushed: dict[str, cf.Future[str]] = {}
        self.push_pool = cf.ThreadPoolExecutor(4, thread_name_prefix="push")
        self.workers = 0

    def close(self) -> None:
        self.push_pool.shutdown(wait=True, cancel_futures=True)
        self.src.close()
        self.dst.close()

    # ---------------------------------------------------------------- source
    def resolve(self) -> tuple[dict[str, Any] | None, bytes | None, list[img.SourceImage]]:
        what = f"source image {self.src_ref}"
        try:
            top = self.src.get_manifest(self.src_repo, self.src_ref.object)
        except NotFound as err:
            raise NotFound(f"{what}: not found ({err})") from err
        except Unauthorized as err:
            raise Unauthorized(f"{what}: access denied ({err})", status=err.status) from err
        platform = img.parse_platform(self.opts.platform) if self.opts.platform else None
        if top.media_type in media.INDEX_TYPES:
            index = img.parse_index(top.data, f"{what}: index {top.digest}")
            images = []
            for d in img.select_manifests(index, platform, self.opts.all_platforms):
                m = self.src.get_manifest(self.src_repo, d["digest"])
                si = img.parse_manifest(m.media_type, m.digest, m.data)
                si.platform = dict(d.get("platform") or {}) or None
                images.append(si)
            return index, top.data, images
        return None, None, [img.parse_manifest(top.media_type, top.digest, top.data)]

    # ---------------------------------------------------------------- pushing
    def push_blob(self, digest: str, source: Any, size: int) -> cf.Future[str]:
        fut = self.pushed.get(digest)
        if fut is None:
            fut = self.push_pool.submit(self.dst.push_blob, self.dst_repo, source, digest,
                                        size=size)
            self.pushed[digest] = fut
        return fut

    # ---------------------------------------------------------------- main
    def run(self) -> ConvertReport:
        t0 = time.monotonic()
        opts = self.opts
        opts.build.validate()
        src_index, _, images = self.resolve()
        for si in images:
            img.attach_config(si, _fetch_small_blob(self.src, self.src_repo,
                                                    str(si.config["digest"])))
        self.rep.info(f"source {self.src_ref}: {len(images)} manifest(s), "
                      f"{sum(len(si.layers) for si in images)} layer(s)")
        results = self.convert_layers(images)
        outputs: list[tuple[img.SourceImage, bytes, dict[str, Any], str, dict[str, Any]]] = []
        for si in images:
            outputs.append(self.finish_image(si, results))
        for fut in list(self.pushed.values()):
            fut.result()  # every blob is in the target before any manifest
        multi = len(outputs) > 1 or opts.merge_platform
        final_digest = ""
        if not multi:
            si, mbytes, mdoc, _, _ = outputs[0]
            final_digest = self.dst.put_manifest(self.dst_repo, self.dst_ref.object,
                                                 mdoc["mediaType"], mbytes)
        else:
            entries = []
            for si, mbytes, mdoc, mdigest, _ in outputs:
                self.dst.put_manifest(self.dst_repo, mdigest, mdoc["mediaType"], mbytes)
                entries.append(img.nydus_index_entry(mbytes, mdoc, mdigest, si.platform))
            if opts.merge_platform:
                self.copy_source_manifests(images, src_index)
                source_entries = [{**si.descriptor(), "platform": si.platform or {}}
                                  for si in images]
                index = img.merged_index(src_index, source_entries, entries)
            else:
                index = {"schemaVersion": 2, "mediaType": media.OCI_INDEX,
                         "manifests": [{k: v for k, v in e.items() if k != "artifactType"}
                                       for e in entries]}
                for e in index["manifests"]:
                    e["platform"] = {k: v for k, v in e["platform"].items()
                                     if k != "os.features"}
            final_digest = self.dst.put_manifest(self.dst_repo, self.dst_ref.object,
                                                 media.OCI_INDEX, img.dumps(index))
        report = ConvertReport(
            source=str(self.src_ref), target=str(self.dst_ref), target_digest=final_digest,
            seconds=round(time.monotonic() - t0, 3), workers=self.workers,
            images=[o[4] for o in outputs])
        self.rep.info(f"target {self.dst_ref}: pushed {final_digest} "
                      f"in {report.seconds:.2f}s")
        return report

    # ---------------------------------------------------------------- layers
    def convert_layers(self, images: Sequence[img.SourceImage]) -> dict[str, list[LayerResult]]:
        """Every layer of every image converted: the final results per image manifest.

        Pass 1 converts each distinct layer on its own, in parallel. As results come
        in, each image's layers are settled in order: a layer whose own chunks a lower
        layer already stores (at least REBUILD_MIN_BYTES, or REBUILD_MIN_FRACTION of
        its data) is marked for pass 2, every other layer is final and its blob is
        pushed at once. Pass 2 rebuilds the marked layers in order with the lower
        layers' chunks as chunk dict, so their blobs hold only new data.
        """
        layers: dict[str, img.LayerDesc] = {}
        for si in images:
            for lyr in si.layers:
                layers.setdefault(lyr.digest, lyr)
        order = list(layers)
        first: dict[str, LayerResult] = {}
        jobs = []
        for i, d in enumerate(order):
            self.rep.layer_started(d, d, layers[d].size)
            hit = lookup_cache(self.opts.cache_dir, d, self.opts.build)
            if hit is not None:  # no worker, no download
                first[d] = hit
            else:
                jobs.append(LayerJob(i, self.src_repo, layers[d], self.src_spec, self.opts.build,
                                     self.opts.cache_dir))
        settle = [_Settle(si) for si in images]
        chunks: dict[str, LayerChunks] = {}

        def advance() -> None:
            for st in settle:
                while st.next < len(st.image.layers) and st.image.layers[st.next].digest in first:
                    res = first[st.image.layers[st.next].digest]
                    lc = chunks.get(res.blob_digest)
                    if lc is None:
                        lc = chunks[res.blob_digest] = layer_chunks(res.bootstrap, res.blob_digest)
                    dup = lc.duplicated_bytes(st.lower)
                    if self.opts.build.oci_ref:
                        dup = 0  # nothing to rebuild: the data stays in the source layers
                    if dup and (dup >= REBUILD_MIN_BYTES
                                or dup >= REBUILD_MIN_FRACTION * lc.own_bytes):
                        st.rebuild.append(st.next)
                        st.finals.append(None)
                    else:
                        st.finals.append(res)
                        self.layer_finished(res)
                    st.lower |= lc.referenced
                    st.next += 1

        n = self.opts.workers or os.cpu_count() or 1
        self.workers = max(1, min(n, len(jobs))) if jobs else 0
        pool: WorkerPool | None = None

        def progress(index: int, nbytes: int) -> None:
            self.rep.layer_bytes(order[index % len(order)], nbytes)

        try:
            advance()
            if jobs:
                pool = WorkerPool(self.workers, progress)
                # Largest first: the last layer to finish should be a small one.
                jobs.sort(key=lambda j: -j.layer.size)
                for res in pool.run(jobs):
                    first[res.source_digest] = res
                    advance()
            for st in settle:
                for i in st.rebuild:
                    lower = tuple((r.blob_digest, r.bootstrap) for r in st.finals[:i]
                                  if r is not None)
                    lyr = st.image.layers[i]
                    hit = lookup_cache(self.opts.cache_dir, lyr.digest, self.opts.build,
                                       tuple(d for d, _ in lower))
                    if hit is not None:
                        res = hit
                    else:
                        self.rep.info(f"layer {lyr.digest[7:19]}: duplicates lower layers' "
                                      "data, converting again against them")
                        if pool is None:
                            pool = WorkerPool(1, progress)
                            self.workers = max(self.workers, 1)
                        job = LayerJob(order.index(lyr.digest) + len(order), self.src_repo, lyr,
                                       self.src_spec, self.opts.build, self.opts.cache_dir,
                                       lower)
                        res = next(iter(pool.run([job])))
                    res.rebuilt = True
                    st.finals[i] = res
                    self.layer_finished(res)
        finally:
            if pool is not None:
                pool.close()
        out: dict[str, list[LayerResult]] = {}
        for st in settle:
            finals = [r for r in st.finals if r is not None]
            assert len(finals) == len(st.image.layers)
            out[st.image.digest] = finals
        return out

    def layer_finished(self, res: LayerResult) -> None:
        self.rep.layer_done(res.source_digest, asdict(res))
        self.push_blob(res.blob_digest, res.blob_path(self.opts.cache_dir), res.blob_size)

    # ---------------------------------------------------------------- one image
    def finish_image(self, si: img.SourceImage, results: dict[str, list[LayerResult]]
                     ) -> tuple[img.SourceImage, bytes, dict[str, Any], str, dict[str, Any]]:
        opts = self.opts
        layer_results = results[si.digest]
        tmp_dir = os.path.join(opts.cache_dir, "tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        boot_path = os.path.join(tmp_dir, f"image-{os.getpid()}-{si.digest.split(':')[1][:16]}.boot")
        try:
            merged = merge_layers([r.bootstrap for r in layer_results], boot_path,
                                  prefetch_files=opts.build.prefetch_files)
            with open(boot_path, "rb") as f:
                boot = f.read()
        finally:
            try:
                os.unlink(boot_path)
            except FileNotFoundError:
                pass
        blobs = [img.BlobLayer(r.blob_digest, r.blob_size, r.ref_digest) for r in layer_results]
        layer_ids = {b.digest.split(":", 1)[1] for b in blobs}
        layer_ids |= {r.ref_digest.split(":", 1)[1] for r in layer_results if r.ref_digest}
        if opts.build.oci_ref:
            self.ensure_source_layers(layer_results)
        for blob_id in merged.blob_ids:  # chunk-dict blobs join the manifest, as upstream
            if blob_id not in layer_ids:
                digest = "sha256:" + blob_id
                try:
                    size = self.dst.head_blob(self.dst_repo, digest).size
                except NotFound:
                    raise FailedPrecondition(
                        f"chunk dict blob {digest} is not in target {self.dst_ref.name}; "
                        "push the chunk dict image there first") from None
                blobs.append(img.BlobLayer(digest, size))
                layer_ids.add(blob_id)
        metas: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for r in layer_results:
            if not r.has_data or r.blob_digest in seen or r.ref_digest:
                # a blob shared by layers: its TOC is read once. A ZRAN layer's chunk
                # info (mostly 32 KiB inflate windows) stays in its meta blob only: a
                # copy here would double what --oci-ref pushes (docs/decisions.md)
                continue
            seen.add(r.blob_digest)
            meta = blob_meta_cache_file(r.blob_path(opts.cache_dir))
            if meta is not None:
                metas.append((r.blob_digest, meta))
        bl = bootstrap_layer(boot, metas)
        self.push_blob(bl.digest, bl.data, len(bl.data))
        config = img.nydus_config(si.config_doc, blobs, bl.diff_id)
        cbytes = img.dumps(config)
        cdigest = "sha256:" + hashlib.sha256(cbytes).hexdigest()
        self.push_blob(cdigest, cbytes, len(cbytes))
        subject = si.descriptor() if opts.with_referrer else None
        mdoc = img.nydus_manifest(
            si, blobs, img.BlobLayer(bl.digest, len(bl.data)),
            img.BlobLayer(cdigest, len(cbytes)), fs_version=opts.build.fs_version,
            oci=opts.oci or None, merge_platform=opts.merge_platform, subject=subject,
            signature=sign_bootstrap(self.sign_key, boot) if self.sign_key else "")
        mbytes = img.dumps(mdoc)
        mdigest = "sha256:" + hashlib.sha256(mbytes).hexdigest()
        summary = {
            "platform": si.platform, "source_manifest": si.digest, "manifest": mdigest,
            "bootstrap": {"digest": bl.digest, "size": len(bl.data),
                          "bootstrap_size": merged.size},
            "layers": [
                {"source_digest": r.source_digest, "source_size": r.source_size,
                 "blob_digest": r.blob_digest, "blob_size": r.blob_size, "chunks": r.chunks,
                 "chunks_written": r.chunks_written, "bytes_in": r.bytes_in,
                 "deduplicated_bytes": r.dedup_bytes + merged.shared_bytes[i],
                 "shared_with_lower_layers_bytes": merged.shared_bytes[i],
                 "seconds": r.seconds, "cached": r.cached,
                 "rebuilt_against_lower_layers": r.rebuilt,
                 **({"ref_digest": r.ref_digest} if r.ref_digest else {})}
                for i, r in enumerate(layer_results)],
        }
        if opts.build.oci_ref:
            added = sum(b.size for b in blobs) + len(bl.data) + len(cbytes) + len(mbytes)
            source = sum(r.source_size for r in layer_results)
            summary["oci_ref"] = {"pushed_bytes": added, "source_layer_bytes": source,
                                  "fraction_of_source": round(added / source, 5) if source else 0}
        return si, mbytes, mdoc, mdigest, summary

    def ensure_source_layers(self, results: Sequence[LayerResult]) -> None:
        """A ZRAN image reads the source layers from its own repository: mount (same
        registry) or copy the ones the target repository lacks."""
        same_registry = self.src_spec.host == self.dst_spec.host
        for r in results:
            if not r.has_data or not r.ref_digest or r.ref_digest in self.pushed:
                continue
            digest, size = r.ref_digest, r.source_size
            if same_registry and self.src_repo == self.dst_repo:
                continue
            if self.dst.blob_exists(self.dst_repo, digest):
                continue
            if same_registry and self.dst.mount_blob(self.dst_repo, digest, self.src_repo):
                continue
            self.pushed[digest] = self.push_pool.submit(self._copy_blob, digest, size)

    # ---------------------------------------------------------------- merge-platform
    def copy_source_manifests(self, images: Sequence[img.SourceImage],
                              src_index: dict[str, Any] | None) -> None:
        """With --merge-platform the index must be complete in the target repository:
        copy the source manifests (and their blobs) the target lacks."""
        same_registry = self.src_spec.host == self.dst_spec.host
        if same_registry and self.src_repo == self.dst_repo:
            return
        digests = [str(d["digest"]) for d in (src_index or {}).get("manifests") or []] \
            if src_index is not None else [si.digest for si in images]
        for digest in digests:
            try:
                self.dst.head_manifest(self.dst_repo, digest)
                continue
            except NotFound:
                pass
            m = self.src.get_manifest(self.src_repo, digest)
            doc = json.loads(m.data)
            for d in [doc.get("config")] + list(doc.get("layers") or []):
                if not d:
                    continue
                dg, size = str(d["digest"]), int(d["size"])
                if self.dst.blob_exists(self.dst_repo, dg):
                    continue
                if same_registry and self.dst.mount_blob(self.dst_repo, dg, self.src_repo):
                    continue
                self._copy_blob(dg, size)
            self.dst.put_manifest(self.dst_repo, digest, m.media_type, m.data)


    def _copy_blob(self, digest: str, size: int) -> str:
        """Source blob → target blob through a temp file (memory stays bounded)."""
        tmp_dir = os.path.join(self.opts.cache_dir, "tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=tmp_dir) as f:
            for chunk in self.src.get_blob(self.src_repo, digest):
                f.write(chunk)
            f.seek(0)
            self.dst.push_blob(self.dst_repo, f, digest, size=size)
        return digest


def convert(opts: ConvertOptions, reporter: Reporter | None = None) -> ConvertReport:
    """Convert ``opts.source`` into a Nydus image tagged ``opts.target``.

    Idempotent: converting again pushes the same manifest (nothing converted or
    uploaded when the cache and the target have everything). The target tag is
    written last; any error before leaves it untouched.
    """
    rep = reporter or NullReporter()
    run = _Run(opts, rep)
    try:
        report = run.run()
    finally:
        run.close()
        rep.close()
    if opts.output_json:
        with open(opts.output_json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return report
