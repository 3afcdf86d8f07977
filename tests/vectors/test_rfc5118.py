"""RFC 5118, the IPv6 torture tests, against the parser and the whole engine.

The messages are the RFC's (§4.1-§4.10), kept here as data: the shared test
vectors hold RFC 4475 only. Each is checked at the parser (valid ones parse,
round-trip and give the address the RFC says they carry; §4.2 is refused with
400) and at the engine, for the answer kx-sipd gives in its role: REGISTER and
INVITE without credentials are challenged, OPTIONS is answered, an in-dialog
BYE for a dialog kx-sipd does not have gets 481. The offers of §4.6, §4.8 and
§4.9 (IPv6 and IPv4-mapped connection lines) also go through a whole
authenticated call: G.711 audio reaches the carrier through the relay and the
video stream is refused with port 0; an offer with no G.711 gets 488."""

from __future__ import annotations

import pytest
from engine_harness import (
    CARRIER,
    CLIENT,
    Harness,
    Phone,
    account,
    ack_for_failure,
    answer,
    requests_to,
    responses_to,
)

from sansio_sip import ParseError, Request, SipUri, parse_message, parse_uri, parse_via
from sansio_sip._sdp import parse_sdp

HEAD = {
    "4.1": (
        "REGISTER sip:[2001:db8::10] SIP/2.0\n"
        "To: sip:user@example.com\n"
        "From: sip:user@example.com;tag=81x2\n"
        "Via: SIP/2.0/UDP [2001:db8::9:1];branch=z9hG4bKas3-111\n"
        "Call-ID: SSG9559905523997077@hlau_4100\n"
        "Max-Forwards: 70\n"
        'Contact: "Caller" <sip:caller@[2001:db8::1]>\n'
        "CSeq: 98176 REGISTER\n"
        "Content-Length: 0\n"
    ),
    "4.2": (
        "REGISTER sip:2001:db8::10 SIP/2.0\n"
        "To: sip:user@example.com\n"
        "From: sip:user@example.com;tag=81x2\n"
        "Via: SIP/2.0/UDP [2001:db8::9:1];branch=z9hG4bKas3-111\n"
        "Call-ID: SSG9559905523997077@hlau_4100\n"
        "Max-Forwards: 70\n"
        'Contact: "Caller" <sip:caller@[2001:db8::1]>\n'
        "CSeq: 98176 REGISTER\n"
        "Content-Length: 0\n"
    ),
    "4.3": (
        "REGISTER sip:[2001:db8::10:5070] SIP/2.0\n"
        "To: sip:user@example.com\n"
        "From: sip:user@example.com;tag=81x2\n"
        "Via: SIP/2.0/UDP [2001:db8::9:1];branch=z9hG4bKas3-111\n"
        "Call-ID: SSG9559905523997077@hlau_4100\n"
        'Contact: "Caller" <sip:caller@[2001:db8::1]>\n'
        "Max-Forwards: 70\n"
        "CSeq: 98176 REGISTER\n"
        "Content-Length: 0\n"
    ),
    "4.4": (
        "REGISTER sip:[2001:db8::10]:5070 SIP/2.0\n"
        "To: sip:user@example.com\n"
        "From: sip:user@example.com;tag=81x2\n"
        "Via: SIP/2.0/UDP [2001:db8::9:1];branch=z9hG4bKas3-111\n"
        "Call-ID: SSG9559905523997077@hlau_4100\n"
        'Contact: "Caller" <sip:caller@[2001:db8::1]>\n'
        "Max-Forwards: 70\n"
        "CSeq: 98176 REGISTER\n"
        "Content-Length: 0\n"
    ),
    "4.5-bracketed": (
        "BYE sip:[2001:db8::10] SIP/2.0\n"
        "To: sip:user@example.com;tag=bd76ya\n"
        "From: sip:user@example.com;tag=81x2\n"
        "Via: SIP/2.0/UDP [2001:db8::9:1];received=[2001:db8::9:255];branch=z9hG4bKas3-111\n"
        "Call-ID: SSG9559905523997077@hlau_4100\n"
        "Max-Forwards: 70\n"
        "CSeq: 321 BYE\n"
        "Content-Length: 0\n"
    ),
    "4.5-bare": (
        "OPTIONS sip:[2001:db8::10] SIP/2.0\n"
        "To: sip:user@example.com\n"
        "From: sip:user@example.com;tag=81x2\n"
        "Via: SIP/2.0/UDP [2001:db8::9:1];received=2001:db8::9:255;branch=z9hG4bKas3\n"
        "Call-ID: SSG95523997077@hlau_4100\n"
        "Max-Forwards: 70\n"
        'Contact: "Caller" <sip:caller@[2001:db8::9:1]>\n'
        "CSeq: 921 OPTIONS\n"
        "Content-Length: 0\n"
    ),
    "4.7": (
        "BYE sip:user@host.example.net SIP/2.0\n"
        "Via: SIP/2.0/UDP [2001:db8::9:1]:6050;branch=z9hG4bKas3-111\n"
        "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKjhja8781hjuaij65144\n"
        "Via: SIP/2.0/TCP [2001:db8::9:255];branch=z9hG4bK451jj;received=192.0.2.200\n"
        "Call-ID: 997077@lau_4100\n"
        "Max-Forwards: 70\n"
        "CSeq: 89187 BYE\n"
        "To: sip:user@example.net;tag=9817--94\n"
        "From: sip:user@example.com;tag=81x2\n"
        "Content-Length: 0\n"
    ),
    "4.9": (
        "INVITE sip:user@example.com SIP/2.0\n"
        "To: sip:user@example.com\n"
        "From: sip:user@east.example.com;tag=81x2\n"
        "Via: SIP/2.0/UDP [::ffff:192.0.2.10]:19823;branch=z9hG4bKbh19\n"
        "Via: SIP/2.0/UDP [::ffff:192.0.2.2];branch=z9hG4bKas3-111\n"
        "Call-ID: SSG9559905523997077@hlau_4100\n"
        'Contact: "T. desk phone" <sip:ted@[::ffff:192.0.2.2]>\n'
        "CSeq: 612 INVITE\n"
        "Max-Forwards: 70\n"
        "Content-Length: 0\n"
    ),
    "4.10-three-colons": (
        "OPTIONS sip:user@[2001:db8:::192.0.2.1] SIP/2.0\n"
        "To: sip:user@[2001:db8:::192.0.2.1]\n"
        "From: sip:user@example.com;tag=810x2\n"
        "Via: SIP/2.0/UDP lab1.east.example.com;branch=z9hG4bKas3-111\n"
        "Call-ID: G9559905523997077@hlau_4100\n"
        "CSeq: 689 OPTIONS\n"
        "Max-Forwards: 70\n"
        "Content-Length: 0\n"
    ),
    "4.10-two-colons": (
        "OPTIONS sip:user@[2001:db8::192.0.2.1] SIP/2.0\n"
        "To: sip:user@[2001:db8::192.0.2.1]\n"
        "From: sip:user@example.com;tag=810x2\n"
        "Via: SIP/2.0/UDP lab1.east.example.com;branch=z9hG4bKas3-111\n"
        "Call-ID: G9559905523997077@hlau_4100\n"
        "CSeq: 689 OPTIONS\n"
        "Max-Forwards: 70\n"
        "Content-Length: 0\n"
    ),
}

