"""Persisted chunk bitmap of a cached blob: ``<blob_id>.blob.data.chunk_map``.

Upstream's layout, so a cache directory can move between nydusd and pynydusd:
a 4096-byte header (u32 magic 0x424D4150, u32 version 1, u32 magic2 0x434D4150,
u32 all_ready = 0x4D4D4150 once every chunk is cached, reserved zeros) followed by
one bit per chunk, most significant bit first. A bit is set only after the chunk's
bytes were written to the data file, so a crash can lose work but never serve a
hole as data. A file whose size does not match the chunk count is discarded.
"""

from __future__ import annotations

import logging
import os
import struct
import threading

log = logging.getLogger(__name__)

MAGIC = 0x424D4150
VERSION = 1
MAGIC2 = 0x434D4150
ALL_READY = 0x4D4D4150
HEADER_SIZE = 4096
_HEADER = struct.Struct("<IIII")


def map_size(chunk_count: int) -> int:
    return HEADER_SIZE + (chunk_count + 7) // 8


class ChunkMap:
    """Thread-safe readiness bits for ``chunk_count`` chunks, persisted at ``path``."""

    def __init__(self, path: str, chunk_count: int) -> None:
        self.path = path
        self.chunk_count = chunk_count
        self._lock = threading.Lock()
        size = map_size(chunk_count)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            st = os.fstat(fd)
            header = os.pread(fd, HEADER_SIZE, 0) if st.st_size == size else b""
            valid = False
            if len(header) == HEADER_SIZE:
                magic, version, magic2, _ = _HEADER.unpack_from(header)
                valid = (magic, version, magic2) == (MAGIC, VERSION, MAGIC2)
            if not valid:
                if st.st_size:
                    log.warning("chunk map %s is corrupt or of another size; starting empty", path)
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, MAGIC2, 0), 0)
            self._bits = bytearray(os.pread(fd, size - HEADER_SIZE, HEADER_SIZE))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._ready = sum(b.bit_count() for b in self._bits)

    def is_ready(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def set_ready(self, indexes: list[int]) -> None:
        """Mark chunks ready and persist the touched bitmap bytes."""
        with self._lock:
            touched = set()
            for i in indexes:
                byte, mask = i >> 3, 0x80 >> (i & 7)
                if not self._bits[byte] & mask:
                    self._bits[byte] |= mask
                    self._ready += 1
                    touched.add(byte)
            for byte in sorted(touched):
                os.pwrite(self._fd, bytes(self._bits[byte:byte + 1]), HEADER_SIZE + byte)
            if touched and self._ready == self.chunk_count:
                os.pwrite(self._fd, _HEADER.pack(MAGIC, VERSION, MAGIC2, ALL_READY), 0)

    @property
    def ready_count(self) -> int:
        return self._ready

    @property
    def all_ready(self) -> bool:
        return self._ready == self.chunk_count

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
