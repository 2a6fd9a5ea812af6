"""The label decision table: what Prepare does with a layer (sans-I/O).

upstream's ``chooseProcessor`` (snapshotter-features.md §1.3) decides, from the
labels of the new snapshot and of its ancestors, whether a layer is

- ``DEFAULT``: a plain directory containerd unpacks into (native mounts),
- ``SKIP``: committed at once and answered AlreadyExists, so containerd never
  downloads it (a Nydus data blob, fetched lazily later),
- ``REMOTE``: mounted through the RAFS filesystem of the image's bootstrap layer,
- ``TARFS``: a plain OCI layer the tarfs driver takes: committed at once (SKIP) while
  it converts in the background; DEFAULT if the driver declines it (row A7).

``bootstrap_layer`` is the one answer to "which ancestor is the image's Nydus
bootstrap": Prepare (through ``choose``), View and Mounts all ask it. Row B7 (a
container over tarfs layers) needs no answer here: its mounts are the DEFAULT ones,
with each tarfs layer's EROFS mount in place of its directory (``pynydus.tarfs``).

With no remote filesystem configured (``Features`` all false) every layer is DEFAULT
and the snapshotter is exactly containerd's overlayfs snapshotter.
upstream's proxy rows (``fs_driver = "proxy"``: skip every CRI layer and mark it
``nydus-proxy-mode``; a container layer over such a parent handed to the guest) are
not here: that driver is refused at start-up (``docs/decisions.md``). Rows not
implemented (stargz) are named where they would go; index and referrer detection (A4, A5)
need the registry and are decided by the snapshotter for a DEFAULT answer (`detect.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from pynydus import labels as L


class Handler(Enum):
    DEFAULT = "default"
    SKIP = "skip"
    REMOTE = "remote"
    TARFS = "tarfs"


@dataclass(frozen=True)
class Layer:
    """An existing snapshot as the table sees it: its id and labels."""

    id: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Features:
    """Which rows of the table are live."""

    nydus: bool = False  # a RAFS filesystem (daemon manager) is attached
    tarfs: bool = False  # plain OCI layers go to the tarfs driver (experimental.tarfs)

    @property
    def any(self) -> bool:
        return self.nydus or self.tarfs


@dataclass(frozen=True)
class Decision:
    handler: Handler
    # REMOTE: the bootstrap layer whose RAFS instance serves the mount, with its labels
    remote: Layer | None = None


DEFAULT = Decision(Handler.DEFAULT)
SKIP = Decision(Handler.SKIP)
TARFS = Decision(Handler.TARFS)


def bootstrap_layer(ancestors: Sequence[Layer]) -> Layer | None:
    """The nearest of ``ancestors`` (nearest first) that carries the image's RAFS
    bootstrap, or None for an image that is not a Nydus image."""
    for layer in ancestors:
        if L.is_nydus_meta_layer(layer.labels):
            return layer
    return None


def choose(
    labels: Mapping[str, str],
    ancestors: Sequence[Layer],
    features: Features,
) -> Decision:
    """Decide how to prepare a snapshot with ``labels`` over ``ancestors`` (nearest first).

    Raises nothing for unknown labels: an unrecognised layer is DEFAULT.
    """
    if not features.any:
        return DEFAULT
    if L.TARGET_SNAPSHOT_REF in labels:
        return _choose_pulled_layer(labels, features)
    return _choose_container_layer(ancestors)


def _choose_pulled_layer(labels: Mapping[str, str], features: Features) -> Decision:
    # A2: the bootstrap layer is small; containerd unpacks it like any layer.
    if L.is_nydus_meta_layer(labels):
        return DEFAULT
    # A3: data blobs are never downloaded; the daemon fetches chunks lazily.
    if L.is_nydus_data_layer(labels):
        return SKIP
    # A4 index, A5 referrer detection: Snapshotter._detected, on this DEFAULT. A6 stargz: no.
    if features.tarfs:
        return TARFS  # A7
    return DEFAULT  # A8


def _choose_container_layer(ancestors: Sequence[Layer]) -> Decision:
    # B3: the image's bootstrap layer is somewhere in the chain.
    meta = bootstrap_layer(ancestors)
    if meta is not None:
        return Decision(Handler.REMOTE, remote=meta)
    # B4 index, B5 referrer: their top layer has the bootstrap label (B3). B6 stargz: no.
    # B7 (tarfs parents) is DEFAULT with their EROFS mounts as lower dirs.
    return DEFAULT  # B8
