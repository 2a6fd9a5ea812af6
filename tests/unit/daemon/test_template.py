"""The daemon template (``pynydusd template``): forks daemons that are what a spawn starts.

A real template process forks a real pynydusd (``--upgrade``: a successor waiting in INIT
behind its API socket, no mount needed); the manager's side (``DaemonTemplate``) adopts,
refuses and falls back.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus import __version__
from pynydus.daemon.template import changed_modules, env_digest, module_stamps
from pynydus.manager import template as T
from pynydus.manager.client import INIT, DaemonClient
from pynydus.manager.manager import resolve_daemon_binary

pytestmark = [pytest.mark.root]


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _sid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[3])


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _fds(pid: int) -> dict[int, str]:
    """The open descriptors of ``pid``; one closed between the listing and its readlink (a
    starting daemon's threads open and close files) is left out."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


@pytest.fixture
def template(tmp_path: Path) -> Iterator[T.DaemonTemplate]:
    t = T.DaemonTemplate(str(tmp_path / "template"), resolve_daemon_binary(""))
    t.start()
    try:
        yield t
    finally:
        t.close()


def _successor_argv(t: T.DaemonTemplate, tmp: Path) -> tuple[list[str], Path]:
    api = tmp / "d1" / "api.sock"
    api.parent.mkdir(parents=True, exist_ok=True)
    return [*t.command, "fuse", "--upgrade", "--apisock", str(api), "--log-file",
            str(tmp / "d1" / "nydusd.log")], api


def test_a_forked_daemon_is_what_a_spawn_starts(template: T.DaemonTemplate,
                                                tmp_path: Path) -> None:
    argv, api = _successor_argv(template, tmp_path)
    stdout = tmp_path / "d1" / "nydusd.log.stderr"
    pid = template.spawn(argv, str(stdout))
    assert pid is not None
    try:
        # the command line ps, the manager's liveness check and its bookkeeping read is
        # the one a spawn of the same argv has
        spawned = subprocess.Popen(argv[:-3] + [str(api) + ".2", "--log-file", os.devnull],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait(lambda: Path(str(api) + ".2").exists(), 30, "the spawned daemon")
            expected = Path(f"/proc/{spawned.pid}/cmdline").read_bytes()
        finally:
            spawned.terminate()
            spawned.wait(timeout=30)
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert raw == expected.replace(str(api).encode() + b".2\0",
                                       str(api).encode() + b"\0").replace(
            os.devnull.encode(), str(tmp_path / "d1" / "nydusd.log").encode())
        assert _ppid(pid) == template.pid  # the template reaps it
        assert _sid(pid) == pid  # a session of its own, as start_new_session
        _wait(api.exists, 15, "the forked daemon's API socket")
        assert DaemonClient(str(api)).state() == INIT
        # only its own descriptors: stdin /dev/null, stdout/stderr the file named, no
        # socket or pipe of the template's
        fds = _fds(pid)
        assert fds[0] == os.devnull and fds[1] == fds[2] == str(stdout)
        theirs = {t for fd, t in _fds(template.pid).items() if fd > 2}
        assert theirs and not theirs & set(fds.values()), (fds, theirs)
        # threads are its own (the template has none)
        assert len(os.listdir(f"/proc/{template.pid}/task")) == 1
    finally:
        os.kill(pid, signal.SIGTERM)
    _wait(lambda: _gone(pid) and not Path(f"/proc/{pid}").exists(), 15,
          "the daemon to exit and be reaped by the template")
    assert f"daemon pid {pid} exited (exit 0)" in Path(template.log_file).read_text()


def test_spawn_refuses_another_command(template: T.DaemonTemplate) -> None:
    assert template.spawn(["/bin/true", "fuse"], os.devnull) is None
    assert template.pid  # not a failure of the template: it keeps serving


def test_a_restarted_snapshotter_adopts_the_template_of_its_version(
        template: T.DaemonTemplate, tmp_path: Path) -> None:
    template.spawn([*template.command, "-V"], os.devnull)  # started and serving
    again = T.DaemonTemplate(template.directory, template.command)
    again.start()
    assert again.pid == template.pid and again.proc is None and again.ready
    hello = T.request(template.control, {"op": "hello"})
    assert hello["version"] == __version__ and hello["exec"][-1] == template.command[-1]


def test_a_template_of_another_version_is_replaced(template: T.DaemonTemplate,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    template.spawn([*template.command, "-V"], os.devnull)
    old = template.pid
    monkeypatch.setattr(T, "__version__", "99.0-newer")
    newer = T.DaemonTemplate(template.directory, template.command)
    assert "runs pynydus" in newer._mismatch(T.request(template.control, {"op": "hello"}))
    newer.start()  # the old one is told to exit; a new one starts
    try:
        assert newer.pid != old and newer.proc is not None
        _wait(lambda: _gone(old), 15, "the old template to exit")
    finally:
        monkeypatch.undo()
        newer.close()


def test_a_dead_template_falls_back_to_spawning(template: T.DaemonTemplate, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    template.spawn([*template.command, "-V"], os.devnull)
    os.kill(template.pid, signal.SIGKILL)
    argv, _ = _successor_argv(template, tmp_path)
    with caplog.at_level(logging.WARNING, logger=T.__name__):
        assert template.spawn(argv, os.devnull) is None
    assert "spawning daemons directly" in caplog.text
    assert template.spawn(argv, os.devnull) is None  # not retried at once
    assert template.failed_at


def test_modules_changed_on_disk_are_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = tmp_path / "pyn_template_probe.py"
    mod.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("pyn_template_probe")

    stamps = module_stamps()
    assert str(mod) in stamps and changed_modules(stamps) == []
    mod.write_text("X = 22\n")
    assert changed_modules(stamps) == [str(mod)]


def test_env_digest_ignores_what_a_daemon_does_not_depend_on() -> None:
    base = {"PATH": "/bin", "HTTPS_PROXY": "http://p:3128"}
    assert env_digest(base) == env_digest({**base, "PYTHONDONTWRITEBYTECODE": "1",
                                           "NOTIFY_SOCKET": "/run/x"})
    assert env_digest(base) != env_digest({**base, "HTTPS_PROXY": "http://q:3128"})


def test_the_template_log_rotates_as_the_daemons_logs_without_a_thread(tmp_path: Path) -> None:
    """``template.log`` rotates at the daemons' ``--log-rotation-size`` and keeps as many
    backups as they do; the clean-up runs in the template's own thread (it forks: no
    thread may run in it), so it still serves."""
    directory = tmp_path / "template"
    directory.mkdir()
    log = directory / "template.log"
    log.write_text("x" * (1 << 20) + "\n")  # past 1 MB: the first line rotates it
    for day in range(1, 8):  # older backups than the five kept
        (directory / f"template-2026-01-0{day}T00-00-00.000.log").write_text("old\n")
    t = T.DaemonTemplate(str(directory), resolve_daemon_binary(""), log_rotation_size=1)
    t.start()
    try:
        assert t.spawn([*t.command, "-V"], os.devnull)  # serving: no thread refused it
        assert len(os.listdir(f"/proc/{t.pid}/task")) == 1
        backups = sorted(p.name for p in directory.glob("template-*.log"))
        assert len(backups) == 5
        assert "template-2026-01-07T00-00-00.000.log" in backups  # the newest old ones
        assert "template-2026-01-03T00-00-00.000.log" not in backups
        rotated = [b for b in backups if not b.startswith("template-2026-01-")]
        assert len(rotated) == 1 and (directory / rotated[0]).stat().st_size > 1 << 20
        assert log.stat().st_size < 1 << 20 and "serving" in log.read_text()
        # a snapshotter configured with another rotation does not adopt it
        other = T.DaemonTemplate(str(directory), t.command, log_rotation_size=2)
        hello = T.request(t.control, {"op": "hello"})
        assert hello["log"] == ["info", 1] and "logs at" in other._mismatch(hello)
    finally:
        t.close()
