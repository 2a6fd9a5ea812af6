"""One layer to tarfs: its blob streamed from the registry, uncompressed once, kept as
the tar the kernel reads, and described by a tarfs bootstrap.

The registry's bytes go through the tar reader of the RAFS builder (gzip and zstd are
undone on the fly, :mod:`pynydus.rafs.decoder`), which tees every uncompressed byte into
``<cache>/<blob id>`` (the blob id is the layer digest's hex, as upstream names it) and
builds the bootstrap (``tar-tarfs``: 512-byte blocks, every file's data where it lies in
the tar). The tar must hash to the layer's diff id (when the image config is at hand)
before it takes its name; the stream is read to its end so the client checks the layer
digest too. Only then does the bootstrap appear as ``<layer>/fs/image/layer.boot``: its
presence is what "converted" means, before and after a restart.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pynydus.errors import Unavailable
from pynydus.rafs.builder import build
from pynydus.registry import RegistryClient
from pynydus.tarfs.source import LayerSource

__all__ = ["IMAGE_BOOTSTRAP", "LAYER_BOOTSTRAP", "Cancelled", "convert_layer"]

LAYER_BOOTSTRAP = "image/layer.boot"  # under the layer snapshot's fs/
IMAGE_BOOTSTRAP = "image/image.boot"  # merged, under the image's top layer fs/
_PARTIAL = ".building"


class Cancelled(Unavailable):
    """The layer's snapshot went away (or the snapshotter stops) while it was converted."""


@dataclass(frozen=True)
class Converted:
    bootstrap: str
    tar: str
    tar_bytes: int
    seconds: float


class _Stream(io.RawIOBase):
    """A file object over the blob's chunks that stops when ``cancel`` is set."""

    def __init__(self, chunks: Iterator[bytes], cancel: threading.Event, what: str) -> None:
        self._it = chunks
        self._buf = memoryview(b"")
        self._cancel = cancel
        self._what = what
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._cancel.is_set():
            raise Cancelled(f"{self._what}: cancelled")
        if not self._buf:
            try:
                chunk = next(self._it)
            except StopIteration:
                return 0
            self.total += len(chunk)
            self._buf = memoryview(chunk)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()  # an unfinished stream closes its connection
        super().close()


def convert_layer(client: RegistryClient, src: LayerSource, diff_id: str | None, cache_dir: str,
                  upper: str, cancel: threading.Event) -> Converted:
    """Fetch ``src``'s layer and write ``<cache_dir>/<blob id>`` and ``<upper>/image/layer.boot``.

    Idempotent: a second run rewrites both with the same bytes. FormatError if the tar
    does not hash to ``diff_id`` (or is no tar), DigestMismatch if the blob does not match
    its digest, Cancelled when ``cancel`` is set; then no bootstrap exists (a tar that
    took its name is kept: it is what the diff id says, for whoever needs it next).
    """
    import time

    t0 = time.monotonic()
    ref = src.reference
    boot = os.path.join(upper, LAYER_BOOTSTRAP)
    os.makedirs(os.path.dirname(boot), mode=0o755, exist_ok=True)
    partial = boot + _PARTIAL
    what = f"tarfs layer {src.layer_digest} of {src.ref}"
    tar = os.path.join(cache_dir, src.blob_id)
    if os.path.exists(tar):
        # Converted before (another snapshot of the layer, or a restart after the tar was
        # complete): rebuild the bootstrap from it, no download. The tar took its name
        # only once complete, and the builder checks the diff id again.
        chunks: Iterator[bytes] = _file_chunks(tar)
    else:
        chunks = client.get_blob(ref.repository, src.layer_digest)
    stream = _Stream(chunks, cancel, what)
    try:
        reader = io.BufferedReader(stream, 1 << 20)
        build(reader, partial, cache_dir, type="tar-tarfs", blob_id=src.blob_id,
              expect_tar_sha256=diff_id.split(":", 1)[1] if diff_id else None)
        # Past the tar's end: read on, so the client compares the blob with its digest.
        while reader.read(1 << 20):
            pass
        os.replace(partial, boot)
    except BaseException:
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        raise
    finally:
        stream.close()
    return Converted(boot, tar, os.path.getsize(tar), time.monotonic() - t0)


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def remove_partial(upper: str) -> None:
    """Delete what an interrupted conversion left in the layer's ``fs`` (idempotent)."""
    try:
        os.unlink(os.path.join(upper, LAYER_BOOTSTRAP) + _PARTIAL)
    except FileNotFoundError:
        pass
