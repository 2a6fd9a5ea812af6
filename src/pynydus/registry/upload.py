"""Blob uploads (distribution spec "pushing blobs"), on top of a Transport.

An upload session starts with ``POST /v2/<repo>/blobs/uploads/`` (with
``?mount=<digest>&from=<repo>`` a cross-repository mount is tried first: 201 means
mounted, 202 means refused and a session was opened instead). The answer's
``Location`` names the session; its query carries the registry's state and must be
kept. Data goes either in the closing ``PUT <location>?digest=…`` (monolithic) or in
``PATCH`` requests with ``Content-Range: start-end`` (each answer moves the
``Location``), closed by an empty ``PUT``. The registry checks the digest.

A failed upload is retried from a new session by the caller, so sources must be
replayable: bytes, a path, or a seekable file (see :func:`blob_opener`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx

from pynydus.errors import InvalidArgument, Unavailable

from .auth import repository_scope
from .errors import RegistryProtocolError
from .transport import Request, Transport, raise_for_status

BlobSource = bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes]
MONOLITHIC_LIMIT = 64 << 20   # above this, and with no chunk_size, uploads are chunked
READ_CHUNK = 1 << 20
_OCTETS = "application/octet-stream"


class Upload:
    """One blob's upload requests for ``repo``; ``what`` names it in errors."""

    def __init__(self, transport: Transport, repo: str, digest: str, what: str) -> None:
        self._t = transport
        self.repo = repo
        self.digest = digest
        self.what = what
        self._scopes = (repository_scope(repo, "pull,push"),)

    def start(self, mount_from: str | None = None) -> str | None:
        """Open a session; None if ``mount_from`` was given and the mount worked."""
        scopes = list(self._scopes)
        params: dict[str, str] = {}
        if mount_from and mount_from != self.repo:
            params = {"mount": self.digest, "from": mount_from}
            scopes.append(repository_scope(mount_from, "pull"))
        resp = self._t.exchange(Request("POST", f"/v2/{self.repo}/blobs/uploads/", self.what,
                                        tuple(scopes), {"Content-Length": "0"},
                                        params=params or None, pull=False))
        raise_for_status(resp, self.what)
        if resp.status_code == 201 and params:
            return None
        if resp.status_code != 202 or "location" not in resp.headers:
            raise RegistryProtocolError(f"{self.what}: upload start answered HTTP "
                                        f"{resp.status_code} without Location")
        return _abs(resp)

    def patch_chunks(self, location: str, f: IO[bytes], total: int, chunk_size: int) -> str:
        """Send ``total`` bytes of ``f`` in PATCHes of ``chunk_size``; the last Location."""
        sent = 0
        while sent < total:
            chunk = f.read(min(chunk_size, total - sent))
            if not chunk:
                raise InvalidArgument(f"{self.what}: source ended at {sent} of {total} bytes")
            end = sent + len(chunk) - 1
            resp = self._t.exchange(Request(
                "PATCH", location, self.what, self._scopes,
                {"Content-Type": _OCTETS, "Content-Range": f"{sent}-{end}",
                 "Content-Length": str(len(chunk))}, content=chunk, pull=False))
            raise_for_status(resp, self.what)
            if "location" not in resp.headers:
                raise RegistryProtocolError(f"{self.what}: PATCH answer without Location")
            location = _abs(resp)
            sent += len(chunk)
            self._t.metrics.add("bytes_written", len(chunk))
        return location

    def finish(self, location: str, body: bytes | Iterator[bytes], size: int = 0) -> None:
        """The closing PUT with ``?digest=``, carrying ``body`` (``size`` bytes when it
        is an iterator)."""
        length = len(body) if isinstance(body, bytes) else size
        resp = self._t.exchange(Request(
            "PUT", location, self.what, self._scopes,
            {"Content-Type": _OCTETS, "Content-Length": str(length)},
            params={"digest": self.digest}, content=body, pull=False))
        raise_for_status(resp, self.what)
        if resp.status_code != 201:
            raise RegistryProtocolError(
                f"{self.what}: upload finished with HTTP {resp.status_code}")
        self._t.metrics.add("bytes_written", length)

    def cancel(self, location: str) -> None:
        """Best-effort DELETE of an open session."""
        try:
            self._t.exchange(Request("DELETE", location, self.what, self._scopes,
                                     pull=False)).close()
        except httpx.HTTPError:
            pass


def _abs(resp: httpx.Response) -> str:
    return str(resp.request.url.join(resp.headers["location"]))


def iter_file(f: IO[bytes], total: int, chunk: int = READ_CHUNK) -> Iterator[bytes]:
    """``total`` bytes of ``f`` in pieces; InvalidArgument if it ends early."""
    left = total
    while left > 0:
        b = f.read(min(chunk, left))
        if not b:
            raise InvalidArgument(f"blob source ended {left} bytes early")
        left -= len(b)
        yield b


class _NoClose(io.BufferedIOBase):
    """Context wrapper that leaves a caller's file open."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f

    def read(self, n: int | None = -1) -> bytes:
        return self._f.read(-1 if n is None else n)

    def close(self) -> None:
        pass


def blob_opener(source: BlobSource, size: int | None) -> tuple[Callable[[], IO[bytes]], int]:
    """A factory that yields a fresh reader of ``source`` per attempt, and its size."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return (lambda: io.BytesIO(data)), len(data)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return (lambda: open(path, "rb")), path.stat().st_size if size is None else size
    f = source
    try:
        start = f.tell()
        seekable = f.seekable()
    except (AttributeError, OSError):
        start, seekable = 0, False
    if size is None:
        if not seekable:
            raise InvalidArgument("push_blob: size is required for an unseekable source")
        size = f.seek(0, os.SEEK_END) - start
        f.seek(start)
    used = [False]

    def opener() -> IO[bytes]:
        if used[0]:
            if not seekable:
                raise Unavailable("push_blob: cannot retry an unseekable source")
            f.seek(start)
        used[0] = True
        return _NoClose(f)  # type: ignore[return-value]
    return opener, size
