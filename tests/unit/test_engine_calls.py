"""The B2BUA on a virtual clock: issue 4's call flows, end to end through the
pure engine (client ↔ kx-sipd ↔ carrier), with the records they leave."""

from __future__ import annotations

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
    statuses,
)

from sansio_sip._digest import parse_challenge
from sansio_sip._message import Request, Response
from sansio_sip._sdp import parse_sdp

DIGITS = "17752180264"


def invite(h: Harness, phone: Phone, *, digits: str = DIGITS, body: bytes = OFFER,
           password: str | None = None) -> tuple[Request, list]:
    """Challenge, ACK, authenticated INVITE. Returns the INVITE and what it caused."""
    uri = f"sip:{digits}@sip.kx21.com"
    first = phone.request("INVITE", uri, body=body)
    challenge = responses_to(h.receive(first), CLIENT)[-1]
    assert challenge.status_code == 401
    h.receive(ack_for_failure(first, challenge))
    phone.cseq += 1
    second = phone.authorize(phone.request("INVITE", uri, body=body), challenge,
                             password=password)
    return second, h.receive(second)


def answered_call(h: Harness, phone: Phone) -> tuple[Request, Request, Response]:
    """A call up to the client's ACK: returns (A INVITE, B INVITE, 200 to A)."""
    a_invite, sends = invite(h, phone)
    [b_invite] = requests_to(sends, CARRIER)
    h.receive(answer(b_invite, 180, "Ringing"), source=CARRIER)
    sends = h.receive(answer(b_invite, 200, "OK", body=ANSWER), source=CARRIER)
    [ok] = responses_to(sends, CLIENT)
    ack = Request("ACK", "sip:203.0.113.1:5060", [
        ("Via", "SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-ack-1;rport"),
        ("Max-Forwards", "70"),
        ("From", a_invite.headers.get("From") or ""),
        ("To", ok.headers.get("To") or ""),
        ("Call-ID", a_invite.call_id),
        ("CSeq", f"{a_invite.cseq.number} ACK"),
    ])
    h.receive(ack)
    return a_invite, b_invite, ok


def test_unauthenticated_invite_gets_401_and_its_ack_is_absorbed() -> None:
    h = Harness.make(account())
    phone = Phone()
    first = phone.request("INVITE", f"sip:{DIGITS}@sip.kx21.com", body=OFFER)
    [challenge] = responses_to(h.receive(first), CLIENT)
    assert challenge.status_code == 401
    assert h.receive(ack_for_failure(first, challenge)) == []
    assert h.engine.stats().get("dropped_stray_ack", 0) == 0


def test_a_call_goes_to_the_carrier_with_g711_only_and_relay_addresses() -> None:
    h = Harness.make(account(caller_id="15550001111"))
    a_invite, sends = invite(h, Phone())
    assert statuses(s for s in sends if s.destination == CLIENT) == [100]
    [b_invite] = requests_to(sends, CARRIER)
    assert b_invite.uri == f"sip:{DIGITS}@192.0.2.50:5060"
    assert b_invite.call_id != a_invite.call_id
    assert b_invite.from_.uri.startswith("sip:15550001111@")
    assert b_invite.max_forwards == 69
    assert b_invite.headers.get("Authorization") is None
    sdp = parse_sdp(b_invite.body)
    [m] = sdp.media
    assert m.formats == ("0", "8", "101")
    assert sdp.connection == "IN IP4 203.0.113.9" and m.port == 20002
    # The record of the call in progress is written before the carrier is called.
    [record] = h.record_log
    assert record.end_wall is None and record.dialed == DIGITS


