"""Finished calls and registrations leave no reference cycles behind.

kx-sipd serve runs the cyclic collector rarely (kx_sipd/app.py raises its
thresholds once the server is up), so whatever the engine leaves as cyclic
garbage piles up between collections. Calls and their transactions point at
each other while they work; the engine must undo those links once a
transaction is finished, so that reference counting alone frees a call."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from engine_harness import (
    ANSWER,
    CARRIER,
    CLIENT,
    OFFER,
    Harness,
    Phone,
    account,
    ack_for_failure,
    answer,
    requests_to,
    responses_to,
)

from sansio_sip._message import Request, Response

DIGITS = "17752180264"


@pytest.fixture
def collector_paused() -> Iterator[None]:
    """No automatic collection during the test; garbage kept for inspection."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


def _ack_2xx(request: Request, response: Response, branch: str) -> Request:
    """The client's ACK for a 2xx: a new transaction (§13.2.2.4)."""
    return Request("ACK", "sip:203.0.113.1", [
        ("Via", f"SIP/2.0/UDP 10.0.0.7:5060;branch={branch};rport"),
        ("Max-Forwards", "70"),
        ("From", request.headers.get("From") or ""),
        ("To", response.headers.get("To") or ""),
        ("Call-ID", request.call_id),
        ("CSeq", f"{request.cseq.number} ACK"),
    ])


def _call(h: Harness, n: int, *, client_hangs_up: bool) -> None:
    phone = Phone(call_id=f"cycle-{n}@10.0.0.7", from_tag=f"f{n}")
    uri = f"sip:{DIGITS}@sip.kx21.com"
    first = phone.request("INVITE", uri, body=OFFER)
    challenge = responses_to(h.receive(first), CLIENT)[-1]
    h.receive(ack_for_failure(first, challenge))
    phone.cseq += 1
    second = phone.authorize(phone.request("INVITE", uri, body=OFFER), challenge)
    [b_invite] = requests_to(h.receive(second), CARRIER)
    h.receive(answer(b_invite, 180, "Ringing"), source=CARRIER)
    [ok] = responses_to(h.receive(answer(b_invite, 200, "OK", body=ANSWER), source=CARRIER), CLIENT)
    h.receive(_ack_2xx(second, ok, f"z9hG4bK-ack-{n}"))
    h.advance(5)
    if client_hangs_up:
        bye = phone.request("BYE", "sip:203.0.113.1:5060", to_tag=ok.to.tag,
                            cseq=second.cseq.number + 1, branch=f"z9hG4bK-bye-{n}")
        [bye_b] = requests_to(h.receive(bye), CARRIER)
        h.receive(answer(bye_b, 200, "OK"), source=CARRIER)
    else:
        carrier_bye = Request("BYE", "sip:203.0.113.1:5060", [
            ("Via", f"SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bK-cbye-{n}"),
            ("Max-Forwards", "70"),
            ("From", f"{(b_invite.headers.get('To') or '')};tag=carrier-tag"),
            ("To", b_invite.headers.get("From") or ""),
            ("Call-ID", b_invite.call_id),
            ("CSeq", "1 BYE"),
        ])
        sends = h.receive(carrier_bye, source=CARRIER)
        for bye_a in requests_to(sends, CLIENT):
            h.receive(answer(bye_a, 200, "OK", to_tag=f"f{n}"))


def _garbage_types() -> dict[str, int]:
    gc.collect()
    counts: dict[str, int] = {}
    for obj in gc.garbage:
        name = type(obj).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.parametrize("client_hangs_up", [True, False], ids=["client-bye", "carrier-bye"])
def test_finished_calls_leave_no_cycles(collector_paused: None, client_hangs_up: bool) -> None:
    h = Harness.make(account(max_calls=100))
    for n in range(20):
        _call(h, n, client_hangs_up=client_hangs_up)
    h.advance(64)  # every transaction's last timer (Timer H/I/J/K, 64*T1) has run
    assert h.engine.active_calls == 0
    assert len(h.engine._transactions) == 0
    h.sent.clear()
    h.logs.clear()
    h.record_log.clear()
    h.records.clear()
    garbage = _garbage_types()
    assert "Call" not in garbage and "ServerTransaction" not in garbage, garbage
    assert "ClientTransaction" not in garbage, garbage
    assert sum(garbage.values()) == 0, garbage


def test_registrations_leave_no_cycles(collector_paused: None) -> None:
    h = Harness.make(account())
    for n in range(20):
        phone = Phone(call_id=f"reg-{n}@10.0.0.7")
        first = phone.request("REGISTER")
        challenge = responses_to(h.receive(first), CLIENT)[-1]
        phone.cseq += 1
        second = phone.authorize(phone.request("REGISTER"), challenge)
        assert [r.status_code for r in responses_to(h.receive(second), CLIENT)] == [200]
    h.advance(64)
    assert len(h.engine._transactions) == 0
    assert sum(_garbage_types().values()) == 0


def test_an_ended_call_lingering_with_its_transactions_keeps_no_ladder() -> None:
    """An ended call stays reachable while its transactions absorb retransmissions
    (64*T1); its ladder and final record went to the driver and must not stay
    with it: at 200 calls/s that was ~5,000 ended calls' ladders for the collector
    to walk (bench/calls_inprocess.py)."""
    h = Harness.make(account(max_calls=100))
    for n in range(3):
        _call(h, n, client_hangs_up=n % 2 == 0)
    assert h.engine.active_calls == 0
    assert len(h.engine._transactions) > 0  # still lingering: the calls are reachable
    assert all(record.end_wall for record in h.records.values())  # final records handed on
    refs = set(h.records)
    assert len(refs) == 3
    h.sent.clear()
    h.logs.clear()
    h.record_log.clear()
    h.records.clear()
    gc.collect()
    from sansio_sip import CallRecordData, LadderEntry
    from sansio_sip._call import Call

    ended = [o for o in gc.get_objects() if isinstance(o, Call) and o.ref in refs]
    assert len(ended) == 3
    assert all(call.ladder == [] for call in ended)
    assert all(call.record.ladder == () for call in ended)
    kept = [o for o in gc.get_objects() if isinstance(o, CallRecordData) and o.call_ref in refs]
    assert all(record.end_wall is None and record.ladder == () for record in kept)
    entries = [o for o in gc.get_objects() if isinstance(o, LadderEntry)]
    assert not [e for e in entries if any(r in e.message for r in ended_call_ids(ended))]


def ended_call_ids(calls: list[object]) -> set[str]:
    return {call.a.call_id for call in calls}  # type: ignore[attr-defined]


def test_a_handled_message_does_not_keep_its_datagram() -> None:
    """as_received() serves the ladder while the engine handles a message; a
    request a lingering transaction keeps must not keep the datagram too."""
    h = Harness.make(account(max_calls=100))
    phone = Phone(call_id="keep@10.0.0.7")
    h.receive(phone.request("REGISTER"))
    _call(h, 1, client_hangs_up=True)  # an account look-up between INVITE and call
    kept = [t.request for t in h.engine._transactions._servers.values()]
    assert len(kept) >= 3  # the REGISTER, the call's INVITE, its BYE
    assert all(request.headers._cache.get("received") is None for request in kept)
    assert not h.engine._pending
