"""containerd's registry host configuration: ``<dir>/<host>/hosts.toml`` (``certs.d``).

The layout is containerd's (``core/remotes/docker/config/hosts.go``), so one directory
can serve containerd (``config_path``) and the snapshotter
(``[remote.mirrors_config] dir``):

* the directory of registry ``host`` is ``<dir>/<host>_<port>_`` for ``host:port``
  (``:`` is awkward in paths), else ``<dir>/<host>``, else ``<dir>/_default``;
* ``hosts.toml`` in it has an optional top-level ``server`` (the registry itself, default
  ``https://<host>``) with its own TLS keys, and ``[host."<url>"]`` tables, tried in file
  order before the server: the mirrors. Keys: ``capabilities`` (``pull``, ``resolve``,
  ``push``, ``referrers``; default all), ``ca`` (a path or a list), ``client`` (a path to a
  PEM holding certificate and key, or ``[cert, key]`` pairs, or a list of either),
  ``skip_verify``, ``header`` (values a string or a list), ``override_path`` (the URL's
  path is the API root instead of ``<path>/v2``), ``dial_timeout`` (a Go duration);
  relative paths are relative to the host's directory;
* without ``hosts.toml`` the directory is docker's ``certs.d`` layout: ``*.crt`` are CAs,
  ``*.cert`` client certificates with their ``*.key``, all for the registry itself;
* upstream Nydus adds ``health_check_interval`` (seconds), ``failure_limit`` and
  ``ping_url`` to a host table, for mirror failover in the daemon.

Deliberate differences: containerd ignores keys it does not know; here an unknown key
is an error naming the file and the key, with the nearest known key (a typo in a mirror
file should not silently send every read to the registry). Parsing is sans-I/O
(:func:`parse_hosts`); :func:`load_hosts` reads the directory.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pynydus.confschema import parse_go_duration
from pynydus.errors import ConfigError

CAPABILITIES = ("pull", "resolve", "push", "referrers")
HOSTS_FILE = "hosts.toml"
DEFAULT_DIR = "_default"

_TLS_KEYS = ("ca", "client", "skip_verify")
_HOST_KEYS = ("capabilities", *_TLS_KEYS, "header", "override_path", "dial_timeout",
              "health_check_interval", "failure_limit", "ping_url")
_TOP_KEYS = ("server", *_HOST_KEYS, "host")
@dataclass(frozen=True)
class HostEntry:
    """One registry endpoint of a ``hosts.toml``: a mirror, or the server itself.

    ``url``: ``scheme://host[:port]``; ``root``: the API root path (``/v2``, or the
    URL's own path with ``override_path``); ``client``: (certificate, key) pairs, the key
    "" when it is in the certificate's file; ``skip_verify``/``dial_timeout``/the Nydus
    keys: None when not set."""

    url: str
    root: str = "/v2"
    capabilities: frozenset[str] = frozenset(CAPABILITIES)
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()
    skip_verify: bool | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    dial_timeout: float | None = None
    health_check_interval: int | None = None
    failure_limit: int | None = None
    ping_url: str = ""

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def netloc(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def has_tls(self) -> bool:
        return bool(self.ca or self.client) or self.skip_verify is not None


@dataclass(frozen=True)
class HostsConfig:
    """What one registry's directory says: its mirrors (host tables in file order) and
    the registry endpoint itself (``server`` with the top-level keys; ``url`` is "" when
    the file does not name a server, i.e. the registry's own default)."""

    source: str
    mirrors: tuple[HostEntry, ...] = ()
    server: HostEntry = field(default_factory=lambda: HostEntry(""))

    def pull_mirrors(self) -> tuple[HostEntry, ...]:
        """The mirrors that may serve blob reads (capability ``pull``)."""
        return tuple(m for m in self.mirrors if "pull" in m.capabilities)


def host_dir_candidates(root: str, host: str) -> list[str]:
    """Where containerd looks for ``host``'s directory, in order."""
    out = []
    i = host.rfind(":")
    if i > 0 and not host.endswith("]"):
        out.append(os.path.join(root, f"{host[:i]}_{host[i + 1:]}_"))
    out += [os.path.join(root, host), os.path.join(root, DEFAULT_DIR)]
    return out


def _err(source: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {msg}")


def _unknown(source: str, where: str, key: str, known: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return ConfigError(f'{source}: {where}unknown key "{key}"{hint}; known keys: '
                       f"{', '.join(known)}")


def _strings(source: str, key: str, value: object, *, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _err(source, key, f"expected {what} (a string or a list of strings), "
                            f"got {type(value).__name__}")


def _abs(path: str, base: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def _entry(source: str, where: str, url: str, raw: Mapping[str, Any], base: str,
           known: tuple[str, ...]) -> HostEntry:
    prefix = where + "." if where else ""
    for key in raw:
        if key not in known:
            raise _unknown(source, f"{where}: " if where else "", key, known)

    def k(name: str) -> str:
        return prefix + name

    root = "/v2"
    if url:
        full = url if "://" in url else "https://" + url
        u = urlsplit(full)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise _err(source, where or "server", f"{url!r} is not an http(s) URL or host")
        override = raw.get("override_path", False)
        if not isinstance(override, bool):
            raise _err(source, k("override_path"), "expected a boolean")
        path = os.path.normpath(u.path).rstrip("/") if u.path not in ("", "/") else ""
        if override:
            root = path or "/"
        else:
            root = path if path.endswith("/v2") else path + "/v2"
        url = f"{u.scheme}://{u.netloc}"
    caps = raw.get("capabilities")
    capabilities = frozenset(CAPABILITIES)
    if caps is not None:
        names = [c.lower() for c in _strings(source, k("capabilities"), caps,
                                              what="capability names")]
        for c in names:
            if c not in CAPABILITIES:
                raise _err(source, k("capabilities"), f"unknown capability {c!r} "
                                                      f"(known: {', '.join(CAPABILITIES)})")
        capabilities = frozenset(names)
    ca = tuple(_abs(p, base) for p in _strings(source, k("ca"), raw["ca"], what="CA files")) \
        if "ca" in raw else ()
    client: list[tuple[str, str]] = []
    if "client" in raw:
        value = raw["client"]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise _err(source, k("client"), "expected a path, a [cert, key] pair or a list")
        for item in items:
            if isinstance(item, str):
                client.append((_abs(item, base), ""))
            elif isinstance(item, list) and len(item) == 2 and \
                    all(isinstance(p, str) for p in item):
                client.append((_abs(item[0], base), _abs(item[1], base)))
            else:
                raise _err(source, k("client"), f"invalid entry {item!r}: want a path or "
                                                "a [certificate, key] pair")
    skip = raw.get("skip_verify")
    if skip is not None and not isinstance(skip, bool):
        raise _err(source, k("skip_verify"), "expected a boolean")
    headers: dict[str, str] = {}
    if "header" in raw:
        if not isinstance(raw["header"], dict):
            raise _err(source, k("header"), "expected a table of header names")
        for name, value in raw["header"].items():
            headers[name] = ", ".join(_strings(source, k(f"header.{name}"), value,
                                               what="header values"))
    dial: float | None = None
    if "dial_timeout" in raw:
        try:
            dial = parse_go_duration(str(raw["dial_timeout"])) if \
                isinstance(raw["dial_timeout"], str) else None
        except ValueError:
            dial = None
        if dial is None or dial < 0:
            raise _err(source, k("dial_timeout"), f"expected a duration such as \"5s\", got "
                                                  f"{raw['dial_timeout']!r}")
    ints: dict[str, int | None] = {}
    for name, low in (("health_check_interval", 0), ("failure_limit", 1)):
        v = raw.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise _err(source, k(name), f"expected an integer >= {low}, got {v!r}")
        ints[name] = v
    ping = raw.get("ping_url", "")
    if not isinstance(ping, str):
        raise _err(source, k("ping_url"), "expected a URL string")
    return HostEntry(url=url, root=root, capabilities=capabilities, ca=ca,
                     client=tuple(client), skip_verify=skip, headers=headers,
                     dial_timeout=dial, health_check_interval=ints["health_check_interval"],
                     failure_limit=ints["failure_limit"], ping_url=ping)


def parse_hosts(data: bytes | str, source: str, base: str) -> HostsConfig:
    """Parse the text of a ``hosts.toml`` (``source`` names it in errors; relative paths
    are taken from ``base``). Host tables keep their file order (Python's dicts keep
    TOML's). ConfigError names the file, the key and what was wrong."""
    text = data.decode() if isinstance(data, bytes) else data
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: TOML syntax error: {err}") from err
    top = {k: v for k, v in doc.items() if k not in ("server", "host")}
    for key in doc:
        if key not in _TOP_KEYS:
            raise _unknown(source, "", key, _TOP_KEYS)
    server_url = doc.get("server", "")
    if not isinstance(server_url, str):
        raise _err(source, "server", "expected a URL string")
    server = _entry(source, "", server_url, top, base, _HOST_KEYS)
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise _err(source, "host", 'expected tables [host."<url>"]')
    mirrors = []
    for url, raw in hosts.items():
        where = f'host."{url}"'
        if not isinstance(raw, dict):
            raise _err(source, where, "expected a table")
        mirrors.append(_entry(source, where, url, raw, base, _HOST_KEYS))
    return HostsConfig(source=source, mirrors=tuple(mirrors), server=server)


def certs_dir_config(source: str, names: list[str]) -> HostsConfig:
    """Docker's ``certs.d`` layout (no ``hosts.toml``): ``*.crt`` CAs, ``*.cert`` client
    certificates with the ``*.key`` of the same name when present (else the key is in
    the certificate's file), all for the registry itself."""
    ca = tuple(os.path.join(source, n) for n in sorted(names) if n.endswith(".crt"))
    client = []
    for n in sorted(names):
        if n.endswith(".cert"):
            key = n[:-len(".cert")] + ".key"
            client.append((os.path.join(source, n),
                           os.path.join(source, key) if key in names else ""))
    return HostsConfig(source=source, server=HostEntry("", ca=ca, client=tuple(client)))


def load_hosts(root: str, host: str) -> HostsConfig | None:
    """The configuration of registry ``host`` (as written in image references, e.g.
    ``docker.io``, ``127.0.0.1:5000``) under ``root``; None when no directory applies.
    Re-read on every call, so edits apply to the next image, as in containerd."""
    for d in host_dir_candidates(root, host):
        if not os.path.isdir(d):
            continue
        path = os.path.join(d, HOSTS_FILE)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            try:
                names = [n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n))]
            except OSError as err:
                raise ConfigError(f"{d}: cannot list: {err}") from err
            return certs_dir_config(d, names)
        except OSError as err:
            raise ConfigError(f"{path}: cannot read: {err}") from err
        return parse_hosts(data, path, d)
    return None


def check_all(root: str) -> list[str]:
    """Parse every ``<root>/*/hosts.toml``; the errors, one line each (for start-up: a
    broken file is reported at once, and only its registry's images fail to mount)."""
    errors = []
    try:
        names = sorted(os.listdir(root))
    except OSError as err:
        return [f"{root}: cannot list: {err}"]
    for name in names:
        path = os.path.join(root, name, HOSTS_FILE)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                parse_hosts(f.read(), path, os.path.dirname(path))
        except (OSError, ConfigError) as err:
            errors.append(str(err))
    return errors
