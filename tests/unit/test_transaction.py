"""The four RFC 3261 §17 machines (Figures 5–8) plus RFC 6026's Accepted
state, driven through every transition with a virtual clock."""

from __future__ import annotations

import pytest
from transaction_support import (
    CARRIER,
    CLIENT,
    events,
    request,
    response_to,
    run_timers,
    sends,
)

from sansio_sip._actions import Send
from sansio_sip._errors import LocalProtocolError
from sansio_sip._events import (
    ResponseReceived,
    TransactionTerminated,
    TransactionTimedOut,
    TransportFailed,
)
from sansio_sip._message import Request, make_response, parse_message
from sansio_sip._model import Transport
from sansio_sip._timers import TimerName
from sansio_sip._transaction import (
    ClientTransaction,
    ServerTransaction,
    TransactionLayer,
    TransactionState,
)

T1, T2, T4 = 0.5, 4.0, 5.0
UDP, TCP = Transport.UDP, Transport.TCP


@pytest.fixture
def layer() -> TransactionLayer:
    return TransactionLayer(t1=T1, t2=T2, t4=T4)


def new_client(
    layer: TransactionLayer, method: str = "INVITE", transport: Transport = UDP, **kw: object
) -> tuple[ClientTransaction, list[object]]:
    req = request(method, sent_by="203.0.113.1:5060", transport=transport.value, **kw)  # type: ignore[arg-type]
    transaction, outputs = layer.create_client(
        req,
        destination=CARRIER,
        transport=transport,
        connection=7 if transport is TCP else None,
        now=0.0,
    )
    return transaction, list(outputs)


def new_server(
    layer: TransactionLayer, method: str = "INVITE", transport: Transport = UDP, **kw: object
) -> ServerTransaction:
    req = request(method, transport=transport.value, **kw)  # type: ignore[arg-type]
    layer.stamp_via(req, CLIENT)
    return layer.create_server(
        req, source=CLIENT, transport=transport, connection=3 if transport is TCP else None, now=0.0
    )


def respond(
    layer: TransactionLayer, txn: ServerTransaction, status: int, now: float
) -> list[object]:
    tag = None if status == 100 else "srv"
    return list(layer.respond(txn, make_response(txn.request, status, "X", to_tag=tag), now=now))


# ----------------------------------------------------------------- INVITE client (Figure 5)


def test_invite_client_sends_and_arms_a_and_b(layer: TransactionLayer) -> None:
    txn, outputs = new_client(layer)
    assert txn.state is TransactionState.CALLING
    assert outputs == [Send(data=bytes(txn.request), destination=CARRIER, transport=UDP)]
    assert layer.deadlines(txn) == {TimerName.A: T1, TimerName.B: 64 * T1}
    assert len(layer) == 1


def test_invite_client_lost_request_timer_a_schedule_then_timer_b(layer: TransactionLayer) -> None:
    txn, first = new_client(layer)
    seen = run_timers(layer, 100.0)
    resent = [(t, item) for t, item in seen if isinstance(item, Send)]
    # §17.1.1.2: retransmit at T1, then 2*T1, 4*T1 ... after the previous one, until B.
    assert [t for t, _ in resent] == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert all(item.data == first[0].data for _, item in resent)  # type: ignore[attr-defined]
    assert [(t, e) for t, e in seen if not isinstance(e, Send)] == [
        (32.0, TransactionTimedOut(txn, TimerName.B))
    ]
    assert txn.state is TransactionState.TERMINATED
    assert len(layer) == 0 and layer.next_timer() is None


def test_invite_client_provisional_stops_retransmissions(layer: TransactionLayer) -> None:
    txn, _ = new_client(layer)
    ringing = response_to(txn.request, 180)
    assert layer.match_client(ringing) is txn
    assert layer.receive_response(txn, ringing, now=0.2) == [ResponseReceived(txn, ringing)]
    assert txn.state is TransactionState.PROCEEDING
    assert layer.deadlines(txn) == {}  # A and B stop; the TU's Timer C/CANCEL take over
    again = response_to(txn.request, 183)
    assert layer.receive_response(txn, again, now=1.0) == [ResponseReceived(txn, again)]
    assert run_timers(layer, 1000.0) == []
    assert len(layer) == 1


