"""Loopback servers the registry tests put around a real ``docker-registry``.

* :class:`TokenServer` — distribution's token auth counterpart: checks Basic
  user/password, issues RS256 JWTs signed by a key whose self-signed certificate
  the registry trusts (``rootcertbundle``), with the certificate in the ``x5c``
  header (the registry verifies the chain against its bundle).
* :class:`FaultProxy` — a reverse proxy (and forward proxy for absolute-form
  requests) that forwards to the registry, with switchable faults: answer a status
  N times, cut or shorten bodies, answer 307 to the real registry, delay.

Both are in-process ``ThreadingHTTPServer`` s on 127.0.0.1 with a kernel-chosen
port; ``stop()`` shuts them down and joins their thread.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

ISSUER = "pynydus-test-issuer"
SERVICE = "pynydus-test-registry"


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    connections = 0  # TCP connections accepted: shows whether clients keep them alive

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections += 1
        super().process_request(request, client_address)


class _Base:
    server: _Server
    thread: threading.Thread

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = _Server(("127.0.0.1", 0), handler)
        self.server.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def connections(self) -> int:
        return int(self.server.connections)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop serving and join the thread; idempotent."""
        if getattr(self, "server", None) is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)
            self.server = None  # type: ignore[assignment]


# ------------------------------------------------------------------ token server
@dataclass
class TokenServer(_Base):
    """``GET /token?service=&scope=&account=`` with Basic auth → ``{"token": JWT}``.

    Short-lived passwords, as a cloud registry has them (the password is itself a token):
    ``mint()``, or ``GET /mint`` with Basic ``mint_user:mint_key`` (for a credential
    helper of the test's own), issues a password of ``mint_user`` that the token server
    takes for ``mint_ttl`` seconds."""

    workdir: Path
    users: dict[str, str] = field(default_factory=dict)
    allow_anonymous: bool = False
    expires_in: int = 300
    # Seconds added to the JWT's exp/nbf; a big negative value issues tokens the
    # registry rejects (it allows 60 s of leeway) while expires_in still says 300.
    exp_offset: float = 0.0
    readonly_users: set[str] = field(default_factory=set)  # granted "pull" only
    issued: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    mint_user: str = ""
    mint_key: str = ""
    mint_ttl: float = 8.0
    minted: dict[str, float] = field(default_factory=dict)  # password -> time.time() expiry
    refused: int = 0  # token requests refused for a bad or expired password

    def mint(self) -> str:
        pw = "minted-" + uuid.uuid4().hex
        with self._lock:
            self.minted[pw] = time.time() + self.mint_ttl
        return pw

    def password_ok(self, user: str, pw: str) -> bool:
        if user and self.users.get(user) == pw:
            return True
        with self._lock:
            return bool(user) and user == self.mint_user and self.minted.get(pw, 0) > time.time()

    def __post_init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pynydus test token signer")])
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(days=1))
                     .not_valid_after(now + dt.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = self.workdir / "token-signer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._lock = threading.Lock()
        self._serve(_TokenHandler)

    @property
    def realm(self) -> str:
        return f"http://{self.host}/token"

    def registry_auth_yaml(self) -> str:
        return ("auth:\n  token:\n"
                f"    realm: {self.realm}\n"
                f"    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n"
                f"    rootcertbundle: {self.cert_path}\n")

    def make_jwt(self, subject: str, scopes: list[str]) -> str:
        ro = subject in self.readonly_users
        now = int(time.time())
        access = []
        for s in scopes:
            for one in s.split(" "):
                parts = one.split(":")
                if len(parts) >= 3:
                    access.append({"type": parts[0], "name": ":".join(parts[1:-1]),
                                   "actions": [a for a in parts[-1].split(",")
                                               if a and (a == "pull" or not ro)]})
        off = int(self.exp_offset)
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self.cert.public_bytes(
                      serialization.Encoding.DER)).decode()]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE,
                  "exp": now + self.expires_in + off, "nbf": now - 5 + min(off, 0),
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode()))
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)


class _TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        ts: TokenServer = self.server.owner  # type: ignore[attr-defined]
        u = urlsplit(self.path)
        q = parse_qs(u.query)
        user = ""
        authz = self.headers.get("Authorization", "")
        if u.path == "/mint":
            want = "Basic " + base64.b64encode(f"{ts.mint_user}:{ts.mint_key}".encode()).decode()
            if not ts.mint_key or authz != want:
                self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "mint"}]})
                return
            self._reply(200, {"username": ts.mint_user, "password": ts.mint(),
                              "expires_in": ts.mint_ttl})
            return
        with ts._lock:
            ts.requests.append({"query": q, "authorization": authz})
        if authz.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(authz[6:]).decode().partition(":")
            except ValueError:
                user, pw = "", ""
            if not ts.password_ok(user, pw):
                with ts._lock:
                    ts.refused += 1
                self._reply(401, {"errors": [{"code": "UNAUTHORIZED",
                                              "message": "bad user or password"}]})
                return
        elif not ts.allow_anonymous:
            self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "login"}]})
            return
        if q.get("service", [""])[0] != SERVICE:
            self._reply(400, {"errors": [{"code": "UNSUPPORTED", "message": "service"}]})
            return
        tok = ts.make_jwt(user, q.get("scope", []))
        with ts._lock:
            ts.issued += 1
        self._reply(200, {"token": tok, "access_token": tok, "expires_in": ts.expires_in,
                          "issued_at": dt.datetime.now(dt.UTC).isoformat()})


