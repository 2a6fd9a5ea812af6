"""nydusd's configuration (JSON v1, JSON or TOML v2), read into one typed ``NydusdConfig``.

The snapshotter writes legacy v1 JSON (``device.backend``, ``device.cache``,
``fs_prefetch``, ``digest_validate``, ``amplify_io``); newer tools write v2
(``version = 2``, ``backend``, ``cache``, ``rafs``). Each layout is a schema read by the
engine shared with the snapshotter's TOML (``pynydus.confschema``), then translated into
``NydusdConfig``. So errors read the same in both files and name the key as written:
``config c.json: device.backend.config.timeout: expected an integer >= 0, got string "5s"``.
Unknown keys are warnings (upstream's serde ignores them). Keys nydusd has and pynydusd
does not implement yet load at their default and stop the daemon naming the key at any
other value ("... is not supported by pynydusd yet"); docs/config.md lists them.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from pynydus import confschema as schema
from pynydus.confschema import choice, count, unsupported, with_meta
from pynydus.errors import ConfigError

_PRODUCT = "pynydusd"
# nydusd rejects batch sizes above this (0x1000_0000).
_MAX_BATCH = 0x1000_0000
_ENCRYPTION = "encryption of the blob cache"
_FILE_METRICS = "switching per-file metrics (the access trace is always recorded)"
_HEALTH = "health checks that ping a proxy or mirror"


# --- the typed config the daemon uses; the backend sections are also file schemas --------


@dataclass(frozen=True)
class ProxyConfig:
    """A registry backend's HTTP proxy (dfdaemon): ``proxy`` in the backend config."""

    url: str = ""
    ping_url: str = unsupported("", _HEALTH)
    fallback: bool = True  # go direct while the proxy cannot be reached
    check_interval: int = count(5)  # seconds a proxy that failed is bypassed
    use_http: bool = unsupported(False, "plain http to the proxy for an https registry")
    check_pause_elapsed: int = unsupported(300, _HEALTH)
    dragonfly_scheduler_endpoint: str = unsupported("", "Dragonfly's scheduler")


@dataclass(frozen=True)
class MirrorConfig:
    """A host tried before the registry for reads: ``mirrors[i]`` in the backend config.

    The keys after ``auth_through`` are pynydusd's, for what containerd's ``hosts.toml``
    gives a mirror (the snapshotter writes them from ``[remote.mirrors_config] dir``)."""

    host: str = ""  # scheme://host[:port][/path]
    headers: dict[str, str] = field(default_factory=dict)
    # "": after a skip the next read tries the mirror; else this URL must answer 2xx first
    ping_url: str = ""
    health_check_interval: int = count(5)  # seconds a failing mirror is skipped
    failure_limit: int = count(5, minimum=1)  # failures in a row before it is skipped
    auth_through: bool = unsupported(False, "sending the registry's credentials to a mirror")
    # the host's path is the API root itself, not <path>/v2 (containerd's override_path)
    override_path: bool = False
    ca_cert_files: tuple[str, ...] = ()  # added to the registry's for this mirror
    client_cert: str = ""  # PEM certificate to present; with the key unless client_key
    client_key: str = ""
    skip_verify: bool = False  # false: the registry's skip_verify applies
    connect_timeout: int = count(0)  # seconds; 0: the registry's


@dataclass(frozen=True)
class RegistryConfig:
    """The registry backend: ``device.backend.config`` (v1) or ``backend.registry`` (v2)."""

    host: str = ""
    repo: str = ""
    scheme: str = "https"
    auth: str = ""  # base64 "user:password"
    registry_token: str = ""
    skip_verify: bool = False
    ca_cert_files: tuple[str, ...] = ()
    # pynydusd's: a client certificate for the registry (key in the same file unless
    # client_key), and headers sent with every request (hosts.toml's for the server)
    client_cert: str = ""
    client_key: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    timeout: int = count(5)  # seconds; 0 = none
    connect_timeout: int = count(5)
    retry_limit: int = count(0, maximum=255)
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
    """The localfs backend: ``device.backend.config`` (v1) or ``backend.localfs`` (v2)."""

    dir: str = ""
    blob_file: str = ""
    alt_dirs: tuple[str, ...] = ()
    readahead: bool = unsupported(False, "localfs readahead")
    readahead_sec: int = with_meta(count(0), unsupported="localfs readahead")


