"""Per-image nydusd configuration, made from the operator's template.

The template is nydusd's v1 JSON (``daemon.nydusd_config``, upstream's default
``/etc/nydus/nydusd-config.json``); when there is none we use the built-in
default below. For each image the registry backend gets the host, repository and
scheme from the image reference and credentials from the snapshot's labels or the
docker config; the cache work dir is the snapshotter's cache dir. Files holding
credentials are written 0600, atomically.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from pynydus.daemon.config import parse_daemon_config
from pynydus.errors import ConfigError
from pynydus.registry.auth import resolve_credentials
from pynydus.registry.reference import parse_reference

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
               labels: Mapping[str, str]) -> dict[str, Any]:
    """The daemon config for one image (a deep copy of the template, filled in)."""
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
        creds = resolve_credentials(ref.api_host, labels=labels)
        if creds is not None and not creds.is_anonymous:
            if creds.registry_token:
                bcfg["registry_token"] = creds.registry_token
            elif creds.has_basic:
                bcfg["auth"] = creds.auth_string()
    return cfg


def write_config(path: str, cfg: Mapping[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, path)
