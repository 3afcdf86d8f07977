"""The B2BUA: one call is an A-leg (the client's dialog, where kx-sipd is the
UAS) and a B-leg (kx-sipd's dialog toward the carrier, where it is the UAC).

Theory of operation. An INVITE that passed authentication reaches
``CallManager.start``, which makes the call checks in the order of issue 4
(destination allow-list, limits, the SDP offer's codecs), writes the call
record that marks the call in progress, and asks the relay for ports. With
the ports, the B-leg INVITE goes to the carrier of the account's route with
the offer filtered to G.711 and pointing at the relay. Responses from the
carrier are relayed to the client with their SDP rewritten to the relay's
client-facing side. Each leg gets its own ACK for a 2xx (RFC 3261 §13.2.2.4),
and the 2xx toward the client is retransmitted by this layer until the
client's ACK arrives (§13.3.1.4, RFC 6026). CANCEL, BYE either way,
re-INVITE either way, timeouts and relay events end or change the call; every
end writes the final call record *before* the message that acknowledges it
(the 200 to a BYE), so a crash cannot lose a finished call.

NAT (DESIGN §2 layer 6): requests toward the client go to the address its
INVITE came from (and over its TCP connection), never to a private Contact.

What this module refuses to know: sockets, the store, the relay's protocol.
It speaks only in actions.
"""

from __future__ import annotations

import enum
import heapq
from collections import Counter, deque
from collections.abc import Callable, Sequence

import attrs

from ._actions import Action, AllocateMedia, CallRecord, Log, ReleaseMedia, Send, UpdateMedia
from ._config import EngineConfig
from ._dialog import (
    ALLOW_IN_DIALOG,
    Leg,
    contact_uri,
    contact_value,
    dialed_digits,
    make_cancel,
    make_request,
    synthetic_response,
    user_of,
    without_tag,
)
from ._errors import ParseError
from ._events import ResponseReceived, TransactionTimedOut, TransportFailed
from ._message import Request, Response
from ._model import (
    Account,
    Address,
    CallRecordData,
    LadderEntry,
    MediaAllocation,
    Transport,
)
from ._sdp import (
    NoAcceptableCodec,
    SessionDescription,
    codec_name,
    filter_offer,
    make_answer,
    media_address,
    parse_sdp,
    rewrite_media,
    telephone_event,
    without_endpoint_features,
)
from ._seams import Entropy
from ._transaction import ClientTransaction, ServerTransaction, TransactionLayer
from ._tu import Responder, context_of
from ._uri import format_host
from ._wire import format_address

__all__ = ["Call", "CallManager", "CallState"]

_SDP = "application/sdp"
_TRANSPORT_NAMES = {transport: transport.value for transport in Transport}
_ALLOW = ALLOW_IN_DIALOG

# Carrier answers that must not reach the client as they are (issue 4 §3:
# "4xx/5xx/6xx passed through with sensible reason"). A redirect would send
# the client around kx-sipd (and its billing); a carrier challenge means the
# trunk is misconfigured, which is no fault of the client.
_MAPPED: dict[int, tuple[int, str]] = {
    401: (503, "Carrier rejected the call"),
    407: (503, "Carrier rejected the call"),
}


class CallState(enum.Enum):
    MEDIA = "allocating media"
    CALLING = "calling"
    EARLY = "early"
    ANSWERING = "answering"  # 2xx sent to the client, its ACK not yet seen
    CONFIRMED = "confirmed"
    ENDED = "ended"


_Passed = tuple[float, str, str, Address, Transport, bytes]
"""One message of a call's ladder: (wall, direction, leg, peer, transport, data)."""


@attrs.define(slots=True, eq=False)
class _Retransmit:
    """A 2xx we retransmit until the ACK with ``cseq`` arrives (§13.3.1.4)."""

    leg: Leg
    data: bytes
    cseq: int
    interval: float
    deadline: float
    give_up: float


@attrs.define(slots=True, eq=False)
class _Reinvite:
    """A re-INVITE relayed from leg ``origin`` to the other leg."""

    origin: Leg
    transaction: ServerTransaction
    request: Request
    offer: SessionDescription  # the re-offer as the origin sent it
    client: ClientTransaction | None = None


@attrs.define(slots=True, eq=False)
class _Role:
    """Owner of a client transaction: which call, and what the request was for."""

    call: Call
    kind: str  # "invite", "cancel", "bye", "reinvite"


@attrs.define(slots=True, eq=False)
class Call:
    ref: str
    account: Account
    state: CallState
    a: Leg
    a_invite: ServerTransaction
    a_request: Request
    original_offer: SessionDescription  # as the client sent it
    offer: SessionDescription  # filtered to what kx-sipd carries
    record: CallRecordData  # as written at the start (_finish writes the final one)
    echo: bool = False
    b: Leg | None = None
    b_invite: ClientTransaction | None = None
    b_ack: bytes | None = None
    media: MediaAllocation | None = None
    media_token: int | None = None
    cancelled: bool = False
    cancel_sent: bool = False
    provisional_seen: bool = False
    retransmits: list[_Retransmit] = attrs.field(factory=list)
    reinvite: _Reinvite | None = None
    hangup_deadline: float = 0.0
    ring_deadline: float | None = None
    # What the final record adds to the start's (one evolve in _finish).
    sent_digits: str | None = None
    answer_wall: float | None = None
    answer_status: int | None = None
    codec: str | None = None
    # The ladder's messages as they passed, made LadderEntry objects only
    # when the final record is written (_ladder_entries).
    ladder: list[_Passed] = attrs.field(factory=list)


