"""Finding the Nydus form of an OCI image: referrer and index detection.

A pod keeps its OCI reference; when the image has a Nydus form beside it, the
snapshotter serves the image lazily from that form instead of unpacking the OCI
layers (upstream's ``experimental.enable_referrer_detect`` / ``enable_index_detect``):

* **index** (``pynydus convert --merge-platform``, nydusify's ``--merge-platform``): the
  image reference names an OCI index that holds, beside the OCI manifest containerd
  pulls (``cri.manifest-digest``), a Nydus manifest for the same platform (marked by
  the ``nydus.remoteimage.v1`` OS feature or the Nydus artifact type);
* **referrer** (``--with-referrer``): a Nydus manifest whose ``subject`` is the OCI
  manifest, listed by the OCI referrers API (``/v2/<name>/referrers/<digest>``), or by
  the referrers tag scheme (``sha256-<hex>``) when the registry has no such API; an
  entry with the Nydus artifact type is taken as is, else the first image manifest is
  read and taken if its last layer is a Nydus bootstrap (upstream's test).

Each pulled layer of the image asks :meth:`Detector.find`; the registry is asked once per
(image reference, manifest digest): one round trip for the index (the reference's own
manifest), one for the referrers (two when the registry lacks the API and the tag
scheme is tried), answers cached, negative ones for :data:`NEGATIVE_TTL` seconds. A
registry that fails or is slow is "no Nydus form" (logged), after
:data:`DETECT_TIMEOUT` seconds at most, so a plain OCI pull goes on. Lookups of one
registry with the same credentials share a client (:func:`client_factory`), hence its
tokens: with token auth an image's requests, and the bootstrap's, cost one token.

:meth:`Detector.fetch_bootstrap` then fetches the Nydus manifest and its bootstrap
layer (serving, not discovery: done once, for the image's last layer).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from pynydus import labels as L
from pynydus.convert.image import nydus_in_index, read_bootstrap_descriptor
from pynydus.convert.pack import bootstrap_from_layer
from pynydus.errors import FormatError, NydusError, q
from pynydus.registry import (
    Credentials,
    RegistryClient,
    media,
    parse_reference,
    resolve_credentials,
)

__all__ = ["DETECT_TIMEOUT", "NEGATIVE_TTL", "CredentialsFn", "Detector", "NydusForm",
           "client_factory", "label_credentials"]

log = logging.getLogger(__name__)

#: Seconds a detection request may take before the image counts as plain OCI.
DETECT_TIMEOUT = 2.0
#: Seconds a "no Nydus form" answer is kept (an image converted later is found after it).
NEGATIVE_TTL = 600.0
_CACHE_SIZE = 1024
#: Registry clients kept between lookups (per registry and credentials).
_CLIENTS_KEPT = 16
_MANIFEST_TYPES = (media.OCI_MANIFEST, media.DOCKER_MANIFEST)


@dataclass(frozen=True)
class NydusForm:
    """The Nydus manifest found for an OCI image: how, and where."""

    how: str  # "referrer" or "index"
    repo: str  # repository of the image (the Nydus manifest and blobs are there too)
    digest: str  # the Nydus manifest's digest
    # its bootstrap layer's descriptor, when discovery had to read the manifest
    boot: Mapping[str, Any] | None = None

    @property
    def label(self) -> str:
        """Value of the ``nydus-detected`` label of the image's skipped OCI layers."""
        return f"{self.how} {self.digest}"


#: ``(image reference, labels) -> client`` for one lookup, as a context manager.
ClientFactory = Callable[[str, Mapping[str, str]], AbstractContextManager[RegistryClient]]
#: The credentials for an image reference and its snapshot labels (the snapshotter's
#: keychain), or None: anonymous.
CredentialsFn = Callable[[str, Mapping[str, str]], Credentials | None]


def label_credentials(image_ref: str, labels: Mapping[str, str]) -> Credentials | None:
    """Credentials from the labels, else the docker config (no keychain at hand)."""
    return resolve_credentials(parse_reference(image_ref).api_host, labels=labels)


