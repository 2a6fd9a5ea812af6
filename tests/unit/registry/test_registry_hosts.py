"""containerd's ``hosts.toml``: parsed as containerd reads it, typos refused, and turned into
the registry backend config of one image's daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pynydus.daemon.config import parse_daemon_config
from pynydus.daemon.registry_backend import client_from_config
from pynydus.errors import ConfigError
from pynydus.manager.daemonconfig import DEFAULT_TEMPLATE, apply_hosts, supplement
from pynydus.registry.hosts import (
    HostsConfig,
    check_all,
    host_dir_candidates,
    load_hosts,
    parse_go_duration,
    parse_hosts,
)

FULL = '''
server = "https://registry.example.com"
ca = "server-ca.pem"
[header]
  x-server = "s"

[host."https://mirror-a.example.com:5000"]
  capabilities = ["pull", "resolve"]
  ca = ["/etc/ca/a.pem", "rel/a2.pem"]
  client = [["a.cert", "a.key"], "combined.pem"]
  skip_verify = false
  dial_timeout = "1.5s"
  health_check_interval = 7
  failure_limit = 2
  ping_url = "https://mirror-a.example.com:5000/v2/"
  [host."https://mirror-a.example.com:5000".header]
    x-one = "1"
    x-many = ["a", "b"]

[host."http://mirror-b:8080/prefix"]
  capabilities = ["resolve"]

[host."mirror-c/custom/root"]
  override_path = true
'''


def test_full_file_reads_as_containerd_does(tmp_path: Path) -> None:
    h = parse_hosts(FULL, "f.toml", str(tmp_path))
    assert h.server.url == "https://registry.example.com"
    assert h.server.ca == (str(tmp_path / "server-ca.pem"),)
    assert h.server.headers == {"x-server": "s"}
    a, b, c = h.mirrors  # file order
    assert (a.url, a.root) == ("https://mirror-a.example.com:5000", "/v2")
    assert a.capabilities == {"pull", "resolve"}
    assert a.ca == ("/etc/ca/a.pem", str(tmp_path / "rel/a2.pem"))
    assert a.client == ((str(tmp_path / "a.cert"), str(tmp_path / "a.key")),
                        (str(tmp_path / "combined.pem"), ""))
    assert a.skip_verify is False and a.dial_timeout == 1.5
    assert (a.health_check_interval, a.failure_limit) == (7, 2)
    assert a.headers == {"x-one": "1", "x-many": "a, b"}
    assert (b.url, b.root, b.capabilities) == ("http://mirror-b:8080", "/prefix/v2",
                                               {"resolve"})
    assert (c.url, c.root) == ("https://mirror-c", "/custom/root")  # no scheme: https
    assert [m.url for m in h.pull_mirrors()] == [a.url, c.url]


@pytest.mark.parametrize("text, message", [
    ('[host."https://m"]\ncapabilites = ["pull"]\n',
     'host."https://m": unknown key "capabilites" (did you mean "capabilities"?)'),
    ('[host."https://m"]\n[host."https://m".headers]\nx = "1"\n',
     'unknown key "headers" (did you mean "header"?)'),
    ('sever = "https://r"\n', 'unknown key "sever" (did you mean "server"?)'),
    ('[host."https://m"]\ncapabilities = ["pull", "fetch"]\n', "unknown capability 'fetch'"),
    ('[host."https://m"]\nskip_verify = "yes"\n', 'skip_verify: expected a boolean'),
    ('[host."https://m"]\nca = 3\n', "ca: expected CA files"),
    ('[host."https://m"]\nclient = [["only-cert"]]\n', "client: invalid entry"),
    ('[host."https://m"]\ndial_timeout = "5 seconds"\n', "dial_timeout: expected a duration"),
    ('[host."https://m"]\ndial_timeout = "-1s"\n', "dial_timeout: expected a duration"),
    ('[host."https://m"]\nfailure_limit = 0\n', "failure_limit: expected an integer >= 1"),
    ('[host."ftp://m"]\n', "is not an http(s) URL"),
    ('[host."https://m"\n', "TOML syntax error"),
])
def test_mistakes_are_errors_naming_file_and_key(text: str, message: str,
                                                 tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_hosts(text, "/etc/nydus/certs.d/r/hosts.toml", str(tmp_path))
    assert str(err.value).startswith("/etc/nydus/certs.d/r/hosts.toml: ")
    assert message in str(err.value)


def test_host_directory_lookup_order(tmp_path: Path) -> None:
    assert host_dir_candidates("/d", "r.io:5000") == ["/d/r.io_5000_", "/d/r.io:5000",
                                                      "/d/_default"]
    assert host_dir_candidates("/d", "docker.io") == ["/d/docker.io", "/d/_default"]
    assert load_hosts(str(tmp_path), "r.io") is None
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default/hosts.toml").write_text('[host."https://any"]\n')
    assert load_hosts(str(tmp_path), "r.io").mirrors[0].url == "https://any"
    (tmp_path / "r.io_5000_").mkdir()
    (tmp_path / "r.io_5000_/hosts.toml").write_text('[host."https://port"]\n')
    assert load_hosts(str(tmp_path), "r.io:5000").mirrors[0].url == "https://port"


def test_docker_certs_d_layout_without_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "r.io"
    d.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "solo.cert", "notes.txt"):
        (d / name).write_text("x")
    h = load_hosts(str(tmp_path), "r.io")
    assert h is not None and h.mirrors == ()
    assert h.server.ca == (str(d / "ca.crt"),)
    assert h.server.client == ((str(d / "client.cert"), str(d / "client.key")),
                               (str(d / "solo.cert"), ""))


def test_check_all_reports_each_broken_file(tmp_path: Path) -> None:
    for name, text in {"good": '[host."https://m"]\n', "bad": '[host."https://m"]\nx = 1\n'
                       }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "hosts.toml").write_text(text)
    (problem,) = check_all(str(tmp_path))
    assert problem.startswith(str(tmp_path / "bad/hosts.toml")) and 'unknown key "x"' in problem


def test_go_durations() -> None:
    """Go's time.ParseDuration syntax, the same for hosts.toml, kubelet's provider config
    and the snapshotter's own config (one parser): "0", fractions without a leading digit
    or without digits after the point, a sign."""
    assert parse_go_duration("1m30s") == 90 and parse_go_duration("250ms") == 0.25
    assert parse_go_duration("0") == 0 and parse_go_duration(".5s") == 0.5
    assert parse_go_duration("1.s") == 1 and parse_go_duration("-1.5h") == -5400
    assert parse_go_duration("+2m") == 120 and parse_go_duration("1μs") == 1e-6
    for bad in ("", "5", "5 s", "1x", ".s", "-", "+", "1.5.s", "--1s", "0s0"):
        with pytest.raises(ValueError):
            parse_go_duration(bad)


def _pem_files(tmp_path: Path) -> dict[str, str]:
    """A CA and a client certificate it signed (key separate and combined)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (tmp_path / "ca.pem").write_bytes(cert_pem)
    (tmp_path / "c.cert").write_bytes(cert_pem)
    (tmp_path / "c.key").write_bytes(key_pem)
    (tmp_path / "both.pem").write_bytes(cert_pem + key_pem)
    return {k: str(tmp_path / k) for k in ("ca.pem", "c.cert", "c.key", "both.pem")}


