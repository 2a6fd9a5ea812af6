"""Snapshotter configuration: upstream's TOML keys as frozen, validated dataclasses.

Theory of operation. ``load_config`` turns one TOML file (read with tomllib) plus a mapping
of command-line overrides into a ``SnapshotterConfig``. The schema below is read by the
engine shared with nydusd's config (``pynydus.confschema``): keys are collected with where
they came from (unknown keys and sections become warnings with a suggestion; upstream
ignores them silently), overrides are recorded after the file so the command line always
wins, and each value is type-checked and converted, a mismatch naming the dotted key. Then:

1. *Refuse* what pynydus does not implement yet: a key marked ``unsupported`` with another
   value than its default stops start-up naming the key (defaults, as upstream's sample
   file spells them out, still load). A key marked ``inert`` is one upstream itself does
   nothing with in what pynydus supports; a non-default value loads with a warning.
2. *Validate*: the cross-field rules of upstream's ``ValidateConfig`` and
   ``ProcessConfigurations`` (root length, fscache forcing the shared daemon mode).

``parse_config`` stops before step 1 (for tools that only read a file). Deliberate
difference from upstream: upstream merges its defaults in with mergo *after* loading, which
only fills zero values, so ``log_rotation_compress = false`` cannot turn a default-true
boolean off and a numeric ``0`` means "use the default". Here a key that is present takes
its value; defaults apply only to keys that are absent.

Everything here except the existence checks of validation is pure: values in, values out.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pynydus import confschema as schema
from pynydus.confschema import (
    choice,
    count,
    duration,
    inert,
    memory,
    parse_duration,
    parse_memory_limit,
    unsupported,
    with_meta,
)
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
    "TarfsMountMode",
    "load_config",
    "parse_config",
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
    # ours, experimental (docs/decisions.md): pynydusd serves each blob as a flat file
    # over FUSE and the kernel mounts the image's bootstrap as EROFS over those files
    BLOBFILE = "blobfile"


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


class TarfsMountMode(enum.StrEnum):
    """How tarfs images are mounted (``experimental.tarfs.mount_mode``, a pynydus key)."""

    LAYER = "layer"  # one EROFS mount per layer, stacked by the container's overlay
    IMAGE = "image"  # upstream's: layer bootstraps merged, one EROFS mount per image


# Why the unsupported keys are refused, once per feature.
_SYSTEM = "the system controller's debug listeners ([system.debug])"


# --- sections -------------------------------------------------------------------------


@dataclass(frozen=True)
class DebugConfig:
    """``[system.debug]``."""

    # 0: do not sample nydusd's start-up CPU utilisation
    daemon_cpu_profile_duration_secs: int = with_meta(count(0), unsupported=_SYSTEM)
    # "": no pprof-like listener
    pprof_address: str = unsupported("", _SYSTEM)


@dataclass(frozen=True)
class SystemConfig:
    """``[system]``: the system controller, HTTP on a unix socket."""

    enable: bool = False
    address: str = DEFAULT_SYSTEM_ADDRESS
    # owner of the controller socket (mode 0600: it hands out backend credentials)
    uid: int = count(0)
    gid: int = count(0)
    debug: DebugConfig = field(default_factory=DebugConfig)


@dataclass(frozen=True)
class DaemonConfig:
    """``[daemon]``: how nydusd is started and recovered."""

    # bare names are looked up in $PATH when the binary is spawned, as upstream does at start-up
    nydusd_path: str = "nydusd"
    nydusd_config: str = "/etc/nydus/nydusd-config.json"
    nydusimage_path: str = inert("nydus-image", "upstream runs nydus-image only for tarfs, "
                                 "whose bootstraps and block images pynydus builds itself")
    fs_driver: FsDriver = FsDriver.FUSEDEV
    recover_policy: RecoverPolicy = RecoverPolicy.RESTART
    # 0: let nydusd pick its own thread count; nydusd rejects more than 1024
    threads_number: int = count(0, maximum=1024)
    # MB; 0: nydusd does not rotate its log
    log_rotation_size: int = count(100)
    # after a takeover, what happens to requests the dead daemon had read: resend them to
    # the successor (Linux >= 6.9) or fail them (flush); "none" is refused at start
    failover_policy: FailoverPolicy = FailoverPolicy.RESEND


@dataclass(frozen=True)
class CgroupConfig:
    """``[cgroup]``: the cgroup nydusd daemons are put in."""

    enable: bool = False
    # "": no memory limit; otherwise bytes, 512MiB, 2Gi or 10% of RAM (see parse_memory_limit)
    memory_limit: str = memory("")

    def memory_limit_bytes(self, total_ram: int) -> int | None:
        """The limit in bytes for a host with ``total_ram`` bytes, or None for no limit."""
        return parse_memory_limit(self.memory_limit, total_ram)


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: the snapshotter's own log (rotated as lumberjack does, pynydus.logs)."""

    log_to_stdout: bool = False
    level: str = choice("info", LOG_LEVELS)
    # "": <root>/logs, see SnapshotterConfig.log_dir()
    dir: str = ""
    log_rotation_max_size: int = count(200)  # MB; 0: never rotate
    log_rotation_max_backups: int = count(5)  # 0: keep every backup
    log_rotation_max_age: int = count(0)  # days; 0: never delete by age
    log_rotation_local_time: bool = True  # backup names in local time, else UTC
    log_rotation_compress: bool = True  # gzip backups


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: Prometheus exporter."""

    # "": no exporter
    address: str = ""
    # in-flight IO older than this counts as hung
    hung_io_interval: float = with_meta(duration(10.0, positive=True),
                                        unsupported="periodic collection of daemon metrics")
    collect_interval: float = with_meta(duration(60.0, positive=True),
                                        unsupported="periodic collection of daemon metrics")


@dataclass(frozen=True)
class MirrorsConfig:
    """``[remote.mirrors_config]``: containerd-style ``hosts.toml`` directory."""

    # "": no mirrors but the template's; else containerd's certs.d layout (registry.hosts)
    dir: str = ""


@dataclass(frozen=True)
class AuthConfig:
    """``[remote.auth]``: where registry credentials come from besides labels and docker config."""

    # image pull secrets of the cluster (registry.kubesecrets), after the other sources
    enable_kubeconfig_keychain: bool = False
    # "": $KUBECONFIG, ~/.kube/config, then the in-cluster service account
    kubeconfig_path: str = ""
    # the CRI ImageService proxy on the snapshotter's socket (snapshot.imageproxy): the
    # credentials of each PullImage, the call forwarded to image_service_address
    enable_cri_keychain: bool = False
    image_service_address: str = "/run/containerd/containerd.sock"  # containerd's CRI
    # kubelet's image credential provider plugins (registry.kubelet), after the docker config
    enable_kubelet_credential_providers: bool = False
    credential_provider_config: str = ""  # kubelet's --image-credential-provider-config
    credential_provider_bin_dir: str = ""  # kubelet's --image-credential-provider-bin-dir
    # seconds between passes that ask the renewable sources again for the credentials of
    # running images and hand new ones to their daemons (manager.renewal); 0: no renewal
    credential_renewal_interval: float = duration(0.0, positive=False)


@dataclass(frozen=True)
class RemoteConfig:
    """``[remote]``: registries."""

    convert_vpc_registry: bool = inert(False, "upstream parses it but never uses it")
    # the snapshotter's own registry reads (tarfs layers, manifests and configs): any
    # certificate, and plain HTTP where the registry speaks it. pynydusd's reads take
    # skip_verify from the nydusd config template instead (as upstream).
    skip_ssl_verify: bool = False
    mirrors_config: MirrorsConfig = field(default_factory=MirrorsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)


@dataclass(frozen=True)
class SnapshotConfig:
    """``[snapshot]``: how Snapshots API calls are answered."""

    enable_nydus_overlayfs: bool = False
    # "": mount type fuse.nydus-overlayfs; otherwise fuse.<path>
    nydus_overlayfs_path: str = ""
    enable_kata_volume: bool = unsupported(False, "Kata virtual volumes in mounts")
    sync_remove: bool = False
    enable_overlayfs_volatile: bool = False
    # an image with OCI layers (referrer/index detection, ZRAN) that cannot be served
    # lazily is unpacked as OCI instead of failing (snapshot/ocifill.py); false: fail
    oci_fallback: bool = True


@dataclass(frozen=True)
class CacheManagerConfig:
    """``[cache_manager]``: the blob cache."""

    disable: bool = inert(False, "upstream accepts it and ignores it")
    gc_period: float = with_meta(duration(24 * 3600.0, positive=True),
                                 inert="upstream has no periodic cache GC; the cache is "
                                 "collected by Cleanup")
    # "": <root>/cache, see SnapshotterConfig.cache_dir()
    cache_dir: str = ""


@dataclass(frozen=True)
class ImageConfig:
    """``[image]``: bootstrap signature verification (``pynydus.signature``)."""

    # PEM RSA public key; read at start-up when validate_signature is true
    public_key_file: str = ""
    # refuse to mount a bootstrap without a signature that verifies with the key
    validate_signature: bool = False


@dataclass(frozen=True)
class TarfsConfig:
    """``[experimental.tarfs]``: run OCI images with their tar layers as RAFS blobs."""

    enable_tarfs: bool = False
    # false: upstream leaves the image to a Kata guest (raw block volumes); pynydus has no
    # Kata volumes, so enable_tarfs needs it true (checked in _validate)
    mount_tarfs_on_host: bool = False
    # only images whose manifest has the containerd.io/snapshot/tarfs-hint annotation
    tarfs_hint: bool = False
    # 0: no limit on concurrent layer conversions per image
    max_concurrent_proc: int = count(0)
    export_mode: TarfsExportMode = TarfsExportMode.DISABLED
    # pynydus: "layer" (each layer its own EROFS mount: no merge, layers shared between
    # images) or "image" (upstream's merged bootstrap per image)
    mount_mode: TarfsMountMode = TarfsMountMode.LAYER
    # pynydus: in "layer" mode, mount each layer after its conversion and look its tree up
    # once, so that a container's first walk finds its metadata cached as overlayfs's
    # finds what its unpack left (tarfs/warm.py); false: mounted at the first container
    warm_metadata: bool = True


@dataclass(frozen=True)
class PrefetchListConfig:
    """``[experimental.prefetch_list]``: prefetch lists learned on this node (issue 17;
    ``manager/prefetchrecord.py``)."""

    # an image whose lookup at mount found no list: learn one from its first container's
    # start-up (the daemon's access trace, taken once its reads go quiet)
    record: bool = False
    # push what was learned beside the image in its registry (the node's credentials
    # for it must allow pushes); needs record
    push: bool = False
    # a recording ends this long after the image's first read at the latest
    record_timeout: float = duration(30.0, positive=True)


@dataclass(frozen=True)
class ExperimentalConfig:
    """``[experimental]``."""

    enable_stargz: bool = unsupported(False, "stargz images")
    # serve an OCI image lazily from a Nydus manifest whose subject it is (snapshot/detect.py)
    enable_referrer_detect: bool = False
    # ... or from a Nydus manifest for its platform in the image's OCI index
    enable_index_detect: bool = False
    enable_backend_source: bool = unsupported(False, "--backend-source for nydusd "
                                              "(system controller)")
    tarfs: TarfsConfig = field(default_factory=TarfsConfig)
    prefetch_list: PrefetchListConfig = field(default_factory=PrefetchListConfig)


@dataclass(frozen=True)
class SnapshotterConfig:
    """The whole configuration file; field names are upstream's TOML keys.

    Instances are immutable; derive variants with ``dataclasses.replace``. The ``*_dir``
    methods give the on-disk layout under ``root`` and cost nothing (no I/O).
    """

    version: int = SUPPORTED_VERSION
    root: str = DEFAULT_ROOT
    address: str = DEFAULT_ADDRESS
    uid: int = count(0)
    gid: int = count(0)
    # upstream's default "multiple" is an alias of dedicated
    daemon_mode: DaemonMode = field(
        default=DaemonMode.DEDICATED, metadata={"aliases": {"multiple": DaemonMode.DEDICATED}}
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


def _parse(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, object] | None
) -> tuple[SnapshotterConfig, schema.Recorded, typing.Callable[[str], str]]:
    recorded = schema.Recorded()
    default_origin = "config"
    if path is not None:
        file = os.fspath(path)
        default_origin = f"config {file}"
        schema.collect(_read_toml(file), SnapshotterConfig, "", default_origin, recorded)
        if "version" not in recorded.values:
            raise ConfigError(f"{default_origin}: version: missing; the file must say version = 1")
    leaves = schema.all_leaves(SnapshotterConfig)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in leaves:
            close = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.7)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(f'override: unknown key "{key}"{hint}')
        recorded.values[key] = (value, "override")
    cfg: SnapshotterConfig = schema.build(SnapshotterConfig, "", recorded)

    def origin(key: str) -> str:
        return recorded.origin(key, default_origin)

    if cfg.version != SUPPORTED_VERSION:
        raise ConfigError(
            f"{origin('version')}: version: unsupported configuration version {cfg.version},"
            f" expected {SUPPORTED_VERSION}"
        )
    return cfg, recorded, origin


def parse_config(
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, object] | None = None,
) -> tuple[SnapshotterConfig, list[str]]:
    """Like ``load_config``, but keys pynydus does not support yet are not refused (and
    not warned about): the file as upstream's rules read it, for tools that inspect one."""
    cfg, recorded, origin = _parse(path, overrides)
    return _validate(cfg, origin, recorded, recorded.warnings), recorded.warnings


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, object] | None = None,
) -> tuple[SnapshotterConfig, list[str]]:
    """Load, type-check and validate the snapshotter configuration for a start-up.

    ``path`` is a TOML file in upstream's format (it must say ``version = 1``); None means
    defaults only. ``overrides`` maps dotted keys ("root", "daemon.fs_driver", "log.level")
    to values from the command line; they win over the file and are checked the same way; a
    None value means "flag not given" and is skipped.

    Returns the configuration and warnings (unknown keys and sections, keys set to a value
    that has no effect, settings forced by other settings) for the caller to log. Raises
    ConfigError naming the file and dotted key for a missing or unreadable file, a TOML
    syntax error (with line), a wrong type, an unknown override key, a key pynydus does not
    support yet set to anything but its default ("... is not supported by pynydus yet"),
    or a failed validation rule. Reads only ``path``; creates nothing. Calling it twice
    with the same inputs gives equal results.
    """
    cfg, recorded, origin = _parse(path, overrides)
    schema.refuse(cfg, origin)
    recorded.warnings.extend(schema.inert_warnings(cfg, origin))
    _check_tarfs(cfg, origin, recorded.warnings)
    return _validate(cfg, origin, recorded, recorded.warnings), recorded.warnings


