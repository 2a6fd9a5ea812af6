"""The kubeconfig keychain: registry credentials from the cluster's image pull secrets.

With ``[remote.auth] enable_kubeconfig_keychain`` the snapshotter reads every secret of
type ``kubernetes.io/dockerconfigjson`` in all namespaces from the Kubernetes API (as
upstream's ``pkg/auth/kubesecret.go``, which keeps an informer on them) and looks the
image's registry up in their ``auths`` (no credential helpers: a secret cannot name a
program of the node). Secrets are taken in namespace/name order; the first with a user
and password for the registry wins.

Where the API is: ``kubeconfig_path``, else ``$KUBECONFIG`` (its first file), else
``~/.kube/config``, else the pod's service account (``KUBERNETES_SERVICE_HOST``, the token
and CA under ``/var/run/secrets/kubernetes.io/serviceaccount``). From the kubeconfig's
current context: the cluster's ``server``, ``certificate-authority(-data)``,
``insecure-skip-tls-verify``; the user's ``token``/``tokenFile`` or
``client-certificate(-data)`` + ``client-key(-data)``. Exec and auth-provider plugins
are refused (ConfigError at start-up).

Instead of a watch, the list is fetched at start-up (a failure stops the start, as
upstream's cache sync does) and again on a lookup once it is ``REFRESH`` seconds old
(5 s timeout; a failed refresh keeps the last list and is logged). Key material given
inline is written to 0600 files in a 0700 directory of our own while the TLS context is
built, then removed.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynydus.errors import ConfigError

from .credentials import Credentials, DockerConfig
from .exechelper import CredentialSourceError
from .keychain import Found
from .reference import Reference

log = logging.getLogger(__name__)

REFRESH = 30.0  # seconds a fetched list of secrets is used before it is fetched again
TIMEOUT = 5.0
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SECRETS_PATH = "/api/v1/secrets?fieldSelector=type%3Dkubernetes.io%2Fdockerconfigjson"


@dataclass(frozen=True)
class KubeAPI:
    """How to reach the API server (secrets of the kubeconfig are not in ``repr``)."""

    server: str
    source: str  # the kubeconfig (or "in-cluster service account"), for messages
    ca_file: str = ""
    ca_data: bytes = b""
    insecure: bool = False
    token: str = ""
    token_file: str = ""
    cert_file: str = ""
    cert_data: bytes = b""
    key_file: str = ""
    key_data: bytes = b""

    def __repr__(self) -> str:
        return f"KubeAPI(server={self.server!r}, source={self.source!r})"

    def bearer(self) -> str:
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError as err:
                raise CredentialSourceError(f"kubeconfig keychain ({self.source}): cannot read "
                                            f"the token file {self.token_file}: {err}") from err
        return self.token

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.ca_file:
            ctx.load_verify_locations(cafile=self.ca_file)
        if self.ca_data:
            ctx.load_verify_locations(cadata=self.ca_data.decode())
        if self.cert_file or self.cert_data:
            with tempfile.TemporaryDirectory(prefix="pynydus-kube-") as d:
                cert = self.cert_file or _private_file(d, "cert.pem", self.cert_data)
                key = self.key_file or (_private_file(d, "key.pem", self.key_data)
                                        if self.key_data else None)
                ctx.load_cert_chain(cert, key)
        return ctx


def _private_file(d: str, name: str, data: bytes) -> str:
    path = os.path.join(d, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _b64(value: Any, what: str, source: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ConfigError(f"{source}: {what} is not base64") from err


def _relative(base: Path, p: Any) -> str:
    s = str(p or "")
    return s if not s or os.path.isabs(s) else str(base.parent / s)


def parse_kubeconfig(text: str, source: Path) -> KubeAPI:
    """The API server of the kubeconfig's current context. ConfigError naming ``source``
    for what cannot be used (no current context, exec or auth-provider users, ...)."""
    import yaml

    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not YAML: {err}") from err
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: not a kubeconfig (a mapping is expected)")

    def named(section: str, name: str) -> dict[str, Any]:
        for item in doc.get(section) or []:
            if isinstance(item, dict) and item.get("name") == name:
                body = item.get(section[:-1])
                if isinstance(body, dict):
                    return body
        raise ConfigError(f"{source}: {section[:-1]} {name!r} not found")

    current = doc.get("current-context")
    if not current:
        raise ConfigError(f"{source}: no current-context")
    context = named("contexts", str(current))
    cluster = named("clusters", str(context.get("cluster", "")))
    user = named("users", str(context.get("user", ""))) if context.get("user") else {}
    for plugin in ("exec", "auth-provider"):
        if user.get(plugin):
            raise ConfigError(f"{source}: user {context.get('user')!r}: {plugin} credentials "
                              "are not supported by pynydus yet; use a token or a client "
                              "certificate")
    server = str(cluster.get("server") or "")
    if not server.startswith(("https://", "http://")):
        raise ConfigError(f"{source}: cluster {context.get('cluster')!r}: server {server!r} "
                          "is not an http(s) URL")
    where = str(source)
    return KubeAPI(
        server=server.rstrip("/"), source=where,
        ca_file=_relative(source, cluster.get("certificate-authority")),
        ca_data=_b64(cluster["certificate-authority-data"], "certificate-authority-data",
                     where) if cluster.get("certificate-authority-data") else b"",
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        token=str(user.get("token") or ""),
        token_file=_relative(source, user.get("tokenFile")),
        cert_file=_relative(source, user.get("client-certificate")),
        cert_data=_b64(user["client-certificate-data"], "client-certificate-data", where)
        if user.get("client-certificate-data") else b"",
        key_file=_relative(source, user.get("client-key")),
        key_data=_b64(user["client-key-data"], "client-key-data", where)
        if user.get("client-key-data") else b"")


def find_api(kubeconfig_path: str, env: Mapping[str, str] | None = None) -> KubeAPI:
    """Where the secrets are read (see the module's docstring); ConfigError if nowhere."""
    env = os.environ if env is None else env
    candidates = [kubeconfig_path] if kubeconfig_path else [
        p for p in env.get("KUBECONFIG", "").split(os.pathsep)[:1] if p]
    if not kubeconfig_path:
        candidates.append(str(Path(env.get("HOME", "/root")) / ".kube/config"))
    for c in candidates:
        p = Path(c)
        try:
            text = p.read_text()
        except FileNotFoundError:
            if kubeconfig_path:
                raise ConfigError(f"remote.auth.kubeconfig_path: {p} does not exist") from None
            continue
        except OSError as err:
            raise ConfigError(f"cannot read kubeconfig {p}: {err}") from err
        return parse_kubeconfig(text, p)
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if host and (SA_DIR / "token").exists():
        h = f"[{host}]" if ":" in host else host
        return KubeAPI(server=f"https://{h}:{port}", source="in-cluster service account",
                       ca_file=str(SA_DIR / "ca.crt"), token_file=str(SA_DIR / "token"))
    raise ConfigError("remote.auth.enable_kubeconfig_keychain: no kubeconfig (tried "
                      f"{', '.join(candidates) or 'none'}) and not in a pod (no "
                      "KUBERNETES_SERVICE_HOST and service account token)")


def parse_secret_list(body: bytes, source: str) -> list[tuple[str, DockerConfig]]:
    """(``namespace/name``, docker config) of each dockerconfigjson secret, sorted by
    key; a secret whose data is not a docker config is skipped with a warning."""
    try:
        doc = json.loads(body)
    except ValueError as err:
        raise CredentialSourceError(f"kubeconfig keychain ({source}): the secret list is "
                                    f"not JSON: {err}") from err
    items = doc.get("items") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise CredentialSourceError(f"kubeconfig keychain ({source}): the answer is not a "
                                    "SecretList")
    out = []
    for item in items:
        meta = item.get("metadata") or {} if isinstance(item, dict) else {}
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        data = (item.get("data") or {}).get(".dockerconfigjson") if isinstance(item, dict) \
            else None
        if not data:
            continue
        try:
            out.append((key, DockerConfig.parse(base64.b64decode(str(data), validate=True))))
        except (binascii.Error, ValueError, ConfigError):
            log.warning("kubeconfig keychain: secret %s: .dockerconfigjson is not a docker "
                        "config; skipped", key)
    return sorted(out, key=lambda kv: kv[0])


class KubeSecrets:
    """A keychain source over the cluster's dockerconfigjson secrets. Thread-safe."""

    name = "kubeconfig keychain"
    renewable = True

    def __init__(self, api: KubeAPI, refresh: float = REFRESH) -> None:
        self.api = api
        self.refresh = refresh
        self._lock = threading.Lock()
        self._secrets: list[tuple[str, DockerConfig]] = []
        self._fetched = 0.0

    @classmethod
    def start(cls, kubeconfig_path: str) -> KubeSecrets:
        """Find the API and list the secrets once; ConfigError if either fails."""
        src = cls(find_api(kubeconfig_path))
        try:
            src.sync()
        except CredentialSourceError as err:
            raise ConfigError(f"remote.auth.enable_kubeconfig_keychain: {err}") from err
        return src

    def sync(self) -> None:
        """Fetch the list now; CredentialSourceError naming the API when it fails."""
        req = urllib.request.Request(self.api.server + SECRETS_PATH,
                                     headers={"Accept": "application/json"})
        token = self.api.bearer()
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        ctx = self.api.ssl_context() if self.api.server.startswith("https:") else None
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT, context=ctx) as r:
                body = r.read(64 << 20)
        except urllib.error.HTTPError as err:
            raise CredentialSourceError(f"kubeconfig keychain ({self.api.source}): listing "
                                        f"secrets at {self.api.server}: HTTP {err.code}") \
                from None
        except (OSError, ssl.SSLError) as err:
            raise CredentialSourceError(f"kubeconfig keychain ({self.api.source}): listing "
                                        f"secrets at {self.api.server}: {err}") from None
        secrets = parse_secret_list(body, self.api.source)
        with self._lock:
            self._secrets, self._fetched = secrets, time.monotonic()
        log.info("kubeconfig keychain: %d dockerconfigjson secrets", len(secrets))

    def find(self, ref: Reference, labels: Mapping[str, str]) -> Found | None:
        if time.monotonic() - self._fetched > self.refresh:
            try:
                self.sync()
            except CredentialSourceError as err:
                log.warning("%s; using the list of %.0f s ago", err,
                            time.monotonic() - self._fetched)
        with self._lock:
            secrets = list(self._secrets)
        for key, cfg in secrets:
            creds = cfg.entry_credentials(ref.api_host)
            if creds is not None and creds.has_basic:
                return Found(Credentials(creds.username, creds.password),
                             f"the kubeconfig keychain (secret {key})", renewable=True)
        return None
