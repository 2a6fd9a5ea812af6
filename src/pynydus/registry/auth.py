"""Registry authentication: credentials, challenges and bearer tokens.

Theory of operation (distribution's token auth, which every registry speaks):

1. A request without (valid) credentials gets ``401`` and a ``WWW-Authenticate``
   challenge: ``Basic realm=…`` or ``Bearer realm=…,service=…,scope=…``.
2. ``Basic``: resend with ``Authorization: Basic base64(user:pass)``.
3. ``Bearer``: ask the token server at ``realm`` for a token for ``service`` and the
   ``scope`` (``repository:<repo>:pull[,push]``), with Basic credentials if we have
   any (anonymous pulls get tokens too), then resend with ``Authorization: Bearer``.
   Tokens live ``expires_in`` seconds (60 when absent) from ``issued_at``; they are
   cached per (realm, service, scope) and fetched anew shortly before expiry, or when
   the registry answers 401 to a cached one.

Everything here is sans-I/O except :func:`load_docker_config` (reads a file) and
credential helpers (run ``docker-credential-<name>``); the HTTP exchange with the token
server lives in :mod:`.transport`.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pynydus import labels as L
from pynydus.errors import ConfigError, InvalidArgument, q

from .errors import RegistryProtocolError
from .reference import DOCKER_HUB, DOCKER_HUB_API, DOCKER_HUB_AUTH_KEY, DOCKER_HUB_LEGACY

# Docker's token spec: tokens without expires_in live 60 s, and no token should be
# handed out with less than that.
DEFAULT_TOKEN_LIFETIME = 60.0
# Refresh this long before expiry so a token does not run out between the check and
# the registry's verification (bounded by a tenth of the lifetime for short tokens).
REFRESH_MARGIN = 30.0
CREDENTIAL_HELPER_TIMEOUT = 30.0


# ----------------------------------------------------------------------- credentials
@dataclass(frozen=True)
class Credentials:
    """What we may present to a registry.

    * ``username`` + ``password``: Basic auth, and Basic auth to the token server.
    * ``registry_token``: a bearer token used as-is (nydusd's ``registry_token``).
    * ``identity_token``: an OAuth2 refresh token (docker config ``identitytoken``),
      exchanged at the token server with ``grant_type=refresh_token``.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    @classmethod
    def from_auth_string(cls, auth: str) -> Credentials:
        """Decode nydusd's / docker config's ``auth``: base64 of ``user:password``."""
        try:
            raw = base64.b64decode(auth.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidArgument("registry auth is not base64 of user:password") from err
        user, sep, pw = raw.partition(":")
        if not sep:
            raise InvalidArgument("registry auth does not contain ':' (want user:password)")
        return cls(username=user, password=pw)

    @property
    def has_basic(self) -> bool:
        return bool(self.username) and bool(self.password)

    @property
    def is_anonymous(self) -> bool:
        return not (self.has_basic or self.registry_token or self.identity_token)

    def auth_string(self) -> str:
        """base64(``user:password``), the form nydusd's backend config ``auth`` takes."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def basic_header(self) -> str:
        return f"Basic {self.auth_string()}"


def credentials_from_labels(labels: Mapping[str, str]) -> Credentials | None:
    """Credentials carried by snapshot labels (``pullusername`` + ``pullsecret``).

    Both must be non-empty. Following the snapshotter's PassKeyChain, an empty
    username with a secret would be a registry token, but labels never carry that."""
    user = labels.get(L.PULL_USERNAME, "")
    secret = labels.get(L.PULL_SECRET, "")
    if user and secret:
        return Credentials(username=user, password=secret)
    return None


# -------------------------------------------------------------------- docker config
def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    env = os.environ if env is None else env
    base = env.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".docker" / "config.json"


def _config_key_host(key: str) -> str:
    """``https://index.docker.io/v1/`` → ``index.docker.io``; ``host:5000`` stays."""
    k = key
    for prefix in ("https://", "http://"):
        if k.startswith(prefix):
            k = k[len(prefix):]
            break
    return k.split("/", 1)[0]


def _hosts_for_lookup(host: str) -> list[str]:
    if host in (DOCKER_HUB, DOCKER_HUB_API, DOCKER_HUB_LEGACY):
        return [DOCKER_HUB_LEGACY, DOCKER_HUB, DOCKER_HUB_API]
    return [host]


@dataclass(frozen=True)
class DockerConfig:
    """The credential parts of a docker ``config.json``.

    ``auths`` maps a normalised host to its entry; ``cred_helpers`` a host to a helper
    name; ``creds_store`` is the default helper."""

    auths: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cred_helpers: Mapping[str, str] = field(default_factory=dict)
    creds_store: str = ""
    path: Path | None = None

    @classmethod
    def parse(cls, data: bytes | str, path: Path | None = None) -> DockerConfig:
        """Parse the JSON text of a docker config; raise ConfigError naming the file."""
        where = str(path) if path else "docker config"
        try:
            doc = json.loads(data)
        except ValueError as err:
            raise ConfigError(f"{where}: not valid JSON: {err}") from err
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: top level must be an object")
        auths: dict[str, Mapping[str, Any]] = {}
        raw_auths = doc.get("auths") or {}
        if not isinstance(raw_auths, dict):
            raise ConfigError(f"{where}: \"auths\" must be an object")
        for key, entry in raw_auths.items():
            if isinstance(entry, dict):
                auths.setdefault(_config_key_host(key), entry)
        helpers = doc.get("credHelpers") or {}
        if not isinstance(helpers, dict):
            raise ConfigError(f"{where}: \"credHelpers\" must be an object")
        store = doc.get("credsStore") or ""
        return cls(auths=auths,
                   cred_helpers={_config_key_host(k): str(v) for k, v in helpers.items()},
                   creds_store=str(store), path=path)

    def entry_credentials(self, host: str) -> Credentials | None:
        """Credentials from the ``auths`` section alone (sans-I/O)."""
        for h in _hosts_for_lookup(host):
            entry = self.auths.get(h)
            if entry is None:
                continue
            creds = _entry_to_credentials(entry, host)
            if creds is not None:
                return creds
        return None

    def lookup(self, host: str, *, run_helpers: bool = True) -> Credentials | None:
        """Credentials for registry ``host`` (``docker.io`` and its aliases share one
        entry): a per-host credential helper, then ``auths``, then ``credsStore``.
        Incomplete entries count as absent."""
        hosts = _hosts_for_lookup(host)
        if run_helpers:
            for h in hosts:
                if h in self.cred_helpers:
                    return _run_helper(self.cred_helpers[h], _helper_server(host))
        creds = self.entry_credentials(host)
        if creds is not None:
            return creds
        if run_helpers and self.creds_store:
            return _run_helper(self.creds_store, _helper_server(host))
        return None


def _entry_to_credentials(entry: Mapping[str, Any], host: str) -> Credentials | None:
    identity = str(entry.get("identitytoken") or "")
    regtoken = str(entry.get("registrytoken") or "")
    user = str(entry.get("username") or "")
    pw = str(entry.get("password") or "")
    if entry.get("auth"):
        try:
            c = Credentials.from_auth_string(str(entry["auth"]))
        except InvalidArgument as err:
            raise ConfigError(f"docker config auth for {q(host)}: {err}") from err
        user, pw = c.username, c.password
    if identity:
        return Credentials(username=user, identity_token=identity)
    if regtoken:
        return Credentials(registry_token=regtoken)
    if user and pw:
        return Credentials(username=user, password=pw)
    return None


def _helper_server(host: str) -> str:
    return DOCKER_HUB_AUTH_KEY if host in (DOCKER_HUB, DOCKER_HUB_API, DOCKER_HUB_LEGACY) \
        else host


def _run_helper(name: str, server: str) -> Credentials | None:
    """Run ``docker-credential-<name> get`` with the server URL on stdin."""
    try:
        out = subprocess.run([f"docker-credential-{name}", "get"], input=server.encode(),
                             capture_output=True, timeout=CREDENTIAL_HELPER_TIMEOUT,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None  # "credentials not found in native keychain" and friends
    try:
        doc = json.loads(out.stdout)
    except ValueError:
        return None
    user, secret = str(doc.get("Username") or ""), str(doc.get("Secret") or "")
    if not secret:
        return None
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username=user, password=secret) if user else None


def load_docker_config(path: Path | None = None,
                       env: Mapping[str, str] | None = None) -> DockerConfig:
    """Read the docker config (default :func:`docker_config_path`). A missing file is
    an empty config; a malformed one is a ConfigError."""
    p = path or docker_config_path(env)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return DockerConfig(path=p)
    except OSError as err:
        raise ConfigError(f"cannot read docker config {p}: {err}") from err
    return DockerConfig.parse(data, p)


def resolve_credentials(host: str, *, labels: Mapping[str, str] | None = None,
                        docker_config: DockerConfig | None = None) -> Credentials | None:
    """The snapshotter's keychain order, for the sources we have: labels, then the
    docker config (re-read on every call, as upstream does)."""
    if labels:
        creds = credentials_from_labels(labels)
        if creds is not None:
            return creds
    cfg = docker_config if docker_config is not None else load_docker_config()
    return cfg.lookup(host)


# ------------------------------------------------------------------------ challenges
@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: scheme (lower case) and its parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scope(self) -> str:
        return self.params.get("scope", "")

    @property
    def error(self) -> str:
        return self.params.get("error", "")


def parse_challenges(headers: Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (RFC 7235) into challenges.

    One value may hold several challenges (``Basic realm="a", Bearer realm="b"``);
    parameters may be tokens or quoted strings with backslash escapes. Unparseable
    trailing text is ignored rather than failing the request."""
    out: list[Challenge] = []
    for value in headers:
        out.extend(_parse_one_header(value))
    return out


_TCHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _parse_one_header(s: str) -> list[Challenge]:
    # A token followed by '=' is a parameter of the current challenge; any other token
    # starts a new challenge. (token68 forms are not used by registries.)
    out: list[Challenge] = []
    scheme = ""
    params: dict[str, str] = {}
    i, n = 0, len(s)
    while i < n:
        while i < n and s[i] in " \t,":
            i += 1
        j = i
        while j < n and s[j] in _TCHARS:
            j += 1
        if j == i:
            break  # garbage: keep what we have
        word = s[i:j]
        k = j
        while k < n and s[k] in " \t":
            k += 1
        if k < n and s[k] == "=" and scheme:
            k += 1
            while k < n and s[k] in " \t":
                k += 1
            if k < n and s[k] == '"':
                k += 1
                buf: list[str] = []
                while k < n and s[k] != '"':
                    if s[k] == "\\" and k + 1 < n:
                        k += 1
                    buf.append(s[k])
                    k += 1
                value = "".join(buf)
                k += 1
            else:
                v0 = k
                while k < n and s[k] not in ", \t":
                    k += 1
                value = s[v0:k]
            params[word.lower()] = value
            i = k
            continue
        if scheme:
            out.append(Challenge(scheme=scheme, params=params))
        scheme, params = word.lower(), {}
        i = j
    if scheme:
        out.append(Challenge(scheme=scheme, params=params))
    return out


def pick_challenge(challenges: Iterable[Challenge]) -> Challenge | None:
    """The challenge to answer: Bearer over Basic; None if neither is offered."""
    by_scheme = {c.scheme: c for c in challenges}
    return by_scheme.get("bearer") or by_scheme.get("basic")


# --------------------------------------------------------------------------- scopes
def repository_scope(repo: str, actions: str) -> str:
    """``repository:<repo>:<actions>``, e.g. ``repository:library/alpine:pull,push``."""
    return f"repository:{repo}:{actions}"


def merge_scopes(*scopes: str) -> tuple[str, ...]:
    """Scopes as a canonical tuple (sorted, de-duplicated, space-separated values
    split) — the token cache key and the ``scope`` query parameters."""
    parts: set[str] = set()
    for s in scopes:
        parts.update(x for x in s.split(" ") if x)
    return tuple(sorted(parts))


# --------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class Token:
    """A bearer token and when it stops being usable (``time.time()`` seconds)."""

    token: str = field(repr=False)
    expires_at: float
    lifetime: float
    refresh_token: str = field(default="", repr=False)

    def fresh(self, now: float) -> bool:
        """Usable for at least the refresh margin (a tenth of the lifetime for short
        tokens, at most :data:`REFRESH_MARGIN`)."""
        return now < self.expires_at - min(REFRESH_MARGIN, self.lifetime / 10)


def _parse_rfc3339(value: str) -> float | None:
    try:
        v = value.strip()
        if v.endswith(("Z", "z")):
            v = v[:-1] + "+00:00"
        # Go writes nanoseconds; fromisoformat takes at most microseconds.
        if "." in v:
            head, _, tail = v.partition(".")
            digits = "".join(c for c in tail if c.isdigit())
            tz = tail[len(digits):]
            v = f"{head}.{digits[:6]}{tz}"
        return datetime.fromisoformat(v).timestamp()
    except ValueError:
        return None


def parse_token_response(body: bytes, now: float) -> Token:
    """Parse a token server's JSON answer (``token`` or ``access_token``,
    ``expires_in``, ``issued_at``, ``refresh_token``).

    Expiry counts from ``issued_at`` when it is plausible (not in our future, not so
    old that the token would be dead on arrival: that is clock skew), else from
    ``now``."""
    try:
        doc = json.loads(body)
    except ValueError as err:
        raise RegistryProtocolError(f"token server answer is not JSON: {err}") from err
    if not isinstance(doc, dict):
        raise RegistryProtocolError("token server answer is not a JSON object")
    tok = doc.get("token") or doc.get("access_token")
    if not isinstance(tok, str) or not tok:
        raise RegistryProtocolError("token server answer has no token")
    try:
        lifetime = float(doc.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
    except (TypeError, ValueError):
        lifetime = DEFAULT_TOKEN_LIFETIME
    if lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    start = now
    issued = doc.get("issued_at")
    if isinstance(issued, str):
        t = _parse_rfc3339(issued)
        if t is not None and now - lifetime < t <= now:
            start = t
    refresh = doc.get("refresh_token")
    return Token(token=tok, expires_at=start + lifetime, lifetime=lifetime,
                 refresh_token=refresh if isinstance(refresh, str) else "")


TokenKey = tuple[str, str, tuple[str, ...]]


class TokenCache:
    """Bearer tokens by (realm, service, scopes); thread-safe.

    ``get`` returns only fresh tokens; ``invalidate`` drops one after the registry
    rejected it. One lock per key serialises fetching, so N threads that miss at
    once cause one token request, not N."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._tokens: dict[TokenKey, Token] = {}
        self._lock = threading.Lock()
        self._fetch_locks: dict[TokenKey, threading.Lock] = {}

    def get(self, key: TokenKey) -> Token | None:
        with self._lock:
            tok = self._tokens.get(key)
        if tok is not None and tok.fresh(self._clock()):
            return tok
        return None

    def put(self, key: TokenKey, token: Token) -> None:
        with self._lock:
            self._tokens[key] = token

    def invalidate(self, key: TokenKey, token: str | None = None) -> None:
        """Drop the token for ``key`` (only if it is still ``token``, when given, so a
        token another thread just fetched survives)."""
        with self._lock:
            cur = self._tokens.get(key)
            if cur is not None and (token is None or cur.token == token):
                del self._tokens[key]

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()

    def fetch_lock(self, key: TokenKey) -> threading.Lock:
        with self._lock:
            lk = self._fetch_locks.get(key)
            if lk is None:
                lk = self._fetch_locks[key] = threading.Lock()
            return lk

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)
