"""Snapshotter configuration: upstream's TOML keys, types, defaults and validation rules."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pynydus.config import (
    DEFAULT_ADDRESS,
    DEFAULT_ROOT,
    MAX_ROOT_PATH_LEN,
    DaemonMode,
    FailoverPolicy,
    FsDriver,
    RecoverPolicy,
    SnapshotterConfig,
    TarfsExportMode,
    TarfsMountMode,
    load_config,
    parse_config,
    parse_duration,
    parse_memory_limit,
)
from pynydus.errors import ConfigError

# Upstream's misc/snapshotter/config.toml, in spirit: every key of every section, mostly
# with non-default values so that each one is seen to take effect. {mirrors} and {pubkey}
# are filled with paths that exist.
SAMPLE = """\
version = 1
root = "/var/lib/containerd/io.containerd.snapshotter.v1.nydus"
address = "/run/containerd-nydus/containerd-nydus-grpc.sock"
uid = 1000
gid = 1001
daemon_mode = "shared"
cleanup_on_close = true

[system]
enable = true
address = "/run/containerd-nydus/system.sock"
uid = 7
gid = 8

[system.debug]
daemon_cpu_profile_duration_secs = 5
pprof_address = "127.0.0.1:6060"

[daemon]
nydusd_path = "/usr/local/bin/nydusd"
nydusd_config = "/etc/nydus/nydusd-config.fusedev.json"
nydusimage_path = "/usr/local/bin/nydus-image"
fs_driver = "fusedev"
recover_policy = "failover"
threads_number = 4
log_rotation_size = 50
failover_policy = "flush"

[cgroup]
enable = true
memory_limit = "512MiB"

[log]
log_to_stdout = true
level = "debug"
dir = "/var/log/nydus"
log_rotation_max_size = 100
log_rotation_max_backups = 3
log_rotation_max_age = 7
log_rotation_local_time = false
log_rotation_compress = false

[metrics]
address = ":9110"
hung_io_interval = "5s"
collect_interval = "2m"

[remote]
convert_vpc_registry = true
skip_ssl_verify = true

[remote.mirrors_config]
dir = "{mirrors}"

[remote.auth]
enable_kubeconfig_keychain = true
kubeconfig_path = "/root/.kube/config"
enable_cri_keychain = false
image_service_address = "/run/k3s/containerd/containerd.sock"
enable_kubelet_credential_providers = true
credential_provider_config = "/etc/kubernetes/credential-providers.yaml"
credential_provider_bin_dir = "/usr/libexec/kubernetes/credential-providers"
credential_renewal_interval = "1h30m"

[snapshot]
enable_nydus_overlayfs = true
nydus_overlayfs_path = "/usr/local/bin/nydus-overlayfs"
enable_kata_volume = true
sync_remove = true
enable_overlayfs_volatile = true
oci_fallback = false

[cache_manager]
disable = true
gc_period = "12h"
cache_dir = "/var/cache/nydus"

[image]
public_key_file = "{pubkey}"
validate_signature = true

[experimental]
enable_stargz = true
enable_referrer_detect = true
enable_index_detect = true
enable_backend_source = true

[experimental.tarfs]
enable_tarfs = true
mount_tarfs_on_host = true
tarfs_hint = true
max_concurrent_proc = 2
export_mode = "image_block_with_verity"
mount_mode = "image"
warm_metadata = false

