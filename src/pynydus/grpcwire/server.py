"""A gRPC server on a unix socket: our own HTTP/2 (``connection``) and plain threads.

It serves whatever method table it is handed (``rpc.Method`` by ``:path``) and knows
nothing of the service behind it. Why not grpcio: through containerd, a read-only
snapshots call costs ~0.03 ms in the service and ~0.4 ms in grpcio's machinery
(completion queue, hand-off to a Python worker thread, generic handlers), and
containerd 1.6 sends one Stat per snapshot during a List.

Theory of operation:

* One I/O thread runs a selector over the listener and every connection (non-blocking
  sockets): it accepts, reads, feeds each connection's ``H2Connection``, writes what
  can be written and keeps the clocks (preface, idle, stalled streams, a peer that
  does not read). Connections cost a socket and some state, never a thread.
* Cheap calls (those the service's ``inline`` hook returns ready to run) run right on
  the I/O thread: no thread hand-off, which is where the latency went. Everything else
  goes to a fixed set of worker threads, started with the server (no thread is created
  after start-up, so a pids limit reached later cannot take the server down).
* Workers take calls round-robin by connection, and one connection runs at most
  ``per_connection`` of them at once; its other calls wait in its own queue, bounded by
  its stream limit. A call reset by the client before it started is dropped from that
  queue, so a flood of resets costs parsing only.
* A unary call's worker queues the response and is done: the response leaves as flow
  control allows, without a thread waiting for it. A List producer stays at most
  ``_LIST_AHEAD`` bytes ahead of the client's window and waits (bounded) for credit.
* Nothing waits on a client forever: a response (or a List's next batch) that gets no
  credit for ``Timeouts.stall``, and a request body that stops arriving for
  ``Timeouts.body``, cancel their stream (RST_STREAM CANCEL); a socket the peer stops
  reading for ``Timeouts.write`` is closed, as are connections without a preface after
  ``Timeouts.preface`` and idle ones after ``Timeouts.idle``. At ``max_connections``
  a new connection takes the place of the oldest one without a preface, else of the
  one idle longest; only when all are busy is it closed at accept.
* One lock per connection guards its ``H2Connection`` and output buffer; its condition
  wakes List producers when credit arrives or the socket drains.
* Failures: an error while serving one connection closes that connection; accept errors
  that pass (descriptor limits) pause accepting briefly. If the I/O thread itself
  cannot go on, ``on_fatal`` is called: the process should exit non-zero, so that its
  supervisor restarts it, rather than live on without serving.
* Stop: close the listener, GOAWAY on every connection, wait up to ``grace`` for calls
  queued or running and responses still leaving, then close the connections.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynydus.grpcwire.connection import (
    H2Connection,
    HoldBudget,
    Limits,
    Request,
    StreamReset,
    Terminated,
)
from pynydus.grpcwire.rpc import STATUS_CODES, Inline, Method, RpcAbort
from pynydus.host.unixsock import allowed_peer, bind_private, peer_creds

log = logging.getLogger(__name__)

_CODES = STATUS_CODES
# A List producer stays at most this far ahead of the client's flow-control window.
_LIST_AHEAD = 256 << 10
# Bytes waiting for one socket before a List producer waits for the peer to read.
_MAX_OUTBUF = 4 << 20
# A server stream's messages are written once this many bytes are queued (or at its end).
_STREAM_WRITE = 64 << 10
# How long a PING ACK may wait for a response to travel with. Go's client pings after
# each response it reads (BDP estimation) and sends its next call right after: one write
# and one wake-up of containerd's reader instead of two. Only its RTT estimate sees this.
_PING_ACK_DELAY = 0.002
_TICK = 0.25  # housekeeping period of the I/O thread
# Detached calls (a proxy waiting on another service) running at once, each on its own thread.
MAX_DETACHED = 64
_READ_SIZE = 1 << 16
_ACCEPT_BATCH = 64
_ACCEPT_PAUSE = 0.5  # after EMFILE and the like
# accept(2) errors that pass: the process or system is out of something for a moment.
_ACCEPT_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EPERM}


@dataclass(frozen=True)
class Timeouts:
    """Seconds the server waits on a client before it gives up (module docstring)."""

    preface: float = 10.0  # accept -> the client's preface and SETTINGS
    idle: float = 300.0  # no stream open, nothing queued, running or leaving
    stall: float = 10.0  # a response or List batch that gets no flow-control credit
    body: float = 20.0  # a request body that stops arriving
    write: float = 20.0  # output the peer does not read from its socket


class _Call:
    __slots__ = ("conn", "deadline", "method", "request", "sid")

    def __init__(self, conn: _Conn, sid: int, method: Method, request: Any,
                 deadline: float | None) -> None:
        self.conn = conn
        self.sid = sid
        self.method = method
        self.request = request
        self.deadline = deadline


class _Conn:
    """One accepted connection: its HTTP/2 state, output buffer and queued calls."""

    def __init__(self, server: H2Server, sock: socket.socket, now: float) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.h2 = H2Connection(server.limits, server.budget, now)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.outbuf = bytearray()
        self.broken = False
        self.accepted = now
        self.last_active = now
        self.last_sent = now  # last time bytes left (or the buffer was empty)
        self.ping_due: float | None = None
        self.writing = False  # registered for EVENT_WRITE
        # scheduler state, guarded by the scheduler's lock
        self.queue: OrderedDict[int, _Call] = OrderedDict()
        self.running = 0
        self.ready = False

    def flush(self, defer_pings: bool = False) -> bool:
        """Move what the connection queued to the socket; caller holds ``lock``.
        True if bytes are left over (the I/O thread must watch for writability)."""
        out = self.h2.data_to_send(defer_pings)
        if self.broken:
            return False
        sent = 0
        if self.outbuf:
            self.outbuf += out
            sent = self._send(self.outbuf)
            del self.outbuf[:sent]
        elif out:  # the usual case: written straight, only a remainder is buffered
            sent = self._send(out)
            if sent < len(out) and not self.broken:
                self.outbuf += memoryview(out)[sent:]
        if self.broken:
            return False
        if sent or not self.outbuf:
            self.last_sent = time.monotonic()
        return bool(self.outbuf)

    def _send(self, data: bytes | bytearray) -> int:
        """Bytes the socket took now; a failed socket marks the connection broken."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as err:
            log.debug("connection write failed: %s", err)
            self.broken = True
            self.cond.notify_all()
            return 0

    def send_from_worker(self) -> None:
        """Flush after a worker's change; caller holds ``lock``."""
        if self.flush() and not self.writing:
            self.server._attend(self)


