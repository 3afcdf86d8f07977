"""TCP for the blocking driver: connections, their write buffers, limits and sweeps.

The loop in server.py hands this module what is about TCP: a listener or a
connection that the selector found ready, a ``Send`` on TCP, a
``CloseConnection``, and once a second the sweep. What it gives back goes
through the loop as well: a chunk read is fed to the engine at once
(``handle``), a closed connection is queued for it (``queue``: a close may
happen while actions are performed, and performing never feeds the engine).

* Each connection, accepted or opened by us, gets an integer id, which is the
  engine's ``connection=``; a ``Send`` without one reuses the connection to its
  destination or opens one (non-blocking connect under ``tcp_connect_timeout``).
* Limits: ``max_tcp_connections`` in all, ``max_tcp_per_ip`` accepted from one
  address (refused at accept), ``tcp_send_buffer`` unsent bytes per connection
  (a peer that lets more pile up is not reading and is closed), and
  ``tcp_idle_timeout`` without a read.
* A connection the engine closes first writes what was queued (the answer that
  explains the close), for at most ``_CLOSE_FLUSH`` seconds.
* A listener that fails to accept (out of descriptors) rests until the next
  sweep instead of spinning the loop.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

import attrs

from sansio_sip import Address, Send, Transport

from ._report import Report
from ._seams import DrivenEngine, Input, MessageTrace
from ._sockets import address, format_addresses
from .options import DriverOptions

__all__ = ["TcpConnections"]

_CLOSE_FLUSH = 2.0  # a connection the engine closes gets this long to write what was queued
_SWEEP = 1.0  # how often idle connections, connect deadlines and paused listeners are checked


@attrs.define(eq=False)
class _Connection:
    """A TCP connection, accepted or opened by us; ``ident`` is the engine's connection id."""

    ident: int
    peer: Address
    accepted: bool
    sock: socket.socket
    connecting: bool = False
    outgoing: bytearray = attrs.field(factory=bytearray)
    last_read: float = attrs.field(factory=time.monotonic)
    close_by: float = math.inf  # connect deadline while connecting, flush deadline when closing
    closing: bool = False
    reason: str = "closed by peer"
    interest: int = selectors.EVENT_READ
    local: Address = ("", 0)