[experimental.prefetch_list]
record = true
push = true
record_timeout = "10s"
"""

# dotted key -> value the sample above must load as
SAMPLE_VALUES: dict[str, object] = {
    "version": 1,
    "root": "/var/lib/containerd/io.containerd.snapshotter.v1.nydus",
    "address": "/run/containerd-nydus/containerd-nydus-grpc.sock",
    "uid": 1000,
    "gid": 1001,
    "daemon_mode": DaemonMode.SHARED,
    "cleanup_on_close": True,
    "system.enable": True,
    "system.address": "/run/containerd-nydus/system.sock",
    "system.uid": 7,
    "system.gid": 8,
    "system.debug.daemon_cpu_profile_duration_secs": 5,
    "system.debug.pprof_address": "127.0.0.1:6060",
    "daemon.nydusd_path": "/usr/local/bin/nydusd",
    "daemon.nydusd_config": "/etc/nydus/nydusd-config.fusedev.json",
    "daemon.nydusimage_path": "/usr/local/bin/nydus-image",
    "daemon.fs_driver": FsDriver.FUSEDEV,
    "daemon.recover_policy": RecoverPolicy.FAILOVER,
    "daemon.threads_number": 4,
    "daemon.log_rotation_size": 50,
    "daemon.failover_policy": FailoverPolicy.FLUSH,
    "cgroup.enable": True,
    "cgroup.memory_limit": "512MiB",
    "log.log_to_stdout": True,
    "log.level": "debug",
    "log.dir": "/var/log/nydus",
    "log.log_rotation_max_size": 100,
    "log.log_rotation_max_backups": 3,
    "log.log_rotation_max_age": 7,
    "log.log_rotation_local_time": False,
    "log.log_rotation_compress": False,
    "metrics.address": ":9110",
    "metrics.hung_io_interval": 5.0,
    "metrics.collect_interval": 120.0,
    "remote.convert_vpc_registry": True,
    "remote.skip_ssl_verify": True,
    "remote.mirrors_config.dir": "<mirrors>",
    "remote.auth.enable_kubeconfig_keychain": True,
    "remote.auth.kubeconfig_path": "/root/.kube/config",
    "remote.auth.enable_cri_keychain": False,
    "remote.auth.image_service_address": "/run/k3s/containerd/containerd.sock",
    "remote.auth.enable_kubelet_credential_providers": True,
    "remote.auth.credential_provider_config": "/etc/kubernetes/credential-providers.yaml",
    "remote.auth.credential_provider_bin_dir": "/usr/libexec/kubernetes/credential-providers",
    "remote.auth.credential_renewal_interval": 5400.0,
    "snapshot.enable_nydus_overlayfs": True,
    "snapshot.nydus_overlayfs_path": "/usr/local/bin/nydus-overlayfs",
    "snapshot.enable_kata_volume": True,
    "snapshot.sync_remove": True,
    "snapshot.enable_overlayfs_volatile": True,
    "snapshot.oci_fallback": False,
    "cache_manager.disable": True,
    "cache_manager.gc_period": 43200.0,
    "cache_manager.cache_dir": "/var/cache/nydus",
    "image.public_key_file": "<pubkey>",
    "image.validate_signature": True,
    "experimental.enable_stargz": True,
    "experimental.enable_referrer_detect": True,
    "experimental.enable_index_detect": True,
    "experimental.enable_backend_source": True,
    "experimental.tarfs.enable_tarfs": True,
    "experimental.tarfs.mount_tarfs_on_host": True,
    "experimental.tarfs.tarfs_hint": True,
    "experimental.tarfs.max_concurrent_proc": 2,
    "experimental.tarfs.export_mode": TarfsExportMode.IMAGE_BLOCK_WITH_VERITY,
    "experimental.tarfs.mount_mode": TarfsMountMode.IMAGE,
    "experimental.tarfs.warm_metadata": False,
    "experimental.prefetch_list.record": True,
    "experimental.prefetch_list.push": True,
    "experimental.prefetch_list.record_timeout": 10.0,
}


def leaf_keys(obj: object, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf field of a config dataclass."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(leaf_keys(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def with_key(dotted: str, toml_value: str) -> str:
    """A minimal valid file that sets one dotted key."""
    section, _, key = dotted.rpartition(".")
    if dotted == "version":
        return f"version = {toml_value}\n"
    header = f"[{section}]\n" if section else ""
    return f"version = 1\n{header}{key} = {toml_value}\n"


def load_one(tmp_path: Path, dotted: str, toml_value: str) -> SnapshotterConfig:
    """One key parsed by upstream's rules (parse_config: nothing refused as unsupported)."""
    cfg, warnings = parse_config(write(tmp_path, with_key(dotted, toml_value)))
    assert warnings == []
    return cfg


