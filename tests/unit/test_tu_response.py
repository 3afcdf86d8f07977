"""The Responder writes a one-Via request's answer straight from its fields
(_tu._response_bytes); it must be byte for byte what make_response and
serialising give (Responder._built), whatever the request looks like."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sansio_sip._actions import Send
from sansio_sip._message import Request, parse_message
from sansio_sip._model import Transport
from sansio_sip._transaction import TransactionLayer
from sansio_sip._tu import Responder, _response_bytes, context_of

SOURCE = ("198.51.100.7", 40123)

REGISTER = (
    "REGISTER sip:sip.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK.abc;rport\r\n"
    "From: <sip:1001@sip.example.com>;tag=a1\r\n"
    "To: sip:1001@sip.example.com\r\n"
    "CSeq: 1 REGISTER\r\n"
    "Call-ID: reg1@10.0.0.5\r\n"
    "Contact: <sip:1001@10.0.0.5>\r\n"
    "Content-Length: 0\r\n\r\n"
)
COMPACT = (
    "INVITE sip:100@sip.example.com SIP/2.0\r\n"
    "v: SIP/2.0/UDP [2001:db8::5]:5070;branch=z9hG4bKx1\r\n"
    'f: "J\u00fcrgen S" <sip:1001@sip.example.com>;tag=x\r\n'
    "t: <sip:100@sip.example.com>\r\n"
    "i: c2@host\r\n"
    "CSEQ: 7 INVITE\r\n"
    "l: 0\r\n\r\n"
)
IN_DIALOG = (
    "BYE sip:100@203.0.113.1 SIP/2.0\r\n"
    "via: SIP/2.0/TCP host.example.com;branch=z9hG4bKbye;received=1.2.3.4\r\n"
    "FROM: Alice <sip:1001@sip.example.com>;tag=f1\r\n"
    "To:   <sip:100@sip.example.com>;tag=t9\r\n"
    "Call-ID: c3@host\r\n"
    "CSeq: 8 BYE\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Length: 0\r\n\r\n"
)


def _request(text: str) -> Request:
    message = parse_message(text.encode())
    assert isinstance(message, Request)
    return message


@pytest.mark.parametrize("text", [REGISTER, COMPACT, IN_DIALOG])
@pytest.mark.parametrize(
    ("code", "reason", "headers", "body"),
    [
        (100, "Trying", (), b""),
        (401, "Unauthorized", (("WWW-Authenticate", 'Digest realm="r", nonce="n"'),), b""),
        (200, "OK", (("Contact", "<sip:1001@10.0.0.5>;expires=300"), ("Server", "kx")), b""),
        (200, "OK", (("Content-Type", "application/sdp"),), b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n"),
        (403, "Unknown user \u00e9", (), b""),
        (503, "Service Unavailable", (("Retry-After", "5"),), b""),
    ],
)
def test_direct_answer_is_what_the_general_builder_writes(
    text: str, code: int, reason: str, headers: tuple[tuple[str, str], ...], body: bytes
) -> None:
    request = _request(text)
    transport = Transport.TCP if "/TCP" in text else Transport.UDP
    layer = TransactionLayer()
    transaction = layer.create_server(
        request, source=SOURCE, transport=transport, connection=None, now=0.0
    )
    responder = Responder(layer, random.Random(1).randbytes, Counter(), "kx-sipd")
    tag = None if request.to.tag is not None else "0a1b2c"
    built = responder._built(transaction, request, code, reason, tag, headers, body)
    stamped = context_of(transaction).stamped_via
    assert stamped is not None
    direct = _response_bytes(request, code, reason, stamped, tag, headers, body)
    assert direct == built
    assert parse_message(direct).headers.get("Via") == stamped


def test_direct_answer_refuses_a_header_with_a_line_break() -> None:
    request = _request(REGISTER)
    with pytest.raises(ValueError, match="CR or LF"):
        _response_bytes(request, 400, "Bad", "SIP/2.0/UDP h", None, (("X", "a\r\nb"),), b"")


def test_responder_answers_through_the_direct_path_and_counts() -> None:
    request = _request(REGISTER)
    layer = TransactionLayer()
    transaction = layer.create_server(
        request, source=SOURCE, transport=Transport.UDP, connection=None, now=0.0
    )
    counters: Counter[str] = Counter()
    responder = Responder(layer, random.Random(1).randbytes, counters, "kx-sipd")
    items = responder.respond(transaction, request, 401, "Unauthorized", now=0.0)
    send = items[0]
    assert isinstance(send, Send)
    data = send.data
    assert data.startswith(b"SIP/2.0 401 Unauthorized\r\nVia: SIP/2.0/UDP 10.0.0.5:5060;")
    assert b"received=198.51.100.7;rport=40123\r\n" in data
    assert data.endswith(b"Server: kx-sipd\r\nContent-Length: 0\r\n\r\n")
    assert counters["responses_out.401"] == 1
    assert transaction.last_response == data
    assert context_of(transaction).final
