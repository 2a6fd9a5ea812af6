"""A private OCI registry: Debian's ``/usr/bin/docker-registry`` (distribution 2.8).

Listens on 127.0.0.1 with a port the kernel picked, plain HTTP, storage in its own work
directory. The access log (Apache combined format, written by distribution to stdout) goes
to ``access.log`` so tests can count what was fetched (``blob_gets``); the application log
goes to ``registry.log``.

Auth: ``Registry(htpasswd=write_htpasswd(path, user, password))`` turns on distribution's
htpasswd (basic) auth; push with ``oci.push(..., creds="user:password")`` and pull with
``ctr images pull --user user:password``. Token auth is a later hook: pass the ``auth:``
YAML section through ``auth_yaml``.

TLS: ``tls=(certificate, key)`` serves https (``url`` says so), ``client_ca`` also
requires a client certificate signed by it; ``client=(cert, key)`` and ``ca`` are what
the harness itself presents and trusts to see it up (``tests/harness/pki.py`` makes
them). ``proxy_remote="http://origin"`` makes it a pull-through cache of another
registry (distribution's proxy mode): a mirror. ``restart()`` stops it and starts it again
on the same port, with the same storage.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Self

from .util import HarnessError, Proc, Service, free_port, make_workdir, remove_tree, wait_until

REGISTRY_BIN = "/usr/bin/docker-registry"

# 127.0.0.1 - - [27/Nov/2026:18:50:01 +0000] "GET /v2/x/blobs/sha256:ab.. HTTP/1.1" 200 ...
_ACCESS_RE = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+|-)')


def raw_manifest(ref: str) -> dict:
    """The manifest (or index) ``ref`` names, as the registry serves it (skopeo)."""
    return dict(json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True, capture_output=True, text=True).stdout))


def write_htpasswd(path: Path, user: str, password: str) -> Path:
    """Write a one-user bcrypt htpasswd file (distribution accepts only bcrypt)."""
    if shutil.which("htpasswd"):
        line = subprocess.run(["htpasswd", "-Bbn", user, password], check=True,
                              capture_output=True, text=True).stdout.strip()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # stdlib until 3.13; glibc/libxcrypt provide bcrypt

            hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
        if not hashed or not hashed.startswith("$2"):
            raise HarnessError("no bcrypt available: install apache2-utils (htpasswd)")
        line = f"{user}:{hashed}"
    path.write_text(line + "\n")
    return path


class Registry(Service):
    """Context manager: ``with Registry() as reg: reg.host -> '127.0.0.1:PORT'``."""

    def __init__(self, workdir: Path | None = None, *, htpasswd: Path | None = None,
                 auth_yaml: str | None = None, keep: bool = False, tag: str = "reg",
                 tls: tuple[Path, Path] | None = None, client_ca: Path | None = None,
                 ca: Path | None = None, client: tuple[Path, Path] | None = None,
                 proxy_remote: str | None = None) -> None:
        self._own_dir = workdir is None
        self.workdir = workdir or make_workdir(tag)
        self.keep = keep
        self.port = 0
        self.htpasswd = htpasswd
        self.auth_yaml = auth_yaml
        self.storage = self.workdir / "data"
        self.config = self.workdir / "config.yml"
        self.access_log = self.workdir / "access.log"
        self.proc: Proc | None = None
        self.tls, self.client_ca, self.ca, self.client = tls, client_ca, ca, client
        self.proxy_remote = proxy_remote

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def ref(self, name: str, tag: str = "latest") -> str:
        return f"{self.host}/{name}:{tag}"

    def _auth_section(self) -> str:
        if self.auth_yaml:
            return self.auth_yaml
        if self.htpasswd:
            return (f"auth:\n  htpasswd:\n    realm: pynydus-test\n"
                    f"    path: {self.htpasswd}\n")
        return ""

    def _write_config(self) -> None:
        self.config.write_text(
            "version: 0.1\n"
            "log:\n"
            "  level: info\n"
            "  accesslog:\n"
            "    disabled: false\n"
            "  fields:\n"
            "    service: pynydus-test-registry\n"
            "storage:\n"
            "  filesystem:\n"
            f"    rootdirectory: {self.storage}\n"
            "  delete:\n"
            "    enabled: true\n"
            "  maintenance:\n"
            "    uploadpurging:\n"
            "      enabled: false\n"
            "http:\n"
            f"  addr: 127.0.0.1:{self.port}\n"
            + self._tls_section()
            + (f"proxy:\n  remoteurl: {self.proxy_remote}\n" if self.proxy_remote else "")
            + self._auth_section())

    def _tls_section(self) -> str:
        if not self.tls:
            return ""
        out = f"  tls:\n    certificate: {self.tls[0]}\n    key: {self.tls[1]}\n"
        if self.client_ca:
            out += f"    clientcas:\n      - {self.client_ca}\n"
        return out

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.client:
            ctx.load_cert_chain(str(self.client[0]), str(self.client[1]))
        return ctx

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2,
                                        context=self._ssl_context()) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError as err:
            return err.code == 401  # auth enabled: up and asking for credentials

    def start(self) -> Self:
        self.storage.mkdir(parents=True, exist_ok=True)
        return self._start(None)

    def restart(self) -> Self:
        """Stop (by PID) and start again on the same port and storage."""
        if self.proc is not None:
            self.proc.stop()
        return self._start(self.port)

    def kill(self) -> None:
        """SIGKILL the process (storage and port kept for ``restart``)."""
        if self.proc is not None:
            self.proc.kill9()

    def _start(self, port: int | None) -> Self:
        for attempt in range(3):  # the free port may be taken between probe and bind
            self.port = port or free_port()
            self._write_config()
            self.proc = Proc("registry", [REGISTRY_BIN, "serve", str(self.config)],
                             self.workdir, self.workdir / "registry.log",
                             stdout=self.access_log)
            self.proc.start()
            try:
                wait_until(lambda: self.proc is not None and (
                    not self.proc.running() or self._answers()), 20, "registry")
            except HarnessError:
                self.proc.stop()
                raise
            if self.proc.running():
                return self
            if attempt == 2:
                raise HarnessError(f"registry exited at start:\n{self.proc.log_tail()}")
        return self

    def stop(self) -> None:
        """Stop the registry by PID; remove its storage unless ``keep``. Idempotent."""
        if self.proc is not None:
            self.proc.stop()
        if self._own_dir and not self.keep:
            remove_tree(self.workdir)
        elif self.workdir.exists():
            (self.workdir / "keep").touch()

    # ---------------------------------------------------------------- access log
    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request so far, from the access log."""
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            m = _ACCESS_RE.search(line)
            if m:
                out.append((m["method"], m["path"], int(m["status"])))
        return out

    def blob_bytes(self, digest: str | None = None) -> int:
        """Bytes the registry sent for successful blob GETs (optionally of one digest)."""
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        total = 0
        for line in text.splitlines():
            m = _ACCESS_RE.search(line)
            if (m and m["method"] == "GET" and "/blobs/" in m["path"] and 200 <= int(m["status"]) < 300
                    and (digest is None or m["path"].endswith(digest)) and m["bytes"] != "-"):
                total += int(m["bytes"])
        return total

    def blob_gets(self, digest: str | None = None, *, ok_only: bool = True) -> int:
        """Number of GET requests for blobs (optionally for one ``sha256:…`` digest);
        only 2xx answers (200, 206 ranged) unless ``ok_only`` is false."""
        n = 0
        for method, path, status in self.requests():
            if method != "GET" or "/blobs/" not in path:
                continue
            if digest is not None and not path.endswith(digest):
                continue
            if ok_only and not 200 <= status < 300:
                continue
            n += 1
        return n
