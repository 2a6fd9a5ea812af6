"""Kubelet's image credential provider plugins, as the snapshotter's credential source.

The plugins and their configuration are kubelet's own (``--image-credential-provider-config``
and ``--image-credential-provider-bin-dir``; upstream's ``credential_provider_config`` and
``credential_provider_bin_dir``): a ``CredentialProviderConfig`` (``kubelet.config.k8s.io/v1``,
YAML or JSON) lists providers with ``name`` (the program in the bin dir), ``matchImages``
(globs such as ``*.dkr.ecr.*.amazonaws.com``), ``defaultCacheDuration``, ``apiVersion``
(``credentialprovider.kubelet.k8s.io/v1``), ``args`` and ``env``.

For an image that a provider matches, the program is run with a
``CredentialProviderRequest`` (``{"image": ...}``) on stdin and answers a
``CredentialProviderResponse``: ``auth`` maps registry globs to ``username``/``password``,
``cacheKeyType`` (``Image``, ``Registry`` or ``Global``) says what the answer is good for
and ``cacheDuration`` for how long (default the provider's ``defaultCacheDuration``; 0: do
not cache). Answers are cached that long under the image, its registry or one global key,
looked up in that order; of the globs that match the image, the most specific (the last
in reverse sort, as kubelet) wins; the first provider to give a glob keeps it.

Programs run bounded (:mod:`.exechelper`): a plugin that hangs is killed after
``PLUGIN_TIMEOUT`` (kubelet allows a minute), one that prints garbage or the wrong
``apiVersion`` is an error naming it, and neither stops the other providers.
"""

from __future__ import annotations

import fnmatch
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pynydus.confschema import parse_go_duration
from pynydus.errors import ConfigError

from .credentials import Credentials
from .exechelper import CredentialSourceError, run_bounded

CONFIG_KIND = "CredentialProviderConfig"
CONFIG_API_VERSIONS = ("kubelet.config.k8s.io/v1",)
PLUGIN_API_VERSION = "credentialprovider.kubelet.k8s.io/v1"
PLUGIN_TIMEOUT = 30.0
GLOBAL_KEY = "<global>"
CACHE_KEY_TYPES = ("Image", "Registry", "Global")


@dataclass(frozen=True)
class ProviderSpec:
    """One ``providers[]`` entry of a CredentialProviderConfig."""

    name: str
    match_images: tuple[str, ...]
    default_cache_duration: float
    api_version: str = PLUGIN_API_VERSION
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


