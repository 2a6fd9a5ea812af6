"""No silent no-ops: every configuration key and daemon flag takes effect or is refused.

Contract (docs/config.md): each key of the snapshotter's TOML, each key of pynydusd's JSON
(v1 and v2) and each pynydusd flag is one of
- ``yes``: set to something else than its default, it changes what the process does; the
  table below names the observable difference (a probe on the component that acts on it,
  or the integration test that shows it end to end);
- ``refused``: set to anything but its default, start-up stops with a message naming the
  key and saying it "is not supported by pynydus(d) yet"; the default loads;
- ``no effect``: upstream itself does nothing with it in what pynydus supports (e.g. a
  path only tarfs uses); it loads, with a warning naming it.
The tables here list every key of the schemas, and docs/config.md lists exactly these
keys with the same status: a new key without a row here, or one the doc forgets, fails.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pynydus import confschema
from pynydus.config import SnapshotterConfig, load_config
from pynydus.daemon import config as dconf
from pynydus.daemon import main as dmain
from pynydus.errors import ConfigError, InvalidArgument
from pynydus.logs import RotatingLog
from tests.harness.util import root_logging_of

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "config.md"


@dataclass(frozen=True)
class Effect:
    """Set to ``value`` (TOML/JSON text, ``{tmp}`` = a private directory), with ``also``
    set the same way in both runs, ``probe(default_run, set_run)`` sees a difference."""

    value: str
    probe: Callable[[Any, Any], None]
    also: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ShownBy:
    """The effect needs the whole stack; ``nodeid`` shows it (and mentions the key)."""

    nodeid: str


@dataclass(frozen=True)
class Refused:
    value: str


@dataclass(frozen=True)
class Inert:
    value: str


Case = Effect | ShownBy | Refused | Inert
STATUS = {Effect: "yes", ShownBy: "yes", Refused: "refused", Inert: "no effect"}


HARNESS = REPO / "tests" / "harness" / "pynydusd.py"  # passes the daemon's usual flags


def _tested_by_exists(nodeid: str, key: str) -> None:
    """``nodeid`` is a test that exists and mentions ``key`` (its last part; a flag may be
    passed by the pynydusd harness instead)."""
    path, _, name = nodeid.partition("::")
    src = (REPO / path).read_text()
    tree = ast.parse(src)
    fn = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name),
              None)
    assert fn is not None, f"{key}: {nodeid} does not exist"
    body = ast.get_source_segment(src, fn) or ""
    mention = key if key.startswith("-") else key.rsplit(".", 1)[-1].split("[")[0]
    if mention.startswith("-") and mention not in body:
        body = HARNESS.read_text()
    assert mention in body, f"{key}: {nodeid} never mentions it"


# --- the snapshotter's TOML ------------------------------------------------------------


@dataclass
class Run:
    """One start-up's configuration and what the components made of it."""

    tmp: Path
    cfg: SnapshotterConfig
    warnings: list[str]
    _fs: Any = None

    def logging(self) -> tuple[int, list[logging.Handler]]:
        """The root logger's level and handlers after the snapshotter's set-up."""
        from pynydus.snapshot.server import setup_logging

        with root_logging_of(lambda: setup_logging(self.cfg)) as root:
            return root.level, list(root.handlers)

    def log_file(self) -> RotatingLog:
        return next(h for h in self.logging()[1] if isinstance(h, RotatingLog))

    def options(self) -> Any:
        from pynydus.snapshot.server import snapshotter_options

        return snapshotter_options(self.cfg)

    @property
    def fs(self) -> Any:
        """The Nydus filesystem the snapshotter would start (nothing spawned)."""
        if self._fs is None:
            from pynydus.snapshot.server import make_filesystem

            self._fs = make_filesystem(self.cfg)
        return self._fs

    def daemon_command(self) -> list[str]:
        rec = self.fs._daemon_record("d1", "dedicated", str(self.tmp / "mnt"),
                                     config_path="/c.json", bootstrap="/b.boot")
        return list(self.fs.manager.build_command(rec))


def _socket_owner(run: Run) -> tuple[int, int]:
    from pynydus.snapshot.server import serve
    from pynydus.snapshot.snapshotter import Snapshotter

    sn = Snapshotter(run.tmp / "sn", run.options(), None)
    sock = run.tmp / "grpc.sock"
    server = serve(sn, str(sock), uid=run.cfg.uid, gid=run.cfg.gid)
    try:
        st = sock.stat()
        return st.st_uid, st.st_gid
    finally:
        server.stop(0).wait()
        sn.close()


def _detector(run: Run) -> tuple[bool, bool] | None:
    """(referrer, index) detection the snapshotter would run with, or None."""
    from pynydus.snapshot.server import make_detector

    det = make_detector(run.cfg)
    return None if det is None else (det.referrer, det.index)