@pytest.fixture
def sample(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    mirrors = tmp_path / "certs.d"
    mirrors.mkdir()
    pubkey = tmp_path / "key.pem"
    pubkey.write_text("-----BEGIN RSA PUBLIC KEY-----\n")
    path = write(
        tmp_path, SAMPLE.replace("{mirrors}", str(mirrors)).replace("{pubkey}", str(pubkey))
    )
    expected = dict(SAMPLE_VALUES)
    expected["remote.mirrors_config.dir"] = str(mirrors)
    expected["image.public_key_file"] = str(pubkey)
    return path, expected


# --- defaults ------------------------------------------------------------------------------


def test_no_file_gives_upstream_defaults_and_no_warnings() -> None:
    cfg, warnings = load_config(None)
    assert warnings == []
    assert cfg == SnapshotterConfig()
    assert cfg.version == 1
    assert cfg.root == DEFAULT_ROOT == "/var/lib/containerd/io.containerd.snapshotter.v1.nydus"
    assert cfg.address == DEFAULT_ADDRESS == "/run/containerd-nydus/containerd-nydus-grpc.sock"
    assert (cfg.uid, cfg.gid) == (0, 0)
    assert cfg.daemon_mode is DaemonMode.DEDICATED
    assert cfg.cleanup_on_close is False
    assert cfg.system.enable is False
    assert cfg.system.address == "/run/containerd-nydus/system.sock"
    assert cfg.system.debug.daemon_cpu_profile_duration_secs == 0
    assert cfg.daemon.nydusd_path == "nydusd"
    assert cfg.daemon.nydusd_config == "/etc/nydus/nydusd-config.json"
    assert cfg.daemon.nydusimage_path == "nydus-image"
    assert cfg.daemon.fs_driver is FsDriver.FUSEDEV
    assert cfg.daemon.recover_policy is RecoverPolicy.RESTART
    assert cfg.daemon.failover_policy is FailoverPolicy.RESEND
    assert cfg.daemon.threads_number == 0
    assert cfg.daemon.log_rotation_size == 100
    assert cfg.cgroup.memory_limit == ""
    assert cfg.cgroup.memory_limit_bytes(8 << 30) is None
    assert cfg.log.level == "info"
    assert (cfg.log.log_rotation_max_size, cfg.log.log_rotation_max_backups) == (200, 5)
    assert cfg.log.log_rotation_max_age == 0
    assert cfg.log.log_rotation_local_time is True
    assert cfg.log.log_rotation_compress is True
    assert cfg.metrics.address == ""
    assert cfg.metrics.hung_io_interval == 10.0
    assert cfg.metrics.collect_interval == 60.0
    assert cfg.remote.auth.image_service_address == "/run/containerd/containerd.sock"
    assert cfg.remote.auth.credential_renewal_interval == 0.0
    assert cfg.snapshot.sync_remove is False
    assert cfg.snapshot.enable_overlayfs_volatile is False
    assert cfg.cache_manager.gc_period == 24 * 3600.0
    assert cfg.experimental.tarfs.max_concurrent_proc == 0
    assert cfg.experimental.tarfs.export_mode is TarfsExportMode.DISABLED


def test_a_file_with_only_version_gives_the_defaults(tmp_path: Path) -> None:
    cfg, warnings = load_config(write(tmp_path, "version = 1\n"))
    assert (cfg, warnings) == (SnapshotterConfig(), [])


def test_config_is_frozen() -> None:
    cfg, _ = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.root = "/x"  # type: ignore[misc]


def test_derived_paths_follow_the_on_disk_layout_under_root(tmp_path: Path) -> None:
    cfg, _ = load_config(None, {"root": "/r"})
    assert cfg.snapshots_dir() == "/r/snapshots"
    assert cfg.cache_dir() == "/r/cache"
    assert cfg.log_dir() == "/r/logs"
    assert cfg.socket_dir() == "/r/socket"
    assert cfg.config_dir() == "/r/config"
    assert cfg.mnt_dir() == "/r/mnt"
    assert cfg.supervisor_dir() == "/r/supervisor"


def test_derived_cache_and_log_dirs_honour_explicit_settings(tmp_path: Path) -> None:
    text = 'version = 1\n[cache_manager]\ncache_dir = "/c"\n[log]\ndir = "/l"\n'
    cfg, _ = load_config(write(tmp_path, text))
    assert (cfg.cache_dir(), cfg.log_dir()) == ("/c", "/l")


# --- the full sample ---------------------------------------------------------------------


def test_sample_config_parses_every_key_without_warnings(
    sample: tuple[Path, dict[str, object]],
) -> None:
    # parse_config: upstream's rules only; which keys a start-up refuses is
    # tests/unit/test_config_effects.py's business
    path, expected = sample
    cfg, warnings = parse_config(path)
    assert warnings == []
    assert leaf_keys(cfg) == expected


def test_sample_covers_every_key_of_the_schema() -> None:
    assert set(SAMPLE_VALUES) == set(leaf_keys(SnapshotterConfig()))


def test_sample_values_differ_from_defaults_so_each_key_is_seen_to_take_effect() -> None:
    defaults = leaf_keys(SnapshotterConfig())
    # these sample values equal the default on purpose (upstream's sample uses them)
    same = {"version", "root", "address", "system.address", "daemon.fs_driver"}
    same |= {"remote.auth.enable_cri_keychain"}  # exclusive with the kubeconfig keychain
    for key, value in SAMPLE_VALUES.items():
        if key not in same:
            assert value != defaults[key], key


# --- types ---------------------------------------------------------------------------------

# dotted key -> a TOML value of the wrong type for it
WRONG_TYPES: dict[str, str] = {
    "version": '"1"',
    "root": "1",
    "address": "true",
    "uid": '"0"',
    "gid": "1.5",
    "daemon_mode": "1",
    "cleanup_on_close": '"yes"',
    "system.enable": "1",
    "system.address": "[]",
    "system.uid": "true",
    "system.gid": '"0"',
    "system.debug.daemon_cpu_profile_duration_secs": '"5s"',
    "system.debug.pprof_address": "6060",
    "daemon.nydusd_path": "false",
    "daemon.nydusd_config": "{}",
    "daemon.nydusimage_path": "1",
    "daemon.fs_driver": "1",
    "daemon.recover_policy": "true",
    "daemon.threads_number": '"4"',
    "daemon.log_rotation_size": "1.0",
    "daemon.failover_policy": "0",
    "cgroup.enable": '"true"',
    "cgroup.memory_limit": "1024",
    "log.log_to_stdout": "0",
    "log.level": "3",
    "log.dir": "false",
    "log.log_rotation_max_size": '"100"',
    "log.log_rotation_max_backups": "true",
    "log.log_rotation_max_age": "7.5",
    "log.log_rotation_local_time": '"no"',
    "log.log_rotation_compress": "1",
    "metrics.address": "9110",
    "metrics.hung_io_interval": "10",
    "metrics.collect_interval": "1.5",
    "remote.convert_vpc_registry": '"false"',
    "remote.skip_ssl_verify": "0",
    "remote.mirrors_config.dir": "[]",
    "remote.auth.enable_kubeconfig_keychain": '"x"',
    "remote.auth.kubeconfig_path": "1",
    "remote.auth.enable_cri_keychain": "1",
    "remote.auth.image_service_address": "true",
    "remote.auth.enable_kubelet_credential_providers": '"y"',
    "remote.auth.credential_provider_config": "1",
    "remote.auth.credential_provider_bin_dir": "[]",
    "remote.auth.credential_renewal_interval": "0",
    "snapshot.enable_nydus_overlayfs": "1",
    "snapshot.nydus_overlayfs_path": "true",
    "snapshot.enable_kata_volume": '"true"',
    "snapshot.sync_remove": '"yes"',
    "snapshot.enable_overlayfs_volatile": "1",
    "snapshot.oci_fallback": '"no"',
    "cache_manager.disable": "0",
    "cache_manager.gc_period": "86400",
    "cache_manager.cache_dir": "1",
    "image.public_key_file": "1",
    "image.validate_signature": '"true"',
    "experimental.enable_stargz": "1",
    "experimental.enable_referrer_detect": "0",
    "experimental.enable_index_detect": '"x"',
    "experimental.enable_backend_source": "1",
    "experimental.tarfs.enable_tarfs": '"on"',
    "experimental.tarfs.mount_tarfs_on_host": "1",
    "experimental.tarfs.tarfs_hint": "1",
    "experimental.tarfs.max_concurrent_proc": '"2"',
    "experimental.tarfs.export_mode": "1",
    "experimental.tarfs.mount_mode": "true",
    "experimental.tarfs.warm_metadata": '"yes"',
    "experimental.prefetch_list.record": '"yes"',
    "experimental.prefetch_list.push": "1",
    "experimental.prefetch_list.record_timeout": "10",
}


def test_every_key_has_a_wrong_type_case() -> None:
    assert set(WRONG_TYPES) == set(SAMPLE_VALUES)


@pytest.mark.parametrize("dotted", sorted(WRONG_TYPES))
def test_wrong_type_raises_config_error_naming_file_and_key(tmp_path: Path, dotted: str) -> None:
    path = write(tmp_path, with_key(dotted, WRONG_TYPES[dotted]))
    with pytest.raises(ConfigError, match="expected") as info:
        load_config(path)
    assert str(info.value).startswith(f"config {path}: {dotted}: expected ")
    assert ", got " in str(info.value)


def test_type_error_message_says_expected_type_and_what_was_found(tmp_path: Path) -> None:
    path = write(tmp_path, with_key("snapshot.sync_remove", '"yes"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f'config {path}: snapshot.sync_remove: expected a boolean, got string "yes"'
    )


@pytest.mark.parametrize(
    ("dotted", "toml_value", "found"),
    [
        ("daemon.threads_number", "true", "got boolean true"),
        ("root", "1.5", "got float 1.5"),
        ("uid", "[1]", "got array"),
        ("log.level", "{ a = 1 }", "got table"),
        ("address", "1979-05-27", "got date 1979-05-27"),
    ],
)
def test_type_error_describes_the_toml_value_found(
    tmp_path: Path, dotted: str, toml_value: str, found: str
) -> None:
    with pytest.raises(ConfigError, match=found):
        load_config(write(tmp_path, with_key(dotted, toml_value)))


def test_a_boolean_is_not_an_integer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="uid: expected an integer >= 0, got boolean true"):
        load_one(tmp_path, "uid", "true")


def test_a_section_given_as_a_scalar_is_a_type_error(tmp_path: Path) -> None:
    path = write(tmp_path, "version = 1\nsnapshot = true\n")
    with pytest.raises(ConfigError, match="snapshot: expected a table, got boolean true"):
        load_config(path)


def test_a_nested_section_given_as_an_array_of_tables_is_a_type_error(tmp_path: Path) -> None:
    path = write(tmp_path, "version = 1\n[[remote.auth]]\nenable_cri_keychain = true\n")
    with pytest.raises(ConfigError, match="remote.auth: expected a table, got array"):
        load_config(path)


@pytest.mark.parametrize("key", ["uid", "gid", "system.uid", "log.log_rotation_max_backups"])
def test_negative_counts_and_ids_are_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=f"{key}: expected an integer >= 0, got integer -1"):
        load_one(tmp_path, key, "-1")


