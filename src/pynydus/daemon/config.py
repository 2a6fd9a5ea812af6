"""nydusd's configuration (JSON v1, JSON or TOML v2), parsed into one typed form.

The snapshotter writes legacy v1 JSON (``device.backend``, ``device.cache``,
``fs_prefetch``, ``digest_validate``, ``amplify_io``); newer tools write v2
(``version = 2``, ``backend``, ``cache``, ``rafs``). Both become ``NydusdConfig``.

Every known field is type-checked and a wrong one raises ConfigError naming the
dotted path (``device.backend.config.timeout: expected an integer, got "5s"``).
Unknown keys are reported as warnings and otherwise ignored, as upstream's serde
defaults ignore them (old templates still carry ``mirrors`` and the like).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pynydus.errors import ConfigError


@dataclass(frozen=True)
class ProxyConfig:
    url: str = ""
    ping_url: str = ""
    fallback: bool = True
    check_interval: int = 5
    use_http: bool = False


@dataclass(frozen=True)
class MirrorConfig:
    host: str
    headers: Mapping[str, str] = field(default_factory=dict)
    ping_url: str = ""
    health_check_interval: int = 5
    failure_limit: int = 5


@dataclass(frozen=True)
class RegistryConfig:
    host: str = ""
    repo: str = ""
    scheme: str = "https"
    auth: str = ""  # base64 "user:password"
    registry_token: str = ""
    skip_verify: bool = False
    ca_cert_files: tuple[str, ...] = ()
    timeout: int = 5  # seconds; 0 = none
    connect_timeout: int = 5
    retry_limit: int = 0
    blob_url_scheme: str = ""
    blob_redirected_host: str = ""
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    mirrors: tuple[MirrorConfig, ...] = ()

    def credentials(self) -> tuple[str, str] | None:
        """(username, password) from ``auth``; None when there is none."""
        if not self.auth:
            return None
        user, _, password = base64.b64decode(self.auth).decode().partition(":")
        return user, password


@dataclass(frozen=True)
class LocalFsConfig:
    dir: str = ""
    blob_file: str = ""
    alt_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackendConfig:
    type: str = "localfs"
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    localfs: LocalFsConfig = field(default_factory=LocalFsConfig)


@dataclass(frozen=True)
class CacheConfig:
    type: str = ""  # blobcache|filecache: a cache dir; dummycache|"": none
    compressed: bool = False
    validate: bool = False
    work_dir: str = "."
    disable_indexed_map: bool = False

    @property
    def enabled(self) -> bool:
        return self.type in ("blobcache", "filecache")


@dataclass(frozen=True)
class PrefetchConfig:
    enable: bool = False
    threads: int = 8
    batch_size: int = 1 << 20  # merging_size in v1
    bandwidth_limit: int = 0  # bytes/s, 0 = unlimited
    prefetch_all: bool = False


@dataclass(frozen=True)
class RafsConfig:
    mode: str = "direct"
    batch_size: int = 1 << 20  # amplify_io in v1: user reads are extended to this
    validate: bool = False  # digest_validate in v1
    enable_xattr: bool = False
    iostats_files: bool = False
    access_pattern: bool = False
    latest_read_files: bool = False
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)


@dataclass(frozen=True)
class NydusdConfig:
    id: str = ""
    backend: BackendConfig = field(default_factory=BackendConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    rafs: RafsConfig = field(default_factory=RafsConfig)

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-able data without secrets (for the API's daemon info)."""
        reg = self.backend.registry
        return {
            "id": self.id,
            "backend": {"type": self.backend.type,
                        "registry": {"scheme": reg.scheme, "host": reg.host, "repo": reg.repo},
                        "localfs": {"dir": self.backend.localfs.dir}},
            "cache": {"type": self.cache.type, "work_dir": self.cache.work_dir,
                      "compressed": self.cache.compressed, "validate": self.cache.validate},
            "rafs": {"mode": self.rafs.mode, "enable_xattr": self.rafs.enable_xattr,
                     "prefetch": {"enable": self.rafs.prefetch.enable,
                                  "prefetch_all": self.rafs.prefetch.prefetch_all}},
        }


# --- typed access to parsed JSON/TOML ---------------------------------------------------


