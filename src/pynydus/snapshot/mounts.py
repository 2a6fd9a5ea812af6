"""Mount specs the snapshotter returns to containerd (sans-I/O).

containerd performs these mounts itself (or through a helper for ``fuse.*``
types); the snapshotter only describes them. Native mounts are those of
containerd's overlayfs snapshotter, option for option, so an OCI image behaves
the same through either snapshotter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pynydus.snapshot.metastore import Kind


@dataclass(frozen=True)
class Mount:
    """containerd.types.Mount: what to pass to mount(2) (or a ``mount.<type>`` helper)."""

    type: str
    source: str
    options: tuple[str, ...]


def native_mounts(
    kind: Kind,
    upper: str,
    work: str,
    parent_uppers: Sequence[str],
    *,
    volatile: bool = False,
    extra_options: Sequence[str] = (),
) -> list[Mount]:
    """Mounts for a snapshot whose layers all live as plain directories.

    ``parent_uppers`` are the ``fs`` dirs of the ancestors, nearest parent first.

    - no parents: a bind mount of the snapshot's own ``fs``, ``rw`` for active,
      ``ro`` for a view;
    - a view with one parent: a read-only bind of the parent's ``fs`` (no overlay
      needed, and it is cheaper);
    - otherwise overlay: first ``extra_options`` (containerd puts ``index=off`` there
      where the kernel has the parameter), then for active ``workdir``/``upperdir``
      (and ``volatile`` when asked), then ``lowerdir`` newest first.
    """
    if not parent_uppers:
        ro = "ro" if kind == Kind.VIEW else "rw"
        return [Mount("bind", upper, (ro, "rbind"))]
    if kind != Kind.ACTIVE and len(parent_uppers) == 1:
        return [Mount("bind", parent_uppers[0], ("ro", "rbind"))]
    options: list[str] = list(extra_options)
    if kind == Kind.ACTIVE:
        options += [f"workdir={work}", f"upperdir={upper}"]
        if volatile:
            options.append("volatile")
    options.append("lowerdir=" + ":".join(parent_uppers))
    return [Mount("overlay", "overlay", tuple(options))]


def remote_mounts(
    kind: Kind,
    upper: str,
    work: str,
    lowers: Sequence[str],
    *,
    volatile: bool = False,
    helper_type: str = "",
    extra: str | None = None,
) -> list[Mount]:
    """Overlay over a RAFS mountpoint (``lowers`` newest first, the RAFS mount among them).

    Options in upstream's order: [volatile], then for active workdir and upperdir,
    then lowerdir. With ``helper_type`` (e.g. ``fuse.nydus-overlayfs``) the mount
    goes through that helper with ``extraoption=<base64 JSON>`` appended, which
    the helper strips before calling overlay.
    """
    options: list[str] = ["volatile"] if volatile and kind == Kind.ACTIVE else []
    if kind == Kind.ACTIVE:
        options += [f"workdir={work}", f"upperdir={upper}"]
    options.append("lowerdir=" + ":".join(lowers))
    if helper_type:
        if extra:
            options.append(f"extraoption={extra}")
        return [Mount(helper_type, "overlay", tuple(options))]
    return [Mount("overlay", "overlay", tuple(options))]
