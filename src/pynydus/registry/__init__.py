"""OCI distribution client: references, auth, manifests, ranged blob reads, push,
referrers. Shared by pynydusd (lazy chunk reads) and the converter (pull/push).

Sync API on httpx; safe to share one :class:`RegistryClient` across threads.
"""

from __future__ import annotations

from . import _http  # noqa: F401 - first: httpx and httpcore as this package uses them
from .auth import (
    Challenge,
    Credentials,
    DockerConfig,
    Token,
    TokenCache,
    credentials_from_labels,
    load_docker_config,
    parse_challenges,
    parse_token_response,
    resolve_credentials,
)
from .client import Descriptor, Manifest, RegistryClient, compute_digest
from .errors import DigestMismatch, RegistryProtocolError, ShortRead, Unauthorized
from .metrics import RegistryMetrics
from .reference import Reference, parse_reference
from .transport import Mirror

__all__ = [
    "Challenge", "Credentials", "Descriptor", "DigestMismatch", "DockerConfig", "Manifest",
    "Mirror", "Reference", "RegistryClient", "RegistryMetrics", "RegistryProtocolError",
    "ShortRead", "Token", "TokenCache", "Unauthorized", "compute_digest",
    "credentials_from_labels", "load_docker_config", "parse_challenges",
    "parse_reference", "parse_token_response", "resolve_credentials",
]
