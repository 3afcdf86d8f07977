"""The RFC 3261 §17 transaction layer: four state machines, matching, timers.

Theory of operation. A transaction is one request and the responses to it
(RFC 3261 §17). The layer keeps four machines, each a row set of one
transition table keyed by (machine, state, input), the h2 ``stream.py`` habit:

* INVITE client (Figure 5, with RFC 6026 §7.2's Accepted state),
* non-INVITE client (Figure 6),
* INVITE server (Figure 7, with RFC 6026 §7.1's Accepted state),
* non-INVITE server (Figure 8).

An input is a response from the wire or from the TU, a request
retransmission, an ACK, a timer (by RFC letter), or a transport error. A key
missing from the table has exactly one meaning per input source: a response
the TU passes down in a state that does not allow it raises
``LocalProtocolError`` naming the state; anything from the wire is absorbed
(retransmissions and strays are the network's normal noise); a timer or
transport error that the state does not list is ignored.

Entering a state arms that state's timers as absolute deadlines in one
``TimerQueue`` (see ``_timers``); timers the RFC sets to zero on reliable
transports (D, I, J, K) are never armed: the transaction terminates at once.
A terminated transaction is removed from every dict immediately, so a
transaction lingers only while an absorption timer (D, I, J, K, L, M) runs.

What the layer refuses to know: dialogs, authentication, routing, and the
retransmission of 2xx responses to INVITE, which belongs to the TU (RFC 6026
§7.1: the server transaction only passes the TU's 2xx retransmissions on).
It builds exactly one request itself: the ACK for a non-2xx final response
(§17.1.1.3).

The layer never reads a clock: every call that depends on time takes ``now``.
Messages are serialised once; retransmissions re-send the kept bytes.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import NamedTuple

import attrs

from ._actions import Send
from ._errors import LocalProtocolError, ParseError, RemoteProtocolError
from ._events import (
    Event,
    ResponseReceived,
    TransactionTerminated,
    TransactionTimedOut,
    TransportFailed,
)
from ._headers import Via, canonical_name, split_header_values
from ._message import Request, Response
from ._model import Address, Transport
from ._timers import TimerName, TimerQueue

__all__ = [
    "MAGIC_COOKIE",
    "ClientTransaction",
    "Machine",
    "ServerTransaction",
    "TransactionInput",
    "TransactionKey",
    "TransactionLayer",
    "TransactionState",
    "response_destination",
]

MAGIC_COOKIE = "z9hG4bK"
"""RFC 3261 §8.1.1.7: a branch starting with this was built by an RFC 3261 element."""

_DEFAULT_PORT = 5060  # §18.2.2 / §19.1.2: sent-by without a port means 5060 (no TLS here)

# §17.1.1.2 Table 4: "Timer D ... > 32s for UDP". D must also outlast the
# server's Timer G retransmissions (64*T1), hence the max() when T1 is raised.
_TIMER_D_FLOOR = 32.0

TransactionKey = tuple[str | int | None, ...]
"""Hashable identity of a transaction in the layer's dicts (§17.1.3, §17.2.3)."""


class TransactionState(enum.Enum):
    """States of the four machines (RFC 3261 Figures 5–8, RFC 6026 Accepted)."""

    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"

    __hash__ = object.__hash__  # identity: members are singletons (see _timers)


class Machine(enum.Enum):
    """Which of the four §17 machines a transaction runs."""

    INVITE_CLIENT = "INVITE client"
    NON_INVITE_CLIENT = "non-INVITE client"
    INVITE_SERVER = "INVITE server"
    NON_INVITE_SERVER = "non-INVITE server"

    __hash__ = object.__hash__  # identity: members are singletons (see _timers)


class TransactionInput(enum.Enum):
    """What can happen to a transaction, besides a timer firing."""

    REQUEST = "request retransmission"
    ACK = "ACK"
    PROVISIONAL = "1xx"
    SUCCESS = "2xx"
    FAILURE = "300-699"
    TRANSPORT_ERROR = "transport error"

    __hash__ = object.__hash__  # identity: members are singletons (see _timers)


class _Effect(enum.Enum):
    """What a transition does besides changing state."""

    NOTHING = "no action"
    SEND_RESPONSE = "send response"
    RESEND_RESPONSE = "re-send last response"
    RETRANSMIT_RESPONSE = "re-send response, back off G"
    RETRANSMIT_REQUEST = "re-send request, back off"
    PASS_UP = "response to TU"
    ACK_AND_PASS_UP = "send ACK, response to TU"
    RESEND_ACK = "re-send ACK"
    TIME_OUT = "timeout to TU"
    FAIL_TRANSPORT = "transport error to TU"


_Input = TransactionInput | TimerName

_S = TransactionState
_I = TransactionInput
_E = _Effect
_IC = Machine.INVITE_CLIENT
_NC = Machine.NON_INVITE_CLIENT
_IS = Machine.INVITE_SERVER
_NS = Machine.NON_INVITE_SERVER

_TRANSITIONS: dict[tuple[Machine, TransactionState, _Input], tuple[TransactionState, _Effect]] = {
    # ---- INVITE client, §17.1.1.2 Figure 5 + RFC 6026 §7.2 ----
    (_IC, _S.CALLING, TimerName.A): (_S.CALLING, _E.RETRANSMIT_REQUEST),
    (_IC, _S.CALLING, TimerName.B): (_S.TERMINATED, _E.TIME_OUT),
    (_IC, _S.CALLING, _I.PROVISIONAL): (_S.PROCEEDING, _E.PASS_UP),
    (_IC, _S.CALLING, _I.SUCCESS): (_S.ACCEPTED, _E.PASS_UP),
    (_IC, _S.CALLING, _I.FAILURE): (_S.COMPLETED, _E.ACK_AND_PASS_UP),
    (_IC, _S.CALLING, _I.TRANSPORT_ERROR): (_S.TERMINATED, _E.FAIL_TRANSPORT),
    (_IC, _S.PROCEEDING, _I.PROVISIONAL): (_S.PROCEEDING, _E.PASS_UP),
    # §9.1: 64*T1 after a CANCEL with no final answer, the INVITE is given up
    # (create_client re-arms Timer B when the TU sends the CANCEL).
    (_IC, _S.PROCEEDING, TimerName.B): (_S.TERMINATED, _E.TIME_OUT),
    (_IC, _S.PROCEEDING, _I.SUCCESS): (_S.ACCEPTED, _E.PASS_UP),
    (_IC, _S.PROCEEDING, _I.FAILURE): (_S.COMPLETED, _E.ACK_AND_PASS_UP),
    (_IC, _S.PROCEEDING, _I.TRANSPORT_ERROR): (_S.TERMINATED, _E.FAIL_TRANSPORT),
    (_IC, _S.COMPLETED, _I.FAILURE): (_S.COMPLETED, _E.RESEND_ACK),
    (_IC, _S.COMPLETED, _I.TRANSPORT_ERROR): (_S.TERMINATED, _E.FAIL_TRANSPORT),
    (_IC, _S.COMPLETED, TimerName.D): (_S.TERMINATED, _E.NOTHING),
    (_IC, _S.ACCEPTED, _I.SUCCESS): (_S.ACCEPTED, _E.PASS_UP),
    (_IC, _S.ACCEPTED, TimerName.M): (_S.TERMINATED, _E.NOTHING),
    # ---- non-INVITE client, §17.1.2.2 Figure 6 ----
    (_NC, _S.TRYING, TimerName.E): (_S.TRYING, _E.RETRANSMIT_REQUEST),
    (_NC, _S.TRYING, TimerName.F): (_S.TERMINATED, _E.TIME_OUT),
    (_NC, _S.TRYING, _I.PROVISIONAL): (_S.PROCEEDING, _E.PASS_UP),
    (_NC, _S.TRYING, _I.SUCCESS): (_S.COMPLETED, _E.PASS_UP),
    (_NC, _S.TRYING, _I.FAILURE): (_S.COMPLETED, _E.PASS_UP),
    (_NC, _S.TRYING, _I.TRANSPORT_ERROR): (_S.TERMINATED, _E.FAIL_TRANSPORT),
    (_NC, _S.PROCEEDING, TimerName.E): (_S.PROCEEDING, _E.RETRANSMIT_REQUEST),
    (_NC, _S.PROCEEDING, TimerName.F): (_S.TERMINATED, _E.TIME_OUT),
    (_NC, _S.PROCEEDING, _I.PROVISIONAL): (_S.PROCEEDING, _E.PASS_UP),
    (_NC, _S.PROCEEDING, _I.SUCCESS): (_S.COMPLETED, _E.PASS_UP),
    (_NC, _S.PROCEEDING, _I.FAILURE): (_S.COMPLETED, _E.PASS_UP),
    (_NC, _S.PROCEEDING, _I.TRANSPORT_ERROR): (_S.TERMINATED, _E.FAIL_TRANSPORT),
    (_NC, _S.COMPLETED, TimerName.K): (_S.TERMINATED, _E.NOTHING),
    # ---- INVITE server, §17.2.1 Figure 7 + RFC 6026 §7.1 ----
    (_IS, _S.PROCEEDING, _I.REQUEST): (_S.PROCEEDING, _E.RESEND_RESPONSE),
    (_IS, _S.PROCEEDING, _I.PROVISIONAL): (_S.PROCEEDING, _E.SEND_RESPONSE),
    (_IS, _S.PROCEEDING, _I.SUCCESS): (_S.ACCEPTED, _E.SEND_RESPONSE),
    (_IS, _S.PROCEEDING, _I.FAILURE): (_S.COMPLETED, _E.SEND_RESPONSE),
    (_IS, _S.PROCEEDING, _I.TRANSPORT_ERROR): (_S.TERMINATED, _E.FAIL_TRANSPORT),
    (_IS, _S.COMPLETED, _I.REQUEST): (_S.COMPLETED, _E.RESEND_RESPONSE),
    (_IS, _S.COMPLETED, _I.ACK): (_S.CONFIRMED, _E.NOTHING),
    (_IS, _S.COMPLETED, TimerName.G): (_S.COMPLETED, _E.RETRANSMIT_RESPONSE),
    (_IS, _S.COMPLETED, TimerName.H): (_S.TERMINATED, _E.TIME_OUT),
    (_IS, _S.COMPLETED, _I.TRANSPORT_ERROR): (_S.TERMINATED, _E.FAIL_TRANSPORT),
    (_IS, _S.CONFIRMED, TimerName.I): (_S.TERMINATED, _E.NOTHING),
    (_IS, _S.ACCEPTED, _I.SUCCESS): (_S.ACCEPTED, _E.SEND_RESPONSE),
    (_IS, _S.ACCEPTED, _I.TRANSPORT_ERROR): (_S.ACCEPTED, _E.FAIL_TRANSPORT),
    (_IS, _S.ACCEPTED, TimerName.L): (_S.TERMINATED, _E.NOTHING),
    # ---- non-INVITE server, §17.2.2 Figure 8 ----
    (_NS, _S.TRYING, _I.PROVISIONAL): (_S.PROCEEDING, _E.SEND_RESPONSE),
    (_NS, _S.TRYING, _I.SUCCESS): (_S.COMPLETED, _E.SEND_RESPONSE),
    (_NS, _S.TRYING, _I.FAILURE): (_S.COMPLETED, _E.SEND_RESPONSE),
    (_NS, _S.PROCEEDING, _I.REQUEST): (_S.PROCEEDING, _E.RESEND_RESPONSE),
    (_NS, _S.PROCEEDING, _I.PROVISIONAL): (_S.PROCEEDING, _E.SEND_RESPONSE),
    (_NS, _S.PROCEEDING, _I.SUCCESS): (_S.COMPLETED, _E.SEND_RESPONSE),
    (_NS, _S.PROCEEDING, _I.FAILURE): (_S.COMPLETED, _E.SEND_RESPONSE),
    (_NS, _S.PROCEEDING, _I.TRANSPORT_ERROR): (_S.TERMINATED, _E.FAIL_TRANSPORT),
    (_NS, _S.COMPLETED, _I.REQUEST): (_S.COMPLETED, _E.RESEND_RESPONSE),
    (_NS, _S.COMPLETED, _I.TRANSPORT_ERROR): (_S.TERMINATED, _E.FAIL_TRANSPORT),
    (_NS, _S.COMPLETED, TimerName.J): (_S.TERMINATED, _E.NOTHING),
}
"""Every legal transition. A missing key: see the module docstring."""

_INITIAL_STATE: dict[Machine, TransactionState] = {
    _IC: _S.CALLING,
    _NC: _S.TRYING,
    _IS: _S.PROCEEDING,  # §17.2.1: "the server transaction MUST ... enter the Proceeding state"
    _NS: _S.TRYING,
}


@attrs.define(slots=True, eq=False, kw_only=True)
class ServerTransaction:
    """One server transaction (§17.2). Mutable; owned by the layer.

    ``response_destination`` is where responses go (§18.2.2, RFC 3581 §4);
    ``last_response`` holds the bytes of the most recent response sent, kept
    for retransmission, ``last_status`` its status code; ``final_to_tag`` is
    the To tag of the final response, kept for RFC 2543 ACK matching only.
    ``owner`` is an opaque slot for the TU.
    """

    key: TransactionKey
    machine: Machine
    method: str
    request: Request
    source: Address
    transport: Transport
    connection: int | None
    response_destination: Address
    state: TransactionState
    last_response: bytes | None = None
    last_status: int | None = None
    final_to_tag: str | None = None
    retransmit_interval: float = 0.0
    owner: object | None = None


@attrs.define(slots=True, eq=False, kw_only=True)
class ClientTransaction:
    """One client transaction (§17.1). Mutable; owned by the layer.

    ``request_bytes`` is the request as serialised once at creation;
    ``ack_bytes`` the ACK this layer built for a non-2xx final response.
    ``owner`` is an opaque slot for the TU.
    """

    key: TransactionKey
    machine: Machine
    method: str
    request: Request
    destination: Address
    transport: Transport
    connection: int | None
    state: TransactionState
    request_bytes: bytes
    ack_bytes: bytes | None = None
    last_status: int | None = None
    retransmit_interval: float = 0.0
    owner: object | None = None


_Transaction = ServerTransaction | ClientTransaction


class _Outgoing(NamedTuple):
    """A response from the TU on its way out: status, bytes, To tag."""

    status: int
    data: bytes
    to_tag: str | None


_Peer = tuple[Address, Transport]


def response_destination(via: Via, source: Address, transport: Transport) -> Address:
    """Where responses to a request with top Via ``via`` from ``source`` go.

    §18.2.2 with RFC 3581 §4: over a reliable transport, back over the
    connection, i.e. to ``source``; else to ``maddr`` (port from sent-by, or
    5060); else to ``received`` (or the sent-by host) and ``rport`` (or the
    sent-by port, or 5060). A port outside 1–65535 written by the peer is
    replaced by the source port, so a forged Via cannot produce an unsendable
    destination.
    """
    if transport.reliable:
        return source
    sent_by_port = via.port if via.port is not None else _DEFAULT_PORT
    maddr = via.maddr
    if maddr:
        return maddr, _usable_port(sent_by_port, source)
    host = via.received or via.host
    rport = via.rport
    port = rport if rport is not None else sent_by_port
    return host, _usable_port(port, source)


def _usable_port(port: int, source: Address) -> int:
    return port if 0 < port < 65536 else source[1]


def _same_ip(host: str, ip: str) -> bool:
    """§18.2.1: is the sent-by host this very IP address (a domain name never is)?"""
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(ip)
    except ValueError:
        return False


def _with_param(
    params: list[tuple[str, str | None]], name: str, value: str, *, before: str | None = None
) -> None:
    """Set ``name=value`` in place, else insert it before ``before`` (if present), else append."""
    lowered = name.lower()
    for index, (existing, _old) in enumerate(params):
        if existing.lower() == lowered:
            params[index] = (existing, value)
            return
    if before is not None:
        for index, (existing, _old) in enumerate(params):
            if existing.lower() == before:
                params.insert(index, (name, value))
                return
    params.append((name, value))


def _replace_top_via(request: Request | Response, value: str) -> None:
    """Replace the first Via value, keeping every Via field where it was."""
    fields = list(request.headers)
    vias = [
        (index, name, raw)
        for index, (name, raw) in enumerate(fields)
        if canonical_name(name) == "via"
    ]
    first_index, first_name, first_raw = vias[0]
    rest = split_header_values(first_raw)[1:]
    request.headers.remove(first_name)
    for index, name, raw in vias:
        if index == first_index:
            raw = ", ".join([value, *rest])
        request.headers.insert(index, name, raw)


def _is_rfc3261_branch(branch: str | None) -> bool:
    # RFC 4475 §3.3.14 (badbranch): a branch that is only the cookie is not unique.
    return (
        branch is not None and branch.startswith(MAGIC_COOKIE) and len(branch) > len(MAGIC_COOKIE)
    )


def _via_identity(via: Via) -> tuple[str, str, int | None, str | None]:
    """The parts of a Via that stamp_via never changes (for RFC 2543 matching)."""
    return via.transport, via.host.lower(), via.port, via.branch


def _input_for_status(status: int) -> TransactionInput:
    if 100 <= status < 200:
        return TransactionInput.PROVISIONAL
    if 200 <= status < 300:
        return TransactionInput.SUCCESS
    return TransactionInput.FAILURE


def _make_ack(invite: Request, response: Response) -> Request:
    """§17.1.1.3: the ACK for a non-2xx final response to ``invite``.

    Same Request-URI, Call-ID, From, CSeq number and single top Via as the
    INVITE, To from the response (it carries the UAS's tag), the INVITE's
    Route header fields, no body.
    """
    fields: list[tuple[str, str]] = [("Via", str(invite.top_via))]
    fields.extend(("Route", route) for route in invite.headers.get_all("Route"))
    fields.append(("Max-Forwards", "70"))
    fields.append(("From", invite.headers.get("From") or str(invite.from_)))
    fields.append(("To", response.headers.get("To") or str(response.to)))
    fields.append(("Call-ID", invite.call_id))
    fields.append(("CSeq", f"{invite.cseq.number} ACK"))
    fields.append(("Content-Length", "0"))
    return Request("ACK", invite.uri, fields)


class TransactionLayer:
    """All client and server transactions of one engine (RFC 3261 §17).

    Tunables: ``t1``, ``t2``, ``t4`` (§17.1.1.1, Table 4); ``max_transactions``
    bounds live transactions (DESIGN §7: a peer decides how many arrive; at
    the bound the oldest answered non-INVITE server transaction still
    absorbing retransmissions is ended early if it has lingered 4*T1, and
    only when there is none is a new request refused);
    ``retry_after`` is the Retry-After of the 503 refusing a new server
    transaction beyond the bound; ``force_rport`` makes ``stamp_via`` act as if
    every client asked for rport (RFC 3581), because softphones behind NAT
    rarely do and only the source address reaches them.
    """

    def __init__(
        self,
        *,
        t1: float = 0.5,
        t2: float = 4.0,
        t4: float = 5.0,
        max_transactions: int = 20_000,
        retry_after: int = 5,
        force_rport: bool = True,
    ) -> None:
        if not (t1 > 0 and t2 > 0 and t4 > 0):
            raise ValueError("T1, T2 and T4 must be positive")
        if max_transactions < 1:
            raise ValueError("max_transactions must be at least 1")
        self.t1 = t1
        self.t2 = t2
        self.t4 = t4
        self.max_transactions = max_transactions
        self.retry_after = retry_after
        self.force_rport = force_rport
        self._servers: dict[TransactionKey, ServerTransaction] = {}
        self._clients: dict[TransactionKey, ClientTransaction] = {}
        # Transactions by the peer they talk to, so a transport error costs
        # O(affected) rather than a scan of every transaction.
        self._by_peer: dict[_Peer, dict[_Transaction, None]] = {}
        self._timers: TimerQueue[_Transaction] = TimerQueue()
        # The request match_server last found no transaction for, and its key.
        self._unmatched: tuple[Request, TransactionKey] | None = None
        # Non-INVITE server transactions in Completed over UDP (answered, only
        # absorbing retransmissions until Timer J) and when they got there,
        # oldest first: Timer J is the same 64*T1 for all, so arming order is
        # expiry order.
        self._lingering: dict[ServerTransaction, float] = {}
        self.evicted = 0
        """Lingering transactions ended before Timer J to make room (a counter)."""
        self.removed: list[_Transaction] = []
        """Transactions taken out of the layer since the TU last emptied this
        list: nothing reaches them through the layer any more, so the TU can
        drop its links to them (``owner``) once it has seen their events."""

    def __len__(self) -> int:
        """Live transactions, client and server."""
        return len(self._servers) + len(self._clients)

    @property
    def busy(self) -> bool:
        """True while work is in flight: a client transaction, or a server
        transaction still waiting for its final response. Transactions that
        only linger to absorb retransmissions (Completed, Confirmed,
        Accepted) do not count: a server can stop without waiting for them."""
        if self._clients:
            return True
        return any(
            t.state in (TransactionState.TRYING, TransactionState.PROCEEDING)
            for t in self._servers.values()
        )

    # ------------------------------------------------------------------ server side

    def stamp_via(self, request: Request | Response, source: Address) -> None:
        """Record in the top Via where ``request`` really came from (§18.2.1, RFC 3581 §4).

        Adds ``received=<source IP>`` when the sent-by host is a domain name or
        another IP; when the Via has ``rport`` (or ``force_rport`` is on), sets
        ``rport=<source port>`` and adds ``received`` even if the IP is the same
        ("MUST ... even if it is identical", RFC 3581 §4). A ``received`` the
        request already carries is replaced by the real source IP. Modifies
        ``request.headers`` in place; raises ``ParseError`` when the request
        has no parseable Via.
        """
        via = request.top_via
        stamped = self.stamped_via(via, source)
        if stamped != via:
            _replace_top_via(request, str(stamped))

    def stamped_via(self, via: Via, source: Address) -> Via:
        """``via`` with the ``received``/``rport`` that ``stamp_via`` would write
        (a pure function of the Via and the source, for callers that already
        hold the parsed Via)."""
        ip, port = source
        wants_rport = via.has_rport or self.force_rport
        params = list(via.params)
        # A received= the peer wrote itself is overwritten too: left alone it
        # would steer our responses to an address of the peer's choosing.
        if wants_rport or via.received is not None or not _same_ip(via.host, ip):
            _with_param(params, "received", ip, before="rport")
        if wants_rport:
            _with_param(params, "rport", str(port))
        return Via(via.protocol, via.transport, via.host, via.port, tuple(params))

    def match_server(self, request: Request) -> ServerTransaction | None:
        """The server transaction ``request`` belongs to, or None (§17.2.3).

        With an RFC 3261 branch the key is (branch, sent-by, method), where an
        ACK looks for the INVITE and CANCEL has a key of its own. Otherwise the
        RFC 2543 rules compare Request-URI, To tag, From tag, Call-ID, CSeq and
        top Via; the ACK's To tag must equal the tag of the final response.
        An ACK matching an INVITE transaction that answered 2xx returns None:
        that ACK is a transaction of its own, for the TU (RFC 6026 §7.1).
        Raises ``ParseError`` when a header needed for matching is malformed.
        """
        is_ack = request.method == "ACK"
        key = self._server_key(request, "INVITE" if is_ack else None)
        transaction = self._servers.get(key)
        if transaction is None:
            if not is_ack:
                # create_server usually follows at once: spare it computing the key again.
                self._unmatched = (request, key)
            return None
        if transaction.key[0] == "2543":
            expected = transaction.final_to_tag if is_ack else transaction.request.to.tag
            if request.to.tag != expected:
                return None
        if is_ack and transaction.state is TransactionState.ACCEPTED:
            return None  # the ACK for a 2xx is the TU's (RFC 6026 §7.1: "ACK / to TU")
        return transaction

    def find_invite_for_cancel(self, cancel: Request) -> ServerTransaction | None:
        """The INVITE server transaction ``cancel`` targets, or None (§9.2).

        Same rules as §17.2.3 with the method taken as INVITE; the caller
        answers 481 on None and looks at the returned transaction's state to
        decide whether the CANCEL still has an effect.
        """
        transaction = self._servers.get(self._server_key(cancel, "INVITE"))
        if transaction is None or transaction.machine is not Machine.INVITE_SERVER:
            return None
        if transaction.key[0] == "2543" and cancel.to.tag != transaction.request.to.tag:
            return None
        return transaction

    def receive_retransmission(
        self, transaction: ServerTransaction, request: Request, *, now: float
    ) -> list[Send | Event]:
        """Feed a request that ``match_server`` matched to ``transaction``.

        A retransmission of the original request re-sends the last response,
        if any (§17.2.1, §17.2.2); an ACK in Completed moves an INVITE server
        transaction to Confirmed (Timer I). Everything else is absorbed.
        """
        kind = TransactionInput.ACK if request.method == "ACK" else TransactionInput.REQUEST
        return self._step(transaction, kind, None, None, now)

    def create_server(
        self,
        request: Request,
        *,
        source: Address,
        transport: Transport,
        connection: int | None,
        now: float,
        owner: object | None = None,
    ) -> ServerTransaction:
        """Start a server transaction for a request ``match_server`` did not match.

        Call ``stamp_via`` first: the response destination is computed from
        the top Via as it is now. No action is returned; the TU sends 100
        Trying (INVITE) through ``respond``. Raises ``RemoteProtocolError``
        (503 with Retry-After) when ``max_transactions`` transactions are live
        and none of them may be ended early (``_evict_lingering``);
        ``LocalProtocolError`` for an ACK (never a transaction, §17) or a
        request whose transaction already exists.
        """
        if request.method == "ACK":
            raise LocalProtocolError("An ACK never creates a server transaction (RFC 3261 §17)")
        if len(self) >= self.max_transactions and not self._evict_lingering(now):
            raise RemoteProtocolError(
                "Server overloaded", 503, (("Retry-After", str(self.retry_after)),)
            )
        unmatched, self._unmatched = self._unmatched, None
        key = unmatched[1] if unmatched is not None and unmatched[0] is request else None
        if key is None:
            key = self._server_key(request, None)
        if key in self._servers:
            raise LocalProtocolError("Server transaction already exists; use match_server first")
        machine = Machine.INVITE_SERVER if request.method == "INVITE" else Machine.NON_INVITE_SERVER
        if self.force_rport and not transport.reliable:
            # Symmetric response routing (RFC 3581 §4, forced): answer the
            # address the request came from. This also ignores a maddr, which
            # on a public edge would let anyone aim our answers at a third
            # party (a reflection attack); softphones never multicast.
            destination = source
        else:
            destination = response_destination(request.top_via, source, transport)
        transaction = ServerTransaction(
            key=key,
            machine=machine,
            method=request.method,
            request=request,
            source=source,
            transport=transport,
            connection=connection,
            response_destination=destination,
            state=_INITIAL_STATE[machine],
            owner=owner,
        )
        self._servers[key] = transaction
        self._by_peer.setdefault((destination, transport), {})[transaction] = None
        return transaction

    def respond(
        self, transaction: ServerTransaction, response: Response, *, now: float
    ) -> list[Send | Event]:
        """Send ``response`` (from the TU) and move the machine.

        Returns the ``Send`` (to ``transaction.response_destination``, over the
        transaction's connection) and, when the transaction ends at once (a
        final response over a reliable transport), ``TransactionTerminated``.
        1xx → Proceeding; INVITE 2xx → Accepted (Timer L); INVITE 3xx–6xx →
        Completed (Timers G, H); non-INVITE final → Completed (Timer J).
        Raises ``LocalProtocolError`` naming the state when it does not allow
        the response (e.g. a second final response).
        """
        status = response.status_code
        self._check_response(transaction, status)
        data = bytes(response)
        # Only RFC 2543 ACK matching needs the tag (§17.2.3); spare the parse otherwise.
        to_tag = response.to.tag if status >= 200 and transaction.key[0] == "2543" else None
        return self._step(
            transaction, _input_for_status(status), _Outgoing(status, data, to_tag), None, now
        )

    def respond_with(
        self,
        transaction: ServerTransaction,
        status: int,
        data: bytes,
        *,
        to_tag: str | None,
        now: float,
    ) -> list[Send | Event]:
        """``respond`` for a response the TU has already serialised: ``data``
        is its bytes, ``status`` its status code and ``to_tag`` the tag of its
        To header. Same results and errors as ``respond``."""
        self._check_response(transaction, status)
        return self._step(
            transaction, _input_for_status(status), _Outgoing(status, data, to_tag), None, now
        )

    def _check_response(self, transaction: ServerTransaction, status: int) -> None:
        if not 100 <= status <= 699:
            raise LocalProtocolError(f"Status code {status} is outside 100-699")
        if (transaction.machine, transaction.state, _input_for_status(status)) not in _TRANSITIONS:
            raise LocalProtocolError(
                f"Cannot send a {status} response in state {transaction.state.name} "
                f"of the {transaction.machine.value} transaction"
            )

    # ------------------------------------------------------------------ client side

    def create_client(
        self,
        request: Request,
        *,
        destination: Address,
        transport: Transport,
        connection: int | None = None,
        now: float,
        owner: object | None = None,
    ) -> tuple[ClientTransaction, list[Send | Event]]:
        """Start a client transaction and send ``request`` (§17.1.1, §17.1.2).

        The TU builds the request with a top Via carrying a unique branch that
        starts with ``z9hG4bK``. Arms Timers A and B (INVITE) or E and F
        (non-INVITE); A and E only on an unreliable transport. An ACK is not a
        transaction: the TU sends the ACK for a 2xx itself. Raises
        ``LocalProtocolError`` for an ACK, a branch without the magic cookie, a
        key already in use, or ``max_transactions`` live client transactions.
        """
        if request.method == "ACK":
            raise LocalProtocolError("An ACK is not sent through a client transaction (§17.1)")
        branch = request.top_via.branch
        if not _is_rfc3261_branch(branch):
            raise LocalProtocolError(f"Top Via branch {branch!r} does not start with z9hG4bK")
        key: TransactionKey = ("client", branch, request.cseq.method)
        if key in self._clients:
            raise LocalProtocolError(f"Client transaction {branch} {request.method} exists")
        if len(self._clients) >= self.max_transactions:
            raise LocalProtocolError("Too many client transactions")
        machine = Machine.INVITE_CLIENT if request.method == "INVITE" else Machine.NON_INVITE_CLIENT
        transaction = ClientTransaction(
            key=key,
            machine=machine,
            method=request.method,
            request=request,
            destination=destination,
            transport=transport,
            connection=connection,
            state=_INITIAL_STATE[machine],
            request_bytes=bytes(request),
            retransmit_interval=self.t1,
            owner=owner,
        )
        self._clients[key] = transaction
        self._by_peer.setdefault((destination, transport), {})[transaction] = None
        retransmit, timeout = (
            (TimerName.A, TimerName.B)
            if machine is Machine.INVITE_CLIENT
            else (TimerName.E, TimerName.F)
        )
        if not transport.reliable:
            self._timers.arm(transaction, retransmit, now + self.t1)
        self._timers.arm(transaction, timeout, now + 64 * self.t1)
        if request.method == "CANCEL":
            # §9.1: "If no final response is received for the original request
            # in 64*T1 seconds ... the client SHOULD ... destroy the client
            # transaction handling the original request."
            invite = self._clients.get(("client", request.top_via.branch or "", "INVITE"))
            if invite is not None and invite.state is TransactionState.PROCEEDING:
                self._timers.arm(invite, TimerName.B, now + 64 * self.t1)
        return transaction, [self._send_request(transaction, transaction.request_bytes)]

    def match_client(self, response: Response) -> ClientTransaction | None:
        """The client transaction ``response`` answers, or None (§17.1.3).

        Matches on the top Via branch and the CSeq method. A response whose
        Via or CSeq cannot be parsed matches nothing (a stray to drop).
        """
        try:
            branch = response.top_via.branch
            method = response.cseq.method
        except ParseError:
            return None
        return self._clients.get(("client", branch, method))

    def receive_response(
        self, transaction: ClientTransaction, response: Response, *, now: float
    ) -> list[Send | Event]:
        """Feed a response that ``match_client`` matched to ``transaction``.

        Returns ``ResponseReceived`` for what the TU must see (every 1xx, the
        first final response, 2xx retransmissions in Accepted); for an INVITE
        non-2xx final response, the ACK (``Send``) first. Final response
        retransmissions in Completed are absorbed (INVITE: the ACK is re-sent).
        """
        kind = _input_for_status(response.status_code)
        return self._step(transaction, kind, response, None, now)

    # ------------------------------------------------------------------ both

    def transport_error(
        self, destination: Address, transport: Transport, *, now: float
    ) -> list[Event]:
        """The transport reports ``destination`` unreachable (§17.1.4, §17.2.4).

        Every client transaction sending to it, and every server transaction
        responding to it, in a state that cares, reports ``TransportFailed``;
        all but an INVITE server transaction in Accepted terminate.
        """
        events: list[Event] = []
        for transaction in list(self._by_peer.get((destination, transport), ())):
            for output in self._step(
                transaction, TransactionInput.TRANSPORT_ERROR, None, None, now
            ):
                if not isinstance(output, Send):
                    events.append(output)
        return events

    def next_timer(self) -> float | None:
        """The earliest deadline of any live transaction, or None."""
        return self._timers.next_deadline()

    def handle_timer(self, *, now: float) -> list[Send | Event]:
        """Fire every deadline ``<= now``, in deadline order."""
        outputs: list[Send | Event] = []
        while (due := self._timers.pop_due(now)) is not None:
            transaction, name, _deadline = due
            outputs.extend(self._step(transaction, name, None, name, now))
        return outputs

    def deadlines(
        self, transaction: ServerTransaction | ClientTransaction
    ) -> dict[TimerName, float]:
        """The armed timers of ``transaction`` and their absolute deadlines."""
        return self._timers.deadlines(transaction)

    # ------------------------------------------------------------------ machinery

    def _server_key(self, request: Request, method: str | None) -> TransactionKey:
        via = request.top_via
        method = method or request.method
        branch = via.branch
        if _is_rfc3261_branch(branch):
            port = via.port if via.port is not None else _DEFAULT_PORT
            return ("3261", branch, via.host.lower(), port, method)
        return (
            "2543",
            request.uri,
            request.from_.tag,
            request.call_id,
            request.cseq.number,
            method,
            *_via_identity(via),
        )

    def _step(
        self,
        transaction: _Transaction,
        kind: _Input,
        response: Response | _Outgoing | None,
        timer: TimerName | None,
        now: float,
    ) -> list[Send | Event]:
        """Apply one input: look up the transition, perform its effect, enter the target."""
        transition = _TRANSITIONS.get((transaction.machine, transaction.state, kind))
        if transition is None:
            return []
        target, effect = transition
        outputs = self._perform(transaction, effect, response, timer, now)
        if target is not transaction.state:
            self._enter(transaction, target, now)
        if transaction.state is TransactionState.TERMINATED and not any(
            isinstance(output, (TransactionTimedOut, TransportFailed)) for output in outputs
        ):
            outputs.append(TransactionTerminated(transaction))
        return outputs

    def _perform(
        self,
        transaction: _Transaction,
        effect: _Effect,
        response: Response | _Outgoing | None,
        timer: TimerName | None,
        now: float,
    ) -> list[Send | Event]:
        if effect is _Effect.NOTHING:
            return []
        if effect is _Effect.TIME_OUT:
            assert timer is not None
            return [TransactionTimedOut(transaction, timer)]
        if effect is _Effect.FAIL_TRANSPORT:
            return [TransportFailed(transaction)]
        if isinstance(transaction, ServerTransaction):
            return self._perform_server(transaction, effect, response, now)
        assert not isinstance(response, _Outgoing)
        return self._perform_client(transaction, effect, response, timer, now)

    def _perform_server(
        self,
        transaction: ServerTransaction,
        effect: _Effect,
        response: Response | _Outgoing | None,
        now: float,
    ) -> list[Send | Event]:
        if effect is _Effect.SEND_RESPONSE:
            assert isinstance(response, _Outgoing)
            status, data, to_tag = response
            transaction.last_response = data
            transaction.last_status = status
            if status >= 200 and transaction.key[0] == "2543":
                transaction.final_to_tag = to_tag
            return [self._send_response(transaction, data)]
        if transaction.last_response is None:  # RESEND_* before any response: nothing to re-send
            return []
        if effect is _Effect.RETRANSMIT_RESPONSE:
            # §17.2.1: "reset with a value that is the minimum of 2*T1 and T2" and so on.
            transaction.retransmit_interval = min(2 * transaction.retransmit_interval, self.t2)
            self._timers.arm(transaction, TimerName.G, now + transaction.retransmit_interval)
        return [self._send_response(transaction, transaction.last_response)]

    def _perform_client(
        self,
        transaction: ClientTransaction,
        effect: _Effect,
        response: Response | None,
        timer: TimerName | None,
        now: float,
    ) -> list[Send | Event]:
        if effect is _Effect.RETRANSMIT_REQUEST:
            assert timer is not None
            if timer is TimerName.A:
                # §17.1.1.2: Timer A doubles without a cap (B ends it after 64*T1).
                transaction.retransmit_interval *= 2
            elif transaction.state is TransactionState.PROCEEDING:
                # §17.1.2.2: in Proceeding, Timer E is reset to T2.
                transaction.retransmit_interval = self.t2
            else:
                transaction.retransmit_interval = min(2 * transaction.retransmit_interval, self.t2)
            self._timers.arm(transaction, timer, now + transaction.retransmit_interval)
            return [self._send_request(transaction, transaction.request_bytes)]
        if effect is _Effect.RESEND_ACK:
            assert transaction.ack_bytes is not None
            return [self._send_request(transaction, transaction.ack_bytes)]
        assert response is not None
        transaction.last_status = response.status_code
        outputs: list[Send | Event] = []
        if effect is _Effect.ACK_AND_PASS_UP:
            transaction.ack_bytes = bytes(_make_ack(transaction.request, response))
            outputs.append(self._send_request(transaction, transaction.ack_bytes))
        outputs.append(ResponseReceived(transaction, response))
        return outputs

    def _enter(self, transaction: _Transaction, state: TransactionState, now: float) -> None:
        """Move to ``state`` and arm (or cancel) the timers that state runs."""
        transaction.state = state
        timers = self._timers
        machine = transaction.machine
        reliable = transaction.transport.reliable
        if state is TransactionState.TERMINATED:
            self._remove(transaction)
        elif machine is Machine.INVITE_CLIENT:
            timers.cancel(transaction, TimerName.A)
            timers.cancel(transaction, TimerName.B)
            if state is TransactionState.COMPLETED:
                self._linger(transaction, TimerName.D, max(_TIMER_D_FLOOR, 64 * self.t1), now)
            elif state is TransactionState.ACCEPTED:
                timers.arm(transaction, TimerName.M, now + 64 * self.t1)
        elif machine is Machine.NON_INVITE_CLIENT:
            if state is TransactionState.COMPLETED:
                timers.cancel(transaction, TimerName.E)
                timers.cancel(transaction, TimerName.F)
                self._linger(transaction, TimerName.K, self.t4, now)
        elif machine is Machine.INVITE_SERVER:
            if state is TransactionState.COMPLETED:
                if not reliable:
                    transaction.retransmit_interval = self.t1
                    timers.arm(transaction, TimerName.G, now + self.t1)
                timers.arm(transaction, TimerName.H, now + 64 * self.t1)
            elif state is TransactionState.CONFIRMED:
                timers.cancel(transaction, TimerName.G)
                timers.cancel(transaction, TimerName.H)
                self._linger(transaction, TimerName.I, self.t4, now)
            elif state is TransactionState.ACCEPTED:
                timers.arm(transaction, TimerName.L, now + 64 * self.t1)
        elif state is TransactionState.COMPLETED:  # non-INVITE server
            self._linger(transaction, TimerName.J, 64 * self.t1, now)
            if not reliable:
                assert isinstance(transaction, ServerTransaction)
                self._lingering[transaction] = now

    def _evict_lingering(self, now: float) -> bool:
        """At the bound, end the oldest answered non-INVITE server transaction
        before its Timer J to make room, if it has lingered at least 4*T1;
        False when there is none that old.

        A transaction only absorbing retransmissions is the cheapest thing to
        give up once it has done most of that job: a client whose answer was
        lost retransmits at T1 and 3*T1 after its first send (§17.1.2.2), so by
        4*T1 after our answer it has had the answer re-sent twice. A later
        retransmission is treated as a new request and answered again (a
        REGISTER is challenged or accepted anew, which binds nothing). The
        alternative, refusing new requests with 503 while the table is full of
        such transactions, turned any sustained rate above max_transactions /
        (2 * 64*T1) registrations a second (~300 with the defaults) into
        failures. Younger ones are kept: a flood still meets 503 with
        Retry-After. The bound on memory stays ``max_transactions``."""
        for oldest, since in self._lingering.items():
            if now - since < 4 * self.t1:
                return False
            self.evicted += 1
            self._enter(oldest, TransactionState.TERMINATED, now)  # leaves _lingering
            return True
        return False

    def _linger(
        self, transaction: _Transaction, timer: TimerName, duration: float, now: float
    ) -> None:
        """Arm an absorption timer, or end at once where the RFC sets it to zero (reliable)."""
        if transaction.transport.reliable:
            self._enter(transaction, TransactionState.TERMINATED, now)
        else:
            self._timers.arm(transaction, timer, now + duration)

    def _remove(self, transaction: _Transaction) -> None:
        self._timers.cancel_all(transaction)
        self.removed.append(transaction)
        if isinstance(transaction, ServerTransaction):
            self._servers.pop(transaction.key, None)
            self._lingering.pop(transaction, None)
            peer = (transaction.response_destination, transaction.transport)
        else:
            self._clients.pop(transaction.key, None)
            peer = (transaction.destination, transaction.transport)
        siblings = self._by_peer.get(peer)
        if siblings is not None:
            siblings.pop(transaction, None)
            if not siblings:
                del self._by_peer[peer]

    def _send_response(self, transaction: ServerTransaction, data: bytes) -> Send:
        return Send(
            data=data,
            destination=transaction.response_destination,
            transport=transaction.transport,
            connection=transaction.connection,
        )

    def _send_request(self, transaction: ClientTransaction, data: bytes) -> Send:
        return Send(
            data=data,
            destination=transaction.destination,
            transport=transaction.transport,
            connection=transaction.connection,
        )