# --- present keys take their value (unlike upstream's mergo merge) -----------------------


def test_default_true_booleans_can_be_turned_off(tmp_path: Path) -> None:
    text = "version = 1\n[log]\nlog_rotation_local_time = false\nlog_rotation_compress = false\n"
    cfg, _ = load_config(write(tmp_path, text))
    assert cfg.log.log_rotation_local_time is False
    assert cfg.log.log_rotation_compress is False


@pytest.mark.parametrize(
    "dotted",
    ["daemon.log_rotation_size", "log.log_rotation_max_size", "log.log_rotation_max_backups"],
)
def test_a_present_zero_is_zero_not_the_default(tmp_path: Path, dotted: str) -> None:
    assert leaf_keys(load_one(tmp_path, dotted, "0"))[dotted] == 0


def test_a_present_empty_string_is_kept(tmp_path: Path) -> None:
    cfg = load_one(tmp_path, "image.public_key_file", '""')
    assert cfg.image.public_key_file == ""


# --- unknown keys -------------------------------------------------------------------------


def test_unknown_key_warns_with_a_close_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "version = 1\n[snapshot]\nsync_remov = true\n")
    cfg, warnings = load_config(path)
    assert warnings == [
        f'config {path}: unknown key "snapshot.sync_remov" (did you mean "sync_remove"?)'
    ]
    assert cfg.snapshot.sync_remove is False


