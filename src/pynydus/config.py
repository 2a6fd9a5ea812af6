"""Snapshotter configuration: upstream's TOML keys as frozen, validated dataclasses.

Theory of operation. ``load_config`` turns one TOML file (read with tomllib) plus a mapping
of command-line overrides into a ``SnapshotterConfig`` in three steps:

1. *Collect*: walk the TOML tables guided by the dataclass schema below. Every known key is
   recorded under its dotted name together with where it came from; unknown keys and
   sections become warnings with a difflib suggestion (upstream ignores them silently).
   Overrides are recorded after the file, so the command line always wins.
2. *Convert*: each recorded value is type-checked and converted (durations to seconds,
   enumerations to ``StrEnum`` members). A mismatch raises ``ConfigError`` naming the dotted
   key, what was expected and what was found.
3. *Validate*: the cross-field rules of upstream's ``ValidateConfig`` and
   ``ProcessConfigurations`` (root length, keychain exclusivity, files that must exist,
   fscache forcing the shared daemon mode).

Deliberate difference from upstream: upstream merges its defaults in with mergo *after*
loading, which only fills zero values, so ``log_rotation_compress = false`` cannot turn a
default-true boolean off and a numeric ``0`` means "use the default". Here a key that is
present takes its value; defaults apply only to keys that are absent.

Everything here except the existence checks of validation (mirrors dir, public key file) is
pure: values in, values out.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pynydus.errors import ConfigError
from pynydus.logs import LEVELS

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_ROOT",
    "DEFAULT_SYSTEM_ADDRESS",
    "MAX_ROOT_PATH_LEN",
    "SUPPORTED_VERSION",
    "AuthConfig",
    "CacheManagerConfig",
    "CgroupConfig",
    "DaemonConfig",
    "DaemonMode",
    "DebugConfig",
    "ExperimentalConfig",
    "FailoverPolicy",
    "FsDriver",
    "ImageConfig",
    "LogConfig",
    "MetricsConfig",
    "MirrorsConfig",
    "RecoverPolicy",
    "RemoteConfig",
    "SnapshotConfig",
    "SnapshotterConfig",
    "SystemConfig",
    "TarfsConfig",
    "TarfsExportMode",
    "load_config",
    "parse_duration",
    "parse_memory_limit",
]

SUPPORTED_VERSION: Final = 1
DEFAULT_ROOT: Final = "/var/lib/containerd/io.containerd.snapshotter.v1.nydus"
DEFAULT_ADDRESS: Final = "/run/containerd-nydus/containerd-nydus-grpc.sock"
DEFAULT_SYSTEM_ADDRESS: Final = "/run/containerd-nydus/system.sock"
# nydusd API sockets live at <root>/socket/<20-char daemon id>/api<N>.sock; with a root of
# at most 70 bytes that path fits the 108-byte sun_path of a unix socket address.
MAX_ROOT_PATH_LEN: Final = 70

LOG_LEVELS: Final = tuple(LEVELS)  # logrus's names


class FsDriver(enum.StrEnum):
    """How RAFS instances reach the host (``daemon.fs_driver``)."""

    FUSEDEV = "fusedev"
    FSCACHE = "fscache"
    BLOCKDEV = "blockdev"
    PROXY = "proxy"
    NODEV = "nodev"


class DaemonMode(enum.StrEnum):
    """How nydusd daemons are shared between RAFS instances; ``multiple`` parses as DEDICATED."""

    DEDICATED = "dedicated"
    SHARED = "shared"
    NONE = "none"


class RecoverPolicy(enum.StrEnum):
    """What the manager does when a nydusd dies (``daemon.recover_policy``)."""

    NONE = "none"
    RESTART = "restart"
    FAILOVER = "failover"


class FailoverPolicy(enum.StrEnum):
    """nydusd ``--failover-policy`` for in-flight FUSE requests after a failover."""

    NONE = "none"
    RESEND = "resend"
    FLUSH = "flush"


class TarfsExportMode(enum.StrEnum):
    """Which tarfs block images (and dm-verity data) to export; DISABLED exports nothing."""

    DISABLED = ""
    LAYER_VERITY_ONLY = "layer_verity_only"
    IMAGE_VERITY_ONLY = "image_verity_only"
    LAYER_BLOCK = "layer_block"
    IMAGE_BLOCK = "image_block"
    LAYER_BLOCK_WITH_VERITY = "layer_block_with_verity"
    IMAGE_BLOCK_WITH_VERITY = "image_block_with_verity"


# Field metadata understood by the converter.
_DURATION = "duration"  # TOML string like "10s" -> float seconds
_POSITIVE = "positive"  # duration must be > 0
_MEMORY = "memory"  # string checked with parse_memory_limit, kept as written
_MIN = "min"
_MAX = "max"
_CHOICES = "choices"  # case-insensitive string choices, stored lower-case
_ALIASES = "aliases"  # enum spellings that map onto a member


def _duration(default: float, *, positive: bool) -> Any:
    return field(default=default, metadata={_DURATION: True, _POSITIVE: positive})


def _count(default: int, *, maximum: int | None = None) -> Any:
    return field(default=default, metadata={_MIN: 0, _MAX: maximum})


# --- sections -------------------------------------------------------------------------


@dataclass(frozen=True)
class DebugConfig:
    """``[system.debug]``."""

    # 0: do not sample nydusd's start-up CPU utilisation
    daemon_cpu_profile_duration_secs: int = _count(0)
    # "": no pprof-like listener
    pprof_address: str = ""


@dataclass(frozen=True)
class SystemConfig:
    """``[system]``: the system controller, HTTP on a unix socket."""

    enable: bool = False
    address: str = DEFAULT_SYSTEM_ADDRESS
    uid: int = _count(0)
    gid: int = _count(0)
    debug: DebugConfig = field(default_factory=DebugConfig)


@dataclass(frozen=True)
class DaemonConfig:
    """``[daemon]``: how nydusd is started and recovered."""

    # bare names are looked up in $PATH when the binary is spawned, as upstream does at start-up
    nydusd_path: str = "nydusd"
    nydusd_config: str = "/etc/nydus/nydusd-config.json"
    nydusimage_path: str = "nydus-image"
    fs_driver: FsDriver = FsDriver.FUSEDEV
    recover_policy: RecoverPolicy = RecoverPolicy.RESTART
    # 0: let nydusd pick its own thread count; nydusd rejects more than 1024
    threads_number: int = _count(0, maximum=1024)
    # MB; 0: nydusd does not rotate its log
    log_rotation_size: int = _count(100)
    failover_policy: FailoverPolicy = FailoverPolicy.RESEND


@dataclass(frozen=True)
class CgroupConfig:
    """``[cgroup]``: the cgroup nydusd daemons are put in."""

    enable: bool = False
    # "": no memory limit; otherwise bytes, 512MiB, 2Gi or 10% of RAM (see parse_memory_limit)
    memory_limit: str = field(default="", metadata={_MEMORY: True})

    def memory_limit_bytes(self, total_ram: int) -> int | None:
        """The limit in bytes for a host with ``total_ram`` bytes, or None for no limit."""
        return parse_memory_limit(self.memory_limit, total_ram)


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: the snapshotter's own log."""

    log_to_stdout: bool = False
    level: str = field(default="info", metadata={_CHOICES: LOG_LEVELS})
    # "": <root>/logs, see SnapshotterConfig.log_dir()
    dir: str = ""
    log_rotation_max_size: int = _count(200)  # MB
    log_rotation_max_backups: int = _count(5)
    log_rotation_max_age: int = _count(0)  # days; 0: never delete by age
    log_rotation_local_time: bool = True
    log_rotation_compress: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: Prometheus exporter."""

    # "": no exporter and no collection at all
    address: str = ""
    # in-flight IO older than this counts as hung
    hung_io_interval: float = _duration(10.0, positive=True)
    collect_interval: float = _duration(60.0, positive=True)


@dataclass(frozen=True)
class MirrorsConfig:
    """``[remote.mirrors_config]``: containerd-style ``hosts.toml`` directory."""

    dir: str = ""


@dataclass(frozen=True)
class AuthConfig:
    """``[remote.auth]``: where registry credentials come from besides labels and docker config."""

    enable_kubeconfig_keychain: bool = False
    # "": $KUBECONFIG, ~/.kube/config, then the in-cluster service account
    kubeconfig_path: str = ""
    enable_cri_keychain: bool = False
    image_service_address: str = "/run/containerd/containerd.sock"
    enable_kubelet_credential_providers: bool = False
    credential_provider_config: str = ""
    credential_provider_bin_dir: str = ""
    # 0: no renewal loop
    credential_renewal_interval: float = _duration(0.0, positive=False)


@dataclass(frozen=True)
class RemoteConfig:
    """``[remote]``: registries."""

    # upstream parses but never uses it; kept so existing files load without warnings
    convert_vpc_registry: bool = False
    skip_ssl_verify: bool = False
    mirrors_config: MirrorsConfig = field(default_factory=MirrorsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)


@dataclass(frozen=True)
class SnapshotConfig:
    """``[snapshot]``: how Snapshots API calls are answered."""

    enable_nydus_overlayfs: bool = False
    # "": mount type fuse.nydus-overlayfs; otherwise fuse.<path>
    nydus_overlayfs_path: str = ""
    enable_kata_volume: bool = False
    sync_remove: bool = False
    enable_overlayfs_volatile: bool = False


@dataclass(frozen=True)
class CacheManagerConfig:
    """``[cache_manager]``: the blob cache."""

    # upstream accepts and ignores it
    disable: bool = False
    gc_period: float = _duration(24 * 3600.0, positive=True)
    # "": <root>/cache, see SnapshotterConfig.cache_dir()
    cache_dir: str = ""


@dataclass(frozen=True)
class ImageConfig:
    """``[image]``: bootstrap signature verification."""

    public_key_file: str = ""
    validate_signature: bool = False


@dataclass(frozen=True)
class TarfsConfig:
    """``[experimental.tarfs]``: run OCI images with their tar layers as RAFS blobs."""

    enable_tarfs: bool = False
    mount_tarfs_on_host: bool = False
    tarfs_hint: bool = False
    # 0: no limit on concurrent layer conversions per image
    max_concurrent_proc: int = _count(0)
    export_mode: TarfsExportMode = TarfsExportMode.DISABLED


@dataclass(frozen=True)
class ExperimentalConfig:
    """``[experimental]``."""

    enable_stargz: bool = False
    enable_referrer_detect: bool = False
    enable_index_detect: bool = False
    enable_backend_source: bool = False
    tarfs: TarfsConfig = field(default_factory=TarfsConfig)


@dataclass(frozen=True)
class SnapshotterConfig:
    """The whole configuration file; field names are upstream's TOML keys.

    Instances are immutable; derive variants with ``dataclasses.replace``. The ``*_dir``
    methods give the on-disk layout under ``root`` and cost nothing (no I/O).
    """

    version: int = SUPPORTED_VERSION
    root: str = DEFAULT_ROOT
    address: str = DEFAULT_ADDRESS
    uid: int = _count(0)
    gid: int = _count(0)
    # upstream's default "multiple" is an alias of dedicated
    daemon_mode: DaemonMode = field(
        default=DaemonMode.DEDICATED, metadata={_ALIASES: {"multiple": DaemonMode.DEDICATED}}
    )
    cleanup_on_close: bool = False
    system: SystemConfig = field(default_factory=SystemConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    cgroup: CgroupConfig = field(default_factory=CgroupConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    cache_manager: CacheManagerConfig = field(default_factory=CacheManagerConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    experimental: ExperimentalConfig = field(default_factory=ExperimentalConfig)

    def snapshots_dir(self) -> str:
        """``<root>/snapshots``: one ``<id>/{fs,work,mnt}`` per snapshot."""
        return os.path.join(self.root, "snapshots")

    def cache_dir(self) -> str:
        """``cache_manager.cache_dir``, or ``<root>/cache``: blobs, tarfs tars and disks."""
        return self.cache_manager.cache_dir or os.path.join(self.root, "cache")

    def log_dir(self) -> str:
        """``log.dir``, or ``<root>/logs``: the snapshotter's and each nydusd's log."""
        return self.log.dir or os.path.join(self.root, "logs")

    def socket_dir(self) -> str:
        """``<root>/socket``: ``<daemon id>/api.sock`` per nydusd."""
        return os.path.join(self.root, "socket")

    def config_dir(self) -> str:
        """``<root>/config``: ``<daemon id>/config.json`` per nydusd."""
        return os.path.join(self.root, "config")

    def mnt_dir(self) -> str:
        """``<root>/mnt``: the shared fusedev daemon's mountpoint."""
        return os.path.join(self.root, "mnt")

    def supervisor_dir(self) -> str:
        """``<root>/supervisor``: ``<daemon id>.sock`` per nydusd under the failover policy."""
        return os.path.join(self.root, "supervisor")


