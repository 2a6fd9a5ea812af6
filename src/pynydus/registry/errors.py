"""Registry-specific refinements of the pynydus error taxonomy.

Each class subclasses one of :mod:`pynydus.errors` so callers that only know the
base taxonomy (the gRPC edge, FUSE handlers, CLI exit codes) still map them right:

* :class:`Unauthorized` — the registry refused our credentials (401 after we
  answered its challenge, or 403).  Not retryable without new credentials.
* :class:`DigestMismatch` — the bytes we got do not hash to the digest we asked for.
* :class:`ShortRead` — a ranged read returned fewer bytes than asked; transient on
  the wire (a proxy cut the body), so the client retries it before giving up.
"""

from __future__ import annotations

from pynydus.errors import FormatError, PermissionDenied, Unavailable


class Unauthorized(PermissionDenied):
    """The registry rejected the request after authentication (HTTP 401 or 403).

    ``status`` is the last HTTP status; ``challenge`` the last ``WWW-Authenticate``."""

    def __init__(self, message: str, *, status: int = 401, challenge: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.challenge = challenge


class DigestMismatch(FormatError):
    """Content fetched from the registry does not match its digest."""


class ShortRead(Unavailable):
    """A blob read returned fewer bytes than requested (truncated body)."""


class RegistryProtocolError(FormatError):
    """The registry answered with something the distribution spec does not allow
    (missing ``Location`` on an upload, a 206 for the wrong range, bad JSON)."""