def _flag(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def _raises_naming(fn: Callable[[], object], exc: type[Exception], text: str | None) -> None:
    with pytest.raises(exc, match=re.escape(text) if text else None):
        fn()


_TARFS_ON = {"experimental.tarfs.enable_tarfs": "true",
             "experimental.tarfs.mount_tarfs_on_host": "true"}
_TARFS_TESTS = "tests/integration/tarfs"


def _tarfs_options(run: Run) -> Any:
    """What the tarfs driver would take from the configuration (nothing started)."""
    from pynydus.tarfs.manager import TarfsOptions

    return TarfsOptions.from_config(run.cfg)


SNAPSHOTTER: dict[str, Case] = {
    "version": Effect("2", lambda d, s: None),  # the set run must fail to load: see below
    "root": ShownBy("tests/integration/snapshotter/test_bad_input.py::"
                     "test_root_and_address_from_the_config_file"),
    "address": ShownBy("tests/integration/snapshotter/test_bad_input.py::"
                        "test_root_and_address_from_the_config_file"),
    "uid": Effect("4242", lambda d, s: (_socket_owner(d)[0] == 0 and _socket_owner(s)[0] == 4242)
                  or pytest.fail("socket owner")),
    "gid": Effect("4343", lambda d, s: (_socket_owner(d)[1] == 0 and _socket_owner(s)[1] == 4343)
                  or pytest.fail("socket group")),
    "daemon_mode": Effect('"shared"', lambda d, s: (d.fs.use_standby and not s.fs.use_standby
                                                     and s.fs.mode == "shared")
                          or pytest.fail("daemon_mode")),
    "cleanup_on_close": Effect("true", lambda d, s: (not d.options().cleanup_on_close
                                                      and s.options().cleanup_on_close)
                               or pytest.fail("cleanup_on_close")),
    "system.enable": ShownBy("tests/integration/nydus/test_system_controller.py::test_socket_address_owner_and_mode"),
    "system.address": ShownBy("tests/integration/nydus/test_system_controller.py::test_socket_address_owner_and_mode"),
    "system.uid": ShownBy("tests/integration/nydus/test_system_controller.py::test_socket_address_owner_and_mode"),
    "system.gid": ShownBy("tests/integration/nydus/test_system_controller.py::test_socket_address_owner_and_mode"),
    "system.debug.daemon_cpu_profile_duration_secs": Refused("5"),
    "system.debug.pprof_address": Refused('"127.0.0.1:6060"'),
    "daemon.nydusd_path": Effect('"/bin/true"', lambda d, s: (s.fs.manager.command == ["/bin/true"]
                                                              != d.fs.manager.command)
                                 or pytest.fail("nydusd_path")),
    "daemon.nydusd_config": Effect('"{tmp}/template.json"',
                                   lambda d, s: (s.fs.template["amplify_io"] == 65536
                                                 != d.fs.template["amplify_io"])
                                   or pytest.fail("nydusd_config")),
    "daemon.nydusimage_path": Inert('"/usr/local/bin/nydus-image"'),
    "daemon.fs_driver": Effect('"blockdev"', lambda d, s: (
        d.fs is not None and s.fs is None) or pytest.fail("fs_driver blockdev"), also=_TARFS_ON),
    "daemon.recover_policy": Effect('"none"', lambda d, s: (
        (d.fs.manager.recover_policy, s.fs.manager.recover_policy) == ("restart", "none"))
        or pytest.fail("recover_policy")),
    "daemon.threads_number": Effect("7", lambda d, s: (_flag(d.daemon_command(), "--thread-num"),
                                                       _flag(s.daemon_command(), "--thread-num"))
                                    == (None, "7") or pytest.fail("threads_number")),
    "daemon.log_rotation_size": Effect("0", lambda d, s: (
        _flag(d.daemon_command(), "--log-rotation-size"),
        _flag(s.daemon_command(), "--log-rotation-size")) == ("100", None)
        or pytest.fail("log_rotation_size")),
    "daemon.failover_policy": Effect('"flush"', lambda d, s: (
        (d.fs.manager.failover_policy, s.fs.manager.failover_policy) == ("resend", "flush"))
        or pytest.fail("failover_policy")),
    "cgroup.enable": ShownBy("tests/integration/nydus/test_snapshotter_nydus.py::"
                              "test_daemons_run_in_a_memory_cgroup"),
    "cgroup.memory_limit": ShownBy("tests/integration/nydus/test_snapshotter_nydus.py::"
                                    "test_daemons_run_in_a_memory_cgroup"),
    "log.log_to_stdout": Effect("true", lambda d, s: (
        any(isinstance(h, RotatingLog) for h in d.logging()[1])
        and [getattr(h, "stream", None) for h in s.logging()[1]] == [sys.stdout])
        or pytest.fail("log_to_stdout")),
    "log.level": Effect('"debug"', lambda d, s: (
        (d.logging()[0], s.logging()[0]) == (logging.INFO, logging.DEBUG)
        and _flag(s.daemon_command(), "--log-level") == "debug") or pytest.fail("level")),
    "log.dir": Effect('"{tmp}/logs-here"', lambda d, s: (
        s.log_file().baseFilename == str(s.tmp / "logs-here" / "nydus-snapshotter.log")
        and _flag(s.daemon_command(), "--log-file").startswith(str(s.tmp / "logs-here")))
        or pytest.fail("log.dir")),
    "log.log_rotation_max_size": Effect("1", lambda d, s: (d.log_file().max_bytes,
                                                           s.log_file().max_bytes)
                                        == (200 << 20, 1 << 20) or pytest.fail("max_size")),
    "log.log_rotation_max_backups": Effect("2", lambda d, s: (d.log_file().max_backups,
                                                              s.log_file().max_backups)
                                           == (5, 2) or pytest.fail("max_backups")),
    "log.log_rotation_max_age": Effect("7", lambda d, s: (d.log_file().max_age_days,
                                                          s.log_file().max_age_days)
                                       == (0, 7) or pytest.fail("max_age")),
    "log.log_rotation_local_time": Effect("false", lambda d, s: (d.log_file().local_time,
                                                                 s.log_file().local_time)
                                          == (True, False) or pytest.fail("local_time")),
    "log.log_rotation_compress": Effect("false", lambda d, s: (d.log_file().compress,
                                                               s.log_file().compress)
                                        == (True, False) or pytest.fail("compress")),
    "metrics.address": ShownBy("tests/integration/nydus/test_snapshotter_nydus.py::"
                                "test_prometheus_metrics"),
    "metrics.hung_io_interval": Refused('"5s"'),
    "metrics.collect_interval": Refused('"2m"'),
    "remote.convert_vpc_registry": Inert("true"),
    "remote.skip_ssl_verify": Effect("true", lambda d, s: (
        not _tarfs_options(d).insecure and _tarfs_options(s).insecure)
        or pytest.fail("skip_ssl_verify"), also=_TARFS_ON),
    "remote.mirrors_config.dir": ShownBy("tests/integration/nydus/test_mirrors.py::"
                                         "test_pull_through_mirror_with_tls_fails_over_and_back"),
    **{f"remote.auth.{k}": ShownBy("tests/integration/nydus/test_credential_sources.py::"
                                   "test_kubeconfig_keychain_reads_the_clusters_pull_secrets")
       for k in ("enable_kubeconfig_keychain", "kubeconfig_path")},
    **{f"remote.auth.{k}": ShownBy("tests/e2e/test_cri_keychain.py::"
                                   "test_private_image_runs_with_the_credentials_of_its_cri_pull")
       for k in ("enable_cri_keychain", "image_service_address")},
    **{f"remote.auth.{k}": ShownBy("tests/integration/nydus/test_credential_sources.py::"
                                   "test_kubelet_credential_provider_plugin")
       for k in ("enable_kubelet_credential_providers", "credential_provider_config",
                 "credential_provider_bin_dir")},
    "remote.auth.credential_renewal_interval": ShownBy(
        "tests/integration/nydus/test_credential_renewal.py::"
        "test_images_keep_reading_after_their_credentials_expired"),
    "snapshot.enable_nydus_overlayfs": Effect("true", lambda d, s: (
        (d.options().nydus_overlayfs_type, s.options().nydus_overlayfs_type)
        == ("", "fuse.nydus-overlayfs")) or pytest.fail("enable_nydus_overlayfs")),
    "snapshot.nydus_overlayfs_path": Effect('"/opt/ovl"', lambda d, s: (
        (d.options().nydus_overlayfs_type, s.options().nydus_overlayfs_type)
        == ("fuse.nydus-overlayfs", "fuse./opt/ovl")) or pytest.fail("nydus_overlayfs_path"),
        also={"snapshot.enable_nydus_overlayfs": "true"}),
    "snapshot.enable_kata_volume": Refused("true"),
    "snapshot.sync_remove": Effect("true", lambda d, s: (d.options().sync_remove,
                                                         s.options().sync_remove)
                                   == (False, True) or pytest.fail("sync_remove")),
    "snapshot.enable_overlayfs_volatile": Effect("true", lambda d, s: (
        d.options().volatile, s.options().volatile) == (False, True) or pytest.fail("volatile")),
    "snapshot.oci_fallback": Effect("false", lambda d, s: (
        d.options().oci_fallback, s.options().oci_fallback) == (True, False)
        or pytest.fail("oci_fallback")),
    "cache_manager.disable": Inert("true"),
    "cache_manager.gc_period": Inert('"12h"'),
    "cache_manager.cache_dir": Effect('"{tmp}/cache-here"', lambda d, s: (
        s.fs.cache_dir == str(s.tmp / "cache-here") != d.fs.cache_dir
        and (s.tmp / "cache-here").is_dir()) or pytest.fail("cache_dir")),
    "image.public_key_file": ShownBy("tests/integration/nydus/test_signature.py::"
                                     "test_validate_signature_mounts_only_signed_bootstraps"),
    "image.validate_signature": ShownBy("tests/integration/nydus/test_signature.py::"
                                        "test_validate_signature_mounts_only_signed_bootstraps"),
    "experimental.enable_stargz": Refused("true"),
    "experimental.enable_referrer_detect": Effect("true", lambda d, s: (
        _detector(d), _detector(s)) == (None, (True, False)) or pytest.fail("referrer_detect")),
    "experimental.enable_index_detect": Effect("true", lambda d, s: (
        _detector(d), _detector(s)) == (None, (False, True)) or pytest.fail("index_detect")),
    "experimental.enable_backend_source": Refused("true"),
    "experimental.prefetch_list.record": Effect("true", lambda d, s: (
        d.fs.list_recorder is None and s.fs.list_recorder is not None
        and not s.fs.list_recorder.push) or pytest.fail("prefetch_list.record")),
    "experimental.prefetch_list.push": Effect("true", lambda d, s: (
        d.fs.list_recorder.push is False and s.fs.list_recorder.push is True)
        or pytest.fail("prefetch_list.push"), also={"experimental.prefetch_list.record": "true"}),
    "experimental.prefetch_list.record_timeout": Effect('"5s"', lambda d, s: (
        d.fs.list_recorder.timeout == 30.0 and s.fs.list_recorder.timeout == 5.0)
        or pytest.fail("prefetch_list.record_timeout"),
        also={"experimental.prefetch_list.record": "true"}),
    "experimental.tarfs.enable_tarfs": ShownBy(
        f"{_TARFS_TESTS}/test_tarfs_options.py::test_enable_tarfs_decides_who_unpacks_oci_layers"),
    "experimental.tarfs.mount_tarfs_on_host": ShownBy(
        f"{_TARFS_TESTS}/test_tarfs_options.py::"
        "test_mount_tarfs_on_host_false_and_blockdev_without_tarfs_stop_start_up"),
    "experimental.tarfs.tarfs_hint": ShownBy(
        f"{_TARFS_TESTS}/test_tarfs_options.py::"
        "test_tarfs_hint_only_takes_images_with_the_annotation"),
    "experimental.tarfs.max_concurrent_proc": ShownBy(
        f"{_TARFS_TESTS}/test_tarfs_options.py::"
        "test_max_concurrent_proc_bounds_conversions_of_an_image"),
    "experimental.tarfs.export_mode": ShownBy(
        f"{_TARFS_TESTS}/test_tarfs_export.py::test_export_mode_writes_disks_and_labels"),
    "experimental.tarfs.mount_mode": ShownBy(
        f"{_TARFS_TESTS}/test_tarfs_options.py::test_mount_mode_mounts_per_layer_or_per_image"),
    "experimental.tarfs.warm_metadata": ShownBy(
        f"{_TARFS_TESTS}/test_tarfs_options.py::"
        "test_warm_metadata_mounts_each_converted_layer_and_looks_its_tree_up"),
}


def _toml(settings: dict[str, str], tmp: Path) -> str:
    """A config file setting dotted keys (values are TOML text)."""
    tables: dict[str, list[str]] = {}
    for dotted, value in settings.items():
        table, _, key = dotted.rpartition(".")
        tables.setdefault(table, []).append(f"{key} = {value.format(tmp=tmp)}")
    top = {"version": "version = 1", "root": f'root = "{tmp}/root"'}
    top.update({line.split(" = ")[0]: line for line in tables.pop("", [])})
    out = list(top.values())
    for table, lines in tables.items():
        out += [f"[{table}]", *lines]
    return "\n".join(out) + "\n"


@pytest.fixture
def start() -> Iterator[Callable[[dict[str, str]], Run]]:
    # under /var/tmp/pyn-*, short: root must stay within 70 bytes, sockets within sun_path
    tmp_path = Path(tempfile.mkdtemp(prefix="pyn-cfgfx-", dir="/var/tmp"))
    (tmp_path / "template.json").write_text(json.dumps(
        {"device": {"backend": {"type": "registry", "config": {}},
                    "cache": {"type": "blobcache"}}, "amplify_io": 65536}))
    runs: list[Run] = []

    def make(settings: dict[str, str]) -> Run:
        d = tmp_path / f"run{len(runs)}"
        d.mkdir()
        settings = {"log.dir": '"{tmp}/logs"', **settings}
        path = d / "config.toml"
        path.write_text(_toml(settings, d).replace(str(d) + "/template.json",
                                                    str(tmp_path / "template.json")))
        cfg, warnings = load_config(path)
        run = Run(d, cfg, warnings)
        runs.append(run)
        return run

    try:
        yield make
    finally:
        for run in runs:
            if run._fs is not None:
                run._fs.close()
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_every_schema_key_has_a_case() -> None:
    assert set(SNAPSHOTTER) == set(confschema.all_leaves(SnapshotterConfig))


@pytest.mark.parametrize("key", sorted(SNAPSHOTTER))
def test_snapshotter_key_takes_effect_or_is_refused(
        key: str, start: Callable[[dict[str, str]], Run]) -> None:
    case = SNAPSHOTTER[key]
    if isinstance(case, ShownBy):
        _tested_by_exists(case.nodeid, key)
        return
    if key == "version":  # the one key whose only other value stops the load
        with pytest.raises(ConfigError, match="version: unsupported configuration version 2"):
            start({"version": "2"})
        return
    also = case.also if isinstance(case, Effect) else {}
    default = start(dict(also))
    assert default.warnings == []
    if isinstance(case, Refused):
        with pytest.raises(ConfigError) as err:
            start({**also, key: case.value})
        assert f": {key}: " in str(err.value)
        assert "is not supported by pynydus yet" in str(err.value)
        return
    changed = start({**also, key: case.value})
    if isinstance(case, Inert):
        assert len(changed.warnings) == 1, changed.warnings
        assert f"{key} = " in changed.warnings[0] and "has no effect" in changed.warnings[0]
        return
    assert changed.warnings == []
    case.probe(default, changed)


# --- pynydusd's JSON (v1 and v2) -----------------------------------------------------------

REGISTRY = {"scheme": "http", "host": "127.0.0.1:5000", "repo": "r/x"}
LOCALFS = {"dir": "/blobs"}


def _v1(backend: str) -> dict[str, Any]:
    return {"device": {"backend": {"type": backend,
                                   "config": dict(REGISTRY if backend == "registry" else LOCALFS)},
                       "cache": {"type": "blobcache", "config": {"work_dir": "/cache"}}},
            "fs_prefetch": {"enable": False}}


def _v2(backend: str) -> dict[str, Any]:
    return {"version": 2,
            "backend": {"type": backend,
                        backend: dict(REGISTRY if backend == "registry" else LOCALFS)},
            "cache": {"type": "blobcache", "blobcache": {"work_dir": "/cache"}},
            "rafs": {"prefetch": {"enable": False}}}


def _put(doc: dict[str, Any], dotted: str, value: Any) -> None:
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", dotted)
    node: Any = doc
    for part, nxt in zip(parts, parts[1:] + [None], strict=True):
        key: Any = int(part[1:-1]) if part.startswith("[") else part
        if nxt is None:
            node[key] = value
            return
        if isinstance(node, list):
            while len(node) <= key:
                node.append({})
            node = node[key]
        else:
            node = node.setdefault(key, [] if nxt.startswith("[") else {})


_CLIENTS: list[Any] = []


def _client(cfg: dconf.NydusdConfig) -> Any:
    """The registry transport the daemon would build (closed after the test)."""
    from pynydus.daemon.registry_backend import client_from_config

    client = client_from_config(cfg.backend.registry)
    _CLIENTS.append(client)
    return client._t


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def _backend(cfg: dconf.NydusdConfig) -> Any:
    from pynydus.daemon.daemon import make_backend

    return make_backend(cfg.backend)


@dataclass(frozen=True)
class Key:
    """A pynydusd config key: its v1 and v2 spellings (None: not in that layout), which
    backend's base config it needs, and its case (values are JSON)."""

    v1: str | None
    v2: str | None
    case: Case
    backend: str = "localfs"
    # set in both runs: backend config keys (device.backend.config.* in v1, backend.<type>.*
    # in v2) -> value
    also: dict[str, Any] = field(default_factory=dict)


def _differs(get: Callable[[Any], Any], default: Any, changed: Any) -> Callable[[Any, Any], None]:
    def probe(d: Any, s: Any) -> None:
        assert (get(d), get(s)) == (default, changed)
    return probe


def _r(key: str) -> tuple[str, str]:
    return f"device.backend.config.{key}", f"backend.registry.{key}"


def _l(key: str) -> tuple[str, str]:
    return f"device.backend.config.{key}", f"backend.localfs.{key}"


# what a registry key needs beside it to show its effect (in both runs)
_MIRROR = {"mirrors[0].host": "http://127.0.0.1:2"}
_NEEDS: dict[str, dict[str, Any]] = {
    "proxy.fallback": {"proxy.url": "http://127.0.0.1:1"},
    **{f"mirrors[0].{k}": _MIRROR for k in ("headers", "ping_url", "health_check_interval",
                                            "failure_limit", "auth_through", "override_path",
                                            "ca_cert_files", "client_cert", "client_key",
                                            "skip_verify", "connect_timeout")},
}
_HOSTS_TEST = ("tests/unit/registry/test_registry_hosts.py::"
               "test_registry_client_certificate_key_and_headers_reach_the_transport")
NYDUSD: list[Key] = [
    Key("version", "version", ShownBy("tests/unit/daemon/test_daemon_config.py::"
                                       "test_v2_toml_loads")),
    Key("device.id", "id", Effect('"/snap-1"', _differs(lambda c: c.redacted()["id"], "",
                                                        "/snap-1"))),
    Key("device.backend.type", "backend.type", ShownBy(
        "tests/integration/daemon/test_registry.py::test_full_tree_through_registry_without_auth")),
    *(Key(*_r(k), c, backend="registry", also=_NEEDS.get(k, {})) for k, c in [
        ("host", Effect('"other:5000"', _differs(lambda c: _client(c).origin.base,
                                                 "http://127.0.0.1:5000", "http://other:5000"))),
        ("repo", Effect('"r/y"', _differs(lambda c: _backend(c).repo, "r/x", "r/y"))),
        ("scheme", Effect('"https"', _differs(lambda c: _client(c).origin.base.split(":")[0],
                                              "http", "https"))),
        ("auth", Effect('"dTpw"', _differs(lambda c: bool(_client(c).origin.credentials),
                                           False, True))),
        ("registry_token", Effect('"tok"', _differs(
            lambda c: getattr(_client(c).origin.credentials, "registry_token", None),
            None, "tok"))),
        ("skip_verify", Effect("true", _differs(lambda c: _client(c).skip_verify, False, True))),
        ("ca_cert_files", Effect('["/nonexistent/ca.pem"]', lambda d, s: (
            _client(d) is not None and _raises_naming(lambda: _client(s), InvalidArgument,
                                                      "/nonexistent/ca.pem")))),
        ("client_cert", Effect('"/nonexistent/c.pem"', lambda d, s: (
            _client(d) is not None and _raises_naming(lambda: _client(s), InvalidArgument,
                                                      "client certificate /nonexistent/c.pem")))),
        ("client_key", ShownBy(_HOSTS_TEST)),
        ("headers", Effect('{"X-R": "1"}', _differs(lambda c: dict(_client(c).origin.headers),
                                                    {}, {"X-R": "1"}))),
        ("timeout", Effect("9", _differs(lambda c: _client(c)._http.timeout.read, 5, 9))),
        ("connect_timeout", Effect("9", _differs(lambda c: _client(c)._http.timeout.connect,
                                                 5, 9))),
        ("retry_limit", Effect("3", _differs(lambda c: _client(c).retry_limit, 0, 3))),
        ("blob_url_scheme", ShownBy("tests/integration/daemon/test_registry.py::"
                                     "test_redirected_blob_reads_go_to_blob_url_scheme_and_"
                                     "redirected_host")),
        ("blob_redirected_host", ShownBy("tests/integration/daemon/test_registry.py::"
                                          "test_redirected_blob_reads_go_to_blob_url_scheme_and_"
                                          "redirected_host")),
        ("proxy.url", Effect('"http://127.0.0.1:1"', _differs(
            lambda c: _client(c)._direct is not None, False, True))),
        ("proxy.ping_url", Refused('"http://127.0.0.1:1/ping"')),
        ("proxy.fallback", Effect("false", _differs(lambda c: _client(c)._direct is not None,
                                                    True, False))),
        ("proxy.check_interval", Effect("30", _differs(
            lambda c: _client(c)._proxy_check_interval, 5.0, 30.0))),
        ("proxy.use_http", Refused("true")),
        ("proxy.check_pause_elapsed", Refused("60")),
        ("proxy.dragonfly_scheduler_endpoint", Refused('"127.0.0.1:8002"')),
        ("mirrors[0].host", Effect('"http://127.0.0.1:2"', _differs(
            lambda c: [m.base for m in _client(c).mirrors], [], ["http://127.0.0.1:2"]))),
        ("mirrors[0].headers", Effect('{"X-M": "1"}', _differs(
            lambda c: dict(_client(c).mirrors[0].headers), {}, {"X-M": "1"}))),
        ("mirrors[0].ping_url", Effect('"http://127.0.0.1:2/ping"', _differs(
            lambda c: _client(c).mirrors[0].ping_url, "", "http://127.0.0.1:2/ping"))),
        ("mirrors[0].health_check_interval", Effect("9", _differs(
            lambda c: _client(c).mirrors[0].cooldown, 5.0, 9.0))),
        ("mirrors[0].failure_limit", Effect("2", _differs(
            lambda c: _client(c).mirrors[0].failure_limit, 5, 2))),
        ("mirrors[0].auth_through", Refused("true")),
        ("mirrors[0].override_path", Effect("true", _differs(
            lambda c: _client(c).mirrors[0].root, "/v2", "/"))),
        ("mirrors[0].ca_cert_files", Effect('["/nonexistent/ca.pem"]', lambda d, s: (
            _client(d) is not None and _raises_naming(lambda: _client(s), InvalidArgument,
                                                      "/nonexistent/ca.pem")))),
        ("mirrors[0].client_cert", Effect('"/nonexistent/c.pem"', lambda d, s: (
            _client(d) is not None and _raises_naming(lambda: _client(s), InvalidArgument,
                                                      "client certificate /nonexistent/c.pem")))),
        ("mirrors[0].client_key", ShownBy(_HOSTS_TEST)),
        ("mirrors[0].skip_verify", Effect("true", _differs(
            lambda c: _client(c).mirrors[0].skip_verify, False, True))),
        ("mirrors[0].connect_timeout", Effect("9", _differs(
            lambda c: getattr(_client(c).mirrors[0].http, "timeout", None) and
            _client(c).mirrors[0].http.timeout.connect, None, 9))),
    ]),
    *(Key(*_l(k), c) for k, c in [
        ("dir", Effect('"/other"', _differs(lambda c: _backend(c).dirs, ["/blobs"], ["/other"]))),
        ("blob_file", Effect('"/one.blob"', _differs(lambda c: _backend(c).blob_file, "",
                                                     "/one.blob"))),
        ("alt_dirs", Effect('["/alt"]', _differs(lambda c: _backend(c).dirs, ["/blobs"],
                                                 ["/blobs", "/alt"]))),
        ("readahead", Refused("true")),
        ("readahead_sec", Refused("10")),
    ]),
    Key("device.cache.type", "cache.type", Effect('"dummycache"', _differs(
        lambda c: c.cache.enabled, True, False))),  # a daemon refuses to mount without a cache
    Key("device.cache.compressed", "cache.compressed", Refused("true")),
    Key("device.cache.validate", "cache.validate", Effect("true", _differs(
        lambda c: c.cache.validate, False, True))),
    Key("device.cache.config.work_dir", "cache.blobcache.work_dir", Effect('"/c2"', _differs(
        lambda c: c.cache.work_dir, "/cache", "/c2"))),
    Key(None, "cache.filecache.work_dir", Effect('"/c3"', _differs(
        lambda c: c.cache.work_dir, "/cache", "/c3"))),
    *(Key(f"device.cache.config.{k}", f"cache.blobcache.{k}", Refused(v)) for k, v in [
        ("disable_indexed_map", "true"), ("enable_encryption", "true"),
        ("enable_convergent_encryption", "true"), ("encryption_key", '"k"')]),
    *(Key(None, f"cache.filecache.{k}", Refused(v)) for k, v in [
        ("disable_indexed_map", "true"), ("enable_encryption", "true"),
        ("enable_convergent_encryption", "true"), ("encryption_key", '"k"')]),
    Key("device.cache.prefetch_config", None, Refused('{"enable": true}')),
    Key(None, "cache.fscache", Refused('{"work_dir": "/f"}')),
    Key("mode", "rafs.mode", Refused('"cached"')),
    Key("digest_validate", "rafs.validate", Effect("true", _differs(lambda c: c.rafs.validate,
                                                                    False, True))),
    Key("iostats_files", "rafs.iostats_files", Refused("true")),
    Key("access_pattern", "rafs.access_pattern", Refused("true")),
    Key("latest_read_files", "rafs.latest_read_files", Refused("true")),
    Key("enable_xattr", "rafs.enable_xattr", Effect("true", _differs(
        lambda c: c.rafs.enable_xattr, False, True))),
    Key("amplify_io", "rafs.batch_size", Effect("65536", _differs(lambda c: c.rafs.batch_size,
                                                                  1 << 20, 65536))),
    Key("fill_page_cache", "rafs.fill_page_cache", Effect("false", _differs(
        lambda c: c.rafs.fill_page_cache, True, False))),
    Key("passthrough", "rafs.passthrough", Effect("false", _differs(
        lambda c: c.rafs.passthrough, True, False))),
    Key("fs_prefetch.enable", "rafs.prefetch.enable", Effect("true", _differs(
        lambda c: c.rafs.prefetch.enable, False, True))),
    Key("fs_prefetch.threads_count", "rafs.prefetch.threads", Effect("3", _differs(
        lambda c: c.rafs.prefetch.threads, 8, 3))),
    Key("fs_prefetch.merging_size", "rafs.prefetch.batch_size", Effect("65536", _differs(
        lambda c: c.rafs.prefetch.batch_size, 1 << 20, 65536))),
    Key("fs_prefetch.bandwidth_rate", "rafs.prefetch.bandwidth_limit", Effect("1000", _differs(
        lambda c: c.rafs.prefetch.bandwidth_limit, 0, 1000))),
    Key("fs_prefetch.prefetch_all", None, Effect("false", _differs(
        lambda c: c.rafs.prefetch.prefetch_all, True, False))),
    Key(None, "rafs.prefetch.prefetch_all", Effect("true", _differs(
        lambda c: c.rafs.prefetch.prefetch_all, False, True))),
    Key("fs_prefetch.stream_prefetch", None, Refused("true")),
    *(Key(None, f"cache.prefetch.{k}", Effect(v, _differs(get, a, b)))
      for k, v, get, a, b in [
          ("enable", "true", lambda c: c.rafs.prefetch.enable, False, True),
          ("threads", "3", lambda c: (c.rafs.prefetch.enable, c.rafs.prefetch.threads),
           (True, 8), (True, 3)),
          ("batch_size", "65536", lambda c: (c.rafs.prefetch.enable, c.rafs.prefetch.batch_size),
           (True, 1 << 20), (True, 65536)),
          ("bandwidth_limit", "9", lambda c: (c.rafs.prefetch.enable,
                                              c.rafs.prefetch.bandwidth_limit), (True, 0), (True, 9)),
          ("prefetch_all", "true", lambda c: (c.rafs.prefetch.enable,
                                              c.rafs.prefetch.prefetch_all),
           (True, False), (True, True)),
      ]),
    Key("id_mapping", None, Refused('"0:1000:65536"')),
    Key("warmup", None, Refused("1")),
    Key(None, "overlay", Refused('{"upper_dir": "/u"}')),
    Key(None, "external_backends", Refused('[{"type": "local"}]')),
    Key(None, "metadata_path", Refused('"/b.boot"')),
]
# cache.prefetch.* other than enable are seen with cache.prefetch.enable = true (v2 only)
_V2_ALSO = {f"cache.prefetch.{k}": {"cache.prefetch.enable": True}
            for k in ("threads", "batch_size", "bandwidth_limit", "prefetch_all")}


def _nydusd_leaves(layout: type[Any]) -> set[str]:
    """Every key of a layout, the backend tables expanded to their keys."""
    out = set()
    for key in confschema.all_leaves(layout):
        if key in ("device.backend.config", "backend.registry", "backend.localfs"):
            kinds = [dconf.RegistryConfig, dconf.LocalFsConfig]
            if key == "backend.registry":
                kinds = [dconf.RegistryConfig]
            elif key == "backend.localfs":
                kinds = [dconf.LocalFsConfig]
            for kind in kinds:
                for sub in confschema.all_leaves(kind):
                    if sub == "mirrors":
                        out |= {f"{key}.mirrors[0].{m}"
                                for m in confschema.all_leaves(dconf.MirrorConfig)}
                    else:
                        out.add(f"{key}.{sub}")
        else:
            out.add(key)
    return out


def test_every_pynydusd_key_has_a_case() -> None:
    assert {k.v1 for k in NYDUSD if k.v1} == _nydusd_leaves(dconf._V1File)
    assert {k.v2 for k in NYDUSD if k.v2} == _nydusd_leaves(dconf._V2File)


def _parse(doc: dict[str, Any]) -> tuple[dconf.NydusdConfig, list[str]]:
    return dconf.parse_daemon_config(json.dumps(doc), "config c.json")


@pytest.mark.parametrize(
    "key, layout, dotted",
    [(k, layout, name) for k in NYDUSD for layout, name in (("v1", k.v1), ("v2", k.v2)) if name],
    ids=lambda v: v if isinstance(v, str) else "")
def test_pynydusd_key_takes_effect_or_is_refused(key: Key, layout: str, dotted: str) -> None:
    case = key.case
    if isinstance(case, ShownBy):
        _tested_by_exists(case.nodeid, dotted)
        return
    base = (_v1 if layout == "v1" else _v2)(key.backend)
    prefix = "device.backend.config." if layout == "v1" else f"backend.{key.backend}."
    also = {prefix + k: v for k, v in key.also.items()}
    also.update(_V2_ALSO.get(dotted, {}) if layout == "v2" else {})
    for k, v in also.items():
        _put(base, k, v)
    default, warnings = _parse(base)
    assert warnings == []
    changed_doc = json.loads(json.dumps(base))
    _put(changed_doc, dotted, json.loads(case.value))
    if isinstance(case, Refused):
        with pytest.raises(ConfigError) as err:
            _parse(changed_doc)
        assert f"config c.json: {dotted}: " in str(err.value)
        assert "is not supported by pynydusd yet" in str(err.value)
        return
    assert isinstance(case, Effect)
    changed, warnings = _parse(changed_doc)
    assert warnings == []
    case.probe(default, changed)


# --- pynydusd's flags ----------------------------------------------------------------------

DAEMON_TESTS = "tests/integration/daemon/"
FLAGS: dict[str, Case] = {
    "--help": ShownBy("tests/unit/test_config_effects.py::test_help_lists_every_flag"),
    "--version": ShownBy("tests/unit/test_config_effects.py::test_version_prints_the_version"),
    "--apisock": ShownBy(DAEMON_TESTS + "test_api.py::test_daemon_info_and_metrics_shapes"),
    "--apisock-group": ShownBy("tests/unit/daemon/test_api_socket.py::"
                                "test_the_group_flag_reaches_the_api_socket"),
    "--config": ShownBy(DAEMON_TESTS + "test_api.py::test_daemon_info_and_metrics_shapes"),
    "--bootstrap": ShownBy(DAEMON_TESTS + "test_api.py::test_daemon_info_and_metrics_shapes"),
    "--mountpoint": ShownBy(DAEMON_TESTS + "test_api.py::test_daemon_info_and_metrics_shapes"),
    "--localfs-dir": ShownBy(DAEMON_TESTS + "test_api.py::test_localfs_dir_flag_serves_and_caches"),
    "--id": ShownBy(DAEMON_TESTS + "test_api.py::test_daemon_info_and_metrics_shapes"),
    "--supervisor": ShownBy(DAEMON_TESTS + "test_api.py::test_daemon_info_and_metrics_shapes"),
    "--upgrade": ShownBy(DAEMON_TESTS + "test_takeover.py::"
                          "test_kill9_under_reads_is_taken_over_without_an_error"),
    "--failover-policy": ShownBy(DAEMON_TESTS + "test_takeover.py::"
                                  "test_a_read_the_dead_daemon_had_taken_is_resent_or_failed"),
    "--blob-files": ShownBy(DAEMON_TESTS + "test_blob_files.py::"
                             "test_kernel_erofs_over_blob_files_shows_the_tree"),
    "--thread-num": ShownBy("tests/unit/test_config_effects.py::test_thread_num_sizes_the_workers"),
    "--prefetch-files": ShownBy(DAEMON_TESTS + "test_prefetch.py::"
                                 "test_prefetch_files_fetches_only_the_listed_files"),
    "--log-level": ShownBy("tests/unit/test_config_effects.py::test_log_flags_set_up_the_log"),
    "--log-file": ShownBy("tests/unit/test_config_effects.py::test_log_flags_set_up_the_log"),
    "--log-rotation-size": ShownBy("tests/unit/test_config_effects.py::"
                                    "test_log_flags_set_up_the_log"),
    "--rlimit-nofile": ShownBy("tests/unit/test_config_effects.py::"
                                "test_rlimit_nofile_raises_the_limit"),
    "--readonly": ShownBy(DAEMON_TESTS + "test_api.py::test_localfs_dir_flag_serves_and_caches"),
    "--writable": Refused("--writable"),
    "--virtual-mountpoint": Refused("--virtual-mountpoint=/sub"),
    "--shared-dir": Refused("--shared-dir=/x"),
    "--backend-source": Refused("--backend-source=http://x/backend"),
    "--fscache": Refused("--fscache=/f"),
    "--fscache-threads": Refused("--fscache-threads=2"),
    "--fscache-tag": Refused("--fscache-tag=t"),
}


def _long_flags() -> set[str]:
    parser = dmain.build_parser()
    return {next(o for o in a.option_strings if o.startswith("--"))
            for a in parser._actions if a.option_strings}


def test_every_flag_has_a_case() -> None:
    assert set(FLAGS) == _long_flags()


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_flag_takes_effect_or_is_refused(flag: str, tmp_path: Path) -> None:
    case = FLAGS[flag]
    if isinstance(case, ShownBy):
        _tested_by_exists(case.nodeid, flag)
        return
    assert isinstance(case, Refused)
    args = dmain.build_parser().parse_args(["--mountpoint", str(tmp_path / "m"), case.value])
    with pytest.raises(ConfigError, match=f"^{re.escape(flag)} is not supported by pynydusd yet"):
        dmain.daemon_options("fuse", args)
    assert not (tmp_path / "m").exists()  # refused before anything is made


def test_unsupported_subcommands_are_refused(tmp_path: Path) -> None:
    args = dmain.build_parser().parse_args(["--mountpoint", str(tmp_path)])
    for sub in ("singleton", "virtiofs", "nbd", "uffd"):
        with pytest.raises(ConfigError, match=f"subcommand '{sub}' is not supported"):
            dmain.daemon_options(sub, args)


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        dmain.build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in FLAGS)


