"""How a layer says "delete this" and "this link points below me": the names and marks.

A layer hides what the layers below it have in one of two forms:

* OCI names, as a layer tar carries them: ``.wh.NAME`` removes NAME, ``.wh..wh..opq``
  in a directory hides everything the layers below put in it;
* overlayfs form, as our builder writes a layer by default (so a mounted layer can sit
  under overlayfs as-is): a char device 0/0 named NAME removes NAME, the xattr
  ``trusted.overlay.opaque=y`` on a directory hides the lower directory's content.

:data:`LOWER_HARDLINK_XATTR` is ours: a hardlink whose target is in a lower layer
(a layer alone cannot hold it) is stored as an empty regular file carrying the
target's path, and bound to the lower target when the layer is merged onto its
lower layers (docs/decisions.md, "RAFS builder").
"""

from __future__ import annotations

import stat

__all__ = [
    "LOWER_HARDLINK_XATTR",
    "OCI_WHITEOUT_OPAQUE",
    "OCI_WHITEOUT_PREFIX",
    "OVERLAY_OPAQUE_XATTR",
    "is_overlay_whiteout",
]

OCI_WHITEOUT_PREFIX = b".wh."
OCI_WHITEOUT_OPAQUE = b".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = b"trusted.overlay.opaque"
# Marks a hardlink whose target is in a lower layer; the value is the target's path.
LOWER_HARDLINK_XATTR = b"trusted.pynydus.lower-hardlink"


def is_overlay_whiteout(mode: int, rdev: int) -> bool:
    """True for overlayfs' whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(mode) and rdev == 0