def test_ringing_answer_ack_and_client_bye() -> None:
    h = Harness.make(account())
    a_invite, sends = invite(h, Phone())
    [b_invite] = requests_to(sends, CARRIER)
    sends = h.receive(answer(b_invite, 180, "Ringing"), source=CARRIER)
    assert statuses(sends) == [180]
    sends = h.receive(answer(b_invite, 200, "OK", body=ANSWER), source=CARRIER)
    [ack_b] = requests_to(sends, CARRIER)
    assert ack_b.method == "ACK" and ack_b.cseq.number == b_invite.cseq.number
    [ok] = responses_to(sends, CLIENT)
    assert ok.status_code == 200
    sdp = parse_sdp(ok.body)
    assert sdp.connection == "IN IP4 203.0.113.9" and sdp.media[0].port == 20000
    assert sdp.media[0].formats == ("8", "101")
    assert h.updates and h.updates[-1].b_peer == ("192.0.2.60", 30000)
    # The client ACKs; then hangs up.
    ack = Request("ACK", "sip:203.0.113.1:5060", [
        ("Via", "SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-ack;rport"),
        ("From", a_invite.headers.get("From") or ""),
        ("To", ok.headers.get("To") or ""),
        ("Call-ID", a_invite.call_id),
        ("CSeq", f"{a_invite.cseq.number} ACK"),
        ("Max-Forwards", "70"),
    ])
    assert h.receive(ack) == []
    assert h.advance(10) == []  # no 2xx retransmission once ACKed
    phone_bye = Phone().request("BYE", "sip:203.0.113.1:5060", to_tag=ok.to.tag,
                                cseq=a_invite.cseq.number + 1, branch="z9hG4bK-bye-1")
    h.sent.clear()
    sends = h.receive(phone_bye)
    kinds = [s.data.split(b" ", 1)[0] for s in h.sent]
    # The final record is durable before the client hears 200 to its BYE.
    assert kinds.index(b"#record") < kinds.index(b"SIP/2.0")
    assert statuses(s for s in sends if s.destination == CLIENT) == [200]
    [bye_b] = requests_to(sends, CARRIER)
    assert bye_b.method == "BYE" and bye_b.to.tag == "carrier-tag"
    h.receive(answer(bye_b, 200, "OK"), source=CARRIER)
    record = h.record_log[-1]
    assert record.ended_by == "client" and record.final_status == 200
    assert record.answer_wall is not None and record.codec == "PCMA"
    assert record.b_call_id == b_invite.call_id and record.sent_digits == DIGITS
    assert any(e.message.startswith("BYE") for e in record.ladder)
    # The ladder has the hang-up whole as far as kx-sipd took part before the record
    # was written: the client's BYE, the BYE sent on to the carrier, the 200 to the
    # client (the carrier's 200 comes after the record).
    last = [(e.direction, e.leg, e.message.split("\r\n", 1)[0]) for e in record.ladder[-3:]]
    assert last == [
        ("in", "A", "BYE sip:203.0.113.1:5060 SIP/2.0"),
        ("out", "B", f"BYE {bye_b.uri} SIP/2.0"),
        ("out", "A", "SIP/2.0 200 OK"),
    ]
    assert h.engine.active_calls == 0 and h.released


def test_carrier_hangs_up() -> None:
    h = Harness.make(account())
    a_invite, b_invite, ok = answered_call(h, Phone())
    bye = Request("BYE", "sip:203.0.113.1:5060", [
        ("Via", "SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bK-carrier-bye"),
        ("Max-Forwards", "70"),
        ("From", f"<{b_invite.to.uri}>;tag=carrier-tag"),
        ("To", b_invite.headers.get("From") or ""),
        ("Call-ID", b_invite.call_id),
        ("CSeq", "1 BYE"),
    ])
    sends = h.receive(bye, source=CARRIER)
    assert statuses(s for s in sends if s.destination == CARRIER) == [200]
    [bye_a] = requests_to(sends, CLIENT)
    assert bye_a.method == "BYE" and bye_a.call_id == a_invite.call_id
    assert bye_a.uri == "sip:acme@10.0.0.7:5060;transport=udp"  # the Contact
    assert bye_a.to.tag == "ftag1" and bye_a.from_.tag == ok.to.tag
    record = h.record_log[-1]
    assert record.ended_by == "carrier"
    assert [(e.direction, e.leg, e.message.split(" ", 1)[0]) for e in record.ladder[-3:]] == [
        ("in", "B", "BYE"),
        ("out", "A", "BYE"),
        ("out", "B", "SIP/2.0"),
    ]


