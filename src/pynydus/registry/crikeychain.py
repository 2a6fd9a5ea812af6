"""The CRI keychain: the registry credentials kubelet sent with each image's PullImage.

containerd uses the credentials of a CRI ``PullImage`` itself and never hands them to a
snapshotter. With ``[remote.auth] enable_cri_keychain`` the snapshotter serves the CRI
ImageService in front of containerd (:mod:`pynydus.snapshot.imageproxy`); each PullImage
passes through :meth:`CriKeychain.record_pull` on its way, and the image's daemon later
finds the credentials here (upstream: ``pkg/auth/image_proxy.go`` and ``FromCRI``).

Sans-I/O: :func:`parse_pull_request` reads the two fields it needs from the request's
protobuf encoding (``runtime.v1.PullImageRequest``: ``image.image`` and ``auth``),
skipping everything else, so the proxy depends on no generated CRI code and forwards the
request bytes unchanged. The credentials are kept in memory only, for the image's
reference and for its repository (a container of the same repository pulled by digest
or another tag finds them too), at most ``MAX_ENTRIES`` of them, the oldest dropped
first; they are gone when the snapshotter restarts, as upstream's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from pynydus.errors import InvalidArgument

from .credentials import Credentials
from .keychain import Found
from .reference import Reference, parse_reference

MAX_ENTRIES = 4096

# protobuf wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise InvalidArgument("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise InvalidArgument("varint longer than 10 bytes")


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of one message; length-delimited
    values as bytes. InvalidArgument on malformed input."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise InvalidArgument("field number 0")
        if wire == _VARINT:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == _LEN:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise InvalidArgument("length-delimited field runs past the message")
            yield number, wire, data[pos:pos + size]
            pos += size
        elif wire in (_I64, _I32):
            width = 8 if wire == _I64 else 4
            if pos + width > len(data):
                raise InvalidArgument("fixed-width field runs past the message")
            yield number, wire, int.from_bytes(data[pos:pos + width], "little")
            pos += width
        else:
            raise InvalidArgument(f"unsupported wire type {wire}")


def _strings(data: bytes) -> dict[int, str]:
    """The string fields of a message by number (the last occurrence wins, as protobuf)."""
    out: dict[int, str] = {}
    for number, wire, value in _fields(data):
        if wire == _LEN and isinstance(value, bytes):
            try:
                out[number] = value.decode()
            except UnicodeDecodeError as err:
                raise InvalidArgument(f"field {number} is not UTF-8") from err
    return out


@dataclass(frozen=True)
class PullRequest:
    """What the keychain needs of a PullImage: the image as asked, its credentials."""

    image: str
    credentials: Credentials | None
    server_address: str = ""


def parse_pull_request(data: bytes) -> PullRequest:
    """Read ``PullImageRequest{image: ImageSpec{image = 1} = 1, auth: AuthConfig = 2}``.
    InvalidArgument when the bytes are not such a message or ``auth.auth`` is not
    base64 of ``user:password``."""
    image_msg = auth_msg = b""
    for number, wire, value in _fields(data):
        if wire == _LEN and isinstance(value, bytes):
            if number == 1:
                image_msg = value
            elif number == 2:
                auth_msg = value
    image = _strings(image_msg).get(1, "")
    if not auth_msg:
        return PullRequest(image, None)
    a = _strings(auth_msg)
    # AuthConfig: username 1, password 2, auth 3, server_address 4, identity_token 5,
    # registry_token 6 (kubelet fills username/password from pull secrets)
    username, password, auth = a.get(1, ""), a.get(2, ""), a.get(3, "")
    if auth and not (username or password):
        creds = Credentials.from_auth_string(auth)
        username, password = creds.username, creds.password
    creds = Credentials(username=username, password=password, registry_token=a.get(6, ""),
                        identity_token=a.get(5, ""))
    return PullRequest(image, None if creds.is_anonymous else creds, a.get(4, ""))


@dataclass
class CriKeychain:
    """Credentials of the PullImage calls seen, by image reference and by repository.
    Thread-safe. A keychain source (``name``, ``renewable``, ``find``): renewable, as a
    later PullImage of the image (a new pod) brings the credentials kubelet has then."""

    name: str = "CRI keychain"
    renewable: bool = True
    max_entries: int = MAX_ENTRIES
    _by_key: OrderedDict[str, Credentials] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_pull(self, request: bytes) -> str:
        """Remember the credentials of a PullImage request (its protobuf bytes); returns
        the image as asked (for logs). A request without credentials forgets none: an
        anonymous pull of an image does not drop the credentials of an earlier pull of
        it. InvalidArgument for a malformed request."""
        pull = parse_pull_request(request)
        if pull.credentials is None or not pull.image:
            return pull.image
        ref = parse_reference(pull.image)
        self.record(ref, pull.credentials)
        return pull.image

    def record(self, ref: Reference, creds: Credentials) -> None:
        with self._lock:
            for key in (str(ref), ref.name):
                self._by_key.pop(key, None)
                self._by_key[key] = creds
            while len(self._by_key) > self.max_entries:
                self._by_key.popitem(last=False)

    def find(self, ref: Reference, labels: Mapping[str, str]) -> Found | None:
        with self._lock:
            creds = self._by_key.get(str(ref)) or self._by_key.get(ref.name)
        if creds is None:
            return None
        return Found(creds, f"the CRI keychain (PullImage of {ref.name})", renewable=True)
