"""Every (machine, state, input) of the four machines, exhaustively.

Each state is reached along a real path (create, respond, receive), the input
is applied through the public API, and the outcome is compared with the
transition table: the table's rows must behave as written, and every pair
missing from the table must be absorbed (wire), ignored (timer, transport
error) or refused with LocalProtocolError (a response from the TU)."""

from __future__ import annotations

import itertools

import pytest
from transaction_support import CARRIER, CLIENT, request, response_to, run_timers

from sansio_sip._actions import Send
from sansio_sip._dialog import make_cancel
from sansio_sip._errors import LocalProtocolError
from sansio_sip._events import (
    ResponseReceived,
    TransactionTerminated,
    TransactionTimedOut,
    TransportFailed,
)
from sansio_sip._message import make_response, parse_message
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
    _Effect,
)

S = TransactionState
I = TransactionInput  # noqa: E741

# How to reach each state of each machine from creation: a list of inputs.
PATHS: dict[Machine, dict[TransactionState, list[int | str]]] = {
    Machine.INVITE_CLIENT: {
        S.CALLING: [],
        S.PROCEEDING: [180],
        S.COMPLETED: [486],
        S.ACCEPTED: [200],
    },
    Machine.NON_INVITE_CLIENT: {S.TRYING: [], S.PROCEEDING: [100], S.COMPLETED: [200]},
    Machine.INVITE_SERVER: {
        S.PROCEEDING: [],
        S.COMPLETED: [486],
        S.CONFIRMED: [486, "ack"],
        S.ACCEPTED: [200],
    },
    Machine.NON_INVITE_SERVER: {S.TRYING: [], S.PROCEEDING: [100], S.COMPLETED: [200]},
}
STATUS_FOR = {I.PROVISIONAL: 180, I.SUCCESS: 200, I.FAILURE: 486}
INPUTS: list[TransactionInput | TimerName] = [*TransactionInput, *TimerName]
_ZERO_ON_RELIABLE = {
    (Machine.INVITE_CLIENT, S.COMPLETED),
    (Machine.NON_INVITE_CLIENT, S.COMPLETED),
    (Machine.INVITE_SERVER, S.CONFIRMED),
    (Machine.NON_INVITE_SERVER, S.COMPLETED),
}


def _setup(
    machine: Machine, state: TransactionState, transport: Transport
) -> tuple[TransactionLayer, ServerTransaction | ClientTransaction]:
    layer = TransactionLayer()
    method = "INVITE" if machine in (Machine.INVITE_CLIENT, Machine.INVITE_SERVER) else "OPTIONS"
    if machine in (Machine.INVITE_CLIENT, Machine.NON_INVITE_CLIENT):
        req = request(method, transport=transport.value, sent_by="203.0.113.1:5060")
        client, _ = layer.create_client(req, destination=CARRIER, transport=transport, now=0.0)
        for status in PATHS[machine][state]:
            layer.receive_response(client, response_to(req, int(status)), now=0.1)
        return layer, client
    req = request(method, transport=transport.value)
    layer.stamp_via(req, CLIENT)
    server = layer.create_server(req, source=CLIENT, transport=transport, connection=None, now=0.0)
    for step in PATHS[machine][state]:
        if step == "ack":
            layer.receive_retransmission(server, request("ACK", to_tag="uas"), now=0.1)
        else:
            response = make_response(req, int(step), "X", to_tag="uas")
            layer.respond(server, response, now=0.1)
    return layer, server


def _apply(
    layer: TransactionLayer,
    txn: ServerTransaction | ClientTransaction,
    kind: TransactionInput | TimerName,
) -> list[object]:
    """Apply ``kind`` through the public API, as the engine would."""
    if isinstance(kind, TimerName):
        deadline = layer.deadlines(txn).get(kind)
        if deadline is None:
            return []  # not armed in this state: cannot fire
        return [item for when, item in run_timers(layer, deadline) if when == deadline]
    if kind is I.TRANSPORT_ERROR:
        peer = txn.destination if isinstance(txn, ClientTransaction) else txn.response_destination
        return list(layer.transport_error(peer, txn.transport, now=0.5))
    if isinstance(txn, ClientTransaction):
        if kind in (I.REQUEST, I.ACK):
            return []  # a client transaction never receives requests
        return list(
            layer.receive_response(txn, response_to(txn.request, STATUS_FOR[kind]), now=0.5)
        )
    if kind is I.REQUEST:
        return list(layer.receive_retransmission(txn, request(txn.method), now=0.5))
    if kind is I.ACK:
        if txn.machine is not Machine.INVITE_SERVER:
            return []  # an ACK only ever matches an INVITE transaction
        return list(layer.receive_retransmission(txn, request("ACK", to_tag="uas"), now=0.5))
    response = make_response(txn.request, STATUS_FOR[kind], "X", to_tag="uas")
    return list(layer.respond(txn, response, now=0.5))