def test_cancel_before_answer() -> None:
    h = Harness.make(account())
    phone = Phone()
    a_invite, sends = invite(h, phone)
    [b_invite] = requests_to(sends, CARRIER)
    h.receive(answer(b_invite, 180, "Ringing"), source=CARRIER)
    cancel = Request("CANCEL", a_invite.uri, [
        ("Via", a_invite.headers.get("Via") or ""),
        ("Max-Forwards", "70"),
        ("From", a_invite.headers.get("From") or ""),
        ("To", a_invite.headers.get("To") or ""),
        ("Call-ID", a_invite.call_id),
        ("CSeq", f"{a_invite.cseq.number} CANCEL"),
    ])
    sends = h.receive(cancel)
    assert sorted(statuses(s for s in sends if s.destination == CLIENT)) == [200, 487]
    [cancel_b] = requests_to(sends, CARRIER)
    assert cancel_b.method == "CANCEL" and cancel_b.top_via.branch == b_invite.top_via.branch
    # The carrier answers 200 to the CANCEL and 487 to the INVITE; we ACK the 487.
    h.receive(answer(cancel_b, 200, "OK"), source=CARRIER)
    sends = h.receive(answer(b_invite, 487, "Request Terminated"), source=CARRIER)
    [ack] = requests_to(sends, CARRIER)
    assert ack.method == "ACK"
    record = h.record_log[-1]
    assert (record.ended_by, record.final_status) == ("cancel", 487)


def test_cancel_racing_the_200_ends_with_bye_to_the_carrier() -> None:
    h = Harness.make(account())
    a_invite, sends = invite(h, Phone())
    [b_invite] = requests_to(sends, CARRIER)
    h.receive(answer(b_invite, 180, "Ringing"), source=CARRIER)
    cancel = Request("CANCEL", a_invite.uri, [
        ("Via", a_invite.headers.get("Via") or ""),
        ("From", a_invite.headers.get("From") or ""),
        ("To", a_invite.headers.get("To") or ""),
        ("Call-ID", a_invite.call_id),
        ("CSeq", f"{a_invite.cseq.number} CANCEL"),
        ("Max-Forwards", "70"),
    ])
    h.receive(cancel)
    sends = h.receive(answer(b_invite, 200, "OK", body=ANSWER), source=CARRIER)
    methods = [r.method for r in requests_to(sends, CARRIER)]
    assert methods == ["ACK", "BYE"]
    assert responses_to(sends, CLIENT) == []


def test_cancel_without_matching_invite_gets_481() -> None:
    h = Harness.make(account())
    cancel = Phone().request("CANCEL", f"sip:{DIGITS}@sip.kx21.com")
    assert statuses(h.receive(cancel)) == [481]


@pytest.mark.parametrize("code", [486, 503, 404, 603])
def test_carrier_failures_reach_the_client(code: int) -> None:
    h = Harness.make(account())
    a_invite, sends = invite(h, Phone())
    [b_invite] = requests_to(sends, CARRIER)
    sends = h.receive(answer(b_invite, code, "Nope"), source=CARRIER)
    assert statuses(s for s in sends if s.destination == CLIENT) == [code]
    assert [r.method for r in requests_to(sends, CARRIER)] == ["ACK"]
    assert h.record_log[-1].final_status == code and h.record_log[-1].ended_by == "carrier"


def test_silent_carrier_gives_408_after_timer_b() -> None:
    h = Harness.make(account())
    invite(h, Phone())
    sends = h.advance(40)
    # 408 to the client, retransmitted by Timer G since this client never ACKs.
    assert set(statuses(s for s in sends if s.destination == CLIENT)) == {408}
    retransmissions = requests_to(sends, CARRIER)
    assert len(retransmissions) == 6  # Timer A: 0.5, 1, 2, 4, 8, 16 s
    assert h.record_log[-1].ended_by == "timeout"