def test_daemon_config_carries_the_registrys_mirrors(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path)
    d = tmp_path / "certs.d" / "127.0.0.1_5000_"
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(f'''
[host."https://127.0.0.1:6000"]
  capabilities = ["pull"]
  ca = "{pem['ca.pem']}"
  client = [["{pem['c.cert']}", "{pem['c.key']}"]]
  health_check_interval = 2
  failure_limit = 1
  ping_url = "https://127.0.0.1:6000/v2/"
  dial_timeout = "500ms"
  [host."https://127.0.0.1:6000".header]
    X-Mirror = "yes"
[host."http://127.0.0.1:7000/cache"]
  override_path = true
[host."http://127.0.0.1:8000"]
  capabilities = ["resolve"]
''')
    cfg = supplement(DEFAULT_TEMPLATE, image_ref="127.0.0.1:5000/app/x:1", snapshot_id="9",
                     cache_dir="/c", labels={}, mirrors_dir=str(tmp_path / "certs.d"))
    bcfg = cfg["device"]["backend"]["config"]
    assert (bcfg["host"], bcfg["scheme"]) == ("127.0.0.1:5000", "http")
    assert bcfg["mirrors"] == [
        {"host": "https://127.0.0.1:6000", "headers": {"X-Mirror": "yes"},
         "health_check_interval": 2, "failure_limit": 1,
         "ping_url": "https://127.0.0.1:6000/v2/", "ca_cert_files": [pem["ca.pem"]],
         "client_cert": pem["c.cert"], "client_key": pem["c.key"], "connect_timeout": 1},
        {"host": "http://127.0.0.1:7000/cache", "override_path": True},
    ]
    # what the daemon makes of it
    parsed, warnings = parse_daemon_config(json.dumps(cfg), "c.json")
    assert warnings == []
    client = client_from_config(parsed.backend.registry)
    try:
        t = client._t
        first, second = t.mirrors
        assert (first.base, first.root, first.cooldown, first.failure_limit) == \
            ("https://127.0.0.1:6000", "/v2", 2.0, 1)
        assert first.http is not None and first.http.timeout.connect == 1
        assert first.ping_url == "https://127.0.0.1:6000/v2/"
        assert t._url(second, "/v2/app/x/blobs/sha256:ab") == \
            "http://127.0.0.1:7000/cache/app/x/blobs/sha256:ab"
        assert t._url(first, "/v2/app/x/blobs/sha256:ab") == \
            "https://127.0.0.1:6000/v2/app/x/blobs/sha256:ab"
        assert second.http is None  # nothing of its own: the registry's connections
    finally:
        client.close()


