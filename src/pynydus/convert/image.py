"""Source and target image documents: parse, select, rewrite (sans-I/O).

Everything here takes JSON bytes or dicts and returns dicts/bytes; no registry
access. The converter feeds it what it pulled and pushes what it returns.

What a Nydus image looks like in a registry is upstream's contract
(rafs-nydusd-spec §3, nydus-snapshotter ``pkg/converter`` ``convertManifest`` /
``MergeLayers``):

* one layer per source layer, in order, media type
  ``application/vnd.oci.image.layer.nydus.blob.v1``, annotation
  ``containerd.io/snapshot/nydus-blob: "true"``; blobs a chunk dict contributed are
  appended after them;
* the bootstrap layer last: a gzip'ed tar holding ``image/image.boot``, media type
  OCI ``tar+gzip`` (Docker ``rootfs.diff.tar.gzip`` in a Docker manifest),
  annotations ``nydus-bootstrap: "true"`` and ``nydus-fs-version``;
* the config's ``rootfs.diff_ids`` = each blob's own digest (the blob is stored
  uncompressed) then the bootstrap tar's uncompressed digest, plus one history
  entry "Nydus Converter" / "Nydus Bootstrap Layer";
* ``--merge-platform``: the nydus manifest joins the source index, marked with
  ``platform.os.features = ["nydus.remoteimage.v1"]`` and
  ``artifactType = application/vnd.nydus.image.manifest.v1+json``, its config
  media type switched to ``application/vnd.nydus.image.config.v1+json`` so that
  plain containerd never picks it;
* ``--with-referrer``: ``subject`` = the source manifest's descriptor (platform
  dropped);
* ``--oci-ref`` (ZRAN): each layer is the layer's meta blob (chunk info and inflate
  contexts into the source layer, plus its bootstrap), annotated
  ``containerd.io/snapshot/nydus-ref: <source layer digest>``; the source layers stay
  where they are (the same repository) and are the blobs the runtime reads.

The ``containerd.io/uncompressed`` annotation upstream carries internally is
removed from the final manifest, as upstream does. ``nydus-blob-digest`` /
``nydus-blob-size`` / ``nydus-source-chainid`` belong to nydusify's *build cache*
manifests (``pkg/cache``), not to the image manifest, so they do not appear here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pynydus import labels
from pynydus.errors import FormatError, InvalidArgument, NotFound, q
from pynydus.registry import media
from pynydus.registry.documents import check_descriptor, load_document, parse_index

__all__ = [
    "BOOTSTRAP_HISTORY",
    "LayerDesc",
    "Platform",
    "SourceImage",
    "check_descriptor",
    "dumps",
    "is_nydus_manifest",
    "layer_compression",
    "load_document",
    "merged_index",
    "nydus_config",
    "nydus_in_index",
    "nydus_manifest",
    "parse_index",
    "parse_manifest",
    "parse_platform",
    "read_bootstrap_descriptor",
    "select_manifests",
]

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_LAYER_NONDIST_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

# Layer media type -> compression of the blob as stored. The builder detects the
# codec from magic bytes anyway; this table decides what we accept at all.
_LAYER_TYPES: dict[str, str] = {
    OCI_LAYER_TAR: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER_FOREIGN: "gzip",
    OCI_LAYER_NONDIST_TAR: "none",
    OCI_LAYER_NONDIST_GZIP: "gzip",
    OCI_LAYER_NONDIST_ZSTD: "zstd",
}

NYDUS_OS_FEATURE = "nydus.remoteimage.v1"
BOOTSTRAP_HISTORY = {"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"}
UNCOMPRESSED_ANNOTATION = "containerd.io/uncompressed"


def dumps(doc: Mapping[str, Any]) -> bytes:
    """Compact JSON as Go's ``json.Marshal`` writes it (the bytes we push and hash)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


# ------------------------------------------------------------------------ platforms
@dataclass(frozen=True)
class Platform:
    """``os/arch[/variant]`` as ``--platform`` takes it."""

    os: str
    architecture: str
    variant: str = ""

    def matches(self, p: Mapping[str, Any] | None) -> bool:
        if not p:
            return False
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        return not self.variant or p.get("variant", "") == self.variant

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


