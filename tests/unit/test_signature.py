"""Bootstrap signatures: what ``convert --sign-key`` writes is what upstream's check accepts.

The referee for the algorithm is ``openssl dgst -sha256 -sign`` (RSA PKCS#1 v1.5 over
SHA-256, deterministic): the same bytes as Go's ``rsa.SignPKCS1v15``, which upstream's
``rsa.VerifyPKCS1v15`` checks. Keys are made by ``openssl`` too, in both public PEM forms.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from pynydus import labels as L
from pynydus.errors import ConfigError, InvalidArgument, PermissionDenied
from pynydus.signature import Verifier, load_private_key, load_public_key, sign_bootstrap

BOOT = b"\0" * 1024 + b"a bootstrap" + bytes(range(256)) * 16


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    priv = d / "key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(priv), "2048"], check=True,
                   capture_output=True)
    spki = d / "pub-spki.pem"
    subprocess.run(["openssl", "rsa", "-in", str(priv), "-pubout", "-out", str(spki)],
                   check=True, capture_output=True)
    pkcs1 = d / "pub-pkcs1.pem"  # the form upstream reads (x509.ParsePKCS1PublicKey)
    subprocess.run(["openssl", "rsa", "-in", str(priv), "-RSAPublicKey_out", "-out",
                    str(pkcs1)], check=True, capture_output=True)
    other = d / "other.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True,
                   capture_output=True)
    other_pub = d / "other-pub.pem"
    subprocess.run(["openssl", "rsa", "-in", str(other), "-RSAPublicKey_out", "-out",
                    str(other_pub)], check=True, capture_output=True)
    boot = d / "image.boot"
    boot.write_bytes(BOOT)
    return {"priv": priv, "spki": spki, "pkcs1": pkcs1, "other_pub": other_pub, "boot": boot,
            "dir": d}


def test_signature_is_the_one_openssl_makes(keys: dict[str, Path]) -> None:
    ours = sign_bootstrap(load_private_key(str(keys["priv"])), BOOT)
    theirs = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(keys["priv"]),
                             str(keys["boot"])], check=True, capture_output=True).stdout
    assert base64.b64decode(ours) == theirs


@pytest.mark.parametrize("form", ["pkcs1", "spki"])
def test_signed_bootstrap_verifies_with_either_public_key_form(keys: dict[str, Path],
                                                               form: str) -> None:
    sig = sign_bootstrap(load_private_key(str(keys["priv"])), BOOT)
    Verifier(str(keys[form]), True).verify({L.NYDUS_SIGNATURE: sig}, str(keys["boot"]), "img")
    # and openssl agrees with our verification of its signature
    theirs = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(keys["priv"]),
                             str(keys["boot"])], check=True, capture_output=True).stdout
    Verifier(str(keys[form]), True).verify(
        {L.NYDUS_SIGNATURE: base64.b64encode(theirs).decode()}, str(keys["boot"]), "img")


def test_missing_signature_is_refused_when_required(keys: dict[str, Path]) -> None:
    with pytest.raises(PermissionDenied, match=r"snap 1: the image has no bootstrap "
                       r"signature .*nydus-signature.*validate_signature = true"):
        Verifier(str(keys["pkcs1"]), True).verify({}, str(keys["boot"]), "snap 1")


def test_wrong_signature_is_refused_naming_key_and_label(keys: dict[str, Path],
                                                         tmp_path: Path) -> None:
    sig = sign_bootstrap(load_private_key(str(keys["priv"])), BOOT)
    v = Verifier(str(keys["other_pub"]), True)
    with pytest.raises(PermissionDenied, match=r"does not verify with the public key "
                       + str(keys["other_pub"])):
        v.verify({L.NYDUS_SIGNATURE: sig}, str(keys["boot"]), "img")
    changed = tmp_path / "changed.boot"
    changed.write_bytes(BOOT[:-1] + b"\x01")
    with pytest.raises(PermissionDenied, match="bootstrap was changed"):
        Verifier(str(keys["pkcs1"]), True).verify({L.NYDUS_SIGNATURE: sig}, str(changed), "i")
    with pytest.raises(PermissionDenied, match="not base64"):
        Verifier(str(keys["pkcs1"]), True).verify({L.NYDUS_SIGNATURE: "%%%"},
                                                  str(keys["boot"]), "i")
    with pytest.raises(PermissionDenied, match="not base64"):  # was a raw ValueError
        Verifier(str(keys["pkcs1"]), True).verify({L.NYDUS_SIGNATURE: "sig\u00e9"},
                                                  str(keys["boot"]), "i")


def test_not_required_checks_nothing(keys: dict[str, Path]) -> None:
    v = Verifier("", False)  # no key is read, as upstream
    v.verify({}, "/nonexistent", "img")
    v.verify({L.NYDUS_SIGNATURE: "garbage"}, "/nonexistent", "img")


def test_bad_key_files_stop_start_up(keys: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image.public_key_file: cannot read"):
        load_public_key(str(tmp_path / "absent.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    with pytest.raises(ConfigError, match="is not a PEM public key"):
        Verifier(str(junk), True)
    ec = tmp_path / "ec.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
                    str(ec)], check=True, capture_output=True)
    ec_pub = tmp_path / "ec-pub.pem"
    subprocess.run(["openssl", "ec", "-in", str(ec), "-pubout", "-out", str(ec_pub)],
                   check=True, capture_output=True)
    with pytest.raises(ConfigError, match="not an RSA public key"):
        load_public_key(str(ec_pub))
    with pytest.raises(InvalidArgument, match="not an RSA key"):
        load_private_key(str(ec))
    with pytest.raises(InvalidArgument, match="not an unencrypted PEM private key"):
        load_private_key(str(keys["pkcs1"]))