@dataclass(frozen=True)
class BackendConfig:
    """Where chunks come from: ``type`` (registry or localfs) and that backend's settings."""

    type: str = "localfs"
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    localfs: LocalFsConfig = field(default_factory=LocalFsConfig)


@dataclass(frozen=True)
class CacheConfig:
    """The blob cache: its type, whether cached chunks are checked against their digests, its dir."""

    type: str = ""  # blobcache|filecache: a cache dir; dummycache|"": none
    validate: bool = False
    work_dir: str = "."

    @property
    def enabled(self) -> bool:
        return self.type in ("blobcache", "filecache")


@dataclass(frozen=True)
class PrefetchConfig:
    """Prefetch of the bootstrap's prefetch table (nydusd's ``fs_prefetch`` / ``prefetch``)."""

    enable: bool = False
    threads: int = 8
    batch_size: int = 1 << 20  # largest backend request of a prefetch (merging_size in v1)
    bandwidth_limit: int = 0  # bytes/s, 0 = unlimited
    prefetch_all: bool = False


@dataclass(frozen=True)
class RafsConfig:
    """How the image is served: read amplification, digest checks, xattrs, prefetch."""

    batch_size: int = 1 << 20  # amplify_io in v1: user reads are extended to this
    validate: bool = False  # digest_validate in v1
    enable_xattr: bool = False
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    # pynydusd's: after a read that waited for the backend, put the rest of the chunks it
    # fetched into the kernel's page cache (FUSE_NOTIFY_STORE; our own FUSE session only),
    # so later reads of them never reach the daemon
    fill_page_cache: bool = True
    # pynydusd's: a file of 1 MiB or more whose chunks are all cached is copied once to
    # a file of its own in the cache dir, and later opens of it read that file through
    # the kernel (FUSE passthrough: no daemon round trip, one page cache); our own FUSE
    # session only (daemon/materialize.py, docs/decisions.md "FUSE passthrough")
    passthrough: bool = True


