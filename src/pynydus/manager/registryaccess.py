"""The snapshotter's side of registry access: its keychain, and a check before a mount.

``build_keychain`` turns ``[remote.auth]`` into the ordered credential sources of
:mod:`pynydus.registry.keychain`. ``check_access`` asks the registry, with the daemon
config an image is about to be mounted with, for the image's bootstrap layer (a HEAD,
origin only, no retries, the template's timeouts): if the registry refuses, the mount
fails now with a message naming the credential source, or saying that none had
credentials and which failed, instead of the container's first read failing with EIO and
the reason only in a daemon log. Anything else (the registry down, a mirror-only setup)
is logged and the mount goes on: the daemon retries, and fails over to mirrors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from pynydus import labels as L
from pynydus.config import SnapshotterConfig
from pynydus.daemon.config import parse_daemon_config
from pynydus.daemon.registry_backend import client_from_config
from pynydus.errors import NydusError, PermissionDenied, q
from pynydus.registry.errors import Unauthorized
from pynydus.registry.keychain import (
    CallableSource,
    DockerConfigSource,
    Found,
    Keychain,
    LabelSource,
    Lookup,
    Source,
)
from pynydus.registry.reference import Reference, parse_reference

log = logging.getLogger(__name__)

# The check waits at most this long per attempt, whatever the template's timeouts.
CHECK_TIMEOUT = 5


def kubelet_source(cfg: SnapshotterConfig) -> Source:
    from pynydus.registry.kubelet import KubeletProviders

    auth = cfg.remote.auth
    providers = KubeletProviders.from_files(auth.credential_provider_config,
                                            auth.credential_provider_bin_dir)

    def find(ref: Reference) -> Found | None:
        hit = providers.lookup(str(ref), ref.domain)
        if hit is None:
            return None
        creds, source, expires = hit
        return Found(creds, source, renewable=True, expires_at=expires)
    return CallableSource("kubelet credential providers", find, renewable=True)


def build_keychain(cfg: SnapshotterConfig, *, cri: Source | None = None,
                   kube_secrets: Source | None = None) -> Keychain:
    """The sources ``[remote.auth]`` turns on, in upstream's order. Reads and validates
    the kubelet provider config and lists the cluster's pull secrets now (ConfigError at
    start-up)."""
    sources: list[Source] = [LabelSource()]
    if cri is not None:
        sources.append(cri)
    sources.append(DockerConfigSource())
    if cfg.remote.auth.enable_kubelet_credential_providers:
        sources.append(kubelet_source(cfg))
    if kube_secrets is None and cfg.remote.auth.enable_kubeconfig_keychain:
        from pynydus.registry.kubesecrets import KubeSecrets

        ks = KubeSecrets.start(cfg.remote.auth.kubeconfig_path)
        interval = cfg.remote.auth.credential_renewal_interval
        if interval > 0:  # a renewal pass sees secrets at most one interval old
            ks.refresh = min(ks.refresh, interval)
        kube_secrets = ks
    if kube_secrets is not None:
        sources.append(kube_secrets)
    return Keychain(sources)


def check_access(image_ref: str, daemon_cfg: Mapping[str, Any], labels: Mapping[str, str],
                 lookup: Lookup, what: str) -> None:
    """Raise PermissionDenied naming the credential source (or the lack of one) when the
    image's registry refuses the credentials ``daemon_cfg`` carries; otherwise return
    (also when the registry cannot be asked: logged). ``what`` names the snapshot."""
    backend = daemon_cfg.get("device", {}).get("backend", {})
    layer = labels.get(L.CRI_LAYER_DIGEST, "")
    if backend.get("type") != "registry" or not layer.startswith("sha256:"):
        return
    ref = parse_reference(image_ref)
    try:
        parsed, _ = parse_daemon_config(json.dumps(daemon_cfg), f"daemon config of {what}")
        reg = parsed.backend.registry
        reg = replace(reg, retry_limit=0, mirrors=(),
                      timeout=min(reg.timeout or CHECK_TIMEOUT, CHECK_TIMEOUT),
                      connect_timeout=min(reg.connect_timeout or CHECK_TIMEOUT, CHECK_TIMEOUT))
        client = client_from_config(reg)
    except NydusError as err:
        log.warning("%s: cannot check access to %s: %s", what, ref.domain, err)
        return
    try:
        client.blob_exists(ref.repository, layer, origin_only=True)
    except Unauthorized as err:
        host = reg.host
        if lookup.found is not None:
            raise PermissionDenied(
                f"{what}: image {q(image_ref)}: registry {host} refused the credentials "
                f"from {lookup.found.source}: {err}") from None
        raise PermissionDenied(
            f"{what}: image {q(image_ref)}: registry {host} requires credentials and none "
            f"were found ({lookup.explain()}): {err}") from None
    except NydusError as err:
        log.warning("%s: registry %s could not be asked for %s (%s); mounting anyway",
                    what, ref.domain, layer, err)
    finally:
        client.close()