class _Scheduler:
    """Fixed worker threads taking calls round-robin by connection."""

    def __init__(self, workers: int, per_connection: int,
                 run: Callable[[_Call], None]) -> None:
        self._run = run
        self.per_connection = per_connection
        self.cv = threading.Condition()
        self.ready: deque[_Conn] = deque()
        self.inflight = 0  # calls queued or running
        self._stopping = False
        self.threads = [threading.Thread(target=self._work, name=f"h2-call-{i}", daemon=True)
                        for i in range(workers)]

    def start(self) -> None:
        for t in self.threads:
            t.start()  # RuntimeError if the system refuses a thread: start-up fails

    def _schedule(self, conn: _Conn) -> None:
        if conn.queue and not conn.ready and conn.running < self.per_connection:
            conn.ready = True
            self.ready.append(conn)
            self.cv.notify()

    def submit(self, call: _Call) -> None:
        with self.cv:
            call.conn.queue[call.sid] = call
            self.inflight += 1
            self._schedule(call.conn)

    def cancel(self, conn: _Conn, sid: int) -> bool:
        """Drop a call that has not started; True if there was one."""
        with self.cv:
            if conn.queue.pop(sid, None) is None:
                return False
            self.inflight -= 1
            self.cv.notify_all()
            return True

    def drop(self, conn: _Conn) -> None:
        """The connection is gone: its queued calls will never run."""
        with self.cv:
            self.inflight -= len(conn.queue)
            conn.queue.clear()
            self.cv.notify_all()

    def idle(self) -> bool:
        return self.inflight == 0

    def stop(self) -> None:
        with self.cv:
            self._stopping = True
            for conn in self.ready:
                self.inflight -= len(conn.queue)
                conn.queue.clear()
            self.ready.clear()
            self.cv.notify_all()

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.ready and not self._stopping:
                    self.cv.wait()
                if self._stopping:
                    return
                conn = self.ready.popleft()
                conn.ready = False
                if not conn.queue:
                    continue
                _, call = conn.queue.popitem(last=False)
                conn.running += 1
                self._schedule(conn)
            try:
                self._run(call)
            except Exception:  # never lose a worker thread to a bug
                log.exception("%s: unexpected error in the HTTP/2 server", call.method.name)
            finally:
                with self.cv:
                    conn.running -= 1
                    self.inflight -= 1
                    self._schedule(conn)
                    # Every idle worker, though one notify would do: on the 2-vCPU VM the
                    # ones it wakes keep the CPUs busy while the next commit's fdatasync
                    # completes (ours, or containerd's right after our answer), which a
                    # halted vCPU makes 2-4x slower; a targeted notify halved a bare call
                    # but doubled writes through containerd (docs/benchmarks.md, "What a
                    # write call waits for").
                    self.cv.notify_all()


