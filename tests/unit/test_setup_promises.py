"""What ``scripts/setup.sh`` promises is on this machine.

setup.sh installs the Debian packages of its ``PKGS`` list; tests need the programs of
``tests/harness/tools.py``. These tests fail, naming the package or program, when a
package setup promises is not installed, when one of its programs is gone, or when a
program tests run comes from a package setup does not install. Together with
``tools.require`` (a missing program fails the test that needs it) this makes a machine
prepared by setup.sh run the whole suite without a skip for a missing install step.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import peers, tools
from tests.harness.paths import REPO

SELF = Path(__file__).resolve()  # its own made-up programs are not run


def test_pkgs_is_parsed_from_setup_sh() -> None:
    text = 'x\nPKGS=(a b   # comment ( with ) parens\n      c)  # tail\nmore\n'
    assert tools.setup_packages(text) == ["a", "b", "c"]
    text = 'PKGS=(a   # a comment ending in (a parenthesis)\n  b c)  # tail (x)\n'
    assert tools.setup_packages(text) == ["a", "b", "c"]
    pkgs = tools.setup_packages()
    assert "containerd" in pkgs and len(pkgs) == len(set(pkgs)) > 10


def test_every_tool_tests_run_comes_from_a_package_setup_installs() -> None:
    pkgs = set(tools.setup_packages())
    absent = sorted({f"{prog} ({pkg})" for prog, pkg in tools.TOOLS.items() if pkg not in pkgs})
    assert not absent, f"add these packages to scripts/setup.sh PKGS: {absent}"


def test_every_program_tests_and_benches_run_is_in_tools() -> None:
    """A new ``subprocess.run(["prog", ...])``, ``shutil.which("prog")`` or ``require``
    in tests/, bench/, scripts/ or fuzz/ fails here until ``prog`` is in TOOLS with its
    package (and so in setup.sh), or one the venv has (OWN)."""
    found = tools.programs_run(REPO / d for d in ("tests", "bench", "scripts", "fuzz"))
    known = set(tools.TOOLS) | tools.OWN
    unknown = {prog: where[:3] for prog, where in found.items() if prog not in known
               and not all(w.startswith(f"{SELF}:") for w in where)}
    assert not unknown, f"add to tests/harness/tools.py TOOLS (program: package): {unknown}"
    assert {"umoci", "fincore", "debootstrap", "pigz", "openssl"} <= set(found)  # it sees them


def test_the_program_scan_sees_each_way_of_running_a_program(tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text(
        "import shutil, subprocess\nfrom tests.harness import tools\n"
        "subprocess.run(['prog-a', '-x'])\nsubprocess.Popen(('prog-b',))\n"
        "subprocess.check_output(['prog-c'])\nshutil.which('prog-d')\n"
        "tools.require('prog-e', 'prog-f')\nx = 'a,b'.find('not-a-prog')\n"
        "subprocess.run([exe, 'prog-g'])\n")
    assert sorted(tools.programs_run([tmp_path])) == [f"prog-{c}" for c in "abcdef"]


def _optional_peers() -> set[str]:
    """scripts/peers.sh's OPTIONAL list: peers whose install may fail (reported)."""
    m = re.search(r'^OPTIONAL="([^"]*)"', (REPO / "scripts" / "peers.sh").read_text(), re.MULTILINE)
    assert m is not None, "scripts/peers.sh has no OPTIONAL=\"...\" line"
    return set(m.group(1).split())


PEER_PROGRAMS = sorted(tools.peer_programs_run([REPO / "tests", REPO / "bench"]))


def test_the_peer_scan_sees_the_peers() -> None:
    assert ("nydus-rs", "nydusd") in PEER_PROGRAMS and ("h2spec", "h2spec") in PEER_PROGRAMS
    assert {name for name, _ in PEER_PROGRAMS} <= set(peers.pins()), PEER_PROGRAMS


@pytest.mark.parametrize("peer,program", [pp for pp in PEER_PROGRAMS
                                          if pp[0] not in _optional_peers()])
def test_peer_program_tests_run_is_installed(peer: str, program: str) -> None:
    """scripts/test.sh installs every peer (setup.sh --peers); peer_bin fails naming
    scripts/peers.sh when one a test or bench runs is missing."""
    peers.peer_bin(peer, program)


@pytest.mark.parametrize("package", tools.setup_packages())
def test_package_setup_promises_is_installed(package: str) -> None:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True,
                       text=True, check=False)
    assert "install ok installed" in r.stdout, (
        f"Debian package {package} (scripts/setup.sh PKGS) is not installed: run scripts/setup.sh")
    gone = [str(p) for p in tools.package_programs(package) if not os.path.exists(p)]
    assert not gone, f"{package} is installed but its programs are missing: {gone}"


@pytest.mark.parametrize("program", sorted(tools.TOOLS))
def test_program_tests_run_is_present(program: str) -> None:
    tools.require(program)


def test_require_fails_naming_program_and_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tools.TOOLS, "/nonexistent/pyn-tool", "pyn-package")
    with pytest.raises(tools.MissingTool, match=r"/nonexistent/pyn-tool \(Debian package pyn-package\)"):
        tools.require("/nonexistent/pyn-tool")
    with pytest.raises(KeyError, match="TOOLS"):
        tools.require("not-a-known-tool")


def test_profiler_the_benches_run_is_in_the_venv() -> None:
    # bench/lazy_pull.py --profile and bench/daemon_ab.py --spy run py-spy beside the
    # interpreter; the test extra installs it
    spy = Path(sys.executable).with_name("py-spy")
    assert spy.exists(), f"{spy} is missing: pip install -e '.[test]' (scripts/setup.sh)"
    r = subprocess.run([str(spy), "--version"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.startswith("py-spy 0."), r.stdout + r.stderr
