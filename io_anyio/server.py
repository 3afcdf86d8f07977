"""The production driver: one sans-IO SIP engine served over UDP and TCP with AnyIO.

Theory of operation (DESIGN.md §3, STYLE.md §10). Everything that reaches the
engine goes through one bounded input queue, and one loop (``_run_engine``)
drains it:

1. wait for an input or the engine's next deadline;
2. read the clock once (``now`` monotonic, ``wall`` UTC); when the timer woke
   the loop, ``now`` is the later of the deadline and the clock;
3. feed the engine;
4. perform the returned actions in order;
5. re-arm the timer only if ``next_timer()`` moved.

The queue is ``_inputs.InputQueue`` (a deque and an event: anyio's memory
object stream cost a task-info object per wait). Producers of inputs: one
reader per UDP socket (non-blocking ``recvfrom`` on a raw socket, a task on
trio, a callback the asyncio loop keeps registered on asyncio; beyond the queue
bound a datagram is dropped and counted, never queued without limit: AnyIO's
own asyncio UDP socket keeps 100 datagrams and silently discards the oldest,
which is why it is not used), one task per TCP
connection (reads have back-pressure: the task waits for room), and the tasks
that await slow back-ends (account look-ups, relay) under a deadline and feed
the result back. The loop itself never awaits a back-end: performing an action
either completes at once (UDP ``sendto``, queueing bytes for a TCP writer task,
a log line, handing a store write to the writer thread) or starts a task.
Store writes (call records, media figures) go to one long-lived writer thread
(``_writer.py``) in order and in batches; what the engine ordered after a
record (the answer to a BYE) is performed once the writer says it is durable.

Observing (for kx_sipd's metrics, status and SIP traces): an optional
``MessageTrace`` is told of every datagram and TCP chunk read and every message
sent, with both addresses and the wall time; an optional ``on_record`` callback
sees every call record as it is performed. Both run in the loop and must not
block; an exception from them is counted (``trace_errors``) and never stops the
server. ``call_in_loop`` lets another thread (the control endpoint) run a
function in the loop between two engine calls (the engine is not thread-safe):
the request goes through a lock-free deque and a wake-up socket that a small
task waits on, so the caller can give up after a timeout if the loop is stuck.

The driver knows no SIP: addresses, connection ids and bytes are all it sees.
io_socket/server.py is the same loop with blocking sockets; keep the two in step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import importlib.util
import json
import math
import resource
import signal
import socket
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple, Protocol, TypeVar, assert_never

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from sansio_sip import (
    AccountStore,
    Action,
    Address,
    AllocateMedia,
    CallRecord,
    CallRecordData,
    CloseConnection,
    DrivenEngine,
    Log,
    LookupAccount,
    MediaAllocation,
    MediaRelay,
    MediaStats,
    MediaUnavailable,
    MessageTrace,
    ReleaseMedia,
    Send,
    StoreUnavailable,
    Transport,
    UpdateMedia,
)

from ._inputs import InputQueue
from ._writer import StoreWriter, Write
from .options import DriverOptions

__all__ = ["DrivenEngine", "MessageTrace", "Server", "serve"]

T = TypeVar("T")
LogSink = Callable[[Log], None]
Outcome = Callable[[Any, "Exception | None"], None]
"""How a relay operation ends: (result, None) or (None, error)."""
RecordSink = Callable[[CallRecordData], None]

# After an engine bug in handle_timer the deadline has not moved; retry it this
# much later instead of spinning on a deadline that is already past.
_TIMER_BUG_BACKOFF = 0.1
# The loop wakes for the engine's timers on a grid of this many seconds, so timers
# falling due close together (about five per call: retransmissions, transaction
# lifetimes) are handled in one wake-up; a timer fires at most this much late (SIP's
# shortest timer is T1, 500 ms).
_TIMER_GRAIN = 0.01
# A connection the engine closes gets this long to write what was queued before it.
_CLOSE_FLUSH = 2.0


class _Input(NamedTuple):
    """One thing for the engine: ``feed(now=..., wall=...)``, a name and the bytes (for bug reports)."""

    feed: Callable[..., Sequence[Action]]
    what: str
    data: bytes = b""
    done: anyio.Event | None = None


@attrs.define(eq=False)
class _Connection:
    """A TCP connection, accepted or opened by us; ``ident`` is the engine's connection id."""

    ident: int
    peer: Address
    accepted: bool
    outgoing_in: MemoryObjectSendStream[bytes]
    outgoing: MemoryObjectReceiveStream[bytes]
    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    reason: str = "closed by peer"
    local: Address = ("", 0)


