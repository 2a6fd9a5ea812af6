"""Snapshot label keys and predicates, with containerd's and upstream Nydus's meanings.

Label keys are named here once; code elsewhere never spells them as literals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pynydus.errors import InvalidArgument

# --- set by containerd ------------------------------------------------------------
TARGET_SNAPSHOT_REF = "containerd.io/snapshot.ref"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
UID_MAPPING = "containerd.io/snapshot/uidmapping"
GID_MAPPING = "containerd.io/snapshot/gidmapping"
OVERLAY_VOLATILE = "containerd.io/snapshot/overlay.volatile"
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
GC_ROOT = "containerd.io/gc.root"

# --- set by image builders (nydusify / pynydus convert) as layer annotations --------
NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
NYDUS_REF = "containerd.io/snapshot/nydus-ref"
NYDUS_SIGNATURE = "containerd.io/snapshot/nydus-signature"
NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
NYDUS_BLOB_DIGEST = "containerd.io/snapshot/nydus-blob-digest"
NYDUS_BLOB_SIZE = "containerd.io/snapshot/nydus-blob-size"
NYDUS_SOURCE_CHAINID = "containerd.io/snapshot/nydus-source-chainid"
TARFS_HINT = "containerd.io/snapshot/tarfs-hint"

# --- set by the snapshotter itself ----------------------------------------------
NYDUS_PROXY_MODE = "containerd.io/snapshot/nydus-proxy-mode"
STARGZ_LAYER = "containerd.io/snapshot/stargz"
NYDUS_TARFS = "containerd.io/snapshot/nydus-tarfs"
NYDUS_IMAGE_BLOCK = "containerd.io/snapshot/nydus-image-block"
NYDUS_LAYER_BLOCK = "containerd.io/snapshot/nydus-layer-block"
NYDUS_INDEX_ALTERNATIVE = "containerd.io/snapshot/nydus-index-alternative"
# an OCI layer not downloaded because the image has a Nydus form: "referrer|index <digest>"
NYDUS_DETECTED = "containerd.io/snapshot/nydus-detected"
# the layer was unpacked as OCI by the snapshotter because lazy serving failed: the cause
NYDUS_FALLBACK = "containerd.io/snapshot/nydus-oci-fallback"

# --- credentials via labels ----------------------------------------------------
PULL_USERNAME = "containerd.io/snapshot/pullusername"
PULL_SECRET = "containerd.io/snapshot/pullsecret"

# containerd's label limit: key and value together at most 4096 bytes.
MAX_LABEL_SIZE = 4096
# how much of an oversized key an error message quotes
_KEY_QUOTE_LEN = 64


def validate(labels: Mapping[str, str]) -> None:
    """Reject labels containerd itself would reject (InvalidArgument)."""
    for key, value in labels.items():
        total = len(key.encode()) + len(value.encode())
        if total > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label key and value length ({total} bytes) greater than maximum size "
                f"({MAX_LABEL_SIZE} bytes), key: {key[:_KEY_QUOTE_LEN]}"
            )
        if not key:
            raise InvalidArgument("label key must not be empty")


def is_nydus_meta_layer(labels: Mapping[str, str]) -> bool:
    """The layer carries the image's RAFS bootstrap (presence of the key is what counts)."""
    return NYDUS_BOOTSTRAP in labels


def bootstrap_descriptor(manifest: object) -> Mapping[str, Any] | None:
    """The layer descriptor of an image manifest that carries its RAFS bootstrap: the last
    layer, when its annotations mark it so (upstream's test of a Nydus manifest); None for
    any other manifest, or a document that is not one."""
    layers = manifest.get("layers") if isinstance(manifest, Mapping) else None
    if not layers or not isinstance(layers, list) or not isinstance(layers[-1], Mapping):
        return None
    annotations = layers[-1].get("annotations")
    return layers[-1] if isinstance(annotations, Mapping) and is_nydus_meta_layer(annotations) \
        else None


def is_nydus_data_layer(labels: Mapping[str, str]) -> bool:
    """The layer is a Nydus data blob, fetched lazily by the daemon, never unpacked."""
    return NYDUS_BLOB in labels


def is_volatile(labels: Mapping[str, str]) -> bool:
    return OVERLAY_VOLATILE in labels