def test_unknown_top_level_key_warns_with_suggestion(tmp_path: Path) -> None:
    _, warnings = load_config(write(tmp_path, 'version = 1\nroots = "/x"\n'))
    assert len(warnings) == 1
    assert 'unknown key "roots" (did you mean "root"?)' in warnings[0]


def test_unknown_section_warns_with_suggestion(tmp_path: Path) -> None:
    _, warnings = load_config(write(tmp_path, "version = 1\n[snapshots]\nsync_remove = true\n"))
    assert len(warnings) == 1
    assert 'unknown section "snapshots" (did you mean "snapshot"?)' in warnings[0]


def test_key_in_the_wrong_section_suggests_its_full_dotted_name(tmp_path: Path) -> None:
    # upstream's older layout had tarfs keys directly under [experimental]
    _, warnings = load_config(write(tmp_path, "version = 1\n[experimental]\nenable_tarfs = true\n"))
    assert len(warnings) == 1
    assert 'unknown key "experimental.enable_tarfs"' in warnings[0]
    assert '(did you mean "experimental.tarfs.enable_tarfs"?)' in warnings[0]


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path: Path) -> None:
    _, warnings = load_config(write(tmp_path, "version = 1\n[daemon]\nzzzz = 1\n"))
    assert len(warnings) == 1
    assert warnings[0].endswith('unknown key "daemon.zzzz"')


# --- file errors ----------------------------------------------------------------------------


def test_missing_file_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"config {path}: file not found"):
        load_config(path)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "version = 1\n[daemon]\nfs_driver = fusedev\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"config {path}: TOML syntax error: ")
    assert "line 3" in message


def test_path_may_be_a_str(tmp_path: Path) -> None:
    cfg, _ = load_config(str(write(tmp_path, 'version = 1\nroot = "/r"\n')))
    assert cfg.root == "/r"


# --- validation rules ---------------------------------------------------------------------


def test_file_without_version_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="version: missing"):
        load_config(write(tmp_path, 'root = "/r"\n'))


def test_version_other_than_1_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported configuration version 2, expected 1"):
        load_one(tmp_path, "version", "2")


def test_empty_root_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="root: must not be empty"):
        load_one(tmp_path, "root", '""')


def test_root_of_exactly_the_maximum_length_is_accepted(tmp_path: Path) -> None:
    root = "/" + "r" * (MAX_ROOT_PATH_LEN - 1)
    assert load_one(tmp_path, "root", f'"{root}"').root == root


