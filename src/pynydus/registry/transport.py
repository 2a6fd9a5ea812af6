"""HTTP exchanges with a registry: endpoints, auth, redirects, retries, metrics.

One :class:`Transport` owns a pool of keep-alive HTTP/1.1 sockets (:mod:`.http1`) for
GETs and HEADs (blob ranges, manifests: the daemon's misses), one pooled ``httpx.Client``
for everything else (built when first needed for a plain-http registry, which then
never builds a TLS context unless a redirect leads to https) and, with a proxy
configured, a second direct one for proxy fallback; with a proxy every request goes
through httpx. It knows nothing of manifests or blobs; :mod:`.client` builds those on:

* :meth:`Transport.exchange` — one attempt: try each healthy mirror (pull requests
  only), then the origin; answer a 401 challenge once; follow redirects by hand,
  dropping ``Authorization`` when the redirect leaves the registry's host (blob
  storage such as S3 rejects foreign credentials on a presigned URL).
* :meth:`Transport.retrying` — bounded retries with exponential backoff and jitter
  around a whole operation (request *and* body read), for transport errors,
  timeouts, 429/5xx and truncated bodies; 4xx are answers, never retried.
* :func:`raise_for_status` — maps an HTTP answer to the error taxonomy.
"""

from __future__ import annotations

import functools
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import httpx

from pynydus.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplementedFeature,
    Unavailable,
)

from .auth import (
    Challenge,
    Credentials,
    Token,
    TokenCache,
    TokenKey,
    merge_scopes,
    parse_challenges,
    parse_token_response,
    pick_challenge,
)
from .errors import DigestMismatch, RegistryProtocolError, ShortRead, Unauthorized
from .http1 import Http1Pool
from .metrics import RegistryMetrics
from .renewal import TokenRenewer

T = TypeVar("T")
log = logging.getLogger(__name__)


USER_AGENT = "pynydus-registry/0.1"
CLIENT_ID = "pynydus-registry-client"
MAX_REDIRECTS = 5
BACKOFF_BASE = 0.1      # first retry after ~100 ms, as nydusd's prefetch retry
BACKOFF_CAP = 2.0
MIRROR_FAILURE_LIMIT = 3
MIRROR_COOLDOWN = 30.0  # seconds a failing mirror is skipped before it is tried again
PROXY_COOLDOWN = 5.0    # seconds a proxy that failed is bypassed (nydusd's check_interval)
RETRY_AFTER_CAP = 5.0   # longest Retry-After we wait for before the next attempt
PING_TIMEOUT = 3.0      # a mirror's ping_url must answer within this (upstream's 3 s)


