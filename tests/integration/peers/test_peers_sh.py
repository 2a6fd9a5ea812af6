"""``scripts/peers.sh``: pinned peers installed by name into a cache, a second run that
builds nothing, one line per peer saying what and where, and a failure that names the
peer and exits non-zero.

The registries are made unreachable for real (``GOPROXY=off``, ``CARGO_NET_OFFLINE``):
a run that only reports what is cached must not need them, and a peer that has to be
fetched then fails the way a registry outage fails it.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.peers import REPO, cache_dir, peer_dir, pins
from tests.harness.util import make_workdir, remove_tree

PEERS_SH = REPO / "scripts" / "peers.sh"
OPTIONAL = {"nydusify"}  # scripts/peers.sh OPTIONAL: reported, never fatal
OFFLINE = {"GOPROXY": "off", "CARGO_NET_OFFLINE": "true"}


def peers_sh(*args: str, cache: Path | None = None
             ) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the script with the registries unreachable; returns its result and the CPU
    seconds it and its children used (a loaded machine stretches wall time, not CPU)."""
    env = {**os.environ, **OFFLINE}
    env.pop("PYNYDUS_PEERS_RETRY", None)
    if cache is not None:
        env["PYNYDUS_PEERS_CACHE"] = str(cache)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(["bash", str(PEERS_SH), *args], capture_output=True, text=True,
                       env=env, timeout=900, check=False, stdin=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return r, cpu


@pytest.fixture
def cache() -> Iterator[Path]:
    d = make_workdir("peers")
    try:
        yield d / "cache"
    finally:
        remove_tree(d)


def mirror_of_the_machines_cache(cache: Path) -> None:
    """The installed peers of the machine's cache (filled by ``scripts/setup.sh --peers``
    before the suite), hard-linked into ``cache``: the script runs on the same files but
    can never replace or remove the machine's own."""
    cache.mkdir(parents=True)
    for entry in cache_dir().iterdir():
        if entry.name.startswith(("_", ".")):
            continue  # build caches, locks and half-built peers
        if entry.is_dir():
            shutil.copytree(entry, cache / entry.name, symlinks=True, copy_function=_link)
        else:
            _link(entry, cache / entry.name)


def _link(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: a copy protects the original just as well
        shutil.copy2(src, dst)


def test_second_run_finds_every_pin_cached_and_prints_where_without_a_registry(
        cache: Path) -> None:
    """Every pinned peer is reported as cached with its bin directory, nothing is built,
    and the run needs no registry and costs well under a second of CPU."""
    mirror_of_the_machines_cache(cache)
    r, cpu = peers_sh(cache=cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installing" not in r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for name, version in pins().items():
        if name in OPTIONAL:
            assert any(ln.startswith((f"{name}: not installable by name: ", f"{name} "))
                       for ln in lines), r.stdout
            continue
        where = cache / f"{name}-{version}" / "bin"
        line = next((ln for ln in lines if ln.split()[:1] == [name]), None)
        assert line is not None, f"no line for {name}:\n{r.stdout}"
        assert line.split()[1:3] == [version, str(where)], line
        assert "(cached" in line, line
        assert any(p.is_file() and os.access(p, os.X_OK) for p in where.iterdir())
    assert re.search(r"^peers: ok in \d+s \(cache: " + re.escape(str(cache)) + r"\)$",
                     r.stdout, re.MULTILINE), r.stdout
    assert cpu < 5, f"a cached run used {cpu:.1f} CPU s"


def test_cached_peer_is_skipped_and_its_first_install_time_reported(cache: Path) -> None:
    """A peer already in the cache is not fetched again (the registry is off, so an
    attempt would fail) and the line says how long its first install took."""
    version = pins()["h2spec"]
    src = peer_dir("h2spec").parent
    dst = cache / f"h2spec-{version}"
    shutil.copytree(src, dst, symlinks=True)
    (dst / ".installed").write_text("seconds=123 installed=2026-12-07T00:00:00Z\n")
    r, _ = peers_sh("h2spec", cache=cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0].split() == [
        "h2spec", version, str(dst / "bin"), "(cached;", "first", "install", "took", "123s)"]
    assert not (cache / "_logs" / f"h2spec-{version}.log").exists()


def test_failed_peer_is_named_and_the_run_exits_non_zero(cache: Path) -> None:
    """A required peer the registry cannot deliver fails the run, named on stderr with
    the end of its build log; nothing half-built is left in the cache."""
    version = pins()["h2spec"]
    r, _ = peers_sh("h2spec", cache=cache)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"peers: FAILED: h2spec {version}; last lines of" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == "peers: FAILED: h2spec"
    assert "GOPROXY=off" in r.stderr  # the log's tail says why
    assert not (cache / f"h2spec-{version}").exists()
    assert not list(cache.glob(".h2spec-*.partial"))
    assert "GOPROXY=off" in (cache / "_logs" / f"h2spec-{version}.log").read_text()


def test_optional_peer_failure_is_reported_remembered_and_not_fatal(cache: Path) -> None:
    """nydusify (optional): a failure prints the reason, keeps it in
    NAME-VERSION.unavailable, exits 0, and a second run reports it without retrying."""
    version = pins()["nydusify"]
    r, _ = peers_sh("nydusify", cache=cache)
    assert r.returncode == 0, r.stdout + r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("nydusify:")]
    assert line.startswith("nydusify: not installable by name: ") and "GOPROXY=off" in line
    unavailable = cache / f"nydusify-{version}.unavailable"
    assert unavailable.read_text().strip() in line
    log = cache / "_logs" / f"nydusify-{version}.log"
    size = log.stat().st_size
    again, _ = peers_sh("nydusify", cache=cache)
    assert again.returncode == 0
    assert line in again.stdout.splitlines()
    assert "installing" not in again.stdout
    assert log.stat().st_size == size  # not tried again


def test_unknown_peer_is_refused_by_name(cache: Path) -> None:
    r, _ = peers_sh("nydus-nonesuch", cache=cache)
    assert r.returncode == 2
    assert "unknown peer 'nydus-nonesuch'" in r.stderr
    assert not cache.exists()  # refused before anything is touched
