"""nydusd config v1/v2 parsing: what the snapshotter writes must load; errors name fields."""

import base64
import json

import pytest

from pynydus.daemon.config import parse_daemon_config
from pynydus.errors import ConfigError

# The shape nydus-snapshotter writes for a fusedev daemon (its fusedev template, filled in).
V1 = {
    "device": {
        "id": "/42",
        "backend": {"type": "registry", "config": {
            "scheme": "http", "host": "127.0.0.1:5000", "repo": "lab/small",
            "auth": base64.b64encode(b"user:pw").decode(), "timeout": 5, "connect_timeout": 5,
            "retry_limit": 2, "skip_verify": True, "mirrors": [{"host": "http://127.0.0.1:6000"}]}},
        "cache": {"type": "blobcache", "compressed": False, "config": {"work_dir": "/var/cache/x"}},
    },
    "mode": "direct", "digest_validate": False, "iostats_files": False, "enable_xattr": True,
    "amplify_io": 1048576,
    "fs_prefetch": {"enable": True, "threads_count": 8, "merging_size": 1048576, "prefetch_all": True},
}


def test_v1_snapshotter_template_loads() -> None:
    cfg, warnings = parse_daemon_config(json.dumps(V1))
    assert warnings == []
    reg = cfg.backend.registry
    assert (cfg.backend.type, reg.scheme, reg.host, reg.repo) == ("registry", "http", "127.0.0.1:5000", "lab/small")
    assert reg.credentials() == ("user", "pw") and reg.retry_limit == 2
    assert reg.mirrors[0].host == "http://127.0.0.1:6000"
    assert cfg.cache.enabled and cfg.cache.work_dir == "/var/cache/x"
    assert cfg.rafs.enable_xattr and cfg.rafs.prefetch.enable and cfg.rafs.prefetch.prefetch_all
    assert cfg.id == "/42"
    assert "pw" not in json.dumps(cfg.redacted()) and "auth" not in json.dumps(cfg.redacted())


def test_v2_toml_loads() -> None:
    text = """
version = 2
id = "x"
[backend]
type = "localfs"
[backend.localfs]
dir = "/blobs"
[cache]
type = "filecache"
[cache.filecache]
work_dir = "/cache"
[rafs]
mode = "direct"
enable_xattr = true
[rafs.prefetch]
enable = true
threads = 2
"""
    cfg, warnings = parse_daemon_config(text)
    assert cfg.backend.localfs.dir == "/blobs" and cfg.cache.work_dir == "/cache"
    assert cfg.rafs.prefetch.threads == 2 and not cfg.rafs.prefetch.prefetch_all
    assert warnings == []


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c["device"]["backend"]["config"].__setitem__("timeout", "5s"), "device.backend.config.timeout"),
        (lambda c: c["device"]["backend"]["config"].__setitem__("host", ""), "device.backend.config.host"),
        (lambda c: c["device"]["backend"]["config"].__setitem__("auth", "bm9jb2xvbg=="), "device.backend.config.auth"),
        (lambda c: c["device"]["backend"].__setitem__("type", "oss"), "device.backend.type"),
        (lambda c: c["device"]["cache"].__setitem__("type", "fscache"), "device.cache.type"),
        (lambda c: c.__setitem__("enable_xattr", "yes"), "enable_xattr"),
        (lambda c: c["fs_prefetch"].__setitem__("threads_count", 0), "fs_prefetch.threads_count"),
        (lambda c: c.__setitem__("mode", "weird"), "mode"),
    ],
)
def test_errors_name_the_field(mutate, field: str) -> None:
    cfg = json.loads(json.dumps(V1))
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        parse_daemon_config(json.dumps(cfg), "config c.json")
    assert f"config c.json: {field}" in str(err.value)


def test_unknown_keys_warn() -> None:
    cfg = json.loads(json.dumps(V1))
    cfg["enable_xatr"] = True
    cfg["device"]["backend"]["config"]["hots"] = "x"
    _, warnings = parse_daemon_config(json.dumps(cfg))
    # the same engine and words as the snapshotter's TOML, suggestions included
    assert 'config: unknown key "enable_xatr" (did you mean "enable_xattr"?)' in warnings
    assert any('unknown key "device.backend.config.hots" (did you mean "host"?)' in w
               for w in warnings)


def test_garbage_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_daemon_config("{nope")


def test_image_pull_auth_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_PULL_AUTH", base64.b64encode(b"a:b").decode())
    cfg, _ = parse_daemon_config(json.dumps(V1))
    assert cfg.backend.registry.credentials() == ("a", "b")


def test_messages_read_like_the_snapshotters(tmp_path) -> None:
    """One engine: a wrong type, an unknown key and an unsupported value are worded the
    same in nydusd's JSON as in the snapshotter's TOML."""
    from pynydus.config import load_config

    toml = tmp_path / "c.toml"
    toml.write_text('version = 1\n[daemon]\nthreads_number = "4"\n')
    with pytest.raises(ConfigError) as snap:
        load_config(toml)
    cfg = json.loads(json.dumps(V1))
    cfg["fs_prefetch"]["threads_count"] = "4"
    with pytest.raises(ConfigError) as daemon:
        parse_daemon_config(json.dumps(cfg), "config c.json")
    assert str(snap.value) == f'config {toml}: daemon.threads_number: expected an integer in ' \
        '0..1024, got string "4"'
    assert str(daemon.value) == 'config c.json: fs_prefetch.threads_count: expected an integer ' \
        'in 1..1024, got string "4"'
    cfg = json.loads(json.dumps(V1))
    cfg["device"]["cache"]["compressed"] = True
    with pytest.raises(ConfigError) as refused:
        parse_daemon_config(json.dumps(cfg), "config c.json")
    assert str(refused.value) == (
        "config c.json: device.cache.compressed: true is not supported by pynydusd yet (a cache "
        "that keeps chunks compressed); remove it or set it to false")