def test_root_too_long_for_socket_paths_is_rejected_with_the_reason(tmp_path: Path) -> None:
    root = "/" + "r" * MAX_ROOT_PATH_LEN
    path = write(tmp_path, with_key("root", f'"{root}"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"config {path}: root: ")
    assert f"is {MAX_ROOT_PATH_LEN + 1} bytes, at most {MAX_ROOT_PATH_LEN}" in message
    assert "sun_path" in message


def test_root_length_counts_bytes_not_characters(tmp_path: Path) -> None:
    root = "/" + "é" * 35  # 71 bytes, 36 characters
    with pytest.raises(ConfigError, match="71 bytes"):
        load_one(tmp_path, "root", f'"{root}"')


def test_empty_address_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="address: must not be empty"):
        load_one(tmp_path, "address", '""')


@pytest.mark.parametrize("driver", list(FsDriver))
def test_every_upstream_fs_driver_is_accepted(tmp_path: Path, driver: FsDriver) -> None:
    assert load_one(tmp_path, "daemon.fs_driver", f'"{driver}"').daemon.fs_driver is driver


def test_unknown_fs_driver_is_rejected_listing_the_choices(tmp_path: Path) -> None:
    path = write(tmp_path, with_key("daemon.fs_driver", '"fuse"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"config {path}: daemon.fs_driver: expected one of "
        '"fusedev", "fscache", "blockdev", "proxy", "nodev", "blobfile", got string "fuse"'
    )


def test_blobfile_driver_refuses_the_failover_policy(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\n[daemon]\nfs_driver = "blobfile"\n'
                           'recover_policy = "failover"\n')
    with pytest.raises(ConfigError, match='daemon.recover_policy: failover .* blobfile'):
        load_config(path)
    cfg, _ = load_config(write(tmp_path, 'version = 1\n[daemon]\nfs_driver = "blobfile"\n'))
    assert cfg.daemon.fs_driver is FsDriver.BLOBFILE


@pytest.mark.parametrize(
    ("written", "mode"),
    [
        ("multiple", DaemonMode.DEDICATED),
        ("dedicated", DaemonMode.DEDICATED),
        ("shared", DaemonMode.SHARED),
        ("none", DaemonMode.NONE),
    ],
)
def test_daemon_mode_parses_with_multiple_as_dedicated(
    tmp_path: Path, written: str, mode: DaemonMode
) -> None:
    assert load_one(tmp_path, "daemon_mode", f'"{written}"').daemon_mode is mode


def test_unknown_daemon_mode_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'daemon_mode: expected one of .*"multiple"'):
        load_one(tmp_path, "daemon_mode", '"single"')


@pytest.mark.parametrize("policy", list(RecoverPolicy))
def test_recover_policies_are_accepted(tmp_path: Path, policy: RecoverPolicy) -> None:
    assert (
        load_one(tmp_path, "daemon.recover_policy", f'"{policy}"').daemon.recover_policy is policy
    )


def test_unknown_recover_policy_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="daemon.recover_policy: expected one of"):
        load_one(tmp_path, "daemon.recover_policy", '"reboot"')


@pytest.mark.parametrize("policy", list(FailoverPolicy))
def test_failover_policies_are_accepted(tmp_path: Path, policy: FailoverPolicy) -> None:
    cfg = load_one(tmp_path, "daemon.failover_policy", f'"{policy}"')
    assert cfg.daemon.failover_policy is policy


def test_unknown_failover_policy_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="daemon.failover_policy: expected one of"):
        load_one(tmp_path, "daemon.failover_policy", '"retry"')


def test_threads_number_up_to_1024_is_accepted(tmp_path: Path) -> None:
    assert load_one(tmp_path, "daemon.threads_number", "1024").daemon.threads_number == 1024


@pytest.mark.parametrize("value", ["1025", "-1"])
def test_threads_number_out_of_range_is_rejected(tmp_path: Path, value: str) -> None:
    with pytest.raises(
        ConfigError, match=r"daemon.threads_number: expected an integer in 0\.\.1024"
    ):
        load_one(tmp_path, "daemon.threads_number", value)


def test_cri_and_kubeconfig_keychains_are_exclusive(tmp_path: Path) -> None:
    text = "version = 1\n[remote.auth]\nenable_cri_keychain = true\nenable_kubeconfig_keychain = true\n"
    with pytest.raises(ConfigError, match="cannot both be true"):
        parse_config(write(tmp_path, text))


def test_either_keychain_alone_is_accepted(tmp_path: Path) -> None:
    assert load_one(
        tmp_path, "remote.auth.enable_cri_keychain", "true"
    ).remote.auth.enable_cri_keychain


def test_cri_keychain_must_not_proxy_to_the_snapshotter_itself(tmp_path: Path) -> None:
    text = ('version = 1\naddress = "/run/n/s.sock"\n[remote.auth]\nenable_cri_keychain = true\n'
            'image_service_address = "unix:///run/n/s.sock"\n')
    with pytest.raises(ConfigError, match="the snapshotter's own address"):
        parse_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match="must be set when"):
        parse_config(write(tmp_path, 'version = 1\n[remote.auth]\nenable_cri_keychain = true\n'
                                     'image_service_address = ""\n'))


def test_mirrors_dir_must_exist_when_set(tmp_path: Path) -> None:
    missing = tmp_path / "certs.d"
    with pytest.raises(
        ConfigError, match=f'remote.mirrors_config.dir: directory "{missing}" does not'
    ):
        load_one(tmp_path, "remote.mirrors_config.dir", f'"{missing}"')
    missing.mkdir()
    assert load_one(tmp_path, "remote.mirrors_config.dir", f'"{missing}"').remote.mirrors_config.dir


def test_validate_signature_needs_a_public_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image.public_key_file: must be set"):
        load_one(tmp_path, "image.validate_signature", "true")


def test_validate_signature_needs_the_public_key_file_to_exist(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    text = f'version = 1\n[image]\nvalidate_signature = true\npublic_key_file = "{key}"\n'
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=f'image.public_key_file: file "{key}" does not exist'):
        parse_config(path)
    key.write_text("pem")
    assert parse_config(path)[0].image.validate_signature is True