class CallManager:
    """Every call of one engine, and the timers that belong to calls."""

    def __init__(
        self,
        *,
        config: EngineConfig,
        entropy: Entropy,
        transactions: TransactionLayer,
        counters: Counter[str],
        new_token: Callable[[], int],
        responder: Responder,
    ) -> None:
        self._config = config
        self._entropy = entropy
        self._transactions = transactions
        self._counters = counters
        self._new_token = new_token
        self._responder = responder
        self.accepting = True
        self._calls: dict[str, Call] = {}
        self._by_dialog: dict[tuple[str, str], tuple[Call, str]] = {}
        self._by_media_token: dict[int, Call] = {}
        self._per_account: Counter[str] = Counter()
        self._recent_starts: dict[str, deque[float]] = {}
        # (deadline, seq, call_ref): refs, not calls, so an ended call is freed
        # at once although its entries wait in the heap for their deadline.
        self._timers: list[tuple[float, int, str]] = []
        self._timer_seq = 0

    @property
    def active(self) -> int:
        return len(self._calls)

    # ------------------------------------------------------------- new calls

    def start(
        self,
        transaction: ServerTransaction,
        request: Request,
        account: Account,
        source: Address,
        transport: Transport,
        connection: int | None,
        *,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        """An INVITE passed authentication: check it and start the call."""
        dialed = dialed_digits(request)
        route = account.route
        echo = dialed == self._config.echo_number or (route is not None and route.host == "echo")
        record = CallRecordData(
            call_ref=self._entropy(12).hex(),
            account=account.username,
            a_call_id=request.call_id,
            b_call_id=None,
            source=format_address(source),
            transport=transport.value,
            user_agent=request.headers.get("User-Agent") or "",
            dialed=dialed or "",
            sent_digits=None,
            route="echo" if echo else (route.name if route else None),
            start_wall=wall,
        )
        rejection = self._check(account, dialed, echo, now)
        offer: SessionDescription | None = None
        original: SessionDescription | None = None
        if rejection is None:
            try:
                original, offer = self._client_offer(request)
            except NoAcceptableCodec as error:
                rejection = (error.status_code or 488, error.reason, error.headers)
            except ParseError as error:
                rejection = (400, error.reason, ())
        if rejection is not None or offer is None or original is None:
            code, reason, headers = rejection or (488, "Not Acceptable Here", ())
            self._counters[f"calls.rejected.{code}"] += 1
            # Support needs the ladder of exactly these calls (guide §10).
            ladder = [_entry("in", "A", source, transport, request.as_received(), wall)]
            for item in self._responder.respond(
                transaction, request, code, reason, now=now, headers=headers
            ):
                if isinstance(item, Send):
                    ladder.append(_entry("out", "A", item.destination, transport, item.data, wall))
                if isinstance(item, (Send, Log)):
                    out.append(item)
            final = attrs.evolve(
                record,
                end_wall=wall,
                final_status=code,
                ended_by="rejected",
                reason=reason,
                ladder=tuple(ladder),
            )
            out.append(CallRecord(record=final))
            return
        context = context_of(transaction)
        a_leg = Leg(
            name="A",
            call_id=request.call_id,
            local_tag=context.to_tag or self._entropy(6).hex(),
            local_header=without_tag(request.headers.get("To") or ""),
            remote_header=request.headers.get("From") or "",
            remote_target=contact_uri(request) or request.from_.uri,
            destination=source,
            transport=transport,
            connection=connection,
            route_set=tuple(request.headers.get_all("Record-Route")),
            remote_tag=request.from_.tag,
        )
        context.to_tag = a_leg.local_tag
        call = Call(
            ref=record.call_ref,
            account=account,
            state=CallState.MEDIA,
            a=a_leg,
            a_invite=transaction,
            a_request=request,
            original_offer=original,
            offer=offer,
            record=record,
            echo=echo,
            hangup_deadline=now + self._config.max_call_duration,
        )
        context.call = call
        self._calls[call.ref] = call
        self._by_dialog[(a_leg.call_id, a_leg.local_tag)] = (call, "A")
        self._per_account[account.username] += 1
        if account.max_cps is not None:
            # Kept only where a calls-per-second limit needs them (trimmed by _check).
            self._recent_starts.setdefault(account.username, deque()).append(now)
        self._counters["calls.started"] += 1
        self._ladder(call, "in", "A", source, transport, request.as_received(), wall)
        self._arm(call, call.hangup_deadline)
        out.append(CallRecord(record=record))
        call.media_token = self._new_token()
        self._by_media_token[call.media_token] = call
        out.append(
            AllocateMedia(
                token=call.media_token,
                call_ref=call.ref,
                a_peer=media_address(offer),
                echo=echo,
            )
        )

    def _check(
        self, account: Account, dialed: str | None, echo: bool, now: float
    ) -> tuple[int, str, tuple[tuple[str, str], ...]] | None:
        """Issue 4 §1, after authentication, in order."""
        retry = (("Retry-After", str(self._config.retry_after)),)
        if not self.accepting or len(self._calls) >= self._config.max_calls:
            return 503, "Service Unavailable", retry
        if not echo:
            if not dialed:
                return 484, "Address Incomplete", ()
            if account.allowed_prefixes and not any(
                dialed.startswith(prefix) for prefix in account.allowed_prefixes
            ):
                return 403, "Destination not allowed", ()
            if account.route is None:
                return 403, "No route for account", ()
        if (
            account.max_calls is not None
            and self._per_account[account.username] >= account.max_calls
        ):
            return 403, "Call limit reached", ()
        if account.max_cps is not None:
            starts = self._recent_starts.setdefault(account.username, deque())
            while starts and starts[0] <= now - 1.0:
                starts.popleft()
            if len(starts) >= account.max_cps:
                return 403, "Call limit reached", ()
        return None

    def _client_offer(self, request: Request) -> tuple[SessionDescription, SessionDescription]:
        """The client's offer as sent and as filtered (488 when no G.711)."""
        if not request.body:
            # A delayed offer would need the answer carried in the ACK; no
            # client of the guide sends one, so refuse it clearly.
            raise NoAcceptableCodec(304, "SDP offer required")
        original = parse_sdp(request.body)
        return original, filter_offer(original)

    # ---------------------------------------------------------------- media

    def media_allocated(
        self, token: int, allocation: MediaAllocation, *, now: float, wall: float, out: list[Action]
    ) -> None:
        call = self._by_media_token.pop(token, None)
        if call is None:
            # The call ended while the relay was working: give the ports back.
            out.append(ReleaseMedia(call_ref=allocation.call_ref))
            return
        call.media = allocation
        if call.state is CallState.ENDED or call.cancelled:
            out.append(ReleaseMedia(call_ref=call.ref))
            return
        if call.echo:
            self._answer_echo(call, allocation, now, wall, out)
            return
        self._send_b_invite(call, allocation, now, wall, out)

    def media_failed(
        self, token: int, reason: str, *, now: float, wall: float, out: list[Action]
    ) -> None:
        call = self._by_media_token.pop(token, None)
        if call is None or call.state is CallState.ENDED:
            return
        self._counters["calls.media_failed"] += 1
        out.append(
            Log(
                level="warning",
                event="relay.allocate_failed",
                fields=(("call_ref", call.ref), ("reason", reason)),
            )
        )
        self._fail_a(
            call,
            503,
            "Media relay unavailable",
            now,
            wall,
            out,
            ended_by="error",
            headers=(("Retry-After", str(self._config.retry_after)),),
        )

    def media_ended(
        self, call_ref: str, reason: str, *, now: float, wall: float, out: list[Action]
    ) -> None:
        call = self._calls.get(call_ref)
        if call is None:
            return
        ended_by = "media-timeout" if reason == "media-timeout" else "error"
        self._hang_up(call, ended_by, reason.replace("-", " "), now, wall, out)

    def _answer_echo(
        self, call: Call, allocation: MediaAllocation, now: float, wall: float, out: list[Action]
    ) -> None:
        # The echo answers with what it was offered (only G.711 remains), from
        # the relay's port that sends every packet back.
        answer = rewrite_media(
            without_endpoint_features(make_answer(call.original_offer, call.offer)),
            address=allocation.a_address,
            port=allocation.a_port,
            origin_user="kx-sipd",
        )
        self._answer_a(call, 200, "OK", bytes(answer), now, wall, out, codec=codec_name(answer))

    # --------------------------------------------------------------- B-leg

    def _send_b_invite(
        self, call: Call, allocation: MediaAllocation, now: float, wall: float, out: list[Action]
    ) -> None:
        route = call.account.route
        assert route is not None
        digits = route.digits_for(call.record.dialed)
        host = self._config.sip_address[0]
        b_call_id = self._entropy(16).hex()
        caller = call.account.caller_id or user_of(call.a_request.from_.uri) or "anonymous"
        target = f"sip:{digits}@{format_host(route.host)}:{route.port}"
        if route.transport is Transport.TCP:
            target += ";transport=tcp"
        b_leg = Leg(
            name="B",
            call_id=b_call_id,
            local_tag=self._entropy(6).hex(),
            local_header=f"<sip:{caller}@{format_host(host)}>",
            remote_header=f"<sip:{digits}@{format_host(route.host)}>",
            remote_target=target,
            destination=(route.host, route.port),
            transport=route.transport,
            connection=None,
        )
        call.b = b_leg
        self._by_dialog[(b_leg.call_id, b_leg.local_tag)] = (call, "B")
        offer = rewrite_media(call.offer, address=allocation.b_address, port=allocation.b_port)
        body = bytes(offer)
        b_leg.last_sdp = body
        max_forwards = call.a_request.max_forwards
        request = self._request(
            b_leg,
            "INVITE",
            extra=(("Max-Forwards", str(69 if max_forwards is None else max_forwards - 1)),),
            body=body,
        )
        call.sent_digits = digits
        call.state = CallState.CALLING
        transaction, items = self._transactions.create_client(
            request,
            destination=b_leg.destination,
            transport=b_leg.transport,
            now=now,
            owner=_Role(call, "invite"),
        )
        call.b_invite = transaction
        self._dispatch(items, call, now, wall, out)

    def _request(
        self,
        leg: Leg,
        method: str,
        *,
        extra: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
        cseq: int | None = None,
    ) -> Request:
        return make_request(
            leg,
            method,
            sip_address=self._config.sip_address,
            branch=f"z9hG4bK{self._entropy(10).hex()}",
            user_agent=self._config.server_name,
            extra=extra,
            body=body,
            cseq=cseq,
        )

    def _b_response(
        self, call: Call, role: str, response: Response, now: float, wall: float, out: list[Action]
    ) -> None:
        b_leg = call.b
        assert b_leg is not None
        self._ladder(
            call, "in", "B", b_leg.destination, b_leg.transport, response.as_received(), wall
        )
        if role == "invite":
            self._b_invite_response(call, b_leg, response, now, wall, out)
        elif role == "reinvite":
            self._reinvite_response(call, response, now, wall, out)
        # Responses to our BYE and CANCEL need nothing more.

    def _b_invite_response(
        self,
        call: Call,
        b_leg: Leg,
        response: Response,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        code = response.status_code
        if code < 200:
            if code == 100:
                return
            call.provisional_seen = True
            if call.cancelled:
                self._send_cancel(call, now, wall, out)
                return
            if call.state not in (CallState.CALLING, CallState.EARLY):
                return
            if call.state is CallState.CALLING:
                call.ring_deadline = now + self._config.ring_timeout
                self._arm(call, call.ring_deadline)
            call.state = CallState.EARLY
            try:
                body = self._sdp_toward_a(call, _parse_or_none(response.body))
            except NoAcceptableCodec:
                body = b""  # early media we cannot carry: ring without it
            self._provisional_a(call, code, response.reason, body, now, wall, out)
            return
        if 200 <= code < 300:
            b_leg.remote_tag = response.to.tag
            b_leg.remote_header = response.headers.get("To") or b_leg.remote_header
            b_leg.remote_target = contact_uri(response) or b_leg.remote_target
            b_leg.route_set = tuple(reversed(response.headers.get_all("Record-Route")))
            self._ack_b(call, response, now, wall, out)
            if call.state is CallState.ENDED or call.cancelled:
                # The CANCEL raced the 200 (DESIGN §7): end the B-leg properly.
                self._bye(call, b_leg, now, wall, out)
                return
            if call.state in (CallState.ANSWERING, CallState.CONFIRMED):
                return  # a 2xx retransmission: the ACK above was all it needed
            # The carrier's answer, parsed once: for the client, the relay, the record.
            carrier_answer = _parse_or_none(response.body)
            try:
                body = self._sdp_toward_a(call, carrier_answer)
            except NoAcceptableCodec as error:
                # The carrier answered without G.711: nothing can carry the
                # call's audio. End the B-leg, tell the client why.
                self._bye(call, b_leg, now, wall, out)
                self._fail_a(
                    call,
                    488,
                    error.reason,
                    now,
                    wall,
                    out,
                    ended_by="error",
                    headers=error.headers,
                    carrier_status=code,
                )
                return
            if call.media is not None and response.body:
                out.append(
                    UpdateMedia(
                        call_ref=call.ref,
                        b_peer=media_address(carrier_answer) if carrier_answer else None,
                        a_events=telephone_event(call.original_offer),
                        b_events=telephone_event(carrier_answer) if carrier_answer else None,
                    )
                )
            codec = codec_name(carrier_answer) if carrier_answer is not None else None
            self._answer_a(call, code, response.reason, body, now, wall, out, codec=codec)
            return
        # A final failure from the carrier.
        if call.cancelled or call.state is CallState.ENDED:
            return
        mapped_code, mapped_reason = _MAPPED.get(code, (code, response.reason or "Call failed"))
        if 300 <= code < 400:
            mapped_code, mapped_reason = 480, "Temporarily Unavailable"
        headers: tuple[tuple[str, str], ...] = ()
        retry_after = response.headers.get("Retry-After")
        if retry_after is not None and code in (486, 503, 600, 603):
            headers = (("Retry-After", retry_after),)
        self._fail_a(
            call,
            mapped_code,
            mapped_reason,
            now,
            wall,
            out,
            ended_by="carrier",
            headers=headers,
            carrier_status=code,
        )

    def _ack_b(
        self, call: Call, response: Response, now: float, wall: float, out: list[Action]
    ) -> None:
        """The ACK for the carrier's 2xx: its own transaction (§13.2.2.4), re-sent
        for every 2xx retransmission."""
        b_leg = call.b
        assert b_leg is not None and call.b_invite is not None
        if call.b_ack is None:
            cseq = call.b_invite.request.cseq.number
            ack = self._request(b_leg, "ACK", cseq=cseq)
            call.b_ack = bytes(ack)
            self._ladder(call, "out", "B", b_leg.destination, b_leg.transport, call.b_ack, wall)
        out.append(
            Send(
                data=call.b_ack,
                destination=b_leg.destination,
                transport=b_leg.transport,
                connection=b_leg.connection,
            )
        )

    def stray_response(
        self, response: Response, source: Address, *, now: float, wall: float, out: list[Action]
    ) -> bool:
        """A response no client transaction matched (RFC 6026: a late 2xx
        retransmission from the carrier): re-send the ACK."""
        if not 200 <= response.status_code < 300:
            return False
        try:
            key = (response.call_id, response.from_.tag or "")
        except ParseError:
            return False
        found = self._by_dialog.get(key)
        if found is None:
            return False
        call, leg_name = found
        if leg_name != "B" or call.b_ack is None or call.b is None:
            return False
        if response.cseq.method != "INVITE":
            return False
        out.append(
            Send(
                data=call.b_ack,
                destination=call.b.destination,
                transport=call.b.transport,
                connection=call.b.connection,
            )
        )
        return True

    def _sdp_toward_a(self, call: Call, answer: SessionDescription | None) -> bytes:
        """The carrier's answer (parsed, None when absent or unreadable) as the
        client must see it: one m= line per offered stream (RFC 3264 §6),
        pointing at the relay's client side. Raises NoAcceptableCodec when it
        carries no G.711."""
        if answer is None or call.media is None:
            return b""
        for_client = make_answer(call.original_offer, answer)
        return bytes(
            rewrite_media(for_client, address=call.media.a_address, port=call.media.a_port)
        )

    # --------------------------------------------------------------- A-leg

    def _provisional_a(
        self,
        call: Call,
        code: int,
        reason: str,
        body: bytes,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        headers = self._contact_headers(call.a)
        if body:
            headers = (*headers, ("Content-Type", _SDP))
        self._dispatch(
            self._responder.respond(
                call.a_invite, call.a_request, code, reason, now=now, headers=headers, body=body
            ),
            call,
            now,
            wall,
            out,
        )

    def _answer_a(
        self,
        call: Call,
        code: int,
        reason: str,
        body: bytes,
        now: float,
        wall: float,
        out: list[Action],
        *,
        codec: str | None,
    ) -> None:
        headers = (*self._contact_headers(call.a), ("Allow", _ALLOW))
        if body:
            headers = (*headers, ("Content-Type", _SDP))
            call.a.last_sdp = body
        items = self._responder.respond(
            call.a_invite, call.a_request, code, reason, now=now, headers=headers, body=body
        )
        self._dispatch(items, call, now, wall, out)
        data = next((item.data for item in items if isinstance(item, Send)), None)
        call.state = CallState.ANSWERING
        call.codec, call.answer_wall, call.answer_status = codec, wall, code
        self._counters["calls.answered"] += 1
        # The moment the call counts as answered (metrics read it; the record says
        # so only when the call ends).
        out.append(
            Log(
                level="info",
                event="call.answered",
                fields=(
                    ("call_ref", call.ref),
                    ("call_id", call.a.call_id),
                    ("account", call.account.username),
                    ("status", code),
                    ("codec", codec),
                ),
            )
        )
        if data is not None:
            self._retransmit(call, call.a, data, call.a_request.cseq.number, now)

    def _contact_headers(self, leg: Leg) -> tuple[tuple[str, str], ...]:
        return (("Contact", contact_value(self._config.sip_address, leg.transport)),)

    def _fail_a(
        self,
        call: Call,
        code: int,
        reason: str,
        now: float,
        wall: float,
        out: list[Action],
        *,
        ended_by: str,
        headers: tuple[tuple[str, str], ...] = (),
        carrier_status: int | None = None,
    ) -> None:
        """End a call that was never answered, with ``code`` to the client."""
        if not context_of(call.a_invite).final:
            self._dispatch(
                self._responder.respond(
                    call.a_invite, call.a_request, code, reason, now=now, headers=headers
                ),
                call,
                now,
                wall,
                out,
            )
        self._finish(call, ended_by, reason, carrier_status or code, now, wall, out)

    # ------------------------------------------------------ in-dialog requests

    def in_dialog_request(
        self,
        transaction: ServerTransaction,
        request: Request,
        source: Address,
        *,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        """A request with a To tag: BYE, re-INVITE, OPTIONS inside a call's dialog."""
        found = self._by_dialog.get((request.call_id, request.to.tag or ""))
        if found is None:
            self._dispatch(
                self._responder.respond(
                    transaction, request, 481, "Call/Transaction Does Not Exist", now=now
                ),
                None,
                now,
                wall,
                out,
            )
            return
        call, leg_name = found
        leg = call.a if leg_name == "A" else call.b
        assert leg is not None
        context = context_of(transaction)
        context.call = call
        context.account = call.account.username
        self._ladder(
            call, "in", leg_name, source, transaction.transport, request.as_received(), wall
        )
        if leg_name == "A":
            # NAT: the client's requests latch where we send ours (DESIGN §2).
            leg.destination = source
        method = request.method
        if method == "BYE":
            ended_by = "client" if leg_name == "A" else "carrier"
            self._finish(
                call,
                ended_by,
                f"{ended_by} hung up",
                call.answer_status or 200,
                now,
                wall,
                out,
                skip=leg,
                answer=lambda after: self._respond_in_call(
                    call, transaction, request, 200, "OK", now, wall, after
                ),
            )
            return
        if method == "INVITE":
            self._reinvite(call, leg, transaction, request, now, wall, out)
            return
        self._respond_in_call(call, transaction, request, 200, "OK", now, wall, out)

    def _respond_in_call(
        self,
        call: Call,
        transaction: ServerTransaction,
        request: Request,
        code: int,
        reason: str,
        now: float,
        wall: float,
        out: list[Action],
        *,
        headers: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
    ) -> Sequence[object]:
        items = self._responder.respond(
            transaction, request, code, reason, now=now, headers=headers, body=body
        )
        self._dispatch(items, call, now, wall, out)
        return items

    def _reinvite(
        self,
        call: Call,
        leg: Leg,
        transaction: ServerTransaction,
        request: Request,
        now: float,
        wall: float,
        out: list[Action],
    ) -> None:
        """A re-INVITE (hold, unhold, refresh) from either side (issue 4 §3)."""
        other = call.b if leg is call.a else call.a
        if call.state is not CallState.CONFIRMED or call.reinvite is not None or other is None:
            # §14.2: one offer/answer at a time.
            self._respond_in_call(
                call, transaction, request, 491, "Request Pending", now, wall, out
            )
            return
        if not request.body:
            # An offerless re-INVITE (a session refresh): answer it here with the
            # SDP this leg already has; media does not change.
            headers = (*self._contact_headers(leg), ("Content-Type", _SDP))
            items = self._respond_in_call(
                call,
                transaction,
                request,
                200,
                "OK",
                now,
                wall,
                out,
                headers=headers,
                body=leg.last_sdp,
            )
            data = next((i.data for i in items if isinstance(i, Send)), None)
            if data is not None:
                self._retransmit(call, leg, data, request.cseq.number, now)
            return
        try:
            original = parse_sdp(request.body)
            offer = filter_offer(original)
        except NoAcceptableCodec as error:
            self._respond_in_call(
                call, transaction, request, 488, error.reason, now, wall, out, headers=error.headers
            )
            return
        except ParseError as error:
            self._respond_in_call(call, transaction, request, 400, error.reason, now, wall, out)
            return
        media = call.media
        assert media is not None
        if other is call.b:
            address, port = media.b_address, media.b_port
        else:
            address, port = media.a_address, media.a_port
        body = bytes(rewrite_media(offer, address=address, port=port))
        other.last_sdp = body
        pending = _Reinvite(origin=leg, transaction=transaction, request=request, offer=original)
        call.reinvite = pending
        relayed = self._request(other, "INVITE", body=body)
        client, items = self._transactions.create_client(
            relayed,
            destination=other.destination,
            transport=other.transport,
            connection=other.connection,
            now=now,
            owner=_Role(call, "reinvite"),
        )
        pending.client = client
        self._dispatch(items, call, now, wall, out)

    def _reinvite_response(
        self, call: Call, response: Response, now: float, wall: float, out: list[Action]
    ) -> None:
        pending = call.reinvite
        if pending is None or pending.client is None:
            return
        code = response.status_code
        if code < 200:
            return
        target = call.b if pending.origin is call.a else call.a
        assert target is not None
        if 200 <= code < 300:
            ack = self._request(target, "ACK", cseq=pending.client.request.cseq.number)
            ack_bytes = bytes(ack)
            out.append(
                Send(
                    data=ack_bytes,
                    destination=target.destination,
                    transport=target.transport,
                    connection=target.connection,
                )
            )
            self._ladder(
                call, "out", target.name, target.destination, target.transport, ack_bytes, wall
            )
        call.reinvite = None
        body = b""
        if 200 <= code < 300 and response.body and call.media is not None:
            try:
                # One m= line per stream of the re-offer (RFC 3264 §8, §6).
                answer: SessionDescription | None = make_answer(
                    pending.offer, parse_sdp(response.body)
                )
            except (ParseError, NoAcceptableCodec):
                answer = None
            if answer is not None:
                if pending.origin is call.a:
                    address, port = call.media.a_address, call.media.a_port
                else:
                    address, port = call.media.b_address, call.media.b_port
                body = bytes(rewrite_media(answer, address=address, port=port))
                pending.origin.last_sdp = body
        headers = self._contact_headers(pending.origin)
        if body:
            headers = (*headers, ("Content-Type", _SDP))
        items = self._respond_in_call(
            call,
            pending.transaction,
            pending.request,
            code,
            response.reason,
            now,
            wall,
            out,
            headers=headers,
            body=body,
        )
        if 200 <= code < 300:
            data = next((i.data for i in items if isinstance(i, Send)), None)
            if data is not None:
                self._retransmit(call, pending.origin, data, pending.request.cseq.number, now)
        elif code in (408, 481):
            # §14.1: a re-INVITE answered 408/481 ends the dialog.
            self._hang_up(call, "error", f"re-INVITE failed with {code}", now, wall, out)

    # -------------------------------------------------------------- ACK, CANCEL

    def ack(
        self, request: Request, source: Address, *, now: float, wall: float, out: list[Action]
    ) -> bool:
        """An ACK no server transaction absorbed: the ACK for one of our 2xx."""
        try:
            found = self._by_dialog.get((request.call_id, request.to.tag or ""))
        except ParseError:
            return False
        if found is None:
            return False
        call, leg_name = found
        leg = call.a if leg_name == "A" else call.b
        cseq = request.cseq.number
        before = len(call.retransmits)
        call.retransmits = [r for r in call.retransmits if not (r.leg is leg and r.cseq == cseq)]
        if len(call.retransmits) != before:
            self._ladder(
                call, "in", leg_name, source, call.a.transport, request.as_received(), wall
            )
        if leg_name == "A" and call.state is CallState.ANSWERING:
            call.state = CallState.CONFIRMED
        return True

    def cancel(
        self, invite: ServerTransaction, *, now: float, wall: float, out: list[Action]
    ) -> None:
        """The client cancelled its INVITE (§9.2): 487 now, CANCEL the B-leg."""
        call = context_of(invite).call
        if not isinstance(call, Call) or call.state is CallState.ENDED:
            return
        if context_of(invite).final:
            return  # too late: the call was answered; the client will BYE
        self._fail_a(call, 487, "Request Terminated", now, wall, out, ended_by="cancel")

    def _send_cancel(self, call: Call, now: float, wall: float, out: list[Action]) -> None:
        if call.cancel_sent or call.b_invite is None or call.b is None:
            return
        call.cancel_sent = True
        cancel = make_cancel(call.b_invite.request, user_agent=self._config.server_name)
        _, items = self._transactions.create_client(
            cancel,
            destination=call.b.destination,
            transport=call.b.transport,
            connection=call.b.connection,
            now=now,
            owner=_Role(call, "cancel"),
        )
        self._dispatch(items, call, now, wall, out)

    # ------------------------------------------------------------ ending calls

    def _hang_up(
        self, call: Call, ended_by: str, reason: str, now: float, wall: float, out: list[Action]
    ) -> None:
        """End an established or early call from kx-sipd's side, on both legs."""
        if call.state is CallState.ENDED:
            return
        if not context_of(call.a_invite).final:
            self._fail_a(
                call,
                503 if ended_by == "shutdown" else 408,
                "Service Unavailable" if ended_by == "shutdown" else "Request Timeout",
                now,
                wall,
                out,
                ended_by=ended_by,
            )
            return
        self._finish(call, ended_by, reason, call.answer_status or 200, now, wall, out)

    def _finish(
        self,
        call: Call,
        ended_by: str,
        reason: str,
        final_status: int,
        now: float,
        wall: float,
        out: list[Action],
        *,
        skip: Leg | None = None,
        answer: Callable[[list[Action]], object] | None = None,
    ) -> None:
        """Write the final record, hang up the legs still up, free everything.

        The record comes before the messages in ``out`` (only the relay's release
        is ahead of it): the driver makes it durable before it performs what follows (the BYE or CANCEL to the other side, and
        ``answer``'s actions: the 200 to a BYE), so no finished call is lost.
        Those messages are made first, so that the record's ladder has them.
        """
        if call.state is CallState.ENDED:
            return
        if not context_of(call.a_invite).final:
            # An early dialog ended (BYE in an early dialog, shutdown): the
            # INVITE still needs its final answer.
            self._dispatch(
                self._responder.respond(
                    call.a_invite, call.a_request, 487, "Request Terminated", now=now
                ),
                call,
                now,
                wall,
                out,
            )
        answered = call.answer_wall is not None
        after: list[Action] = []
        if answered:
            for leg in (call.a, call.b):
                if leg is not None and leg is not skip and leg.remote_tag is not None:
                    self._bye(call, leg, now, wall, after)
        elif call.b_invite is not None and (call.b_invite.last_status or 0) < 200:
            # §9.1: a CANCEL only for an INVITE with no final answer yet, and
            # only after a provisional one; without one it goes out with the
            # first, or a 2xx gets ACK and BYE, or Timer B ends it.
            call.cancelled = True
            if call.provisional_seen:
                self._send_cancel(call, now, wall, after)
        if answer is not None:
            answer(after)
        # The final record goes to the driver and is not kept: an ended call lingers
        # (its transactions absorb retransmissions for up to 64*T1), and with its
        # ladder it would keep ~25 objects more each for the collector to walk.
        record = attrs.evolve(
            call.record,
            b_call_id=call.b.call_id if call.b is not None else None,
            sent_digits=call.sent_digits,
            answer_wall=call.answer_wall,
            codec=call.codec,
            end_wall=wall,
            final_status=call.answer_status if answered else final_status,
            ended_by=ended_by,
            reason=reason,
            ladder=_ladder_entries(call.ladder),
        )
        if call.media is not None or call.media_token is not None:
            # Ahead of the record: freeing the relay's ports need not wait until the
            # record is durable (the relay's figures are written after it all the same).
            out.append(ReleaseMedia(call_ref=call.ref))
        out.append(CallRecord(record=record))
        out.extend(after)
        call.state = CallState.ENDED
        call.retransmits.clear()
        call.ladder = []
        if call.media_token is not None:
            self._by_media_token.pop(call.media_token, None)
        self._counters[f"calls.ended.{ended_by}"] += 1
        self._per_account[call.account.username] -= 1
        if self._per_account[call.account.username] <= 0:
            del self._per_account[call.account.username]
        self._calls.pop(call.ref, None)
        self._forget(call)
        out.append(
            Log(
                level="info",
                event="call.ended",
                fields=(
                    ("call_ref", call.ref),
                    ("call_id", call.a.call_id),
                    ("account", call.account.username),
                    ("ended_by", ended_by),
                    ("status", record.final_status),
                    ("duration", record.duration),
                ),
            )
        )

    def _forget(self, call: Call) -> None:
        self._by_dialog.pop((call.a.call_id, call.a.local_tag), None)
        if call.b is not None:
            self._by_dialog.pop((call.b.call_id, call.b.local_tag), None)
        starts = self._recent_starts.get(call.account.username)
        if starts is not None and not starts:
            del self._recent_starts[call.account.username]

    def _bye(self, call: Call, leg: Leg, now: float, wall: float, out: list[Action]) -> None:
        bye = self._request(leg, "BYE")
        _, items = self._transactions.create_client(
            bye,
            destination=leg.destination,
            transport=leg.transport,
            connection=leg.connection,
            now=now,
            owner=_Role(call, "bye"),
        )
        self._dispatch(items, call, now, wall, out)

    def end_all(self, *, now: float, wall: float, out: list[Action]) -> None:
        for call in list(self._calls.values()):
            self._hang_up(call, "shutdown", "server shutting down", now, wall, out)

    # ---------------------------------------------------------------- events

    def transaction_event(
        self, event: object, *, now: float, wall: float, out: list[Action]
    ) -> None:
        """An event from the transaction layer about a transaction we own."""
        if isinstance(event, ResponseReceived):
            role = event.transaction.owner
            if isinstance(role, _Role):
                self._b_or_a_response(role, event.response, now, wall, out)
            return
        if isinstance(event, (TransactionTimedOut, TransportFailed)):
            role = event.transaction.owner
            if not isinstance(role, _Role):
                return
            call = role.call
            if role.kind == "invite":
                if call.state is CallState.ENDED:
                    return
                if isinstance(event, TransactionTimedOut):
                    self._fail_a(call, 408, "Request Timeout", now, wall, out, ended_by="timeout")
                else:
                    self._fail_a(
                        call,
                        503,
                        "Service Unavailable",
                        now,
                        wall,
                        out,
                        ended_by="error",
                        headers=(("Retry-After", str(self._config.retry_after)),),
                    )
            elif role.kind == "reinvite":
                self._reinvite_response(
                    call,
                    synthetic_response(event.transaction.request, 408, "Request Timeout"),
                    now,
                    wall,
                    out,
                )

    def _b_or_a_response(
        self, role: _Role, response: Response, now: float, wall: float, out: list[Action]
    ) -> None:
        call = role.call
        if role.kind == "reinvite" and call.reinvite is not None and call.reinvite.origin is call.b:
            # The re-INVITE went to the client (it came from the carrier).
            self._ladder(
                call, "in", "A", call.a.destination, call.a.transport, response.as_received(), wall
            )
            self._reinvite_response(call, response, now, wall, out)
            return
        if call.b is None:
            return
        self._b_response(call, role.kind, response, now, wall, out)

    # ---------------------------------------------------------------- timers

    def _retransmit(self, call: Call, leg: Leg, data: bytes, cseq: int, now: float) -> None:
        t1 = self._config.t1
        if leg.transport.reliable:
            # §13.3.1.4: on a reliable transport the 2xx is not retransmitted,
            # but the ACK is still awaited for 64*T1.
            entry = _Retransmit(
                leg=leg,
                data=data,
                cseq=cseq,
                interval=0.0,
                deadline=now + 64 * t1,
                give_up=now + 64 * t1,
            )
        else:
            entry = _Retransmit(
                leg=leg, data=data, cseq=cseq, interval=t1, deadline=now + t1, give_up=now + 64 * t1
            )
        call.retransmits.append(entry)
        self._arm(call, entry.deadline)

    def _arm(self, call: Call, deadline: float) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, call.ref))
        if len(self._timers) > 4 * len(self._calls) + 64:
            # Entries of ended calls wait for their deadline (a 4-hour hang-up
            # timer, say); drop them once they outnumber the live ones
            # (amortised, so the heap stays bounded: DESIGN §7).
            live = self._calls
            self._timers = [entry for entry in self._timers if entry[2] in live]
            heapq.heapify(self._timers)

    def next_timer(self) -> float | None:
        timers, live = self._timers, self._calls
        while timers and timers[0][2] not in live:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def handle_timer(self, *, now: float, wall: float, out: list[Action]) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, ref = heapq.heappop(self._timers)
            call = self._calls.get(ref)
            if call is None or call.state is CallState.ENDED:
                continue
            self._call_timer(call, now, wall, out)

    def _call_timer(self, call: Call, now: float, wall: float, out: list[Action]) -> None:
        if (
            call.state is CallState.EARLY
            and call.ring_deadline is not None
            and now >= call.ring_deadline
        ):
            # Timer C (§16.6): nobody answered; CANCEL the carrier, 408 the client.
            self._fail_a(call, 408, "Request Timeout", now, wall, out, ended_by="timeout")
            return
        if now >= call.hangup_deadline:
            self._hang_up(call, "timeout", "maximum call duration reached", now, wall, out)
            return
        for entry in list(call.retransmits):
            if entry.deadline > now:
                continue
            if now >= entry.give_up:
                # §13.3.1.4: no ACK within 64*T1: the dialog is confirmed and
                # then ended with a BYE on both legs.
                call.retransmits.remove(entry)
                if entry.leg is call.a and call.state is CallState.ANSWERING:
                    call.state = CallState.CONFIRMED
                self._hang_up(call, "timeout", "no ACK for the 2xx", now, wall, out)
                return
            leg = entry.leg
            out.append(
                Send(
                    data=entry.data,
                    destination=leg.destination,
                    transport=leg.transport,
                    connection=leg.connection,
                )
            )
            entry.interval = min(entry.interval * 2, self._config.t2)
            entry.deadline = min(now + entry.interval, entry.give_up)
            self._arm(call, entry.deadline)

    # ---------------------------------------------------------------- ladder

    def _dispatch(
        self,
        items: Sequence[object],
        call: Call | None,
        now: float,
        wall: float | None,
        out: list[Action],
    ) -> None:
        for item in items:
            if isinstance(item, Send):
                out.append(item)
                if call is not None and wall is not None:
                    leg = "A" if item.destination == call.a.destination else "B"
                    self._ladder(
                        call, "out", leg, item.destination, item.transport, item.data, wall
                    )
            elif isinstance(item, Log):
                out.append(item)
            elif isinstance(item, (ResponseReceived, TransactionTimedOut, TransportFailed)):
                self.transaction_event(item, now=now, wall=wall or 0.0, out=out)

    def _ladder(
        self,
        call: Call,
        direction: str,
        leg: str,
        peer: Address,
        transport: Transport,
        data: bytes,
        wall: float,
    ) -> None:
        if len(call.ladder) < self._config.ladder_limit and call.state is not CallState.ENDED:
            call.ladder.append((wall, direction, leg, peer, transport, data))


def _ladder_entries(passed: list[_Passed]) -> tuple[LadderEntry, ...]:
    """The ladder of a call's record (see ``_entry``), each peer formatted once."""
    peers: dict[Address, str] = {}
    entries = []
    for wall, direction, leg, peer, transport, data in passed:
        text = peers.get(peer)
        if text is None:
            text = peers[peer] = format_address(peer)
        entries.append(
            LadderEntry(
                wall=wall,
                direction=direction,
                leg=leg,
                peer=text,
                transport=_TRANSPORT_NAMES[transport],
                message=data[:4096].decode("utf-8", "replace"),
            )
        )
    return tuple(entries)


def _parse_or_none(body: bytes) -> SessionDescription | None:
    """The SDP of a body; None when there is none or it does not parse."""
    if not body:
        return None
    try:
        return parse_sdp(body)
    except ParseError:
        return None


def _entry(
    direction: str, leg: str, peer: Address, transport: Transport, data: bytes, wall: float
) -> LadderEntry:
    """One message of a call's ladder, its text cut at 4 KiB."""
    return LadderEntry(
        wall=wall,
        direction=direction,
        leg=leg,
        peer=format_address(peer),
        transport=_TRANSPORT_NAMES[transport],
        message=data[:4096].decode("utf-8", "replace"),
    )
