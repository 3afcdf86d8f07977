"""The blocking driver: one sans-IO SIP engine served with plain sockets and ``selectors``.

This is the smallest complete example of driving ``sansio_sip``: no asyncio,
no threads. The loop (``_run``) takes the same steps as io_anyio/server.py:

1. wait (``select``) for input or the next deadline: the engine's, or the
   driver's own (relay poll, write retries, shutdown phases, TCP sweeps);
2. read the clock once per input; when the timer woke the loop, ``now`` is the
   later of the deadline and the clock;
3. feed the engine;
4. perform the returned actions in order;
5. re-arm the timer only if ``next_timer()`` moved.

Results of back-end calls (an account, a media allocation) are queued as
inputs and fed before the loop waits again; performing never calls back into
the engine.

The trade-off: the account store and the relay are called inline, so while
one of them works nothing else does. SQLite answers a cached account look-up
in microseconds and a record write in about a millisecond, and the relay
answers from loopback in well under one; their own deadlines (SQLite's busy
timeout, the relay client's retries) bound the worst case. A look-up that took
longer than ``store_timeout`` is answered 503 all the same, as io_anyio answers
one it abandons at that deadline. A host that needs
the loop to stay responsive whatever the store does runs io_anyio, which calls
them in worker threads under a deadline. A failed record write does not block
the loop either way: it and the actions after it wait in a retry list.

Observing (as in io_anyio): an optional ``MessageTrace`` is told of every
datagram and TCP chunk read and every message sent, an optional ``on_record``
callback sees every call record as it is performed; both run in the loop, must
not block, and their failures are counted (``trace_errors``), never fatal.
``call_in_loop`` lets another thread (the control endpoint) run a function in
the loop between two engine calls: the request goes through a deque and the
same wake-up socket ``shutdown`` uses, and the caller gives up after a timeout.

The driver knows no SIP: addresses, connection ids and bytes are all it sees.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import math
import os
import selectors
import signal
import socket
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from functools import partial
from types import FrameType
from typing import Any, NamedTuple, Protocol, TypeVar, assert_never

import attrs

from sansio_sip import (
    Account,
    AccountStore,
    Action,
    Address,
    AllocateMedia,
    CallRecord,
    CallRecordData,
    CloseConnection,
    Log,
    LookupAccount,
    MediaAllocation,
    MediaRelay,
    MediaUnavailable,
    ReleaseMedia,
    Send,
    StoreUnavailable,
    Transport,
    UpdateMedia,
)

from .options import DriverOptions

__all__ = ["DrivenEngine", "MessageTrace", "Server", "serve"]

T = TypeVar("T")
LogSink = Callable[[Log], None]
RecordSink = Callable[[CallRecordData], None]

_TIMER_BUG_BACKOFF = 0.1  # see io_anyio: an engine bug must not make the loop spin
_CLOSE_FLUSH = 2.0  # a connection the engine closes gets this long to write what was queued
_SWEEP = 1.0  # how often idle connections, connect deadlines and paused listeners are checked
_SHUTDOWN_POLL = 0.1  # how often a shutdown phase looks at the engine


class DrivenEngine(Protocol):
    """The part of ``sansio_sip.Engine`` a driver calls (keyword ``now``/``wall`` everywhere)."""

    def receive(
        self,
        data: bytes,
        *,
        source: Address,
        transport: Transport,
        now: float,
        wall: float,
        connection: int | None = None,
    ) -> list[Action]: ...
    def connection_closed(self, connection: int, *, now: float, wall: float) -> list[Action]: ...
    def handle_timer(self, *, now: float, wall: float) -> list[Action]: ...
    def next_timer(self) -> float | None: ...
    def account_found(
        self, token: int, account: Account | None, *, now: float, wall: float
    ) -> list[Action]: ...
    def account_unavailable(self, token: int, *, now: float, wall: float) -> list[Action]: ...
    def media_allocated(
        self, token: int, allocation: MediaAllocation, *, now: float, wall: float
    ) -> list[Action]: ...
    def media_failed(self, token: int, reason: str, *, now: float, wall: float) -> list[Action]: ...
    def media_ended(
        self, call_ref: str, reason: str, *, now: float, wall: float
    ) -> list[Action]: ...
    def transport_failed(
        self, destination: Address, transport: Transport, *, now: float, wall: float
    ) -> list[Action]: ...
    def stop_accepting(self, *, now: float, wall: float) -> list[Action]: ...
    def end_all_calls(self, *, now: float, wall: float) -> list[Action]: ...
    @property
    def active_calls(self) -> int: ...
    @property
    def idle(self) -> bool: ...


class MessageTrace(Protocol):
    """Told of every SIP datagram or TCP chunk read and every message sent (in the loop:
    it must not block). ``local`` is our socket's address (("", 0) when unknown);
    ``connection`` the TCP connection id (None on UDP)."""

    def received(
        self,
        data: bytes,
        *,
        source: Address,
        local: Address,
        transport: Transport,
        connection: int | None,
        wall: float,
    ) -> None: ...
    def sent(
        self,
        data: bytes,
        *,
        destination: Address,
        local: Address,
        transport: Transport,
        wall: float,
    ) -> None: ...
    def connection_closed(self, connection: int) -> None: ...


class _Input(NamedTuple):
    """One thing for the engine: ``feed(now=..., wall=...)``, a name and the bytes (for bug reports)."""

    feed: Callable[..., Sequence[Action]]
    what: str
    data: bytes = b""


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


@attrs.define(eq=False)
class _Retry:
    """A store write that failed, and the actions that wait for it."""

    what: str
    write: Callable[[], None]
    then: Sequence[Action]
    due: float
    delay: float
    attempt: int = 1
    record: CallRecord | None = None


class Server:
    """Serves one engine on UDP and TCP at every ``options.listen`` address.

    ``store`` and ``relay`` (None: no media relay, calls fail with the engine's
    answer to ``media_failed``) are called inline. ``log`` receives the
    engine's ``Log`` actions and the driver's own events; ``trace`` and
    ``on_record`` observe messages and call records (module docstring).
    ``serve()`` blocks; ``shutdown()`` and ``call_in_loop()`` may be called from
    any thread (``shutdown`` also from a signal handler).
    """

    def __init__(
        self,
        engine: DrivenEngine,
        *,
        store: AccountStore,
        relay: MediaRelay | None,
        options: DriverOptions | None = None,
        log: LogSink | None = None,
        trace: MessageTrace | None = None,
        on_record: RecordSink | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._relay = relay
        self._options = options or DriverOptions()
        self._log_sink = log
        self._trace = trace
        self._on_record = on_record
        self._udp_local: dict[socket.socket, Address] = {}
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._loop_thread: int | None = None
        self._serving = False
        self._selector = selectors.DefaultSelector()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)  # a full pair means a wake-up is pending
        self._pending: deque[_Input] = deque()
        self._retries: list[_Retry] = []
        self._udp: list[socket.socket] = []
        self._udp_by_family: dict[socket.AddressFamily, socket.socket] = {}
        self._listeners: list[socket.socket] = []
        self._paused_listeners: dict[socket.socket, float] = {}
        self._connections: dict[int, _Connection] = {}
        self._by_peer: dict[Address, int] = {}
        self._per_ip: Counter[str] = Counter()
        self._next_ident = 1
        self._counters: Counter[str] = Counter()
        self._shutdown_requests = 0
        self._signals: list[int] = []
        self._phase = "serving"  # → "grace" → "drain" → "done"
        self._phase_until = math.inf
        self._next_poll = 0.0
        self._next_sweep = 0.0
        self.addresses: list[Address] = []
        """The bound (host, port) of each listen address, set once ``serve`` has bound them."""

    # -- lifecycle ---------------------------------------------------------------------------

    def serve(self, *, started: Callable[[list[Address]], None] | None = None) -> None:
        """Bind, serve until ``shutdown()`` (or SIGINT/SIGTERM) has run its course, close.
        ``started`` is called with the bound addresses once the sockets listen."""
        self._bind()
        previous = self._install_signals()
        self._loop_thread = threading.get_ident()
        self._serving = True
        try:
            for sock in (self._wake_out, *self._udp, *self._listeners):
                sock.setblocking(False)
            self._selector.register(self._wake_out, selectors.EVENT_READ, self._on_wake)
            for sock in self._udp:
                self._selector.register(
                    sock, selectors.EVENT_READ, partial(self._receive_udp, sock)
                )
            for listener in self._listeners:
                self._selector.register(
                    listener, selectors.EVENT_READ, partial(self._accept_tcp, listener)
                )
            self._note("info", "driver.listening", addresses=_format(self.addresses))
            if started is not None:
                started(list(self.addresses))
            self._run()
        finally:
            self._serving = False
            self._run_calls()  # a call that raced the end gets an answer, not a timeout
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for conn in list(self._connections.values()):
                self._forget(conn)
            for sock in (*self._udp, *self._listeners, self._wake_in, self._wake_out):
                sock.close()
            self._selector.close()
            self._note("info", "driver.stopped", **self.stats())

    def shutdown(self) -> None:
        """Graceful stop: new calls refused, running calls given ``grace_period``, then
        ended; a second call ends every call at once. Safe from any thread or a signal."""
        self._shutdown_requests += 1
        with contextlib.suppress(OSError):
            self._wake_in.send(b"!")

    def stats(self) -> dict[str, int]:
        """Driver counters (datagrams, drops, connections, engine bugs, store retries ...)."""
        figures = dict(self._counters)
        figures["tcp_connections"] = len(self._connections)
        figures["records_pending"] = sum(1 for retry in self._retries if retry.record)
        return figures

    def call_in_loop(self, func: Callable[[], T], *, timeout: float) -> T:
        """Run ``func`` in the loop, between two engine calls, and return its result (or
        raise its exception). Thread-safe: how another thread reads or changes the engine,
        which is not. Raises TimeoutError when the loop has not run it within ``timeout``
        seconds (it is then never run), RuntimeError when the server is not serving."""
        if threading.get_ident() == self._loop_thread:
            return func()
        if not self._serving:
            raise RuntimeError("the server is not serving")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.append((func, future))
        with contextlib.suppress(OSError):  # full: a wake-up is already pending
            self._wake_in.send(b"c")
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.cancel():
                raise TimeoutError(f"the driver loop did not answer within {timeout} s") from None
            return future.result()  # it started meanwhile: it is quick, take its answer

    def _run_calls(self) -> None:
        while self._calls:
            func, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = func()
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def _install_signals(self) -> dict[int, Any]:
        if (
            not self._options.handle_signals
            or threading.current_thread() is not threading.main_thread()
        ):
            return {}

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            # Nothing but a wake-up here: the handler may interrupt the loop in the middle of
            # writing a log line, under the logger's lock.
            self._signals.append(signum)
            self.shutdown()

        return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _on_wake(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_out.recv(4096)
        self._run_calls()
        while self._signals:
            self._note("info", "server.signal", signal=signal.Signals(self._signals.pop(0)).name)
        if self._shutdown_requests and self._phase == "serving":
            self._note("info", "server.stopping", active_calls=self._engine.active_calls)
            self._handle(_Input(self._engine.stop_accepting, "stop_accepting"))
            self._phase, self._phase_until = "grace", time.monotonic() + self._options.grace_period

    def _advance_shutdown(self, now: float) -> None:
        engine = self._engine
        if self._phase == "grace" and (
            engine.active_calls == 0 or self._shutdown_requests > 1 or now >= self._phase_until
        ):
            self._handle(_Input(engine.end_all_calls, "end_all_calls"))
            self._phase, self._phase_until = "drain", now + self._options.drain_period
        elif self._phase == "drain" and (
            (engine.idle and not self._retries) or now >= self._phase_until
        ):
            for retry in self._retries:
                self._unwritten(retry)
            self._phase = "done"

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self._engine
        deadline = self._next_timer(None)
        timer_at = deadline
        while self._phase != "done":
            # 1. wait for input or the earliest deadline; each ready socket's handler reads,
            #    feeds the engine (2, 3) and performs the actions (4) at once
            for key, mask in self._selector.select(self._wait_time(timer_at)):
                key.data(mask)
            self._drain()  # results of back-end calls, closed connections
            # 2-4. the engine's timer, then the driver's own deadlines
            now = time.monotonic()
            fired = timer_at is not None and now >= timer_at
            if fired:
                self._handle(_Input(engine.handle_timer, "timer"), not_before=deadline)
            self._housekeeping(now)  # relay poll, TCP sweep, write retries, shutdown phases
            self._drain()
            # 5. re-arm only if the engine's next deadline moved
            next_deadline = self._next_timer(deadline)
            if next_deadline != deadline:
                deadline = timer_at = next_deadline
            elif fired:
                # The timer fired and the deadline did not move: an engine bug (it raised,
                # or kept a past deadline). Try again a little later, never in a spin.
                timer_at = now + _TIMER_BUG_BACKOFF

    def _wait_time(self, timer_at: float | None) -> float | None:
        """Seconds until the earliest deadline, engine's or driver's; None waits for input."""
        deadlines = [self._phase_until if self._phase != "serving" else math.inf]
        if timer_at is not None:
            deadlines.append(timer_at)
        if self._phase != "serving":
            deadlines.append(time.monotonic() + _SHUTDOWN_POLL)
        if self._relay is not None:
            deadlines.append(self._next_poll)
        if self._connections or self._paused_listeners:
            deadlines.append(self._next_sweep)
        deadlines.extend(retry.due for retry in self._retries)
        earliest = min(deadlines)
        if earliest == math.inf:
            return None
        return max(0.0, earliest - time.monotonic())

    def _handle(self, item: _Input, *, not_before: float | None = None) -> None:
        """Feed ``item`` (its ``now`` no earlier than ``not_before``: a timer never fires
        before its deadline) and then every input its actions queued."""
        self._pending.appendleft(item)
        first = True
        while self._pending:
            current = self._pending.popleft()
            now, wall = time.monotonic(), time.time()
            if first and not_before is not None:
                now = max(now, not_before)
            actions = self._feed(current, now, wall)
            if actions is not None:
                self._perform(actions)
            first = False

    def _drain(self) -> None:
        """Feed what performing queued (results of back-end calls, closed connections)."""
        if self._pending:
            self._handle(self._pending.popleft())

    def _next_timer(self, previous: float | None) -> float | None:
        try:
            return self._engine.next_timer()
        except Exception as exc:
            self._feed(_Input(_raise(exc), "next_timer"), 0.0, 0.0)
            return previous

    def _feed(self, item: _Input, now: float, wall: float) -> Sequence[Action] | None:
        """Call the engine; an exception escaping it is a bug: logged with a hash of the
        input, counted, and the server goes on (STYLE.md §6). None marks that case."""
        try:
            return item.feed(now=now, wall=wall)
        except Exception as exc:
            self._counters["engine_bugs"] += 1
            self._note(
                "error",
                "engine.bug",
                input=item.what,
                input_sha256=hashlib.sha256(item.data).hexdigest()[:16],
                input_bytes=len(item.data),
                error=repr(exc),
                traceback="".join(traceback.format_exception(exc)),
            )
            return None

    def _perform(self, actions: Sequence[Action]) -> None:
        """Perform actions in order. Results for the engine are queued, never fed from here."""
        for index, action in enumerate(actions):
            match action:
                case Send():
                    self._send(action)
                case CloseConnection():
                    self._close_connection(action.connection, action.reason)
                case LookupAccount():
                    self._lookup_account(action)
                case AllocateMedia():
                    self._allocate_media(action)
                case UpdateMedia():
                    self._update_media(action)
                case ReleaseMedia():
                    self._release_media(action)
                case CallRecord():
                    if self._on_record is not None:
                        self._traced(self._on_record, action.record)
                    # Durability: what follows a record in the same list (typically the
                    # answer to a BYE) is performed only once the store has the record.
                    write = partial(self._store.write_call_record, action.record)
                    if not self._write_or_retry("record", write, actions[index + 1 :], action):
                        return
                case Log():
                    self._emit(action)
                case _:
                    assert_never(action)

    def _housekeeping(self, now: float) -> None:
        if self._phase != "serving":
            self._advance_shutdown(now)
        if self._relay is not None and now >= self._next_poll:
            self._next_poll = now + self._options.expire_poll
            self._poll_relay()
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP
            self._sweep(now)
        for retry in [retry for retry in self._retries if retry.due <= now]:
            self._retry(retry, now)

    # -- UDP ---------------------------------------------------------------------------------

    def _receive_udp(self, sock: socket.socket, _mask: int) -> None:
        engine, options = self._engine, self._options
        for _ in range(options.udp_batch):
            try:
                data, source = sock.recvfrom(options.max_datagram)
            except BlockingIOError:
                return
            except OSError as exc:
                # Linux reports some ICMP errors on the next receive; they name no request.
                self._counters["udp_receive_errors"] += 1
                self._note("debug", "udp.receive_error", error=repr(exc))
                continue
            self._counters["udp_received"] += 1
            peer = (source[0], source[1])
            if self._trace is not None:
                self._traced(
                    self._trace.received,
                    data,
                    source=peer,
                    local=self._udp_local[sock],
                    transport=Transport.UDP,
                    connection=None,
                    wall=time.time(),
                )
            feed = partial(engine.receive, data, source=peer, transport=Transport.UDP)
            self._handle(_Input(feed, "udp", data))

    def _send_udp(self, action: Send) -> None:
        host, port = action.destination
        sock = self._udp_by_family.get(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if sock is None:
            self._transport_failed(action, "no UDP socket of that address family")
            return
        try:
            sock.sendto(action.data, (host, port))
        except BlockingIOError:
            # The kernel's send buffer is full: as good as lost on the wire, and SIP's
            # retransmissions (§17.1.1.2) are built for exactly that.
            self._dropped("udp_send_dropped", "udp.send_buffer_full", action.destination)
            return
        except OSError as exc:
            self._transport_failed(action, repr(exc))
            return
        self._counters["udp_sent"] += 1
        if self._trace is not None:
            self._traced(
                self._trace.sent,
                action.data,
                destination=action.destination,
                local=self._udp_local[sock],
                transport=Transport.UDP,
                wall=time.time(),
            )

    # -- TCP ---------------------------------------------------------------------------------

    def _accept_tcp(self, listener: socket.socket, _mask: int) -> None:
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
                self._note("warning", "tcp.accept_failed", error=repr(exc))
                self._selector.unregister(listener)
                self._paused_listeners[listener] = time.monotonic() + 0.1
                return
            peer = _address(sockaddr)
            if len(self._connections) >= options.max_tcp_connections:
                refusal = "too many connections"
            elif self._per_ip[peer[0]] >= options.max_tcp_per_ip:
                refusal = "too many connections from this address"
            else:
                refusal = ""
            if refusal:
                self._counters["tcp_refused"] += 1
                self._note("warning", "tcp.refused", peer=_format([peer]), reason=refusal)
                sock.close()
                continue
            self._counters["tcp_accepted"] += 1
            sock.setblocking(False)
            self._new_connection(peer, sock, accepted=True)

    def _connect_tcp(self, destination: Address) -> _Connection | None:
        """Start a non-blocking connect; the connection is usable for queueing at once."""
        family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(destination)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._note(
                "warning",
                "tcp.connect_failed",
                peer=_format([destination]),
                error=os.strerror(code),
            )
            return None
        conn = self._new_connection(destination, sock, accepted=False, connecting=code != 0)
        conn.close_by = time.monotonic() + self._options.tcp_connect_timeout if code else math.inf
        return conn

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
        if mask & selectors.EVENT_READ and conn.ident in self._connections:
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
                self._traced(
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
            self._handle(_Input(feed, "tcp", chunk))

    def _send_tcp(self, action: Send) -> None:
        conn: _Connection | None
        if action.connection is not None:
            conn = self._connections.get(action.connection)
            if conn is None:
                self._dropped("tcp_send_no_connection", "tcp.connection_gone", action.destination)
                return
        else:
            ident = self._by_peer.get(action.destination)
            conn = self._connections.get(ident) if ident is not None else None
            if conn is None:
                if len(self._connections) >= self._options.max_tcp_connections:
                    self._transport_failed(action, "too many connections")
                    return
                conn = self._connect_tcp(action.destination)
                if conn is None:
                    self._transport_failed(action, "connect failed")
                    return
        if conn.closing:
            self._dropped("tcp_send_no_connection", "tcp.connection_gone", action.destination)
            return
        conn.outgoing += action.data
        if len(conn.outgoing) > self._options.tcp_send_buffer:
            # The peer reads slower than we write: better to close than to buffer forever.
            self._dropped("tcp_slow_peer", "tcp.slow_peer", conn.peer)
            self._close(conn, "peer not reading")
            return
        self._counters["tcp_sent"] += 1
        if self._trace is not None:
            self._traced(
                self._trace.sent,
                action.data,
                destination=conn.peer,
                local=conn.local,
                transport=Transport.TCP,
                wall=time.time(),
            )
        if not conn.connecting:
            self._flush(conn)

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

    def _close_connection(self, ident: int, reason: str) -> None:
        """Close once what is queued has been written (the answer that explains the close),
        but no later than ``_CLOSE_FLUSH`` seconds from now."""
        conn = self._connections.get(ident)
        if conn is None:
            return
        conn.closing, conn.reason = True, reason
        conn.close_by = min(conn.close_by, time.monotonic() + _CLOSE_FLUSH)
        if not conn.outgoing and not conn.connecting:
            self._close(conn, reason)

    def _close(self, conn: _Connection, reason: str) -> None:
        """Close and tell the engine (queued: this may run while actions are performed)."""
        if conn.ident not in self._connections:
            return
        self._forget(conn)
        self._note("debug", "tcp.closed", peer=_format([conn.peer]), reason=reason)
        self._pending.append(
            _Input(partial(self._engine.connection_closed, conn.ident), "connection_closed")
        )

    def _connect_failed(self, conn: _Connection, error: str) -> None:
        self._forget(conn)
        self._note("warning", "tcp.connect_failed", peer=_format([conn.peer]), error=error)
        feed = partial(self._engine.transport_failed, conn.peer, Transport.TCP)
        self._handle(_Input(feed, "transport_failed"))

    def _sweep(self, now: float) -> None:
        """Idle connections, connect and close-flush deadlines, listeners resting after EMFILE."""
        idle = self._options.tcp_idle_timeout
        for conn in list(self._connections.values()):
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
                self._selector.register(
                    listener, selectors.EVENT_READ, partial(self._accept_tcp, listener)
                )

    def _new_connection(
        self, peer: Address, sock: socket.socket, *, accepted: bool, connecting: bool = False
    ) -> _Connection:
        conn = _Connection(self._next_ident, peer, accepted, sock, connecting=connecting)
        with contextlib.suppress(OSError):  # bound on accept, and by connect_ex
            conn.local = _address(sock.getsockname())
        conn.interest = selectors.EVENT_WRITE if connecting else selectors.EVENT_READ
        self._next_ident += 1
        self._connections[conn.ident] = conn
        self._by_peer[peer] = conn.ident
        if accepted:
            self._per_ip[peer[0]] += 1
        self._selector.register(sock, conn.interest, partial(self._on_connection, conn))
        return conn

    def _forget(self, conn: _Connection) -> None:
        if self._connections.pop(conn.ident, None) is None:
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
            self._traced(self._trace.connection_closed, conn.ident)

    # -- performing --------------------------------------------------------------------------

    def _send(self, action: Send) -> None:
        if action.transport is Transport.UDP:
            self._send_udp(action)
        else:
            self._send_tcp(action)

    def _transport_failed(self, action: Send, error: str) -> None:
        self._counters["send_failures"] += 1
        self._note(
            "warning",
            "transport.failed",
            destination=_format([action.destination]),
            transport=action.transport.value,
            error=error,
        )
        feed = partial(self._engine.transport_failed, action.destination, action.transport)
        self._pending.append(_Input(feed, "transport_failed"))

    def _lookup_account(self, action: LookupAccount) -> None:
        """Ask the store inline. A look-up that outlasted ``store_timeout`` is answered
        as unavailable (503), as io_anyio answers one it abandons at the deadline: the
        same answer from both drivers, only later here (nothing can cut a call short)."""
        engine = self._engine
        start = time.monotonic()
        try:
            account = self._store.get_account(action.username)
            took = time.monotonic() - start
            if took > self._options.store_timeout:
                raise TimeoutError(f"took {took:.3f} s, over store_timeout")
        except Exception as exc:
            self._backend_failed("store", "get_account", exc)
            self._pending.append(
                _Input(partial(engine.account_unavailable, action.token), "account")
            )
            return
        self._pending.append(
            _Input(partial(engine.account_found, action.token, account), "account")
        )

    def _allocate_media(self, action: AllocateMedia) -> None:
        engine, relay = self._engine, self._relay
        try:
            if relay is None:
                raise MediaUnavailable("no media relay configured")
            allocation = relay.allocate(action.call_ref, a_peer=action.a_peer, echo=action.echo)
        except Exception as exc:
            self._backend_failed("relay", "allocate", exc)
            reason = str(exc) or type(exc).__name__
            self._pending.append(
                _Input(partial(engine.media_failed, action.token, reason), "media")
            )
            return
        self._pending.append(
            _Input(partial(engine.media_allocated, action.token, allocation), "media")
        )

    def _update_media(self, action: UpdateMedia) -> None:
        if self._relay is None:
            return
        try:
            self._relay.update(
                action.call_ref,
                a_peer=action.a_peer,
                b_peer=action.b_peer,
                a_events=action.a_events,
                b_events=action.b_events,
            )
        except Exception as exc:
            self._backend_failed("relay", "update", exc)

    def _release_media(self, action: ReleaseMedia) -> None:
        if self._relay is None:
            return
        try:
            a_leg, b_leg = self._relay.release(action.call_ref)
        except Exception as exc:
            self._backend_failed("relay", "release", exc)
            return
        write = partial(self._store.attach_media_stats, action.call_ref, a_leg, b_leg)
        self._write_or_retry("media_stats", write, (), None)

    def _write_or_retry(
        self,
        what: str,
        write: Callable[[], None],
        then: Sequence[Action],
        record: CallRecord | None,
    ) -> bool:
        """Write now; on failure keep the write and ``then`` for a later retry (False)."""
        try:
            write()
        except Exception as exc:
            self._counters["store_write_retries"] += 1
            self._backend_failed("store", what, exc, attempt=1)
            delay = 0.2
            due = time.monotonic() + delay
            self._retries.append(_Retry(what, write, then, due, delay, record=record))
            return False
        return True

    def _retry(self, retry: _Retry, now: float) -> None:
        try:
            retry.write()
        except Exception as exc:
            retry.attempt += 1
            self._counters["store_write_retries"] += 1
            self._backend_failed("store", retry.what, exc, attempt=retry.attempt)
            retry.delay = min(retry.delay * 2, self._options.record_retry_max)
            retry.due = now + retry.delay
            return
        self._retries.remove(retry)
        self._perform(retry.then)

    def _unwritten(self, retry: _Retry) -> None:
        # Exiting with the store still failing: the record goes to the log whole, so an
        # operator can replay it; it is never dropped silently.
        if retry.record is not None:
            record = retry.record.record
            self._note(
                "error",
                "record.unwritten",
                call_ref=record.call_ref,
                record=json.dumps(attrs.asdict(record), default=str),
            )

    def _backend_failed(self, backend: str, what: str, exc: Exception, **fields: int) -> None:
        expected = isinstance(exc, StoreUnavailable | MediaUnavailable)
        self._counters[f"{backend}_errors"] += 1
        self._note(
            "warning" if expected else "error",
            f"{backend}.failed",
            operation=what,
            error=repr(exc),
            **fields,
        )

    def _poll_relay(self) -> None:
        """Calls the relay ended on its own (media timeout, shard lost) → ``media_ended``."""
        assert self._relay is not None
        try:
            ended = self._relay.expired()
        except Exception as exc:
            self._backend_failed("relay", "expired", exc)
            return
        for call_ref, reason in ended:
            self._handle(_Input(partial(self._engine.media_ended, call_ref, reason), "media"))

    # -- logging -----------------------------------------------------------------------------

    def _emit(self, entry: Log) -> None:
        if self._log_sink is not None:
            self._log_sink(entry)

    def _note(self, level: str, event: str, **fields: str | int | float | None) -> None:
        if self._log_sink is not None:
            self._log_sink(Log(level=level, event=event, fields=tuple(fields.items())))

    def _traced(self, hook: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Call an observer; its failure is counted and logged once, never fatal."""
        try:
            hook(*args, **kwargs)
        except Exception as exc:
            self._counters["trace_errors"] += 1
            if self._counters["trace_errors"] == 1:
                self._note("error", "trace.failed", error=repr(exc))

    def _dropped(self, counter: str, event: str, peer: Address) -> None:
        """Count a drop; log the first and then every 1,000th, so a flood cannot flood the log."""
        self._counters[counter] += 1
        count = self._counters[counter]
        if count == 1 or count % 1000 == 0:
            self._note("warning", event, peer=_format([peer]), count=count)

    # -- binding -----------------------------------------------------------------------------

    def _bind(self) -> None:
        """UDP and TCP on the same port of each listen address (port 0: one free for both)."""
        for host, port in self._options.listen:
            for _attempt in range(20):
                udp = _bind_udp(host, port, self._options.udp_receive_buffer)
                bound = udp.getsockname()[1]
                try:
                    listener = _bind_tcp(host, bound)
                except OSError:
                    udp.close()
                    if port == 0:
                        continue  # the free UDP port was taken for TCP: try another
                    raise
                break
            else:
                raise OSError(f"no port free for both UDP and TCP on {host}")
            # Datagrams leave from the first listen address of their family (see docs).
            self._udp_by_family.setdefault(udp.family, udp)
            self._udp.append(udp)
            self._udp_local[udp] = _address(udp.getsockname())
            self._listeners.append(listener)
            self.addresses.append((host, bound))


def _bind_udp(host: str, port: int, receive_buffer: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Bursts wait in the kernel while the loop works; the kernel caps this at rmem_max.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _raise(exc: Exception) -> Callable[..., Sequence[Action]]:
    """An input that re-raises ``exc``, so a bug outside a feed is reported like one inside."""

    def feed(**_clock: float) -> Sequence[Action]:
        raise exc

    return feed


def _address(sockaddr: Any) -> Address:
    return (str(sockaddr[0]), int(sockaddr[1]))


def _format(addresses: Sequence[Address]) -> str:
    return " ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)


def serve(
    engine: DrivenEngine,
    *,
    store: AccountStore,
    relay: MediaRelay | None,
    options: DriverOptions | None = None,
    log: LogSink | None = None,
    trace: MessageTrace | None = None,
    on_record: RecordSink | None = None,
    started: Callable[[Server], None] | None = None,
) -> None:
    """Run a ``Server`` until signalled (blocking). ``started`` is called (in the loop's
    thread) with the server once its sockets listen."""
    server = Server(
        engine,
        store=store,
        relay=relay,
        options=options,
        log=log,
        trace=trace,
        on_record=on_record,
    )
    server.serve(started=None if started is None else lambda _addresses: started(server))