# --- value parsers ----------------------------------------------------------------------

# Go's time.ParseDuration units, which upstream's files are written for.
_DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_WHOLE = re.compile(r"(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")


def parse_duration(text: str) -> float:
    """Parse a Go-style duration ("24h", "10s", "1m30s", "500ms", "0") into seconds.

    Negative durations are rejected: every duration in the file is an interval.
    Raises ConfigError for anything else.
    """
    if text == "0":
        return 0.0
    if not _DURATION_WHOLE.fullmatch(text):
        raise ConfigError(f'invalid duration "{text}": expected e.g. "10s", "1m", "24h"')
    return sum(float(num) * _DURATION_UNITS[unit] for num, unit in _DURATION_PART.findall(text))


_MEMORY_UNITS: Final = {
    "B": 1,
    **{f"{p}iB": 1024 ** (i + 1) for i, p in enumerate("KMGTP")},
    **{f"{p}i": 1024 ** (i + 1) for i, p in enumerate("KMGTP")},
}
_MEMORY_PLAIN = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_MEMORY_WITH_UNIT = re.compile(r"(\d+\.?\d*|\.\d+)([A-Za-z%]+)")


def parse_memory_limit(text: str, total_ram: int) -> int | None:
    """Parse ``cgroup.memory_limit`` into bytes; None means "no limit" (empty string).

    Accepted, as upstream's parser: a plain number of bytes ("1073741824", "1.5e9"), a number
    with unit B, KiB..PiB or Ki..Pi (powers of 1024), or a percentage of ``total_ram`` bytes
    rounded to the nearest byte. Unlike upstream, an unknown unit is an error rather than a
    limit of 0 bytes. Raises ConfigError.
    """
    text = text.strip()
    if text == "":
        return None
    if _MEMORY_PLAIN.fullmatch(text):
        return int(float(text))
    match = _MEMORY_WITH_UNIT.fullmatch(text)
    if match is None:
        raise ConfigError(f'invalid memory limit "{text}": expected e.g. "512MiB", "2Gi" or "10%"')
    value, unit = float(match[1]), match[2]
    if unit == "%":
        return int(total_ram * value / 100 + 0.5)
    if unit not in _MEMORY_UNITS:
        units = ", ".join([*_MEMORY_UNITS, "%"])
        raise ConfigError(f'invalid memory limit "{text}": unknown unit "{unit}" (known: {units})')
    return int(value * _MEMORY_UNITS[unit])