class Server:
    """Serves one engine on UDP and TCP at every ``options.listen`` address.

    ``store`` answers account look-ups and takes call records; ``relay`` (or None
    when no media relay is configured: calls then fail with the engine's answer
    to ``media_failed``) reserves media ports. Both may block: look-ups and relay
    commands run in worker threads under ``options.store_timeout`` /
    ``options.relay_timeout``, record writes in the store writer's thread.
    ``log`` receives the engine's ``Log`` actions and the driver's own events;
    ``trace`` and ``on_record`` observe messages and call records (module docstring).
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
        self._options = options = options or DriverOptions()
        self._log_sink = log
        self._trace = trace
        self._on_record = on_record
        self._udp_local: dict[socket.socket, Address] = {}
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._posted: deque[Callable[[], None]] = deque()  # from the store writer
        self._writer = StoreWriter(
            store,
            post=self._post,
            on_failure=self._write_failed,
            retry_max=options.record_retry_max,
        )
        self._loop_thread: int | None = None
        self._serving = False
        self._inputs: InputQueue[_Input] = InputQueue(options.input_queue)
        self._limiter = anyio.CapacityLimiter(options.worker_threads)
        self._udp: list[socket.socket] = []
        self._udp_by_family: dict[socket.AddressFamily, socket.socket] = {}
        self._listeners: list[anyio.abc.SocketListener] = []
        self._connections: dict[int, _Connection] = {}
        self._by_peer: dict[Address, int] = {}
        self._per_ip: Counter[str] = Counter()
        self._next_ident = 1
        self._counters: Counter[str] = Counter()
        self._records_pending = 0
        self._inline_resume = 0.0
        self._inline_slow = 0
        self._stopping = False
        self._hurry = anyio.Event()
        self._tasks: anyio.abc.TaskGroup | None = None
        self._loop_relay: LoopRelayLike | None = None  # the relay's commands as loop callbacks
        self.addresses: list[Address] = []
        """The bound (host, port) of each listen address, set once ``serve`` has started."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[list[Address]] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, serve until ``shutdown()`` (or SIGINT/SIGTERM) has run its course, close."""
        await self._bind()
        self._loop_thread = threading.get_ident()
        self._serving = True
        self._writer.start()
        self._loop_relay = _loop_relay(self._relay)
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                tasks.start_soon(self._answer_calls)
                for sock in self._udp:
                    tasks.start_soon(self._receive_udp, sock)
                for listener in self._listeners:
                    tasks.start_soon(self._accept_tcp, listener)
                if self._relay is not None:
                    tasks.start_soon(self._poll_relay)
                if self._options.handle_signals:
                    tasks.start_soon(self._watch_signals)
                tasks.start_soon(self._run_engine)
                self._note("info", "driver.listening", addresses=_format(self.addresses))
                task_status.started(self.addresses)
        finally:
            self._serving = False
            if self._loop_relay is not None:
                self._loop_relay.close()
                self._loop_relay = None
            self._run_calls()  # a call that raced the end gets an answer, not a timeout
            for write in self._writer.stop(self._options.store_timeout):
                if isinstance(write.item, CallRecordData):
                    self._unwritten(write.item)
            for sock in (*self._udp, self._wake_in, self._wake_out):
                sock.close()
            for listener in self._listeners:
                await anyio.aclose_forcefully(listener)
            self._note("info", "driver.stopped", **self.stats())

    def shutdown(self) -> None:
        """Graceful stop: new calls refused, running calls given ``grace_period``, then
        ended; a second call ends every call at once."""
        if self._stopping:
            self._hurry.set()
            return
        self._stopping = True
        if self._tasks is not None:
            self._tasks.start_soon(self._shut_down)

    def stats(self) -> dict[str, int]:
        """Driver counters (datagrams, drops, connections, engine bugs, store retries ...)."""
        figures = dict(self._counters)
        figures["tcp_connections"] = len(self._connections)
        figures["records_pending"] = self._records_pending
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

    async def _answer_calls(self) -> None:
        loop = _asyncio_loop()
        if loop is None:
            while True:
                await anyio.wait_readable(self._wake_out)
                self._woken()
        loop.add_reader(self._wake_out.fileno(), self._woken)  # as _receive_udp does
        try:
            await anyio.sleep_forever()
        finally:
            loop.remove_reader(self._wake_out.fileno())

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_out.recv(4096)
        self._run_calls()
        self._run_posted()

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

    def _post(self, callbacks: list[Callable[[], None]]) -> None:
        """From the store writer's thread: run ``callbacks`` in the loop, in order."""
        self._posted.extend(callbacks)
        with contextlib.suppress(OSError):  # full: a wake-up is already pending
            self._wake_in.send(b"p")

    def _run_posted(self) -> None:
        while self._posted:
            callback = self._posted.popleft()
            try:
                callback()
            except Exception as exc:
                self._driver_bug(exc)

    async def _shut_down(self) -> None:
        options = self._options
        self._note("info", "server.stopping", active_calls=self._engine.active_calls)
        await self._submit(self._engine.stop_accepting, "stop_accepting", wait=True)
        with anyio.move_on_after(options.grace_period):
            while self._engine.active_calls > 0 and not self._hurry.is_set():
                with anyio.move_on_after(0.1):
                    await self._hurry.wait()
        await self._submit(self._engine.end_all_calls, "end_all_calls", wait=True)
        with anyio.move_on_after(options.drain_period):
            while not (self._engine.idle and self._records_pending == 0):
                await anyio.sleep(0.05)
        assert self._tasks is not None
        self._tasks.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self._note("info", "server.signal", signal=signal.Signals(signum).name)
                self.shutdown()

    # -- the loop ----------------------------------------------------------------------------

    async def _run_engine(self) -> None:
        deadline = self._engine.next_timer()
        due = _grained(deadline)
        while True:
            # One cancel scope for as many waits as its deadline lasts: entering a scope
            # with a deadline schedules a loop timer (and leaving cancels it), while most
            # inputs leave the engine's next deadline where it was. The only await in
            # here is the wait for an input, so the deadline can only cut that short,
            # and an input is never lost to it (it stays queued).
            with anyio.CancelScope(deadline=_on_loop_clock(due)) as scope:
                scope_due = due
                while True:
                    item = await self._inputs.get()
                    deadline, due = self._run_batch(item, deadline, due)
                    if time.monotonic() >= due:
                        # Due during the batch: run it now. Left to the scope, it would
                        # come as a cancellation, an exception thrown through the wait.
                        deadline, due = self._run_batch(None, deadline, due)
                    if due != scope_due:
                        scope.deadline, scope_due = _on_loop_clock(due), due
            deadline, due = self._run_batch(None, deadline, due)

    def _run_batch(
        self, item: _Input | None, deadline: float | None, due: float
    ) -> tuple[float | None, float]:
        """Feed ``item`` (None: the timer), then, under load, the inputs already
        queued, without a checkpoint each (up to ``udp_batch``, and never past a
        deadline): the wait is the costly part. Returns the engine's next deadline
        and the monotonic time to wake up for it (``_grained``)."""
        engine = self._engine
        taken = 0
        while True:
            taken += 1
            now, wall = time.monotonic(), time.time()
            if item is None:
                item = _Input(engine.handle_timer, "timer")
                if deadline is not None:
                    now = max(now, deadline)
            actions = self._feed(item, now, wall)
            if actions is not None:
                self._perform(actions)
            if item.done is not None:
                item.done.set()
            next_deadline = self._next_timer(deadline)
            if next_deadline != deadline:
                deadline, due = next_deadline, _grained(next_deadline)
            elif item.what == "timer":
                # Every due timer was handled: a deadline that did not move is an
                # engine bug (or handle_timer raised). Try again later, never in a spin.
                due = time.monotonic() + _TIMER_BUG_BACKOFF
            if taken >= self._options.udp_batch or time.monotonic() >= due:
                return deadline, due
            # Taken only once it will be fed: an input taken and then left behind
            # at the end of a batch would be lost (a datagram, or an account
            # look-up's answer, leaving its transaction waiting for ever).
            try:
                item = self._inputs.get_nowait()
            except anyio.WouldBlock:
                return deadline, due

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

    def _next_timer(self, previous: float | None) -> float | None:
        try:
            return self._engine.next_timer()
        except Exception as exc:
            self._feed(_Input(_raise(exc), "next_timer"), 0.0, 0.0)
            return previous

    async def _submit(
        self, feed: Callable[..., Sequence[Action]], what: str, *, wait: bool = False
    ) -> None:
        """Queue an input for the loop (from a task; waits for room, and with ``wait``
        until the loop has fed it and performed the actions it returned)."""
        done = anyio.Event() if wait else None
        await self._inputs.put(_Input(feed, what, done=done))
        if done is not None:
            await done.wait()

    def _submit_soon(self, feed: Callable[..., Sequence[Action]], what: str) -> None:
        """Queue an input from synchronous code: at once if there is room, else from a task."""
        try:
            self._inputs.put_nowait(_Input(feed, what))
        except anyio.WouldBlock:
            self._start(self._submit, feed, what)

    def _perform(self, actions: Sequence[Action]) -> None:
        """Perform actions in order; nothing here waits on the network or a back-end."""
        for index, action in enumerate(actions):
            match action:
                case Send():
                    self._send(action)
                case CloseConnection():
                    self._close_connection(action.connection, action.reason)
                case LookupAccount():
                    if not self._lookup_inline(action):
                        self._start(self._lookup_account, action)
                case AllocateMedia():
                    self._relay_op(
                        "allocate",
                        partial(self._allocated, action),
                        action.call_ref,
                        a_peer=action.a_peer,
                        echo=action.echo,
                    )
                case UpdateMedia():
                    # The relay must know where the carrier's media goes before the
                    # client hears the 200 that follows, or its first RTP is lost.
                    self._relay_op(
                        "update",
                        partial(self._updated, actions[index + 1 :]),
                        action.call_ref,
                        a_peer=action.a_peer,
                        b_peer=action.b_peer,
                        a_events=action.a_events,
                        b_events=action.b_events,
                    )
                    return
                case ReleaseMedia():
                    self._relay_op("release", partial(self._released, action), action.call_ref)
                case CallRecord():
                    if self._on_record is not None:
                        self._traced(self._on_record, action.record)
                    # Durability: what follows a record in the same list (typically the
                    # answer to a BYE) is performed only once the store has the record.
                    self._records_pending += 1
                    written = partial(self._record_written, actions[index + 1 :])
                    self._writer.submit(Write(action.record, written))
                    return
                case Log():
                    self._emit(action)
                case _:
                    assert_never(action)

    def _start(self, func: Callable[..., Any], *args: Any) -> None:
        assert self._tasks is not None
        self._tasks.start_soon(func, *args)

    # -- UDP ---------------------------------------------------------------------------------

    async def _receive_udp(self, sock: socket.socket) -> None:
        loop = _asyncio_loop()
        if loop is None:
            while True:
                await anyio.wait_readable(sock)
                self._read_udp(sock)
        # On asyncio the socket stays registered with the loop, which calls the reader
        # when it is readable: ``wait_readable`` registered and unregistered it (two
        # epoll_ctl) and woke this task, for every wake-up.
        loop.add_reader(sock.fileno(), self._read_udp_guarded, sock)
        try:
            await anyio.sleep_forever()
        finally:
            loop.remove_reader(sock.fileno())

    def _read_udp_guarded(self, sock: socket.socket) -> None:
        """``_read_udp`` as a loop callback: an exception is a bug, counted and logged
        (asyncio would print it and go on)."""
        try:
            self._read_udp(sock)
        except Exception as exc:
            self._driver_bug(exc)

    def _driver_bug(self, exc: Exception) -> None:
        """A loop callback raised: a bug in the driver, counted and logged whole;
        the loop goes on."""
        self._counters["driver_bugs"] += 1
        self._note(
            "error",
            "driver.bug",
            error=repr(exc),
            traceback="".join(traceback.format_exception(exc)),
        )

    def _read_udp(self, sock: socket.socket) -> None:
        """Queue up to ``udp_batch`` datagrams that are waiting (never blocks)."""
        engine, options = self._engine, self._options
        for _ in range(options.udp_batch):
            try:
                data, source = sock.recvfrom(options.max_datagram)
            except BlockingIOError:
                break
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
            try:
                self._inputs.put_nowait(_Input(feed, "udp", data))
            except anyio.WouldBlock:
                self._dropped("udp_dropped", "udp.queue_full", peer)

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

    async def _accept_tcp(self, listener: anyio.abc.SocketListener) -> None:
        while True:
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                # Out of descriptors (EMFILE) and the like: wait a little, keep listening.
                self._counters["tcp_accept_errors"] += 1
                self._note("warning", "tcp.accept_failed", error=repr(exc))
                await anyio.sleep(0.1)
                continue
            self._start(self._serve_accepted, stream)

    async def _serve_accepted(self, stream: anyio.abc.SocketStream) -> None:
        peer = _address(stream.extra(anyio.abc.SocketAttribute.remote_address))
        options = self._options
        if len(self._connections) >= options.max_tcp_connections:
            refusal = "too many connections"
        elif self._per_ip[peer[0]] >= options.max_tcp_per_ip:
            refusal = "too many connections from this address"
        else:
            refusal = ""
        if refusal:
            self._counters["tcp_refused"] += 1
            self._note("warning", "tcp.refused", peer=_format([peer]), reason=refusal)
            await anyio.aclose_forcefully(stream)
            return
        self._counters["tcp_accepted"] += 1
        await self._run_connection(self._new_connection(peer, accepted=True), stream)

    async def _connect_tcp(self, conn: _Connection) -> None:
        stream: anyio.abc.SocketStream | None = None
        try:
            with conn.scope, anyio.fail_after(self._options.tcp_connect_timeout):
                stream = await anyio.connect_tcp(*conn.peer)
        except (OSError, TimeoutError) as exc:
            self._forget(conn)
            self._note("warning", "tcp.connect_failed", peer=_format([conn.peer]), error=repr(exc))
            await self._submit(
                partial(self._engine.transport_failed, conn.peer, Transport.TCP), "transport_failed"
            )
            return
        if stream is None or conn.scope.cancel_called:  # closed by the engine meanwhile
            if stream is not None:
                await anyio.aclose_forcefully(stream)
            self._forget(conn)
            return
        conn.scope = anyio.CancelScope()
        self._counters["tcp_connected"] += 1
        await self._run_connection(conn, stream)

    async def _run_connection(self, conn: _Connection, stream: anyio.abc.SocketStream) -> None:
        """Read into the engine and write what it queues, until either side ends it."""
        with contextlib.suppress(OSError):
            conn.local = _address(stream.extra(anyio.abc.SocketAttribute.local_address))
        try:
            with conn.scope:
                async with stream, anyio.create_task_group() as tasks:
                    tasks.start_soon(self._write_connection, conn, stream)
                    conn.reason = await self._read_connection(conn, stream)
                    # The writer flushes what is queued and ends by itself: a
                    # cancelled writer would leave its exception, frames and
                    # scope as cyclic garbage for every connection. A peer that
                    # does not read is cut off at the deadline.
                    conn.outgoing_in.close()
                    tasks.cancel_scope.deadline = anyio.current_time() + _CLOSE_FLUSH
        finally:
            self._forget(conn)
            self._note("debug", "tcp.closed", peer=_format([conn.peer]), reason=conn.reason)
            self._submit_soon(
                partial(self._engine.connection_closed, conn.ident), "connection_closed"
            )

    async def _read_connection(self, conn: _Connection, stream: anyio.abc.SocketStream) -> str:
        engine, options = self._engine, self._options
        while True:
            with anyio.move_on_after(options.tcp_idle_timeout) as idle:
                try:
                    chunk = await stream.receive(options.tcp_read_size)
                except anyio.EndOfStream:
                    return "closed by peer"
                except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                    return f"broken: {exc!r}"
            if idle.cancelled_caught:
                self._counters["tcp_closed_idle"] += 1
                return "idle"
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
                engine.receive,
                chunk,
                source=conn.peer,
                transport=Transport.TCP,
                connection=conn.ident,
            )
            await self._inputs.put(_Input(feed, "tcp", chunk))

    async def _write_connection(self, conn: _Connection, stream: anyio.abc.SocketStream) -> None:
        try:
            async for data in conn.outgoing:
                await stream.send(data)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            conn.reason = f"write failed: {exc!r}"
        conn.scope.cancel()  # the engine closed it, or the write failed: reading ends too

    def _send_tcp(self, action: Send) -> None:
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
                conn = self._new_connection(action.destination, accepted=False)
                self._start(self._connect_tcp, conn)
        try:
            conn.outgoing_in.send_nowait(action.data)
        except anyio.WouldBlock:
            # The peer reads slower than we write: better to close than to buffer forever.
            conn.reason = "peer not reading"
            self._dropped("tcp_slow_peer", "tcp.slow_peer", conn.peer)
            conn.scope.cancel()
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._dropped("tcp_send_no_connection", "tcp.connection_gone", action.destination)
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

    def _close_connection(self, ident: int, reason: str) -> None:
        """Close once what is queued has been written (the answer that explains the close),
        but no later than ``_CLOSE_FLUSH`` seconds from now."""
        conn = self._connections.get(ident)
        if conn is not None:
            conn.reason = reason
            conn.outgoing_in.close()
            conn.scope.deadline = min(conn.scope.deadline, anyio.current_time() + _CLOSE_FLUSH)

    def _new_connection(self, peer: Address, *, accepted: bool) -> _Connection:
        outgoing_in, outgoing = anyio.create_memory_object_stream[bytes](
            self._options.tcp_send_queue
        )
        conn = _Connection(self._next_ident, peer, accepted, outgoing_in, outgoing)
        self._next_ident += 1
        self._connections[conn.ident] = conn
        self._by_peer[peer] = conn.ident
        if accepted:
            self._per_ip[peer[0]] += 1
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
        conn.outgoing_in.close()
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
        self._submit_soon(
            partial(self._engine.transport_failed, action.destination, action.transport),
            "transport_failed",
        )

    def _lookup_inline(self, action: LookupAccount) -> bool:
        """The fast path (see options.py): ask the store from the loop while it answers
        within ``inline_budget``; False sends the look-up to a worker thread instead."""
        options = self._options
        if not options.store_inline or time.monotonic() < self._inline_resume:
            return False
        engine = self._engine
        usage = _thread_usage()
        start = time.monotonic()
        try:
            account = self._store.get_account(action.username)
        except Exception as exc:
            self._suspend_inline(start, "failed")
            self._backend_failed("store", "get_account", exc)
            self._submit_soon(partial(engine.account_unavailable, action.token), "account")
            return True
        if time.monotonic() - start <= options.inline_budget:
            self._inline_slow = 0
        elif _only_preempted(usage, _thread_usage(), options.inline_budget):
            # The look-up neither waited nor computed long: the kernel gave the CPU to
            # others meanwhile (a busy host). Its time says nothing about the store,
            # so it neither strikes nor clears.
            self._counters["store_inline_preempted"] += 1
        else:
            self._inline_slow += 1
            if self._inline_slow >= options.inline_strikes:
                self._suspend_inline(start, "slow")
        self._counters["store_inline_lookups"] += 1
        self._submit_soon(partial(engine.account_found, action.token, account), "account")
        return True

    def _suspend_inline(self, start: float, why: str) -> None:
        self._inline_slow = 0
        self._inline_resume = time.monotonic() + self._options.inline_cooldown
        self._counters["store_inline_suspended"] += 1
        self._note(
            "warning",
            "store.inline_suspended",
            reason=why,
            took_ms=round((time.monotonic() - start) * 1000, 1),
            cooldown_s=self._options.inline_cooldown,
        )

    async def _lookup_account(self, action: LookupAccount) -> None:
        engine = self._engine
        try:
            account = await self._in_thread(
                self._options.store_timeout, self._store.get_account, action.username
            )
        except Exception as exc:
            self._backend_failed("store", "get_account", exc)
            await self._submit(partial(engine.account_unavailable, action.token), "account")
            return
        self._counters["store_thread_lookups"] += 1
        await self._submit(partial(engine.account_found, action.token, account), "account")

    # The relay's three operations: started by ``_relay_op``, their outcome, a
    # (result, error) pair, comes to ``_allocated``, ``_updated`` or ``_released``.

    def _relay_op(self, name: str, done: Outcome, *args: Any, **kwargs: Any) -> None:
        """Start the relay's ``name`` operation, ``done`` to be called with its outcome
        within ``relay_timeout``: as callbacks of the loop through the LoopRelay
        (asyncio, and a relay that offers ``on_loop``), else in a task
        (``_relay_call``). Either way ``done`` runs guarded, as a loop callback does."""
        outcome = partial(self._guarded, done)
        if self._loop_relay is not None:
            operation = getattr(self._loop_relay, name)
            operation(*args, done=outcome, deadline=self._options.relay_timeout, **kwargs)
        else:
            self._start(self._relay_task, name, outcome, args, kwargs)

    async def _relay_task(
        self, name: str, done: Outcome, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._relay is None:
            # Without a relay nothing is allocated, and so nothing is to be updated or freed.
            done(
                None, MediaUnavailable("no media relay configured") if name == "allocate" else None
            )
            return
        try:
            result = await self._relay_call(self._relay, name, *args, **kwargs)
        except Exception as exc:
            done(None, exc)
            return
        done(result, None)

    def _allocated(
        self, action: AllocateMedia, allocation: MediaAllocation | None, error: Exception | None
    ) -> None:
        engine = self._engine
        if error is not None:
            self._backend_failed("relay", "allocate", error)
            reason = str(error) or type(error).__name__
            self._submit_soon(partial(engine.media_failed, action.token, reason), "media")
            return
        assert allocation is not None
        self._submit_soon(partial(engine.media_allocated, action.token, allocation), "media")

    def _updated(self, then: Sequence[Action], _: None, error: Exception | None) -> None:
        if error is not None:
            self._backend_failed("relay", "update", error)
        self._perform(then)

    def _released(
        self,
        action: ReleaseMedia,
        figures: tuple[MediaStats | None, MediaStats | None] | None,
        error: Exception | None,
    ) -> None:
        if error is not None:
            self._backend_failed("relay", "release", error)
        if figures is not None:
            a_leg, b_leg = figures
            self._writer.submit(Write((action.call_ref, a_leg, b_leg), None))

    def _guarded(self, func: Callable[..., None], *args: Any) -> None:
        """``func(*args)`` as a loop callback: an exception is a driver bug, counted and
        logged; the loop goes on."""
        try:
            func(*args)
        except Exception as exc:
            self._driver_bug(exc)

    def _record_written(self, then: Sequence[Action]) -> None:
        self._records_pending -= 1
        self._perform(then)

    def _write_failed(self, what: str, exc: Exception, attempt: int) -> None:
        """A store write failed (the writer tries it again, backing off up to
        ``record_retry_max``)."""
        self._counters["store_write_retries"] += 1
        self._backend_failed("store", what, exc, attempt=attempt)

    def _unwritten(self, record: CallRecordData) -> None:
        """At exit with the store still failing: the record goes to the log whole,
        so an operator can replay it; it is never dropped silently."""
        self._note(
            "error",
            "record.unwritten",
            call_ref=record.call_ref,
            record=json.dumps(attrs.asdict(record), default=str),
        )

    async def _relay_call(self, relay: MediaRelay, name: str, *args: Any, **kwargs: Any) -> Any:
        """The relay's ``name`` operation within ``relay_timeout``. A relay that
        offers ``<name>_async`` (``RelayClient``) is awaited on this loop, with no
        worker-thread hop (three per call otherwise); any other ``MediaRelay``
        (the seam is synchronous: test fakes, embedders' relays) runs in a thread."""
        timeout = self._options.relay_timeout
        run_async = getattr(relay, f"{name}_async", None)
        if run_async is None:
            return await self._in_thread(timeout, partial(getattr(relay, name), *args, **kwargs))
        with anyio.fail_after(timeout):
            return await run_async(*args, **kwargs)

    async def _in_thread(self, timeout: float, func: Callable[..., T], *args: Any) -> T:
        """Run a blocking back-end call in a worker thread; TimeoutError past ``timeout``
        (the thread is abandoned; it holds its limiter slot until it returns)."""
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(
                func, *args, limiter=self._limiter, abandon_on_cancel=True
            )

    def _backend_failed(self, backend: str, what: str, exc: Exception, **fields: int) -> None:
        expected = isinstance(exc, StoreUnavailable | MediaUnavailable | TimeoutError)
        self._counters[f"{backend}_errors"] += 1
        self._note(
            "warning" if expected else "error",
            f"{backend}.failed",
            operation=what,
            error=repr(exc) if not isinstance(exc, TimeoutError) else "deadline passed",
            **fields,
        )

    async def _poll_relay(self) -> None:
        """Calls the relay ended on its own (media timeout, shard lost) → ``media_ended``."""
        assert self._relay is not None
        while True:
            await anyio.sleep(self._options.expire_poll)
            try:
                ended = await self._in_thread(self._options.relay_timeout, self._relay.expired)
            except Exception as exc:
                self._backend_failed("relay", "expired", exc)
                continue
            for call_ref, reason in ended:
                await self._submit(partial(self._engine.media_ended, call_ref, reason), "media")

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

    async def _bind(self) -> None:
        """UDP and TCP on the same port of each listen address (port 0: one free for both)."""
        for host, port in self._options.listen:
            for _attempt in range(20):
                udp = _bind_udp(host, port, self._options.udp_receive_buffer)
                bound = udp.getsockname()[1]
                try:
                    listener = await anyio.create_tcp_listener(local_host=host, local_port=bound)
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
            self._listeners.extend(
                each for each in listener.listeners if isinstance(each, anyio.abc.SocketListener)
            )
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


def _raise(exc: Exception) -> Callable[..., Sequence[Action]]:
    """An input that re-raises ``exc``, so a bug outside a feed is reported like one inside."""

    def feed(**_clock: float) -> Sequence[Action]:
        raise exc

    return feed


def _thread_usage() -> tuple[int, float] | None:
    """(voluntary context switches, CPU seconds) of this thread so far; None
    where the OS does not say (only Linux has ``RUSAGE_THREAD``)."""
    if _RUSAGE_THREAD is None:
        return None
    usage = resource.getrusage(_RUSAGE_THREAD)
    return usage.ru_nvcsw, usage.ru_utime + usage.ru_stime


def _only_preempted(
    before: tuple[int, float] | None, after: tuple[int, float] | None, budget: float
) -> bool:
    """Whether a call that overran ``budget`` did so only because the thread was
    kept off the CPU: it never slept (a store waiting for a lock or the disk
    sleeps: a voluntary switch) and used less than ``budget`` of CPU itself.
    Unknown (not Linux): False, the overrun counts."""
    if before is None or after is None:
        return False
    return after[0] == before[0] and after[1] - before[1] <= budget


_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)


