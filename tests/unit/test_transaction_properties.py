"""Properties of the transaction layer (hypothesis) and a back-to-back test:
a client layer wired to a server layer in memory, with simulated loss."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transaction_support import CARRIER, CLIENT, request, response_to

from sansio_sip._actions import Send
from sansio_sip._errors import LocalProtocolError, ParseError
from sansio_sip._events import (
    ResponseReceived,
    TransactionTerminated,
    TransactionTimedOut,
    TransportFailed,
)
from sansio_sip._message import Request, Response, make_response, parse_message
from sansio_sip._model import Transport
from sansio_sip._timers import TimerName
from sansio_sip._transaction import (
    _TRANSITIONS,
    ClientTransaction,
    Machine,
    ServerTransaction,
    TransactionInput,
    TransactionLayer,
    TransactionState,
)

T1, T2, T4 = 0.5, 4.0, 5.0
_TERMINAL = (TransactionTimedOut, TransportFailed, TransactionTerminated)
_STATUSES = [100, 180, 183, 200, 202, 302, 404, 486, 503, 603]
_ZERO_ON_RELIABLE = {
    (Machine.INVITE_CLIENT, TransactionState.COMPLETED),
    (Machine.NON_INVITE_CLIENT, TransactionState.COMPLETED),
    (Machine.INVITE_SERVER, TransactionState.CONFIRMED),
    (Machine.NON_INVITE_SERVER, TransactionState.COMPLETED),
}


def _kind(status: int) -> TransactionInput:
    if status < 200:
        return TransactionInput.PROVISIONAL
    return TransactionInput.SUCCESS if status < 300 else TransactionInput.FAILURE


def _expected_state(
    txn: ServerTransaction | ClientTransaction, before: TransactionState, kind: object
) -> TransactionState:
    """What the table says the state must be after ``kind`` in ``before``."""
    transition = _TRANSITIONS.get((txn.machine, before, kind))  # type: ignore[arg-type]
    if transition is None:
        return before
    target = transition[0]
    if (
        txn.transport.reliable
        and (txn.machine, target) in _ZERO_ON_RELIABLE
        and target is not before
    ):
        return TransactionState.TERMINATED  # the RFC's zero timer: gone at once
    return target


def _check_invariants(
    layer: TransactionLayer, txn: ServerTransaction | ClientTransaction, now: float
) -> None:
    deadlines = layer.deadlines(txn)
    # Deadlines never move backwards: whatever is armed lies in the future.
    assert all(deadline > now for deadline in deadlines.values())
    # next_timer is the minimum over live deadlines.
    assert layer.next_timer() == (min(deadlines.values()) if deadlines else None)
    if txn.state is TransactionState.TERMINATED:
        assert len(layer) == 0 and not deadlines
    else:
        assert len(layer) == 1


def _check_terminal_events(
    txn: ServerTransaction | ClientTransaction, before: TransactionState, outputs: list[object]
) -> None:
    """A transaction is reported gone exactly once, in the step it ends."""
    terminal = [o for o in outputs if isinstance(o, _TERMINAL)]
    if txn.state is TransactionState.TERMINATED and before is not TransactionState.TERMINATED:
        assert len(terminal) == 1
    else:
        assert not [o for o in terminal if not isinstance(o, TransportFailed)]
        assert all(txn.state is TransactionState.ACCEPTED for o in terminal)


_server_steps = st.lists(
    st.one_of(
        st.tuples(st.just("respond"), st.sampled_from(_STATUSES)),
        st.tuples(st.just("retransmit")),
        st.tuples(st.just("ack")),
        st.tuples(st.just("advance"), st.sampled_from([0.1, 0.5, 1.0, 4.0, 5.0, 10.0, 40.0])),
        st.tuples(st.just("transport_error")),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["INVITE", "OPTIONS"]),
    transport=st.sampled_from(list(Transport)),
    steps=_server_steps,
)
def test_server_machines_transition_legally_or_raise(
    method: str, transport: Transport, steps: list[tuple[object, ...]]
) -> None:
    layer = TransactionLayer(t1=T1, t2=T2, t4=T4)
    req = request(method, transport=transport.value)
    layer.stamp_via(req, CLIENT)
    txn = layer.create_server(req, source=CLIENT, transport=transport, connection=1, now=0.0)
    now = 0.0
    for step in steps:
        before = txn.state
        outputs: list[object] = []
        if step[0] == "respond":
            status = int(step[1])  # type: ignore[call-overload]
            response = make_response(req, status, "X", to_tag=None if status == 100 else "srv")
            legal = (txn.machine, before, _kind(status)) in _TRANSITIONS
            try:
                outputs = list(layer.respond(txn, response, now=now))
            except LocalProtocolError as error:
                assert not legal and before.name in error.reason
                assert txn.state is before
                continue
            assert legal
            assert next(o for o in outputs if isinstance(o, Send)).data == bytes(response)
            assert txn.state is _expected_state(txn, before, _kind(status))
        elif step[0] in ("retransmit", "ack"):
            incoming = (
                request(method, transport=transport.value) if step[0] == "retransmit" else None
            )
            if incoming is None:
                if method != "INVITE":
                    continue
                incoming = request("ACK", transport=transport.value, to_tag="srv")
            layer.stamp_via(incoming, CLIENT)
            matched = layer.match_server(incoming)
            if matched is None:
                # Only a terminated transaction, or an ACK for a 2xx, goes unmatched.
                assert before is TransactionState.TERMINATED or (
                    step[0] == "ack" and before is TransactionState.ACCEPTED
                )
                continue
            assert matched is txn
            kind = TransactionInput.REQUEST if step[0] == "retransmit" else TransactionInput.ACK
            outputs = list(layer.receive_retransmission(txn, incoming, now=now))
            assert txn.state is _expected_state(txn, before, kind)
            # Whatever is re-sent is the last response, byte for byte.
            assert all(o.data == txn.last_response for o in outputs if isinstance(o, Send))
        elif step[0] == "advance":
            now += float(step[1])  # type: ignore[arg-type]
            outputs = list(layer.handle_timer(now=now))
        else:
            outputs = list(layer.transport_error(CLIENT, transport, now=now))
            assert txn.state is _expected_state(txn, before, TransactionInput.TRANSPORT_ERROR)
        _check_terminal_events(txn, before, outputs)
        _check_invariants(layer, txn, now)


_client_steps = st.lists(
    st.one_of(
        st.tuples(st.just("response"), st.sampled_from(_STATUSES)),
        st.tuples(st.just("advance"), st.sampled_from([0.1, 0.5, 1.0, 4.0, 5.0, 10.0, 40.0])),
        st.tuples(st.just("transport_error")),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["INVITE", "BYE"]),
    transport=st.sampled_from(list(Transport)),
    steps=_client_steps,
)
def test_client_machines_transition_legally(
    method: str, transport: Transport, steps: list[tuple[object, ...]]
) -> None:
    layer = TransactionLayer(t1=T1, t2=T2, t4=T4)
    req = request(method, transport=transport.value, sent_by="203.0.113.1:5060")
    txn, _ = layer.create_client(req, destination=CARRIER, transport=transport, now=0.0)
    now = 0.0
    final_seen = False
    for step in steps:
        before = txn.state
        if step[0] == "response":
            status = int(step[1])  # type: ignore[call-overload]
            response = response_to(req, status)
            if before is TransactionState.TERMINATED:
                assert layer.match_client(response) is None
                continue
            assert layer.match_client(response) is txn
            outputs = list(layer.receive_response(txn, response, now=now))
            assert txn.state is _expected_state(txn, before, _kind(status))
            passed_up = [o for o in outputs if isinstance(o, ResponseReceived)]
            if status >= 200 and passed_up:
                # Only one final reaches the TU, except RFC 6026 2xx retransmissions.
                assert not final_seen or (method == "INVITE" and 200 <= status < 300)
                final_seen = True
        elif step[0] == "advance":
            now += float(step[1])  # type: ignore[arg-type]
            outputs = list(layer.handle_timer(now=now))
        else:
            outputs = list(layer.transport_error(CARRIER, transport, now=now))
            assert txn.state is _expected_state(txn, before, TransactionInput.TRANSPORT_ERROR)
        _check_terminal_events(txn, before, outputs)
        _check_invariants(layer, txn, now)


@pytest.mark.parametrize(
    ("machine", "state", "kind"),
    sorted(
        ((m, s, k) for (m, s, k) in _TRANSITIONS),
        key=lambda key: (key[0].value, key[1].value, str(key[2])),
    ),
)
def test_table_targets_exist_in_the_machine(
    machine: Machine, state: TransactionState, kind: object
) -> None:
    # Every target state is a state of that machine, and Terminated is final.
    target, _effect = _TRANSITIONS[(machine, state, kind)]  # type: ignore[index]
    states_of_machine = {s for (m, s, _k) in _TRANSITIONS if m is machine} | {
        TransactionState.TERMINATED
    }
    assert target in states_of_machine
    assert state is not TransactionState.TERMINATED
    if isinstance(kind, TimerName):
        # A timer only moves a machine that arms it.
        assert (
            kind
            in {
                Machine.INVITE_CLIENT: {TimerName.A, TimerName.B, TimerName.D, TimerName.M},
                Machine.NON_INVITE_CLIENT: {TimerName.E, TimerName.F, TimerName.K},
                Machine.INVITE_SERVER: {TimerName.G, TimerName.H, TimerName.I, TimerName.L},
                Machine.NON_INVITE_SERVER: {TimerName.J},
            }[machine]
        )


# ----------------------------------------------------------------- back to back

SERVER_ADDRESS = ("192.0.2.200", 5060)
LATENCY = 0.03


@dataclass
class _Pair:
    """A client layer and a server layer joined by a lossy in-memory wire,
    each with a tiny TU that records what it sees."""

    method: str
    final_status: int
    drop_to_server: list[bool]
    drop_to_client: list[bool]
    client: TransactionLayer = field(default_factory=TransactionLayer)
    server: TransactionLayer = field(default_factory=TransactionLayer)
    wire: list[tuple[float, int, str, bytes]] = field(default_factory=list)
    tu_jobs: list[tuple[float, int, str]] = field(default_factory=list)
    sequence: itertools.count[int] = field(default_factory=itertools.count)
    client_finals: list[Response] = field(default_factory=list)
    client_events: list[object] = field(default_factory=list)
    server_requests: list[Request] = field(default_factory=list)
    server_events: list[object] = field(default_factory=list)
    server_acks_for_2xx: int = 0
    strays: int = 0
    server_txn: ServerTransaction | None = None
    final_response: Response | None = None
    retransmit_2xx_interval: float = T1

    def send(self, item: Send, to: str) -> None:
        drops = self.drop_to_server if to == "server" else self.drop_to_client
        if drops and drops.pop(0):
            return
        heapq.heappush(self.wire, (self.now + LATENCY, next(self.sequence), to, item.data))

    now: float = 0.0

    def outputs(self, items: list[object], side: str) -> None:
        for item in items:
            if isinstance(item, Send):
                self.send(item, "client" if side == "server" else "server")
            elif side == "client":
                self.client_event(item)
            else:
                self.server_events.append(item)

    def client_event(self, event: object) -> None:
        self.client_events.append(event)
        if isinstance(event, ResponseReceived) and event.response.status_code >= 200:
            self.client_finals.append(event.response)
            if self.method == "INVITE" and event.response.status_code < 300:
                self.send_ack_for_2xx(event.response)

    def send_ack_for_2xx(self, ok: Response) -> None:
        # §13.2.2.4: the TU's own ACK, a new branch, not through a transaction.
        ack = request("ACK", branch="z9hG4bK-ack-2xx", to_tag=ok.to.tag)
        self.send(
            Send(data=bytes(ack), destination=SERVER_ADDRESS, transport=Transport.UDP), "server"
        )

    def server_receive(self, data: bytes) -> None:
        message = parse_message(data)
        assert isinstance(message, Request)
        self.server.stamp_via(message, CLIENT)
        matched = self.server.match_server(message)
        if matched is not None:
            self.outputs(
                list(self.server.receive_retransmission(matched, message, now=self.now)), "server"
            )
            return
        if message.method == "ACK":
            self.server_acks_for_2xx += 1
            return
        self.server_requests.append(message)
        txn = self.server.create_server(
            message, source=CLIENT, transport=Transport.UDP, connection=None, now=self.now
        )
        self.server_txn = txn
        if self.method == "INVITE":
            self.respond(100)
        heapq.heappush(self.tu_jobs, (self.now + 0.2, next(self.sequence), "final"))

    def respond(self, status: int) -> None:
        assert self.server_txn is not None
        response = make_response(
            self.server_txn.request, status, "X", to_tag=None if status == 100 else "uas"
        )
        if status >= 200:
            self.final_response = response
        self.outputs(list(self.server.respond(self.server_txn, response, now=self.now)), "server")

    def run_tu_job(self, job: str) -> None:
        txn = self.server_txn
        assert txn is not None
        if job == "final":
            self.respond(self.final_status)
            if self.method == "INVITE" and self.final_status < 300:
                heapq.heappush(self.tu_jobs, (self.now + T1, next(self.sequence), "2xx"))
        elif (
            job == "2xx" and txn.state is TransactionState.ACCEPTED and not self.server_acks_for_2xx
        ):
            # RFC 3261 §13.3.1.4: the UAS core re-sends its 2xx until the ACK comes.
            assert self.final_response is not None
            self.outputs(
                list(self.server.respond(txn, self.final_response, now=self.now)), "server"
            )
            self.retransmit_2xx_interval = min(2 * self.retransmit_2xx_interval, T2)
            heapq.heappush(
                self.tu_jobs, (self.now + self.retransmit_2xx_interval, next(self.sequence), "2xx")
            )

    def client_receive(self, data: bytes) -> None:
        message = parse_message(data)
        assert isinstance(message, Response)
        matched = self.client.match_client(message)
        if matched is None:
            self.strays += 1
            return
        self.outputs(list(self.client.receive_response(matched, message, now=self.now)), "client")

    def run(self) -> None:
        req = request(self.method, branch="z9hG4bK-b2b", sent_by="192.0.2.10:5070")
        _txn, items = self.client.create_client(
            req, destination=SERVER_ADDRESS, transport=Transport.UDP, now=0.0
        )
        self.outputs(list(items), "client")
        for _ in range(5_000):  # bounded whatever happens
            candidates = [
                (t, kind)
                for t, kind in (
                    (self.wire[0][0] if self.wire else None, "wire"),
                    (self.tu_jobs[0][0] if self.tu_jobs else None, "tu"),
                    (self.client.next_timer(), "client-timer"),
                    (self.server.next_timer(), "server-timer"),
                )
                if t is not None
            ]
            if not candidates:
                return
            when, kind = min(candidates)
            assert when >= self.now  # virtual time never runs backwards
            self.now = when
            if kind == "wire":
                _t, _n, to, data = heapq.heappop(self.wire)
                (self.server_receive if to == "server" else self.client_receive)(data)
            elif kind == "tu":
                self.run_tu_job(heapq.heappop(self.tu_jobs)[2])
            elif kind == "client-timer":
                self.outputs(list(self.client.handle_timer(now=when)), "client")
            else:
                self.outputs(list(self.server.handle_timer(now=when)), "server")
        raise AssertionError("simulation did not settle")


@settings(max_examples=80, deadline=None)
@given(
    scenario=st.sampled_from([("OPTIONS", 200), ("BYE", 481), ("INVITE", 486), ("INVITE", 200)]),
    drop_to_server=st.lists(st.booleans(), max_size=12),
    drop_to_client=st.lists(st.booleans(), max_size=12),
)
def test_back_to_back_each_tu_sees_one_final_despite_loss(
    scenario: tuple[str, int], drop_to_server: list[bool], drop_to_client: list[bool]
) -> None:
    method, status = scenario
    pair = _Pair(method, status, list(drop_to_server), list(drop_to_client))
    pair.run()
    # The server TU sees the request at most once: retransmissions are absorbed.
    assert len(pair.server_requests) <= 1
    timeouts = [e for e in pair.client_events if isinstance(e, TransactionTimedOut)]
    # The client TU sees exactly one final response, or one timeout.
    distinct = {(r.status_code, r.to.tag) for r in pair.client_finals}
    assert len(distinct) + len(timeouts) == 1
    if distinct:
        assert distinct == {(status, "uas")}
        # More than one delivery only for RFC 6026 2xx retransmissions in Accepted.
        assert len(pair.client_finals) == 1 or (method == "INVITE" and status == 200)
        assert pair.server_requests
    # Both layers end empty once their timers ran out.
    assert len(pair.client) == 0 and len(pair.server) == 0
    if method == "INVITE" and status == 486 and pair.server_txn is not None:
        # Either the ACK arrived (Confirmed → Timer I) or Timer H gave up on it.
        server_timeouts = [e for e in pair.server_events if isinstance(e, TransactionTimedOut)]
        assert all(e.timer is TimerName.H for e in server_timeouts)
        assert len(server_timeouts) <= 1


def test_back_to_back_without_loss_is_minimal() -> None:
    pair = _Pair("INVITE", 486, [], [])
    pair.run()
    assert [r.status_code for r in pair.client_finals] == [486]
    assert len(pair.server_requests) == 1 and pair.strays == 0
    # The server saw the ACK: it ended through Timer I, not Timer H.
    assert [type(e) for e in pair.server_events] == [TransactionTerminated]


def test_back_to_back_lost_final_is_recovered_by_timer_g() -> None:
    # 100 Trying delivered, the 486 lost twice: Timer G brings it through.
    pair = _Pair("INVITE", 486, [], [False, True, True])
    pair.run()
    assert [r.status_code for r in pair.client_finals] == [486]
    assert [type(e) for e in pair.server_events] == [TransactionTerminated]


def test_back_to_back_total_loss_times_out_with_timer_b() -> None:
    pair = _Pair("INVITE", 486, [True] * 7, [])
    pair.run()
    assert pair.server_requests == []
    assert [(type(e), getattr(e, "timer", None)) for e in pair.client_events] == [
        (TransactionTimedOut, TimerName.B)
    ]


# ----------------------------------------------------------------- hostile Via values

_param = st.one_of(
    st.tuples(
        st.sampled_from(["received", "RECEIVED"]), st.sampled_from(["1.2.3.4", "::1", "", "x"])
    ),
    st.tuples(
        st.sampled_from(["rport", "Rport"]),
        st.sampled_from(["", "0", "1", "65535", "99999", "-1", "a"]),
    ),
    st.tuples(st.just("maddr"), st.sampled_from(["239.0.0.1", "", "host.example"])),
    st.tuples(st.just("branch"), st.sampled_from(["z9hG4bK", "z9hG4bK-1", "abc", ""])),
)


@settings(max_examples=200, deadline=None)
@given(
    host=st.sampled_from(["192.0.2.10", "[2001:db8::1]", "client.example.com", "10.0.0.1"]),
    port=st.one_of(st.none(), st.integers(0, 70_000)),
    params=st.lists(_param, max_size=5),
    transport=st.sampled_from(list(Transport)),
)
def test_any_parsed_via_is_stamped_and_answered_or_refused_with_parse_error(
    host: str, port: int | None, params: list[tuple[str, str]], transport: Transport
) -> None:
    via = f"SIP/2.0/{transport.value} {host}" + (f":{port}" if port is not None else "")
    via += "".join(f";{name}" + (f"={value}" if value else "") for name, value in params)
    try:
        req = request("OPTIONS", via=via)
    except ParseError:
        return  # the parser refused it: the engine answers 400
    for force_rport in (True, False):
        layer = TransactionLayer(force_rport=force_rport)
        try:
            layer.stamp_via(req, CLIENT)
            txn = layer.create_server(
                req, source=CLIENT, transport=transport, connection=None, now=0.0
            )
        except ParseError:
            continue
        [sent] = [
            o
            for o in layer.respond(txn, make_response(req, 200, "OK"), now=0.0)
            if isinstance(o, Send)
        ]
        assert 0 < sent.destination[1] < 65536
        if force_rport and transport is Transport.UDP and req.top_via.maddr is None:
            assert sent.destination == CLIENT  # symmetric response routing, whatever the Via said
