"""Where the upstream "peer" programs are: the ones ``scripts/peers.sh`` installs.

The pins live in ``scripts/peers.lock`` (``NAME VERSION`` lines), read here and by the
script alike; each peer sits in ``$PYNYDUS_PEERS_CACHE/NAME-VERSION/bin`` (default
``/var/cache/pynydus/peers``). A missing peer raises :class:`PeerMissing`, so a test
that needs one fails, naming the command that installs it, instead of skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "scripts" / "peers.lock"
DEFAULT_CACHE = Path("/var/cache/pynydus/peers")


class PeerMissing(FileNotFoundError):
    """A pinned peer program is not installed in the cache."""


def cache_dir() -> Path:
    return Path(os.environ.get("PYNYDUS_PEERS_CACHE") or DEFAULT_CACHE)


def pins(lock: Path = LOCK) -> dict[str, str]:
    """``{name: version}`` from ``scripts/peers.lock``."""
    out: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#"):
            out[fields[0]] = fields[1]
    return out


def peer_dir(name: str) -> Path:
    """The bin directory of peer ``name`` at its pinned version (may not exist)."""
    versions = pins()
    if name not in versions:
        raise KeyError(f"no peer {name!r} in {LOCK} (known: {', '.join(versions)})")
    return cache_dir() / f"{name}-{versions[name]}" / "bin"


def peer_bin(name: str, program: str) -> Path:
    """Path of ``program`` from peer ``name``, e.g. ``peer_bin("nydus-rs", "nydusd")``."""
    path = peer_dir(name) / program
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise PeerMissing(
            f"peer {name} {pins()[name]}: {path} is not installed; "
            f"run scripts/peers.sh {name} (or scripts/setup.sh --peers)"
        )
    return path
