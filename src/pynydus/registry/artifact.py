"""OCI artifacts that refer to an image: pushed with a ``subject``, found by its referrers.

An artifact here is one small document (a prefetch list, say) in an OCI image manifest:
``artifactType``, the empty config, one layer with the document (also inline in the
layer descriptor's ``data`` when small, so a reader needs no blob request), and
``subject`` = the image manifest's descriptor. Pushing it leaves the image and its digest
as they are; the registry's referrers API indexes it, or, on a registry without that API,
``RegistryClient.put_manifest`` adds it to the subject's fallback-tag index.

``ReferrersFinder`` looks artifacts of one type up for a digest: one request per lookup
(the referrers API, or straight to the fallback tag once the registry is known not to
have the API), results kept for a while, so the nodes of a cluster ask once per image.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Mapping
from typing import Any

from pynydus.errors import NotFound

from . import media
from .client import Descriptor, RegistryClient
from .documents import check_descriptor, load_document
from .errors import RegistryProtocolError

# Documents up to this size ride inline in the manifest (``data``): found in two requests.
INLINE_MAX = 32 << 10
_EMPTY = b"{}"
CREATED = "org.opencontainers.image.created"


# The descriptor of the manifest an artifact refers to (its media type, digest and size).
Subject = Descriptor


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def artifact_manifest(subject: Subject, artifact_type: str, media_type: str, data: bytes,
                      annotations: Mapping[str, str] | None = None,
                      created: float | None = None) -> bytes:
    """The manifest of an artifact holding ``data`` (as a layer of ``media_type``)."""
    layer: dict[str, Any] = {"mediaType": media_type, "digest": _digest(data), "size": len(data)}
    if len(data) <= INLINE_MAX:
        layer["data"] = base64.b64encode(data).decode()
    notes = {CREATED: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                    time.gmtime(time.time() if created is None else created))}
    notes.update(annotations or {})
    doc = {
        "schemaVersion": 2,
        "mediaType": media.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": media.OCI_EMPTY, "digest": _digest(_EMPTY), "size": len(_EMPTY),
                   "data": base64.b64encode(_EMPTY).decode()},
        "layers": [layer],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest,
                    "size": subject.size},
        "annotations": notes,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def push_artifact(client: RegistryClient, repo: str, subject: Subject, artifact_type: str,
                  media_type: str, data: bytes,
                  annotations: Mapping[str, str] | None = None) -> str:
    """Push ``data`` as an artifact referring to ``subject`` in ``repo``; returns the
    artifact manifest's digest. The subject is not changed."""
    client.push_blob(repo, _EMPTY, _digest(_EMPTY))
    client.push_blob(repo, data, _digest(data))
    body = artifact_manifest(subject, artifact_type, media_type, data, annotations)
    return client.put_manifest(repo, _digest(body), media.OCI_MANIFEST, body)


def fetch_artifact(client: RegistryClient, repo: str, manifest_digest: str, media_type: str,
                   max_bytes: int) -> bytes:
    """The document of the artifact ``manifest_digest``: its first layer of
    ``media_type``, from the manifest's inline ``data`` or the blob."""
    what = f"artifact {manifest_digest} in {repo}"
    m = client.get_manifest(repo, manifest_digest, accept=(media.OCI_MANIFEST,))
    layers = load_document(m.data, what).get("layers", [])
    if not isinstance(layers, list):
        raise RegistryProtocolError(f"{what}: not an artifact manifest")
    layers = [entry for i, entry in enumerate(layers)
              if check_descriptor(entry, f"{what}: layers[{i}]").get("mediaType") == media_type]
    if not layers:
        raise NotFound(f"{what}: no layer of type {media_type}")
    layer = layers[0]
    size, digest = layer.get("size"), layer["digest"]
    if not isinstance(size, int) or size > max_bytes:
        raise RegistryProtocolError(f"{what}: layer size {size!r} missing or larger than "
                                    f"{max_bytes} bytes")
    inline = layer.get("data")
    if isinstance(inline, str):
        try:
            data = base64.b64decode(inline, validate=True)
        except ValueError as err:
            raise RegistryProtocolError(f"{what}: inline data is not base64") from err
        if _digest(data) == digest:
            return data
    return b"".join(client.get_blob(repo, digest))


class ReferrersFinder:
    """Artifacts of one type referring to a digest, newest first. Thread-safe.

    Remembers per registry host whether it has the referrers API (so a lookup is one
    request), and each answer for ``ttl`` seconds (``miss_ttl`` when none was found)."""

    def __init__(self, ttl: float = 600.0, miss_ttl: float = 60.0,
                 clock: Any = time.monotonic) -> None:
        self.ttl = ttl
        self.miss_ttl = miss_ttl
        self._clock = clock
        self._has_api: dict[str, bool] = {}
        self._found: dict[tuple[str, str, str, str], tuple[float, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def find(self, client: RegistryClient, host: str, repo: str, digest: str,
             artifact_type: str) -> list[dict[str, Any]]:
        key = (host, repo, digest, artifact_type)
        now = self._clock()
        with self._lock:
            hit = self._found.get(key)
            has_api = self._has_api.get(host)
        if hit is not None and hit[0] > now:
            return hit[1]
        doc = None
        if has_api is not False:
            doc = client.referrers_api(repo, digest, artifact_type)
            with self._lock:
                self._has_api[host] = doc is not None
        if doc is None:
            doc = client.referrers_fallback(repo, digest, artifact_type)
        found = [m for m in doc.get("manifests", [])
                 if isinstance(m, dict) and m.get("artifactType") == artifact_type
                 and isinstance(m.get("digest"), str)]
        found.sort(key=lambda m: str((m.get("annotations") or {}).get(CREATED, "")), reverse=True)
        with self._lock:
            self._found[key] = (now + (self.ttl if found else self.miss_ttl), found)
            if len(self._found) > 4096:  # bounded: forget the oldest answers
                for k in list(self._found)[:1024]:
                    del self._found[k]
        return found
