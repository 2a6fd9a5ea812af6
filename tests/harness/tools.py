"""The programs tests and benchmark smoke tests run, and the Debian package of each.

``scripts/setup.sh`` installs every package named here (its ``PKGS`` list; the guard test
``tests/unit/test_setup_promises.py`` checks both directions). A test that needs one of
these programs calls ``require``: a missing program is a *failure* naming the program and
the package, never a skip, because a machine prepared by setup.sh always has it.
"""

from __future__ import annotations

import os
import re
import shutil
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
    "skopeo": "skopeo",
    "umoci": "umoci",
    "mount": "mount",
    "umount": "mount",
    "unshare": "util-linux",
    "taskset": "util-linux",
    "curl": "curl",
    "/bin/busybox": "busybox-static",
    "/usr/bin/ctr-remote": "stargz-snapshotter",
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
}

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
    m = re.search(r"^PKGS=\((.*?)\)\s*(?:#.*)?$", text, re.DOTALL | re.MULTILINE)
    if m is None:
        raise ValueError("scripts/setup.sh has no PKGS=( ... ) array")
    body = "\n".join(line.split("#", 1)[0] for line in m.group(1).splitlines())
    return body.split()


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