def parse_platform(text: str) -> Platform:
    """Parse ``linux/amd64`` or ``linux/arm64/v8`` (InvalidArgument otherwise)."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidArgument(f"platform {q(text)}: want os/arch[/variant]")
    return Platform(*parts)


def is_nydus_platform(p: Mapping[str, Any] | None) -> bool:
    return bool(p) and NYDUS_OS_FEATURE in (p or {}).get("os.features", [])


def select_manifests(
    index: Mapping[str, Any], platform: Platform | None, all_platforms: bool
) -> list[dict[str, Any]]:
    """The manifest descriptors of ``index`` to convert.

    ``all_platforms``: every image manifest (nydus ones skipped); else the one
    matching ``platform`` (default linux/amd64). NotFound names what the index has.
    """
    manifests = [
        d for d in index.get("manifests") or []
        if d.get("mediaType") in media.MANIFEST_TYPES
        and not is_nydus_platform(d.get("platform"))
        and d.get("artifactType") != media.NYDUS_MANIFEST_ARTIFACT
    ]
    if all_platforms:
        if not manifests:
            raise NotFound("image index lists no image manifest")
        return manifests
    want = platform or Platform("linux", "amd64")
    for d in manifests:
        if want.matches(d.get("platform")):
            return [d]
    have = ", ".join(
        str(Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant", "")))
        for p in (d.get("platform") or {} for d in manifests)
    )
    raise NotFound(f"image index has no manifest for platform {want} (has: {have or 'none'})")


# ------------------------------------------------------------------------ manifests
@dataclass(frozen=True)
class LayerDesc:
    """One source layer: registry descriptor plus the compression we will undo."""

    digest: str
    size: int
    media_type: str
    compression: str
    diff_id: str = ""


@dataclass
class SourceImage:
    """A single-platform source manifest and what we need from it."""

    media_type: str
    digest: str
    size: int
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[LayerDesc]
    platform: dict[str, Any] | None = None
    config_doc: dict[str, Any] = field(default_factory=dict)

    @property
    def is_oci(self) -> bool:
        return self.media_type == media.OCI_MANIFEST

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def layer_compression(media_type: str, digest: str = "") -> str:
    """``none``/``gzip``/``zstd`` for a layer media type we can convert.

    InvalidArgument for anything else, naming the layer: encrypted layers, nydus
    blobs (the image is already converted), foreign artifact types.
    """
    try:
        return _LAYER_TYPES[media_type]
    except KeyError:
        pass
    what = f"layer {digest}" if digest else "layer"
    if media_type == media.NYDUS_BLOB:
        raise InvalidArgument(f"{what}: is a Nydus blob; the source is already a Nydus image")
    raise InvalidArgument(f"{what}: unsupported media type {q(media_type)}")


def is_nydus_manifest(doc: Mapping[str, Any]) -> bool:
    """True if the manifest's last layer is a Nydus bootstrap (upstream's test)."""
    return labels.bootstrap_descriptor(doc) is not None


def nydus_in_index(data: bytes, manifest: str, what: str) -> str | None:
    """The digest of the Nydus manifest that image index ``data`` lists beside
    ``manifest`` for the same platform (the ``nydus.remoteimage.v1`` OS feature or the
    Nydus artifact type), or None: how the snapshotter's index detection finds a Nydus
    form. FormatError naming ``what`` for a document that is no index of descriptors (a
    registry's answer is untrusted input; fuzzed: ``index``)."""
    entries = parse_index(data, what)["manifests"]
    mine = next((d for d in entries if d["digest"] == manifest), None)
    if mine is None:
        return None
    want = _platform_key(mine.get("platform"))
    for d in entries:
        nydus = is_nydus_platform(d.get("platform")) or \
            d.get("artifactType") == media.NYDUS_MANIFEST_ARTIFACT
        if nydus and d["digest"] != manifest and _platform_key(d.get("platform")) == want:
            return str(d["digest"])
    return None


def read_bootstrap_descriptor(data: bytes, what: str) -> dict[str, Any] | None:
    """The descriptor of manifest ``data``'s Nydus bootstrap layer
    (``labels.bootstrap_descriptor``'s test), checked for its shape, else None: how the
    snapshotter's referrer detection reads a referrer. FormatError naming ``what`` for
    a document that is no JSON object or a bootstrap layer that is no descriptor (a
    digest that is no string, annotations that are not strings; fuzzed: ``manifest``)."""
    boot = labels.bootstrap_descriptor(load_document(data, what))
    return None if boot is None else check_descriptor(boot, f"{what}: bootstrap layer")


def _platform_key(p: Any) -> tuple[str, str, str]:
    p = p if isinstance(p, Mapping) else {}
    return (str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant", "")))


def parse_manifest(media_type: str, digest: str, data: bytes) -> SourceImage:
    """Parse a single-platform Docker v2 / OCI manifest; config is filled in later.

    Raises InvalidArgument for a Nydus manifest or an unsupported layer type, and
    FormatError for a malformed document.
    """
    doc = load_document(data, f"manifest {digest}")
    mt = doc.get("mediaType") or media_type
    if not isinstance(mt, str):
        raise FormatError(f"manifest {digest}: mediaType {mt!r} is not a string")
    layer_docs = doc.get("layers") or []
    if not isinstance(layer_docs, list):
        raise FormatError(f"manifest {digest}: layers is not a list")
    for i, d in enumerate(layer_docs):
        check_descriptor(d, f"manifest {digest}: layers[{i}]")
    if mt not in media.MANIFEST_TYPES:
        raise InvalidArgument(f"manifest {digest}: unsupported media type {q(mt)}")
    if doc.get("schemaVersion") != 2:
        raise FormatError(f"manifest {digest}: schemaVersion {doc.get('schemaVersion')!r}, want 2")
    if is_nydus_manifest(doc):
        raise InvalidArgument(f"manifest {digest}: is already a Nydus image")
    config = doc.get("config")
    if not isinstance(config, dict) or "digest" not in config:
        raise FormatError(f"manifest {digest}: no config descriptor")
    check_descriptor(config, f"manifest {digest}: config")
    layers = []
    for i, d in enumerate(layer_docs):
        try:
            layers.append(LayerDesc(str(d["digest"]), int(d["size"]), str(d["mediaType"]),
                                    layer_compression(str(d["mediaType"]), str(d["digest"]))))
        except KeyError as err:
            raise FormatError(f"manifest {digest}: layer {i} lacks {err}") from None
    if not layers:
        raise InvalidArgument(f"manifest {digest}: has no layers")
    return SourceImage(mt, digest, len(data), doc, config, layers)


def attach_config(img: SourceImage, data: bytes) -> None:
    """Record the image config and the layers' diff ids from it."""
    what = f"config {img.config['digest']}"
    cfg = load_document(data, what)
    rootfs = cfg.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") or [] if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise FormatError(f"{what}: rootfs.diff_ids is not a list of digests")
    for key in ("architecture", "os", "variant"):
        if not isinstance(cfg.get(key, ""), str):
            raise FormatError(f"{what}: {key} is not a string")
    if len(diff_ids) != len(img.layers):
        raise FormatError(
            f"config {img.config['digest']}: {len(diff_ids)} diff_ids for {len(img.layers)} layers")
    img.config_doc = cfg
    img.layers = [LayerDesc(lyr.digest, lyr.size, lyr.media_type, lyr.compression, str(d))
                  for lyr, d in zip(img.layers, diff_ids)]
    if img.platform is None:
        img.platform = {"architecture": cfg.get("architecture", ""), "os": cfg.get("os", "")}
        if cfg.get("variant"):
            img.platform["variant"] = cfg["variant"]


# ------------------------------------------------------------------------ target
@dataclass(frozen=True)
class BlobLayer:
    """A pushed Nydus blob: its registry digest (== blob id) and size; for a ZRAN image
    (``--oci-ref``) the meta blob, and ``ref`` the source layer its chunks live in."""

    digest: str
    size: int
    ref: str = ""


def nydus_config(source_config: Mapping[str, Any], blobs: Sequence[BlobLayer],
                 bootstrap_diff_id: str) -> dict[str, Any]:
    """The converted image config: diff ids rewritten, one history entry appended."""
    cfg: dict[str, Any] = json.loads(json.dumps(source_config))  # deep copy, JSON types only
    rootfs = dict(cfg.get("rootfs") or {"type": "layers"})
    rootfs["type"] = rootfs.get("type") or "layers"
    rootfs["diff_ids"] = [b.digest for b in blobs] + [bootstrap_diff_id]
    cfg["rootfs"] = rootfs
    history = list(cfg.get("history") or [])
    history.append(dict(BOOTSTRAP_HISTORY))
    cfg["history"] = history
    return cfg


def nydus_manifest(
    source: SourceImage,
    blobs: Sequence[BlobLayer],
    bootstrap: BlobLayer,
    config: BlobLayer,
    *,
    fs_version: int,
    oci: bool | None = None,
    merge_platform: bool = False,
    subject: Mapping[str, Any] | None = None,
    signature: str = "",
) -> dict[str, Any]:
    """The Nydus manifest for ``source``; key order as Go marshals ``ocispec.Manifest``.

    ``oci``: manifest flavour; default: the source's (upstream's rule: an OCI
    source always gives an OCI Nydus manifest). ``signature``: the bootstrap's
    (``pynydus.signature``), put in the bootstrap layer's annotations.
    """
    use_oci = source.is_oci if oci is None else (oci or source.is_oci)
    mt = media.OCI_MANIFEST if use_oci else media.DOCKER_MANIFEST
    cfg_mt = str(source.config.get("mediaType") or (OCI_CONFIG if use_oci else DOCKER_CONFIG))
    if merge_platform:
        cfg_mt = media.NYDUS_CONFIG
    layers: list[dict[str, Any]] = [
        {"mediaType": media.NYDUS_BLOB, "digest": b.digest, "size": b.size,
         "annotations": {labels.NYDUS_BLOB: "true",
                         **({labels.NYDUS_REF: b.ref} if b.ref else {})}}
        for b in blobs
    ]
    layers.append({
        "mediaType": OCI_LAYER_GZIP if use_oci else DOCKER_LAYER_GZIP,
        "digest": bootstrap.digest,
        "size": bootstrap.size,
        "annotations": {
            labels.NYDUS_BOOTSTRAP: "true",
            labels.NYDUS_FS_VERSION: str(fs_version),
            **({labels.NYDUS_SIGNATURE: signature} if signature else {}),
        },
    })
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt,
                           "config": {"mediaType": cfg_mt, "digest": config.digest,
                                      "size": config.size},
                           "layers": layers}
    if subject is not None:
        doc["subject"] = {k: subject[k] for k in ("mediaType", "digest", "size")}
    if source.manifest.get("annotations"):
        doc["annotations"] = dict(source.manifest["annotations"])
    return doc


def nydus_index_entry(manifest_bytes: bytes, manifest_doc: Mapping[str, Any], digest: str,
                      platform: Mapping[str, Any] | None) -> dict[str, Any]:
    """Index descriptor of a Nydus manifest, marked the way both detectors accept."""
    plat = dict(platform or {})
    feats = list(plat.get("os.features") or [])
    if NYDUS_OS_FEATURE not in feats:
        feats.append(NYDUS_OS_FEATURE)
    plat["os.features"] = feats
    return {"mediaType": manifest_doc["mediaType"], "digest": digest,
            "size": len(manifest_bytes), "platform": plat,
            "artifactType": media.NYDUS_MANIFEST_ARTIFACT}


def merged_index(source_index: Mapping[str, Any] | None,
                 source_entries: Sequence[Mapping[str, Any]],
                 nydus_entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``--merge-platform`` index: the source's manifests (or ``source_entries``
    when the source was a single manifest), stale Nydus entries dropped, ours added."""
    doc: dict[str, Any]
    if source_index is not None:
        doc = json.loads(json.dumps(source_index))
        doc["mediaType"] = media.OCI_INDEX
    else:
        doc = {"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": list(source_entries)}
    keep = [d for d in doc.get("manifests") or []
            if not is_nydus_platform(d.get("platform"))
            and d.get("artifactType") != media.NYDUS_MANIFEST_ARTIFACT]
    doc["manifests"] = keep + [dict(e) for e in nydus_entries]
    return doc
