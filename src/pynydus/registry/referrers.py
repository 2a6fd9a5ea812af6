"""OCI referrers (distribution spec 1.1), sans-I/O.

A registry with the referrers API answers ``GET /v2/<repo>/referrers/<digest>`` with
an image index of the manifests whose ``subject`` is that digest. Older registries
(Debian's distribution 2.8 among them) do not; clients then keep the same index
themselves under the *fallback tag* ``<alg>-<hex>`` of the subject. A pushing client
knows the registry handled the subject when the PUT answer carries ``OCI-Subject``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .media import OCI_INDEX


def fallback_tag(digest: str) -> str:
    """The referrers fallback tag of a subject digest: ``sha256:ab…`` → ``sha256-ab…``."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}-{hexpart}"[:128]


def empty_index() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


def referrer_descriptor(manifest: bytes, media_type: str, digest: str) -> dict[str, Any]:
    """The index entry for a manifest that names a subject: its descriptor plus
    ``artifactType`` (the manifest's, else its config media type) and annotations."""
    doc = json.loads(manifest)
    desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(manifest)}
    art = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
    if art:
        desc["artifactType"] = art
    if doc.get("annotations"):
        desc["annotations"] = doc["annotations"]
    return desc


def subject_of(manifest: bytes) -> str | None:
    """The ``subject.digest`` of a manifest, or None (also for non-JSON bodies)."""
    try:
        doc = json.loads(manifest)
    except ValueError:
        return None
    subj = doc.get("subject") if isinstance(doc, dict) else None
    if isinstance(subj, Mapping) and isinstance(subj.get("digest"), str):
        return str(subj["digest"])
    return None


def add_referrer(index: dict[str, Any], desc: Mapping[str, Any]) -> dict[str, Any]:
    """``index`` with ``desc`` appended unless an entry with its digest is there."""
    entries = [m for m in index.get("manifests", []) if m.get("digest") != desc["digest"]]
    entries.append(dict(desc))
    return {**index, "manifests": entries}


def filter_artifact_type(index: dict[str, Any], artifact_type: str | None) -> dict[str, Any]:
    if not artifact_type:
        return index
    return {**index, "manifests": [m for m in index.get("manifests", [])
                                   if m.get("artifactType") == artifact_type]}
