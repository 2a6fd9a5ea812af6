"""A private OCI registry: Debian's ``/usr/bin/docker-registry`` (distribution 2.8).

Listens on 127.0.0.1 with a port the kernel picked, plain HTTP, storage in its own work
directory. The access log (Apache combined format, written by distribution to stdout) goes
to ``access.log`` so tests can count what was fetched (``blob_gets``); the application log
goes to ``registry.log``.

Auth: ``Registry(htpasswd=Path)`` turns on distribution's htpasswd (basic) auth with a
bcrypt file made by the caller (``htpasswd -Bbn user pass``). Token auth is a later hook:
pass extra YAML through ``auth_yaml``.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from .util import HarnessError, Proc, free_port, make_workdir, remove_tree, wait_until

REGISTRY_BIN = "/usr/bin/docker-registry"

# 127.0.0.1 - - [27/Nov/2026:18:50:01 +0000] "GET /v2/x/blobs/sha256:ab.. HTTP/1.1" 200 ...
_ACCESS_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')


class Registry:
    """Context manager: ``with Registry() as reg: reg.host -> '127.0.0.1:PORT'``."""

    def __init__(self, workdir: Path | None = None, *, htpasswd: Path | None = None,
                 auth_yaml: str | None = None, keep: bool = False) -> None:
        self._own_dir = workdir is None
        self.workdir = workdir or make_workdir("reg")
        self.keep = keep
        self.port = 0
        self.htpasswd = htpasswd
        self.auth_yaml = auth_yaml
        self.storage = self.workdir / "data"
        self.config = self.workdir / "config.yml"
        self.access_log = self.workdir / "access.log"
        self.proc: Proc | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

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
            + self._auth_section())

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError as err:
            return err.code == 401  # auth enabled: up and asking for credentials

    def start(self) -> Registry:
        self.storage.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
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

    def __enter__(self) -> Registry:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

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
