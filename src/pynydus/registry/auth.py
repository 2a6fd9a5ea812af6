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

Everything here is sans-I/O; the HTTP exchange with the token server lives in
:mod:`.transport`, credential sources (docker config, labels) in :mod:`.credentials`
(re-exported here).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .credentials import (
    Credentials,
    DockerConfig,
    credentials_from_labels,
    docker_config_path,
    load_docker_config,
    resolve_credentials,
)
from .errors import RegistryProtocolError

# Docker's token spec: tokens without expires_in live 60 s, and no token should be
# handed out with less than that.
DEFAULT_TOKEN_LIFETIME = 60.0
# Refresh this long before expiry so a token does not run out between the check and
# the registry's verification (bounded by a tenth of the lifetime for short tokens).
REFRESH_MARGIN = 30.0


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

    def renew_at(self) -> float:
        """When a background renewer should replace it: a quarter of the lifetime
        (at most a minute) before expiry, ahead of the inline refresh margin."""
        return self.expires_at - min(60.0, self.lifetime / 4)

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

    def items(self) -> list[tuple[TokenKey, Token]]:
        """A snapshot of every cached token, fresh or not."""
        with self._lock:
            return list(self._tokens.items())

    def fetch_lock(self, key: TokenKey) -> threading.Lock:
        with self._lock:
            lk = self._fetch_locks.get(key)
            if lk is None:
                lk = self._fetch_locks[key] = threading.Lock()
            return lk

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)


__all__ = [
    "DEFAULT_TOKEN_LIFETIME", "REFRESH_MARGIN", "Challenge", "Credentials", "DockerConfig",
    "Token", "TokenCache", "TokenKey", "credentials_from_labels", "docker_config_path",
    "load_docker_config", "merge_scopes", "parse_challenges", "parse_token_response",
    "pick_challenge", "repository_scope", "resolve_credentials",
]