def test_server_settings_and_certs_d_reach_the_registry_itself(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path)
    bcfg: dict = {"host": "r.io", "scheme": "https"}
    apply_hosts(bcfg, parse_hosts(f'''
server = "http://other.io:81"
ca = "{pem['ca.pem']}"
client = "{pem['both.pem']}"
skip_verify = true
dial_timeout = "2s"
[header]
  x-a = "1"
''', "f", str(tmp_path)))
    assert bcfg == {"host": "other.io:81", "scheme": "http", "ca_cert_files": [pem["ca.pem"]],
                    "client_cert": pem["both.pem"], "skip_verify": True,
                    "headers": {"x-a": "1"}, "connect_timeout": 2}
    with pytest.raises(ConfigError, match="an API root other than /v2"):
        apply_hosts({}, parse_hosts('server = "https://r.io/sub"\noverride_path = true\n', "f",
                                    str(tmp_path)))


def test_certificates_that_do_not_load_fail_the_image_naming_them(tmp_path: Path) -> None:
    hosts = parse_hosts(f'[host."https://m"]\nca = "{tmp_path}/absent.pem"\n', "/d/hosts.toml",
                        str(tmp_path))
    with pytest.raises(ConfigError, match=r'/d/hosts.toml: host."https://m": CA certificate '
                       + str(tmp_path / "absent.pem")):
        apply_hosts({}, hosts)
    (tmp_path / "junk.cert").write_text("junk")
    hosts = parse_hosts('[host."https://m"]\nclient = "junk.cert"\n', "/d/hosts.toml",
                        str(tmp_path))
    with pytest.raises(ConfigError, match="client certificate .*junk.cert: cannot load"):
        apply_hosts({}, hosts)
    assert HostsConfig("x").pull_mirrors() == ()


def _daemon_transport(registry: dict) -> object:
    cfg, _ = parse_daemon_config(json.dumps({
        "device": {"backend": {"type": "registry", "config": {
            "scheme": "https", "host": "r.io", "repo": "a/b", **registry}},
            "cache": {"type": "blobcache", "config": {"work_dir": "/c"}}}}), "c.json")
    client = client_from_config(cfg.backend.registry)
    client.close()
    return client._t


def test_registry_client_certificate_key_and_headers_reach_the_transport(
        tmp_path: Path) -> None:
    """pynydusd's registry keys client_cert, client_key and headers (what hosts.toml
    gives the server); a client_key that is not the certificate's key fails to load,
    which shows it is the key presented."""
    from pynydus.errors import InvalidArgument

    pem = _pem_files(tmp_path)
    t = _daemon_transport({"client_cert": pem["both.pem"], "headers": {"X-R": "1"}})
    assert dict(t.origin.headers) == {"X-R": "1"}
    _daemon_transport({"client_cert": pem["c.cert"], "client_key": pem["c.key"]})
    other = _pem_files(tmp_path / "other") if (tmp_path / "other").mkdir() is None else {}
    with pytest.raises(InvalidArgument, match="cannot load"):
        _daemon_transport({"client_cert": pem["c.cert"], "client_key": other["c.key"]})
    # a mirror's own pair, likewise
    t = _daemon_transport({"mirrors": [{"host": "https://m", "client_cert": pem["c.cert"],
                                        "client_key": pem["c.key"]}]})
    assert t.mirrors[0].http is not None
    with pytest.raises(InvalidArgument, match="cannot load"):
        _daemon_transport({"mirrors": [{"host": "https://m", "client_cert": pem["c.cert"],
                                        "client_key": other["c.key"]}]})
    with pytest.raises(ConfigError, match=r"mirrors\[0\].client_key: needs client_cert"):
        _daemon_transport({"mirrors": [{"host": "https://m", "client_key": pem["c.key"]}]})
