"""Per-image nydusd configuration, made from the operator's template.

The template is nydusd's v1 JSON (``daemon.nydusd_config``, upstream's default
``/etc/nydus/nydusd-config.json``); when there is none we use the built-in
default below. For each image the registry backend gets the host, repository and
scheme from the image reference, credentials from the snapshot's labels or the
docker config, and, with ``[remote.mirrors_config] dir``, the registry's mirrors and TLS
settings from containerd's ``hosts.toml`` (:func:`apply_hosts`); the cache work dir is
the snapshotter's cache dir. Files holding credentials are written 0600, atomically.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from pynydus.daemon.config import parse_daemon_config
from pynydus.errors import ConfigError, InvalidArgument
from pynydus.registry.credentials import Credentials
from pynydus.registry.hosts import HostEntry, HostsConfig, load_hosts
from pynydus.registry.reference import parse_reference
from pynydus.registry.transport import tls_verify

log = logging.getLogger(__name__)

# Like upstream's fusedev template, but without prefetch_all: lazy pulling should
# fetch what the workload reads, and operators who want the whole image warmed
# in the background turn fs_prefetch on in their template. amplify_io is 128 KiB
# (nydusd's floor) rather than upstream's 1 MiB: a start-up reads many small files
# (modules, libraries) one after another, and a 1 MiB window per miss brought
# 23 MB to serve the 9 MB python's start-up reads in bench/lazy_pull.py's large
# image (9.7 MB at 128 KiB); that was no faster on loopback and 1.7x slower at
# 100 Mbit/s (docs/benchmarks.md, "Lazy pull end to end").
DEFAULT_TEMPLATE: dict[str, Any] = {
    "device": {
        "backend": {"type": "registry", "config": {"timeout": 5, "connect_timeout": 5, "retry_limit": 2}},
        "cache": {"type": "blobcache", "config": {"work_dir": ""}},
    },
    "mode": "direct",
    "digest_validate": False,
    "iostats_files": False,
    "enable_xattr": True,
    "amplify_io": 131072,
    "fs_prefetch": {"enable": False, "threads_count": 4, "merging_size": 1048576, "prefetch_all": False},
}


def load_template(path: str) -> dict[str, Any]:
    """The operator's template, validated by the daemon's own parser; default if absent."""
    if not path or not os.path.exists(path):
        if path:
            log.info("nydusd config template %s not found; using the built-in default", path)
        return copy.deepcopy(DEFAULT_TEMPLATE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"daemon.nydusd_config {path}: {err}") from err
    probe = copy.deepcopy(data)
    backend = probe.get("device", {}).get("backend", {})
    if backend.get("type") == "registry":  # host/repo come per image; fill them to validate
        backend.setdefault("config", {}).update({"host": "template.invalid", "repo": "template"})
    parse_daemon_config(json.dumps(probe), f"daemon.nydusd_config {path}")
    if not isinstance(data, dict):
        raise ConfigError(f"daemon.nydusd_config {path}: expected a JSON object")
    return data


def supplement(template: Mapping[str, Any], *, image_ref: str, snapshot_id: str, cache_dir: str,
               labels: Mapping[str, str], mirrors_dir: str = "",
               credentials: Credentials | None = None) -> dict[str, Any]:
    """The daemon config for one image (a deep copy of the template, filled in).

    ``credentials``: the registry's, from the snapshotter's keychain (None: anonymous).
    ``mirrors_dir``: containerd's ``hosts.toml`` directory; the image's registry entry
    there is read now (edits apply to the next image). ConfigError names the file when
    it is malformed or names certificates that cannot be loaded."""
    cfg = copy.deepcopy(dict(template))
    device = cfg.setdefault("device", {})
    device["id"] = "/" + snapshot_id
    cache = device.setdefault("cache", {})
    cache.setdefault("type", "blobcache")
    cache.setdefault("config", {})["work_dir"] = cache_dir
    backend = device.setdefault("backend", {"type": "registry", "config": {}})
    bcfg = backend.setdefault("config", {})
    if backend.get("type") == "registry":
        ref = parse_reference(image_ref)
        bcfg["host"] = ref.api_host
        bcfg["repo"] = ref.repository
        bcfg.setdefault("scheme", ref.default_scheme)
        hosts = load_hosts(mirrors_dir, ref.domain) if mirrors_dir else None
        if hosts is not None:
            apply_hosts(bcfg, hosts)
        set_credentials(bcfg, credentials)
    return cfg


def set_credentials(bcfg: dict[str, Any], creds: Credentials | None) -> bool:
    """Put ``creds`` into a registry backend config as nydusd reads them: a registry
    token as ``registry_token``, user and password as ``auth``; any other kind (an OAuth
    identity token, which nydusd cannot use) is left out with a warning; None keeps what
    the template has. Returns whether the config changed."""
    before = (bcfg.get("auth"), bcfg.get("registry_token"))
    if creds is not None and not creds.is_anonymous:
        bcfg.pop("auth", None)
        bcfg.pop("registry_token", None)
        if creds.registry_token:
            bcfg["registry_token"] = creds.registry_token
        elif creds.has_basic:
            bcfg["auth"] = creds.auth_string()
        else:
            log.warning("registry %s: an identity token cannot be handed to a daemon; "
                        "configure a password or a credential helper", bcfg.get("host"))
    return before != (bcfg.get("auth"), bcfg.get("registry_token"))


def _mirror_host(entry: HostEntry) -> tuple[str, bool]:
    """(``host`` as the daemon reads it, override_path): the daemon appends ``/v2`` to the
    host's path unless override_path, as containerd does."""
    if entry.root.endswith("/v2"):
        return entry.url + entry.root[:-len("/v2")], False
    return entry.url + entry.root.rstrip("/"), True


