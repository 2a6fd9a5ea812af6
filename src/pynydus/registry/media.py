"""Media types the registry client asks for and writes (OCI, Docker, Nydus)."""

from __future__ import annotations

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

# Nydus image layout (reference/rafs-nydusd-spec.md §3.6).
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
NYDUS_MANIFEST_ARTIFACT = "application/vnd.nydus.image.manifest.v1+json"
NYDUS_CONFIG = "application/vnd.nydus.image.config.v1+json"

# What get_manifest accepts by default: single-platform manifests and indexes, in
# the order a registry should prefer them.
DEFAULT_MANIFEST_ACCEPT: tuple[str, ...] = (
    OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