def test_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    from pynydus import __version__

    with pytest.raises(SystemExit):
        dmain.build_parser().parse_args(["--version"])
    out = capsys.readouterr().out
    assert __version__ in out
    # nydusd's layout: upstream's snapshotter reads "Git Commit:" when it reconnects to
    # live daemons, and it must be the commit the daemon info reports
    commit = re.search(r"Git Commit:\s*(.+)", out)
    assert commit is not None and commit[1].strip() == f"pynydus-{__version__}"


def test_thread_num_sizes_the_workers(tmp_path: Path) -> None:
    from pynydus.daemon.daemon import Daemon

    def limiter(*flags: str) -> int:
        args = dmain.build_parser().parse_args(["--mountpoint", str(tmp_path), *flags])
        return int(Daemon(dmain.daemon_options("fuse", args)).make_fs().limiter.total_tokens)

    assert (limiter(), limiter("--thread-num", "16")) == (16, 64)
    with pytest.raises(ConfigError, match="--thread-num must be 1..1024"):
        limiter("--thread-num", "0")


def test_log_flags_set_up_the_log(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        args = dmain.build_parser().parse_args([
            "--mountpoint", str(tmp_path), "--log-level", "debug",
            "--log-file", str(tmp_path / "d.log"), "--log-rotation-size", "3"])
        dmain._setup_logging(args)
        (handler,) = root.handlers
        assert isinstance(handler, RotatingLog) and root.level == logging.DEBUG
        assert handler.baseFilename == str(tmp_path / "d.log") and handler.max_bytes == 3 << 20
        handler.close()
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


def test_rlimit_nofile_raises_the_limit() -> None:
    """--rlimit-nofile N raises the soft limit to N (within the hard one), never lowers it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert dmain.raise_nofile_limit(1000) == min(1000, hard)
        assert dmain.raise_nofile_limit(10) == min(1000, hard)  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- docs/config.md lists exactly these keys, with these statuses -------------------------


def _doc_rows(section: str, *name_columns: str) -> dict[str, str]:
    """Names (in backticks, in ``name_columns``) -> status, from the doc's tables under
    ``## section`` whose header starts with ``| name_columns[0] |``."""
    first = name_columns[0]
    text = DOC.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end > 0 else len(text)]
    rows: dict[str, str] = {}
    header: list[str] | None = None
    for line in body.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if set(line) <= {"|", "-", " ", ":"} or header[0] != first:
            continue
        status = cells[header.index("status")]
        for col in (header.index(c) for c in name_columns):
            for name in re.findall(r"`([^`]+)`", cells[col]):
                rows[name] = status
    return rows


