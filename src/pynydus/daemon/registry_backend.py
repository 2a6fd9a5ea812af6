"""The daemon's ``registry`` backend: chunk ranges with HTTP Range requests.

A thin adapter from nydusd's registry backend config to the shared registry
client (auth, retries, redirects, mirrors and proxy live there). Blob ids are
hex sha256 digests, as in the bootstrap's blob table. ``client_from_config`` is the
one place where the config's keys become client options.

The client is built on a thread of its own, started with the backend: it is
first needed at the first chunk miss, which comes after the FUSE mount and the
container's start, while building it (importing httpx, a TLS context) sat on every
dedicated daemon's start-up path, about 0.15 s of it (bench/lazy_pull.py --profile).
For a plain-http registry the build makes neither the TLS context nor the httpx
client (its range GETs go through the transport's socket pool). Every use waits for
the build; a build that failed fails each use with the same error.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from pynydus.daemon.config import RegistryConfig

if TYPE_CHECKING:
    from pynydus.registry.client import RegistryClient
    from pynydus.registry.credentials import Credentials


def client_from_config(cfg: RegistryConfig) -> RegistryClient:
    """The registry client nydusd's registry backend config (``device.backend.config``
    in v1, ``backend.registry`` in v2) asks for. ``repo`` is the caller's to use per
    request; nydusd's ``retry_limit`` counts extra attempts (0: try once)."""
    from pynydus.registry.client import Mirror, RegistryClient

    return RegistryClient(
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
        proxy_check_interval=float(cfg.proxy.check_interval),
        mirrors=[Mirror(m.host, dict(m.headers), failure_limit=m.failure_limit,
                        cooldown=float(m.health_check_interval), ping_url=m.ping_url,
                        override_path=m.override_path, ca_cert_files=list(m.ca_cert_files),
                        client_cert=(m.client_cert, m.client_key) if m.client_cert else None,
                        skip_verify=True if m.skip_verify else None,
                        connect_timeout=float(m.connect_timeout) or None)
                 for m in cfg.mirrors],
        ca_cert_files=list(cfg.ca_cert_files),
        client_cert=(cfg.client_cert, cfg.client_key) if cfg.client_cert else None,
        headers=dict(cfg.headers),
        blob_url_scheme=cfg.blob_url_scheme,
        blob_redirected_host=cfg.blob_redirected_host,
    )


class RegistryBackend:
    """``defer``: no build thread now; the client is built by ``warm()`` (a failover
    successor calls it once its first reads are served: starting a thread and building
    take scheduling rounds, CPU and the GIL from the reads its readers wait for) or by
    the first read that needs it."""

    def __init__(self, cfg: RegistryConfig, defer: bool = False) -> None:
        self.cfg = cfg
        self.repo = cfg.repo
        self._client: RegistryClient | None = None
        self._error: BaseException | None = None
        self._built = threading.Event()
        self._lock = threading.Lock()
        if not defer:
            threading.Thread(target=self.warm, name="registry-client", daemon=True).start()

    def warm(self) -> None:
        """Build the client (in this thread) unless it is built or being built."""
        with self._lock:
            if self._built.is_set():
                return
            try:
                self._client = client_from_config(self.cfg)
            except BaseException as err:  # noqa: BLE001 - handed to every caller of .client
                self._error = err
            finally:
                self._built.set()

    @property
    def client(self) -> RegistryClient:
        if not self._built.is_set():
            self.warm()
        if self._error is not None:
            raise self._error
        assert self._client is not None
        return self._client

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        digest = blob_id if ":" in blob_id else f"sha256:{blob_id}"
        return self.client.read_blob_range(self.repo, digest, offset, length)

    def update_auth(self, auth: Credentials | str) -> None:
        """Hot credential refresh (PUT /api/v1/config {"registry_auth": base64} or
        {"registry_token": token})."""
        self.client.set_credentials(auth)

    def close(self) -> None:
        with self._lock:  # a build under way finishes first
            pass
        if self._client is not None:
            self._client.close()
