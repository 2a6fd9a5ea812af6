"""Where registry credentials come from: nydusd's ``auth`` string, snapshot labels,
docker's ``config.json`` (``auths`` entries, ``credHelpers``, ``credsStore``).

Lookups follow docker: config keys may be URLs (``https://index.docker.io/v1/``)
or ``host[:port]``; Docker Hub's names (``docker.io``, ``index.docker.io``,
``registry-1.docker.io``) share one entry; incomplete entries count as absent.
Reading the file and running ``docker-credential-<name>`` are the only I/O here.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynydus import labels as L
from pynydus.errors import ConfigError, InvalidArgument, q

from .exechelper import CredentialSourceError, run_bounded
from .reference import DOCKER_HUB, DOCKER_HUB_API, DOCKER_HUB_AUTH_KEY, DOCKER_HUB_LEGACY

# A helper reads a local keychain (pass, secretservice, a cloud SDK's cache): seconds at
# most. Past this it is killed and the lookup fails naming it.
CREDENTIAL_HELPER_TIMEOUT = 10.0


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
        Incomplete entries count as absent. A helper that fails (missing, hangs, exits
        with an error other than "not found", prints garbage) raises
        CredentialSourceError naming it and this file."""
        found = self.find(host, run_helpers=run_helpers)
        return found[0] if found is not None else None

    def find(self, host: str, *, run_helpers: bool = True) -> tuple[Credentials, str] | None:
        """Like :meth:`lookup`, with where the credentials came from (for messages)."""
        where = str(self.path) if self.path else "docker config"
        hosts = _hosts_for_lookup(host)
        if run_helpers:
            for h in hosts:
                if h in self.cred_helpers:
                    name = self.cred_helpers[h]
                    what = f"docker-credential-{name} (credHelpers of {where})"
                    creds = _run_helper(name, _helper_server(host), what)
                    return (creds, what) if creds is not None else None
        creds = self.entry_credentials(host)
        if creds is not None:
            return creds, f"{where} (auths)"
        if run_helpers and self.creds_store:
            what = f"docker-credential-{self.creds_store} (credsStore of {where})"
            creds = _run_helper(self.creds_store, _helper_server(host), what)
            return (creds, what) if creds is not None else None
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


def _run_helper(name: str, server: str, what: str = "") -> Credentials | None:
    """Run ``docker-credential-<name> get`` with the server URL on stdin (docker's
    credential helper protocol). None when the helper has nothing for ``server``;
    CredentialSourceError naming ``what`` when it fails."""
    what = what or f"docker-credential-{name}"
    ran = run_bounded([f"docker-credential-{name}", "get"], server.encode(),
                      timeout=CREDENTIAL_HELPER_TIMEOUT, what=what)
    if ran.returncode != 0:
        said = (ran.stdout[:200] + ran.stderr[:200]).decode(errors="replace").lower()
        if "credentials not found" in said:
            return None  # the protocol's "nothing stored for this server"
        raise CredentialSourceError(f"{what}: exited with status {ran.returncode}: "
                                    f"{ran.stderr_text() or '(no message)'}")
    try:
        doc = json.loads(ran.stdout)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("Secret", ""), str):
        raise CredentialSourceError(f"{what}: its answer is not the helper protocol's JSON "
                                    '({"Username": ..., "Secret": ...})')
    user, secret = str(doc.get("Username") or ""), str(doc.get("Secret") or "")
    if not secret:
        return None
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username=user, password=secret) if user else \
        Credentials(registry_token=secret)


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


