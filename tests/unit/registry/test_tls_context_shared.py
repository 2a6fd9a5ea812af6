"""Registry clients with the plain TLS settings share one context per process: httpx built
one per client (the CA bundle loaded each time, ~130 KB of native memory kept after the
client closed), and the shared daemon makes a client per image it mounts."""

from __future__ import annotations

import ssl

from pynydus.registry.transport import tls_verify


def test_plain_settings_share_one_context_each() -> None:
    verified = tls_verify([], False, None)
    assert verified is tls_verify([], False, None)
    assert verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname
    unverified = tls_verify([], True, None)
    assert unverified is tls_verify([], True, None) and unverified is not verified
    assert unverified.verify_mode == ssl.CERT_NONE and not unverified.check_hostname


def test_own_certificates_get_their_own_context() -> None:
    import certifi

    a = tls_verify([certifi.where()], False, None)
    assert a is not tls_verify([certifi.where()], False, None)  # files may change: read again
    assert a is not tls_verify([], False, None)