def _check_tls(entry: HostEntry, extra_ca: list[str], source: str, what: str) -> None:
    """Load the entry's certificates now: a missing or bad file fails this image's mount
    naming it, rather than every read of the running container."""
    try:
        tls_verify([*extra_ca, *entry.ca], bool(entry.skip_verify),
                   entry.client[0] if entry.client else None)
    except InvalidArgument as err:
        raise ConfigError(f"{source}: {what}: {err}") from err
    if len(entry.client) > 1:
        log.warning("%s: %s: %d client certificates; pynydusd presents the first, %s",
                    source, what, len(entry.client), entry.client[0][0])


def apply_hosts(bcfg: dict[str, Any], hosts: HostsConfig) -> None:
    """Fill a registry backend config from the registry's ``hosts.toml``: mirrors with
    capability ``pull`` (in file order, before any the template has) with their headers,
    TLS, dial timeout and Nydus failover keys; the server's host, scheme, TLS, headers
    and dial timeout when the file sets them."""
    server = hosts.server
    if server.url:
        if server.root != "/v2":
            raise ConfigError(f"{hosts.source}: server: an API root other than /v2 "
                              f"({server.root}) is not supported by pynydus yet")
        bcfg["host"], bcfg["scheme"] = server.netloc, server.scheme
    cas = list(bcfg.get("ca_cert_files") or [])
    if server.has_tls:
        _check_tls(server, cas, hosts.source, "server")
    cas += [c for c in server.ca if c not in cas]
    if cas:
        bcfg["ca_cert_files"] = cas
    if server.client:
        bcfg["client_cert"], key = server.client[0]
        if key:
            bcfg["client_key"] = key
    if server.skip_verify is not None:
        bcfg["skip_verify"] = server.skip_verify
    if server.headers:
        bcfg["headers"] = {**(bcfg.get("headers") or {}), **server.headers}
    if server.dial_timeout is not None:
        bcfg["connect_timeout"] = max(1, math.ceil(server.dial_timeout))
    mirrors = []
    for m in hosts.pull_mirrors():
        host, override = _mirror_host(m)
        entry: dict[str, Any] = {"host": host}
        if override:
            entry["override_path"] = True
        if m.headers:
            entry["headers"] = dict(m.headers)
        if m.health_check_interval is not None:
            entry["health_check_interval"] = m.health_check_interval
        if m.failure_limit is not None:
            entry["failure_limit"] = m.failure_limit
        if m.ping_url:
            entry["ping_url"] = m.ping_url
        if m.has_tls:
            _check_tls(m, cas, hosts.source, f'host."{m.url}"')
        if m.ca:
            entry["ca_cert_files"] = list(m.ca)
        if m.client:
            entry["client_cert"], key = m.client[0]
            if key:
                entry["client_key"] = key
        if m.skip_verify:
            entry["skip_verify"] = True
        if m.dial_timeout is not None:
            entry["connect_timeout"] = max(1, math.ceil(m.dial_timeout))
        mirrors.append(entry)
    if mirrors:
        bcfg["mirrors"] = mirrors + list(bcfg.get("mirrors") or [])


def write_config(path: str, cfg: Mapping[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, path)
