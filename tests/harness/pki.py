"""A private PKI for TLS tests: a CA, server certificates for 127.0.0.1, client certificates.

    pki = Pki(workdir)                       # ca.pem / ca.key under workdir
    cert, key = pki.server("mirror")         # SAN IP 127.0.0.1 and DNS localhost
    ccert, ckey = pki.client("node")         # clientAuth, signed by the same CA

EC P-256 keys (fast to make); PEM files, keys 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


class Pki:
    def __init__(self, workdir: Path, name: str = "pynydus test CA") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(hours=1))
                     .not_valid_after(now + dt.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                  False, False), True)
                     .sign(self.key, hashes.SHA256()))
        self.ca = self.dir / "ca.pem"
        self.ca.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _issue(self, cn: str, usage: x509.ObjectIdentifier,
               san: list[x509.GeneralName] | None) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(hours=1))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.ExtendedKeyUsage([usage]), False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), False)
        cert = b.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{cn}.cert", self.dir / f"{cn}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path

    def server(self, cn: str) -> tuple[Path, Path]:
        """(certificate, key) valid for https://127.0.0.1 and https://localhost."""
        return self._issue(cn, ExtendedKeyUsageOID.SERVER_AUTH,
                           [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                            x509.DNSName("localhost")])

    def client(self, cn: str) -> tuple[Path, Path]:
        """(certificate, key) for TLS client authentication."""
        return self._issue(cn, ExtendedKeyUsageOID.CLIENT_AUTH, None)
