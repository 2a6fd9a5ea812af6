"""Where a tarfs layer comes from, and what its image's manifest and config say about it.

A layer arrives in Prepare with the labels the CRI (or ``ctr-remote``/nerdctl) set:
the image reference, the layer's digest and, from the CRI, the manifest's digest.
:class:`LayerSource` reads them. :class:`ImageInfoCache` fetches the manifest and the
config once per image (as upstream: an LRU of 50 images, one fetch at a time per
image) for two answers: whether the manifest carries the ``tarfs-hint`` annotation
(``tarfs_hint = true``) and each layer's diff id, which the uncompressed tar must hash
to. Without a manifest digest (``ctr-remote`` passes none) the reference's tag is
resolved, a platform index narrowed to this machine's platform.
"""

from __future__ import annotations

import platform
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pynydus import labels as L
from pynydus.errors import FormatError, NotFound
from pynydus.registry import RegistryClient, media, parse_reference, resolve_credentials
from pynydus.registry.keychain import Keychain
from pynydus.registry.reference import Reference

__all__ = ["ImageInfo", "ImageInfoCache", "LayerSource", "connect"]

# ctr-remote (stargz-snapshotter's) names the layer digest with its own label
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
_CACHE_SIZE = 50  # images, as upstream's LRU
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class LayerSource:
    """A layer's image reference, its digest and its manifest's digest ("" if unknown)."""

    ref: str
    layer_digest: str
    manifest_digest: str = ""

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> LayerSource | None:
        """The source the labels name, None when they lack the reference or the digest
        (a plain ``ctr images pull``: containerd unpacks such layers itself)."""
        ref = labels.get(L.CRI_IMAGE_REF) or labels.get(L.STARGZ_REFERENCE) or ""
        digest = labels.get(L.CRI_LAYER_DIGEST) or labels.get(STARGZ_DIGEST) or ""
        if not ref or not digest.startswith("sha256:") or len(digest) != 71:
            return None
        manifest = labels.get(L.CRI_MANIFEST_DIGEST, "")
        return cls(ref, digest, manifest if manifest.startswith("sha256:") else "")

    @property
    def blob_id(self) -> str:
        """The hex of the layer digest: the tar's name in the cache and its blob id."""
        return self.layer_digest.split(":", 1)[1]

    @property
    def reference(self) -> Reference:
        return parse_reference(self.ref)


@dataclass(frozen=True)
class ImageInfo:
    tarfs_hint: bool
    diff_ids: Mapping[str, str] = field(default_factory=dict)  # layer digest -> diff id


def connect(ref: Reference, labels: Mapping[str, str], *, insecure: bool,
            keychain: Keychain | None = None) -> RegistryClient:
    """A client for ``ref``'s registry with the credentials of the snapshotter's
    ``keychain`` (``[remote.auth]``'s sources in order; without one: labels, then the
    docker config). ``insecure`` (``remote.skip_ssl_verify``): any certificate, and plain
    HTTP where the host speaks it. A long read timeout: a layer streams as fast as the
    builder takes it."""
    if keychain is not None:
        found = keychain.lookup(str(ref), labels).found
        creds = found.credentials if found is not None else None
    else:
        creds = resolve_credentials(ref.domain, labels=labels)
    return RegistryClient.for_reference(ref, skip_verify=insecure, auth=creds, timeout=120.0,
                                        connect_timeout=10.0)


def _platform() -> dict[str, str]:
    machine = platform.machine()
    return {"os": "linux", "architecture": _ARCH.get(machine, machine)}


class ImageInfoCache:
    """Manifest-derived facts per image reference; thread-safe, one fetch per image."""

    def __init__(self, client: Callable[[Reference, Mapping[str, str]], RegistryClient]) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._infos: OrderedDict[str, ImageInfo] = OrderedDict()
        self._fetching: dict[str, threading.Lock] = {}

    def get(self, src: LayerSource, labels: Mapping[str, str]) -> ImageInfo:
        """The facts of ``src``'s image (fetched on first use; errors are not cached)."""
        key = f"{src.ref}@{src.manifest_digest}"
        with self._lock:
            info = self._infos.get(key)
            if info is not None:
                self._infos.move_to_end(key)
                return info
            gate = self._fetching.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                info = self._infos.get(key)
            if info is None:
                info = self._fetch(src, labels)
                with self._lock:
                    self._infos[key] = info
                    while len(self._infos) > _CACHE_SIZE:
                        self._infos.popitem(last=False)
        with self._lock:
            self._fetching.pop(key, None)
        return info

    def _fetch(self, src: LayerSource, labels: Mapping[str, str]) -> ImageInfo:
        from pynydus.convert.image import (
            Platform,
            attach_config,
            parse_index,
            parse_manifest,
            select_manifests,
        )

        ref = src.reference
        with self._client(ref, labels) as client:
            m = client.get_manifest(ref.repository, src.manifest_digest or ref.object)
            if m.media_type in media.INDEX_TYPES or '"manifests"' in m.data[:4096].decode(
                    "utf-8", "replace"):
                index = parse_index(m.data, f"index of {ref}")
                plat = _platform()
                desc = select_manifests(index, Platform(plat["os"], plat["architecture"]),
                                        False)[0]
                m = client.get_manifest(ref.repository, desc["digest"])
            img = parse_manifest(m.media_type, m.digest, m.data)
            annotations = img.manifest.get("annotations") or {}
            hint = isinstance(annotations, dict) and L.TARFS_HINT in annotations
            cfg = b"".join(client.get_blob(ref.repository, str(img.config["digest"])))
            attach_config(img, cfg)
        diff_ids = {lyr.digest: lyr.diff_id for lyr in img.layers}
        if src.layer_digest not in diff_ids:
            raise NotFound(f"layer {src.layer_digest} is not in manifest {img.digest} of {ref}")
        for d in diff_ids.values():
            if not d.startswith("sha256:"):
                raise FormatError(f"config of {ref}: diff id {d!r} is not sha256")
        return ImageInfo(hint, diff_ids)