# --- schema walking -------------------------------------------------------------------


_SCHEMAS: dict[type[Any], dict[str, tuple[dataclasses.Field[Any], Any]]] = {}


def _schema(cls: type[Any]) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Field name -> (field, resolved annotation) of a section dataclass, cached."""
    if cls not in _SCHEMAS:
        hints = typing.get_type_hints(cls)
        _SCHEMAS[cls] = {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}
    return _SCHEMAS[cls]


def _is_section(hint: Any) -> bool:
    return dataclasses.is_dataclass(hint)


@functools.cache
def _all_leaves() -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    leaves: dict[str, tuple[dataclasses.Field[Any], Any]] = {}

    def walk(cls: type[Any], prefix: str) -> None:
        for name, (fld, hint) in _schema(cls).items():
            if _is_section(hint):
                walk(hint, f"{prefix}{name}.")
            else:
                leaves[f"{prefix}{name}"] = (fld, hint)

    walk(SnapshotterConfig, "")
    return leaves


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return f"{type(value).__name__} {value}"


def _suggestion(cls: type[Any], prefix: str, name: str) -> str:
    # A key written in the wrong section (e.g. upstream's old [experimental] enable_tarfs)
    # is the likelier mistake than a typo, so an exact name elsewhere is suggested first.
    elsewhere = [k for k in _all_leaves() if k.rsplit(".", 1)[-1] == name]
    if elsewhere:
        return f' (did you mean "{elsewhere[0]}"?)'
    close = difflib.get_close_matches(name, list(_schema(cls)), n=1, cutoff=0.7)
    return f' (did you mean "{close[0]}"?)' if close else ""


_Recorded = dict[str, tuple[object, str]]  # dotted key -> (raw value, origin for messages)


def _collect(
    table: Mapping[str, object],
    cls: type[Any],
    prefix: str,
    origin: str,
    out: _Recorded,
    warnings: list[str],
) -> None:
    schema = _schema(cls)
    for name, value in table.items():
        dotted = prefix + name
        entry = schema.get(name)
        if entry is None:
            what = "section" if isinstance(value, dict) else "key"
            hint = _suggestion(cls, prefix, name)
            warnings.append(f'{origin}: unknown {what} "{dotted}"{hint}')
            continue
        if _is_section(entry[1]):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {dotted}: expected a table, got {_describe(value)}")
            _collect(value, entry[1], dotted + ".", origin, out, warnings)
        else:
            out[dotted] = (value, origin)


class _Mismatch(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _quoted(values: typing.Iterable[str]) -> str:
    return ", ".join(f'"{v}"' for v in values)


def _coerce(fld: dataclasses.Field[Any], hint: Any, raw: object) -> object:
    meta = fld.metadata
    if meta.get(_DURATION):
        expected = 'a duration string such as "10s", "1m" or "24h"'
        if meta.get(_POSITIVE):
            expected = "a positive " + expected.removeprefix("a ")
        if not isinstance(raw, str):
            raise _Mismatch(expected)
        try:
            seconds = parse_duration(raw)
        except ConfigError:
            raise _Mismatch(expected) from None
        if meta.get(_POSITIVE) and seconds <= 0:
            raise _Mismatch(expected)
        return seconds
    if meta.get(_MEMORY):
        expected = 'a memory size string such as "512MiB", "2Gi", "10%" or ""'
        if not isinstance(raw, str):
            raise _Mismatch(expected)
        try:
            parse_memory_limit(raw, 0)
        except ConfigError:
            raise _Mismatch(expected) from None
        return raw
    if hint is bool:
        if not isinstance(raw, bool):
            raise _Mismatch("a boolean")
        return raw
    if hint is int:
        lo, hi = meta.get(_MIN), meta.get(_MAX)
        expected = "an integer"
        if lo is not None and hi is not None:
            expected = f"an integer in {lo}..{hi}"
        elif lo is not None:
            expected = f"an integer >= {lo}"
        # bool is an int subclass in Python but never an integer in TOML
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise _Mismatch(expected)
        if (lo is not None and raw < lo) or (hi is not None and raw > hi):
            raise _Mismatch(expected)
        return raw
    if hint is str:
        if not isinstance(raw, str):
            raise _Mismatch("a string")
        choices: tuple[str, ...] | None = meta.get(_CHOICES)
        if choices is not None:
            if raw.lower() not in choices:
                raise _Mismatch(f"one of {_quoted(choices)}")
            return raw.lower()
        return raw
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        aliases: Mapping[str, object] = meta.get(_ALIASES, {})
        spellings = [*(m.value for m in hint), *aliases]
        if not isinstance(raw, str) or raw not in spellings:
            raise _Mismatch(f"one of {_quoted(spellings)}")
        return aliases[raw] if raw in aliases else hint(raw)
    raise AssertionError(f"config schema: no converter for {hint!r}")  # a bug, not a user error


def _build(cls: type[Any], prefix: str, recorded: _Recorded) -> Any:
    kwargs: dict[str, object] = {}
    for name, (fld, hint) in _schema(cls).items():
        dotted = prefix + name
        if _is_section(hint):
            kwargs[name] = _build(hint, dotted + ".", recorded)
        elif dotted in recorded:
            raw, origin = recorded[dotted]
            try:
                kwargs[name] = _coerce(fld, hint, raw)
            except _Mismatch as err:
                raise ConfigError(
                    f"{origin}: {dotted}: expected {err.expected}, got {_describe(raw)}"
                ) from None
    return cls(**kwargs)


# --- loading and validation ---------------------------------------------------------------


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config {path}: file not found") from None
    except tomllib.TOMLDecodeError as err:
        # tomllib's message ends with "(at line N, column M)"
        raise ConfigError(f"config {path}: TOML syntax error: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config {path}: cannot read: {err}") from err


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, object] | None = None,
) -> tuple[SnapshotterConfig, list[str]]:
    """Load, type-check and validate the snapshotter configuration.

    ``path`` is a TOML file in upstream's format (it must say ``version = 1``); None means
    defaults only. ``overrides`` maps dotted keys ("root", "daemon.fs_driver", "log.level")
    to values from the command line; they win over the file and are checked the same way; a
    None value means "flag not given" and is skipped.

    Returns the configuration and warnings (unknown keys and sections, settings forced by
    other settings) for the caller to log. Raises ConfigError naming the file and dotted key
    for a missing or unreadable file, a TOML syntax error (with line), a wrong type, an
    unknown override key or a failed validation rule. Reads only ``path`` and checks that
    the mirrors dir and public key file exist; creates nothing. Calling it twice with the
    same inputs gives equal results.
    """
    warnings: list[str] = []
    recorded: _Recorded = {}
    default_origin = "config"
    if path is not None:
        file = os.fspath(path)
        default_origin = f"config {file}"
        _collect(_read_toml(file), SnapshotterConfig, "", default_origin, recorded, warnings)
        if "version" not in recorded:
            raise ConfigError(f"{default_origin}: version: missing; the file must say version = 1")
    leaves = _all_leaves()
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in leaves:
            close = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.7)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(f'override: unknown key "{key}"{hint}')
        recorded[key] = (value, "override")
    cfg: SnapshotterConfig = _build(SnapshotterConfig, "", recorded)

    def origin(key: str) -> str:
        return recorded[key][1] if key in recorded else default_origin

    mode_written = recorded["daemon_mode"][0] if "daemon_mode" in recorded else None
    return _validate(cfg, origin, mode_written, warnings), warnings


def _validate(
    cfg: SnapshotterConfig,
    origin: typing.Callable[[str], str],
    mode_written: object,
    warnings: list[str],
) -> SnapshotterConfig:
    if cfg.version != SUPPORTED_VERSION:
        raise ConfigError(
            f"{origin('version')}: version: unsupported configuration version {cfg.version},"
            f" expected {SUPPORTED_VERSION}"
        )
    if not cfg.root:
        raise ConfigError(f"{origin('root')}: root: must not be empty")
    root_len = len(os.fsencode(cfg.root))
    if root_len > MAX_ROOT_PATH_LEN:
        raise ConfigError(
            f'{origin("root")}: root: "{cfg.root}" is {root_len} bytes, at most'
            f" {MAX_ROOT_PATH_LEN} are allowed: nydusd API sockets under it"
            " (socket/<daemon id>/api.sock) must fit the 108-byte sun_path of a unix socket"
        )
    if not cfg.address:
        raise ConfigError(f"{origin('address')}: address: must not be empty")
    auth = cfg.remote.auth
    if auth.enable_cri_keychain and auth.enable_kubeconfig_keychain:
        raise ConfigError(
            f"{origin('remote.auth.enable_cri_keychain')}: remote.auth.enable_cri_keychain and"
            " remote.auth.enable_kubeconfig_keychain cannot both be true"
        )
    mirrors_dir = cfg.remote.mirrors_config.dir
    if mirrors_dir and not os.path.isdir(mirrors_dir):
        raise ConfigError(
            f"{origin('remote.mirrors_config.dir')}: remote.mirrors_config.dir:"
            f' directory "{mirrors_dir}" does not exist'
        )
    image = cfg.image
    if image.validate_signature:
        key = "image.public_key_file"
        if not image.public_key_file:
            raise ConfigError(
                f"{origin(key)}: {key}: must be set when image.validate_signature is true"
            )
        if not os.path.isfile(image.public_key_file):
            raise ConfigError(
                f'{origin(key)}: {key}: file "{image.public_key_file}" does not exist'
            )
    if cfg.daemon.fs_driver is FsDriver.FSCACHE and cfg.daemon_mode is not DaemonMode.SHARED:
        # fscache has one nydusd per host talking to /dev/cachefiles
        if mode_written is not None:
            warnings.append(
                f'{origin("daemon_mode")}: daemon_mode "{mode_written}" replaced by'
                ' "shared": fs_driver "fscache" always uses one shared nydusd'
            )
        cfg = dataclasses.replace(cfg, daemon_mode=DaemonMode.SHARED)
    return cfg