@dataclass
class Mirror:
    """A host tried before the origin for pulls (a pull-through cache, dfdaemon).

    ``url``: ``scheme://host[:port][/path]`` (a bare host takes the client's scheme); the
    API root is ``<path>/v2``, or ``<path>`` itself with ``override_path`` (containerd's
    ``hosts.toml`` rule); ``headers``: extra headers sent to it (e.g. Dragonfly's
    ``X-Dragonfly-Registry``); ``credentials``: its own; origin credentials are never sent
    to a mirror; ``failure_limit`` failures in a row make it skipped for ``cooldown``
    seconds (nydusd's ``failure_limit`` and ``health_check_interval``); after that one
    failure skips it again, and with a ``ping_url`` it is used again only once that URL
    answers 2xx. ``ca_cert_files``, ``client_cert`` (certificate, key or "" when the key
    is in the certificate's file), ``skip_verify`` and ``connect_timeout`` give it TLS
    and dial settings of its own (None: the client's)."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    credentials: Credentials | None = None
    failure_limit: int = MIRROR_FAILURE_LIMIT
    cooldown: float = MIRROR_COOLDOWN
    ping_url: str = ""
    override_path: bool = False
    ca_cert_files: Sequence[str] = ()
    client_cert: tuple[str, str] | None = None
    skip_verify: bool | None = None
    connect_timeout: float | None = None


@dataclass
class Endpoint:
    base: str                       # scheme://netloc
    is_mirror: bool
    headers: Mapping[str, str]
    credentials: Credentials | None
    failure_limit: int = MIRROR_FAILURE_LIMIT
    cooldown: float = MIRROR_COOLDOWN
    failures: int = 0
    skip_until: float = 0.0
    root: str = "/v2"               # API root path: what replaces "/v2" of a target
    ping_url: str = ""
    skip_verify: bool = False
    http: httpx.Client | None = None  # its own TLS/dial settings; None: the transport's
    probation: bool = False         # skipped before: one failure skips it again
    probing: bool = False           # a thread is pinging it now

    @property
    def netloc(self) -> str:
        return urlsplit(self.base).netloc


@functools.cache
def shared_ssl_context(verify: bool) -> ssl.SSLContext:
    """The TLS context every client of this process shares when no CA file nor client
    certificate is configured (httpx's own default: the certifi bundle, or no
    verification). Loading the bundle costs 0.1 s per client (1 s for the first), which
    a client per layer or per image would pay each time."""
    return httpx.create_ssl_context(verify=verify, trust_env=False)


def tls_verify(ca_cert_files: Sequence[str], skip_verify: bool,
               client_cert: tuple[str, str] | None) -> bool | ssl.SSLContext:
    """httpx's ``verify`` for these settings: the system CAs plus ``ca_cert_files`` (all
    of them ignored with ``skip_verify``) and a client certificate to present."""
    if not ca_cert_files and not client_cert:
        return shared_ssl_context(not skip_verify)
    ctx = ssl.create_default_context()
    if skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        for f in ca_cert_files:
            try:
                ctx.load_verify_locations(cafile=f)
            except (OSError, ssl.SSLError) as err:
                raise InvalidArgument(f"CA certificate {f}: cannot load: {err}") from err
    if client_cert:
        cert, key = client_cert
        try:
            ctx.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as err:
            raise InvalidArgument(f"client certificate {cert}"
                                  f"{' with key ' + key if key else ''}: cannot load: "
                                  f"{err}") from err
    return ctx


@dataclass
class Request:
    """What :meth:`Transport.exchange` sends. ``target`` is a path below the endpoint
    (``/v2/...``) or an absolute URL on the origin (upload ``Location``)."""

    method: str
    target: str
    what: str                               # for messages: 'blob "sha256:…" in "repo"'
    scopes: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str | Sequence[str]] | None = None
    content: bytes | Iterable[bytes] | None = None
    pull: bool = True                       # may be served by a mirror
    follow_redirects: bool = True


class RetryableStatus(Exception):
    """A 429/5xx answer, raised inside :meth:`Transport.retrying`."""

    def __init__(self, status: int, url: str, body: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} from {url}" + (f": {body}" if body else ""))
        self.status = status
        self.retry_after = retry_after


def _retry_after(resp: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (the delta form; dates are ignored)."""
    v = resp.headers.get("retry-after", "").strip()
    return float(v) if v.isdigit() else None


RETRYABLE: tuple[type[BaseException], ...] = (httpx.TransportError, RetryableStatus, ShortRead)


def _body_excerpt(resp: httpx.Response) -> str:
    try:
        if not resp.is_stream_consumed:
            resp.read()
        return resp.text[:300].strip()
    except (httpx.HTTPError, UnicodeDecodeError):
        return ""


def raise_for_status(resp: httpx.Response, what: str) -> None:
    """Map a final answer to the taxonomy; return for 2xx/3xx.

    404 → NotFound, 401/403 → Unauthorized, 416 → InvalidArgument, 429/5xx →
    RetryableStatus (retrying turns it into Unavailable), 400 DIGEST_INVALID →
    DigestMismatch, 405 → NotImplementedFeature, other 4xx → FailedPrecondition."""
    st = resp.status_code
    if st < 400:
        return
    body = _body_excerpt(resp)
    resp.close()
    if st == 404:
        raise NotFound(f"{what}: not found (HTTP 404 from {resp.request.url})")
    if st in (401, 403):
        raise Unauthorized(f"{what}: unauthorized (HTTP {st}): {body}", status=st,
                           challenge=resp.headers.get("www-authenticate", ""))
    if st == 429 or st >= 500:
        raise RetryableStatus(st, str(resp.request.url), body, _retry_after(resp))
    if st == 416:
        raise InvalidArgument(f"{what}: range not satisfiable (HTTP 416): {body}")
    if st == 400 and "DIGEST_INVALID" in body:
        raise DigestMismatch(f"{what}: registry says the digest does not match: {body}")
    if st == 405:
        raise NotImplementedFeature(f"{what}: the registry does not allow this (HTTP 405)")
    raise FailedPrecondition(f"{what}: HTTP {st}: {body}")