class TcpConnections:
    """The server's TCP connections and listeners, registered with its ``selector``.

    ``handle`` feeds an input to the engine now, ``queue`` queues one for the loop
    to feed, ``transport_failed`` reports a ``Send`` that found no connection."""

    def __init__(
        self,
        engine: DrivenEngine,
        options: DriverOptions,
        selector: selectors.BaseSelector,
        report: Report,
        trace: MessageTrace | None,
        *,
        handle: Callable[[Input], None],
        queue: Callable[[Input], None],
        transport_failed: Callable[[Send, str], None],
    ) -> None:
        self._engine = engine
        self._options = options
        self._selector = selector
        self._report = report
        self._counters = report.counters
        self._trace = trace
        self._handle = handle
        self._queue = queue
        self._transport_failed = transport_failed
        self.connections: dict[int, _Connection] = {}
        self._by_peer: dict[Address, int] = {}
        self._per_ip: Counter[str] = Counter()
        self._paused_listeners: dict[socket.socket, float] = {}
        self._next_ident = 1
        self._next_sweep = 0.0

    # -- what the loop calls -----------------------------------------------------------------

    def listen(self, listener: socket.socket) -> None:
        """Accept connections on ``listener`` when the selector finds it readable."""
        self._selector.register(listener, selectors.EVENT_READ, partial(self._accept, listener))

    def sweep_deadline(self) -> float:
        """When the next sweep is due (infinity when there is nothing to sweep)."""
        if self.connections or self._paused_listeners:
            return self._next_sweep
        return math.inf

    def sweep_if_due(self, now: float) -> None:
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP
            self._sweep(now)

    def close_all(self) -> None:
        """Close every connection without telling the engine (the server is stopping)."""
        for conn in list(self.connections.values()):
            self._forget(conn)

    def send(self, action: Send) -> None:
        """Queue ``action.data`` on its connection (opened when there is none) and write."""
        conn: _Connection | None
        if action.connection is not None:
            conn = self.connections.get(action.connection)
            if conn is None:
                self._report.dropped(
                    "tcp_send_no_connection", "tcp.connection_gone", action.destination
                )
                return
        else:
            ident = self._by_peer.get(action.destination)
            conn = self.connections.get(ident) if ident is not None else None
            if conn is None:
                if len(self.connections) >= self._options.max_tcp_connections:
                    self._transport_failed(action, "too many connections")
                    return
                conn = self._connect(action.destination)
                if conn is None:
                    self._transport_failed(action, "connect failed")
                    return
        if conn.closing:
            self._report.dropped(
                "tcp_send_no_connection", "tcp.connection_gone", action.destination
            )
            return
        conn.outgoing += action.data
        if len(conn.outgoing) > self._options.tcp_send_buffer:
            # The peer reads slower than we write: better to close than to buffer forever.
            self._report.dropped("tcp_slow_peer", "tcp.slow_peer", conn.peer)
            self._close(conn, "peer not reading")
            return
        self._counters["tcp_sent"] += 1
        if self._trace is not None:
            self._report.traced(
                self._trace.sent,
                action.data,
                destination=conn.peer,
                local=conn.local,
                transport=Transport.TCP,
                wall=time.time(),
            )
        if not conn.connecting:
            self._flush(conn)

    def close_connection(self, ident: int, reason: str) -> None:
        """Close once what is queued has been written (the answer that explains the close),
        but no later than ``_CLOSE_FLUSH`` seconds from now."""
        conn = self.connections.get(ident)
        if conn is None:
            return
        conn.closing, conn.reason = True, reason
        conn.close_by = min(conn.close_by, time.monotonic() + _CLOSE_FLUSH)
        if not conn.outgoing and not conn.connecting:
            self._close(conn, reason)

    # -- the selector's callbacks ------------------------------------------------------------

    def _accept(self, listener: socket.socket, _mask: int) -> None:
        options = self._options
        for _ in range(options.udp_batch):
            try:
                sock, sockaddr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # Out of descriptors (EMFILE) and the like: the listener would stay readable
                # and spin the loop, so it rests until the next sweep.
                self._counters["tcp_accept_errors"] += 1
                self._report.note("warning", "tcp.accept_failed", error=repr(exc))
                self._selector.unregister(listener)
                self._paused_listeners[listener] = time.monotonic() + 0.1
                return
            peer = address(sockaddr)
            if len(self.connections) >= options.max_tcp_connections:
                refusal = "too many connections"
            elif self._per_ip[peer[0]] >= options.max_tcp_per_ip:
                refusal = "too many connections from this address"
            else:
                refusal = ""
            if refusal:
                self._counters["tcp_refused"] += 1
                self._report.note(
                    "warning", "tcp.refused", peer=format_addresses([peer]), reason=refusal
                )
                sock.close()
                continue
            self._counters["tcp_accepted"] += 1
            sock.setblocking(False)
            self._new_connection(peer, sock, accepted=True)

    def _on_connection(self, conn: _Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            if conn.connecting:
                code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._connect_failed(conn, os.strerror(code))
                    return
                conn.connecting, conn.close_by = False, math.inf
                self._counters["tcp_connected"] += 1
            self._flush(conn)
        if mask & selectors.EVENT_READ and conn.ident in self.connections:
            try:
                chunk = conn.sock.recv(self._options.tcp_read_size)
            except BlockingIOError:
                return
            except OSError as exc:
                self._close(conn, f"broken: {exc!r}")
                return
            if not chunk:
                self._close(conn, "closed by peer")
                return
            conn.last_read = time.monotonic()
            if self._trace is not None:
                self._report.traced(
                    self._trace.received,
                    chunk,
                    source=conn.peer,
                    local=conn.local,
                    transport=Transport.TCP,
                    connection=conn.ident,
                    wall=time.time(),
                )
            feed = partial(
                self._engine.receive,
                chunk,
                source=conn.peer,
                transport=Transport.TCP,
                connection=conn.ident,
            )
            self._handle(Input(feed, "tcp", chunk))

    # -- connections -------------------------------------------------------------------------

    def _connect(self, destination: Address) -> _Connection | None:
        """Start a non-blocking connect; the connection is usable for queueing at once."""
        family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(destination)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._report.note(
                "warning",
                "tcp.connect_failed",
                peer=format_addresses([destination]),
                error=os.strerror(code),
            )
            return None
        conn = self._new_connection(destination, sock, accepted=False, connecting=code != 0)
        conn.close_by = time.monotonic() + self._options.tcp_connect_timeout if code else math.inf
        return conn

    def _flush(self, conn: _Connection) -> None:
        if conn.outgoing:
            try:
                sent = conn.sock.send(conn.outgoing)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._close(conn, f"write failed: {exc!r}")
                return
            del conn.outgoing[:sent]
        if conn.closing and not conn.outgoing:
            self._close(conn, conn.reason)
            return
        self._update_interest(conn)

    def _update_interest(self, conn: _Connection) -> None:
        interest = (
            selectors.EVENT_WRITE
            if conn.connecting
            else selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outgoing else 0)
        )
        if interest != conn.interest:
            conn.interest = interest
            self._selector.modify(conn.sock, interest, partial(self._on_connection, conn))

    def _close(self, conn: _Connection, reason: str) -> None:
        """Close and tell the engine (queued: this may run while actions are performed)."""
        if conn.ident not in self.connections:
            return
        self._forget(conn)
        self._report.note("debug", "tcp.closed", peer=format_addresses([conn.peer]), reason=reason)
        self._queue(Input(partial(self._engine.connection_closed, conn.ident), "connection_closed"))

    def _connect_failed(self, conn: _Connection, error: str) -> None:
        self._forget(conn)
        self._report.note(
            "warning", "tcp.connect_failed", peer=format_addresses([conn.peer]), error=error
        )
        feed = partial(self._engine.transport_failed, conn.peer, Transport.TCP)
        self._handle(Input(feed, "transport_failed"))

    def _sweep(self, now: float) -> None:
        """Idle connections, connect and close-flush deadlines, listeners resting after EMFILE."""
        idle = self._options.tcp_idle_timeout
        for conn in list(self.connections.values()):
            if now >= conn.close_by:
                if conn.connecting:
                    self._connect_failed(conn, "connect timed out")
                else:
                    self._close(conn, conn.reason)
            elif now - conn.last_read >= idle and not conn.connecting:
                self._counters["tcp_closed_idle"] += 1
                self._close(conn, "idle")
        for listener, resume in list(self._paused_listeners.items()):
            if now >= resume:
                del self._paused_listeners[listener]
                self.listen(listener)

    def _new_connection(
        self, peer: Address, sock: socket.socket, *, accepted: bool, connecting: bool = False
    ) -> _Connection:
        conn = _Connection(self._next_ident, peer, accepted, sock, connecting=connecting)
        with contextlib.suppress(OSError):  # bound on accept, and by connect_ex
            conn.local = address(sock.getsockname())
        conn.interest = selectors.EVENT_WRITE if connecting else selectors.EVENT_READ
        self._next_ident += 1
        self.connections[conn.ident] = conn
        self._by_peer[peer] = conn.ident
        if accepted:
            self._per_ip[peer[0]] += 1
        self._selector.register(sock, conn.interest, partial(self._on_connection, conn))
        return conn

    def _forget(self, conn: _Connection) -> None:
        if self.connections.pop(conn.ident, None) is None:
            return
        if self._by_peer.get(conn.peer) == conn.ident:
            del self._by_peer[conn.peer]
        if conn.accepted:
            self._per_ip[conn.peer[0]] -= 1
            if self._per_ip[conn.peer[0]] <= 0:
                del self._per_ip[conn.peer[0]]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        if self._trace is not None:
            self._report.traced(self._trace.connection_closed, conn.ident)
