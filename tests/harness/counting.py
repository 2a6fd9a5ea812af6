"""A real localfs blob backend that counts the ranged requests it serves (blob cache tests)."""

from __future__ import annotations

import threading

from pynydus.daemon.blobcache import LocalFsBackend


class CountingBackend(LocalFsBackend):
    """The real localfs backend, counting the requests it serves."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.requests: list[tuple[int, int]] = []
        self.blob_requests: list[tuple[str, int, int]] = []  # the same, with the blob
        self.lock = threading.Lock()

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        with self.lock:
            self.requests.append((offset, length))
            self.blob_requests.append((blob_id, offset, length))
        return super().read_range(blob_id, offset, length)