class LoopRelayLike(Protocol):
    """What the driver uses of ``rtp_relay.LoopRelay`` (the relay's operations as
    callbacks of the asyncio loop)."""

    def allocate(
        self,
        call_ref: str,
        *,
        a_peer: Address | None,
        echo: bool,
        done: Outcome,
        deadline: float | None = None,
    ) -> None: ...

    def update(
        self,
        call_ref: str,
        *,
        a_peer: Address | None,
        b_peer: Address | None,
        a_events: int | None = None,
        b_events: int | None = None,
        done: Outcome,
        deadline: float | None = None,
    ) -> None: ...

    def release(
        self,
        call_ref: str,
        *,
        done: Outcome,
        deadline: float | None = None,
    ) -> None: ...

    def close(self) -> None: ...


def _loop_relay(relay: MediaRelay | None) -> LoopRelayLike | None:
    """The relay's operations as callbacks of this asyncio loop, when the relay offers
    them (``RelayClient.on_loop``); None on trio or for any other relay."""
    loop = _asyncio_loop()
    on_loop = getattr(relay, "on_loop", None)
    if loop is None or on_loop is None:
        return None
    made: LoopRelayLike = on_loop(loop)
    return made


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop (uvloop's too), or None on trio."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _grained(deadline: float | None) -> float:
    """When to wake for a monotonic engine deadline: rounded up to ``_TIMER_GRAIN``
    (never, for None). Compared with ``time.monotonic()`` in the loop (a tenth of
    the cost of asking anyio for the loop's time, twice per input)."""
    if deadline is None:
        return math.inf
    return math.ceil(deadline / _TIMER_GRAIN) * _TIMER_GRAIN


def _on_loop_clock(due: float) -> float:
    """A monotonic time on the event loop's clock (trio's clock has its own offset)."""
    if due == math.inf:
        return math.inf
    return anyio.current_time() + (due - time.monotonic())


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
    backend: str = "asyncio",
    trace: MessageTrace | None = None,
    on_record: RecordSink | None = None,
    started: Callable[[Server], None] | None = None,
) -> None:
    """Run a ``Server`` until signalled (blocking): asyncio (with uvloop when installed) or trio.
    ``started`` is called (in the loop) with the server once its sockets listen."""
    backend_options: dict[str, Any] = {}
    if backend == "asyncio" and importlib.util.find_spec("uvloop") is not None:
        backend_options["use_uvloop"] = True
    server = Server(
        engine,
        store=store,
        relay=relay,
        options=options,
        log=log,
        trace=trace,
        on_record=on_record,
    )

    async def run() -> None:
        async with anyio.create_task_group() as tasks:
            await tasks.start(server.serve)
            if started is not None:
                started(server)

    anyio.run(run, backend=backend, backend_options=backend_options)