class H2Server:
    """Serves ``methods`` (by ``:path``) on a listening socket; ``stop()`` mirrors
    grpc.Server.stop."""

    def __init__(self, methods: Mapping[str, Method], listener: socket.socket, *, workers: int,
                 limits: Limits, inline: Inline | None = None,
                 per_connection: int | None = None, max_connections: int = 256,
                 timeouts: Timeouts = Timeouts(),
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.methods = methods
        self.inline = inline
        self.limits = limits
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.budget = HoldBudget()
        self.on_fatal = on_fatal
        self._listener = listener
        listener.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._attention: deque[_Conn] = deque()
        self._pinged: dict[int, _Conn] = {}  # connections holding PING ACKs back
        self._stopping = False
        self._closing = False  # the I/O thread closes everything and ends
        self._accept_paused_until = 0.0
        self._last_refusal_log = 0.0
        #: (uid, gid) -> whether that peer may talk to us (unix sockets; None: anyone)
        self.allow_peer: Callable[[int, int], bool] | None = None
        self.scheduler = _Scheduler(workers, per_connection or max(1, workers // 2), self._run)
        self._detached = threading.BoundedSemaphore(MAX_DETACHED)
        self._io = threading.Thread(target=self._io_main, name="h2-io", daemon=True)

    # --- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers and the I/O thread; RuntimeError if threads cannot start."""
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.scheduler.start()
        self._io.start()

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stop accepting, GOAWAY, let calls queued or running and responses still
        leaving finish for up to ``grace`` seconds, then close every connection.
        Returns an event set when all is closed."""
        done = threading.Event()
        self._stopping = True
        self._wake()

        def finish() -> None:
            end = time.monotonic() + (grace or 0.0)
            while time.monotonic() < end and not self._drained():
                time.sleep(0.02)
            self.scheduler.stop()
            self._closing = True
            self._wake()
            self._io.join(timeout=10)
            done.set()

        threading.Thread(target=finish, name="h2-stop", daemon=True).start()
        return done

    def _drained(self) -> bool:
        if not self.scheduler.idle():
            return False
        for conn in list(self._conns.values()):
            with conn.lock:
                if not conn.broken and (conn.h2.output_waiting or conn.outbuf):
                    return False
        return True

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already, or we are closed

    def _attend(self, conn: _Conn) -> None:
        """A worker left output in ``conn``'s buffer: the I/O thread watches it."""
        self._attention.append(conn)
        self._wake()

    # --- the I/O thread --------------------------------------------------------------

    def _io_main(self) -> None:
        try:
            self._io_loop()
        except BaseException as err:
            log.critical("the gRPC server's I/O thread failed: %r", err, exc_info=True)
            if self.on_fatal is not None:
                self.on_fatal(err)
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._sel.close()
            for s in (self._listener, self._wake_r, self._wake_w):
                try:
                    s.close()
                except OSError:
                    pass

    def _io_loop(self) -> None:
        next_tick = time.monotonic() + _TICK
        listening = True
        while not self._closing:
            now = time.monotonic()
            timeout = max(0.0, next_tick - now)
            for conn in self._pinged.values():
                if conn.ping_due is not None:
                    timeout = min(timeout, max(0.0, conn.ping_due - now))
            events = self._sel.select(timeout)
            now = time.monotonic()
            for key, mask in events:
                if key.fileobj is self._listener:
                    self._accept(now)
                elif key.fileobj is self._wake_r:
                    self._drain_wake()
                else:
                    self._serve_events(key.data, mask, now)
            while self._attention:
                conn = self._attention.popleft()
                if self._live(conn) and conn.outbuf and not conn.writing:
                    self._guarded(conn, self._watch_writes, True)
            if self._stopping and listening:
                listening = False
                self._stop_listening()
            for conn in list(self._pinged.values()):
                if conn.ping_due is None or now >= conn.ping_due:
                    self._guarded(conn, self._send_pings)
            if now >= next_tick:
                next_tick = now + _TICK
                self._housekeeping(now, listening)

    def _live(self, conn: _Conn) -> bool:
        """``conn`` is still served (its descriptor number may belong to a newer one)."""
        return self._conns.get(conn.fd) is conn

    def _guarded(self, conn: _Conn, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(conn, ...)``; an error closes that connection, never the server."""
        try:
            fn(conn, *args)
        except Exception:
            log.exception("gRPC connection failed; closing it")
            self._close(conn)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _accept(self, now: float) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as err:
                if self._stopping:
                    return
                if err.errno in _ACCEPT_TRANSIENT:
                    log.warning("cannot accept a gRPC connection (%s); pausing accepts", err)
                    self._sel.unregister(self._listener)
                    self._accept_paused_until = now + _ACCEPT_PAUSE
                    return
                raise  # the listener itself is broken: fatal
            if self.allow_peer is not None and not self._peer_allowed(sock):
                sock.close()
                continue
            if len(self._conns) >= self.max_connections and not self._evict_one():
                sock.close()
                if now - self._last_refusal_log > 10:
                    self._last_refusal_log = now
                    log.warning("refusing gRPC connections: %d open (the limit), all busy",
                                len(self._conns))
                continue
            try:
                sock.setblocking(False)
                conn = _Conn(self, sock, now)
                self._conns[conn.fd] = conn
                self._sel.register(sock, selectors.EVENT_READ, conn)
            except Exception:
                log.exception("cannot set up a gRPC connection")
                self._conns.pop(sock.fileno(), None)
                sock.close()
                continue
            self._guarded(conn, self._flush_io)
            if self._stopping:
                self._guarded(conn, self._goaway)

    def _peer_allowed(self, sock: socket.socket) -> bool:
        assert self.allow_peer is not None
        try:
            pid, uid, gid = peer_creds(sock)
        except OSError:
            return False
        if self.allow_peer(uid, gid):
            return True
        log.warning("refused a gRPC connection from pid %d (uid %d, gid %d)", pid, uid, gid)
        return False

    def _evict_one(self) -> bool:
        """At the connection limit, make room for a new connection: close the oldest one
        that has not sent its preface yet, else the one idle longest (no stream, nothing
        queued, running or leaving; a client reconnects when it needs us). False if
        every connection is busy."""
        silent = [c for c in self._conns.values() if not c.h2.established]
        if silent:
            victim = min(silent, key=lambda c: c.accepted)
        else:
            idle = [c for c in self._conns.values()
                    if not c.h2.open_streams and not c.queue and not c.running and not c.outbuf]
            if not idle:
                return False
            victim = min(idle, key=lambda c: c.last_active)
        log.info("connection limit (%d) reached: closing the %s connection", self.max_connections,
                 "oldest silent" if silent else "longest idle")
        self._close(victim)
        return True

    def _stop_listening(self) -> None:
        try:
            self._sel.unregister(self._listener)
        except (KeyError, ValueError):
            pass
        try:
            self._listener.close()
        except OSError:
            pass
        for conn in list(self._conns.values()):
            self._guarded(conn, self._goaway)

    def _goaway(self, conn: _Conn) -> None:
        with conn.lock:
            conn.h2.goaway()
        self._flush_io(conn)

    def _serve_events(self, conn: _Conn, mask: int, now: float) -> None:
        if not self._live(conn):
            return
        if mask & selectors.EVENT_WRITE:
            self._guarded(conn, self._flush_io)
        if mask & selectors.EVENT_READ and self._live(conn):
            self._guarded(conn, self._read, now)

    def _watch_writes(self, conn: _Conn, on: bool) -> None:
        if conn.writing != on and self._live(conn):
            conn.writing = on
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
            self._sel.modify(conn.sock, events, conn)

    def _flush_io(self, conn: _Conn) -> None:
        with conn.lock:
            left = conn.flush()
            conn.cond.notify_all()  # room in the buffer for a List producer
            broken = conn.broken
            closed = conn.h2.closed and not left
        if broken or closed:
            self._close(conn)
        else:
            self._watch_writes(conn, left)

    def _send_pings(self, conn: _Conn) -> None:
        conn.ping_due = None
        if self._pinged.get(conn.fd) is conn:
            del self._pinged[conn.fd]
        if self._live(conn):
            self._flush_io(conn)

    def _read(self, conn: _Conn, now: float) -> None:
        try:
            data = conn.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.last_active = now
        with conn.lock:
            conn.h2.now = now
            events = conn.h2.receive(data)
            left = conn.flush(defer_pings=True)
            conn.cond.notify_all()  # credit may have arrived for a List producer
            if conn.h2.pings_waiting and conn.ping_due is None:
                conn.ping_due = now + _PING_ACK_DELAY
                self._pinged[conn.fd] = conn
            broken = conn.broken
            closed = conn.h2.closed and not left
        # A call reset in the same read never reaches a worker (rapid reset costs parsing).
        reset = {ev.stream_id for ev in events if isinstance(ev, StreamReset)}
        for ev in events:
            if isinstance(ev, Request):
                if ev.stream_id not in reset:
                    self._dispatch(conn, ev)
            elif isinstance(ev, StreamReset):
                self.scheduler.cancel(conn, ev.stream_id)
                log.debug("stream %d reset by the client (%d)", ev.stream_id, ev.error_code)
            elif isinstance(ev, Terminated) and not ev.remote:
                log.warning("closing a gRPC connection: %s", ev.reason)
        if broken or closed:
            self._close(conn)
        else:
            self._watch_writes(conn, bool(conn.outbuf))

    def _housekeeping(self, now: float, listening: bool) -> None:
        if listening and self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._sel.register(self._listener, selectors.EVENT_READ, None)
        t = self.timeouts
        for conn in list(self._conns.values()):
            self._guarded(conn, self._check, now, t)

    def _check(self, conn: _Conn, now: float, t: Timeouts) -> None:
        with conn.lock:
            h2 = conn.h2
            h2.now = now
            if not h2.established and now - conn.accepted > t.preface:
                reason = "no HTTP/2 preface"
            elif conn.outbuf and now - conn.last_sent > t.write:
                reason = "the client does not read"
            elif (not h2.open_streams and not conn.outbuf and not conn.running
                  and not conn.queue and now - conn.last_active > t.idle):
                h2.goaway()
                conn.flush()
                reason = "idle"
            else:
                reason = ""
                for sid in h2.expired(now, t.body, t.stall):
                    h2.cancel(sid)
                    self.scheduler.cancel(conn, sid)
                    log.info("stream %d cancelled: the client stopped sending or reading", sid)
                h2.poll_credit()
        if reason:
            log.info("closing a gRPC connection: %s", reason)
            self._close(conn)
        else:
            self._flush_io(conn)

    def _close(self, conn: _Conn) -> None:
        if not self._live(conn):
            return  # closed already (its descriptor number may serve a newer one now)
        del self._conns[conn.fd]
        if self._pinged.get(conn.fd) is conn:
            del self._pinged[conn.fd]
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self.scheduler.drop(conn)
        with conn.lock:
            conn.broken = True
            conn.cond.notify_all()
        try:
            conn.sock.close()
        except OSError:
            pass

    # --- calls -----------------------------------------------------------------------

    def _fail(self, conn: _Conn, sid: int, code: str, message: str) -> None:
        with conn.lock:
            conn.h2.fail(sid, _CODES.get(code, _CODES["UNKNOWN"]), message)
            conn.send_from_worker()

    def _dispatch(self, conn: _Conn, req: Request) -> None:
        try:
            self._dispatch_call(conn, req)
        except Exception as err:  # a bug must cost one call, not the connection
            log.exception("stream %d (%s): unexpected error", req.stream_id, req.path)
            self._fail(conn, req.stream_id, "INTERNAL", f"{req.path}: internal error: {err}")

    def _dispatch_call(self, conn: _Conn, req: Request) -> None:
        method = self.methods.get(req.path)
        if method is None:
            self._fail(conn, req.stream_id, "UNIMPLEMENTED", f"unknown method {req.path}")
            return
        try:
            request = method.decode(req.message)
        except Exception as err:  # noqa: BLE001 - whatever the decoder raises: a bad message
            self._fail(conn, req.stream_id, "INTERNAL", f"{method.name}: bad request message: {err}")
            return
        if self._stopping:
            self._fail(conn, req.stream_id, "UNAVAILABLE", "the server is stopping")
            return
        deadline = None if req.timeout is None else time.monotonic() + req.timeout
        if method.detached:
            self._detach(conn, req.stream_id, method, request, deadline)
            return
        inline = self.inline
        call = None if inline is None else inline(method, request)
        if call is not None:
            if method.streaming:
                self._stream_now(conn, req.stream_id, call)
            else:
                self._unary(conn, req.stream_id, call)
            return
        self.scheduler.submit(_Call(conn, req.stream_id, method, request, deadline))

    def _detach(self, conn: _Conn, sid: int, method: Method, request: Any,
                deadline: float | None) -> None:
        """Run a detached method's call on a thread of its own (see ``Method``)."""
        if not self._detached.acquire(blocking=False):
            self._fail(conn, sid, "RESOURCE_EXHAUSTED",
                       f"{method.name}: {MAX_DETACHED} calls of this kind are running")
            return

        def run() -> None:
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._unary(conn, sid, lambda: method.call(request, left))
            except Exception:  # never let a bug pass silently
                log.exception("%s: unexpected error in the HTTP/2 server", method.name)
            finally:
                self._detached.release()
        try:
            threading.Thread(target=run, name=f"h2-detached-{sid}", daemon=True).start()
        except RuntimeError as err:  # "can't start new thread"
            self._detached.release()
            self._fail(conn, sid, "RESOURCE_EXHAUSTED", f"{method.name}: no thread: {err}")

    def _run(self, call: _Call) -> None:
        conn, sid = call.conn, call.sid
        with conn.lock:
            if conn.broken or not conn.h2.is_open(sid):
                return  # the client went away or cancelled while it waited
        if call.deadline is not None and time.monotonic() > call.deadline:
            self._fail(conn, sid, "DEADLINE_EXCEEDED", "deadline passed before the call started")
            return
        if call.method.streaming:
            self._stream(call)
        else:
            self._unary(conn, sid, lambda: call.method.call(call.request))

    def _unary(self, conn: _Conn, sid: int, call: Callable[[], Any]) -> None:
        """Run a unary call and queue its response; nothing waits for it to leave."""
        try:
            payload = call().SerializeToString()
        except RpcAbort as err:
            self._fail(conn, sid, err.code, err.message)
            return
        with conn.lock:
            conn.h2.now = time.monotonic()
            conn.h2.respond(sid, payload)
            conn.send_from_worker()

    def _stream_now(self, conn: _Conn, sid: int, call: Callable[[], Any]) -> None:
        """Run an inline server stream: ``call`` returns all its messages (a few), which
        leave in one write with the headers and trailers."""
        try:
            payloads = [msg.SerializeToString() for msg in call()]
        except RpcAbort as err:
            self._fail(conn, sid, err.code, err.message)
            return
        with conn.lock:
            h2 = conn.h2
            h2.now = time.monotonic()
            h2.start(sid)
            for payload in payloads:
                h2.send_message(sid, payload)
            h2.finish(sid, 0, "")
            conn.send_from_worker()

    def _stream(self, call: _Call) -> None:
        """Run a server-streaming call on a worker: its messages leave once
        ``_STREAM_WRITE`` bytes are queued, and at its end (a List of a few hundred
        snapshots in one write with its headers and trailers, not one write each), the
        producer held to the client's window (``_wait_for_room``)."""
        conn, sid = call.conn, call.sid
        with conn.lock:
            conn.h2.start(sid)
        code, text = 0, ""
        unsent = 0  # message bytes queued since the last write
        messages: Iterator[Any] = iter(call.method.call(call.request))
        try:
            for msg in messages:
                payload = msg.SerializeToString()
                with conn.lock:
                    conn.h2.now = time.monotonic()
                    conn.h2.send_message(sid, payload)
                    unsent += len(payload)
                    if unsent < _STREAM_WRITE:
                        continue
                    unsent = 0
                    conn.send_from_worker()
                    if not self._wait_for_room(conn, sid):
                        return  # the client went away, cancelled, or stopped reading
        except RpcAbort as err:
            code, text = _CODES.get(err.code, _CODES["UNKNOWN"]), err.message
        finally:
            close = getattr(messages, "close", None)
            if close is not None:
                close()  # a producer stopped early releases what it holds
        with conn.lock:
            conn.h2.finish(sid, code, text)
            conn.send_from_worker()

    def _wait_for_room(self, conn: _Conn, sid: int) -> bool:
        """Hold a producer until the client's window takes most of what is queued and the
        socket drains; caller holds ``conn.lock``. False (stream cancelled) when nothing
        moves for ``Timeouts.stall``, or the stream or connection is gone."""
        h2 = conn.h2
        last = (h2.pending(sid), len(conn.outbuf))
        since = time.monotonic()
        while not conn.broken and h2.is_open(sid) and (
                last[0] > _LIST_AHEAD or last[1] > _MAX_OUTBUF):
            conn.cond.wait(_TICK)
            now = time.monotonic()
            moved = (h2.pending(sid), len(conn.outbuf))
            if moved != last:
                last, since = moved, now
            elif now - since > self.timeouts.stall:
                log.info("stream %d cancelled: the client took no data for %.0f s", sid,
                         self.timeouts.stall)
                h2.cancel(sid)
                conn.send_from_worker()
                return False
        return not conn.broken and h2.is_open(sid)


def serve(methods: Mapping[str, Method], path: Path, *, workers: int, uid: int = 0, gid: int = 0,
          inline: Inline | None = None, limits: Limits | None = None,
          on_fatal: Callable[[BaseException], None] | None = None) -> H2Server:
    """Listen on unix socket ``path`` (already free) and start serving ``methods``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # 0660 owned by uid:gid whatever the umask; peers checked at accept: root, our uid,
    # the configured uid and members of the configured gid (containerd runs as root).
    bind_private(listener, str(path), 0o660, uid=uid if uid or gid else -1,
                 gid=gid if uid or gid else -1)
    listener.listen(128)
    server = H2Server(methods, listener, workers=workers, limits=limits or Limits(),
                      inline=inline, on_fatal=on_fatal)
    owner, group = (uid or None), (gid or None)
    server.allow_peer = lambda puid, pgid: allowed_peer(puid, pgid, group, owner)
    server.start()
    return server
