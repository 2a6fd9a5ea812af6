"""A TCP proxy in front of a registry that cuts chosen requests off mid-body.

Every forwarded request gets ``Connection: close``, so each HTTP request arrives on a
new connection and can be inspected. A rule ``(method, path regex, times)`` makes
the proxy read the request head and part of its body, then reset the connection,
for the first ``times`` matching requests (``times=-1``: always). ``cut`` lists what
was cut. Threads only; ``close()`` stops the listener (idempotent).
"""

from __future__ import annotations

import re
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class Rule:
    method: str
    path: str
    times: int = 1
    hits: int = 0


@dataclass
class FaultProxy:
    upstream: tuple[str, int]
    rules: list[Rule] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(64)
        self.port = self._lsock.getsockname()[1]
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._lsock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _match(self, method: str, path: str) -> bool:
        with self._lock:
            for r in self.rules:
                if r.method == method and re.search(r.path, path) and \
                        (r.times < 0 or r.hits < r.times):
                    r.hits += 1
                    self.cut.append(f"{method} {path}")
                    return True
        return False

    def _serve(self, conn: socket.socket) -> None:
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                got = conn.recv(65536)
                if not got:
                    conn.close()
                    return
                buf += got
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path = lines[0].decode().split(" ")[:2]
            if self._match(method, path):
                try:
                    conn.recv(65536)  # let some of the body arrive, then reset
                except OSError:
                    pass
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
            headers = [ln for ln in lines[1:] if not ln.lower().startswith(b"connection:")]
            out = b"\r\n".join([lines[0], *headers, b"Connection: close"]) + b"\r\n\r\n" + rest
            up = socket.create_connection(self.upstream)
            up.sendall(out)
            threading.Thread(target=self._pipe, args=(conn, up), daemon=True).start()
            self._pipe(up, conn)
        except OSError:
            conn.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
