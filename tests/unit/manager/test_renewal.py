"""Credential renewal's decisions, with a fake filesystem and daemon client: what is asked,
what is written and pushed where, what counts as a failure (the daemons and the real
sources: tests/integration/nydus/test_credential_renewal.py)."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pynydus.errors import Unavailable
from pynydus.manager import renewal as R
from pynydus.manager.daemonconfig import write_config
from pynydus.manager.store import DaemonRecord, RafsRecord
from pynydus.registry.credentials import Credentials
from pynydus.registry.exechelper import CredentialSourceError
from pynydus.registry.keychain import CallableSource, Found, Keychain, LabelSource
from pynydus.registry.reference import Reference

IMAGE = "reg.io/app:1"


@dataclass
class Live:
    record: DaemonRecord
    state: str = "RUNNING"


@dataclass
class FakeFs:
    instances: dict[str, RafsRecord] = field(default_factory=dict)
    daemons: dict[str, Live] = field(default_factory=dict)
    locks: dict[str, threading.Lock] = field(default_factory=dict)

    def renewal_targets(self) -> list[RafsRecord]:
        return [r for r in self.instances.values() if r.credentials_renewable]

    def instance_lock(self, sid: str) -> threading.Lock:
        return self.locks.setdefault(sid, threading.Lock())

    def current(self, sid: str) -> RafsRecord | None:
        return self.instances.get(sid)

    def live_daemon(self, daemon_id: str) -> Any:
        return self.daemons.get(daemon_id)


class Pushes:
    """Stands in for DaemonClient: records (socket, kind, value, mount id)."""

    calls: ClassVar[list[tuple[str, str, str, str | None]]] = []
    refuse = False

    def __init__(self, sock: str, timeout: float) -> None:
        self.sock = sock

    def update_auth(self, auth: str, sid: str | None = None) -> None:
        if Pushes.refuse:
            raise Unavailable("daemon API PUT /api/v1/config: HTTP 400: no")
        Pushes.calls.append((self.sock, "auth", auth, sid))

    def update_token(self, token: str, sid: str | None = None) -> None:
        Pushes.calls.append((self.sock, "token", token, sid))


@pytest.fixture(autouse=True)
def pushes(monkeypatch: pytest.MonkeyPatch) -> type[Pushes]:
    Pushes.calls, Pushes.refuse = [], False
    monkeypatch.setattr(R, "DaemonClient", Pushes)
    return Pushes


class Rotating:
    """A renewable source whose answer the test sets (None: nothing; an exception: fails)."""

    def __init__(self) -> None:
        self.answer: Credentials | Exception | None = Credentials("u", "pw1")
        self.asked = 0

    def __call__(self, ref: Reference) -> Found | None:
        self.asked += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return None if self.answer is None else Found(self.answer, "rotating source",
                                                      renewable=True)


def instance(tmp_path: Path, fs: FakeFs, sid: str, *, shared: bool = False,
             pid: int = 100) -> RafsRecord:
    creds = Credentials("u", "pw1")
    did = "shared_daemon" if shared else f"d{sid}"
    dmp = str(tmp_path / "mnt") if shared else str(tmp_path / sid / "mnt")
    fs.daemons.setdefault(did, Live(DaemonRecord(did, "shared" if shared else "dedicated",
                                                 dmp, f"/run/{did}.sock", "", "", "", pid=pid)))
    cfg_path = tmp_path / "cfg" / sid / "config.json"
    write_config(str(cfg_path), {"device": {"backend": {"type": "registry", "config": {
        "host": "reg.io", "repo": "app", "auth": creds.auth_string()}}}})
    rec = RafsRecord(sid, did, IMAGE, str(tmp_path / sid), os.path.join(dmp, sid) if shared
                     else dmp, "/b", str(cfg_path), credential_source="rotating source",
                     credentials_renewable=True)
    fs.instances[sid] = rec
    return rec


def backend(rec: RafsRecord) -> dict[str, Any]:
    return json.loads(Path(rec.config_path).read_text())["device"]["backend"]["config"]


def test_new_credentials_go_to_the_file_and_the_daemon_in_both_modes(tmp_path: Path) -> None:
    fs, src = FakeFs(), Rotating()
    ded = instance(tmp_path, fs, "1")
    shr = instance(tmp_path, fs, "2", shared=True)
    ren = R.CredentialRenewal(fs, Keychain([LabelSource(), CallableSource(
        "rotating", src, renewable=True)]), 2.0)
    ren.mounted(ded, Credentials("u", "pw1"))
    ren.mounted(shr, Credentials("u", "pw1"))
    ren.renew_all()
    assert Pushes.calls == [] and src.asked == 1  # unchanged; one lookup per image
    src.answer = Credentials("u", "pw2")
    ren.renew_all()
    want = Credentials("u", "pw2").auth_string()
    assert Pushes.calls == [("/run/d1.sock", "auth", want, None),  # the image at "/"
                            ("/run/shared_daemon.sock", "auth", want, "/2")]
    for rec in (ded, shr):
        assert backend(rec)["auth"] == want
        assert stat.S_IMODE(os.stat(rec.config_path).st_mode) == 0o600
    assert ren.stats.successes == {IMAGE: 4} and ren.stats.failures == {}
    assert ren.stats.tracked == {IMAGE: 2}
    ren.renew_all()
    assert len(Pushes.calls) == 2  # pushed once per change


def test_a_daemon_restarted_since_gets_them_again_and_a_bearer_token_goes_as_such(
        tmp_path: Path) -> None:
    fs, src = FakeFs(), Rotating()
    rec = instance(tmp_path, fs, "1")
    ren = R.CredentialRenewal(fs, Keychain([CallableSource("r", src, renewable=True)]), 2.0)
    ren.renew_all()  # after a snapshotter restart nothing is known: pushed once
    assert len(Pushes.calls) == 1
    fs.daemons["d1"].record.pid = 101  # restarted / taken over
    ren.renew_all()
    assert len(Pushes.calls) == 2
    fs.daemons["d1"].state = "STARTING"
    src.answer = Credentials(registry_token="jwt-2")
    ren.renew_all()  # the file changes now, the daemon once it runs
    assert len(Pushes.calls) == 2 and backend(rec)["registry_token"] == "jwt-2"
    assert "auth" not in backend(rec)
    fs.daemons["d1"].state = "RUNNING"
    ren.renew_all()
    assert Pushes.calls[-1] == ("/run/d1.sock", "token", "jwt-2", None)


def test_failures_are_counted_and_logged_without_the_secret(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fs, src = FakeFs(), Rotating()
    rec = instance(tmp_path, fs, "7")
    ren = R.CredentialRenewal(fs, Keychain([CallableSource("r", src, renewable=True)]), 2.0)
    src.answer = CredentialSourceError("docker-credential-x: exited with status 2: down")
    with caplog.at_level(logging.WARNING):
        ren.renew_all()
    assert ren.stats.failures == {IMAGE: 1} and not Pushes.calls
    assert f'credential renewal of image "{IMAGE}" (snapshot 7) failed: no renewable ' \
        "source has credentials for it" in caplog.text
    assert "docker-credential-x: exited with status 2: down" in caplog.text
    assert backend(rec)["auth"] == Credentials("u", "pw1").auth_string()  # kept
    src.answer = Credentials("u", "secret-pw3")
    Pushes.refuse = True
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ren.renew_all()
    assert ren.stats.failures == {IMAGE: 2}
    assert "could not be handed to its daemon d7" in caplog.text
    assert "secret-pw3" not in caplog.text
    assert list(ren.metrics()) == [(IMAGE, "failure", 2)]


def test_static_and_gone_instances_are_left_alone(tmp_path: Path) -> None:
    fs, src = FakeFs(), Rotating()
    rec = instance(tmp_path, fs, "1")
    rec.credentials_renewable = False  # the labels' credentials
    ren = R.CredentialRenewal(fs, Keychain([CallableSource("r", src, renewable=True)]), 2.0)
    ren.renew_all()
    assert src.asked == 0 and not Pushes.calls
    rec.credentials_renewable = True

    class Vanishing(FakeFs):
        def current(self, sid: str) -> RafsRecord | None:
            return None  # unmounted while the sources were asked
    gone = Vanishing(fs.instances, fs.daemons)
    R.CredentialRenewal(gone, Keychain([CallableSource("r", src, renewable=True)]),
                        2.0).renew_all()
    assert not Pushes.calls


def test_the_loop_runs_every_interval_and_stops(tmp_path: Path) -> None:
    fs, src = FakeFs(), Rotating()
    instance(tmp_path, fs, "1")
    ren = R.CredentialRenewal(fs, Keychain([CallableSource("r", src, renewable=True)]), 0.05)
    ren.start()
    try:
        deadline = threading.Event()
        for _ in range(200):
            if ren.stats.passes >= 3:
                break
            deadline.wait(0.05)
        assert ren.stats.passes >= 3
    finally:
        ren.close()
    passes = ren.stats.passes
    threading.Event().wait(0.2)
    assert ren.stats.passes == passes