def test_doc_lists_every_snapshotter_key_with_its_status() -> None:
    rows = _doc_rows("Keys", "key")
    assert set(rows) == set(SNAPSHOTTER)
    assert {k: rows[k] for k in rows} == {k: STATUS[type(c)] for k, c in SNAPSHOTTER.items()}


def test_doc_lists_every_pynydusd_key_with_its_status() -> None:
    rows = _doc_rows("pynydusd configuration", "v1 key", "v2 key")
    expect = {}
    for k in NYDUSD:
        for name in (k.v1, k.v2):
            if name:
                expect[name] = STATUS[type(k.case)]
    assert rows == expect


def test_doc_lists_every_pynydusd_flag_with_its_status() -> None:
    rows = _doc_rows("pynydusd flags", "flag")
    assert rows == {f: STATUS[type(c)] for f, c in FLAGS.items()}


def test_refusals_name_the_key_and_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('version = 1\n[experimental]\nenable_stargz = true\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"config {path}: experimental.enable_stargz: true is not supported by pynydus yet "
        "(stargz images); remove it or set it to false")
    path.write_text('version = 1\n[experimental]\nenable_stargz = false\n'
                    '[system.debug]\npprof_address = ""\n')
    assert load_config(path)[1] == []  # defaults spelled out load, without a word
