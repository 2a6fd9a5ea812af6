"""Credential renewal for running daemons (``[remote.auth] credential_renewal_interval``).

Short-lived registry credentials (a cloud registry's password that is itself a token, a
bearer token from a credential helper, a rotated pull secret) stop working while the
images they were mounted with are still read. Every ``interval`` seconds this asks the
renewable sources again (``Keychain.lookup(renewable_only=True)``: the CRI keychain, the
docker config and its helpers, kubelet's credential provider plugins, the kubeconfig
keychain) for the image of each RAFS instance whose credentials came from such a source,
and when the answer differs from what the instance's daemon holds:

- the instance's daemon config file (0600) is rewritten, so a daemon restarted or taken
  over later starts with them;
- the daemon gets them through ``PUT /api/v1/config`` (nydusd's ``registry_auth``, or
  pynydusd's ``registry_token`` for a bearer token), which drops the registry tokens it
  holds; the next read fetches one with the new credentials.

A daemon that was restarted or taken over since the last push (another pid) gets them
again even when the file already has them. Credentials from the snapshot's labels are
static and never renewed (the daemon renews the bearer tokens it gets with them itself);
nor are those of an image mounted anonymously. This is upstream's design
(nydus-snapshotter ``snapshot/renewal.go``) with the CRI keychain renewable as well: a
later PullImage of the image (kubelet pulls again for every new pod with
``imagePullPolicy: Always``) brings fresh credentials.

A renewal that finds nothing, or whose daemon refuses the push, is a failure: logged
naming the image, the snapshot and why (never the secret), and counted per image in
``stats`` (the snapshotter exports them as upstream's
``snapshotter_credential_renewals_total{image_ref,result}``). The daemon keeps its current
credentials meanwhile; reads fail with EIO once the registry refuses them, they never
hang on the renewal. A helper that hangs costs the renewal pass its time limit (10 s),
never a read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pynydus.errors import NydusError, q
from pynydus.manager.client import DaemonClient
from pynydus.manager.daemonconfig import set_credentials, write_config
from pynydus.registry.keychain import Keychain, Lookup

if TYPE_CHECKING:
    from pynydus.manager.manager import LiveDaemon
    from pynydus.manager.store import RafsRecord
    from pynydus.registry.credentials import Credentials

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 5.0  # seconds a daemon gets to take new credentials


@dataclass
class RenewalStats:
    """Renewal attempts per image reference (what the metrics export). Thread-safe
    enough for counters read by a scrape."""

    successes: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    pushes: int = 0  # credentials handed to a daemon
    passes: int = 0  # renewal passes run
    last_pass_seconds: float = 0.0  # how long the last pass took
    tracked: dict[str, int] = field(default_factory=dict)  # image -> instances renewed

    def count(self, image_ref: str, ok: bool) -> None:
        d = self.successes if ok else self.failures
        d[image_ref] = d.get(image_ref, 0) + 1


def credential_key(creds: Credentials) -> str:
    """A digest that tells two credentials apart (kept instead of the secret itself)."""
    material = f"{creds.username}\0{creds.password}\0{creds.registry_token}"
    return hashlib.sha256(material.encode()).hexdigest()


class Instances(Protocol):
    """What renewal needs of the filesystem (``NydusFilesystem`` provides it)."""

    def renewal_targets(self) -> list[RafsRecord]: ...
    def instance_lock(self, sid: str) -> threading.Lock: ...
    def current(self, sid: str) -> RafsRecord | None: ...
    def live_daemon(self, daemon_id: str) -> LiveDaemon | None: ...


class CredentialRenewal:
    """The renewal loop of one snapshotter: ``start()`` runs a pass every ``interval``
    seconds on a thread of its own, ``close()`` stops it. ``renew_all()`` runs one pass
    (tests and the first pass after start-up call it directly)."""

    def __init__(self, fs: Instances, keychain: Keychain, interval: float) -> None:
        self.fs = fs
        self.keychain = keychain
        self.interval = interval
        self.stats = RenewalStats()
        self._pushed: dict[str, tuple[int, str]] = {}  # sid -> (daemon pid, credential_key)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="credential-renewal",
                                        daemon=True)
        self._thread.start()
        log.info("credential renewal every %.0f s", self.interval)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        # a pass every interval (upstream's ticker), not an interval after each pass: a
        # slow source must not stretch the time between renewals by its own
        due = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            due = max(due + self.interval, time.monotonic())
            try:
                self.renew_all()
            except Exception:  # the loop must outlive one bad pass
                log.exception("credential renewal pass failed")

    def mounted(self, rec: RafsRecord, creds: Credentials) -> None:
        """``rec``'s daemon was just given ``creds`` with the mount: no push needed until
        they change (or the daemon does)."""
        live = self.fs.live_daemon(rec.daemon_id)
        if live is not None and live.record.pid:
            self._pushed[rec.snapshot_id] = (live.record.pid, credential_key(creds))

    def renew_all(self) -> None:
        """One pass over the instances; each image's sources are asked once."""
        t0 = time.monotonic()
        lookups: dict[str, Lookup] = {}
        tracked: dict[str, int] = {}
        targets = self.fs.renewal_targets()
        live_sids = {r.snapshot_id for r in targets}
        for sid in list(self._pushed):
            if sid not in live_sids:
                del self._pushed[sid]
        for rec in targets:
            if self._stop.is_set():
                return
            lookup = lookups.get(rec.image_ref)
            if lookup is None:
                lookup = lookups[rec.image_ref] = self.keychain.lookup(rec.image_ref,
                                                                       renewable_only=True)
            tracked[rec.image_ref] = tracked.get(rec.image_ref, 0) + 1
            self._renew(rec, lookup)
        self.stats.tracked = tracked
        self.stats.passes += 1
        self.stats.last_pass_seconds = time.monotonic() - t0
        log.debug("credential renewal pass: %d instances of %d images in %.1f ms",
                  len(targets), len(lookups), self.stats.last_pass_seconds * 1000)

    def _renew(self, rec: RafsRecord, lookup: Lookup) -> None:
        sid, image = rec.snapshot_id, rec.image_ref
        what = f"credential renewal of image {q(image)} (snapshot {sid})"
        if lookup.found is None:
            log.warning("%s failed: no renewable source has credentials for it (%s); its "
                        "daemon keeps those from %s until the registry refuses them",
                        what, lookup.explain(), rec.credential_source or "the mount")
            self.stats.count(image, False)
            return
        creds = lookup.found.credentials
        with self.fs.instance_lock(sid):
            if self.fs.current(sid) is not rec:
                return  # unmounted (or mounted anew) meanwhile
            try:
                self._write_config(rec, creds)
                self._push(rec, creds)
            except (NydusError, OSError, ValueError) as err:
                log.warning("%s: the credentials from %s could not be handed to its daemon "
                            "%s: %s", what, lookup.found.source, rec.daemon_id, err)
                self.stats.count(image, False)
                return
        self.stats.count(image, True)

    def _write_config(self, rec: RafsRecord, creds: Credentials) -> None:
        with open(rec.config_path, encoding="utf-8") as f:
            cfg: dict[str, Any] = json.load(f)
        bcfg = cfg.get("device", {}).get("backend", {}).get("config")
        if isinstance(bcfg, dict) and set_credentials(bcfg, creds):
            write_config(rec.config_path, cfg)

    def _push(self, rec: RafsRecord, creds: Credentials) -> None:
        live = self.fs.live_daemon(rec.daemon_id)
        if live is None or live.state != "RUNNING" or not live.record.pid:
            return  # a daemon (re)starting reads the file; pushed on a later pass
        key = (live.record.pid, credential_key(creds))
        if self._pushed.get(rec.snapshot_id) == key:
            return
        client = DaemonClient(live.record.api_socket, PUSH_TIMEOUT)
        sub = os.path.relpath(rec.mountpoint, live.record.mountpoint)
        mount_id = None if sub == "." else f"/{sub}"  # the image at "/" of its daemon
        if creds.registry_token:
            client.update_token(creds.registry_token, mount_id)
        elif creds.has_basic:
            client.update_auth(creds.auth_string(), mount_id)
        else:
            return  # an identity token: nothing a daemon can use (set_credentials said so)
        self._pushed[rec.snapshot_id] = key
        self.stats.pushes += 1
        log.info("credential renewal: daemon %s of image %s has new credentials",
                 rec.daemon_id, q(rec.image_ref))

    def metrics(self) -> Iterator[tuple[str, str, int]]:
        """(image_ref, result, count) for upstream's renewal counter."""
        for image, n in sorted(self.stats.successes.items()):
            yield image, "success", n
        for image, n in sorted(self.stats.failures.items()):
            yield image, "failure", n
