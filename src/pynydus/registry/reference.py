"""Image references: ``[host[:port]/]path[:tag][@digest]``, parsed and normalised (sans-I/O).

The rules are Docker's, so that a reference means the same registry, repository and
object here as in ``docker pull``, containerd and nydusify:

* The first ``/``-separated component is a registry host only if it contains ``.`` or
  ``:``, is ``localhost``, or has an upper-case letter (paths must be lower case);
  otherwise the image lives on Docker Hub (``docker.io``).
* ``index.docker.io`` is an alias of ``docker.io``; on Docker Hub a single-component
  path is an official image, ``library/<name>``.
* Docker Hub's API is served at ``registry-1.docker.io`` (:attr:`Reference.api_host`),
  while credentials for it are stored under ``https://index.docker.io/v1/``.
* Without tag or digest the tag is ``latest``; with a digest the tag is informational
  and the digest is what is fetched.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from pynydus.errors import InvalidArgument, q

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_LEGACY = "index.docker.io"
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
DEFAULT_TAG = "latest"

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?$")
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_MAX = 255


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``algorithm:hex`` (``sha256`` must be 64 lower-case
    hex digits); raise InvalidArgument otherwise."""
    if not _DIGEST_RE.match(digest):
        raise InvalidArgument(f"invalid digest {q(digest)}: want algorithm:hex")
    if digest.startswith("sha256:") and not _SHA256_RE.match(digest):
        raise InvalidArgument(f"invalid digest {q(digest)}: sha256 needs 64 lower-case hex")
    return digest


def validate_repository(path: str) -> str:
    """Return ``path`` if it is a valid repository path (``ns/name``, lower case)."""
    if not path or len(path) > _NAME_MAX:
        raise InvalidArgument(f"invalid repository {q(path)}: empty or longer than 255")
    for comp in path.split("/"):
        if not _PATH_COMPONENT_RE.match(comp):
            raise InvalidArgument(
                f"invalid repository {q(path)}: component {q(comp)} must be lower-case "
                "alphanumerics separated by '.', '_', '__' or '-'")
    return path


def normalize_host(host: str) -> str:
    """Registry host as used in references: ``index.docker.io`` becomes ``docker.io``."""
    return DOCKER_HUB if host in (DOCKER_HUB_LEGACY, DOCKER_HUB_API) else host


def api_host(host: str) -> str:
    """The host that serves ``/v2/`` for the registry named ``host`` in a reference."""
    return DOCKER_HUB_API if normalize_host(host) == DOCKER_HUB else host


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``[::1]``, with or without a port."""
    name = host
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Reference:
    """A normalised image reference.

    ``domain`` is the registry as written in references (``docker.io``, ``host:5000``),
    ``path`` the repository (``library/alpine``), ``tag`` and ``digest`` optional (the
    parser fills ``tag`` with ``latest`` when neither is given)."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``domain/path``: the fully qualified repository name."""
        return f"{self.domain}/{self.path}"

    @property
    def repository(self) -> str:
        """The repository path used in ``/v2/<repository>/...`` URLs."""
        return self.path

    @property
    def api_host(self) -> str:
        """The host that serves the distribution API (``registry-1.docker.io`` for Hub)."""
        return api_host(self.domain)

    @property
    def object(self) -> str:
        """What to ask ``/manifests/`` for: the digest if there is one, else the tag."""
        if self.digest:
            return self.digest
        return self.tag or DEFAULT_TAG

    @property
    def default_scheme(self) -> str:
        """``http`` for loopback registries (what docker and containerd allow without
        configuration), ``https`` otherwise."""
        return "http" if is_loopback_host(self.domain) else "https"

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=validate_digest(digest))

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.match(tag):
            raise InvalidArgument(f"invalid tag {q(tag)}")
        return replace(self, tag=tag)

    def familiar(self) -> str:
        """The short form docker prints: ``alpine:3.19`` rather than
        ``docker.io/library/alpine:3.19``."""
        name = self.name
        if self.domain == DOCKER_HUB:
            name = self.path[len("library/"):] if self.path.startswith("library/") and \
                self.path.count("/") == 1 else self.path
        return name + self._suffix()

    def _suffix(self) -> str:
        s = f":{self.tag}" if self.tag else ""
        return s + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.name + self._suffix()


def split_domain(name: str) -> tuple[str, str]:
    """Split a repository name into (domain, path) by Docker's rules, normalising
    Docker Hub (alias hosts, ``library/`` prefix)."""
    i = name.find("/")
    first = name[:i] if i >= 0 else ""
    if i < 0 or ("." not in first and ":" not in first and first != "localhost"
                 and first.lower() == first):
        domain, path = DOCKER_HUB, name
    else:
        domain, path = first, name[i + 1:]
    domain = normalize_host(domain)
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return domain, path


def parse_reference(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise ``text``; raise InvalidArgument naming the offending part.

    ``default_tag``: fill in ``latest`` when the reference has neither tag nor digest.
    """
    if not text or text != text.strip():
        raise InvalidArgument(f"invalid reference {q(text)}: empty or surrounded by spaces")
    rest = text
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        validate_digest(digest)
    tag: str | None = None
    # A ':' after the last '/' starts the tag; one before it belongs to host:port.
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.match(tag):
            raise InvalidArgument(f"invalid reference {q(text)}: bad tag {q(tag)}")
    if not rest:
        raise InvalidArgument(f"invalid reference {q(text)}: no repository name")
    domain, path = split_domain(rest)
    if not _DOMAIN_RE.match(domain):
        raise InvalidArgument(f"invalid reference {q(text)}: bad registry host {q(domain)}")
    try:
        validate_repository(path)
    except InvalidArgument as err:
        raise InvalidArgument(f"invalid reference {q(text)}: {err}") from None
    if len(domain) + 1 + len(path) > _NAME_MAX:
        raise InvalidArgument(f"invalid reference {q(text)}: name longer than 255")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest)
