"""Where the snapshotter finds the credentials of an image's registry, in upstream's order.

Sources, first that has credentials wins (nydus-snapshotter ``pkg/auth/keychain.go``):

1. the snapshot's labels (``pullusername``/``pullsecret``);
2. the CRI keychain: what kubelet sent with the image's ``PullImage`` through our image
   service proxy (``[remote.auth] enable_cri_keychain``, :mod:`pynydus.cri`);
3. the docker config (``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``, read
   anew each time): ``credHelpers``, ``auths``, ``credsStore``;
4. kubelet's credential provider plugins (``enable_kubelet_credential_providers``);
5. Kubernetes ``dockerconfigjson`` secrets (``enable_kubeconfig_keychain``).

Sources 2-5 are *renewable*: asked again later they may give fresh credentials (a
rotated password, a new short-lived token, the credentials of a later PullImage), which
:mod:`pynydus.manager.renewal` hands to running daemons. A source that fails (a helper that hangs or prints garbage, a plugin that
errs, an API that does not answer) does not stop the lookup: its error is kept, named, and
reported with the result, so that a mount that then lacks credentials says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pynydus.errors import NydusError

from .credentials import Credentials, credentials_from_labels, load_docker_config
from .exechelper import CredentialSourceError
from .reference import Reference, parse_reference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Found:
    """Credentials and where they came from (``source`` is for messages, never secret).
    ``expires_at``: wall time after which the source should be asked again, if it said."""

    credentials: Credentials
    source: str
    renewable: bool = False
    expires_at: float | None = None


@dataclass(frozen=True)
class Lookup:
    """The result of asking the sources: what was found, and the sources that failed."""

    found: Found | None
    failures: tuple[str, ...] = ()
    asked: tuple[str, ...] = ()

    def explain(self) -> str:
        """For an error message: which sources were asked and which failed."""
        out = f"sources asked: {', '.join(self.asked) or 'none'}"
        if self.failures:
            out += "; failed: " + "; ".join(self.failures)
        return out


class Source(Protocol):
    name: str
    renewable: bool

    def find(self, ref: Reference, labels: Mapping[str, str]) -> Found | None:
        """Credentials for ``ref``'s registry, None when the source has none; raises
        CredentialSourceError (or ConfigError for a malformed file) when it fails."""
        ...


@dataclass
class LabelSource:
    name: str = "snapshot labels"
    renewable: bool = False

    def find(self, ref: Reference, labels: Mapping[str, str]) -> Found | None:
        creds = credentials_from_labels(labels)
        return Found(creds, "snapshot labels (pullusername/pullsecret)") if creds else None


@dataclass
class DockerConfigSource:
    """The docker config, re-read on every lookup (upstream does the same)."""

    name: str = "docker config"
    renewable: bool = True
    env: Mapping[str, str] | None = None

    def find(self, ref: Reference, labels: Mapping[str, str]) -> Found | None:
        cfg = load_docker_config(env=self.env)
        hit = cfg.find(ref.api_host)
        return Found(hit[0], hit[1], renewable=True) if hit else None


@dataclass
class CallableSource:
    """A source given as a function of the reference (the CRI keychain, kube secrets,
    kubelet plugins adapt to this)."""

    name: str
    fn: Callable[[Reference], Found | None]
    renewable: bool = False

    def find(self, ref: Reference, labels: Mapping[str, str]) -> Found | None:
        return self.fn(ref)


@dataclass
class Keychain:
    """The sources of one snapshotter, in order. Thread-safe as its sources are."""

    sources: list[Source] = field(default_factory=lambda: [LabelSource(),
                                                           DockerConfigSource()])

    def lookup(self, image_ref: str, labels: Mapping[str, str] | None = None, *,
               renewable_only: bool = False) -> Lookup:
        """Ask the sources in order for ``image_ref``'s registry; the first credentials
        win. ``renewable_only``: skip the labels (what renewal asks). Never raises
        for a failing source: its error is in ``failures`` (and logged)."""
        ref = parse_reference(image_ref)
        failures: list[str] = []
        asked: list[str] = []
        for src in self.sources:
            if renewable_only and not src.renewable:
                continue
            asked.append(src.name)
            try:
                found = src.find(ref, labels or {})
            except (CredentialSourceError, ValueError, OSError) as err:
                failures.append(str(err))
                log.warning("registry credentials for %s: %s", ref.domain, err)
                continue
            except NydusError as err:  # e.g. the ConfigError of a malformed docker config
                failures.append(f"{src.name}: {err}")
                log.warning("registry credentials for %s: %s: %s", ref.domain, src.name, err)
                continue
            if found is not None and not found.credentials.is_anonymous:
                return Lookup(found, tuple(failures), tuple(asked))
        return Lookup(None, tuple(failures), tuple(asked))
