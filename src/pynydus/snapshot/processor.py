"""The label decision table: what Prepare does with a layer (sans-I/O).

upstream's ``chooseProcessor`` (snapshotter-features.md §1.3) decides, from the
labels of the new snapshot and of its ancestors, whether a layer is

- ``DEFAULT``: a plain directory containerd unpacks into (native mounts),
- ``SKIP``: committed at once and answered AlreadyExists, so containerd never
  downloads it (a Nydus data blob, fetched lazily later),
- ``REMOTE``: mounted through the RAFS filesystem of the ancestor ``remote_id``,
- ``PROXY``: left to another agent (Kata guest pull).

Rows whose feature is off in ``Features`` are skipped, so with no remote
filesystem configured every layer is DEFAULT and the snapshotter is exactly
containerd's overlayfs snapshotter. Rows not implemented yet (index/referrer
detection, stargz, tarfs) are named in comments where they go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from pynydus import labels as L


class Handler(Enum):
    DEFAULT = "default"
    SKIP = "skip"
    REMOTE = "remote"
    PROXY = "proxy"


@dataclass(frozen=True)
class Layer:
    """An existing snapshot as the table sees it: its id and labels."""

    id: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Features:
    """Which rows of the table are live."""

    nydus: bool = False  # a RAFS filesystem (daemon manager) is attached
    proxy_driver: bool = False  # fs_driver = proxy


@dataclass(frozen=True)
class Decision:
    handler: Handler
    remote_id: str | None = None  # REMOTE: the snapshot whose RAFS instance serves the mount
    add_labels: Mapping[str, str] = field(default_factory=dict)  # persisted on commit


DEFAULT = Decision(Handler.DEFAULT)


def choose(
    labels: Mapping[str, str],
    ancestors: Sequence[Layer],
    features: Features,
) -> Decision:
    """Decide how to prepare a snapshot with ``labels`` over ``ancestors`` (nearest first).

    Raises nothing for unknown labels: an unrecognised layer is DEFAULT.
    """
    if L.TARGET_SNAPSHOT_REF in labels:
        return _choose_pulled_layer(labels, features)
    return _choose_container_layer(ancestors, features)


def _choose_pulled_layer(labels: Mapping[str, str], features: Features) -> Decision:
    # A1: proxy driver skips every layer the CRI describes.
    if features.proxy_driver and L.CRI_LAYER_DIGEST in labels:
        return Decision(Handler.SKIP, add_labels={L.NYDUS_PROXY_MODE: "true"})
    if features.nydus:
        # A2: the bootstrap layer is small; containerd unpacks it like any layer.
        if L.is_nydus_meta_layer(labels):
            return DEFAULT
        # A3: data blobs are never downloaded; the daemon fetches chunks lazily.
        if L.is_nydus_data_layer(labels):
            return Decision(Handler.SKIP)
    # A4 index detection, A5 referrer detection, A6 stargz, A7 tarfs: later issues.
    return DEFAULT  # A8


def _choose_container_layer(ancestors: Sequence[Layer], features: Features) -> Decision:
    parent = ancestors[0] if ancestors else None
    # B2 (wins over B1): a proxy-mode parent is served remotely.
    if parent is not None and L.NYDUS_PROXY_MODE in parent.labels:
        return Decision(Handler.REMOTE, remote_id=parent.id)
    if features.proxy_driver:
        return Decision(Handler.PROXY)  # B1
    if features.nydus:
        # B3: the image's bootstrap layer is somewhere in the chain.
        for layer in ancestors:
            if L.is_nydus_meta_layer(layer.labels):
                return Decision(Handler.REMOTE, remote_id=layer.id)
    # B4 index, B5 referrer, B6 stargz, B7 tarfs: later issues.
    return DEFAULT  # B8