def load_yaml_or_json(text: str, source: str) -> Any:
    """A Kubernetes config file's document: JSON, else YAML (PyYAML, imported only then)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML or JSON: {err}") from err


def _duration(value: object, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) / 1e9  # a bare number in JSON is nanoseconds (metav1.Duration)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a duration such as \"12h\", got {value!r}")
    try:
        return parse_go_duration(value) if value else 0.0
    except ValueError:
        raise ConfigError(f"{where}: expected a duration such as \"12h\", got {value!r}") \
            from None


def parse_provider_config(text: str, source: str) -> list[ProviderSpec]:
    """Parse and validate a CredentialProviderConfig (YAML or JSON) as upstream does;
    ConfigError naming ``source`` and the provider and field."""
    doc = load_yaml_or_json(text, source)
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a {CONFIG_KIND} object")
    if doc.get("kind", CONFIG_KIND) != CONFIG_KIND:
        raise ConfigError(f"{source}: kind: expected {CONFIG_KIND}, got {doc.get('kind')!r}")
    if doc.get("apiVersion") and doc["apiVersion"] not in CONFIG_API_VERSIONS:
        raise ConfigError(f"{source}: apiVersion: expected {CONFIG_API_VERSIONS[0]}, got "
                          f"{doc['apiVersion']!r}")
    raw = doc.get("providers")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: providers: at least one provider is required")
    specs: list[ProviderSpec] = []
    for i, p in enumerate(raw):
        where = f"{source}: providers[{i}]"
        if not isinstance(p, dict):
            raise ConfigError(f"{where}: expected an object")
        name = p.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name: a provider name is required")
        where = f"{source}: provider {name!r}"
        if any(c in name for c in " /\\") or name in (".", ".."):
            raise ConfigError(f"{where}: name: cannot contain spaces or path separators, or "
                              "be '.' or '..'")
        if name in (s.name for s in specs):
            raise ConfigError(f"{where}: duplicate provider name")
        api = p.get("apiVersion")
        if not api:
            raise ConfigError(f"{where}: apiVersion is required")
        if api != PLUGIN_API_VERSION:
            raise ConfigError(f"{where}: apiVersion {api!r} is not supported (only "
                              f"{PLUGIN_API_VERSION})")
        match = p.get("matchImages")
        if not isinstance(match, list) or not match or \
                not all(isinstance(m, str) and m for m in match):
            raise ConfigError(f"{where}: matchImages: at least one non-empty pattern is "
                              "required")
        if "defaultCacheDuration" not in p:
            raise ConfigError(f"{where}: defaultCacheDuration is required")
        ttl = _duration(p["defaultCacheDuration"], f"{where}: defaultCacheDuration")
        if ttl < 0:
            raise ConfigError(f"{where}: defaultCacheDuration must be >= 0")
        args = p.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConfigError(f"{where}: args: expected a list of strings")
        env: dict[str, str] = {}
        for e in p.get("env") or []:
            if not isinstance(e, dict) or not e.get("name"):
                raise ConfigError(f"{where}: env: every entry needs a name")
            if e["name"] in env:
                raise ConfigError(f"{where}: env: duplicate name {e['name']!r}")
            env[str(e["name"])] = str(e.get("value", ""))
        specs.append(ProviderSpec(name, tuple(match), ttl, api, tuple(args), env))
    return specs


def load_provider_config(path: str) -> list[ProviderSpec]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"remote.auth.credential_provider_config: cannot read {path}: "
                          f"{err}") from err
    return parse_provider_config(text, path)


# ---------------------------------------------------------------- kubelet's URL globs
def _split(schemeless: str) -> tuple[list[str], str, str]:
    u = urlsplit("https://" + schemeless)
    host = u.netloc
    port = ""
    if host.rfind(":") > host.rfind("]"):
        host, port = host.rsplit(":", 1)
    return host.split("."), port, u.path


def urls_match(glob: str, target: str) -> bool:
    """kubelet's ``URLsMatchStr``: the same number of host labels, each matched by the
    glob's label (``*`` within one label), the same port, and the target's path starting
    with the glob's."""
    g_parts, g_port, g_path = _split(glob)
    t_parts, t_port, t_path = _split(target)
    if g_port != t_port or len(g_parts) != len(t_parts) or not t_path.startswith(g_path):
        return False
    return all(fnmatch.fnmatchcase(t, g) for g, t in zip(g_parts, t_parts, strict=True))


def best_match(auth: Mapping[str, Credentials], image: str) -> Credentials | None:
    matching = sorted((g for g in auth if urls_match(g, image)), reverse=True)
    return auth[matching[0]] if matching else None


# ---------------------------------------------------------------- the provider source
@dataclass
class _Cached:
    auth: dict[str, Credentials]
    expires_at: float  # time.time()