# The host (and port) of each valid message's Request-URI, as RFC 5118 reads it.
REQUEST_URI_HOST = {
    "4.1": ("2001:db8::10", None),
    "4.3": ("2001:db8::10:5070", None),  # §4.3: the whole bracket is the address, no port
    "4.4": ("2001:db8::10", 5070),
    "4.5-bracketed": ("2001:db8::10", None),
    "4.5-bare": ("2001:db8::10", None),
    "4.7": ("host.example.net", None),
    "4.9": ("example.com", None),
    "4.10-three-colons": ("2001:db8:::192.0.2.1", None),  # §4.10: accepted, be liberal
    "4.10-two-colons": ("2001:db8::192.0.2.1", None),
}

# kx-sipd's answer to each, in its role.
ANSWER = {
    "4.1": 401,
    "4.2": 400,
    "4.3": 401,
    "4.4": 401,
    "4.5-bracketed": 481,
    "4.5-bare": 200,
    "4.7": 481,
    "4.9": 401,
    "4.10-three-colons": 200,
    "4.10-two-colons": 200,
}

# The offers of §4.6, §4.8 and §4.9 (RFC 5118's SDP bodies).
SDP_46 = (
    "v=0\n"
    "o=assistant 971731711378798081 0 IN IP6 2001:db8::20\n"
    "s=Live video feed\n"
    "c=IN IP6 2001:db8::20\n"
    "t=0 0\n"
    "m=audio 6000 RTP/AVP 0\n"
    "a=rtpmap:0 PCMU/8000\n"
    "m=video 6024 RTP/AVP 107\n"
    "a=rtpmap:107 H263-1998/90000\n"
)
SDP_48 = (
    "v=0\n"
    "o=bob 280744730 28977631 IN IP4 host.example.com\n"
    "s=\n"
    "t=0 0\n"
    "m=audio 22334 RTP/AVP 0\n"
    "c=IN IP4 192.0.2.1\n"
    "m=video 6024 RTP/AVP 107\n"
    "c=IN IP6 2001:db8::1\n"
    "a=rtpmap:107 H263-1998/90000\n"
)
SDP_49 = (
    "v=0\n"
    "o=bob 280744730 28977631 IN IP4 host.example.com\n"
    "s=\n"
    "t=0 0\n"
    "c=IN IP6 ::ffff:192.0.2.2\n"
    "m=audio 3456 RTP/AVP 12\n"
    "a=sendrecv\n"
    "m=video 3458 RTP/AVP 96\n"
    "a=rtpmap:96 H.263/90000\n"
)


