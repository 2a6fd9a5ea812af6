"""The daemon's ``registry`` backend: chunk ranges with HTTP Range requests.

A thin adapter from nydusd's registry backend config to the shared registry
client (auth, retries, redirects, mirrors and proxy live there). Blob ids are
hex sha256 digests, as in the bootstrap's blob table.
"""

from __future__ import annotations

from pynydus.daemon.config import RegistryConfig
from pynydus.registry.client import Mirror, RegistryClient


class RegistryBackend:
    def __init__(self, cfg: RegistryConfig) -> None:
        self.cfg = cfg
        self.repo = cfg.repo
        self.client = RegistryClient(
            cfg.host,
            scheme=cfg.scheme or "https",
            skip_verify=cfg.skip_verify,
            auth=cfg.auth or None,
            registry_token=cfg.registry_token or None,
            timeout=float(cfg.timeout),
            connect_timeout=float(cfg.connect_timeout),
            retry_limit=cfg.retry_limit,
            proxy=cfg.proxy.url or None,
            proxy_fallback=cfg.proxy.fallback,
            mirrors=[Mirror(m.host, dict(m.headers)) for m in cfg.mirrors],
            ca_cert_files=list(cfg.ca_cert_files),
        )

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        digest = blob_id if ":" in blob_id else f"sha256:{blob_id}"
        return self.client.read_blob_range(self.repo, digest, offset, length)

    def update_auth(self, auth: str) -> None:
        """Hot credential refresh (PUT /api/v1/config {"registry_auth": base64})."""
        self.client.set_credentials(auth)

    def close(self) -> None:
        self.client.close()