def test_unreachable_carrier_gives_503() -> None:
    h = Harness.make(account())
    invite(h, Phone())
    actions = h.engine.transport_failed(CARRIER, h.engine.config and __import__(
        "sansio_sip._model", fromlist=["Transport"]).Transport.UDP, now=h.now, wall=h.wall)
    sends = h.perform(actions)
    assert statuses(s for s in sends if s.destination == CLIENT) == [503]


def test_retransmitted_invite_is_absorbed_before_authentication() -> None:
    h = Harness.make(account())
    phone = Phone()
    a_invite, sends = invite(h, phone)
    lookups_before = h.engine.stats().get("auth.accepted", 0)
    again = h.receive(a_invite)
    assert statuses(again) == [100]
    assert requests_to(again, CARRIER) == []
    assert h.engine.stats().get("auth.accepted", 0) == lookups_before


def test_replayed_authorization_on_a_new_invite_is_refused_stale() -> None:
    h = Harness.make(account())
    phone = Phone()
    a_invite, _ = invite(h, phone)
    replay = Phone(call_id="another-call@evil")
    request = replay.request("INVITE", a_invite.uri, body=OFFER)
    request.headers.add("Authorization", a_invite.headers.get("Authorization") or "")
    [*_, reply] = responses_to(h.receive(request), CLIENT)
    assert reply.status_code == 401
    assert parse_challenge(reply.headers.get("WWW-Authenticate") or "").stale is True


def test_password_rotation_applies_to_the_next_call() -> None:
    h = Harness.make(account())
    invite(h, Phone())
    h.accounts["acme"] = account(password="rotated")
    _, sends = invite(h, Phone(call_id="second@x"))
    [reply] = [r for r in responses_to(sends, CLIENT) if r.status_code >= 200]
    assert (reply.status_code, reply.reason) == (403, "Bad credentials")


def test_offer_without_g711_gets_488_with_warning() -> None:
    h = Harness.make(account())
    offer = OFFER.replace(b"RTP/AVP 96 0 8 101", b"RTP/AVP 96 9").replace(
        b"a=rtpmap:101 telephone-event/8000\r\n", b"a=rtpmap:9 G722/8000\r\n")
    _, sends = invite(h, Phone(), body=offer)
    [*_, reply] = responses_to(sends, CLIENT)
    assert reply.status_code == 488
    assert (reply.headers.get("Warning") or "").startswith("305 ")
    assert h.record_log[-1].final_status == 488


def test_destination_not_allowed_and_call_limit() -> None:
    h = Harness.make(account(allowed_prefixes=("1",), max_calls=1))
    _, sends = invite(h, Phone(), digits="525512345678")
    [*_, reply] = responses_to(sends, CLIENT)
    assert (reply.status_code, reply.reason) == (403, "Destination not allowed")
    _, sends = invite(h, Phone(call_id="c2@x"))
    assert requests_to(sends, CARRIER)
    _, sends = invite(h, Phone(call_id="c3@x"))
    [*_, reply] = responses_to(sends, CLIENT)
    assert (reply.status_code, reply.reason) == (403, "Call limit reached")


def test_unknown_user_and_store_down_on_invite() -> None:
    h = Harness.make(account())
    _, sends = invite(h, Phone(username="ghost"))
    assert responses_to(sends, CLIENT)[-1].reason == "Unknown user"
    h.store_up = False
    _, sends = invite(h, Phone(call_id="x@y"))
    reply = responses_to(sends, CLIENT)[-1]
    assert reply.status_code == 503 and reply.headers.get("Retry-After")