def invite(h: Harness, phone: Phone, *, body: bytes) -> tuple[Request, list]:  # type: ignore[type-arg]
    """An INVITE to an allowed number: challenged, ACKed, sent again with credentials."""
    uri = "sip:17752180264@sip.kx21.com"
    first = phone.request("INVITE", uri, body=body)
    challenge = responses_to(h.receive(first), CLIENT)[-1]
    assert challenge.status_code == 401
    h.receive(ack_for_failure(first, challenge))
    phone.cseq += 1
    second = phone.authorize(phone.request("INVITE", uri, body=body), challenge)
    return second, h.receive(second)


def _wire(text: str) -> bytes:
    return (text + "\n").replace("\n", "\r\n").encode()


@pytest.mark.parametrize("name", sorted(REQUEST_URI_HOST))
def test_valid_messages_parse_round_trip_and_carry_their_addresses(name: str) -> None:
    message = parse_message(_wire(HEAD[name]))
    assert parse_message(bytes(message)) == message
    uri = parse_uri(message.uri)  # type: ignore[union-attr]
    assert isinstance(uri, SipUri)
    assert (uri.host, uri.port) == REQUEST_URI_HOST[name]
    assert message.vias, "the top Via is readable"


def test_request_uri_ipv6_without_brackets_is_refused_with_400() -> None:
    with pytest.raises(ParseError) as caught:
        parse_uri(parse_message(_wire(HEAD["4.2"])).uri)  # type: ignore[union-attr]
    assert caught.value.status_code == 400
    assert "URI" in caught.value.reason


def test_via_received_is_read_with_or_without_brackets() -> None:
    bracketed = parse_message(_wire(HEAD["4.5-bracketed"])).vias[0]
    bare = parse_message(_wire(HEAD["4.5-bare"])).vias[0]
    assert bracketed.host == bare.host == "2001:db8::9:1"
    assert bracketed.received.strip("[]") == bare.received == "2001:db8::9:255"