def _check_tarfs(cfg: SnapshotterConfig, origin: typing.Callable[[str], str],
                 warnings: list[str]) -> None:
    """What pynydus can do with ``[experimental.tarfs]`` (beyond upstream's own rules):
    blockdev needs tarfs, tarfs needs its images mounted on the host (no Kata here),
    and the tarfs keys have no effect while tarfs is off."""
    tarfs = cfg.experimental.tarfs
    if cfg.daemon.fs_driver is FsDriver.BLOCKDEV and not tarfs.enable_tarfs:
        raise ConfigError(
            f"{origin('daemon.fs_driver')}: daemon.fs_driver: fs_driver blockdev serves OCI "
            "images through tarfs only: set experimental.tarfs.enable_tarfs = true (and "
            'mount_tarfs_on_host = true), or use fs_driver = "fusedev"')
    if tarfs.enable_tarfs and not tarfs.mount_tarfs_on_host:
        key = "experimental.tarfs.mount_tarfs_on_host"
        raise ConfigError(
            f"{origin(key)}: {key}: false hands tarfs images to a Kata guest as block volumes "
            "(snapshot.enable_kata_volume), which pynydus does not support: set "
            "mount_tarfs_on_host = true to mount them on the host")
    if not tarfs.enable_tarfs:
        for key, value, default in (("export_mode", tarfs.export_mode, TarfsExportMode.DISABLED),
                                    ("tarfs_hint", tarfs.tarfs_hint, False),
                                    ("max_concurrent_proc", tarfs.max_concurrent_proc, 0),
                                    ("mount_mode", tarfs.mount_mode, TarfsMountMode.LAYER),
                                    ("warm_metadata", tarfs.warm_metadata, True),
                                    ("mount_tarfs_on_host", tarfs.mount_tarfs_on_host, False)):
            if value != default:
                dotted = f"experimental.tarfs.{key}"
                warnings.append(f"{origin(dotted)}: {dotted} = {_toml_value(value)} has no "
                                "effect (it applies only with experimental.tarfs.enable_tarfs "
                                "= true)")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _validate(
    cfg: SnapshotterConfig,
    origin: typing.Callable[[str], str],
    recorded: schema.Recorded,
    warnings: list[str],
) -> SnapshotterConfig:
    mode_written = recorded.values["daemon_mode"][0] if "daemon_mode" in recorded.values else None
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
    if cfg.daemon.fs_driver is FsDriver.BLOBFILE and \
            cfg.daemon.recover_policy is RecoverPolicy.FAILOVER:
        raise ConfigError(
            f"{origin('daemon.recover_policy')}: daemon.recover_policy: failover hands a dead "
            "daemon's FUSE connection to a successor, which fs_driver blobfile does not do "
            '(its blob-file daemons are restarted): use recover_policy = "restart"')
    plc = cfg.experimental.prefetch_list
    if plc.push and not plc.record:
        key = "experimental.prefetch_list.push"
        raise ConfigError(f"{origin(key)}: {key}: pushes what this node records: set "
                          "experimental.prefetch_list.record = true too")
    auth = cfg.remote.auth
    if auth.enable_cri_keychain and auth.enable_kubeconfig_keychain:
        raise ConfigError(
            f"{origin('remote.auth.enable_cri_keychain')}: remote.auth.enable_cri_keychain and"
            " remote.auth.enable_kubeconfig_keychain cannot both be true"
        )
    key = "remote.auth.image_service_address"
    if auth.enable_cri_keychain:
        target = auth.image_service_address.removeprefix("unix://")
        if not target:
            raise ConfigError(f"{origin(key)}: {key}: must be set when"
                              " remote.auth.enable_cri_keychain is true (containerd's socket)")
        if os.path.abspath(target) == os.path.abspath(cfg.address):
            raise ConfigError(f"{origin(key)}: {key}: \"{auth.image_service_address}\" is the"
                              " snapshotter's own address: the CRI proxy would call itself;"
                              " name containerd's socket")
    kubelet_keys = ("remote.auth.credential_provider_config",
                    "remote.auth.credential_provider_bin_dir")
    if auth.enable_kubelet_credential_providers:
        # the files are read (and checked) when the snapshotter starts, as upstream
        for key, path in zip(kubelet_keys, (auth.credential_provider_config,
                                            auth.credential_provider_bin_dir), strict=True):
            if not path:
                raise ConfigError(f"{origin(key)}: {key}: must be set when"
                                  " remote.auth.enable_kubelet_credential_providers is true")
    else:
        for key, path in zip(kubelet_keys, (auth.credential_provider_config,
                                            auth.credential_provider_bin_dir), strict=True):
            if path:
                warnings.append(f'{origin(key)}: {key} = "{path}" has no effect (it applies'
                                " only with remote.auth.enable_kubelet_credential_providers"
                                " = true)")
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
    elif image.public_key_file:
        warnings.append(f"{origin('image.public_key_file')}: image.public_key_file ="
                        f' "{image.public_key_file}" has no effect (it applies only with'
                        " image.validate_signature = true)")
    if cfg.cgroup.memory_limit and not cfg.cgroup.enable:
        warnings.append(f"{origin('cgroup.memory_limit')}: cgroup.memory_limit ="
                        f' "{cfg.cgroup.memory_limit}" has no effect (it applies only with'
                        " cgroup.enable = true)")
    if cfg.daemon.fs_driver is FsDriver.FSCACHE and cfg.daemon_mode is not DaemonMode.SHARED:
        # fscache has one nydusd per host talking to /dev/cachefiles
        if mode_written is not None:
            warnings.append(
                f'{origin("daemon_mode")}: daemon_mode "{mode_written}" replaced by'
                ' "shared": fs_driver "fscache" always uses one shared nydusd'
            )
        cfg = dataclasses.replace(cfg, daemon_mode=DaemonMode.SHARED)
    return cfg