def _replayable(content: bytes | Iterable[bytes] | None) -> bool:
    return content is None or isinstance(content, bytes)


def _tls_speaks_plain_http(err: BaseException) -> bool:
    text = str(err).lower()
    return "wrong version number" in text or "wrong_version_number" in text or \
        "record layer failure" in text or "packet length too long" in text


class Transport:
    """Endpoints, connection pools, auth state and retry policy of one registry."""

    def __init__(self, host: str, *, scheme: str = "https", skip_verify: bool = False,
                 credentials: Credentials | None = None, timeout: float = 5.0,
                 connect_timeout: float = 5.0, retry_limit: int = 3,
                 proxy: str | None = None, proxy_fallback: bool = True,
                 mirrors: Sequence[Mirror | str] = (), ca_cert_files: Sequence[str] = (),
                 max_connections: int = 64, metrics: RegistryMetrics | None = None,
                 blob_url_scheme: str = "", blob_redirected_host: str = "",
                 token_renewal: bool = True, proxy_check_interval: float = PROXY_COOLDOWN,
                 client_cert: tuple[str, str] | None = None,
                 headers: Mapping[str, str] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if scheme not in ("http", "https"):
            raise InvalidArgument(f"registry scheme {scheme!r}: want http or https")
        if retry_limit < 0:
            raise InvalidArgument("registry retry_limit must be >= 0")
        self.host = host
        self.skip_verify = skip_verify
        self.retry_limit = retry_limit
        # nydusd's blob_url_scheme / blob_redirected_host: rewrite where redirects
        # point, e.g. to reach blob storage through an internal endpoint.
        self.blob_url_scheme = blob_url_scheme
        self.blob_redirected_host = blob_redirected_host
        self.metrics = metrics if metrics is not None else RegistryMetrics()
        self.tokens = TokenCache()
        # token key -> (endpoint, challenge, what) it was fetched for, and when it
        # was last sent: what the background renewer needs to fetch it again.
        self._token_sources: dict[TokenKey, tuple[Endpoint, Challenge, str]] = {}
        self._token_used: dict[TokenKey, float] = {}
        self._renewer = TokenRenewer(self.renew_due, f"token-renewal {host}") \
            if token_renewal else None
        self._credentials = credentials
        self._sleep = sleep
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}   # netloc -> last challenge seen
        self.origin = Endpoint(f"{scheme}://{host}", False, dict(headers or {}), credentials,
                               skip_verify=skip_verify)
        self._timeout, self._connect_timeout = timeout, connect_timeout
        self._limits = httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=max_connections)
        self._proxy = proxy
        self._tls_settings = (list(ca_cert_files), skip_verify, client_cert)
        self._tls: ssl.SSLContext | None = None
        self._http_client: httpx.Client | None = None
        self._pool = None if proxy else Http1Pool(
            timeout=timeout, connect_timeout=connect_timeout, tls=self._tls_context,
            max_idle=max_connections, default_headers={"User-Agent": USER_AGENT, "Accept": "*/*"})
        if scheme == "https" or proxy or mirrors or ca_cert_files or client_cert:
            self._http_client = self._make_client(proxy, self._tls_context(), connect_timeout)
        self._direct = self._make_client(None, self._tls_context(), connect_timeout) \
            if proxy and proxy_fallback else None
        self._proxy_down_until = 0.0
        self._proxy_check_interval = proxy_check_interval  # nydusd's proxy check_interval
        self.mirrors = [self._mirror_endpoint(m, scheme, ca_cert_files) for m in mirrors]

    def _tls_context(self) -> ssl.SSLContext:
        """The TLS context of the registry's settings, built at its first use."""
        with self._lock:
            if self._tls is None:
                verify = tls_verify(*self._tls_settings)
                assert isinstance(verify, ssl.SSLContext)
                self._tls = verify
            return self._tls

    @property
    def _http(self) -> httpx.Client:
        """The httpx client (built at the first request that needs it, for a
        plain-http registry: a challenge to answer, a body to send)."""
        client = self._http_client
        if client is None:
            verify = self._tls_context()
            with self._lock:
                if self._http_client is None:
                    self._http_client = self._make_client(self._proxy, verify,
                                                          self._connect_timeout)
                client = self._http_client
        return client

    def _make_client(self, proxy_url: str | None, verify: bool | ssl.SSLContext,
                     connect_timeout: float) -> httpx.Client:
        # trust_env off: HTTP(S)_PROXY of the daemon's environment must not
        # silently reroute registry traffic; the proxy is explicit config.
        t = httpx.Timeout(self._timeout or None, connect=connect_timeout or None)
        return httpx.Client(proxy=proxy_url, verify=verify, timeout=t, limits=self._limits,
                            follow_redirects=False, headers={"User-Agent": USER_AGENT},
                            trust_env=False)

    def _mirror_endpoint(self, m: Mirror | str, scheme: str,
                         ca_cert_files: Sequence[str]) -> Endpoint:
        mirror = Mirror(m) if isinstance(m, str) else m
        url = mirror.url.rstrip("/")
        if "://" not in url:
            url = f"{scheme}://{url}"
        u = urlsplit(url)
        path = u.path.rstrip("/")
        root = (path or "/") if mirror.override_path else \
            (path if path.endswith("/v2") else path + "/v2")
        skip = self.skip_verify if mirror.skip_verify is None else mirror.skip_verify
        own = mirror.ca_cert_files or mirror.client_cert or mirror.skip_verify is not None \
            or mirror.connect_timeout is not None
        http = None
        if own:
            verify = tls_verify([*ca_cert_files, *mirror.ca_cert_files], skip,
                                mirror.client_cert)
            http = self._make_client(self._proxy, verify, self._connect_timeout
                                     if mirror.connect_timeout is None else
                                     mirror.connect_timeout)
        return Endpoint(f"{u.scheme}://{u.netloc}", True, dict(mirror.headers),
                        mirror.credentials, max(1, mirror.failure_limit), mirror.cooldown,
                        root=root, ping_url=mirror.ping_url, skip_verify=skip, http=http)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop token renewal, close pooled connections; idempotent."""
        if self._renewer is not None:
            self._renewer.stop()
        if self._pool is not None:
            self._pool.close()
        if self._http_client is not None:
            self._http_client.close()
        if self._direct is not None:
            self._direct.close()
        for ep in self.mirrors:
            if ep.http is not None:
                ep.http.close()

    def set_credentials(self, credentials: Credentials | None) -> None:
        """Swap origin credentials (nydusd's hot auth update): cached tokens and the
        Basic header obtained with the old ones are dropped."""
        with self._lock:
            self._credentials = credentials
            self.origin.credentials = credentials
            self._token_sources.clear()
        self.tokens.clear()

    # -------------------------------------------------------------------- retries
    def backoff(self, attempt: int) -> float:
        """Delay before retry ``attempt`` (1-based): exponential, capped, jittered."""
        d = min(BACKOFF_CAP, BACKOFF_BASE * (2.0 ** (attempt - 1)))
        return d * (0.5 + random.random() / 2)

    def retrying(self, what: str, op: Callable[[], T], *, retries: int | None = None) -> T:
        """Run ``op``; on a retryable failure sleep and run it again, at most
        ``retries`` (default ``retry_limit``) more times. The last failure becomes
        Unavailable naming ``what`` (a ShortRead stays ShortRead, itself Unavailable)."""
        limit = self.retry_limit if retries is None else retries
        attempt = 0
        while True:
            try:
                return op()
            except RETRYABLE as err:
                delay_hint = getattr(err, "retry_after", None)
                if attempt >= limit:
                    if isinstance(err, ShortRead):
                        raise
                    raise Unavailable(
                        f"{what}: registry {self.host} unavailable after "
                        f"{attempt + 1} attempts: {type(err).__name__}: {err}") from err
            except httpx.HTTPError as err:
                # Not worth retrying: too many redirects, a Location we cannot
                # follow, undecodable content.
                raise RegistryProtocolError(f"{what}: {type(err).__name__}: {err}") from err
            attempt += 1
            self.metrics.add("retries")
            delay = self.backoff(attempt)
            if delay_hint is not None:
                # Honour the registry's rate limit, but never sleep past the cap:
                # a FUSE read is waiting on this.
                delay = max(delay, min(float(delay_hint), RETRY_AFTER_CAP))
            self._sleep(delay)

    # ------------------------------------------------------------------- exchange
    def exchange(self, req: Request, *, stream: bool = False) -> httpx.Response:
        """One attempt at ``req``: mirrors first (pulls only), then the origin.

        Returns the response with any status; the caller checks it (and closes it when
        ``stream``). Raises transport errors, Unauthorized from the origin, and
        RetryableStatus never (statuses are left to the caller)."""
        if req.pull and self.mirrors and not req.target.startswith(("http://", "https://")):
            for ep in self.mirrors:
                if not self._mirror_usable(ep):
                    continue
                try:
                    resp = self._exchange_at(ep, req, stream)
                except (httpx.TransportError, Unauthorized) as err:
                    self._mirror_failed(ep, f"{type(err).__name__}: {err}")
                    continue
                if resp.status_code < 400 or resp.status_code == 416:
                    self._mirror_answered(ep)
                    return resp
                resp.close()
                self._mirror_failed(ep, f"HTTP {resp.status_code} for {req.what}")
        return self._exchange_at(self.origin, req, stream)

    def _mirror_usable(self, ep: Endpoint) -> bool:
        """Not skipped; a mirror coming back from a skip with a ``ping_url`` is pinged
        first (by one thread; the others go on to the next endpoint meanwhile)."""
        with self._lock:
            if ep.skip_until > time.monotonic() or ep.probing:
                return False
            if not (ep.probation and ep.ping_url):
                return True
            ep.probing = True
        ok = False
        try:
            client = ep.http or self._http
            resp = client.get(ep.ping_url, headers=dict(ep.headers), timeout=PING_TIMEOUT)
            ok = 200 <= resp.status_code < 300
            why = f"HTTP {resp.status_code}"
        except httpx.HTTPError as err:
            why = f"{type(err).__name__}: {err}"
        with self._lock:
            ep.probing = False
            if ok:
                ep.probation = False
            else:
                ep.skip_until = time.monotonic() + ep.cooldown
        if ok:
            log.info("registry mirror %s: %s answers again; reads go to it", ep.base,
                     ep.ping_url)
        else:
            log.info("registry mirror %s: ping %s failed (%s); skipped for %g s more",
                     ep.base, ep.ping_url, why, ep.cooldown)
        return ok

    def _mirror_failed(self, ep: Endpoint, why: str) -> None:
        self.metrics.add("mirror_fallbacks")
        with self._lock:
            ep.failures += 1
            if not (ep.probation or ep.failures >= ep.failure_limit):
                return
            first = not ep.probation
            ep.skip_until = time.monotonic() + ep.cooldown
            ep.failures = 0
            ep.probation = True
        # once per outage at warning level; each later failed retry at info
        (log.warning if first else log.info)(
            "registry mirror %s failed (%s); skipped for %g s, reads go to the next "
            "mirror or the registry %s", ep.base, why, ep.cooldown, self.host)

    def _mirror_answered(self, ep: Endpoint) -> None:
        if ep.failures or ep.probation:
            with self._lock:
                back, ep.probation, ep.failures = ep.probation, False, 0
            if back:
                log.info("registry mirror %s answers again; reads go to it", ep.base)

    def _url(self, ep: Endpoint, target: str) -> str:
        if target.startswith(("http://", "https://")):
            return target
        if target.startswith("/v2"):
            return ep.base + ep.root.rstrip("/") + target[len("/v2"):]
        return ep.base + target

    def _exchange_at(self, ep: Endpoint, req: Request, stream: bool) -> httpx.Response:
        url = self._url(ep, req.target)
        sent_auth = self._cached_authorization(ep, req)
        resp = self._send(ep, req.method, url, req, sent_auth, stream)
        if resp.status_code == 401 and not _replayable(req.content):
            self._refused_streamed_body(ep, req, resp, sent_auth)
        if resp.status_code == 401 and sent_auth is not None and \
                not resp.headers.get_list("www-authenticate"):
            # Harbor answers an expired token with a bare 401; ask again without
            # credentials to get a challenge we can answer (nydusd does the same).
            resp.close()
            resp = self._send(ep, req.method, url, req, None, stream)
        if resp.status_code == 401:
            challenges = parse_challenges(resp.headers.get_list("www-authenticate"))
            body = _body_excerpt(resp)
            resp.close()
            challenge = pick_challenge(challenges)
            if challenge is None:
                raise Unauthorized(f"{req.what}: HTTP 401 without a usable challenge: {body}")
            with self._lock:
                self._challenges[ep.netloc] = challenge
            if sent_auth is not None:
                self._forget_authorization(ep, req, challenge, sent_auth)
            auth = self._answer_challenge(ep, req, challenge)
            if auth is None:
                raise Unauthorized(
                    f"{req.what}: registry {ep.netloc} requires authentication and no "
                    f"usable credentials are configured", challenge=str(challenge.params))
            resp = self._send(ep, req.method, url, req, auth, stream)
            if resp.status_code == 401:
                body = _body_excerpt(resp)
                resp.close()
                raise Unauthorized(f"{req.what}: registry {ep.netloc} rejected our "
                                   f"credentials (HTTP 401): {body}",
                                   challenge=resp.headers.get("www-authenticate", ""))
        return resp

    def _refused_streamed_body(self, ep: Endpoint, req: Request, resp: httpx.Response,
                               sent_auth: str | None) -> None:
        """A 401 to a request whose body was streamed (a blob upload): the body is
        spent, so learn the challenge, drop the refused token and let the caller's
        retry reopen the source; the next attempt fetches a fresh token up front."""
        challenge = pick_challenge(parse_challenges(resp.headers.get_list("www-authenticate")))
        resp.close()
        with self._lock:
            if challenge is not None:
                self._challenges[ep.netloc] = challenge
            challenge = self._challenges.get(ep.netloc)
        if challenge is not None and sent_auth is not None:
            self._forget_authorization(ep, req, challenge, sent_auth)
        raise RetryableStatus(401, str(resp.request.url), "streamed body refused by auth")

    def _send(self, ep: Endpoint, method: str, url: str, req: Request, auth: str | None,
              stream: bool) -> httpx.Response:
        hops = 0
        params = req.params
        content = req.content
        while True:
            headers = {**ep.headers, **req.headers}
            if auth is not None and urlsplit(url).netloc == ep.netloc:
                headers["Authorization"] = auth
            resp = self._send_raw(method, url, headers, params, content, stream, ep)
            if not (req.follow_redirects and resp.status_code in (301, 302, 303, 307, 308)
                    and "location" in resp.headers):
                if hops:
                    resp.extensions["pynydus_redirected"] = True
                return resp
            hops += 1
            if not _replayable(content):
                resp.close()
                raise RegistryProtocolError(
                    f"{req.what}: redirected ({resp.status_code}) while sending a streamed body")
            if hops > MAX_REDIRECTS:
                resp.close()
                raise httpx.TooManyRedirects(f"{req.what}: more than {MAX_REDIRECTS} redirects",
                                             request=resp.request)
            url = self._rewrite_redirect(urljoin(str(resp.request.url), resp.headers["location"]))
            resp.close()
            self.metrics.add("redirects")
            params = None  # the Location carries its own query
            if resp.status_code == 303:
                method, content = "GET", None

    def _rewrite_redirect(self, url: str) -> str:
        if not (self.blob_url_scheme or self.blob_redirected_host):
            return url
        u = urlsplit(url)
        return u._replace(scheme=self.blob_url_scheme or u.scheme,
                          netloc=self.blob_redirected_host or u.netloc).geturl()

    def send_direct(self, method: str, url: str, headers: Mapping[str, str]) -> httpx.Response:
        """One streamed request to an absolute URL without auth, mirrors, redirects or
        retries (a cached blob-storage redirect target). The caller closes it."""
        return self._send_raw(method, url, headers, None, None, True)

    def _send_raw(self, method: str, url: str, headers: Mapping[str, str],
                  params: Mapping[str, str | Sequence[str]] | None,
                  content: bytes | Iterable[bytes] | None, stream: bool,
                  ep: Endpoint | None = None) -> httpx.Response:
        if self._pool is not None and method in ("GET", "HEAD") and content is None \
                and not params \
                and (ep is None or ep.http is None):
            try:
                return self._pooled(method, url, headers, ep, stream)
            except httpx.InvalidURL:
                pass  # a URL or header the pool does not send: httpx says what is wrong
        client = self._http
        if ep is not None and ep.http is not None:
            client = ep.http
        elif self._direct is not None and time.monotonic() < self._proxy_down_until:
            client = self._direct
        if params:
            # httpx replaces a URL's query with ``params``; upload Locations carry state
            # in their query that must survive, so merge instead.
            url = str(httpx.URL(url).copy_merge_params(params))
            params = None
        t0 = time.monotonic()
        try:
            request = client.build_request(method, url, headers=headers, content=content)
            try:
                resp = client.send(request, stream=stream)
            except (httpx.ProxyError, httpx.ConnectError) as err:
                if client is self._http and self._direct is not None:
                    # The proxy is down: go direct for a while (nydusd's proxy
                    # fallback). Only a replayable body is resent at once; a
                    # streamed one goes direct on the caller's retry.
                    self._proxy_down_until = time.monotonic() + self._proxy_check_interval
                    if not _replayable(content):
                        raise
                    self.metrics.observe(time.monotonic() - t0, None)
                    t0 = time.monotonic()
                    resp = self._direct.send(client.build_request(
                        method, url, headers=headers, params=params, content=content),
                        stream=stream)
                elif ep is not None and url.startswith(ep.base) and \
                        self._should_downgrade(ep, err):
                    self.metrics.observe(time.monotonic() - t0, None)
                    t0 = time.monotonic()
                    url = self._downgrade(ep, url)
                    resp = client.send(client.build_request(
                        method, url, headers=headers, params=params, content=content),
                        stream=stream)
                else:
                    raise
        except httpx.HTTPError:
            self.metrics.observe(time.monotonic() - t0, None)
            raise
        self.metrics.observe(time.monotonic() - t0, resp.status_code)
        return resp

    def _pooled(self, method: str, url: str, headers: Mapping[str, str], ep: Endpoint | None,
                stream: bool) -> httpx.Response:
        """A GET or HEAD through the socket pool, with ``_send_raw``'s metrics and downgrade; the
        body read unless ``stream``."""
        assert self._pool is not None
        t0 = time.monotonic()
        try:
            try:
                resp = self._pool.send(method, url, headers)
            except httpx.ConnectError as err:
                if not (ep is not None and url.startswith(ep.base) and
                        self._should_downgrade(ep, err)):
                    raise
                self.metrics.observe(time.monotonic() - t0, None)
                t0 = time.monotonic()
                resp = self._pool.send(method, self._downgrade(ep, url), headers)
            if not stream:
                resp.read()
        except httpx.TransportError:
            self.metrics.observe(time.monotonic() - t0, None)
            raise
        self.metrics.observe(time.monotonic() - t0, resp.status_code)
        if log.isEnabledFor(logging.DEBUG):  # httpx's line (bench/lazy_pull.py reads it),
            # without the query: a redirect's presigned URL carries a signature
            log.debug('HTTP Request: %s %s "HTTP/1.1 %d %s"', method, url.partition("?")[0],
                      resp.status_code, resp.reason_phrase)
        return resp

    def _should_downgrade(self, ep: Endpoint, err: BaseException) -> bool:
        # nydusd: with skip_verify, a TLS handshake answered by plain HTTP ("wrong
        # version number") means an insecure registry; talk http to it from now on.
        return ep.skip_verify and ep.base.startswith("https://") and \
            _tls_speaks_plain_http(err)

    def _downgrade(self, ep: Endpoint, url: str) -> str:
        with self._lock:
            if ep.base.startswith("https://"):
                ep.base = "http://" + ep.base[len("https://"):]
        return "http://" + url[len("https://"):] if url.startswith("https://") else url

    # ----------------------------------------------------------------------- auth
    def _creds(self, ep: Endpoint) -> Credentials | None:
        return ep.credentials

    def _token_key(self, ep: Endpoint, req: Request, ch: Challenge) -> TokenKey:
        scopes = merge_scopes(*req.scopes, ch.scope) if req.scopes else merge_scopes(ch.scope)
        return (ch.realm, ch.service, scopes)

    def _cached_authorization(self, ep: Endpoint, req: Request) -> str | None:
        """The Authorization to send before any challenge: a static registry token, a
        cached bearer token for this scope, or Basic after a Basic challenge. With a
        known Bearer challenge but no token yet, fetch one now (saves a 401 round trip
        per new scope)."""
        creds = self._creds(ep)
        if creds is not None and creds.registry_token:
            return f"Bearer {creds.registry_token}"
        with self._lock:
            ch = self._challenges.get(ep.netloc)
        if ch is None:
            return None
        if ch.scheme == "basic":
            return creds.basic_header() if creds is not None and creds.has_basic else None
        key = self._token_key(ep, req, ch)
        tok = self.tokens.get(key)
        if tok is not None:
            self._token_used[key] = time.time()
            return f"Bearer {tok.token}"
        return self._answer_challenge(ep, req, ch)

    def _forget_authorization(self, ep: Endpoint, req: Request, ch: Challenge,
                              sent: str) -> None:
        if sent.startswith("Bearer "):
            self.tokens.invalidate(self._token_key(ep, req, ch), sent[len("Bearer "):])

    def _answer_challenge(self, ep: Endpoint, req: Request, ch: Challenge) -> str | None:
        creds = self._creds(ep)
        if creds is not None and creds.registry_token:
            return None  # the static token was refused; nothing else to try
        if ch.scheme == "basic":
            return creds.basic_header() if creds is not None and creds.has_basic else None
        if not ch.realm:
            return None
        key = self._token_key(ep, req, ch)
        with self.tokens.fetch_lock(key):
            tok = self.tokens.get(key)  # another thread may have fetched it meanwhile
            if tok is None:
                tok = self._fetch_token(ch, key[2], creds, req.what, ep)
                self.tokens.put(key, tok)
                with self._lock:
                    self._token_sources[key] = (ep, ch, req.what)
                if self._renewer is not None:
                    self._renewer.notify()
        self._token_used[key] = time.time()
        return f"Bearer {tok.token}"

    def renew_due(self) -> float | None:
        """Fetch anew every cached token past its renewal time that was used since it
        was issued; return the seconds until the next one is due (None: none cached).
        Called by the renewer thread."""
        now = time.time()
        next_due: float | None = None
        for key, tok in self.tokens.items():
            with self._lock:
                source = self._token_sources.get(key)
            if source is None:
                continue
            due = tok.renew_at()
            if due > now:
                next_due = due - now if next_due is None else min(next_due, due - now)
                continue
            issued = tok.expires_at - tok.lifetime
            if self._token_used.get(key, 0.0) < issued:
                continue  # idle since issued: let it lapse
            ep, ch, what = source
            with self.tokens.fetch_lock(key):
                fresh = self._fetch_token(ch, key[2], self._creds(ep), what, ep)
                self.tokens.put(key, fresh)
            self.metrics.add("token_renewals")
            due = fresh.renew_at() - now
            next_due = due if next_due is None else min(next_due, due)
        return next_due

    def _fetch_token(self, ch: Challenge, scopes: tuple[str, ...],
                     creds: Credentials | None, what: str, ep: Endpoint) -> Token:
        self.metrics.add("token_fetches")
        if creds is not None and creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "service": ch.service, "client_id": CLIENT_ID,
                    "scope": " ".join(scopes)}
            resp = self._send_raw(
                "POST", ch.realm, {"Content-Type": "application/x-www-form-urlencoded"},
                None, str(httpx.QueryParams(form)).encode(), False, ep)
        else:
            params: dict[str, str | Sequence[str]] = {"service": ch.service}
            if scopes:
                params["scope"] = list(scopes)
            headers: dict[str, str] = {}
            if creds is not None and creds.has_basic:
                headers["Authorization"] = creds.basic_header()
                params["account"] = creds.username
            if not ch.service:
                del params["service"]
            resp = self._send_raw("GET", ch.realm, headers, params, None, False, ep)
        if resp.status_code in (401, 403):
            raise Unauthorized(f"{what}: token server {ch.realm} refused the credentials "
                               f"(HTTP {resp.status_code}): {_body_excerpt(resp)}",
                               status=resp.status_code)
        if resp.status_code == 429 or resp.status_code >= 500:
            raise RetryableStatus(resp.status_code, ch.realm, _body_excerpt(resp))
        if resp.status_code != 200:
            raise Unauthorized(f"{what}: token server {ch.realm} answered HTTP "
                               f"{resp.status_code}: {_body_excerpt(resp)}",
                               status=resp.status_code)
        return parse_token_response(resp.content, time.time())


__all__ = [
    "RETRYABLE", "Endpoint", "Mirror", "Request", "RetryableStatus", "Transport",
    "raise_for_status",
]
