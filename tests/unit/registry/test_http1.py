"""The transport's HTTP/1.1 socket pool: response heads and chunked bodies parsed from
bytes, and GETs and HEADs against a scripted loopback server (framings, keep-alive,
a stale pooled connection, a cut body). The registry-level behaviour (auth, redirects,
retries, mirrors, TLS) is tested through the client in tests/integration/registry."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from pynydus.registry import http1
from pynydus.registry.http1 import ChunkedBody, HeadError, Http1Pool, parse_head
from pynydus.registry.transport import Transport

# --- sans-I/O ------------------------------------------------------------------------------


def test_parse_head_gives_status_reason_lowercased_headers_and_the_version() -> None:
    status, reason, headers, http10 = parse_head(
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/100\r\nX-A:  b ")
    assert (status, reason, http10) == (206, b"Partial Content", False)
    assert headers == [(b"content-range", b"bytes 0-9/100"), (b"x-a", b"b")]
    assert parse_head(b"HTTP/1.0 200")[3] is True


@pytest.mark.parametrize("head", [b"HTTP/2 200 OK", b"HTTP/1.1 20 OK", b"ICY 200 OK",
                                  b"HTTP/1.1 200 OK\r\nno colon", b"HTTP/1.1 200 OK\r\n folded: x",
                                  b"HTTP/1.1 200 OK\r\nbad name : x"])
def test_parse_head_refuses_what_is_not_http1(head: bytes) -> None:
    with pytest.raises(HeadError):
        parse_head(head)


CHUNKED = b"4;ext=1\r\nWiki\r\n6\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nNEXT"


@pytest.mark.parametrize("step", [1, 3, 7, len(CHUNKED)])
def test_chunked_body_decodes_in_any_pieces_and_keeps_what_follows(step: int) -> None:
    dec = ChunkedBody()
    out = b"".join(dec.feed(CHUNKED[i:i + step]) for i in range(0, len(CHUNKED), step))
    assert out == b"Wikipedia in \r\n\r\nchunks." and dec.done
    assert dec.rest == (b"NEXT" if step == len(CHUNKED) else dec.rest)


@pytest.mark.parametrize("bad", [b"zz\r\n", b"4\r\nWikiXX\r\n"])
def test_chunked_body_refuses_bad_framing(bad: bytes) -> None:
    with pytest.raises(HeadError):
        ChunkedBody().feed(bad)


# --- against a scripted server ---------------------------------------------------------------

Script = Callable[[bytes, int], tuple[bytes, bool]]  # (request head, connection no.) -> (answer, close)


class Scripted:
    """Answers each request a connection sends with ``script``'s bytes; closes the
    connection after an answer when the script says so."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections),
                             daemon=True).start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:  # the client reset it
                        return
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.requests.append(head)
                answer, close = self.script(head, n)
                conn.sendall(answer)
                if close:
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Script], Scripted]]:
    servers: list[Scripted] = []

    def make(script: Script) -> Scripted:
        servers.append(Scripted(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


_pools: list[Http1Pool] = []


def _pool() -> Http1Pool:
    def no_tls() -> None:
        raise AssertionError("no TLS for http")

    _pools.append(Http1Pool(timeout=5, connect_timeout=5, tls=no_tls,  # type: ignore[arg-type]
                            default_headers={"User-Agent": "t"}))
    return _pools[-1]


@pytest.fixture(autouse=True)
def _close_pools() -> Iterator[None]:
    yield
    while _pools:
        _pools.pop().close()


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def test_a_content_length_body_is_read_and_the_connection_reused(serve) -> None:  # type: ignore[no-untyped-def]
    body = bytes(range(256)) * 5000
    srv = serve(lambda head, n: (_ok(body), False))
    pool = _pool()
    for _ in range(3):
        resp = pool.send("GET", srv.url + "/v2/x?a=b", {"Range": "bytes=0-9"})
        assert resp.status_code == 200 and resp.read() == body
    head = pool.send("HEAD", srv.url + "/v2/x", {})
    assert head.status_code == 200 and head.read() == b""  # no body read for a HEAD
    assert srv.connections == 1 and pool.connections == 1
    first = srv.requests[0].split(b"\r\n")
    assert first[0] == b"GET /v2/x?a=b HTTP/1.1"
    assert set(first[1:]) == {b"Host: " + srv.url[7:].encode(), b"User-Agent: t",
                              b"Range: bytes=0-9"}


def test_chunked_and_close_delimited_bodies(serve) -> None:  # type: ignore[no-untyped-def]
    def script(head: bytes, n: int) -> tuple[bytes, bool]:
        if b"/chunked" in head:
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED[:-4], False
        return b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\nnot here", True

    srv = serve(script)
    pool = _pool()
    assert pool.send("GET", srv.url + "/chunked", {}).read() == b"Wikipedia in \r\n\r\nchunks."
    resp = pool.send("GET", srv.url + "/gone", {})
    assert resp.status_code == 404 and resp.read() == b"not here"
    assert pool.send("GET", srv.url + "/chunked", {}).read().startswith(b"Wiki")
    assert srv.connections == 2  # the close-delimited answer's connection was not reused


def test_a_pooled_connection_the_server_closed_is_replaced_once(serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve(lambda head, n: (_ok(b"n%d" % n), True))  # closes after each answer
    pool = _pool()
    assert [pool.send("GET", srv.url + "/", {}).read() for _ in range(3)] == [b"n1", b"n2", b"n3"]


def test_a_cut_body_gives_what_came_then_a_retryable_error(serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve(lambda head, n: (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 40,
                                 True))
    pool = _pool()
    resp = pool.send("GET", srv.url + "/", {})
    got = b""
    with pytest.raises(httpx.RemoteProtocolError, match="received 40 bytes, expected 100"):
        for piece in resp.iter_raw():
            got += piece
    assert got == b"x" * 40


def test_refused_and_unsendable_requests_raise_httpx_errors() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there
    pool = _pool()
    with pytest.raises(httpx.ConnectError):
        pool.send("GET", f"http://127.0.0.1:{port}/", {})
    with pytest.raises(httpx.InvalidURL):
        pool.send("GET", "http://127.0.0.1:1/", {"X": "a\r\nInjected: 1"})
    with pytest.raises(httpx.InvalidURL):
        pool.send("POST", "http://127.0.0.1:1/", {})
    # what httpx would rewrite (percent-encoding, credentials in the URL) is left to it
    for url in ("http://127.0.0.1:1/a b", "http://127.0.0.1:1/\u00e9", "http://u:p@127.0.0.1:1/"):
        with pytest.raises(httpx.InvalidURL):
            pool.send("GET", url, {})
    assert pool.connections == 0


def test_a_plain_http_registry_builds_neither_a_tls_context_nor_an_httpx_client(serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve(lambda head, n: (_ok(b"{}", b"Content-Type: application/json\r\n"), False))
    t = Transport(srv.url[7:], scheme="http", token_renewal=False)
    resp = t.send_direct("GET", srv.url + "/v2/", {})
    assert resp.status_code == 200 and resp.read() == b"{}"
    assert t._tls is None and t._http_client is None
    assert t.metrics.requests == 1
    t.close()


def test_a_pooled_request_logs_httpx_line_at_debug_without_its_query(serve, caplog) -> None:  # type: ignore[no-untyped-def]
    """httpx's "HTTP Request:" line (debug only: the daemon quiets it at info), which
    bench/lazy_pull.py's time breakdown reads; a query (a presigned URL's signature)
    stays out of it."""
    import logging

    srv = serve(lambda head, n: (_ok(b"{}", b"Content-Type: application/json\r\n"), False))
    t = Transport(srv.url[7:], scheme="http", token_renewal=False)
    with caplog.at_level(logging.INFO, logger="pynydus.registry.transport"):
        t.send_direct("GET", srv.url + "/v2/", {}).read()
    assert not [r for r in caplog.records if "HTTP Request" in r.getMessage()]
    with caplog.at_level(logging.DEBUG, logger="pynydus.registry.transport"):
        t.send_direct("GET", srv.url + "/v2/?X-Amz-Signature=secret", {}).read()
    (line,) = [r.getMessage() for r in caplog.records if "HTTP Request" in r.getMessage()]
    assert line == f'HTTP Request: GET {srv.url}/v2/ "HTTP/1.1 200 OK"', line
    t.close()


def test_a_body_is_received_in_place_into_one_new_bytes_object(serve) -> None:  # type: ignore[no-untyped-def]
    body = bytes(range(256)) * 4096  # 1 MiB, sent in pieces: several receives fill it

    def script(head: bytes, n: int) -> tuple[bytes, bool]:
        return b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n\r\n" % len(body) + body, False

    srv = serve(script)
    pieces = list(_pool().send("GET", srv.url + "/", {}).iter_raw())
    assert len(pieces) == 1 and type(pieces[0]) is bytes and pieces[0] == body
    buf, view = http1._fillable(5)
    view[:] = b"abcde"
    view.release()
    assert type(buf) is bytes and buf == b"abcde" and hash(buf) == hash(b"abcde")


def test_connecting_to_an_ascii_host_imports_no_idna_codec(serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve(lambda head, n: (_ok(b"x"), False))
    code = ("import sys\n"
            "from pynydus.registry.http1 import Http1Pool\n"
            "assert 'encodings.idna' not in sys.modules\n"
            "pool = Http1Pool(timeout=5, connect_timeout=5, tls=None)\n"
            f"assert pool.send('GET', {srv.url + '/'!r}, {{}}).read() == b'x'\n"
            "pool.close()\n"
            "print(sorted(m for m in ('encodings.idna', 'stringprep')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"  # a reader's first miss takes no import lock


def test_a_request_the_pool_does_not_send_goes_through_httpx(serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve(lambda head, n: (_ok(head.split(b" ")[1]), False))
    t = Transport(srv.url[7:], scheme="http", token_renewal=False)
    assert t.send_direct("GET", srv.url + "/a b", {}).read() == b"/a%20b"
    assert t._http_client is not None  # built for it
    t.close()
