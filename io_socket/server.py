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

This module holds the public API, the loop and the dispatch of actions; the
rest of the package is what the loop calls, one concern a module:

* ``_udp.py`` and ``_tcp.py``: reading and sending on each transport (TCP's
  connections, write buffers, limits and sweeps);
* ``_backends.py``: the account store and the relay, called inline (the
  trade-off is explained there), and the retries of failed store writes;
* ``_shutdown.py``: signals and the phases of a graceful stop;
* ``_wakeup.py``: how other threads reach the loop (``shutdown``, ``call_in_loop``);
* ``_seams.py`` (what the server is given), ``_report.py`` (counters, log
  lines, observers), ``_sockets.py`` (binding), ``options.py`` (the bounds).

Observing (as in io_anyio): an optional ``MessageTrace`` is told of every
datagram and TCP chunk read and every message sent, an optional ``on_record``
callback sees every call record as it is performed; both run in the loop, must
not block, and their failures are counted (``trace_errors``), never fatal.

The driver knows no SIP: addresses, connection ids and bytes are all it sees.
"""

from __future__ import annotations

import hashlib
import math
import selectors
import signal
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar, assert_never

from sansio_sip import (
    AccountStore,
    Action,
    Address,
    AllocateMedia,
    CallRecord,
    CloseConnection,
    Log,
    LookupAccount,
    MediaRelay,
    ReleaseMedia,
    Send,
    Transport,
    UpdateMedia,
)

from ._backends import Backends
from ._report import Report
from ._seams import DrivenEngine, Input, LogSink, MessageTrace, RecordSink
from ._shutdown import Shutdown
from ._sockets import bind_pair, format_addresses
from ._tcp import TcpConnections
from ._udp import UdpSockets
from ._wakeup import Wakeup
from .options import DriverOptions

__all__ = ["DrivenEngine", "MessageTrace", "Server", "serve"]

T = TypeVar("T")

_TIMER_BUG_BACKOFF = 0.1  # see io_anyio: an engine bug must not make the loop spin


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
        self._options = options = options or DriverOptions()
        self._on_record = on_record
        self._report = report = Report(log)
        self._loop_thread: int | None = None
        self._serving = False
        self._selector = selector = selectors.DefaultSelector()
        self._wakeup = Wakeup()
        self._pending: deque[Input] = deque()  # inputs that performing queued
        self._listeners: list[socket.socket] = []
        handle, queue, failed = self._handle, self._pending.append, self._transport_failed
        self._udp = UdpSockets(
            engine, options, selector, report, trace, handle=handle, transport_failed=failed
        )
        self._tcp = TcpConnections(
            engine,
            options,
            selector,
            report,
            trace,
            handle=handle,
            queue=queue,
            transport_failed=failed,
        )
        self._backends = Backends(
            engine, store, relay, options, report, handle=handle, queue=queue, perform=self._perform
        )
        self._shutdown = Shutdown(engine, options, report, self._backends, handle=handle)
        self.addresses: list[Address] = []
        """The bound (host, port) of each listen address, set once ``serve`` has bound them."""

    # -- lifecycle ---------------------------------------------------------------------------

    def serve(self, *, started: Callable[[list[Address]], None] | None = None) -> None:
        """Bind, serve until ``shutdown()`` (or SIGINT/SIGTERM) has run its course, close.
        ``started`` is called with the bound addresses once the sockets listen."""
        self._bind()
        previous = self._shutdown.install_signals(self.shutdown)
        self._loop_thread = threading.get_ident()
        self._serving = True
        try:
            for sock in (self._wakeup.out, *self._udp.sockets, *self._listeners):
                sock.setblocking(False)
            self._selector.register(self._wakeup.out, selectors.EVENT_READ, self._on_wake)
            self._udp.listen()
            for listener in self._listeners:
                self._tcp.listen(listener)
            self._report.note(
                "info", "driver.listening", addresses=format_addresses(self.addresses)
            )
            if started is not None:
                started(list(self.addresses))
            self._run()
        finally:
            self._serving = False
            self._wakeup.run_calls()  # a call that raced the end gets an answer, not a timeout
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._tcp.close_all()
            for sock in (*self._udp.sockets, *self._listeners):
                sock.close()
            self._wakeup.close()
            self._selector.close()
            self._report.note("info", "driver.stopped", **self.stats())

    def shutdown(self) -> None:
        """Graceful stop: new calls refused, running calls given ``grace_period``, then
        ended; a second call ends every call at once. Safe from any thread or a signal."""
        self._shutdown.requests += 1
        self._wakeup.wake(b"!")

    def stats(self) -> dict[str, int]:
        """Driver counters (datagrams, drops, connections, engine bugs, store retries ...)."""
        figures = dict(self._report.counters)
        figures["tcp_connections"] = len(self._tcp.connections)
        figures["records_pending"] = self._backends.records_pending()
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
        return self._wakeup.call(func, timeout)

    def _on_wake(self, _mask: int) -> None:
        """Another thread or a signal woke the loop: run the calls waiting, then see to
        a shutdown request."""
        self._wakeup.clear()
        self._wakeup.run_calls()
        self._shutdown.on_wake()

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self._engine
        deadline = self._next_timer(None)
        timer_at = deadline
        while self._shutdown.phase != "done":
            # 1. wait for input or the earliest deadline; each ready socket's handler reads,
            #    feeds the engine (2, 3) and performs the actions (4) at once
            for key, mask in self._selector.select(self._wait_time(timer_at)):
                key.data(mask)
            self._drain()  # results of back-end calls, closed connections
            # 2-4. the engine's timer, then the driver's own deadlines
            now = time.monotonic()
            fired = timer_at is not None and now >= timer_at
            if fired:
                self._handle(Input(engine.handle_timer, "timer"), not_before=deadline)
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
        earliest = min(
            timer_at if timer_at is not None else math.inf,
            self._shutdown.deadline(),
            self._tcp.sweep_deadline(),
            *self._backends.deadlines(),
        )
        if earliest == math.inf:
            return None
        return max(0.0, earliest - time.monotonic())

    def _handle(self, item: Input, *, not_before: float | None = None) -> None:
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
            self._feed(Input(_raise(exc), "next_timer"), 0.0, 0.0)
            return previous

    def _feed(self, item: Input, now: float, wall: float) -> Sequence[Action] | None:
        """Call the engine; an exception escaping it is a bug: logged with a hash of the
        input, counted, and the server goes on (STYLE.md §6). None marks that case."""
        try:
            return item.feed(now=now, wall=wall)
        except Exception as exc:
            self._report.counters["engine_bugs"] += 1
            self._report.note(
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
                case Send() if action.transport is Transport.UDP:
                    self._udp.send(action)
                case Send():
                    self._tcp.send(action)
                case CloseConnection():
                    self._tcp.close_connection(action.connection, action.reason)
                case LookupAccount():
                    self._backends.lookup_account(action)
                case AllocateMedia():
                    self._backends.allocate_media(action)
                case UpdateMedia():
                    self._backends.update_media(action)
                case ReleaseMedia():
                    self._backends.release_media(action)
                case CallRecord():
                    if self._on_record is not None:
                        self._report.traced(self._on_record, action.record)
                    # Durability: what follows a record in the same list (typically the
                    # answer to a BYE) is performed only once the store has the record.
                    if not self._backends.write_record(action, actions[index + 1 :]):
                        return
                case Log():
                    self._report.emit(action)
                case _:
                    assert_never(action)

    def _housekeeping(self, now: float) -> None:
        """The driver's own deadlines, each acting only when due (its module says how)."""
        self._shutdown.advance(now)
        self._backends.poll_relay_if_due(now)
        self._tcp.sweep_if_due(now)
        self._backends.retry_due(now)

    # -- both transports ---------------------------------------------------------------------

    def _transport_failed(self, action: Send, error: str) -> None:
        """A ``Send`` that could not go out (UDP or TCP): the engine is told, queued."""
        self._report.counters["send_failures"] += 1
        self._report.note(
            "warning",
            "transport.failed",
            destination=format_addresses([action.destination]),
            transport=action.transport.value,
            error=error,
        )
        feed = partial(self._engine.transport_failed, action.destination, action.transport)
        self._pending.append(Input(feed, "transport_failed"))

    def _bind(self) -> None:
        """UDP and TCP on the same port of each listen address (port 0: one free for both)."""
        for host, port in self._options.listen:
            udp, listener, bound = bind_pair(host, port, self._options.udp_receive_buffer)
            self._udp.add(udp)
            self._listeners.append(listener)
            self.addresses.append((host, bound))


def _raise(exc: Exception) -> Callable[..., Sequence[Action]]:
    """An input that re-raises ``exc``, so a bug outside a feed is reported like one inside."""

    def feed(**_clock: float) -> Sequence[Action]:
        raise exc

    return feed


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