@pytest.mark.parametrize("via_proceeding", [False, True])
def test_invite_client_failure_sends_ack_and_absorbs_retransmissions(
    layer: TransactionLayer, via_proceeding: bool
) -> None:
    txn, _ = new_client(layer, extra=[("Route", "<sip:proxy.example.com;lr>")])
    if via_proceeding:
        layer.receive_response(txn, response_to(txn.request, 100), now=0.1)
    busy = response_to(txn.request, 486)
    outputs = layer.receive_response(txn, busy, now=0.3)
    assert events(outputs) == [ResponseReceived(txn, busy)]
    [ack_send] = sends(outputs)
    assert outputs[0] is ack_send  # the ACK goes out before the TU hears of the response
    assert (ack_send.destination, ack_send.transport) == (CARRIER, UDP)
    ack = parse_message(ack_send.data)
    assert isinstance(ack, Request)
    # §17.1.1.3: same Request-URI, Call-ID, From, CSeq number and single top Via
    # as the INVITE, To from the response, the INVITE's Route header fields.
    invite = txn.request
    assert (ack.method, ack.uri, ack.call_id) == ("ACK", invite.uri, invite.call_id)
    assert ack.cseq.number == invite.cseq.number and ack.cseq.method == "ACK"
    assert ack.vias == [invite.top_via]
    assert ack.from_ == invite.from_
    assert ack.to == busy.to and ack.to.tag == "ttag1"
    assert ack.headers.get_all("Route") == ["<sip:proxy.example.com;lr>"]
    assert ack.body == b""
    assert txn.state is TransactionState.COMPLETED
    assert layer.deadlines(txn) == {TimerName.D: 0.3 + 32.0}
    # A retransmitted final response is absorbed; the same ACK bytes go out again.
    again = layer.receive_response(txn, response_to(txn.request, 486), now=1.0)
    assert again == [Send(data=ack_send.data, destination=CARRIER, transport=UDP)]
    # Provisional or 2xx strays in Completed are absorbed.
    assert layer.receive_response(txn, response_to(txn.request, 180), now=1.1) == []
    seen = run_timers(layer, 100.0)
    assert seen == [(32.3, TransactionTerminated(txn))]
    assert len(layer) == 0 and layer.match_client(busy) is None


def test_invite_client_2xx_enters_accepted_and_passes_retransmissions_up(
    layer: TransactionLayer,
) -> None:
    txn, _ = new_client(layer)
    ok = response_to(txn.request, 200)
    assert layer.receive_response(txn, ok, now=0.2) == [ResponseReceived(txn, ok)]
    assert txn.state is TransactionState.ACCEPTED
    assert layer.deadlines(txn) == {TimerName.M: 0.2 + 64 * T1}
    # RFC 6026 §7.2: each 2xx retransmission reaches the TU (it re-sends its ACK);
    # the transaction itself never ACKs a 2xx.
    ok_again = response_to(txn.request, 200)
    assert layer.match_client(ok_again) is txn
    assert layer.receive_response(txn, ok_again, now=1.0) == [ResponseReceived(txn, ok_again)]
    # A 2xx from another fork (other To tag) too.
    forked = response_to(txn.request, 200, to_tag="fork2")
    assert layer.receive_response(txn, forked, now=1.5) == [ResponseReceived(txn, forked)]
    assert layer.receive_response(txn, response_to(txn.request, 486), now=2.0) == []
    assert layer.receive_response(txn, response_to(txn.request, 180), now=2.0) == []
    assert run_timers(layer, 100.0) == [(32.2, TransactionTerminated(txn))]
    assert len(layer) == 0


