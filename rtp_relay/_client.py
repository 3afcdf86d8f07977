"""The relay client kx-sipd uses (implements ``sansio_sip.MediaRelay``).

Blocking and thread-safe: the AnyIO driver calls it from worker threads.
Each thread gets its own UDP socket (so replies never cross threads), and
the table of calls is guarded by one lock held only around dictionary work,
never across network waits.

Balancing. The client first asks the shared control port for the shard
table (``info``), then spreads new calls itself: each allocation goes to the
next shard in round-robin order, straight to that shard's own control port,
and moves on to the next shard when one answers "exhausted" or does not
answer, so a call fails with ``MediaUnavailable`` only when *every* shard is
full or silent. This replaces relying on the kernel's SO_REUSEPORT hash of
our source port, which would pin a single-socket client to one shard. Later
commands for a call go to the shard that allocated it.

From an event loop. ``allocate_async``, ``update_async`` and
``release_async`` do the same over non-blocking sockets awaited with AnyIO,
so a driver need not hand each call's three commands to worker threads (a
thread hop costs more CPU than the command). On an asyncio loop (uvloop's
too), ``on_loop(loop)`` goes further: a ``LoopRelay`` runs the commands as
loop callbacks over one socket that stays registered with the loop, and
calls back with each outcome: no task, cancel scope or reader registration
per command. Each operation is written once, as a generator of the commands
it needs answered, and run by any of the three.

Reliability. A command is retransmitted after ``timeout`` seconds, up to
``retries`` times, as the *same* datagram (same cookie): the shard answers a
retransmission from its reply cache, so a command whose reply was lost is
never carried out twice.

Loss of a shard. Every reply names the shard's incarnation; ``expired()``
polls the shards holding our calls and reports the calls of a shard whose
incarnation changed (it was restarted, empty) or that stayed silent for
``lost_after`` consecutive polls, as "relay-lost", and calls the relay found
without media as "media-timeout".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import attrs

from sansio_sip import Address, MediaAllocation, MediaStats, MediaUnavailable

from ._protocol import BadDatagram, open_datagram, seal

__all__ = ["LoopRelay", "RelayClient"]

LOG = logging.getLogger("rtp_relay.client")


class _NoReply(Exception):
    """No reply within the retransmission budget."""


_T = TypeVar("_T")


@attrs.frozen
class _Ask:
    """One command an operation needs answered: where, what, its fields."""

    address: Address
    op: str
    fields: dict[str, Any]


_Steps = Generator[_Ask, "dict[str, Any] | None", _T]
"""An operation written once for both clients: it yields the commands it
needs answered and is sent each reply (None: no reply after the retries)."""


@attrs.frozen
class _Placement:
    shard: int
    incarnation: int
    allocation: MediaAllocation


class RelayClient:
    """Talks to a relay's control port. See the module docstring.

    ``control`` is the relay's shared control address, ``secret`` the shared
    HMAC key; ``timeout`` is the wait per attempt, ``retries`` the number of
    retransmissions after the first attempt. ``media_timeout``, when given, is
    sent with every allocation, so the controller's ``--media-timeout`` holds
    whatever the (remote) relay was started with; None leaves it to the relay.
    """

    def __init__(
        self,
        control: Address,
        secret: bytes,
        *,
        timeout: float = 0.5,
        retries: int = 3,
        lost_after: int = 3,
        media_timeout: float | None = None,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the relay secret must be at least 16 bytes")
        if media_timeout is not None and not media_timeout > 0:
            raise ValueError("the media timeout must be positive")
        # Beyond 10^9 s (31 years) is "never"; the relay takes any finite value below 10^10.
        self.media_timeout = None if media_timeout is None else min(media_timeout, 1e9)
        self.control = control
        self._secret = secret
        self.timeout = timeout
        self.retries = max(0, retries)
        self.lost_after = lost_after
        self._family = socket.AF_INET6 if ":" in control[0] else socket.AF_INET
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._shards: dict[int, Address] = {}
        self._refresh = True
        self._round_robin = itertools.count()
        self._calls: dict[str, _Placement] = {}
        self._reported: set[str] = set()
        self._lost: list[tuple[str, str]] = []
        self._misses: dict[int, int] = {}
        self._pool: list[socket.socket] = []  # the event loop's sockets (``*_async``)

    # ------------------------------------------------------------ transport

    def _socket(self) -> socket.socket:
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.socket(self._family, socket.SOCK_DGRAM)
            self._local.sock = sock
            with self._lock:
                self._sockets.append(sock)
        return sock

    def _request(self, op: str, **fields: Any) -> tuple[str, bytes]:
        cookie = os.urandom(8).hex()
        message = {"c": cookie, "op": op, "ts": time.time(), **fields}
        return cookie, seal(self._secret, message)

    def _exchange(
        self, address: Address, op: str, *, attempts: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Send one command to ``address`` and wait for its reply, retransmitting
        the same datagram. Raises _NoReply."""
        cookie, datagram = self._request(op, **fields)
        sock = self._socket()
        for _attempt in range(attempts if attempts is not None else 1 + self.retries):
            try:
                sock.sendto(datagram, address)
            except OSError as exc:
                LOG.debug("relay control send to %s failed: %s", address, exc)
            reply = self._await(sock, {cookie}, time.monotonic() + self.timeout)
            if reply:
                return reply[cookie]
        raise _NoReply(f"{op} to {address[0]}:{address[1]}")

    def _await(
        self, sock: socket.socket, cookies: set[str], deadline: float
    ) -> dict[str, dict[str, Any]]:
        """Replies for ``cookies`` until all came or the deadline passed.
        Stale replies (earlier cookies) and forged datagrams are discarded."""
        replies: dict[str, dict[str, Any]] = {}
        while len(replies) < len(cookies):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                data = sock.recv(65535)
            except TimeoutError:
                break
            except ConnectionRefusedError:
                continue  # an ICMP error about an earlier send: keep waiting
            except OSError:
                break  # the socket was closed under us (close()): give up waiting
            try:
                reply = open_datagram(self._secret, data)
            except BadDatagram:
                continue
            if reply["c"] in cookies:
                replies[reply["c"]] = reply
        return replies

    def _run(self, steps: _Steps[_T]) -> _T:
        """Carry out an operation's exchanges over this thread's socket."""
        try:
            ask = next(steps)
            while True:
                try:
                    reply: dict[str, Any] | None = self._exchange(ask.address, ask.op, **ask.fields)
                except _NoReply:
                    reply = None
                ask = steps.send(reply)
        except StopIteration as done:
            result: _T = done.value
            return result

    async def _run_async(self, steps: _Steps[_T]) -> _T:
        """Carry out an operation's exchanges without blocking the event loop."""
        try:
            ask = next(steps)
            while True:
                ask = steps.send(await self._exchange_async(ask))
        except StopIteration as done:
            result: _T = done.value
            return result

    async def _exchange_async(self, ask: _Ask) -> dict[str, Any] | None:
        """``_exchange`` on a non-blocking socket of the pool (one command per
        socket at a time, so replies need no sorting); None when no reply came."""
        import anyio

        cookie, datagram = self._request(ask.op, **ask.fields)
        pool = self._pool
        sock = pool.pop() if pool else self._pooled_socket()
        try:
            for _attempt in range(1 + self.retries):
                try:
                    sock.sendto(datagram, ask.address)
                except BlockingIOError:
                    pass  # a full send buffer: as a lost datagram, retransmitted
                except OSError as exc:
                    LOG.debug("relay control send to %s failed: %s", ask.address, exc)
                deadline = time.monotonic() + self.timeout
                while (remaining := deadline - time.monotonic()) > 0:
                    with anyio.move_on_after(remaining):
                        await anyio.wait_readable(sock)
                    try:
                        data = sock.recv(65535)
                    except (BlockingIOError, ConnectionRefusedError):
                        continue  # nothing yet, or an ICMP error about an earlier send
                    except OSError:
                        return None  # closed under us (close())
                    try:
                        reply = open_datagram(self._secret, data)
                    except BadDatagram:
                        continue
                    if reply["c"] == cookie:
                        return reply
            return None
        finally:
            if sock.fileno() >= 0:
                pool.append(sock)

    def _pooled_socket(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _shard_table(self) -> dict[int, Address]:
        """The shards' control addresses, asked once from the shared control port."""
        return self._run(self._shard_table_steps())

    def _shard_table_steps(self) -> _Steps[dict[int, Address]]:
        with self._lock:
            if self._shards and not self._refresh:
                return dict(self._shards)
        reply = yield _Ask(self.control, "info", {})
        if reply is None:
            raise MediaUnavailable(f"relay at {self.control[0]}:{self.control[1]} does not answer")
        if not reply.get("ok"):
            raise MediaUnavailable(f"relay refused info: {reply.get('error')}")
        try:
            table = {int(s["index"]): (self.control[0], int(s["port"])) for s in reply["shards"]}
        except (KeyError, TypeError, ValueError):
            raise MediaUnavailable("malformed info reply from the relay") from None
        if not table:
            raise MediaUnavailable("the relay has no shards")
        with self._lock:
            self._shards = table
            self._refresh = False
        return dict(table)

    # ------------------------------------------------------------ MediaRelay

    def allocate(self, call_ref: str, *, a_peer: Address | None, echo: bool) -> MediaAllocation:
        """Reserve ports for a call (two pairs, or one for echo). Idempotent per
        ``call_ref``. Raises MediaUnavailable when every shard is full or silent."""
        return self._run(self._allocate_steps(call_ref, a_peer, echo))

    def _allocate_steps(
        self, call_ref: str, a_peer: Address | None, echo: bool
    ) -> _Steps[MediaAllocation]:
        with self._lock:
            placed = self._calls.get(call_ref)
        if placed is not None:
            return placed.allocation
        table = yield from self._shard_table_steps()
        order = sorted(table)
        start = next(self._round_robin) % len(order)
        exhausted = 0
        fields: dict[str, Any] = {
            "call": call_ref,
            "a_peer": list(a_peer) if a_peer else None,
            "echo": echo,
        }
        if self.media_timeout is not None:
            fields["media_timeout"] = self.media_timeout
        for index in order[start:] + order[:start]:
            reply = yield _Ask(table[index], "allocate", fields)
            if reply is None:
                LOG.warning("relay shard %d at %s does not answer", index, table[index])
                continue
            if reply.get("ok"):
                try:
                    allocation = MediaAllocation(
                        call_ref=call_ref,
                        a_address=str(reply["a"][0]),
                        a_port=int(reply["a"][1]),
                        b_address=str(reply["b"][0]),
                        b_port=int(reply["b"][1]),
                    )
                    placement = _Placement(index, int(reply["inc"]), allocation)
                except (KeyError, IndexError, TypeError, ValueError):
                    raise MediaUnavailable("malformed allocate reply from the relay") from None
                with self._lock:
                    self._calls[call_ref] = placement
                return allocation
            if reply.get("error") != "exhausted":
                raise MediaUnavailable(f"relay refused allocate: {reply.get('error')}")
            exhausted += 1
        if exhausted == len(order):
            LOG.warning("relay ports exhausted on all %d shards", len(order))
            raise MediaUnavailable("relay ports exhausted")
        with self._lock:
            # Ask for the table again next time (the relay may have been
            # restarted with other shards); keep this one meanwhile, since
            # live calls are addressed through it.
            self._refresh = True
        raise MediaUnavailable("relay shards do not answer")

    async def allocate_async(
        self, call_ref: str, *, a_peer: Address | None, echo: bool
    ) -> MediaAllocation:
        """``allocate`` from an event loop (AnyIO), without a worker thread."""
        return await self._run_async(self._allocate_steps(call_ref, a_peer, echo))

    def update(
        self,
        call_ref: str,
        *,
        a_peer: Address | None,
        b_peer: Address | None,
        a_events: int | None = None,
        b_events: int | None = None,
    ) -> None:
        """Tell the relay the SDP addresses of each side, and each side's
        telephone-event payload type. Raises MediaUnavailable."""
        self._run(self._update_steps(call_ref, a_peer, b_peer, a_events, b_events))

    def _update_steps(
        self,
        call_ref: str,
        a_peer: Address | None,
        b_peer: Address | None,
        a_events: int | None,
        b_events: int | None,
    ) -> _Steps[None]:
        placed, address = self._placement(call_ref)
        if placed is None or address is None:
            raise MediaUnavailable(f"no relay allocation for {call_ref}")
        reply = yield _Ask(
            address,
            "update",
            {
                "call": call_ref,
                "a_peer": list(a_peer) if a_peer else None,
                "b_peer": list(b_peer) if b_peer else None,
                "a_events": a_events,
                "b_events": b_events,
            },
        )
        if reply is None:
            raise MediaUnavailable("relay shard does not answer")
        if not reply.get("ok") or reply.get("inc") != placed.incarnation:
            raise MediaUnavailable(f"relay refused update: {reply.get('error', 'shard restarted')}")

    async def update_async(
        self,
        call_ref: str,
        *,
        a_peer: Address | None,
        b_peer: Address | None,
        a_events: int | None = None,
        b_events: int | None = None,
    ) -> None:
        """``update`` from an event loop (AnyIO), without a worker thread."""
        await self._run_async(self._update_steps(call_ref, a_peer, b_peer, a_events, b_events))

    async def release_async(self, call_ref: str) -> tuple[MediaStats | None, MediaStats | None]:
        """``release`` from an event loop (AnyIO), without a worker thread."""
        return await self._run_async(self._release_steps(call_ref))

    def on_loop(self, loop: asyncio.AbstractEventLoop) -> LoopRelay:
        """The operations as callbacks on ``loop`` (asyncio or uvloop), for a
        driver running there; see ``LoopRelay``. Call from the loop's thread."""
        sock = self._pooled_socket()
        return LoopRelay(self, loop, sock)

    def release(self, call_ref: str) -> tuple[MediaStats | None, MediaStats | None]:
        """Free a call's ports; its final (A-leg, B-leg) figures, or (None, None)
        when the relay lost the call or does not answer (logged)."""
        return self._run(self._release_steps(call_ref))

    def _release_steps(self, call_ref: str) -> _Steps[tuple[MediaStats | None, MediaStats | None]]:
        placed, address = self._placement(call_ref)
        with self._lock:
            self._calls.pop(call_ref, None)
            self._reported.discard(call_ref)
        if placed is None or address is None:
            return None, None
        reply = yield _Ask(address, "delete", {"call": call_ref})
        if reply is None:
            LOG.warning(
                "relay did not answer delete of %s; its ports are freed by the media timeout",
                call_ref,
            )
            return None, None
        if not reply.get("ok") or reply.get("inc") != placed.incarnation:
            return None, None
        return _media_stats(reply.get("a")), _media_stats(reply.get("b"))

    def expired(self) -> list[tuple[str, str]]:
        """Calls the relay ended on its own since the last poll: (call_ref,
        "media-timeout" | "relay-lost"). One round trip to each shard holding
        our calls, in parallel, without retransmission (the next poll is the retry)."""
        with self._lock:
            found, self._lost = self._lost, []
            by_shard: dict[int, list[str]] = {}
            for call_ref, placed in self._calls.items():
                by_shard.setdefault(placed.shard, []).append(call_ref)
            shards = dict(self._shards)
        if not by_shard:
            return found
        sock = self._socket()
        pending: dict[str, int] = {}
        for index in by_shard:
            address = shards.get(index)
            if address is None:
                continue
            cookie, datagram = self._request("expired")
            pending[cookie] = index
            try:
                sock.sendto(datagram, address)
            except OSError as exc:
                LOG.debug("relay poll to %s failed: %s", address, exc)
        replies = self._await(sock, set(pending), time.monotonic() + self.timeout)
        answered = {pending[c]: r for c, r in replies.items()}
        with self._lock:
            for index, refs in by_shard.items():
                reply = answered.get(index)
                if reply is None or not reply.get("ok"):
                    self._misses[index] = self._misses.get(index, 0) + 1
                    if self._misses[index] >= self.lost_after:
                        LOG.warning(
                            "relay shard %d silent for %d polls: its calls are lost",
                            index,
                            self._misses[index],
                        )
                        found += self._forget(refs)
                    continue
                self._misses[index] = 0
                incarnation = reply.get("inc")
                # A call may have been released by another thread during the round trip.
                stale = [
                    r
                    for r in refs
                    if r in self._calls and self._calls[r].incarnation != incarnation
                ]
                if stale:
                    LOG.warning("relay shard %d restarted: %d calls lost", index, len(stale))
                    found += self._forget(stale)
                timed_out = reply.get("timed_out")
                for call_ref in timed_out if isinstance(timed_out, list) else []:
                    owner = self._calls.get(call_ref)
                    if (
                        owner is not None
                        and owner.shard == index
                        and call_ref not in self._reported
                    ):
                        self._reported.add(call_ref)
                        found.append((call_ref, "media-timeout"))
        return found

    def _forget(self, refs: list[str]) -> list[tuple[str, str]]:
        """Drop lost calls (lock held) and name those still ours; release() of
        them then returns no figures."""
        lost = []
        for call_ref in refs:
            if self._calls.pop(call_ref, None) is not None:
                lost.append((call_ref, "relay-lost"))
            self._reported.discard(call_ref)
        return lost

    def _placement(self, call_ref: str) -> tuple[_Placement | None, Address | None]:
        with self._lock:
            placed = self._calls.get(call_ref)
            address = self._shards.get(placed.shard) if placed is not None else None
        return placed, address

    # ------------------------------------------------------------ operator queries

    def shard_stats(self) -> list[dict[str, Any]]:
        """Every shard's figures (the ``stats`` command), in shard order; a
        silent shard appears as ``{"index": i, "error": "no reply"}``."""
        table = self._shard_table()
        out = []
        for index in sorted(table):
            try:
                reply = self._exchange(table[index], "stats")
            except _NoReply:
                out.append({"index": index, "error": "no reply"})
                continue
            reply["index"] = index
            out.append(reply)
        return out

    def shard_calls(self, index: int) -> list[dict[str, Any]]:
        """Every call of one shard with its figures (paged ``list`` commands)."""
        address = self._shard_table()[index]
        calls: list[dict[str, Any]] = []
        for _page in range(10_000):
            try:
                reply = self._exchange(address, "list", offset=len(calls), limit=100)
            except _NoReply:
                raise MediaUnavailable(f"relay shard {index} does not answer") from None
            page = reply.get("calls", [])
            calls += page
            if not page or len(calls) >= reply.get("total", 0):
                break
        return calls

    def query(self, call_ref: str) -> dict[str, Any] | None:
        """One of our calls' full figures, or None when unknown."""
        placed, address = self._placement(call_ref)
        if placed is None or address is None:
            return None
        try:
            reply = self._exchange(address, "query", call=call_ref)
        except _NoReply:
            raise MediaUnavailable("relay shard does not answer") from None
        figures: dict[str, Any] | None = reply.get("figures") if reply.get("ok") else None
        return figures

    def close(self) -> None:
        """Close the client's sockets (of every thread)."""
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
        self._pool = []
        self._local = threading.local()


Outcome = Callable[[Any, Exception | None], None]
"""How a ``LoopRelay`` operation ends: called once with (result, None) or (None, error)."""


class _Running:
    """One operation of a ``LoopRelay`` under way: its steps and its command in flight."""

    __slots__ = ("address", "attempts", "cookie", "datagram", "done", "expiry", "steps", "timer")

    def __init__(self, steps: _Steps[Any], done: Outcome) -> None:
        self.steps = steps
        self.done = done
        self.cookie = ""
        self.datagram = b""
        self.address: Address = ("", 0)
        self.attempts = 0
        self.timer: asyncio.TimerHandle | None = None
        self.expiry: asyncio.TimerHandle | None = None


class LoopRelay:
    """A ``RelayClient``'s operations run as callbacks of an asyncio loop.

    ``allocate``, ``update`` and ``release`` start an operation and return at
    once; ``done(result, None)`` or ``done(None, error)`` is called later, on
    the loop, exactly once (never from inside the starting call), unless
    ``close()`` comes first. The errors are those of the blocking client
    (``MediaUnavailable``), and ``TimeoutError`` when the whole operation
    outlasts ``deadline`` seconds. Commands go out of one socket that stays
    registered with the loop; replies are matched to their operation by
    cookie, and a command is retransmitted as the same datagram after the
    client's ``timeout``, ``retries`` times, as in the other clients. The
    table of calls is the client's, so ``expired()`` and the blocking calls
    see what was done here. Not thread-safe: use it from the loop's thread.
    """

    def __init__(
        self, client: RelayClient, loop: asyncio.AbstractEventLoop, sock: socket.socket
    ) -> None:
        self._client = client
        self._loop = loop
        self._sock = sock
        self._runs: set[_Running] = set()
        self._by_cookie: dict[str, _Running] = {}  # the command each run has in flight
        self._closed = False
        loop.add_reader(sock.fileno(), self._readable)

    def allocate(
        self,
        call_ref: str,
        *,
        a_peer: Address | None,
        echo: bool,
        done: Outcome,
        deadline: float | None = None,
    ) -> None:
        """``RelayClient.allocate``; ``done`` gets the ``MediaAllocation``."""
        self._begin(self._client._allocate_steps(call_ref, a_peer, echo), done, deadline)

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
    ) -> None:
        """``RelayClient.update``; ``done`` gets None."""
        steps = self._client._update_steps(call_ref, a_peer, b_peer, a_events, b_events)
        self._begin(steps, done, deadline)

    def release(self, call_ref: str, *, done: Outcome, deadline: float | None = None) -> None:
        """``RelayClient.release``; ``done`` gets the (A-leg, B-leg) figures."""
        self._begin(self._client._release_steps(call_ref), done, deadline)

    @property
    def running(self) -> int:
        """Operations under way."""
        return len(self._runs)

    def close(self) -> None:
        """Stop: the socket leaves the loop and is closed; operations under way
        are dropped without a callback (as a cancelled task would be)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        for run in self._runs:
            self._disarm(run)
            run.steps.close()
        self._runs.clear()
        self._by_cookie.clear()
        self._sock.close()

    # -- the machinery -----------------------------------------------------------------

    def _begin(self, steps: _Steps[Any], done: Outcome, deadline: float | None) -> None:
        if self._closed:
            raise RuntimeError("the LoopRelay is closed")
        run = _Running(steps, done)
        self._runs.add(run)
        if deadline is not None:
            run.expiry = self._loop.call_later(deadline, self._expire, run)
        # Started from the loop, not here: the caller is told of the outcome only
        # once it has returned, as from a task it started.
        self._loop.call_soon(self._advance, run, None, True)

    def _advance(self, run: _Running, reply: dict[str, Any] | None, first: bool = False) -> None:
        """Give the operation its reply (None: none came), then send what it asks next
        or end it."""
        if run not in self._runs:
            return  # closed, or past its deadline, meanwhile
        try:
            ask = next(run.steps) if first else run.steps.send(reply)
        except StopIteration as finished:
            self._finish(run, finished.value, None)
            return
        except Exception as exc:
            self._finish(run, None, exc)
            return
        client = self._client
        try:
            run.cookie, run.datagram = client._request(ask.op, **ask.fields)
        except Exception as exc:  # a command too large to send (BadDatagram): it fails
            run.steps.close()
            self._finish(run, None, MediaUnavailable(f"relay {ask.op} not sent: {exc}"))
            return
        run.address = ask.address
        run.attempts = 1 + client.retries
        self._by_cookie[run.cookie] = run
        self._send(run)

    def _send(self, run: _Running) -> None:
        run.attempts -= 1
        try:
            self._sock.sendto(run.datagram, run.address)
        except BlockingIOError:
            pass  # a full send buffer: as a lost datagram, retransmitted
        except OSError as exc:
            LOG.debug("relay control send to %s failed: %s", run.address, exc)
        run.timer = self._loop.call_later(self._client.timeout, self._no_reply, run)

    def _no_reply(self, run: _Running) -> None:
        run.timer = None
        if run.attempts > 0:
            self._send(run)
            return
        del self._by_cookie[run.cookie]
        self._advance(run, None)

    def _readable(self) -> None:
        secret = self._client._secret
        for _ in range(64):
            try:
                data = self._sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                continue  # an ICMP error about an earlier send
            except OSError:
                return  # closed under us
            try:
                reply = open_datagram(secret, data)
            except BadDatagram:
                continue
            run = self._by_cookie.pop(reply["c"], None)
            if run is None:
                continue  # the reply to a retransmitted command already answered
            if run.timer is not None:
                run.timer.cancel()
                run.timer = None
            self._advance(run, reply)

    def _expire(self, run: _Running) -> None:
        run.expiry = None
        if self._by_cookie.get(run.cookie) is run:
            del self._by_cookie[run.cookie]
        self._runs.discard(run)
        self._disarm(run)
        run.steps.close()
        self._call(run, None, TimeoutError("relay operation deadline passed"))

    def _finish(self, run: _Running, result: Any, error: Exception | None) -> None:
        self._runs.discard(run)
        self._disarm(run)
        self._call(run, result, error)

    def _disarm(self, run: _Running) -> None:
        for handle in (run.timer, run.expiry):
            if handle is not None:
                handle.cancel()
        run.timer = run.expiry = None

    @staticmethod
    def _call(run: _Running, result: Any, error: Exception | None) -> None:
        done, run.done = run.done, _ended
        done(result, error)


def _ended(result: Any, error: Exception | None) -> None:
    """An operation's ``done`` once it has been called: never again."""


def _media_stats(value: Any) -> MediaStats | None:
    if not isinstance(value, dict):
        return None
    try:
        return MediaStats(
            packets_in=int(value.get("packets_in", 0)),
            packets_out=int(value.get("packets_out", 0)),
            bytes_in=int(value.get("bytes_in", 0)),
            bytes_out=int(value.get("bytes_out", 0)),
            packets_lost=int(value.get("packets_lost", 0)),
            jitter_ms=float(value.get("jitter_ms", 0.0)),
        )
    except (TypeError, ValueError):
        LOG.warning("malformed media figures from the relay: %r", value)
        return None