def test_relay_failure_gives_503() -> None:
    h = Harness.make(account())
    h.relay_up = False
    _, sends = invite(h, Phone())
    reply = responses_to(sends, CLIENT)[-1]
    assert reply.status_code == 503 and reply.headers.get("Retry-After")
    assert h.record_log[-1].ended_by == "error"


def test_200_is_retransmitted_until_ack_and_call_ends_without_it() -> None:
    h = Harness.make(account())
    a_invite, sends = invite(h, Phone())
    [b_invite] = requests_to(sends, CARRIER)
    h.receive(answer(b_invite, 200, "OK", body=ANSWER), source=CARRIER)
    sends = h.advance(40)
    oks = [r for r in responses_to(sends, CLIENT) if r.status_code == 200]
    assert len(oks) >= 6
    byes = {r.top_via.branch for r in requests_to(sends, CARRIER) if r.method == "BYE"}
    assert len(byes) == 1  # one BYE transaction (retransmitted by Timer E)
    assert h.record_log[-1].ended_by == "timeout"


def test_hold_reinvite_from_client_is_relayed_with_relay_address() -> None:
    h = Harness.make(account())
    a_invite, b_invite, ok = answered_call(h, Phone())
    hold = OFFER.replace(b"a=sendrecv", b"a=sendonly")
    reinvite = Phone().request("INVITE", "sip:203.0.113.1:5060", to_tag=ok.to.tag,
                               cseq=a_invite.cseq.number + 1, body=hold,
                               branch="z9hG4bK-reinvite-1")
    sends = h.receive(reinvite)
    [relayed] = requests_to(sends, CARRIER)
    assert relayed.method == "INVITE" and relayed.to.tag == "carrier-tag"
    sdp = parse_sdp(relayed.body)
    assert sdp.media[0].direction == "sendonly" and sdp.media[0].port == 20002
    sends = h.receive(answer(relayed, 200, "OK", body=ANSWER.replace(b"sendrecv", b"recvonly")),
                      source=CARRIER)
    assert [r.method for r in requests_to(sends, CARRIER)] == ["ACK"]
    [ok2] = responses_to(sends, CLIENT)
    assert ok2.status_code == 200 and parse_sdp(ok2.body).media[0].direction == "recvonly"


def test_echo_test_number_is_answered_by_kx_sipd() -> None:
    h = Harness.make(account())
    _, sends = invite(h, Phone(), digits="9196")
    assert requests_to(sends, CARRIER) == []
    [*_, ok] = responses_to(sends, CLIENT)
    assert ok.status_code == 200
    sdp = parse_sdp(ok.body)
    assert sdp.media[0].port == 20000 and sdp.connection == "IN IP4 203.0.113.9"


def test_media_timeout_ends_the_call_on_both_legs() -> None:
    h = Harness.make(account())
    answered_call(h, Phone())
    [call_ref] = list(h.media)
    sends = h.perform(h.engine.media_ended(call_ref, "media-timeout", now=h.now, wall=h.wall))
    assert [r.method for r in requests_to(sends, CARRIER)] == ["BYE"]
    assert [r.method for r in requests_to(sends, CLIENT)] == ["BYE"]
    assert h.record_log[-1].ended_by == "media-timeout"


def test_in_dialog_requests_from_a_nat_latch_to_the_source() -> None:
    h = Harness.make(account())
    a_invite, b_invite, ok = answered_call(h, Phone())
    bye = Request("BYE", "sip:203.0.113.1:5060", [
        ("Via", "SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bK-cb2"),
        ("From", f"<{b_invite.to.uri}>;tag=carrier-tag"),
        ("To", b_invite.headers.get("From") or ""),
        ("Call-ID", b_invite.call_id),
        ("CSeq", "2 BYE"),
        ("Max-Forwards", "70"),
    ])
    sends = h.receive(bye, source=CARRIER)
    [bye_a] = requests_to(sends, CLIENT)  # to the INVITE's source, not 10.0.0.7
    assert bye_a.method == "BYE"