def test_invite_client_reliable_has_no_timer_a_and_zero_timer_d(layer: TransactionLayer) -> None:
    txn, outputs = new_client(layer, transport=TCP)
    assert outputs[0].connection == 7  # type: ignore[attr-defined]
    assert layer.deadlines(txn) == {TimerName.B: 64 * T1}
    busy = response_to(txn.request, 486)
    outputs = layer.receive_response(txn, busy, now=0.3)
    assert [type(o) for o in outputs] == [Send, ResponseReceived, TransactionTerminated]
    assert sends(outputs)[0].connection == 7
    assert txn.state is TransactionState.TERMINATED and len(layer) == 0


def test_invite_client_reliable_timer_b(layer: TransactionLayer) -> None:
    txn, _ = new_client(layer, transport=TCP)
    assert run_timers(layer, 100.0) == [(32.0, TransactionTimedOut(txn, TimerName.B))]


@pytest.mark.parametrize("state_after", ["calling", "proceeding", "completed"])
def test_invite_client_transport_error(layer: TransactionLayer, state_after: str) -> None:
    txn, _ = new_client(layer)
    if state_after != "calling":
        layer.receive_response(txn, response_to(txn.request, 180), now=0.1)
    if state_after == "completed":
        layer.receive_response(txn, response_to(txn.request, 486), now=0.2)
    other, _ = new_client(layer, branch="z9hG4bK-other")
    layer.transport_error(("203.0.113.99", 5060), UDP, now=0.3)  # someone else: no effect
    assert layer.transport_error(CARRIER, UDP, now=0.3) == [
        TransportFailed(txn),
        TransportFailed(other),
    ]
    assert len(layer) == 0 and layer.next_timer() is None


# ----------------------------------------------------------------- non-INVITE client (Figure 6)


def test_non_invite_client_timer_e_schedule_capped_at_t2_then_timer_f(
    layer: TransactionLayer,
) -> None:
    txn, _ = new_client(layer, "BYE", to_tag="tt")
    assert txn.state is TransactionState.TRYING
    assert layer.deadlines(txn) == {TimerName.E: T1, TimerName.F: 64 * T1}
    seen = run_timers(layer, 100.0)
    resent = [t for t, item in seen if isinstance(item, Send)]
    assert resent == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert [e for _, e in seen if not isinstance(e, Send)] == [
        TransactionTimedOut(txn, TimerName.F)
    ]
    assert len(layer) == 0


def test_non_invite_client_proceeding_retransmits_every_t2(layer: TransactionLayer) -> None:
    txn, _ = new_client(layer, "OPTIONS")
    trying = response_to(txn.request, 100)
    assert layer.receive_response(txn, trying, now=0.2) == [ResponseReceived(txn, trying)]
    assert txn.state is TransactionState.PROCEEDING
    # E keeps running in Proceeding (first at T1) and is then reset to T2 (§17.1.2.2).
    seen = run_timers(layer, 20.0)
    assert [t for t, item in seen if isinstance(item, Send)] == [0.5, 4.5, 8.5, 12.5, 16.5]
    again = response_to(txn.request, 180)
    assert layer.receive_response(txn, again, now=17.0) == [ResponseReceived(txn, again)]
    assert run_timers(layer, 100.0)[-1] == (32.0, TransactionTimedOut(txn, TimerName.F))


@pytest.mark.parametrize("status", [200, 404])
@pytest.mark.parametrize("provisional_first", [False, True])
def test_non_invite_client_final_then_timer_k(
    layer: TransactionLayer, status: int, provisional_first: bool
) -> None:
    txn, _ = new_client(layer, "REGISTER")
    if provisional_first:
        layer.receive_response(txn, response_to(txn.request, 100), now=0.1)
    final = response_to(txn.request, status)
    assert layer.receive_response(txn, final, now=0.2) == [ResponseReceived(txn, final)]
    assert txn.state is TransactionState.COMPLETED
    assert layer.deadlines(txn) == {TimerName.K: 0.2 + T4}
    # Final retransmissions and late provisionals are absorbed in Completed.
    assert layer.receive_response(txn, response_to(txn.request, status), now=1.0) == []
    assert layer.receive_response(txn, response_to(txn.request, 100), now=1.0) == []
    assert run_timers(layer, 100.0) == [(5.2, TransactionTerminated(txn))]
    assert len(layer) == 0