# ------------------------------------------------------------------- fault proxy
@dataclass
class FaultProxy(_Base):
    """Forwards to ``upstream`` (``127.0.0.1:PORT``) unless a fault is armed.

    Faults apply to requests whose path contains ``match`` (default: all):
    ``fail(n, status)`` answers ``status`` n times; ``short(n, keep)`` forwards but
    sends only ``keep`` body bytes with a matching Content-Length; ``cut(n, keep)``
    sends the real headers and then closes after ``keep`` bytes; ``redirect`` answers
    blob GETs with 307 to the upstream (or to ``redirect_to``, a ``scheme://host``);
    ``delay`` sleeps before answering. ``hold(n)`` makes the next n matching requests wait
    (after they are logged, before any fault is taken) until ``release()``: a test then
    knows a request is in flight for as long as it wants."""

    upstream: str
    match: str = ""
    match_method: str = ""
    redirect: bool = False
    redirect_to: str = ""
    delay: float = 0.0
    ignore_range: bool = False
    log: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[tuple[str, int, int]] = []   # (kind, remaining, arg)
        self.fail_headers: dict[str, str] = {}
        # path substring -> (status, headers, body): canned answers, e.g. an API
        # the registry behind does not have
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self._holds = 0
        self._released = threading.Event()
        self._serve(_ProxyHandler)

    def fail(self, n: int, status: int = 500, headers: dict[str, str] | None = None) -> None:
        with self._lock:
            self._faults.append(("fail", n, status))
            self.fail_headers = dict(headers or {})

    def short(self, n: int, keep: int) -> None:
        with self._lock:
            self._faults.append(("short", n, keep))

    def cut(self, n: int, keep: int) -> None:
        with self._lock:
            self._faults.append(("cut", n, keep))

    def hold(self, n: int = 1) -> None:
        with self._lock:
            self._holds += n
            self._released.clear()

    def release(self) -> None:
        with self._lock:
            self._holds = 0
        self._released.set()

    def stop(self) -> None:
        self.release()  # held requests end before the server does
        super().stop()

    def take_hold(self, method: str, path: str) -> bool:
        if (self.match and self.match not in path) or \
                (self.match_method and method != self.match_method):
            return False
        with self._lock:
            if self._holds <= 0:
                return False
            self._holds -= 1
            return True

    def wait_count(self, n: int, method: str | None = None, contains: str = "",
                   timeout: float = 30.0) -> None:
        """Wait until ``count(method, contains)`` is at least ``n``."""
        deadline = time.monotonic() + timeout
        while self.count(method, contains) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"proxy saw {self.count(method, contains)} of {n} "
                                     f"{method or ''} {contains} requests")
            time.sleep(0.01)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.log.clear()

    def take_fault(self, method: str, path: str) -> tuple[str, int] | None:
        if (self.match and self.match not in path) or \
                (self.match_method and method != self.match_method):
            return None
        with self._lock:
            for i, (kind, left, arg) in enumerate(self._faults):
                if left > 0:
                    self._faults[i] = (kind, left - 1, arg)
                    return kind, arg
        return None

    def count(self, method: str | None = None, contains: str = "") -> int:
        with self._lock:
            return sum(1 for m, p, _ in self.log
                       if (method is None or m == method) and contains in p)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        fp: FaultProxy = self.server.owner  # type: ignore[attr-defined]
        path = self.path
        upstream = fp.upstream
        if path.startswith("http://"):       # forward-proxy (absolute-form) request
            u = urlsplit(path)
            upstream, path = u.netloc, (u.path + ("?" + u.query if u.query else ""))
        with fp._lock:
            fp.log.append((self.command, path, dict(self.headers.items())))
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if fp.take_hold(self.command, path):
            fp._released.wait(120)
        if fp.delay:
            time.sleep(fp.delay)
        for needle, (status, hdrs, canned) in list(fp.routes.items()):
            if needle in path:
                self.send_response(status)
                for k, v in hdrs.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(canned)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(canned)
                return
        fault = fp.take_fault(self.command, path)
        if fault and fault[0] == "fail":
            msg = b'{"errors":[{"code":"UNKNOWN","message":"injected"}]}'
            self.send_response(fault[1])
            for k, v in fp.fail_headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(msg)
            return
        if fp.redirect and self.command in ("GET", "HEAD") and "/blobs/sha256:" in path:
            self.send_response(307)
            self.send_header("Location", f"{fp.redirect_to or 'http://' + fp.upstream}{path}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("connection", "proxy-connection", "keep-alive")}
        if fp.ignore_range:
            headers.pop("Range", None)
        conn = http.client.HTTPConnection(upstream, timeout=30)
        try:
            conn.request(self.command, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        finally:
            conn.close()
        keep = len(data)
        if fault and fault[0] in ("short", "cut"):
            keep = min(keep, fault[1])
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in ("connection", "transfer-encoding", "keep-alive"):
                continue
            if k.lower() == "content-length" and fault and fault[0] == "short":
                v = str(keep)
            self.send_header(k, v)
        if "content-length" not in {k.lower() for k, _ in resp.getheaders()}:
            self.send_header("Content-Length", str(keep if fault else len(data)))
        if fault and fault[0] == "cut":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[:keep])

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle
