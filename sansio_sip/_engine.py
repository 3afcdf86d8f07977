"""The engine: the façade a driver feeds with bytes and time.

It owns the layers and routes every message to the right place:

* framing (UDP datagrams, TCP streams per connection) and parsing; a message
  that cannot be parsed is answered statelessly when the parser says it
  deserves an answer (400, 505, 513), or dropped and counted;
* the transaction layer (RFC 3261 §17): retransmissions are absorbed there
  *before* authentication, so single-use nonces never turn a UDP
  retransmission into a replay (DESIGN §7);
* the checks of RFC 3261 §8.2 in its order: method (405 with Allow, guide §8),
  Request-URI scheme (416), Require (420), content type (415);
* OPTIONS (200 with Allow, Accept, Supported, no auth) and REGISTER (digest,
  200 echoing the Contact with an expiry, no binding stored: guide §8);
* INVITE authentication, then the call layer (``_call``) for the B2BUA.

The engine never waits: account look-ups and relay allocations are actions
whose results come back through ``account_found`` / ``account_unavailable``
and ``media_allocated`` / ``media_failed``.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence

import attrs

from ._actions import Action, CloseConnection, Log, LookupAccount, Send
from ._auth import AuthOutcome, decide
from ._call import CallManager
from ._config import EngineConfig
from ._devices import DeviceTracker
from ._digest import (
    DigestCredentials,
    NonceFactory,
    NonceTracker,
    make_challenge,
    parse_authorization,
)
from ._errors import ParseError, RemoteProtocolError
from ._events import ResponseReceived, TransactionTimedOut, TransportFailed
from ._framing import StreamFramer
from ._guard import Guard
from ._headers import KNOWN_METHODS, NameAddr, parse_name_addr
from ._message import Request, Response, parse_message
from ._model import Account, Address, MediaAllocation, Transport
from ._seams import Entropy
from ._transaction import ServerTransaction, TransactionLayer
from ._tu import Responder, ServerContext, context_of
from ._uri import AbsoluteUri, SipUri, TelUri, parse_uri
from ._wire import format_address, stateless_error_response

__all__ = ["Engine"]

_SUPPORTED_EXTENSIONS: frozenset[str] = frozenset()
"""Option tags kx-sipd implements. None: no PRACK (100rel is optional for the
client and we never demand it), no session timers (so `timer` is left out of
Supported and a pjsua call works without refreshes), no outbound."""

_ACCEPT = "application/sdp"

_URI_KINDS = 4096
"""URIs whose kind the engine remembers (``Engine._uri_kind``): room for the
Request-URIs and addresses-of-record of a few thousand registering clients;
past it the memory starts over, which costs only a re-parse."""


@attrs.define(slots=True)
class _PendingAuth:
    """A request waiting for the account store."""

    transaction: ServerTransaction
    request: Request
    credentials: DigestCredentials
    source: Address
    transport: Transport
    connection: int | None


class Engine:
    """The kx-sipd protocol engine. One instance per server process.

    Every method returns the list of actions to perform, in order. ``now`` is
    monotonic seconds (timers); ``wall`` is wall-clock seconds (nonces, which
    other processes and hosts verify, call records and Date headers).
    """

    def __init__(self, config: EngineConfig, *, entropy: Entropy) -> None:
        self.config = config
        self._entropy = entropy
        self._transactions = TransactionLayer(
            t1=config.t1,
            t2=config.t2,
            t4=config.t4,
            max_transactions=config.max_transactions,
            retry_after=config.retry_after,
        )
        self._nonces = NonceFactory(config.nonce_secret, lifetime=config.nonce_lifetime)
        self._used_nonces = NonceTracker(lifetime=config.nonce_lifetime)
        self._framers: dict[int, StreamFramer] = {}
        self._pending: dict[int, _PendingAuth] = {}
        self._parked: Request | None = None  # the request just parked for a look-up
        self._next_token = 1
        self._counters: Counter[str] = Counter()
        self._guard = Guard(config.guard)
        self._devices = DeviceTracker(interval=config.register_expires)
        # Failure answers held back by the per-username slow-down:
        # (deadline, seq, transaction, request, reason).
        self._delayed: list[tuple[float, int, ServerTransaction, Request, str]] = []
        self._delay_seq = 0
        self._last_now = 0.0
        self._date_second = -1
        self._date_text = ""
        self._uri_kinds: dict[str, type[SipUri | TelUri | AbsoluteUri]] = {}
        self._responder = Responder(self._transactions, entropy, self._counters, config.server_name)
        self._calls = CallManager(
            responder=self._responder,
            config=config,
            entropy=entropy,
            transactions=self._transactions,
            counters=self._counters,
            new_token=self._new_token,
        )

    # ------------------------------------------------------------------ input

    def receive(
        self,
        data: bytes,
        *,
        source: Address,
        transport: Transport,
        now: float,
        wall: float,
        connection: int | None = None,
    ) -> list[Action]:
        """Feed one UDP datagram, or one chunk of a TCP connection's stream.

        Returns the actions to perform. Never raises for anything the peer
        sent: faults become answers or counted drops.
        """
        try:
            return self._receive(data, source, transport, now, wall, connection)
        finally:
            if self._transactions.removed:
                self._unlink_removed()

    def _receive(
        self,
        data: bytes,
        source: Address,
        transport: Transport,
        now: float,
        wall: float,
        connection: int | None,
    ) -> list[Action]:
        out: list[Action] = []
        if not 0 < source[1] < 65536:
            # A forged source (port 0) can be answered nowhere: a counted drop.
            self._counters["dropped_bad_source"] += 1
            return out
        if self._guard.banned(source[0], now=now):
            # Checked before any parsing: a banned source costs one dict look-up.
            self._counters["dropped_banned"] += 1
            if connection is not None:
                out.append(CloseConnection(connection=connection, reason="source banned"))
                self._framers.pop(connection, None)
            return out
        if transport is Transport.UDP:
            self._counters["datagrams_in"] += 1
            if not data.strip(b"\r\n \t"):
                # RFC 5626 §4.4.1 keep-alive over UDP: nothing to answer, nothing to log.
                self._counters["keepalives"] += 1
                return out
            self._receive_message(data, source, transport, None, now, wall, out)
            return out
        if connection is None:
            raise ValueError("a stream chunk needs its connection id")
        framer = self._framers.get(connection)
        if framer is None:
            framer = self._framers[connection] = StreamFramer(
                max_header_bytes=min(self.config.max_message_size, 65_535),
                max_body_bytes=self.config.max_message_size,
            )
        try:
            messages = framer.feed(data)
        except ParseError as error:
            self._counters["framing_errors"] += 1
            out.append(
                Log(
                    level="info",
                    event="tcp.framing_error",
                    fields=(("source", format_address(source)), ("reason", error.reason)),
                )
            )
            if error.status_code is not None:
                # Tell the client why before closing (400 for Content-Length faults,
                # 513 for a message over the limits), when its head names a Via.
                answer = stateless_error_response(
                    framer.rejected,
                    error.status_code,
                    error.reason,
                    to_tag=self._entropy(6).hex(),
                )
                if answer is not None:
                    out.append(
                        Send(
                            data=answer,
                            destination=source,
                            transport=transport,
                            connection=connection,
                        )
                    )
            out.append(CloseConnection(connection=connection, reason=error.reason))
            self._framers.pop(connection, None)
            return out
        pongs = framer.take_pongs()
        if pongs:
            self._counters["keepalives"] += pongs
            out.append(
                Send(data=b"\r\n", destination=source, transport=transport, connection=connection)
            )
        for message in messages:
            self._receive_message(message, source, transport, connection, now, wall, out)
        return out

    def connection_closed(self, connection: int, *, now: float, wall: float) -> list[Action]:
        """The driver saw a stream connection close."""
        self._framers.pop(connection, None)
        return []

    def handle_timer(self, *, now: float, wall: float) -> list[Action]:
        """Fire every deadline that is due; call when ``next_timer()`` has passed."""
        out: list[Action] = []
        self._last_now = now
        self._dispatch(self._transactions.handle_timer(now=now), now, wall, out)
        self._calls.handle_timer(now=now, wall=wall, out=out)
        while self._delayed and self._delayed[0][0] <= now:
            _, _, transaction, request, reason = heapq.heappop(self._delayed)
            if not context_of(transaction).final:
                self._respond(transaction, request, 403, reason, now, wall, out)
        if self._transactions.removed:
            self._unlink_removed()
        return out

    def next_timer(self) -> float | None:
        """The monotonic time at which ``handle_timer`` must next be called."""
        # Called after every input: no list built for a minimum of three.
        earliest = self._transactions.next_timer()
        calls = self._calls.next_timer()
        if calls is not None and (earliest is None or calls < earliest):
            earliest = calls
        if self._delayed:
            delayed = self._delayed[0][0]
            if earliest is None or delayed < earliest:
                earliest = delayed
        return earliest

    def account_found(
        self, token: int, account: Account | None, *, now: float, wall: float
    ) -> list[Action]:
        """Result of a ``LookupAccount``: the account, or None when it does not exist."""
        out: list[Action] = []
        pending = self._pending.pop(token, None)
        if pending is None:
            return out
        try:
            self._authenticated(pending, account, now, wall, out)
        except RemoteProtocolError as error:
            self._answer_error(pending.transaction, pending.request, error, now, wall, out)
        finally:
            pending.request._forget_received()
        if self._transactions.removed:
            self._unlink_removed()
        return out

    def account_unavailable(self, token: int, *, now: float, wall: float) -> list[Action]:
        """The store could not answer a ``LookupAccount``: 503 with Retry-After."""
        out: list[Action] = []
        pending = self._pending.pop(token, None)
        if pending is None:
            return out
        self._counters["store_unavailable"] += 1
        pending.request._forget_received()
        self._busy(pending.transaction, pending.request, now, wall, out)
        out.append(
            Log(
                level="warning",
                event="store.unavailable",
                fields=(
                    ("call_id", pending.request.call_id),
                    ("method", pending.request.method),
                    ("source", format_address(pending.source)),
                ),
            )
        )
        if self._transactions.removed:
            self._unlink_removed()
        return out

    def media_allocated(
        self, token: int, allocation: MediaAllocation, *, now: float, wall: float
    ) -> list[Action]:
        """Result of an ``AllocateMedia``."""
        out: list[Action] = []
        self._calls.media_allocated(token, allocation, now=now, wall=wall, out=out)
        if self._transactions.removed:
            self._unlink_removed()
        return out

    def media_failed(self, token: int, reason: str, *, now: float, wall: float) -> list[Action]:
        """The relay could not allocate: the call gets 503."""
        out: list[Action] = []
        self._calls.media_failed(token, reason, now=now, wall=wall, out=out)
        if self._transactions.removed:
            self._unlink_removed()
        return out

    def media_ended(self, call_ref: str, reason: str, *, now: float, wall: float) -> list[Action]:
        """The relay ended a call's media (timeout, lost shard): end the call."""
        out: list[Action] = []
        self._calls.media_ended(call_ref, reason, now=now, wall=wall, out=out)
        if self._transactions.removed:
            self._unlink_removed()
        return out

    def transport_failed(
        self, destination: Address, transport: Transport, *, now: float, wall: float
    ) -> list[Action]:
        """Sending to ``destination`` failed (ICMP unreachable, refused connection)."""
        out: list[Action] = []
        self._dispatch(
            self._transactions.transport_error(destination, transport, now=now), now, wall, out
        )
        if self._transactions.removed:
            self._unlink_removed()
        return out

    @property
    def accepting(self) -> bool:
        """False from ``stop_accepting`` on: a graceful shutdown has begun and new
        calls get 503 while the calls up finish (a health check reads it)."""
        return self._calls.accepting

    def stop_accepting(self, *, now: float, wall: float) -> list[Action]:
        """Graceful shutdown, step one: new calls get 503, running calls go on."""
        self._calls.accepting = False
        return [Log(level="info", event="engine.stop_accepting", fields=())]

    def end_all_calls(self, *, now: float, wall: float) -> list[Action]:
        """Graceful shutdown, step two: hang up every call on both legs."""
        out: list[Action] = []
        self._calls.end_all(now=now, wall=wall, out=out)
        if self._transactions.removed:
            self._unlink_removed()
        return out

    @property
    def active_calls(self) -> int:
        """Calls that passed authentication and have not ended."""
        return self._calls.active

    @property
    def idle(self) -> bool:
        """Nothing in flight: no call, no pending look-up or delayed answer, no
        transaction still working (lingering ones only absorb retransmissions)."""
        return (
            not self._pending
            and not self._delayed
            and self._calls.active == 0
            and not self._transactions.busy
        )

    def stats(self) -> dict[str, int]:
        """Counters since start: messages, drops by reason, answers, auth outcomes, calls."""
        stats = dict(self._counters)
        stats["transactions"] = len(self._transactions)
        if self._transactions.evicted:
            stats["transactions_evicted"] = self._transactions.evicted
        stats["calls_active"] = self._calls.active
        stats["pending_lookups"] = len(self._pending)
        stats["bans"] = len(self._guard.bans(now=self._last_now))
        stats["guard_entries"] = len(self._guard)
        return stats

    def bans(self, *, now: float) -> list[tuple[str, float]]:
        """Sources banned for failed authentications, as (ip, seconds left)."""
        return self._guard.bans(now=now)

    def shared_accounts(self, *, now: float) -> list[tuple[str, tuple[str, ...]]]:
        """Accounts used from several addresses within the registration
        interval (guide §3 asks for one device per account), with the addresses."""
        return self._devices.shared(now=now)

    def clear_bans(self, ip: str | None = None) -> int:
        """Lift the ban on ``ip`` (all bans when None); returns how many."""
        return self._guard.clear(ip)

    # --------------------------------------------------------------- internals

    def _unlink_removed(self) -> None:
        """Drop the links between finished transactions and their calls.

        A call and its transactions point at each other (``Call.a_invite`` ->
        transaction -> ``ServerContext.call`` -> ``Call``; a client
        transaction's ``_Role`` likewise): left alone, every call would end as
        a reference cycle that only the cyclic collector frees, and the server
        runs that collector rarely. Called at the end of each entry point,
        after the removed transactions' events have reached the TU. A server
        transaction's context keeps ``final`` (a long call still asks whether
        its INVITE was answered); only its ``call`` goes."""
        removed = self._transactions.removed
        for transaction in removed:
            owner = transaction.owner
            if isinstance(owner, ServerContext):
                owner.call = None
            elif owner is not None:
                transaction.owner = None
        removed.clear()

    def _new_token(self) -> int:
        token = self._next_token
        self._next_token += 1
        return token

    def _receive_message(
        self,
        data: bytes,
        source: Address,
        transport: Transport,
        connection: int | None,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        try:
            message = parse_message(data, max_size=self.config.max_message_size)
        except ParseError as error:
            self._parse_failed(data, error, source, transport, connection, out)
            return
        try:
            self._dispatch_message(message, data, source, transport, connection, now, wall, out)
        finally:
            # The datagram stays with the message only while it is handled (for the
            # ladder, as_received), a look-up's wait included: a transaction keeps its
            # request for up to 64*T1, and the table holds up to max_transactions
            # (20,000) of them.
            if message is not self._parked:
                message._forget_received()
            self._parked = None

    def _dispatch_message(
        self,
        message: Request | Response,
        data: bytes,
        source: Address,
        transport: Transport,
        connection: int | None,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        if isinstance(message, Response):
            self._counters["responses_in"] += 1
            self._on_response(message, source, now, wall, out)
            return
        self._last_now = now
        if len(message.headers) > self.config.max_headers:
            self._parse_failed(
                data, ParseError("Too many header fields", 400), source, transport, connection, out
            )
            return
        if self._guard.is_scanner(message.headers.get("User-Agent")):
            self._counters["dropped_scanner"] += 1
            return
        self._counters["requests_in"] += 1
        # Counters are keyed by method only for the methods of RFC 3261 and its
        # common extensions: a peer inventing method names must not grow the table.
        method_key = message.method if message.method in KNOWN_METHODS else "other"
        self._counters[f"requests_in.{method_key}"] += 1
        try:
            self._on_request(message, source, transport, connection, now, wall, out)
        except RemoteProtocolError as error:
            # A header the engine needed was malformed (the parser is lazy for
            # headers it does not need on every message).
            self._parse_failed(data, error, source, transport, connection, out)

    def _parse_failed(
        self,
        data: bytes,
        error: RemoteProtocolError,
        source: Address,
        transport: Transport,
        connection: int | None,
        out: list[Action],
    ) -> None:
        answer = None
        if error.status_code is not None:
            answer = stateless_error_response(
                data,
                error.status_code,
                error.reason,
                headers=error.headers,
                to_tag=self._entropy(6).hex(),
            )
        if answer is None:
            self._counters["dropped_malformed"] += 1
            out.append(
                Log(
                    level="debug",
                    event="message.dropped",
                    fields=(("source", format_address(source)), ("reason", error.reason)),
                )
            )
            return
        self._counters[f"responses_out.{error.status_code}"] += 1
        self._counters[f"answered.malformed.{error.status_code}"] += 1
        out.append(
            Send(data=answer, destination=source, transport=transport, connection=connection)
        )
        out.append(
            Log(
                level="info",
                event="request.rejected",
                fields=(
                    ("source", format_address(source)),
                    ("status", error.status_code),
                    ("reason", error.reason),
                ),
            )
        )

    def _on_response(
        self, response: Response, source: Address, now: float, wall: float, out: list[Action]
    ) -> None:
        transaction = self._transactions.match_client(response)
        if transaction is None:
            # RFC 6026: a 2xx retransmission after the client transaction is gone
            # belongs to the dialog; the call layer re-sends its ACK.
            if not self._calls.stray_response(response, source, now=now, wall=wall, out=out):
                self._counters["dropped_stray_response"] += 1
            return
        self._dispatch(
            self._transactions.receive_response(transaction, response, now=now), now, wall, out
        )

    def _on_request(
        self,
        request: Request,
        source: Address,
        transport: Transport,
        connection: int | None,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        # Force the lazy parse of what every request needs, so a malformed
        # header is a 400 here rather than a surprise deeper down.
        request.call_id  # noqa: B018
        request.cseq  # noqa: B018
        request.from_  # noqa: B018
        request.to  # noqa: B018
        if len(request.vias) > self.config.max_via_depth:
            raise ParseError("Too many Via headers", 400)
        if "Route" in request.headers:
            self._consume_routes(request)
        if not self._transactions.force_rport:
            # Without symmetric routing the response address is read from the
            # stamped request (§18.2.2); with it, only the answers are stamped.
            self._transactions.stamp_via(request, source)
        method = request.method
        if method == "ACK":
            self._on_ack(request, source, transport, connection, now, wall, out)
            return
        existing = self._transactions.match_server(request)
        if existing is not None:
            self._counters["retransmissions_absorbed"] += 1
            self._dispatch(
                self._transactions.receive_retransmission(existing, request, now=now),
                now,
                wall,
                out,
            )
            return
        if method == "CANCEL":
            self._on_cancel(request, source, transport, connection, now, wall, out)
            return
        try:
            transaction = self._transactions.create_server(
                request, source=source, transport=transport, connection=connection, now=now
            )
        except RemoteProtocolError as error:
            self._counters["overload_rejected"] += 1
            self._parse_failed(bytes(request), error, source, transport, connection, out)
            return
        try:
            self._on_new_request(
                transaction, request, source, transport, connection, now, wall, out
            )
        except RemoteProtocolError as error:
            # A header parsed lazily after the transaction exists was malformed:
            # answer through the transaction, so Timer J (not a leak) ends it.
            self._answer_error(transaction, request, error, now, wall, out)

    def _busy(
        self,
        transaction: ServerTransaction,
        request: Request,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        """503 with Retry-After: the store is down or slow, or the server is stopping."""
        self._respond(
            transaction,
            request,
            503,
            "Service Unavailable",
            now,
            wall,
            out,
            headers=(("Retry-After", str(self.config.retry_after)),),
        )

    def _answer_error(
        self,
        transaction: ServerTransaction,
        request: Request,
        error: RemoteProtocolError,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        self._counters["rejected_malformed"] += 1
        if context_of(transaction).final:
            return
        self._respond(
            transaction,
            request,
            error.status_code or 400,
            error.reason,
            now,
            wall,
            out,
            headers=error.headers,
        )

    def _on_new_request(
        self,
        transaction: ServerTransaction,
        request: Request,
        source: Address,
        transport: Transport,
        connection: int | None,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        """A request that started a new server transaction: check it, then
        hand it to OPTIONS, REGISTER, authentication or the dialog it belongs to."""
        method = request.method
        status = self._check_request(request)
        if status is not None:
            code, reason, headers = status
            self._respond(transaction, request, code, reason, now, wall, out, headers=headers)
            return
        if request.to.tag is not None:
            self._calls.in_dialog_request(transaction, request, source, now=now, wall=wall, out=out)
            return
        if method == "OPTIONS":
            self._respond(
                transaction,
                request,
                200,
                "OK",
                now,
                wall,
                out,
                headers=(
                    ("Allow", ", ".join(self.config.allowed_methods)),
                    ("Accept", _ACCEPT),
                    ("Supported", ", ".join(sorted(_SUPPORTED_EXTENSIONS))),
                ),
            )
            return
        if method == "INVITE" and not self._calls.accepting:
            self._busy(transaction, request, now, wall, out)
            return
        if method in ("INVITE", "REGISTER"):
            self._authenticate(transaction, request, source, transport, connection, now, wall, out)
            return
        # BYE outside a dialog (no To tag).
        self._respond(transaction, request, 481, "Call/Transaction Does Not Exist", now, wall, out)

    def _consume_routes(self, request: Request) -> None:
        """RFC 3261 §16.4: Route values naming kx-sipd are consumed (softphones
        set up with it as outbound proxy, guide §4.3); a strict router's
        request (Request-URI naming us, the destination in the last Route)
        gets its Request-URI back from that Route."""
        routes = request.headers.get_all("Route")
        kept = [value for value in routes if not self._names_us(value)]
        if kept and self._uri_names_us(request.uri):
            request.uri = parse_name_addr(kept.pop()).uri
        elif len(kept) == len(routes):
            return
        request.headers.remove("Route")
        for value in kept:
            request.headers.add("Route", value)

    def _names_us(self, route: str) -> bool:
        try:
            uri = parse_name_addr(route).uri
        except ParseError:
            return False
        return self._uri_names_us(uri)

    def _uri_names_us(self, text: str) -> bool:
        """A SIP URI without a user part whose host is one of kx-sipd's names."""
        try:
            uri = parse_uri(text)
        except ParseError:
            return False
        if not isinstance(uri, SipUri) or uri.user:
            return False
        host, port = self.config.sip_address
        names = {host.lower(), self.config.realm.lower(), *self.config.local_names}
        return uri.host.lower() in names and uri.port in (None, port)

    def _check_request(
        self, request: Request
    ) -> tuple[int, str, tuple[tuple[str, str], ...]] | None:
        """RFC 3261 §8.2.1–§8.2.3, in order. Returns the rejection, or None."""
        allowed = self.config.allowed_methods
        if request.method not in allowed:
            return 405, "Method Not Allowed", (("Allow", ", ".join(allowed)),)
        if self._uri_kind(request.uri) is AbsoluteUri:
            return 416, "Unsupported URI Scheme", ()
        required = [
            tag
            for value in request.headers.get_all("Require")
            if (tag := value.strip()) and tag.lower() not in _SUPPORTED_EXTENSIONS
        ]
        if required and request.method != "CANCEL":
            return 420, "Bad Extension", (("Unsupported", ", ".join(required)),)
        if request.body and request.method == "INVITE":
            content_type = request.content_type
            if content_type is not None and content_type != _ACCEPT:
                return 415, "Unsupported Media Type", (("Accept", _ACCEPT),)
        if request.method == "INVITE" and request.max_forwards == 0:
            return 483, "Too Many Hops", ()
        if request.method == "REGISTER" and self._uri_kind(request.to.uri) is not SipUri:
            # RFC 3261 §10.2: an address-of-record is a SIP or SIPS URI.
            return 400, "Address-of-record is not a SIP URI", ()
        return None

    def _on_ack(
        self,
        request: Request,
        source: Address,
        transport: Transport,
        connection: int | None,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        existing = self._transactions.match_server(request)
        if existing is not None:
            # ACK for a non-2xx final: the INVITE server transaction absorbs it.
            self._dispatch(
                self._transactions.receive_retransmission(existing, request, now=now),
                now,
                wall,
                out,
            )
            return
        if not self._calls.ack(request, source, now=now, wall=wall, out=out):
            self._counters["dropped_stray_ack"] += 1

    def _on_cancel(
        self,
        request: Request,
        source: Address,
        transport: Transport,
        connection: int | None,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        try:
            transaction = self._transactions.create_server(
                request, source=source, transport=transport, connection=connection, now=now
            )
        except RemoteProtocolError as error:
            self._parse_failed(bytes(request), error, source, transport, connection, out)
            return
        invite = self._transactions.find_invite_for_cancel(request)
        if invite is None:
            # §9.2: no matching transaction → 481.
            self._respond(
                transaction, request, 481, "Call/Transaction Does Not Exist", now, wall, out
            )
            return
        self._respond(
            transaction, request, 200, "OK", now, wall, out, to_tag=context_of(invite).to_tag
        )
        pending_token = next(
            (token for token, p in self._pending.items() if p.transaction is invite), None
        )
        if pending_token is not None:
            # Still authenticating: nothing was started, just end the INVITE.
            pending = self._pending.pop(pending_token)
            pending.request._forget_received()
            self._respond(invite, pending.request, 487, "Request Terminated", now, wall, out)
            return
        self._calls.cancel(invite, now=now, wall=wall, out=out)

    # --------------------------------------------------------- authentication

    def _authenticate(
        self,
        transaction: ServerTransaction,
        request: Request,
        source: Address,
        transport: Transport,
        connection: int | None,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        credentials = self._credentials(request)
        if credentials is None:
            self._counters["auth.challenged"] += 1
            self._challenge(transaction, request, now, wall, out, stale=False)
            return
        if request.method == "INVITE":
            # RFC 3261 §17.2.1: 100 Trying before any slow work (the account
            # look-up, the relay), so the client stops retransmitting (DESIGN §7).
            self._respond(transaction, request, 100, "Trying", now, wall, out)
        if len(self._pending) >= self.config.max_pending_lookups:
            # The store is not keeping up: answer now rather than queue without bound.
            self._counters["overload_rejected"] += 1
            self._busy(transaction, request, now, wall, out)
            return
        context_of(transaction).account = credentials.username
        token = self._new_token()
        self._pending[token] = _PendingAuth(
            transaction=transaction,
            request=request,
            credentials=credentials,
            source=source,
            transport=transport,
            connection=connection,
        )
        self._parked = request
        out.append(LookupAccount(token=token, username=credentials.username))

    def _credentials(self, request: Request) -> DigestCredentials | None:
        """The Digest credentials for our realm, None when there are none.

        A client may carry credentials for several realms (one per proxy on
        its path); only ours matter. Credentials for another realm are still
        returned when they are the only ones, so a misconfigured realm is
        reported as ``403 Bad credentials`` (guide §9) rather than looping on 401.
        """
        found: DigestCredentials | None = None
        for value in request.headers.get_all("Authorization"):
            if not value.lstrip().lower().startswith("digest"):
                continue
            credentials = parse_authorization(value)
            if credentials.realm == self.config.realm:
                return credentials
            found = found or credentials
        return found

    def _authenticated(
        self,
        pending: _PendingAuth,
        account: Account | None,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        request = pending.request
        transaction = pending.transaction
        if context_of(transaction).final:
            # Answered meanwhile (CANCEL, timeout): nothing left to decide.
            return
        outcome = decide(
            pending.credentials,
            account,
            method=request.method,
            realm=self.config.realm,
            nonces=self._nonces,
            single_use=self._used_nonces if request.method == "INVITE" else None,
            source_ip=pending.source[0],
            wall=wall,
        )
        self._counters[f"auth.{outcome.value}"] += 1
        if outcome is not AuthOutcome.ACCEPTED:
            self._auth_failed(pending, outcome, now, wall, out)
            return
        assert account is not None
        if self._second_device(pending, account, now, wall, out):
            return
        if request.method == "REGISTER":
            self._registered(transaction, request, account, now, wall, out)
            return
        self._calls.start(
            transaction,
            request,
            account,
            pending.source,
            pending.transport,
            pending.connection,
            now=now,
            wall=wall,
            out=out,
        )

    def _second_device(
        self, pending: _PendingAuth, account: Account, now: float, wall: float, out: list[Action]
    ) -> bool:
        """Track the devices of ``account``; True when the request was refused
        because another device is using it (``one_device_per_account``)."""
        request = pending.request
        ip = pending.source[0]
        if request.method == "REGISTER" and _unregisters(request):
            self._devices.forget(account.username, ip)
            return False
        others = self._devices.others(account.username, ip, now=now)
        refused = bool(others) and self.config.one_device_per_account
        if not refused:
            self._devices.seen(account.username, ip, now=now)
        if not others:
            return False
        self._counters["refused_second_device" if refused else "accounts_shared"] += 1
        out.append(
            Log(
                level="warning",
                event="account.second_device_refused" if refused else "account.shared",
                fields=(
                    ("account", account.username),
                    ("source", ip),
                    ("method", request.method),
                    ("others", ",".join(others)),
                ),
            )
        )
        if refused:
            self._respond(
                pending.transaction,
                request,
                403,
                "Account in use by another device",
                now,
                wall,
                out,
            )
        return refused

    def _auth_failed(
        self,
        pending: _PendingAuth,
        outcome: AuthOutcome,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        request = pending.request
        transaction = pending.transaction
        if outcome is AuthOutcome.CHALLENGE:
            self._challenge(transaction, request, now, wall, out, stale=False)
        elif outcome is AuthOutcome.STALE:
            self._challenge(transaction, request, now, wall, out, stale=True)
        else:
            reason = {
                AuthOutcome.UNKNOWN_USER: "Unknown user",
                AuthOutcome.BAD_CREDENTIALS: "Bad credentials",
                AuthOutcome.SOURCE_NOT_ALLOWED: "Source not allowed",
            }[outcome]
            wire_reason = reason
            if self.config.uniform_auth_failures and outcome in (
                AuthOutcome.UNKNOWN_USER,
                AuthOutcome.BAD_CREDENTIALS,
            ):
                # Issue 7 §4: one answer for both, so svwar cannot enumerate users.
                wire_reason = "Forbidden"
            banned, delay = self._guard.failure(
                pending.source[0], pending.credentials.username, now=now
            )
            if banned:
                self._counters["bans_imposed"] += 1
                out.append(
                    Log(
                        level="warning",
                        event="guard.banned",
                        fields=(
                            ("source", pending.source[0]),
                            ("seconds", self.config.guard.ban_time),
                            ("account", pending.credentials.username),
                        ),
                    )
                )
            if delay > 0 and len(self._delayed) < self.config.max_delayed_answers:
                self._counters["answers_delayed"] += 1
                self._delay_seq += 1
                heapq.heappush(
                    self._delayed,
                    (now + delay, self._delay_seq, transaction, request, wire_reason),
                )
            else:
                self._respond(transaction, request, 403, wire_reason, now, wall, out)
        out.append(
            Log(
                level="info",
                event="auth.failed",
                fields=(
                    ("call_id", request.call_id),
                    ("method", request.method),
                    ("account", pending.credentials.username),
                    ("source", format_address(pending.source)),
                    ("outcome", outcome.value),
                ),
            )
        )

    def _challenge(
        self,
        transaction: ServerTransaction,
        request: Request,
        now: float,
        wall: float,
        out: list[Action],
        *,
        stale: bool,
    ) -> None:
        nonce = self._nonces.make(wall=wall, salt=self._entropy(8))
        challenge = make_challenge(
            realm=self.config.realm, nonce=nonce, algorithm="MD5", qop="auth", stale=stale
        )
        self._respond(
            transaction,
            request,
            401,
            "Unauthorized",
            now,
            wall,
            out,
            headers=(("WWW-Authenticate", challenge),),
        )

    # ----------------------------------------------------------------- REGISTER

    def _registered(
        self,
        transaction: ServerTransaction,
        request: Request,
        account: Account,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        """200 OK echoing the Contacts with their granted expiry (RFC 3261 §10.3
        step 8), storing nothing (guide §8: no persistent bindings)."""
        header_expires = _int_or_none(request.headers.get("Expires"))
        # The parser judged a REGISTER's Contacts already (and keeps them parsed).
        contacts = request.contacts
        echoed: list[tuple[str, str]] = []
        for contact in contacts:
            if contact == "*":
                if len(contacts) != 1 or header_expires != 0:
                    self._respond(
                        transaction, request, 400, "Invalid wildcard Contact", now, wall, out
                    )
                    return
                continue
            requested = _int_or_none(contact.param("expires"))
            if requested is None:
                requested = header_expires
            if requested is None:
                requested = self.config.register_expires
            if requested <= 0:
                continue  # unREGISTER of this contact: nothing bound, nothing to list
            granted = min(requested, self.config.register_expires)
            echoed.append(("Contact", _with_expires(contact, granted)))
        headers = [*echoed, ("Date", self._date(wall))]
        self._respond(transaction, request, 200, "OK", now, wall, out, headers=tuple(headers))
        out.append(
            Log(
                level="info",
                event="register.ok",
                fields=(
                    ("call_id", request.call_id),
                    ("account", account.username),
                    ("source", format_address(transaction.source)),
                    ("contacts", len(echoed)),
                ),
            )
        )

    # ---------------------------------------------------------------- helpers

    def _date(self, wall: float) -> str:
        """The Date header value for ``wall`` (RFC 3261 §20.17: whole seconds),
        formatted once per second however many answers carry it."""
        second = int(wall)
        if second != self._date_second:
            self._date_second = second
            self._date_text = _format_sip_date(second)
        return self._date_text

    def _uri_kind(self, text: str) -> type[SipUri | TelUri | AbsoluteUri]:
        """The class ``parse_uri(text)`` returns, remembered for URIs seen
        before (clients repeat their Request-URI and address-of-record on
        every request). Raises ``ParseError`` like ``parse_uri``; failures
        are not remembered. At ``_URI_KINDS`` entries the memory starts over."""
        kind = self._uri_kinds.get(text)
        if kind is None:
            kind = type(parse_uri(text))
            if len(self._uri_kinds) >= _URI_KINDS:
                self._uri_kinds.clear()
            self._uri_kinds[text] = kind
        return kind

    def _respond(
        self,
        transaction: ServerTransaction,
        request: Request,
        code: int,
        reason: str,
        now: float,
        wall: float,
        out: list[Action],
        *,
        headers: tuple[tuple[str, str], ...] = (),
        to_tag: str | None = None,
    ) -> None:
        """Answer ``request`` through its server transaction, and log the outcome."""
        items = self._responder.respond(
            transaction, request, code, reason, now=now, headers=headers, to_tag=to_tag
        )
        self._dispatch(items, now, wall, out)

    def _dispatch(
        self, items: Sequence[object], now: float, wall: float, out: list[Action]
    ) -> None:
        """Route what the transaction layer returned: sends out, events to the TU."""
        for item in items:
            if isinstance(item, (Send, Log)):
                out.append(item)
            elif isinstance(item, (ResponseReceived, TransactionTimedOut, TransportFailed)):
                self._calls.transaction_event(item, now=now, wall=wall, out=out)


def _with_expires(contact: NameAddr, granted: int) -> str:
    """The Contact as received, its expires parameter set to what we grant."""
    updated = contact.with_params(("expires", str(granted)))
    # Always in name-addr form: in addr-spec form a URI with parameters would
    # be ambiguous (RFC 3261 §20.10).
    return str(NameAddr(updated.display_name, updated.uri, updated.params, True))


def _unregisters(request: Request) -> bool:
    """A REGISTER that removes its bindings (Expires: 0, or every contact expires=0)."""
    try:
        contacts = request.contacts
    except ParseError:
        return False
    if not contacts:
        return False
    header = _int_or_none(request.headers.get("Expires"))
    for contact in contacts:
        if contact == "*":
            return header == 0
        expires = _int_or_none(contact.param("expires"))
        if (expires if expires is not None else header) != 0:
            return False
    return True


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        return None
    # RFC 3261 §20.19: anything above 2**32-1 is treated as that (and then capped).
    return min(int(value), 2**32 - 1)


_WEEKDAYS = ("Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed")
"""Day names from 1970-01-01, a Thursday."""
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _format_sip_date(second: int) -> str:
    """``second`` (seconds since 1970-01-01 UTC) as a SIP-date, RFC 3261 §20.17
    (the rfc1123-date of RFC 2616 §3.3.1: ``Thu, 26 Nov 2026 19:06:58 GMT``).

    Calendar arithmetic on whole days (the proleptic Gregorian civil-from-days
    conversion), so the core needs neither ``time`` nor ``email.utils``, which
    would load ``socket`` and ``random`` into it."""
    days, rest = divmod(second, 86400)
    hour, rest = divmod(rest, 3600)
    minute, sec = divmod(rest, 60)
    # Count from 0000-03-01 so that the leap day ends each 4/100/400-year cycle.
    shifted = days + 719468
    era, day_of_era = divmod(shifted, 146097)
    year_of_era = (
        day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_index = (5 * day_of_year + 2) // 153  # 0 = March
    day = day_of_year - (153 * month_index + 2) // 5 + 1
    month = month_index + 3 if month_index < 10 else month_index - 9
    year = era * 400 + year_of_era + (month <= 2)
    return (
        f"{_WEEKDAYS[days % 7]}, {day:02d} {_MONTHS[month - 1]} {year:04d} "
        f"{hour:02d}:{minute:02d}:{sec:02d} GMT"
    )
