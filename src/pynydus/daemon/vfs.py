"""Which image, and which inode in it, a FUSE node id means.

Node ids are a pure function of (slot, image inode), never handed out from a counter,
so a successor daemon that knows the slot table computes the very numbers the kernel
holds (dentries, open files, page cache) without having seen a single LOOKUP: that is
what lets a daemon be replaced under a live mount (docs/failover.md).

Dedicated mode (one image at the root, ``--bootstrap``): the node id is the image's own
inode number (nid for v6), except that FUSE's root id 1 and the image root's nid swap
places. Shared mode: a pseudo root (id 1) whose subdirectories are images mounted
through the API; an image's node ids carry its slot (1..255) in the top 8 bits, as
nydusd's fuse-backend-rs Vfs does.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pynydus.daemon.instance import RafsInstance
from pynydus.errors import AlreadyExists, FailedPrecondition, NotFound

ROOT_ID = 1
SLOT_SHIFT = 56
NID_MASK = (1 << SLOT_SHIFT) - 1
MAX_SLOTS = 255

# (slot, instance, nid) of a FUSE node id; None is the shared-mode pseudo root
Resolved = tuple[int, RafsInstance, int] | None


class Vfs:
    """The slot table: name -> (slot, image) in shared mode, or the one dedicated image."""

    def __init__(self) -> None:
        self.dedicated: RafsInstance | None = None
        self.slots: dict[int, tuple[bytes, RafsInstance]] = {}
        # Slots are handed out round-robin (as fuse-backend-rs does for nydusd), not
        # lowest-free: the kernel keeps inodes (attributes cached "forever", page cache
        # kept) of an unmounted image while anything holds them open, and an image
        # mounted right away in the same slot would be answered from them.
        self.next_slot = 1
        # when the slot table last changed: the shared-mode root's mtime, which tells the
        # kernel that its cached listing of the root is stale
        self.changed_ns = time.time_ns()
        self._lock = threading.Lock()

    # dedicated mode: swap the image root and nid 1
    @staticmethod
    def _ded_to_fuse(inst: RafsInstance, nid: int) -> int:
        root = inst.bs.root_ino
        return ROOT_ID if nid == root else (root if nid == ROOT_ID else nid)

    def to_fuse(self, slot: int, inst: RafsInstance, nid: int) -> int:
        if slot == 0:
            return self._ded_to_fuse(inst, nid)
        return (slot << SLOT_SHIFT) | nid

    def to_fuse_all(self, slot: int, inst: RafsInstance, nids: list[int]) -> list[int]:
        """``to_fuse`` of each of ``nids`` (a directory listing's)."""
        if slot:
            base = slot << SLOT_SHIFT
            return [base | nid for nid in nids]
        root = inst.bs.root_ino
        return [ROOT_ID if nid == root else (root if nid == ROOT_ID else nid) for nid in nids]

    def resolve(self, ino: int) -> tuple[int, RafsInstance, int] | None:
        """(slot, instance, nid) of a FUSE inode; None for the shared-mode pseudo root."""
        if self.dedicated is not None:
            return 0, self.dedicated, self._ded_to_fuse(self.dedicated, ino)
        if ino == ROOT_ID:
            return None
        slot = ino >> SLOT_SHIFT
        entry = self.slots.get(slot)
        if entry is None:
            raise NotFound(f"inode {ino}: no image in slot {slot}")
        return slot, entry[1], ino & NID_MASK

    def add(self, name: bytes, inst: RafsInstance, slot: int = 0) -> int:
        """Mount ``inst`` as ``/name``; returns its slot. ``slot`` (restoring a table a
        predecessor handed over) takes that slot instead of the next free one.
        AlreadyExists if the name or the slot is taken; FailedPrecondition when all
        255 slots are."""
        with self._lock:
            if any(n == name for n, _ in self.slots.values()):
                raise AlreadyExists(f"mountpoint /{name.decode(errors='replace')} is already mounted")
            if slot:
                if not 0 < slot <= MAX_SLOTS or slot in self.slots:
                    raise AlreadyExists(f"slot {slot} for /{name.decode(errors='replace')} is "
                                        f"taken or out of range")
                free: int | None = slot
            else:
                order = [(self.next_slot - 1 + i) % MAX_SLOTS + 1 for i in range(MAX_SLOTS)]
                free = next((s for s in order if s not in self.slots), None)
            if free is None:
                raise FailedPrecondition("255 images are mounted already; unmount one first")
            self.slots[free] = (name, inst)
            if not slot:
                self.next_slot = free % MAX_SLOTS + 1
            self._changed()
            return free

    def _changed(self) -> None:
        self.changed_ns = max(time.time_ns(), self.changed_ns + 1)

    def remove(self, name: bytes) -> tuple[int, RafsInstance]:
        with self._lock:
            for slot, (n, inst) in list(self.slots.items()):
                if n == name:
                    del self.slots[slot]
                    self._changed()
                    return slot, inst
        raise NotFound(f"mountpoint /{name.decode(errors='replace')} is not mounted")

    def slot_by_name(self, name: bytes) -> tuple[int, RafsInstance] | None:
        for slot, (n, inst) in self.slots.items():
            if n == name:
                return slot, inst
        return None

    def instances(self) -> list[RafsInstance]:
        return [self.dedicated] if self.dedicated else [inst for _, inst in self.slots.values()]

    def table(self) -> dict[str, Any]:
        """The slot table as a value (for the takeover state): names by slot, next slot."""
        return {"next_slot": self.next_slot,
                "slots": {str(s): n.decode("utf-8", "surrogateescape")
                          for s, (n, _) in sorted(self.slots.items())}}