def test_public_key_file_is_not_checked_without_validate_signature(tmp_path: Path) -> None:
    # as upstream: no key is read; and a warning says the setting does nothing
    cfg, warnings = load_config(write(tmp_path, with_key("image.public_key_file",
                                                         '"/nonexistent/key.pem"')))
    assert cfg.image.public_key_file == "/nonexistent/key.pem"
    assert len(warnings) == 1 and "image.public_key_file" in warnings[0] \
        and "has no effect" in warnings[0], warnings


def test_fscache_forces_shared_daemon_mode_silently_when_mode_is_defaulted(tmp_path: Path) -> None:
    cfg = load_one(tmp_path, "daemon.fs_driver", '"fscache"')
    assert cfg.daemon_mode is DaemonMode.SHARED


def test_fscache_forces_shared_daemon_mode_with_a_warning_when_mode_was_set(
    tmp_path: Path,
) -> None:
    text = 'version = 1\ndaemon_mode = "dedicated"\n[daemon]\nfs_driver = "fscache"\n'
    cfg, warnings = load_config(write(tmp_path, text))
    assert cfg.daemon_mode is DaemonMode.SHARED
    assert len(warnings) == 1
    assert 'daemon_mode "dedicated" replaced by "shared"' in warnings[0]


def test_fscache_warning_quotes_the_daemon_mode_as_written() -> None:
    cfg, warnings = load_config(None, {"daemon_mode": "multiple", "daemon.fs_driver": "fscache"})
    assert cfg.daemon_mode is DaemonMode.SHARED
    assert warnings == [
        (
            'override: daemon_mode "multiple" replaced by "shared":'
            ' fs_driver "fscache" always uses one shared nydusd'
        )
    ]


def test_shared_daemon_mode_with_fscache_gives_no_warning() -> None:
    _, warnings = load_config(None, {"daemon_mode": "shared", "daemon.fs_driver": "fscache"})
    assert warnings == []


def test_log_level_is_case_insensitive_and_checked(tmp_path: Path) -> None:
    assert load_one(tmp_path, "log.level", '"WARN"').log.level == "warn"
    with pytest.raises(
        ConfigError, match=r'log.level: expected one of "trace", .*got string "loud"'
    ):
        load_one(tmp_path, "log.level", '"loud"')


@pytest.mark.parametrize("mode", list(TarfsExportMode))
def test_tarfs_export_modes_are_accepted(tmp_path: Path, mode: TarfsExportMode) -> None:
    cfg = load_one(tmp_path, "experimental.tarfs.export_mode", f'"{mode}"')
    assert cfg.experimental.tarfs.export_mode is mode


def test_unknown_tarfs_export_mode_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="experimental.tarfs.export_mode: expected one of"):
        load_one(tmp_path, "experimental.tarfs.export_mode", '"block"')


# --- overrides ----------------------------------------------------------------------------


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    text = 'version = 1\nroot = "/file"\n[log]\nlevel = "info"\n[daemon]\nfs_driver = "fusedev"\n'
    overrides: dict[str, object] = {
        "root": "/cli",
        "address": "/run/cli.sock",
        "log.level": "debug",
        "daemon.nydusd_path": "/opt/nydusd",
        "daemon.nydusd_config": "/opt/nydusd.json",
        "daemon.nydusimage_path": "/opt/nydus-image",
        "daemon.fs_driver": "blockdev",
        "daemon_mode": "none",
        "snapshot.nydus_overlayfs_path": "/opt/nydus-overlayfs",
        "log.log_to_stdout": True,
    }
    cfg, warnings = parse_config(write(tmp_path, text), overrides)
    assert warnings == []
    assert cfg.root == "/cli"
    assert cfg.address == "/run/cli.sock"
    assert cfg.log.level == "debug"
    assert cfg.daemon.nydusd_path == "/opt/nydusd"
    assert cfg.daemon.nydusd_config == "/opt/nydusd.json"
    assert cfg.daemon.nydusimage_path == "/opt/nydus-image"
    assert cfg.daemon.fs_driver is FsDriver.BLOCKDEV
    assert cfg.daemon_mode is DaemonMode.NONE
    assert cfg.snapshot.nydus_overlayfs_path == "/opt/nydus-overlayfs"
    assert cfg.log.log_to_stdout is True


def test_overrides_apply_without_a_file() -> None:
    cfg, _ = load_config(None, {"daemon_mode": "multiple", "daemon.fs_driver": "fscache"})
    assert cfg.daemon.fs_driver is FsDriver.FSCACHE
    assert cfg.daemon_mode is DaemonMode.SHARED


def test_none_override_means_flag_not_given(tmp_path: Path) -> None:
    cfg, _ = load_config(write(tmp_path, 'version = 1\nroot = "/file"\n'), {"root": None})
    assert cfg.root == "/file"


def test_override_of_the_wrong_type_is_rejected_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"log.log_to_stdout": "yes"})
    assert str(info.value) == 'override: log.log_to_stdout: expected a boolean, got string "yes"'


def test_override_of_an_invalid_value_is_rejected_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^override: daemon.fs_driver: expected one of"):
        load_config(None, {"daemon.fs_driver": "virtiofs"})


