"""GETs and HEADs over pooled HTTP/1.1 sockets: the transport's path for them.

A chunk miss of pynydusd is one ranged blob GET of ~0.5-1 MB. Through httpx (its client,
httpcore's pool and h11's state machine) a GET cost ~1 ms of Python and the body arrived
in 64 KiB pieces: on a 2-CPU node serving 16 random readers that was ~40 % of the
daemon's GIL time (docs/benchmarks.md, "Random 4 KiB reads beside nydusd"). Here a GET
is one ``sendall`` of its head, the response head parsed from what the first ``recv``
brought, and a Content-Length body received into one buffer of its size.

The answer is an ``httpx.Response`` over that socket, whatever its status, so the
transport's auth, redirects, retries, metrics and error mapping treat it as one of
httpx's. Failures on the wire are httpx's exceptions (``ConnectError``, ``ReadTimeout``,
``RemoteProtocolError``, ...): the retry policy is the same. Framing: Content-Length,
chunked, or a body delimited by the connection's close; the socket goes back to the
pool once its body was read to the end and neither side said ``close``. A pooled
socket that fails before any byte of an answer (the server closed an idle keep-alive
connection) is replaced by a new one once, as httpcore does.

Sans-I/O core: ``parse_head`` (bytes in, status and headers out) and ``ChunkedBody``
(chunked bytes in, body pieces out); ``Http1Pool`` is the socket adapter.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

_MAX_HEAD = 64 << 10      # a response head larger than this is refused
_ONE_BUFFER = 8 << 20     # a Content-Length body up to this is received in one buffer
_PIECE = 1 << 20          # larger bodies and the other framings, in pieces of this
_HEAD_RECV = 64 << 10     # what a head is read with: a body's bulk goes straight to its buffer
_NO_BODY = frozenset({204, 304})


class HeadError(ValueError):
    """A response head that is not HTTP/1.x."""


def parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bool]:
    """``(status, reason, headers, http10)`` of a response head (without its final
    CRLF CRLF). Header names are lower-cased; obsolete line folding is refused."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise HeadError(f"bad status line {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise HeadError(f"bad header line {line[:80]!r}")
        headers.append((name.lower(), value.strip()))
    return int(code), reason, headers, version == b"HTTP/1.0"


class ChunkedBody:
    """Decodes a chunked body: ``feed`` bytes, get the body's bytes so far; ``done``
    once the last chunk and the trailer were read (``rest``: bytes after them)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0          # data bytes of the current chunk still to come
        self._crlf = False      # the CRLF after a chunk's data is still to come
        self._trailer = False   # in the trailer section after the last chunk
        self.done = False
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        buf = self._buf
        while not self.done:
            if self._left:
                take = min(self._left, len(buf))
                if not take:
                    break
                out += buf[:take]
                del buf[:take]
                self._left -= take
                self._crlf = not self._left
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise HeadError("chunk header too long")
                break
            line = bytes(buf[:end])
            del buf[:end + 2]
            if self._crlf:
                if line:
                    raise HeadError("chunk data not followed by CRLF")
                self._crlf = False
            elif self._trailer:
                if not line:
                    self.done = True
                    self.rest = bytes(buf)
            else:
                size = line.split(b";", 1)[0].strip()
                try:
                    self._left = int(size, 16)
                except ValueError:
                    raise HeadError(f"bad chunk size {size[:20]!r}") from None
                if self._left < 0:
                    raise HeadError("negative chunk size")
                self._trailer = self._left == 0
        return bytes(out)


class _Conn:
    __slots__ = ("key", "reused", "sock")

    def __init__(self, key: tuple[str, str, int], sock: socket.socket) -> None:
        self.key = key
        self.sock = sock
        self.reused = False


class _Body(httpx.SyncByteStream):
    """The body of one answer, read from its connection as it is iterated; the
    connection goes back to the pool at the body's end, or is closed."""

    def __init__(self, pool: Http1Pool, conn: _Conn, first: bytes, length: int | None,
                 chunked: bool, keep: bool) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self._first = first
        self._length = length
        self._chunked = ChunkedBody() if chunked else None
        self._keep = keep and (length is not None or chunked)

    def __iter__(self) -> Iterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        with _closing_on_error(self._drop):
            if self._chunked is not None:
                yield from self._iter_chunked(conn.sock)
            elif self._length is not None:
                yield from self._iter_length(conn.sock, self._length)
            else:
                yield from self._iter_to_close(conn.sock)
        self.finish()

    def _iter_length(self, sock: socket.socket, length: int) -> Iterator[bytes]:
        first = self._first[:length]
        if length <= _ONE_BUFFER:
            if len(first) == length:
                yield first
                return
            buf, view = _fillable(length)
            view[:len(first)] = first
            pos = len(first)
            try:
                while pos < length:
                    n = sock.recv_into(view[pos:])
                    if not n:
                        raise _short(pos, length)
                    pos += n
            except (OSError, httpx.TransportError):
                if pos:  # what came before the cut (a stream resumes after it)
                    yield bytes(view[:pos])
                raise
            finally:
                view.release()
            yield buf if isinstance(buf, bytes) else bytes(buf)
            return
        if first:
            yield first
        got = len(first)
        while got < length:
            piece = sock.recv(min(_PIECE, length - got))
            if not piece:
                raise _short(got, length)
            got += len(piece)
            yield piece

    def _iter_chunked(self, sock: socket.socket) -> Iterator[bytes]:
        dec = self._chunked
        assert dec is not None
        data = self._first
        while True:
            out = dec.feed(data)
            if out:
                yield out
            if dec.done:
                if dec.rest:  # bytes after the body: not a connection to reuse
                    self._keep = False
                return
            data = sock.recv(_PIECE)
            if not data:
                raise httpx.RemoteProtocolError("peer closed connection without sending "
                                                "complete message body (chunked)")

    def _iter_to_close(self, sock: socket.socket) -> Iterator[bytes]:
        if self._first:
            yield self._first
        while piece := sock.recv(_PIECE):
            yield piece

    def finish(self) -> None:
        """The body was read to its end: the connection goes back to the pool (or is
        closed when it cannot be reused)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._keep:
                self._pool.put(conn)
            else:
                conn.sock.close()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.sock.close()

    def close(self) -> None:
        """A body not read to its end: the connection is closed, not reused."""
        self._drop()


def _short(got: int, length: int) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError(f"peer closed connection without sending complete "
                                     f"message body (received {got} bytes, expected {length})")


def _read_error(err: BaseException) -> httpx.TransportError:
    if isinstance(err, httpx.TransportError):
        return err
    if isinstance(err, TimeoutError):
        return httpx.ReadTimeout(str(err) or "timed out")
    if isinstance(err, HeadError):
        return httpx.RemoteProtocolError(str(err))
    return httpx.ReadError(str(err) or type(err).__name__)


@functools.cache
def _bytes_api() -> tuple[Any, Any, int] | None:
    """CPython's ``PyBytes_FromStringAndSize`` and ``PyMemoryView_FromMemory`` through
    ctypes, and where a bytes object's storage starts; None where they cannot be had."""
    try:
        import ctypes

        api = ctypes.pythonapi
        new = api.PyBytes_FromStringAndSize
        new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
        new.restype = ctypes.py_object
        view = api.PyMemoryView_FromMemory
        view.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
        view.restype = ctypes.py_object
    except (ImportError, AttributeError):  # pragma: no cover - not CPython
        return None
    return new, view, bytes.__basicsize__ - 1  # PyBytesObject: header, then ob_sval


_PYBUF_WRITE = 0x200


def _fillable(n: int) -> tuple[bytes | bytearray, memoryview]:
    """A buffer of ``n`` bytes to receive a body into, and a writable view of it: a new
    bytes object that nothing else refers to yet (neither zero-filled, nor copied to
    become bytes: a chunk miss's ~1 MB body was both), else a bytearray."""
    api = _bytes_api()
    if api is None or n < 2:  # (CPython shares its empty bytes object)
        buf = bytearray(n)
        return buf, memoryview(buf)
    new, view, offset = api
    out: bytes = new(None, n)
    return out, view(id(out) + offset, n, _PYBUF_WRITE)


def _read_head(sock: socket.socket, buf: bytes, request: httpx.Request,
               cut: str) -> tuple[bytes, int]:
    """``buf`` and what follows it on ``sock`` up to a whole response head: (the bytes,
    where the head's final CRLF CRLF starts). A head over ``_MAX_HEAD`` or a server that
    disconnects first (``cut`` says when) is a RemoteProtocolError."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > _MAX_HEAD:
            raise httpx.RemoteProtocolError("response head too large", request=request)
        data = sock.recv(_HEAD_RECV)
        if not data:
            raise httpx.RemoteProtocolError(f"server disconnected {cut}", request=request)
        buf += data
    return buf, end


class _Stale(Exception):
    """A pooled connection failed before any byte of the answer came back."""


@contextlib.contextmanager
def _closing_on_error(close: Callable[[], None]) -> Iterator[None]:
    """Any failure closes the connection (``close``); OS and framing errors leave as
    httpx's transport errors."""
    try:
        yield
    except (_Stale, httpx.TransportError):
        close()
        raise
    except (OSError, HeadError) as err:
        close()
        raise _read_error(err) from err


class Http1Pool:
    """Keep-alive sockets per (scheme, host, port), shared by threads; at most
    ``max_idle`` idle ones in all. ``tls()`` gives the TLS context for https (called at
    the first https request: a plain-http registry never builds one)."""

    def __init__(self, *, timeout: float | None, connect_timeout: float | None,
                 tls: Callable[[], ssl.SSLContext], max_idle: int = 64,
                 default_headers: Mapping[str, str] | None = None) -> None:
        self._timeout = timeout or None
        self._connect_timeout = connect_timeout or None
        self._tls = tls
        self._max_idle = max_idle
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._nidle = 0
        self._lock = threading.Lock()
        self._closed = False
        self._default = dict(default_headers or {})
        self.connections = 0  # opened since start (a test sees reuse)

    def send(self, method: str, url: str, headers: Mapping[str, str]) -> httpx.Response:
        """``method`` (GET or HEAD) ``url`` with ``headers`` (the pool adds Host, and
        its default headers under them); the answer with its body unread (a stream:
        close it or read it). Raises httpx's transport errors, and ``InvalidURL`` for a
        request it cannot send."""
        if method not in ("GET", "HEAD"):
            raise httpx.InvalidURL(f"{method}: not sent by this pool")
        u = urlsplit(url)
        host = u.hostname
        if u.scheme not in ("http", "https") or not host:
            raise httpx.InvalidURL(f"cannot {method} {url!r}")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError as err:
            raise httpx.InvalidURL(f"cannot {method} {url!r}: {err}") from err
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        if "@" in u.netloc or not target.isascii() or any(c.isspace() for c in target):
            # credentials in the URL, or a target httpx would percent-encode: its call
            raise httpx.InvalidURL(f"{method} {url!r}: not sent as is")
        all_headers = {"Host": u.netloc, **self._default, **headers}
        lines = [f"{method} {target} HTTP/1.1"]
        for name, value in all_headers.items():
            if any(c in name or c in value for c in "\r\n\0") or ":" in name:
                raise httpx.InvalidURL(f"header {name!r}: bad characters")
            lines.append(f"{name}: {value}")
        try:
            head_out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError as err:
            raise httpx.InvalidURL(f"{method} {url!r}: header not latin-1: {err}") from err
        key = (u.scheme, host, port)
        request = httpx.Request(method, url, headers=all_headers)
        conn = self._take(key)
        if conn is not None:
            try:
                return self._exchange(conn, head_out, request)
            except _Stale:
                pass  # the server closed it while it was idle: a new one, once
        conn = self._connect(key)
        try:
            return self._exchange(conn, head_out, request)
        except _Stale as err:
            raise httpx.RemoteProtocolError("server disconnected without sending a "
                                            "response", request=request) from err

    def _exchange(self, conn: _Conn, head_out: bytes, request: httpx.Request) -> httpx.Response:
        sock = conn.sock
        with _closing_on_error(sock.close):
            try:
                sock.sendall(head_out)
                data = sock.recv(_HEAD_RECV)
            except (ConnectionError, ssl.SSLEOFError) as err:
                if conn.reused:
                    raise _Stale() from err
                raise
            if not data and conn.reused:
                raise _Stale()
            buf, end = _read_head(sock, data, request, "without sending a complete "
                                                            "response head")
            status, reason, headers, http10 = parse_head(buf[:end])
            while 100 <= status < 200:  # an informational answer: the real one follows
                buf, end = _read_head(sock, buf[end + 4:], request,
                                      "after an informational response")
                status, reason, headers, http10 = parse_head(buf[:end])
        first = buf[end + 4:]
        fields = dict(headers)
        conn_opts = fields.get(b"connection", b"").lower()
        keep = b"close" not in conn_opts and (not http10 or b"keep-alive" in conn_opts)
        chunked = b"chunked" in fields.get(b"transfer-encoding", b"").lower()
        length: int | None = None
        if status in _NO_BODY or request.method == "HEAD":
            length = 0
        elif not chunked and b"content-length" in fields:
            cl = fields[b"content-length"]
            if not cl.isdigit():
                sock.close()
                raise httpx.RemoteProtocolError(f"bad Content-Length {cl[:20]!r}",
                                                request=request)
            length = int(cl)
        if length is not None and len(first) > length:
            keep = False  # bytes beyond the body: the connection is out of step
        stream = _Body(self, conn, first, length, chunked, keep)
        resp = httpx.Response(status, headers=headers, stream=stream, request=request,
                              extensions={"http_version": b"HTTP/1.0" if http10 else b"HTTP/1.1",
                                          "reason_phrase": reason})
        if length == 0:  # nothing to read: the connection is free now
            stream.finish()
        return resp

    def _take(self, key: tuple[str, str, int]) -> _Conn | None:
        with self._lock:
            idle = self._idle.get(key)
            if not idle:
                return None
            self._nidle -= 1
            conn = idle.pop()
        conn.reused = True
        return conn

    def put(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed and self._nidle < self._max_idle:
                self._idle.setdefault(conn.key, []).append(conn)
                self._nidle += 1
                return
        conn.sock.close()

    def _connect(self, key: tuple[str, str, int]) -> _Conn:
        scheme, host, port = key
        try:
            # an ASCII host as bytes: getaddrinfo encodes a str with the idna codec,
            # whose first use imports it (and stringprep) on the reader's thread
            addr = host.encode("ascii") if host.isascii() else host
            sock = socket.create_connection((addr, port),  # type: ignore[arg-type]
                                            timeout=self._connect_timeout)
        except TimeoutError as err:
            raise httpx.ConnectTimeout(str(err) or "timed out") from err
        except OSError as err:
            raise httpx.ConnectError(str(err)) from err
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                sock = self._tls().wrap_socket(sock, server_hostname=host)
            sock.settimeout(self._timeout)
        except TimeoutError as err:
            sock.close()
            raise httpx.ConnectTimeout(str(err) or "timed out") from err
        except (OSError, ssl.SSLError) as err:
            sock.close()
            raise httpx.ConnectError(str(err)) from err
        with self._lock:
            self.connections += 1
        return _Conn(key, sock)

    def close(self) -> None:
        """Close the idle connections; bodies being read finish and close theirs.
        Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle, self._nidle = self._idle, {}, 0
        for conns in idle.values():
            for conn in conns:
                conn.sock.close()