def test_mixed_ipv4_and_ipv6_via_stack() -> None:
    vias = parse_message(_wire(HEAD["4.7"])).vias
    assert [(v.transport, v.host, v.port) for v in vias] == [
        ("UDP", "2001:db8::9:1", 6050),
        ("UDP", "192.0.2.1", None),
        ("TCP", "2001:db8::9:255", None),
    ]
    assert vias[2].received == "192.0.2.200"
    assert parse_via("SIP/2.0/UDP [::ffff:192.0.2.10]:19823;branch=z9hG4bKbh19").port == 19823


@pytest.mark.parametrize("name", sorted(ANSWER))
def test_engine_answers_each_message(name: str) -> None:
    h = Harness.make(account())
    sends = h.receive(_wire(HEAD[name]))
    lines = [s.data.split(b"\r\n", 1)[0] for s in sends]
    assert len(lines) == 1, lines
    assert lines[0].startswith(b"SIP/2.0 %d " % ANSWER[name]), lines[0]
    # The answer goes back to where the request came from (rport-less UDP,
    # §18.2.2 with the received address the server saw).
    assert sends[0].destination == CLIENT
    # Each Via of the request comes back unchanged but for received/rport
    # on the top one.
    response = parse_message(sends[0].data)
    request = parse_message(_wire(HEAD[name])) if name != "4.2" else None
    if request is not None:
        assert [v.host for v in response.vias] == [v.host for v in request.vias]


@pytest.mark.parametrize("sdp", [SDP_46, SDP_48], ids=["4.6", "4.8"])
def test_ipv6_offers_go_through_a_call_with_g711_audio_only(sdp: str) -> None:
    body = sdp.replace("\n", "\r\n").encode()
    offer = parse_sdp(body)
    assert [m.media for m in offer.media] == ["audio", "video"]
    h = Harness.make(account())
    _, sends = invite(h, Phone(), body=body)
    assert [r.status_code for r in responses_to(sends, CLIENT)] == [100]
    [b_invite] = requests_to(sends, CARRIER)
    # The carrier gets a new offer (kx-sipd is a B2BUA): G.711 audio only,
    # pointing at the relay.
    [audio] = [m for m in parse_sdp(b_invite.body).media if m.port != 0]
    assert audio.media == "audio" and audio.formats == ("0",)
    assert "2001:db8" not in b_invite.body.decode(), "the carrier sees the relay, not the phone"
    carrier_answer = (
        b"v=0\r\no=gw 1 1 IN IP4 192.0.2.60\r\ns=-\r\nc=IN IP4 192.0.2.60\r\nt=0 0\r\n"
        b"m=audio 30000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    sends = h.receive(answer(b_invite, 200, "OK", body=carrier_answer), source=CARRIER)
    [ok] = responses_to(sends, CLIENT)
    assert ok.status_code == 200
    # The phone's answer has one m-line per offered stream (RFC 3264 §6):
    # audio through the relay, video refused with port 0.
    client_audio, client_video = parse_sdp(ok.body).media
    assert client_audio.media == "audio" and client_audio.port != 0
    assert client_audio.formats == ("0",)
    assert client_video.media == "video" and client_video.port == 0


def test_ipv4_mapped_offer_without_g711_gets_488() -> None:
    body = SDP_49.replace("\n", "\r\n").encode()
    assert parse_sdp(body).connection == "IN IP6 ::ffff:192.0.2.2"
    h = Harness.make(account())
    _, sends = invite(h, Phone(), body=body)
    finals = [r for r in responses_to(sends, CLIENT) if r.status_code >= 200]
    assert [r.status_code for r in finals] == [488]
    assert finals[0].headers.get("Warning")
    assert requests_to(sends, CARRIER) == []
