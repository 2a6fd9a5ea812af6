"""Which RAFS version a bootstrap is, by its magic: v5 at offset 0, v6 (EROFS) at 1024."""

from __future__ import annotations

from pynydus.rafs.format.layout import EROFS_SUPER_MAGIC_V1, EROFS_SUPER_OFFSET, ReadableBuffer
from pynydus.rafs.format.layout_v5 import RAFS_V5_SUPER_MAGIC

__all__ = ["VERSION_HEAD_SIZE", "bootstrap_version"]

#: how much of the start of a bootstrap :func:`bootstrap_version` reads (v6's magic ends there)
VERSION_HEAD_SIZE = EROFS_SUPER_OFFSET + 4


def bootstrap_version(head: ReadableBuffer) -> int | None:
    """5 or 6 by the magic at the start of a bootstrap (``head``: its first
    ``VERSION_HEAD_SIZE`` bytes or more, fewer when the file is shorter), None when it
    has neither."""
    if len(head) >= 4 and int.from_bytes(head[0:4], "little") == RAFS_V5_SUPER_MAGIC:
        return 5
    if len(head) >= VERSION_HEAD_SIZE and (
        int.from_bytes(head[EROFS_SUPER_OFFSET : EROFS_SUPER_OFFSET + 4], "little")
        == EROFS_SUPER_MAGIC_V1
    ):
        return 6
    return None
