"""OCI distribution client shared by the daemon (lazy ranged chunk reads) and the
converter (pull and push).

Synchronous and thread-safe: the daemon calls :meth:`RegistryClient.read_blob_range`
from many worker threads at once; they share one pool of keep-alive connections,
one token cache and one redirect cache. Everything that can fail on the wire is
retried (see :mod:`.transport`); what is left surfaces as the pynydus taxonomy:
NotFound (404), Unauthorized (401/403 after auth), Unavailable (network, timeouts,
5xx after retries), DigestMismatch, ShortRead.

Redirects: a registry may answer blob GETs with a redirect to blob storage. As
nydusd does, the final URL is remembered per blob (for ``redirect_cache_ttl``
seconds) and later ranges go straight there without a registry round trip; if the
cached URL fails it is dropped and the read goes through the registry again.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

import httpx

from pynydus.errors import InvalidArgument, NotFound, NydusError, Unavailable, q

from . import media
from .auth import Credentials, repository_scope
from .documents import parse_index
from .errors import DigestMismatch, RegistryProtocolError, ShortRead
from .metrics import RegistryMetrics
from .reference import Reference, parse_reference, validate_digest, validate_repository
from .referrers import (
    add_referrer,
    empty_index,
    fallback_tag,
    filter_artifact_type,
    referrer_descriptor,
    subject_of,
)
from .transport import PROXY_COOLDOWN, RETRYABLE, Mirror, Request, Transport, raise_for_status
from .upload import MONOLITHIC_LIMIT, BlobSource, Upload, blob_opener, iter_file

MAX_MANIFEST_SIZE = 4 << 20   # the OCI spec's limit registries must accept
DEFAULT_CHUNK = 1 << 20
REDIRECT_CACHE_TTL = 60.0


_CACHED_URL_FAILURES: tuple[type[BaseException], ...] = (*RETRYABLE, NydusError)


class Manifest(NamedTuple):
    """A fetched manifest: unpacks as ``(media_type, digest, data)``."""

    media_type: str
    digest: str
    data: bytes

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass(frozen=True)
class Descriptor:
    """What a HEAD tells: media type, digest and size of a manifest or blob."""

    media_type: str
    digest: str
    size: int


def _hasher(digest: str) -> Any:
    alg = digest.split(":", 1)[0]
    try:
        return hashlib.new(alg)
    except ValueError as err:
        raise InvalidArgument(f"digest {q(digest)}: unsupported algorithm {alg!r}") from err


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _content_type(resp: httpx.Response) -> str:
    return str(resp.headers.get("content-type", "")).split(";", 1)[0].strip()


class _RedirectCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._d: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> str | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                return None
            if v[1] < time.monotonic():
                del self._d[key]
                return None
            return v[0]

    def put(self, key: tuple[str, str], url: str) -> None:
        if self.ttl > 0:
            with self._lock:
                self._d[key] = (url, time.monotonic() + self.ttl)

    def drop(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._d.pop(key, None)


class RegistryClient:
    """A client for one registry host (``host[:port]``, as in nydusd's backend config).

    ``auth``: Credentials, or nydusd's base64 ``user:password`` string;
    ``registry_token``: a bearer token used as-is; ``skip_verify`` (alias
    ``insecure``): accept any TLS certificate and fall back to http when the host
    speaks plain HTTP; ``timeout``/``connect_timeout``: seconds, 0 = none;
    ``retry_limit``: extra attempts after a retryable failure; ``proxy``: an
    HTTP(S) proxy URL (dfdaemon), bypassed for ``proxy_check_interval`` seconds when it
    cannot be reached (``proxy_fallback``); ``mirrors``: hosts tried in order before the origin for
    reads; ``blob_url_scheme``/``blob_redirected_host``: rewrite redirect targets
    (nydusd's keys of the same names); ``token_renewal``: renew bearer tokens in a
    background thread before they expire (see :mod:`.renewal`); ``client_cert``:
    (certificate, key) to present to the registry, the key "" when it is in the
    certificate's file; ``headers``: sent to the registry with every request. Close it
    (or use ``with``) to release connections and stop that thread.
    """

    def __init__(self, host: str, *, scheme: str = "https", skip_verify: bool = False,
                 insecure: bool | None = None, auth: Credentials | str | None = None,
                 registry_token: str | None = None, timeout: float = 5.0,
                 connect_timeout: float = 5.0, retry_limit: int = 3,
                 proxy: str | None = None, proxy_fallback: bool = True,
                 mirrors: Sequence[Mirror | str] = (), ca_cert_files: Sequence[str] = (),
                 redirect_cache_ttl: float = REDIRECT_CACHE_TTL, max_connections: int = 64,
                 blob_url_scheme: str = "", blob_redirected_host: str = "",
                 token_renewal: bool = True, proxy_check_interval: float = PROXY_COOLDOWN,
                 client_cert: tuple[str, str] | None = None,
                 headers: Mapping[str, str] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not host or "/" in host:
            raise InvalidArgument(f"registry host {q(host)}: want host[:port]")
        creds = Credentials.from_auth_string(auth) if isinstance(auth, str) else auth
        if registry_token:
            creds = Credentials(registry_token=registry_token)
        self.host = host
        self._t = Transport(
            host, scheme=scheme, skip_verify=bool(insecure) or skip_verify,
            credentials=creds, timeout=timeout, connect_timeout=connect_timeout,
            retry_limit=retry_limit, proxy=proxy, proxy_fallback=proxy_fallback,
            mirrors=mirrors, ca_cert_files=ca_cert_files, max_connections=max_connections,
            blob_url_scheme=blob_url_scheme, blob_redirected_host=blob_redirected_host,
            token_renewal=token_renewal, proxy_check_interval=proxy_check_interval,
            client_cert=client_cert, headers=headers, sleep=sleep)
        self._redirects = _RedirectCache(redirect_cache_ttl)
        self._sleep = sleep

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_reference(cls, ref: Reference | str, **kwargs: Any) -> RegistryClient:
        """A client for the registry of an image reference (Docker Hub's API host,
        http for loopback registries unless ``scheme`` is given)."""
        r = parse_reference(ref) if isinstance(ref, str) else ref
        kwargs.setdefault("scheme", r.default_scheme)
        return cls(r.api_host, **kwargs)

    # ------------------------------------------------------------------- lifecycle
    @property
    def metrics(self) -> RegistryMetrics:
        return self._t.metrics

    def close(self) -> None:
        """Release pooled connections. Idempotent."""
        self._t.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_credentials(self, auth: Credentials | str | None) -> None:
        """Replace the credentials (hot auth update); cached tokens are dropped."""
        creds = Credentials.from_auth_string(auth) if isinstance(auth, str) else auth
        self._t.set_credentials(creds)

    # ----------------------------------------------------------------- basics
    def ping(self) -> None:
        """``GET /v2/``: the registry answers and accepts our credentials."""
        what = f"registry {self.host}"

        def op() -> None:
            resp = self._t.exchange(Request("GET", "/v2/", what, pull=False))
            raise_for_status(resp, what)
        self._t.retrying(what, op)

    @staticmethod
    def _check(repo: str, digest: str | None = None) -> None:
        validate_repository(repo)
        if digest is not None:
            validate_digest(digest)

    # --------------------------------------------------------------- manifests
    def get_manifest(self, repo: str, ref: str,
                     accept: Sequence[str] = media.DEFAULT_MANIFEST_ACCEPT) -> Manifest:
        """Fetch manifest ``ref`` (tag or digest) of ``repo``.

        Returns ``(media_type, digest, data)``; the digest is computed from the bytes
        and, when ``ref`` is a digest, must equal it (else DigestMismatch). Raises
        NotFound naming repo and ref."""
        return self._get_manifest(repo, ref, accept, via_mirrors=True)

    def _get_manifest(self, repo: str, ref: str, accept: Sequence[str], *,
                      via_mirrors: bool) -> Manifest:
        self._check(repo)
        what = f"manifest {q(ref)} in {q(repo)}"
        by_digest = ":" in ref
        if by_digest:
            validate_digest(ref)

        def op() -> Manifest:
            resp = self._t.exchange(Request(
                "GET", f"/v2/{repo}/manifests/{ref}", what,
                (repository_scope(repo, "pull"),), {"Accept": ", ".join(accept)},
                pull=via_mirrors), stream=True)
            try:
                raise_for_status(resp, what)
                data = self._read_limited(resp, MAX_MANIFEST_SIZE, what)
            finally:
                resp.close()
            mt = _content_type(resp)
            if not mt or mt in ("application/json", "text/plain"):
                try:
                    mt = str(json.loads(data).get("mediaType") or mt)
                except (ValueError, AttributeError):
                    pass
            alg = ref.split(":", 1)[0] if by_digest else "sha256"
            digest = compute_digest(data, alg)
            if by_digest and digest != ref:
                raise DigestMismatch(f"{what}: content hashes to {digest}")
            return Manifest(mt, digest, data)
        return self._t.retrying(what, op)

    def head_manifest(self, repo: str, ref: str,
                      accept: Sequence[str] = media.DEFAULT_MANIFEST_ACCEPT) -> Descriptor:
        """Resolve ``ref`` without fetching the body (``Docker-Content-Digest``)."""
        self._check(repo)
        what = f"manifest {q(ref)} in {q(repo)}"

        def op() -> Descriptor:
            resp = self._t.exchange(Request(
                "HEAD", f"/v2/{repo}/manifests/{ref}", what,
                (repository_scope(repo, "pull"),), {"Accept": ", ".join(accept)}))
            raise_for_status(resp, what)
            digest = resp.headers.get("docker-content-digest") or (ref if ":" in ref else "")
            if not digest:
                raise RegistryProtocolError(f"{what}: HEAD answer has no Docker-Content-Digest")
            return Descriptor(_content_type(resp), digest,
                              int(resp.headers.get("content-length", "0")))
        return self._t.retrying(what, op)

    def put_manifest(self, repo: str, ref: str, media_type: str, data: bytes) -> str:
        """Push ``data`` as manifest ``ref`` (a tag, or its own digest). Returns the
        digest. Idempotent. If the manifest has a ``subject`` and the registry does
        not implement referrers (no ``OCI-Subject`` in the answer), the subject's
        referrers fallback tag index is updated, as the distribution spec asks."""
        self._check(repo)
        what = f"manifest {q(ref)} in {q(repo)}"
        digest = compute_digest(data)
        if ":" in ref and ref != digest:
            raise InvalidArgument(f"put {what}: content hashes to {digest}")

        def op() -> httpx.Response:
            resp = self._t.exchange(Request(
                "PUT", f"/v2/{repo}/manifests/{ref}", what,
                (repository_scope(repo, "pull,push"),), {"Content-Type": media_type},
                content=bytes(data), pull=False))
            raise_for_status(resp, what)
            return resp
        resp = self._t.retrying(what, op)
        self.metrics.add("bytes_written", len(data))
        subject = subject_of(data)
        if subject is not None and "oci-subject" not in resp.headers:
            self._add_to_fallback_index(repo, subject,
                                        referrer_descriptor(data, media_type, digest))
        return digest

    # -------------------------------------------------------------------- blobs
    def head_blob(self, repo: str, digest: str) -> Descriptor:
        """Size (and media type, if the registry says) of a blob; NotFound if absent.
        Mirrors may answer."""
        return self._head_blob(repo, digest, via_mirrors=True)

    def _head_blob(self, repo: str, digest: str, *, via_mirrors: bool) -> Descriptor:
        self._check(repo, digest)
        what = f"blob {q(digest)} in {q(repo)}"

        def op() -> Descriptor:
            resp = self._t.exchange(Request("HEAD", f"/v2/{repo}/blobs/{digest}", what,
                                            (repository_scope(repo, "pull"),),
                                            pull=via_mirrors))
            raise_for_status(resp, what)
            size = resp.headers.get("content-length")
            if size is None:
                raise RegistryProtocolError(f"{what}: HEAD answer has no Content-Length")
            return Descriptor(_content_type(resp), digest, int(size))
        return self._t.retrying(what, op)

    def blob_exists(self, repo: str, digest: str, *, origin_only: bool = False) -> bool:
        """Whether the blob is there (``origin_only``: ask the registry itself, not a
        mirror — what a pusher needs to know)."""
        try:
            self._head_blob(repo, digest, via_mirrors=not origin_only)
        except NotFound:
            return False
        return True

    def get_blob(self, repo: str, digest: str, *, chunk_size: int = DEFAULT_CHUNK,
                 verify: bool = True) -> Iterator[bytes]:
        """Stream a whole blob. After the last chunk the content is checked against
        ``digest`` (DigestMismatch on mismatch). A connection lost mid-way resumes with
        a Range request from the bytes already yielded (up to ``retry_limit`` times).
        Closing the iterator early closes the connection."""
        self._check(repo, digest)
        return self._blob_stream(repo, digest, chunk_size, verify)

    def _blob_stream(self, repo: str, digest: str, chunk_size: int,
                     verify: bool) -> Iterator[bytes]:
        what = f"blob {q(digest)} in {q(repo)}"
        h = _hasher(digest)
        received = 0
        attempt = 0
        while True:
            headers = {"Range": f"bytes={received}-"} if received else {}
            try:
                resp = self._t.exchange(Request("GET", f"/v2/{repo}/blobs/{digest}", what,
                                                (repository_scope(repo, "pull"),), headers),
                                        stream=True)
                try:
                    raise_for_status(resp, what)
                    skip = 0
                    if received and resp.status_code == 200:
                        skip = received  # range ignored: drop what we have already
                    elif received and resp.status_code == 206:
                        start = _content_range_start(resp)
                        if start != received:
                            raise RegistryProtocolError(
                                f"{what}: resumed at {received}, got range from {start}")
                    for chunk in resp.iter_bytes(chunk_size):
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        h.update(chunk)
                        received += len(chunk)
                        self.metrics.add("bytes_read", len(chunk))
                        yield chunk
                finally:
                    resp.close()
                break
            except RETRYABLE as err:
                attempt += 1
                if attempt > self._t.retry_limit:
                    raise Unavailable(f"{what}: registry {self.host} unavailable after "
                                      f"{attempt} attempts ({received} bytes read): "
                                      f"{type(err).__name__}: {err}") from err
                self.metrics.add("retries")
                self._sleep(self._t.backoff(attempt))
            except httpx.HTTPError as err:
                raise RegistryProtocolError(f"{what}: {type(err).__name__}: {err}") from err
        if verify and f"{digest.split(':', 1)[0]}:{h.hexdigest()}" != digest:
            raise DigestMismatch(f"{what}: {received} bytes hash to "
                                 f"{digest.split(':', 1)[0]}:{h.hexdigest()}")

    def read_blob_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of a blob with one HTTP Range GET.

        Returns exactly ``length`` bytes. A 206 must start at ``offset``; a 200 (range
        ignored) is sliced. Fewer bytes than asked is a ShortRead (retried); a range
        past the end of the blob is InvalidArgument. Redirect targets are cached per
        blob. Costs one request (none to the registry while a redirect is cached)."""
        if offset < 0 or length < 0:
            raise InvalidArgument(f"read blob {q(digest)}: negative offset or length")
        self._check(repo, digest)
        if length == 0:
            return b""
        what = f"blob {q(digest)} in {q(repo)} range {offset}+{length}"
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        key = (repo, digest)

        def op() -> bytes:
            cached = self._redirects.get(key)
            if cached is not None:
                try:
                    resp = self._t.send_direct("GET", cached, headers)
                    try:
                        raise_for_status(resp, what)
                        data = self._take_range(resp, offset, length, what)
                    finally:
                        resp.close()
                    self.metrics.add("redirect_cache_hits")
                    return data
                except _CACHED_URL_FAILURES:
                    self._redirects.drop(key)  # expired or revoked: ask the registry
            resp = self._t.exchange(Request("GET", f"/v2/{repo}/blobs/{digest}", what,
                                            (repository_scope(repo, "pull"),), headers),
                                    stream=True)
            try:
                raise_for_status(resp, what)
                data = self._take_range(resp, offset, length, what)
            finally:
                resp.close()
            if resp.extensions.get("pynydus_redirected"):
                self._redirects.put(key, str(resp.request.url))
            return data
        return self._t.retrying(what, op)

    def _take_range(self, resp: httpx.Response, offset: int, length: int, what: str) -> bytes:
        if resp.status_code == 206:
            start, total = _content_range(resp)
            if start != offset:
                raise RegistryProtocolError(f"{what}: server sent a range from {start}")
            if total is not None and offset + length > total:
                raise InvalidArgument(f"{what}: past the end of the blob (size {total})")
            skip = 0
        elif resp.status_code == 200:
            total = int(resp.headers["content-length"]) if \
                "content-length" in resp.headers else None
            if total is not None and offset + length > total:
                raise InvalidArgument(f"{what}: past the end of the blob (size {total})")
            skip = offset
        else:
            raise RegistryProtocolError(f"{what}: unexpected HTTP {resp.status_code}")
        declared = resp.headers.get("content-length")
        if not skip and declared is not None and declared.isdigit() and \
                int(declared) <= length:
            data = resp.read()  # the common case: one buffer, no re-slicing
        else:
            parts: list[bytes] = []
            got = 0
            for chunk in resp.iter_bytes():
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                parts.append(chunk)
                got += len(chunk)
                if got >= length:
                    break
            data = b"".join(parts)
        if len(data) < length:
            self.metrics.add("errors")
            raise ShortRead(f"{what}: got {len(data)} of {length} bytes")
        self.metrics.add("bytes_read", length)
        return data if len(data) == length else data[:length]

    @staticmethod
    def _read_limited(resp: httpx.Response, limit: int, what: str) -> bytes:
        buf = bytearray()
        for chunk in resp.iter_bytes():
            buf += chunk
            if len(buf) > limit:
                raise RegistryProtocolError(f"{what}: larger than {limit} bytes")
        return bytes(buf)

    # --------------------------------------------------------------------- push
    def push_blob(self, repo: str, source: BlobSource, digest: str, *,
                  size: int | None = None, mount_from: str | None = None,
                  chunk_size: int | None = None) -> str:
        """Upload a blob unless the repository has it already.

        ``source``: bytes, a path, or a binary file object (read from its current
        position; it must be seekable for retries). With ``mount_from`` a cross-repo
        mount is tried first. Uploads are monolithic (POST then one PUT) unless
        ``chunk_size`` is given or the blob is larger than 64 MiB (then PATCH chunks,
        then PUT). Returns ``"exists"``, ``"mounted"`` or ``"uploaded"``. The registry
        checks the digest (DigestMismatch). Idempotent."""
        self._check(repo, digest)
        if mount_from is not None:
            validate_repository(mount_from)
        opener, total = blob_opener(source, size)
        if self.blob_exists(repo, digest, origin_only=True):
            return "exists"
        what = f"push blob {q(digest)} to {q(repo)}"
        if chunk_size is None and total > MONOLITHIC_LIMIT:
            chunk_size = 16 << 20
        if chunk_size is not None and chunk_size <= 0:
            raise InvalidArgument(f"{what}: chunk_size must be positive")

        up = Upload(self._t, repo, digest, what)

        def op() -> str:
            location = up.start(mount_from)
            if location is None:
                return "mounted"
            with opener() as f:
                if chunk_size is not None and total > chunk_size:
                    up.finish(up.patch_chunks(location, f, total, chunk_size), b"")
                else:
                    up.finish(location, iter_file(f, total), total)
            return "uploaded"
        return self._t.retrying(what, op)

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount only: True if the registry mounted it. A started
        upload session (mount refused) is cancelled."""
        self._check(repo, digest)
        validate_repository(from_repo)
        what = f"mount blob {q(digest)} from {q(from_repo)} to {q(repo)}"
        up = Upload(self._t, repo, digest, what)
        loc = self._t.retrying(what, lambda: up.start(from_repo))
        if loc is None:
            return True
        up.cancel(loc)
        return False

    # ---------------------------------------------------------------- listings
    def list_tags(self, repo: str) -> list[str]:
        """All tags of ``repo`` (following ``Link`` pagination)."""
        self._check(repo)
        what = f"tags of {q(repo)}"
        tags: list[str] = []
        target = f"/v2/{repo}/tags/list"
        while target:
            def op(t: str = target) -> httpx.Response:
                resp = self._t.exchange(Request("GET", t, what,
                                                (repository_scope(repo, "pull"),)))
                raise_for_status(resp, what)
                return resp
            resp = self._t.retrying(what, op)
            tags.extend(resp.json().get("tags") or [])
            link = resp.links.get("next", {}).get("url")
            target = str(resp.request.url.join(link)) if link else ""
        return tags

    def get_referrers(self, repo: str, digest: str,
                      artifact_type: str | None = None) -> dict[str, Any]:
        """The image index of manifests whose ``subject`` is ``digest``: the referrers
        API when the registry has it, else the fallback tag, else an empty index."""
        doc = self.referrers_api(repo, digest, artifact_type)
        if doc is not None:
            return doc
        return self.referrers_fallback(repo, digest, artifact_type)

    def referrers_api(self, repo: str, digest: str,
                      artifact_type: str | None = None) -> dict[str, Any] | None:
        """The referrers API's index for ``digest``; None when the registry has no
        referrers API (it answers 404 there; one that has it answers 200 even for a
        digest nothing refers to)."""
        self._check(repo, digest)
        what = f"referrers of {q(digest)} in {q(repo)}"

        def op() -> dict[str, Any] | None:
            resp = self._t.exchange(Request(
                "GET", f"/v2/{repo}/referrers/{digest}", what,
                (repository_scope(repo, "pull"),), {"Accept": media.OCI_INDEX},
                params={"artifactType": artifact_type} if artifact_type else None))
            if resp.status_code == 404:
                resp.close()
                return None
            raise_for_status(resp, what)
            doc = parse_index(resp.content, what)
            if artifact_type and "artifactType" not in resp.headers.get(
                    "oci-filters-applied", ""):
                doc = filter_artifact_type(doc, artifact_type)
            return doc
        return self._t.retrying(what, op)

    def referrers_fallback(self, repo: str, digest: str,
                           artifact_type: str | None = None) -> dict[str, Any]:
        """The referrers index kept under ``digest``'s fallback tag (registries without
        the referrers API); an empty index when there is none."""
        self._check(repo, digest)
        what = f"referrers of {q(digest)} in {q(repo)}"
        try:
            m = self.get_manifest(repo, fallback_tag(digest), accept=(media.OCI_INDEX,))
        except NotFound:
            return empty_index()
        return filter_artifact_type(parse_index(m.data, what), artifact_type)

    def _add_to_fallback_index(self, repo: str, subject: str, desc: dict[str, Any]) -> None:
        tag = fallback_tag(subject)
        try:
            index = parse_index(
                self._get_manifest(repo, tag, (media.OCI_INDEX,), via_mirrors=False).data,
                f"referrers tag {q(tag)}")
        except NotFound:
            index = empty_index()
        body = json.dumps(add_referrer(index, desc), separators=(",", ":")).encode()
        self.put_manifest(repo, tag, media.OCI_INDEX, body)


# ------------------------------------------------------------------------- helpers
def _content_range(resp: httpx.Response) -> tuple[int, int | None]:
    """``Content-Range: bytes a-b/total`` → (a, total or None for ``*``)."""
    cr = resp.headers.get("content-range", "")
    try:
        unit, _, rest = cr.partition(" ")
        span, _, total = rest.partition("/")
        start = int(span.split("-", 1)[0])
        if unit != "bytes":
            raise ValueError(unit)
    except ValueError as err:
        raise RegistryProtocolError(f"bad Content-Range {cr!r} in a 206 answer") from err
    return start, (int(total) if total and total != "*" else None)


def _content_range_start(resp: httpx.Response) -> int:
    return _content_range(resp)[0]