def client_factory(creds: CredentialsFn = label_credentials,
                   timeout: float = DETECT_TIMEOUT, retries: int = 0) -> ClientFactory:
    """Registry clients for lookups, one per (registry, credentials) kept for the next
    lookups: a client keeps its bearer tokens and the registry's challenge, so the
    index, referrers and bootstrap requests of an image, and later images of the same
    registry, do not each pay a 401 and a token request. The last
    :data:`_CLIENTS_KEPT` are kept (a node pulls from a few registries)."""
    clients: OrderedDict[tuple[str, str, Credentials | None], RegistryClient] = OrderedDict()
    lock = threading.Lock()

    def make(image_ref: str, labels: Mapping[str, str]) -> AbstractContextManager[RegistryClient]:
        ref = parse_reference(image_ref)
        auth = creds(image_ref, labels)
        key = (ref.api_host, ref.default_scheme, auth)
        with lock:
            client = clients.get(key)
            if client is None:
                client = clients[key] = RegistryClient.for_reference(
                    ref, auth=auth, timeout=timeout, connect_timeout=timeout,
                    retry_limit=retries, token_renewal=False)
                while len(clients) > _CLIENTS_KEPT:
                    clients.popitem(last=False)[1].close()
            clients.move_to_end(key)
        return nullcontext(client)  # the lookup must not close a kept client
    return make