class KubeletProviders:
    """The credential source made of the plugins of one config. Thread-safe; a lookup
    runs each matching plugin at most once (answers cached as the plugin says)."""

    def __init__(self, specs: Sequence[ProviderSpec], bin_dir: str, *,
                 timeout: float = PLUGIN_TIMEOUT, env: Mapping[str, str] | None = None) -> None:
        self.specs = list(specs)
        self.bin_dir = bin_dir
        self.timeout = timeout
        self._env = dict(os.environ if env is None else env)
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_files(cls, config_path: str, bin_dir: str) -> KubeletProviders:
        if not bin_dir:
            raise ConfigError("remote.auth.credential_provider_bin_dir: must be set with "
                              "enable_kubelet_credential_providers = true")
        if not config_path:
            raise ConfigError("remote.auth.credential_provider_config: must be set with "
                              "enable_kubelet_credential_providers = true")
        return cls(load_provider_config(config_path), bin_dir)

    def _cached(self, image: str, registry: str) -> tuple[Credentials, float] | None:
        now = time.time()
        with self._lock:
            for key in (image, registry, GLOBAL_KEY):
                c = self._cache.get(key)
                if c is None:
                    continue
                if c.expires_at <= now:
                    del self._cache[key]
                    continue
                found = best_match(c.auth, image)
                if found is not None:
                    return found, c.expires_at
        return None

    def lookup(self, image: str, registry: str) -> tuple[Credentials, str, float | None] | None:
        """(credentials, which plugin, when they expire) for ``image`` (a normalised
        reference, ``registry/path:tag``); None if no plugin matches or none has any.
        Raises CredentialSourceError only if every matching plugin failed."""
        hit = self._cached(image, registry)
        if hit is not None:
            return hit[0], "kubelet credential provider (cached)", hit[1]
        merged: dict[str, tuple[Credentials, str, float | None]] = {}
        errors: list[str] = []
        for spec in self.specs:
            if not any(urls_match(m, image) for m in spec.match_images):
                continue
            try:
                auth, expires = self._exec(spec, image, registry)
            except CredentialSourceError as err:
                errors.append(str(err))
                continue
            for glob, creds in auth.items():
                merged.setdefault(glob, (creds, f"kubelet credential provider {spec.name!r}",
                                         expires))
        if merged:
            best = best_match({g: v[0] for g, v in merged.items()}, image)
            if best is not None:
                return next(v for v in merged.values() if v[0] is best)
        if errors:
            raise CredentialSourceError("; ".join(errors))
        return None

    def _exec(self, spec: ProviderSpec, image: str, registry: str
              ) -> tuple[dict[str, Credentials], float | None]:
        what = f"kubelet credential provider {spec.name!r}"
        req = json.dumps({"kind": "CredentialProviderRequest", "apiVersion": spec.api_version,
                          "image": image}).encode()
        ran = run_bounded([os.path.join(self.bin_dir, spec.name), *spec.args], req,
                          timeout=self.timeout, what=what, env={**self._env, **spec.env})
        if ran.returncode != 0:
            raise CredentialSourceError(f"{what}: exited with status {ran.returncode}: "
                                        f"{ran.stderr_text() or '(no message)'}")
        try:
            resp: Any = json.loads(ran.stdout)
        except ValueError:
            raise CredentialSourceError(f"{what}: its answer is not JSON (a "
                                        "CredentialProviderResponse was expected)") from None
        if not isinstance(resp, dict):
            raise CredentialSourceError(f"{what}: its answer is not a JSON object")
        if resp.get("apiVersion") != spec.api_version:
            raise CredentialSourceError(f"{what}: answered apiVersion "
                                        f"{resp.get('apiVersion')!r}, expected "
                                        f"{spec.api_version}")
        key_type = resp.get("cacheKeyType")
        if key_type not in CACHE_KEY_TYPES:
            raise CredentialSourceError(f"{what}: invalid cacheKeyType {key_type!r} (want "
                                        f"one of {', '.join(CACHE_KEY_TYPES)})")
        raw_auth = resp.get("auth") or {}
        if not isinstance(raw_auth, dict):
            raise CredentialSourceError(f"{what}: auth is not an object")
        auth: dict[str, Credentials] = {}
        for glob, entry in raw_auth.items():
            if not isinstance(entry, dict):
                raise CredentialSourceError(f"{what}: auth[{glob!r}] is not an object")
            user, pw = str(entry.get("username") or ""), str(entry.get("password") or "")
            # upstream's PassKeyChain: no username and a password is a registry token
            auth[str(glob)] = Credentials(username=user, password=pw) if user else \
                Credentials(registry_token=pw)
        ttl = spec.default_cache_duration
        if resp.get("cacheDuration") not in (None, ""):
            try:
                d = _duration(resp["cacheDuration"], "cacheDuration")
            except ConfigError:
                raise CredentialSourceError(f"{what}: invalid cacheDuration "
                                            f"{resp['cacheDuration']!r}") from None
            if d >= 0:
                ttl = d
        expires = time.time() + ttl if ttl > 0 else None
        if expires is not None and auth:
            key = {"Image": image, "Registry": registry, "Global": GLOBAL_KEY}[key_type]
            with self._lock:
                self._cache[key] = _Cached(auth, expires)
        return auth, expires