def test_non_invite_client_reliable(layer: TransactionLayer) -> None:
    txn, _ = new_client(layer, "BYE", transport=TCP)
    assert layer.deadlines(txn) == {TimerName.F: 64 * T1}  # no Timer E on TCP
    final = response_to(txn.request, 200)
    assert layer.receive_response(txn, final, now=0.2) == [
        ResponseReceived(txn, final),
        TransactionTerminated(txn),  # Timer K is zero on a reliable transport
    ]
    assert len(layer) == 0


def test_non_invite_client_transport_error(layer: TransactionLayer) -> None:
    txn, _ = new_client(layer, "BYE")
    layer.receive_response(txn, response_to(txn.request, 100), now=0.1)
    assert layer.transport_error(CARRIER, UDP, now=0.2) == [TransportFailed(txn)]
    assert layer.transport_error(CARRIER, UDP, now=0.3) == []
    assert len(layer) == 0


# ----------------------------------------------------------------- INVITE server (Figure 7)


def test_invite_server_starts_in_proceeding_and_absorbs_before_any_response(
    layer: TransactionLayer,
) -> None:
    txn = new_server(layer)
    assert txn.state is TransactionState.PROCEEDING
    assert txn.response_destination == CLIENT
    assert layer.deadlines(txn) == {}
    # DESIGN §7: a retransmitted INVITE is absorbed before any TU work.
    retransmission = request()
    layer.stamp_via(retransmission, CLIENT)
    assert layer.match_server(retransmission) is txn
    assert layer.receive_retransmission(txn, retransmission, now=0.1) == []


def test_invite_server_resends_last_provisional_on_retransmission(layer: TransactionLayer) -> None:
    txn = new_server(layer)
    [trying] = respond(layer, txn, 100, 0.0)
    assert isinstance(trying, Send) and trying.destination == CLIENT
    assert layer.receive_retransmission(txn, request(), now=0.4) == [trying]
    [ringing] = respond(layer, txn, 180, 0.5)
    assert layer.receive_retransmission(txn, request(), now=0.9) == [ringing]
    assert txn.last_response == ringing.data  # type: ignore[union-attr]
    assert txn.state is TransactionState.PROCEEDING


def test_invite_server_failure_timer_g_schedule_and_timer_h(layer: TransactionLayer) -> None:
    txn = new_server(layer)
    respond(layer, txn, 100, 0.0)
    [busy] = respond(layer, txn, 486, 1.0)
    assert txn.state is TransactionState.COMPLETED
    assert layer.deadlines(txn) == {TimerName.G: 1.0 + T1, TimerName.H: 1.0 + 64 * T1}
    seen = run_timers(layer, 100.0)
    resent = [(t, s) for t, s in seen if isinstance(s, Send)]
    # §17.2.1: T1, then doubling, capped at T2, until Timer H.
    assert [t for t, _ in resent] == [1.5, 2.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5, 32.5]
    assert all(s == busy for _, s in resent)
    assert [(t, e) for t, e in seen if not isinstance(e, Send)] == [
        (33.0, TransactionTimedOut(txn, TimerName.H))
    ]
    assert len(layer) == 0


def test_invite_server_ack_confirms_then_timer_i(layer: TransactionLayer) -> None:
    txn = new_server(layer)
    [busy] = respond(layer, txn, 486, 0.0)
    # Request retransmission in Completed: the final response again.
    assert layer.receive_retransmission(txn, request(), now=0.2) == [busy]
    ack = request("ACK", to_tag="srv")
    layer.stamp_via(ack, CLIENT)
    assert layer.match_server(ack) is txn
    assert layer.receive_retransmission(txn, ack, now=0.7) == []
    assert txn.state is TransactionState.CONFIRMED
    assert layer.deadlines(txn) == {TimerName.I: 0.7 + T4}  # G and H stop
    # Confirmed absorbs ACK and INVITE retransmissions alike.
    assert layer.receive_retransmission(txn, ack, now=1.0) == []
    assert layer.receive_retransmission(txn, request(), now=1.0) == []
    assert run_timers(layer, 100.0) == [(5.7, TransactionTerminated(txn))]
    assert len(layer) == 0