def test_validation_failure_of_an_override_names_the_override() -> None:
    with pytest.raises(ConfigError, match="^override: root: must not be empty"):
        load_config(None, {"root": ""})


def test_unknown_override_key_is_rejected_with_suggestion() -> None:
    with pytest.raises(
        ConfigError, match=r'override: unknown key "log.levl" \(did you mean "log.level"\?\)'
    ):
        load_config(None, {"log.levl": "debug"})


def test_override_of_a_section_is_rejected() -> None:
    with pytest.raises(ConfigError, match='unknown key "daemon"'):
        load_config(None, {"daemon": {"fs_driver": "fusedev"}})


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("0s", 0.0),
        ("10s", 10.0),
        ("1m", 60.0),
        ("24h", 86400.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("250us", 250e-6),
        ("2µs", 2e-6),
        ("100ns", 100e-9),
        (".5s", 0.5),
    ],
)
def test_parse_duration_accepts_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "-10s", "10 s", "1d", "120min", "s", "1h 30m", "1..5s"])
def test_parse_duration_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


@given(st.integers(0, 1000), st.integers(0, 59), st.integers(0, 59))
def test_parse_duration_sums_its_parts(h: int, m: int, s: int) -> None:
    assert parse_duration(f"{h}h{m}m{s}s") == h * 3600 + m * 60 + s


@pytest.mark.parametrize(
    "key", ["metrics.hung_io_interval", "metrics.collect_interval", "cache_manager.gc_period"]
)
def test_intervals_that_drive_periodic_work_must_be_positive(tmp_path: Path, key: str) -> None:
    with pytest.raises(
        ConfigError, match=f'{key}: expected a positive duration string .*got string "0s"'
    ):
        load_one(tmp_path, key, '"0s"')


def test_malformed_duration_in_the_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match='cache_manager.gc_period: expected .*got string "120min"'
    ):
        load_one(tmp_path, "cache_manager.gc_period", '"120min"')


def test_zero_credential_renewal_interval_means_off(tmp_path: Path) -> None:
    cfg = load_one(tmp_path, "remote.auth.credential_renewal_interval", '"0s"')
    assert cfg.remote.auth.credential_renewal_interval == 0.0


# --- memory limits ------------------------------------------------------------------------

GIB = 1 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("  ", None),
        ("1073741824", GIB),
        ("1.5e3", 1500),
        ("100B", 100),
        ("1KiB", 1024),
        ("200MiB", 200 << 20),
        ("2GiB", 2 * GIB),
        ("1TiB", 1 << 40),
        ("1PiB", 1 << 50),
        ("1Ki", 1024),
        ("200Mi", 200 << 20),
        ("2Gi", 2 * GIB),
        ("1Ti", 1 << 40),
        ("1Pi", 1 << 50),
        ("1.5Gi", 3 * GIB // 2),
        ("10%", int(8 * GIB * 0.1 + 0.5)),
        ("100%", 8 * GIB),
        ("0.5%", int(8 * GIB * 0.005 + 0.5)),
    ],
)
def test_parse_memory_limit(text: str, expected: int | None) -> None:
    assert parse_memory_limit(text, 8 * GIB) == expected


def test_percent_rounds_to_the_nearest_byte() -> None:
    assert parse_memory_limit("50%", 3) == 2
    assert parse_memory_limit("10%", 4) == 0


@pytest.mark.parametrize(
    "text", ["1MB", "1G", "10 %", "-1", "abc", "Mi", "1e", "inf", "nan", "1_000"]
)
def test_parse_memory_limit_rejects_malformed_or_unknown_units(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid memory limit"):
        parse_memory_limit(text, 8 * GIB)


def test_memory_limit_is_checked_at_load_and_converted_on_demand(tmp_path: Path) -> None:
    cfg, _ = parse_config(write(tmp_path, 'version = 1\n[cgroup]\nenable = true\n'
                                          'memory_limit = "25%"\n'))
    assert cfg.cgroup.memory_limit_bytes(4 * GIB) == GIB
    with pytest.raises(
        ConfigError, match='cgroup.memory_limit: expected a memory size .*got string "1GB"'
    ):
        load_one(tmp_path, "cgroup.memory_limit", '"1GB"')


# --- contract ------------------------------------------------------------------------------


def test_loading_twice_gives_equal_results_and_touches_nothing(
    sample: tuple[Path, dict[str, object]],
) -> None:
    path, _ = sample
    before = sorted(os.listdir(path.parent))
    first: Any = parse_config(path)
    assert parse_config(path) == first
    assert sorted(os.listdir(path.parent)) == before


def test_pushing_prefetch_lists_needs_recording_them(tmp_path: Path) -> None:
    text = "version = 1\n[experimental.prefetch_list]\npush = true\n"
    with pytest.raises(ConfigError, match=r"experimental\.prefetch_list\.push: .*record = true"):
        load_config(write(tmp_path, text))