class Detector:
    """Referrer and/or index detection with a cache; thread-safe."""

    def __init__(self, *, referrer: bool, index: bool,
                 client_factory: ClientFactory | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.referrer = referrer
        self.index = index
        self._client = client_factory or client_factory_default()
        self._clock = clock
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        # (image ref, manifest digest) -> (form or None, expiry or None)
        self._cache: OrderedDict[tuple[str, str], tuple[NydusForm | None, float | None]] = \
            OrderedDict()
        self.lookups = 0  # registry lookups made (cache misses), for tests and metrics

    @property
    def enabled(self) -> bool:
        return self.referrer or self.index

    # ------------------------------------------------------------------ discovery
    def find(self, labels: Mapping[str, str]) -> NydusForm | None:
        """The Nydus form of the image a pulled layer with ``labels`` belongs to, or None
        (not an image containerd named through the CRI labels, or no Nydus form)."""
        image_ref = labels.get(L.CRI_IMAGE_REF, "")
        manifest = labels.get(L.CRI_MANIFEST_DIGEST, "")
        if not self.enabled or not image_ref or not manifest.startswith("sha256:"):
            return None
        key = (image_ref, manifest)
        hit = self._cached(key)
        if hit is not None:
            return hit[0]
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # the image's other layers wait for this one lookup
            hit = self._cached(key)
            if hit is not None:
                return hit[0]
            form = self._lookup(image_ref, manifest, labels)
            with self._lock:
                self.lookups += 1
                self._cache[key] = (form, None if form else self._clock() + NEGATIVE_TTL)
                self._cache.move_to_end(key)
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
                self._key_locks.pop(key, None)
            return form

    def _cached(self, key: tuple[str, str]) -> tuple[NydusForm | None] | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return None
            form, expiry = entry
            if expiry is not None and expiry < self._clock():
                del self._cache[key]
                return None
            return (form,)

    def _lookup(self, image_ref: str, manifest: str,
                labels: Mapping[str, str]) -> NydusForm | None:
        t0 = time.monotonic()
        try:
            ref = parse_reference(image_ref)
            with self._client(image_ref, labels) as client:
                form = None
                if self.index:
                    form = self._by_index(client, ref.repository, ref.object, manifest)
                if form is None and self.referrer:
                    form = self._by_referrer(client, ref.repository, manifest)
        except (NydusError, OSError, ValueError) as err:
            log.warning("detection of a Nydus form of %s (%s) failed, pulling it as OCI: %s",
                        image_ref, manifest, err)
            return None
        took = (time.monotonic() - t0) * 1000
        if form is not None:
            log.info("image %s (%s): Nydus form found by %s: %s (%.0f ms)", image_ref,
                     manifest, form.how, form.digest, took)
        else:
            log.debug("image %s (%s): no Nydus form (%.0f ms)", image_ref, manifest, took)
        return form

    @staticmethod
    def _by_index(client: RegistryClient, repo: str, obj: str,
                  manifest: str) -> NydusForm | None:
        if obj == manifest:
            return None  # pinned to the manifest itself: there is no index to look in
        top = client.get_manifest(repo, obj)
        if top.media_type not in media.INDEX_TYPES:
            return None
        digest = nydus_in_index(top.data, manifest, f"index {q(obj)} of {q(repo)}")
        return NydusForm("index", repo, digest) if digest else None

    @staticmethod
    def _by_referrer(client: RegistryClient, repo: str, manifest: str) -> NydusForm | None:
        """A referrer marked as Nydus (artifact type) is taken as is; else, as upstream
        does, the first image manifest among the referrers is read and is the Nydus form
        if its last layer is a Nydus bootstrap (``convert --with-referrer`` keeps the
        image config's media type, which is what the referrers list shows)."""
        doc = client.get_referrers(repo, manifest)
        entries = [d for d in doc.get("manifests") or []
                   if d.get("mediaType", media.OCI_MANIFEST) in _MANIFEST_TYPES]
        for d in entries:
            if d.get("artifactType") == media.NYDUS_MANIFEST_ARTIFACT:
                return NydusForm("referrer", repo, str(d["digest"]))
        for d in entries[:1]:
            boot = _bootstrap_layer(client, repo, str(d["digest"]))
            if boot is not None:
                return NydusForm("referrer", repo, str(d["digest"]), boot)
        return None

    # ------------------------------------------------------------------ serving
    def fetch_bootstrap(self, form: NydusForm, labels: Mapping[str, str],
                        dest_dir: str) -> dict[str, str]:
        """Write the Nydus form's bootstrap to ``dest_dir/image/image.boot``; returns the
        labels the image's bootstrap layer takes (the Nydus bootstrap layer's
        ``containerd.io/snapshot/nydus-*`` annotations: signature, fs version)."""
        image_ref = labels[L.CRI_IMAGE_REF]
        with self._client(image_ref, labels) as client:
            boot = form.boot or _bootstrap_layer(client, form.repo, form.digest)
            if boot is None:
                raise FormatError(f"Nydus manifest {form.digest} of {q(image_ref)}: its last "
                                  "layer is not a Nydus bootstrap")
            data = b"".join(client.get_blob(form.repo, str(boot["digest"])))
        image = bootstrap_from_layer(data)
        os.makedirs(os.path.join(dest_dir, "image"), mode=0o755, exist_ok=True)
        path = os.path.join(dest_dir, "image", "image.boot")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(image)
        os.replace(tmp, path)
        return {k: str(v) for k, v in (boot.get("annotations") or {}).items()
                if k.startswith("containerd.io/snapshot/nydus-")}


def _bootstrap_layer(client: RegistryClient, repo: str, digest: str) -> Mapping[str, Any] | None:
    """The last layer of manifest ``digest`` if it is a Nydus bootstrap layer, else None."""
    return read_bootstrap_descriptor(client.get_manifest(repo, digest, accept=_MANIFEST_TYPES).data,
                           f"manifest {digest} of {q(repo)}")


def client_factory_default() -> ClientFactory:
    return client_factory()


def is_last_layer(labels: Mapping[str, str]) -> bool:
    """The pulled layer is the image's top layer: containerd lists in ``cri.image-layers``
    the layer's digest and those above it (cut at the end when too long)."""
    layers = [x for x in labels.get(L.CRI_IMAGE_LAYERS, "").split(",") if x]
    return layers == [labels.get(L.CRI_LAYER_DIGEST, "")]