CASES = [
    (machine, state, kind, transport)
    for machine, states in PATHS.items()
    for state, kind, transport in itertools.product(states, INPUTS, list(Transport))
]


@pytest.mark.parametrize(
    ("machine", "state", "kind", "transport"),
    CASES,
    ids=[f"{m.name}-{s.name}-{k.name}-{t.name}" for m, s, k, t in CASES],
)
def test_every_state_and_input(
    machine: Machine,
    state: TransactionState,
    kind: TransactionInput | TimerName,
    transport: Transport,
) -> None:
    layer, txn = _setup(machine, state, transport)
    if txn.state is not state:
        # Reliable transports skip Completed/Confirmed (zero timers): nothing to test there.
        assert transport.reliable and (machine, state) in _ZERO_ON_RELIABLE
        assert txn.state is S.TERMINATED
        return
    transition = _TRANSITIONS.get((machine, state, kind))
    is_tu_response = isinstance(txn, ServerTransaction) and kind in STATUS_FOR
    if transition is None:
        if is_tu_response:
            with pytest.raises(LocalProtocolError, match=state.name):
                _apply(layer, txn, kind)
        else:
            assert _apply(layer, txn, kind) == []
            # A timer missing from the table is never armed in that state.
            assert not (isinstance(kind, TimerName) and kind in layer.deadlines(txn))
        assert txn.state is state
        return
    target, effect = transition
    if (machine, state, kind) == (Machine.INVITE_CLIENT, S.PROCEEDING, TimerName.B):
        # §9.1: this Timer B is armed only by the TU's CANCEL of the INVITE.
        assert kind not in layer.deadlines(txn)
        assert isinstance(txn, ClientTransaction)
        cancel = make_cancel(txn.request, user_agent="test")
        cancelling, _ = layer.create_client(
            cancel, destination=txn.destination, transport=transport, now=0.0
        )
        # The CANCEL itself is answered (its Timer F must not fire with B).
        layer.receive_response(cancelling, response_to(cancel, 200), now=0.1)
    if isinstance(kind, TimerName) and kind not in layer.deadlines(txn):
        # Listed timers that reliable transports never arm (A, E, G).
        assert transport.reliable and kind in (TimerName.A, TimerName.E, TimerName.G)
        return
    outputs = _apply(layer, txn, kind)
    expected = target
    if transport.reliable and (machine, target) in _ZERO_ON_RELIABLE and target is not state:
        expected = S.TERMINATED
    assert txn.state is expected
    sent = [o for o in outputs if isinstance(o, Send)]
    told = [o for o in outputs if not isinstance(o, Send)]
    if effect is _Effect.SEND_RESPONSE:
        assert isinstance(txn, ServerTransaction) and [s.data for s in sent] == [txn.last_response]
    elif effect in (_Effect.RESEND_RESPONSE, _Effect.RETRANSMIT_RESPONSE):
        assert isinstance(txn, ServerTransaction)
        assert [s.data for s in sent] == ([txn.last_response] if txn.last_response else [])
    elif effect is _Effect.RETRANSMIT_REQUEST:
        assert isinstance(txn, ClientTransaction) and [s.data for s in sent] == [txn.request_bytes]
    elif effect is _Effect.ACK_AND_PASS_UP:
        assert isinstance(txn, ClientTransaction)
        [ack] = sent
        assert ack.data == txn.ack_bytes and parse_message(ack.data).method == "ACK"  # type: ignore[union-attr]
        assert isinstance(outputs[1], ResponseReceived)
    elif effect is _Effect.RESEND_ACK:
        assert isinstance(txn, ClientTransaction) and [s.data for s in sent] == [txn.ack_bytes]
    else:
        assert sent == []
    if effect in (_Effect.PASS_UP, _Effect.ACK_AND_PASS_UP):
        assert isinstance(told[0], ResponseReceived)
    if effect is _Effect.TIME_OUT:
        assert told == [TransactionTimedOut(txn, kind)]  # type: ignore[arg-type]
    elif effect is _Effect.FAIL_TRANSPORT:
        assert told == [TransportFailed(txn)]
    elif expected is S.TERMINATED and state is not S.TERMINATED:
        assert told[-1] == TransactionTerminated(txn)
    else:
        assert not [t for t in told if not isinstance(t, ResponseReceived)]
    if expected is S.TERMINATED:
        assert len(layer) == 0 and layer.deadlines(txn) == {}


def test_every_table_row_is_reachable() -> None:
    # The paths above reach every state the table mentions, so every row is exercised.
    for machine, state, _kind in _TRANSITIONS:
        assert state in PATHS[machine]