def test_invite_server_2xx_enters_accepted(layer: TransactionLayer) -> None:
    txn = new_server(layer)
    respond(layer, txn, 180, 0.0)
    [ok] = respond(layer, txn, 200, 1.0)
    assert txn.state is TransactionState.ACCEPTED
    assert layer.deadlines(txn) == {TimerName.L: 1.0 + 64 * T1}
    # RFC 6026 §7.1: INVITE retransmissions are absorbed (the TU re-sends the 2xx);
    # the TU's 2xx retransmissions pass through.
    assert layer.receive_retransmission(txn, request(), now=1.2) == []
    assert respond(layer, txn, 200, 1.5) == [ok]
    # The ACK for a 2xx never matches: it is the TU's (a transaction of its own).
    ack = request("ACK", to_tag="srv")
    layer.stamp_via(ack, CLIENT)
    assert layer.match_server(ack) is None
    assert run_timers(layer, 100.0) == [(33.0, TransactionTerminated(txn))]
    assert len(layer) == 0


@pytest.mark.parametrize(
    ("prior", "status"),
    [
        ([486], 180),
        ([486], 200),
        ([486], 486),
        ([200], 180),
        ([200], 486),
        ([486, "ack"], 200),
    ],
)
def test_invite_server_refuses_responses_the_state_forbids(
    layer: TransactionLayer, prior: list[int | str], status: int
) -> None:
    txn = new_server(layer)
    for step in prior:
        if step == "ack":
            layer.receive_retransmission(txn, request("ACK", to_tag="srv"), now=0.1)
        else:
            respond(layer, txn, int(step), 0.0)
    before = txn.state
    with pytest.raises(LocalProtocolError, match=before.name):
        respond(layer, txn, status, 0.2)
    assert txn.state is before


@pytest.mark.parametrize("status", [99, 700, 0])
def test_respond_rejects_impossible_status(layer: TransactionLayer, status: int) -> None:
    txn = new_server(layer)
    with pytest.raises(LocalProtocolError):
        layer.respond(txn, make_response(txn.request, status, "X"), now=0.0)


def test_invite_server_reliable_no_timer_g_and_zero_timer_i(layer: TransactionLayer) -> None:
    txn = new_server(layer, transport=TCP)
    [busy] = respond(layer, txn, 486, 0.0)
    assert isinstance(busy, Send) and busy.connection == 3 and busy.destination == CLIENT
    assert layer.deadlines(txn) == {TimerName.H: 64 * T1}
    assert layer.receive_retransmission(txn, request("ACK", to_tag="srv"), now=0.1) == [
        TransactionTerminated(txn)
    ]
    assert len(layer) == 0


def test_invite_server_reliable_timer_h(layer: TransactionLayer) -> None:
    txn = new_server(layer, transport=TCP)
    respond(layer, txn, 486, 0.0)
    assert run_timers(layer, 100.0) == [(32.0, TransactionTimedOut(txn, TimerName.H))]


def test_invite_server_transport_error(layer: TransactionLayer) -> None:
    proceeding = new_server(layer)
    completed = new_server(layer, branch="z9hG4bK-2")
    respond(layer, completed, 486, 0.0)
    accepted = new_server(layer, branch="z9hG4bK-3")
    respond(layer, accepted, 200, 0.0)
    assert layer.transport_error(CLIENT, UDP, now=0.1) == [
        TransportFailed(proceeding),
        TransportFailed(completed),
        TransportFailed(accepted),
    ]
    # RFC 6026 §7.1: Accepted informs the TU and stays (the TU may still succeed).
    assert len(layer) == 1 and accepted.state is TransactionState.ACCEPTED


# ----------------------------------------------------------------- non-INVITE server (Figure 8)


def test_non_invite_server_trying_absorbs_then_proceeding_resends(layer: TransactionLayer) -> None:
    txn = new_server(layer, "REGISTER")
    assert txn.state is TransactionState.TRYING
    assert layer.receive_retransmission(txn, request("REGISTER"), now=0.1) == []
    [trying] = respond(layer, txn, 100, 0.2)
    assert txn.state is TransactionState.PROCEEDING
    assert layer.receive_retransmission(txn, request("REGISTER"), now=0.3) == [trying]
    respond(layer, txn, 180, 0.4)
    assert txn.state is TransactionState.PROCEEDING


