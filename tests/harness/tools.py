"""The programs tests and benchmark smoke tests run, and the Debian package of each.

``scripts/setup.sh`` installs every package named here (its ``PKGS`` list; the guard test
``tests/unit/test_setup_promises.py`` checks both directions). A test that needs one of
these programs calls ``require``: a missing program is a *failure* naming the program and
the package, never a skip, because a machine prepared by setup.sh always has it.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.harness.paths import REPO

# program (a name looked up in PATH, or an absolute path) -> Debian package that ships it
TOOLS: dict[str, str] = {
    "/usr/bin/containerd": "containerd",
    "/usr/bin/ctr": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "runc": "runc",
    "/usr/bin/docker-registry": "docker-registry",
    "fusermount3": "fuse3",
    "mount.fuse3": "fuse3",
    "mkfs.erofs": "erofs-utils",
    "fsck.erofs": "erofs-utils",
    "mkfs.ext4": "e2fsprogs",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "mount": "mount",
    "umount": "mount",
    "unshare": "util-linux",
    "taskset": "util-linux",
    "curl": "curl",
    "/bin/busybox": "busybox-static",
    "/usr/bin/ctr-remote": "stargz-snapshotter",
    "ctr-remote": "stargz-snapshotter",
    "pigz": "pigz",
    "unpigz": "pigz",
    "debootstrap": "debootstrap",
    "htpasswd": "apache2-utils",
    "gzip": "gzip",
    "tar": "tar",
    "systemd-analyze": "systemd",
    "socat": "socat",
    "openssl": "openssl",
    "veritysetup": "cryptsetup-bin",
    "fincore": "util-linux-extra",
    "git": "git",
    # Debian's Essential packages: on every system, named so that the scan finds them known
    "cp": "coreutils",
    "chown": "coreutils",
    "chroot": "coreutils",
    "nice": "coreutils",
    "timeout": "coreutils",
    "stat": "coreutils",
    "/bin/true": "coreutils",
    "/bin/false": "coreutils",
    "/bin/sleep": "coreutils",
    "sh": "dash",
    "/bin/sh": "dash",
    "bash": "bash",
    "dpkg-query": "dpkg",
}

# Programs in the venv, not installed by apt: this package's ([project.scripts]) and the
# test extra's py-spy (bench/lazy_pull.py --profile, bench/daemon_ab.py --spy).
OWN = {"pynydus", "pynydusd", "nydus-overlayfs", "nydus-image", "nydusctl", "py-spy"}

SETUP_SH = REPO / "scripts" / "setup.sh"


class MissingTool(AssertionError):
    """A program setup.sh promises is not on this machine."""


def find(program: str) -> str | None:
    """Where ``program`` is (absolute paths as given), or None."""
    if os.path.isabs(program):
        return program if os.access(program, os.X_OK) else None
    return shutil.which(program) or next(
        (f"{d}/{program}" for d in ("/usr/sbin", "/sbin") if os.access(f"{d}/{program}", os.X_OK)),
        None)


def missing(*programs: str) -> list[str]:
    """The programs among ``programs`` that are absent, each named with its package."""
    out = []
    for p in programs:
        if p not in TOOLS:
            raise KeyError(f"{p!r} is not in tests/harness/tools.py TOOLS: add it with its package")
        if find(p) is None:
            out.append(f"{p} (Debian package {TOOLS[p]})")
    return out


def require(*programs: str) -> None:
    """Fail (never skip) the calling test when one of ``programs`` is missing."""
    absent = missing(*programs)
    if absent:
        raise MissingTool(f"missing {', '.join(absent)}: run scripts/setup.sh, which installs it")


def setup_packages(text: str | None = None) -> list[str]:
    """The Debian packages of setup.sh's ``PKGS=( ... )`` array (comments dropped)."""
    if text is None:
        text = SETUP_SH.read_text()
    # comments go first, line by line: they may hold parentheses of their own
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    m = re.search(r"^PKGS=\(([^)]*)\)", code, re.MULTILINE)
    if m is None:
        raise ValueError("scripts/setup.sh has no PKGS=( ... ) array")
    return m.group(1).split()


def package_programs(package: str) -> list[Path]:
    """The executables ``package`` installed in the bin directories (dpkg's file list)."""
    listing = Path(f"/var/lib/dpkg/info/{package}.list")
    if not listing.exists():
        arch = list(Path("/var/lib/dpkg/info").glob(f"{package}:*.list"))
        if not arch:
            return []
        listing = arch[0]
    bins = re.compile(r"^/(usr/)?s?bin/[^/]+$")
    return [Path(line) for line in listing.read_text().splitlines() if bins.match(line)]


_RUNS = {"run", "Popen", "check_output", "check_call", "call"}  # argv as the first argument
_LOOKUPS = {"which", "require", "find", "missing"}  # shutil.which, tools.require, ...


def _calls(roots: Iterable[Path]) -> Iterator[tuple[str, ast.Call]]:
    """(``path:line``, call) of every call with arguments in the Python files under ``roots``."""
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and node.args:
                    yield f"{path}:{node.lineno}", node


def programs_run(roots: Iterable[Path]) -> dict[str, list[str]]:
    """Every program named literally by the Python files under ``roots``: the first word
    of an argv list given to ``subprocess.run``/``Popen``/``check_output``/... (or any
    call of those names), and the names given to ``shutil.which`` and ``require``.
    Maps each program to the places (``path:line``) that run it. Argv built from
    variables is not seen; a program reached only that way also goes through ``require``
    or a literal elsewhere in practice."""
    found: dict[str, list[str]] = {}
    for where, node in _calls(roots):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = ("" if not isinstance(func, ast.Attribute)
                 else func.value.id if isinstance(func.value, ast.Name) else "?")
        names: list[ast.expr] = []
        first = node.args[0]
        if name in _RUNS and isinstance(first, (ast.List, ast.Tuple)) and first.elts:
            names = [first.elts[0]]
        elif name in _LOOKUPS and (owner in ("shutil", "tools")
                                   or (owner == "" and name != "find")):
            names = [first] if name == "which" else list(node.args)
        for n in names:
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                found.setdefault(n.value, []).append(where)
    return found


def peer_programs_run(roots: Iterable[Path]) -> dict[tuple[str, str], list[str]]:
    """Every ``peer_bin("peer", "program")`` with literal names under ``roots``, with
    the places that call it."""
    found: dict[tuple[str, str], list[str]] = {}
    for where, node in _calls(roots):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        args = node.args[:2]
        if name == "peer_bin" and len(args) == 2 and all(
                isinstance(a, ast.Constant) and isinstance(a.value, str) for a in args):
            key = (args[0].value, args[1].value)  # type: ignore[attr-defined]
            found.setdefault(key, []).append(where)
    return found
