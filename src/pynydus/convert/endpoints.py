"""Where the converter's registries are and how to authenticate, as picklable values.

A :class:`~pynydus.registry.RegistryClient` holds sockets and cannot cross into the
worker processes; a :class:`RegistrySpec` can, and each process makes its own client
from it. Credentials come from ``--source-auth``/``--target-auth`` when given, else
from docker's ``config.json`` (``auths``, credential helpers), as nydusify does.
"""

from __future__ import annotations

from dataclasses import dataclass

from pynydus.registry import Credentials, RegistryClient, resolve_credentials
from pynydus.registry.reference import Reference

__all__ = ["RegistrySpec", "credentials_for", "registry_spec"]


@dataclass(frozen=True)
class RegistrySpec:
    """How to reach one registry. ``insecure``: accept any TLS certificate and fall
    back to plain HTTP (nydusify's ``--source-insecure``/``--target-insecure``)."""

    host: str
    scheme: str
    insecure: bool = False
    credentials: Credentials | None = None
    retry_limit: int = 3
    # A layer blob streams for as long as the builder takes; a read may wait on it.
    timeout: float = 60.0

    def client(self) -> RegistryClient:
        return RegistryClient(self.host, scheme=self.scheme, skip_verify=self.insecure,
                              auth=self.credentials, retry_limit=self.retry_limit,
                              timeout=self.timeout, connect_timeout=10.0)


def credentials_for(explicit: str | None, host: str) -> Credentials | None:
    """``user:password`` (or its base64) if given, else what docker's config holds."""
    if explicit:
        if ":" in explicit:
            user, _, password = explicit.partition(":")
            return Credentials(username=user, password=password)
        return Credentials.from_auth_string(explicit)
    return resolve_credentials(host)


def registry_spec(ref: Reference, insecure: bool, auth: str | None) -> RegistrySpec:
    """The spec for the registry of ``ref`` (http for loopback hosts, https otherwise)."""
    return RegistrySpec(ref.api_host, ref.default_scheme, insecure,
                        credentials_for(auth, ref.domain))