class _Node:
    """A mapping being read field by field; remembers which keys were consumed."""

    def __init__(self, data: Any, path: str, origin: str, warnings: list[str]) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{origin}: {path or 'top level'}: expected an object, got {_describe(data)}")
        self.data, self.path, self.origin, self.warnings = data, path, origin, warnings
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, kinds: tuple[type, ...], what: str, default: Any) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, what, value)
        if not isinstance(value, kinds):
            raise self.error(key, what, value)
        return value

    def error(self, key: str, what: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.origin}: {self._key(key)}: expected {what}, got {_describe(value)}")

    def str(self, key: str, default: str = "") -> str:
        return str(self._get(key, (str,), "a string", default))

    def bool(self, key: str, default: bool = False) -> bool:
        return bool(self._get(key, (bool,), "a boolean", default))

    def int(self, key: str, default: int = 0, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = int(self._get(key, (int,), "an integer", default))
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise ConfigError(f"{self.origin}: {self._key(key)}: must be {bound}, got {value}")
        return value

    def strs(self, key: str) -> tuple[str, ...]:
        value = self._get(key, (list,), "a list of strings", [])
        if not all(isinstance(v, str) for v in value):
            raise self.error(key, "a list of strings", value)
        return tuple(value)

    def node(self, key: str) -> _Node:
        self.used.add(key)
        return _Node(self.data.get(key) or {}, self._key(key), self.origin, self.warnings)

    def has(self, key: str) -> bool:
        return key in self.data

    def finish(self, *ignored: str) -> None:
        for key in self.data:
            if key not in self.used and key not in ignored:
                self.warnings.append(f"{self.origin}: unknown key {self._key(key)!r} ignored")


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "boolean " + ("true" if value else "false")
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# nydusd rejects batch sizes above this (0x1000_0000).
_MAX_BATCH = 0x1000_0000


def _proxy(n: _Node) -> ProxyConfig:
    p = ProxyConfig(url=n.str("url"), ping_url=n.str("ping_url"), fallback=n.bool("fallback", True),
                    check_interval=n.int("check_interval", 5), use_http=n.bool("use_http"))
    n.finish("check_pause_elapsed", "dragonfly_scheduler_endpoint")
    return p


def _registry(n: _Node) -> RegistryConfig:
    mirrors = []
    raw_mirrors = n._get("mirrors", (list,), "a list of mirror objects", [])
    for i, m in enumerate(raw_mirrors):
        mn = _Node(m, f"{n._key('mirrors')}[{i}]", n.origin, n.warnings)
        headers = mn._get("headers", (dict,), "an object of strings", {})
        mirrors.append(MirrorConfig(host=mn.str("host"), headers=dict(headers), ping_url=mn.str("ping_url"),
                                    health_check_interval=mn.int("health_check_interval", 5),
                                    failure_limit=mn.int("failure_limit", 5)))
        mn.finish("auth_through")
    cfg = RegistryConfig(
        host=n.str("host"), repo=n.str("repo"), scheme=n.str("scheme", "https"), auth=n.str("auth"),
        registry_token=n.str("registry_token"), skip_verify=n.bool("skip_verify"),
        ca_cert_files=n.strs("ca_cert_files"), timeout=n.int("timeout", 5),
        connect_timeout=n.int("connect_timeout", 5), retry_limit=n.int("retry_limit", 0, maximum=255),
        blob_url_scheme=n.str("blob_url_scheme"), blob_redirected_host=n.str("blob_redirected_host"),
        proxy=_proxy(n.node("proxy")), mirrors=tuple(mirrors),
    )
    n.finish()
    if cfg.scheme not in ("http", "https", ""):
        raise ConfigError(f"{n.origin}: {n._key('scheme')}: must be http or https, got {cfg.scheme!r}")
    if not cfg.host:
        raise ConfigError(f"{n.origin}: {n._key('host')}: the registry backend needs a host")
    if not cfg.repo:
        raise ConfigError(f"{n.origin}: {n._key('repo')}: the registry backend needs a repo")
    if cfg.auth:
        try:
            decoded = base64.b64decode(cfg.auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as err:
            raise ConfigError(f"{n.origin}: {n._key('auth')}: not base64 of user:password") from err
        if ":" not in decoded:
            raise ConfigError(f"{n.origin}: {n._key('auth')}: must encode user:password")
    return cfg


def _localfs(n: _Node) -> LocalFsConfig:
    cfg = LocalFsConfig(dir=n.str("dir"), blob_file=n.str("blob_file"), alt_dirs=n.strs("alt_dirs"))
    n.finish("readahead", "readahead_sec")
    if not cfg.dir and not cfg.blob_file:
        raise ConfigError(f"{n.origin}: {n.path}: the localfs backend needs dir or blob_file")
    return cfg


def _backend(btype: str, conf: _Node, path: str, origin: str) -> BackendConfig:
    if btype == "registry":
        return BackendConfig("registry", registry=_registry(conf))
    if btype == "localfs":
        return BackendConfig("localfs", localfs=_localfs(conf))
    raise ConfigError(f"{origin}: {path}: backend type {btype!r} is not supported "
                      f"(pynydusd has registry and localfs)")


def _cache_type(n: _Node, key: str) -> str:
    ctype = n.str(key)
    if ctype not in ("", "blobcache", "filecache", "dummycache", "fscache"):
        raise ConfigError(f"{n.origin}: {n._key(key)}: unknown cache type {ctype!r}")
    if ctype == "fscache":
        raise ConfigError(f"{n.origin}: {n._key(key)}: fscache needs /dev/cachefiles, which pynydusd "
                          f"does not drive; use blobcache")
    return ctype


def _prefetch(n: _Node, v1: bool) -> PrefetchConfig:
    cfg = PrefetchConfig(
        enable=n.bool("enable"),
        threads=n.int("threads_count" if v1 else "threads", 8, minimum=1, maximum=1024),
        batch_size=n.int("merging_size" if v1 else "batch_size", 1 << 20, maximum=_MAX_BATCH),
        bandwidth_limit=n.int("bandwidth_rate" if v1 else "bandwidth_limit", 0),
        prefetch_all=n.bool("prefetch_all", v1),  # upstream: v1 default true, v2 false
    )
    n.finish("stream_prefetch", "threads" if v1 else "threads_count")
    return cfg


def _from_v1(root: _Node) -> NydusdConfig:
    dev = root.node("device")
    be = dev.node("backend")
    btype = be.str("type")
    backend = _backend(btype, be.node("config"), be._key("config"), root.origin)
    be.finish()
    cache = dev.node("cache")
    ctype = _cache_type(cache, "type")
    cc = cache.node("config")
    cache_cfg = CacheConfig(type=ctype, compressed=cache.bool("compressed"), validate=cache.bool("validate"),
                            work_dir=cc.str("work_dir", "."), disable_indexed_map=cc.bool("disable_indexed_map"))
    cc.finish("enable_encryption", "enable_convergent_encryption", "encryption_key")
    cache.finish("prefetch_config")
    dev_id = dev.str("id")
    dev.finish()
    prefetch = _prefetch(root.node("fs_prefetch"), v1=True)
    rafs = RafsConfig(
        mode=root.str("mode", "direct"), batch_size=root.int("amplify_io", 1 << 20, maximum=_MAX_BATCH),
        validate=root.bool("digest_validate"), enable_xattr=root.bool("enable_xattr"),
        iostats_files=root.bool("iostats_files"), access_pattern=root.bool("access_pattern"),
        latest_read_files=root.bool("latest_read_files"), prefetch=prefetch,
    )
    root.finish("id_mapping", "warmup")
    return NydusdConfig(id=dev_id, backend=backend, cache=cache_cfg, rafs=rafs)


def _from_v2(root: _Node) -> NydusdConfig:
    be = root.node("backend")
    btype = be.str("type")
    backend = _backend(btype, be.node(btype), be._key(btype), root.origin) if btype else BackendConfig()
    if not btype:
        raise ConfigError(f"{root.origin}: backend.type: missing")
    be.finish(*(k for k in be.data if k != btype))
    cache = root.node("cache")
    ctype = _cache_type(cache, "type")
    fc = cache.node("filecache") if cache.has("filecache") else cache.node("blobcache")
    cache_cfg = CacheConfig(type=ctype, compressed=cache.bool("compressed"), validate=cache.bool("validate"),
                            work_dir=fc.str("work_dir", "."), disable_indexed_map=fc.bool("disable_indexed_map"))
    fc.finish("enable_encryption", "enable_convergent_encryption", "encryption_key")
    cache_prefetch = cache.node("prefetch")
    cp = _prefetch(cache_prefetch, v1=False)
    cache.finish("fscache")
    rn = root.node("rafs")
    rp = _prefetch(rn.node("prefetch"), v1=False)
    rafs = RafsConfig(
        mode=rn.str("mode", "direct"), batch_size=rn.int("batch_size", 1 << 20, maximum=_MAX_BATCH),
        validate=rn.bool("validate"), enable_xattr=rn.bool("enable_xattr"),
        iostats_files=rn.bool("iostats_files"), access_pattern=rn.bool("access_pattern"),
        latest_read_files=rn.bool("latest_read_files"),
        prefetch=rp if rp.enable or not cp.enable else cp,
    )
    rn.finish()
    cfg = NydusdConfig(id=root.str("id"), backend=backend, cache=cache_cfg, rafs=rafs)
    root.finish("version", "overlay", "external_backends", "metadata_path")
    return cfg


def parse_daemon_config(text: str, origin: str = "config") -> tuple[NydusdConfig, list[str]]:
    """Parse nydusd config text (v1 JSON, v2 JSON or v2 TOML) into (config, warnings).

    ``IMAGE_PULL_AUTH`` in the environment (base64 user:password) replaces the
    registry backend's ``auth``, as nydusd does. Raises ConfigError naming the field.
    """
    warnings: list[str] = []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as jerr:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{origin}: not valid JSON ({jerr}) nor TOML") from jerr
    root = _Node(data, "", origin, warnings)
    version = data.get("version", 1)
    if version == 2:
        cfg = _from_v2(root)
    elif version == 1 or "device" in data:
        cfg = _from_v1(root)
    else:
        raise ConfigError(f"{origin}: version: must be 1 or 2, got {_describe(version)}")
    if cfg.rafs.mode not in ("direct", "cached"):
        raise ConfigError(f"{origin}: mode: must be direct or cached, got {cfg.rafs.mode!r}")
    env_auth = os.environ.get("IMAGE_PULL_AUTH")
    if env_auth and cfg.backend.type == "registry":
        from dataclasses import replace

        cfg = replace(cfg, backend=replace(cfg.backend, registry=replace(cfg.backend.registry, auth=env_auth)))
    return cfg, warnings


def load_daemon_config(path: str) -> tuple[NydusdConfig, list[str]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"config {path}: cannot read: {err.strerror}") from err
    return parse_daemon_config(text, f"config {path}")