@dataclass(frozen=True)
class NydusdConfig:
    """A daemon's config, v1 or v2 read into one shape (``parse_daemon_config``)."""

    id: str = ""
    backend: BackendConfig = field(default_factory=BackendConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    rafs: RafsConfig = field(default_factory=RafsConfig)

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-able data without secrets (for the API's daemon info), in
        nydusd's ConfigV2 shape: ``nydusctl info`` and other clients of nydusd parse it
        into that type (``version``, ``backend.type`` and the cache and rafs sections
        are required there; the backend sections that are not in use are null)."""
        reg, lfs = self.backend.registry, self.backend.localfs
        prefetch = {"enable": self.rafs.prefetch.enable, "threads": self.rafs.prefetch.threads,
                    "batch_size": self.rafs.prefetch.batch_size,
                    "bandwidth_limit": self.rafs.prefetch.bandwidth_limit,
                    "prefetch_all": self.rafs.prefetch.prefetch_all}
        backend: dict[str, Any] = {"type": self.backend.type, "localdisk": None, "localfs": None,
                                   "oss": None, "s3": None, "registry": None, "http-proxy": None}
        if self.backend.type == "registry":
            backend["registry"] = {
                "scheme": reg.scheme, "host": reg.host, "repo": reg.repo,
                "skip_verify": reg.skip_verify, "timeout": reg.timeout,
                "connect_timeout": reg.connect_timeout, "retry_limit": reg.retry_limit,
                "blob_url_scheme": reg.blob_url_scheme,
                "blob_redirected_host": reg.blob_redirected_host,
                "mirrors": [{"host": m.host} for m in reg.mirrors]}
        elif self.backend.type == "localfs":
            backend["localfs"] = {"blob_file": lfs.blob_file, "dir": lfs.dir,
                                  "alt_dirs": list(lfs.alt_dirs)}
        return {
            "version": 2,
            "id": self.id,
            "backend": backend,
            "cache": {"type": self.cache.type, "compressed": False,
                      "validate": self.cache.validate,
                      "filecache": ({"work_dir": self.cache.work_dir, "disable_indexed_map": False}
                                    if self.cache.enabled else None),
                      "fscache": None, "prefetch": prefetch},
            "rafs": {"mode": "direct", "batch_size": self.rafs.batch_size,
                     "validate": self.rafs.validate, "enable_xattr": self.rafs.enable_xattr,
                     "iostats_files": False, "access_pattern": False, "latest_read_files": False,
                     "prefetch": prefetch},
        }


# --- file layouts -------------------------------------------------------------------------

_MODE = with_meta(choice("direct", ("direct", "cached")),
                  unsupported="cached mode (pynydusd always reads metadata from the bootstrap)")
_COMPRESSED = unsupported(False, "a cache that keeps chunks compressed")


@dataclass(frozen=True)
class _CacheFiles:
    """``device.cache.config`` (v1), ``cache.filecache``/``cache.blobcache`` (v2)."""

    work_dir: str = "."
    disable_indexed_map: bool = unsupported(False, "a chunk map that is not indexed")
    enable_encryption: bool = unsupported(False, _ENCRYPTION)
    enable_convergent_encryption: bool = unsupported(False, _ENCRYPTION)
    encryption_key: str = unsupported("", _ENCRYPTION)


@dataclass(frozen=True)
class _V1Backend:
    """``device.backend`` (v1)."""

    type: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # read by type: registry or localfs


@dataclass(frozen=True)
class _V1Cache:
    """``device.cache`` (v1)."""

    type: str = ""
    compressed: bool = _COMPRESSED
    validate: bool = False
    config: _CacheFiles = field(default_factory=_CacheFiles)
    prefetch_config: dict[str, Any] = unsupported({}, "the cache's own prefetch; use fs_prefetch")


@dataclass(frozen=True)
class _V1Device:
    """``device`` (v1)."""

    id: str = ""
    backend: _V1Backend = field(default_factory=_V1Backend)
    cache: _V1Cache = field(default_factory=_V1Cache)


@dataclass(frozen=True)
class _V1Prefetch:
    """``fs_prefetch``."""

    enable: bool = False
    threads_count: int = count(8, minimum=1, maximum=1024)
    merging_size: int = count(1 << 20, maximum=_MAX_BATCH)
    bandwidth_rate: int = count(0)
    prefetch_all: bool = True  # upstream: v1 default true, v2 false
    stream_prefetch: bool = unsupported(False, "stream prefetch")


@dataclass(frozen=True)
class _V1File:
    """A v1 (nydusd JSON) config file."""

    version: int = 1
    device: _V1Device = field(default_factory=_V1Device)
    mode: str = _MODE
    digest_validate: bool = False
    iostats_files: bool = unsupported(False, _FILE_METRICS)
    access_pattern: bool = unsupported(False, _FILE_METRICS)
    latest_read_files: bool = unsupported(False, _FILE_METRICS)
    enable_xattr: bool = False
    amplify_io: int = count(1 << 20, maximum=_MAX_BATCH)
    fill_page_cache: bool = True
    passthrough: bool = True
    fs_prefetch: _V1Prefetch = field(default_factory=_V1Prefetch)
    id_mapping: object = unsupported(None, "uid/gid mapping")
    warmup: object = unsupported(None, "warm-up of the cache at start")


@dataclass(frozen=True)
class _V2Backend:
    """``backend`` (v2)."""

    type: str = ""
    registry: dict[str, Any] = field(default_factory=dict)
    localfs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _V2Prefetch:
    """``cache.prefetch`` and ``rafs.prefetch``."""

    enable: bool = False
    threads: int = count(8, minimum=1, maximum=1024)
    batch_size: int = count(1 << 20, maximum=_MAX_BATCH)
    bandwidth_limit: int = count(0)
    prefetch_all: bool = False


@dataclass(frozen=True)
class _V2Cache:
    """``cache`` (v2)."""

    type: str = ""
    compressed: bool = _COMPRESSED
    validate: bool = False
    filecache: _CacheFiles = field(default_factory=_CacheFiles)
    blobcache: _CacheFiles = field(default_factory=_CacheFiles)
    fscache: dict[str, Any] = unsupported({}, "fscache (EROFS over /dev/cachefiles)")
    prefetch: _V2Prefetch = field(default_factory=_V2Prefetch)


@dataclass(frozen=True)
class _V2Rafs:
    """``rafs`` (v2)."""

    mode: str = _MODE
    batch_size: int = count(1 << 20, maximum=_MAX_BATCH)
    validate: bool = False
    enable_xattr: bool = False
    fill_page_cache: bool = True
    passthrough: bool = True
    iostats_files: bool = unsupported(False, _FILE_METRICS)
    access_pattern: bool = unsupported(False, _FILE_METRICS)
    latest_read_files: bool = unsupported(False, _FILE_METRICS)
    prefetch: _V2Prefetch = field(default_factory=_V2Prefetch)


@dataclass(frozen=True)
class _V2File:
    """A v2 (JSON or TOML) config file."""

    version: int = 2
    id: str = ""
    backend: _V2Backend = field(default_factory=_V2Backend)
    cache: _V2Cache = field(default_factory=_V2Cache)
    rafs: _V2Rafs = field(default_factory=_V2Rafs)
    overlay: dict[str, Any] = unsupported({}, "a writable overlay")
    external_backends: object = unsupported(None, "external backends")
    metadata_path: str = unsupported("", "a bootstrap path in the config")


# --- reading --------------------------------------------------------------------------------


def _registry(raw: dict[str, Any], key: str, origin: str, warnings: list[str]) -> RegistryConfig:
    cfg: RegistryConfig = schema.read_table(raw, RegistryConfig, prefix=key + ".", origin=origin,
                                            warnings=warnings, product=_PRODUCT)
    if cfg.scheme not in ("http", "https", ""):
        raise ConfigError(f"{origin}: {key}.scheme: must be http or https, got {cfg.scheme!r}")
    if not cfg.host:
        raise ConfigError(f"{origin}: {key}.host: the registry backend needs a host")
    if not cfg.repo:
        raise ConfigError(f"{origin}: {key}.repo: the registry backend needs a repo")
    for i, m in enumerate(cfg.mirrors):
        if not m.host:
            raise ConfigError(f"{origin}: {key}.mirrors[{i}].host: a mirror needs a host")
        if m.client_key and not m.client_cert:
            raise ConfigError(f"{origin}: {key}.mirrors[{i}].client_key: needs client_cert")
    if cfg.client_key and not cfg.client_cert:
        raise ConfigError(f"{origin}: {key}.client_key: needs client_cert")
    if cfg.auth:
        try:
            decoded = base64.b64decode(cfg.auth, validate=True).decode()
        except ValueError as err:  # binascii.Error, UnicodeDecodeError, a non-ASCII string
            raise ConfigError(f"{origin}: {key}.auth: not base64 of user:password") from err
        if ":" not in decoded:
            raise ConfigError(f"{origin}: {key}.auth: must encode user:password")
    return cfg


def _localfs(raw: dict[str, Any], key: str, origin: str, warnings: list[str]) -> LocalFsConfig:
    cfg: LocalFsConfig = schema.read_table(raw, LocalFsConfig, prefix=key + ".", origin=origin,
                                           warnings=warnings, product=_PRODUCT)
    if not cfg.dir and not cfg.blob_file:
        raise ConfigError(f"{origin}: {key}: the localfs backend needs dir or blob_file")
    return cfg


def _backend(btype: str, type_key: str, raw: dict[str, Any], key: str, origin: str,
             warnings: list[str]) -> BackendConfig:
    if btype == "registry":
        return BackendConfig("registry", registry=_registry(raw, key, origin, warnings))
    if btype == "localfs":
        return BackendConfig("localfs", localfs=_localfs(raw, key, origin, warnings))
    if not btype:
        raise ConfigError(f"{origin}: {type_key}: missing")
    raise ConfigError(f"{origin}: {type_key}: backend type {btype!r} is not supported by "
                      f"pynydusd (it has registry and localfs)")


def _cache_type(ctype: str, key: str, origin: str) -> str:
    if ctype not in ("", "blobcache", "filecache", "dummycache", "fscache"):
        raise ConfigError(f"{origin}: {key}: unknown cache type {ctype!r}")
    if ctype == "fscache":
        raise ConfigError(f"{origin}: {key}: fscache needs /dev/cachefiles, which pynydusd "
                          f"does not drive; use blobcache")
    return ctype


def _from_v1(data: dict[str, Any], origin: str, warnings: list[str]) -> NydusdConfig:
    f: _V1File = schema.read_table(data, _V1File, origin=origin, warnings=warnings,
                                   product=_PRODUCT)
    dev = f.device
    backend = _backend(dev.backend.type, "device.backend.type", dev.backend.config,
                       "device.backend.config", origin, warnings)
    cache = CacheConfig(type=_cache_type(dev.cache.type, "device.cache.type", origin),
                        validate=dev.cache.validate, work_dir=dev.cache.config.work_dir)
    p = f.fs_prefetch
    prefetch = PrefetchConfig(enable=p.enable, threads=p.threads_count, batch_size=p.merging_size,
                              bandwidth_limit=p.bandwidth_rate, prefetch_all=p.prefetch_all)
    rafs = RafsConfig(batch_size=f.amplify_io, validate=f.digest_validate,
                      enable_xattr=f.enable_xattr, prefetch=prefetch,
                      fill_page_cache=f.fill_page_cache, passthrough=f.passthrough)
    return NydusdConfig(id=dev.id, backend=backend, cache=cache, rafs=rafs)


def _prefetch_v2(p: _V2Prefetch) -> PrefetchConfig:
    return PrefetchConfig(enable=p.enable, threads=p.threads, batch_size=p.batch_size,
                          bandwidth_limit=p.bandwidth_limit, prefetch_all=p.prefetch_all)


def _from_v2(data: dict[str, Any], origin: str, warnings: list[str]) -> NydusdConfig:
    f: _V2File = schema.read_table(data, _V2File, origin=origin, warnings=warnings,
                                   product=_PRODUCT)
    btype = f.backend.type
    raw = {"registry": f.backend.registry, "localfs": f.backend.localfs}.get(btype, {})
    backend = _backend(btype, "backend.type", raw, f"backend.{btype}", origin, warnings)
    c = f.cache
    files = c.filecache if "filecache" in (data.get("cache") or {}) else c.blobcache
    cache = CacheConfig(type=_cache_type(c.type, "cache.type", origin), validate=c.validate,
                        work_dir=files.work_dir)
    # rafs.prefetch is the filesystem's; cache.prefetch (the blob cache's) serves when it
    # is the only one enabled
    r = f.rafs
    prefetch = r.prefetch if r.prefetch.enable or not c.prefetch.enable else c.prefetch
    rafs = RafsConfig(batch_size=r.batch_size, validate=r.validate, enable_xattr=r.enable_xattr,
                      prefetch=_prefetch_v2(prefetch), fill_page_cache=r.fill_page_cache,
                      passthrough=r.passthrough)
    return NydusdConfig(id=f.id, backend=backend, cache=cache, rafs=rafs)


def parse_daemon_config(text: str, origin: str = "config") -> tuple[NydusdConfig, list[str]]:
    """Parse nydusd config text (v1 JSON, v2 JSON or v2 TOML) into (config, warnings).

    ``IMAGE_PULL_AUTH`` in the environment (base64 user:password) replaces the
    registry backend's ``auth``, as nydusd does. Raises ConfigError naming the key for a
    wrong value and for a key pynydusd does not support yet set to a non-default value.
    """
    warnings: list[str] = []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as jerr:
        import tomllib  # (with datetime) only for a TOML config

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{origin}: not valid JSON ({jerr}) nor TOML") from jerr
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: top level: expected a table, got {schema.describe(data)}")
    version = data.get("version", 1)
    if version == 2:
        cfg = _from_v2(data, origin, warnings)
    elif version == 1 or "device" in data:
        cfg = _from_v1(data, origin, warnings)
    else:
        raise ConfigError(f"{origin}: version: must be 1 or 2, got {schema.describe(version)}")
    env_auth = os.environ.get("IMAGE_PULL_AUTH")
    if env_auth and cfg.backend.type == "registry":
        cfg = replace(cfg, backend=replace(cfg.backend, registry=replace(cfg.backend.registry,
                                                                          auth=env_auth)))
    return cfg, warnings


def load_daemon_config(path: str) -> tuple[NydusdConfig, list[str]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"config {path}: cannot read: {err.strerror}") from err
    return parse_daemon_config(text, f"config {path}")