def test_carrier_ringing_forever_is_cancelled_after_the_ring_timeout() -> None:
    h = Harness.make(account(), ring_timeout=60.0)
    a_invite, sends = invite(h, Phone())
    [b_invite] = requests_to(sends, CARRIER)
    h.receive(answer(b_invite, 180, "Ringing"), source=CARRIER)
    sends = h.advance(61)
    assert 408 in statuses(s for s in sends if s.destination == CLIENT)
    assert "CANCEL" in {r.method for r in requests_to(sends, CARRIER)}
    assert h.record_log[-1].ended_by == "timeout"


def test_responses_ignore_maddr_and_go_back_to_the_source() -> None:
    # A forged maddr must not aim kx-sipd's answers at a third party.
    h = Harness.make()
    request = Phone().request("OPTIONS")
    request.headers.set("Via", "SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-m1;maddr=192.0.2.99")
    [send] = h.receive(request)
    assert send.destination == CLIENT


def test_no_cancel_follows_the_carriers_final_answer_after_ringing() -> None:
    h = Harness.make(account())
    _, sends = invite(h, Phone())
    [b_invite] = requests_to(sends, CARRIER)
    h.receive(answer(b_invite, 180, "Ringing"), source=CARRIER)
    sends = h.receive(answer(b_invite, 486, "Busy Here"), source=CARRIER)
    sends += h.advance(40)
    assert {r.method for r in requests_to(sends, CARRIER)} == {"ACK"}


def test_a_rejected_call_keeps_its_ladder_for_support() -> None:
    h = Harness.make(account(allowed_prefixes=("1",)))
    invite(h, Phone(), digits="525512345678")
    record = h.record_log[-1]
    assert record.ended_by == "rejected" and record.final_status == 403
    assert [(e.direction, e.message.split(" ", 2)[:2]) for e in record.ladder] == [
        ("in", ["INVITE", "sip:525512345678@sip.kx21.com"]),
        ("out", ["SIP/2.0", "403"]),
    ]


def test_route_naming_kx_sipd_is_consumed_and_strict_routing_is_understood() -> None:
    h = Harness.make(account())
    phone = Phone()
    uri = f"sip:{DIGITS}@sip.kx21.com"
    extra = (("Route", "<sip:sip.kx21.com;lr>"),)
    first = phone.request("INVITE", uri, body=OFFER, extra=extra)
    challenge = responses_to(h.receive(first), CLIENT)[-1]
    phone.cseq += 1
    second = phone.authorize(phone.request("INVITE", uri, body=OFFER, extra=extra), challenge)
    [b_invite] = requests_to(h.receive(second), CARRIER)
    assert b_invite.headers.get("Route") is None

    # An old strict router: Request-URI is the proxy, the destination the last Route.
    strict = Phone(call_id="strict@x")
    extra = (("Route", f"<{uri}>"),)
    first = strict.request("INVITE", "sip:sip.kx21.com", body=OFFER, extra=extra)
    challenge = responses_to(h.receive(first), CLIENT)[-1]
    strict.cseq += 1
    second = strict.authorize(
        strict.request("INVITE", "sip:sip.kx21.com", body=OFFER, extra=extra), challenge
    )
    [b_invite] = requests_to(h.receive(second), CARRIER)
    assert b_invite.uri == f"sip:{DIGITS}@192.0.2.50:5060"


def test_the_answer_is_logged_once_when_the_2xx_goes_out() -> None:
    """call.answered: the event metrics count answers and set-up times from."""
    h = Harness.make(account())
    a_invite, _b_invite, ok = answered_call(h, Phone())
    [event] = [log for log in h.logs if log.event == "call.answered"]
    fields = dict(event.fields)
    assert fields["call_id"] == a_invite.call_id and fields["status"] == ok.status_code == 200
    assert fields["account"] == "acme" and fields["codec"] == "PCMA"  # the carrier's choice
    h.advance(1.0)  # retransmissions of the 200 are not answers
    assert sum(log.event == "call.answered" for log in h.logs) == 1