@pytest.mark.parametrize("status", [200, 401, 503])
@pytest.mark.parametrize("provisional_first", [False, True])
def test_non_invite_server_final_then_timer_j(
    layer: TransactionLayer, status: int, provisional_first: bool
) -> None:
    txn = new_server(layer, "OPTIONS")
    if provisional_first:
        respond(layer, txn, 100, 0.0)
    [final] = respond(layer, txn, status, 1.0)
    assert txn.state is TransactionState.COMPLETED
    assert layer.deadlines(txn) == {TimerName.J: 1.0 + 64 * T1}
    assert layer.receive_retransmission(txn, request("OPTIONS"), now=2.0) == [final]
    with pytest.raises(LocalProtocolError, match="COMPLETED"):
        respond(layer, txn, 200, 2.0)
    assert run_timers(layer, 100.0) == [(33.0, TransactionTerminated(txn))]
    assert len(layer) == 0


def test_non_invite_server_reliable_terminates_on_final(layer: TransactionLayer) -> None:
    txn = new_server(layer, "BYE", transport=TCP, to_tag="tt")
    outputs = respond(layer, txn, 200, 0.0)
    assert [type(o) for o in outputs] == [Send, TransactionTerminated]
    assert len(layer) == 0 and layer.next_timer() is None
    with pytest.raises(LocalProtocolError, match="TERMINATED"):
        respond(layer, txn, 200, 0.1)


def test_non_invite_server_transport_error(layer: TransactionLayer) -> None:
    trying = new_server(layer, "OPTIONS")
    proceeding = new_server(layer, "OPTIONS", branch="z9hG4bK-p")
    respond(layer, proceeding, 100, 0.0)
    completed = new_server(layer, "OPTIONS", branch="z9hG4bK-c")
    respond(layer, completed, 200, 0.0)
    assert layer.transport_error(CLIENT, UDP, now=0.1) == [
        TransportFailed(proceeding),
        TransportFailed(completed),
    ]
    assert len(layer) == 1 and trying.state is TransactionState.TRYING


# ----------------------------------------------------------------- layer-wide


def test_responses_are_serialised_once(layer: TransactionLayer) -> None:
    txn = new_server(layer)
    response = make_response(txn.request, 486, "Busy Here", to_tag="x")
    [sent] = layer.respond(txn, response, now=0.0)
    response.headers.add("X-Late", "mutation")  # later changes must not leak into retransmissions
    [again] = layer.receive_retransmission(txn, request(), now=0.1)
    assert again == sent and b"X-Late" not in again.data  # type: ignore[union-attr]


def test_next_timer_is_the_earliest_deadline(layer: TransactionLayer) -> None:
    assert layer.next_timer() is None
    invite, _ = new_client(layer)
    bye, _ = new_client(layer, "BYE", branch="z9hG4bK-bye")
    layer.receive_response(bye, response_to(bye.request, 200), now=0.1)
    server = new_server(layer)
    respond(layer, server, 486, 0.2)
    expected = min(d for t in (invite, bye, server) for d in layer.deadlines(t).values())
    assert layer.next_timer() == expected == T1


def test_handle_timer_fires_in_deadline_order(layer: TransactionLayer) -> None:
    late, _ = new_client(layer, "BYE", branch="z9hG4bK-late")
    early = new_server(layer)
    respond(layer, early, 486, -0.3)  # Timer G at 0.2, before the client's Timer E at 0.5
    outputs = layer.handle_timer(now=0.6)
    assert [s.destination for s in sends(outputs)] == [CLIENT, CARRIER]
    assert late.state is TransactionState.TRYING


def test_invalid_tunables() -> None:
    with pytest.raises(ValueError):
        TransactionLayer(t1=0)
    with pytest.raises(ValueError):
        TransactionLayer(max_transactions=0)
