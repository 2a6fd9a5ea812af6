"""Bootstrap signatures: ``pynydus convert --sign-key`` makes them, the snapshotter checks them.

Upstream's scheme (nydus-snapshotter ``pkg/signature``, ``pkg/utils/signer``), kept as is
so that images and keys work with either snapshotter:

* the signature is RSA PKCS#1 v1.5 over the SHA-256 of the whole bootstrap file, the
  ``image/image.boot`` that containerd unpacks from the bootstrap layer;
* it travels base64 (standard alphabet) in the bootstrap layer's annotation
  ``containerd.io/snapshot/nydus-signature``, which containerd copies into the labels
  of that layer's snapshot (every ``containerd.io/snapshot/`` annotation is inherited);
* the node holds the PEM public key (``[image] public_key_file``); with
  ``validate_signature = true`` an image whose bootstrap has no signature, or one that
  does not verify, is not mounted. With it false nothing is checked, as upstream.

Upstream reads only a PKCS#1 ``RSA PUBLIC KEY`` block; we also take the
SubjectPublicKeyInfo ``PUBLIC KEY`` form ``openssl rsa -pubout`` writes, as long as the
key is RSA. Everything here is pure except the key and bootstrap file reads.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from pynydus import labels as L
from pynydus.errors import ConfigError, InvalidArgument, PermissionDenied, q

_READ = 1 << 20


def load_public_key(path: str) -> rsa.RSAPublicKey:
    """The RSA public key in PEM file ``path``; ConfigError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ConfigError(f"image.public_key_file: cannot read {path}: {err}") from err
    try:
        key = serialization.load_pem_public_key(data)  # PKCS#1 and SubjectPublicKeyInfo
    except (ValueError, TypeError) as err:
        raise ConfigError(f"image.public_key_file: {path} is not a PEM public key: {err}") from err
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigError(f"image.public_key_file: {path} holds a {type(key).__name__}, "
                          "not an RSA public key")
    return key


def load_private_key(path: str) -> rsa.RSAPrivateKey:
    """The RSA private key (PEM, PKCS#1 or PKCS#8, unencrypted) in ``path``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise InvalidArgument(f"sign key {path}: cannot read: {err}") from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise InvalidArgument(f"sign key {path}: not an unencrypted PEM private key: {err}") \
            from err
    if not isinstance(key, rsa.RSAPrivateKey):
        raise InvalidArgument(f"sign key {path}: holds a {type(key).__name__}, not an RSA key "
                              "(upstream verifies RSA PKCS#1 v1.5 signatures only)")
    return key


def sign_bootstrap(key: rsa.RSAPrivateKey, bootstrap: bytes) -> str:
    """The annotation value for ``bootstrap``'s bytes: base64 of the RSA signature."""
    sig = key.sign(bootstrap, padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(sig).decode()


def _file_digest(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            h.update(chunk)
    return h.digest()


class Verifier:
    """Checks bootstraps against the node's key (``[image]`` of the configuration).

    ``required``: upstream's ``validate_signature``; when False nothing is loaded and
    ``verify`` accepts everything. Built once at start-up: a missing or malformed key
    file stops the snapshotter there, not at the first image.
    """

    def __init__(self, public_key_file: str, required: bool) -> None:
        self.required = required
        self.key_file = public_key_file
        self._key = load_public_key(public_key_file) if required else None

    def verify(self, labels: Mapping[str, str], bootstrap: str, what: str) -> None:
        """Accept the bootstrap file at ``bootstrap`` or raise PermissionDenied naming
        ``what`` (the snapshot and image), the label and the key file. Reads the file
        once (a SHA-256 pass); costs nothing when signatures are not required."""
        if self._key is None:
            return
        value = labels.get(L.NYDUS_SIGNATURE)
        if not value:
            raise PermissionDenied(
                f"{what}: the image has no bootstrap signature (layer annotation "
                f"{L.NYDUS_SIGNATURE}) and this node requires one "
                f"(image.validate_signature = true); sign it with pynydus convert --sign-key")
        try:
            sig = base64.b64decode(value, validate=True)
        except ValueError as err:  # binascii.Error, or a label that is not ASCII
            raise PermissionDenied(f"{what}: the bootstrap signature ({L.NYDUS_SIGNATURE}) "
                                   f"is not base64: {err}") from err
        try:
            digest = _file_digest(bootstrap)
        except OSError as err:
            raise PermissionDenied(f"{what}: cannot read bootstrap {q(bootstrap)} to verify "
                                   f"its signature: {err}") from err
        try:
            self._key.verify(sig, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        except InvalidSignature:
            raise PermissionDenied(
                f"{what}: bootstrap signature ({L.NYDUS_SIGNATURE}) does not verify with "
                f"the public key {self.key_file}: the bootstrap was changed or signed with "
                "another key") from None
