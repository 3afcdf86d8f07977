"""Real softphone requests (shared/testdata/softphones, see its README).

Clean captures parse and round-trip; microsip 3.19.22's Content-Length (343)
exceeds its 209-octet body, so over UDP it is a 400 (RFC 3261 §18.3); ekiga's
broken Contact is refused with a 400 naming the Contact.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sansio_sip import NameAddr, ParseError, Request, StreamFramer, parse_contact, parse_message

TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "softphones"
CLEAN = [
    "microsip-3.19.8-invite-tls-srtp.sip",
    "xlite-1006e-register-expires0.sip",
    "xpro-1103v-invite.sip",
]


def load(name: str) -> bytes:
    return (TESTDATA / name).read_bytes()


def test_every_capture_is_classified() -> None:
    names = {p.name for p in TESTDATA.glob("*.sip")}
    assert names == {
        *CLEAN,
        "microsip-3.19.22-invite.sip",
        "ekiga-3.2.7-register-bad-contact.sip",
    }


@pytest.mark.parametrize("name", CLEAN)
def test_clean_captures_parse_and_round_trip(name: str) -> None:
    message = parse_message(load(name))
    assert isinstance(message, Request)
    assert parse_message(bytes(message)) == message
    assert message.top_via.branch is not None
    assert message.top_via.branch.startswith("z9hG4bK")
    assert message.top_via.has_rport
    assert message.from_.tag
    assert message.to.tag is None
    assert message.cseq.method == message.method
    assert all(isinstance(c, NameAddr) for c in message.contacts)


def test_microsip_tls_body_length_with_padded_content_length() -> None:
    message = parse_message(load("microsip-3.19.8-invite-tls-srtp.sip"))
    assert message.headers.get("Content-Length") == "720"  # "   720" as sent
    assert len(message.body) == 720
    assert message.content_type == "application/sdp"
    assert message.top_via.transport == "TLS"


def test_xlite_deregistration_facts() -> None:
    message = parse_message(load("xlite-1006e-register-expires0.sip"))
    [contact] = message.contacts
    assert isinstance(contact, NameAddr)
    assert contact.param("expires") == "0"
    assert contact.parsed_uri.param("rinstance") == "6d2bbd8014ca7a76"
    assert message.top_via.received == "89.100.104.191"
    assert message.top_via.rport is None  # bare ;rport
    assert message.from_.display_name == "aaronxten"
    assert "Content-Length" not in message.headers  # none sent: the datagram's rest is the body


def test_microsip_content_length_larger_than_body_is_400_over_udp() -> None:
    data = load("microsip-3.19.22-invite.sip")
    with pytest.raises(ParseError, match="Content-Length exceeds body") as info:
        parse_message(data)
    assert info.value.status_code == 400
    # On a stream the framer waits for the missing octets instead.
    framer = StreamFramer()
    assert framer.feed(data) == []
    assert framer.buffered == len(data)


def test_microsip_with_true_length_parses() -> None:
    data = load("microsip-3.19.22-invite.sip")
    body = data.split(b"\r\n\r\n", 1)[1]
    fixed = re.sub(rb"Content-Length: 343", b"Content-Length: %d" % len(body), data)
    message = parse_message(fixed)
    assert message.body == body
    assert message.top_via.branch == "z9hG4bKPj869f70960bdd4204b1352eaf242a3691"


def test_ekiga_bad_contact_is_refused() -> None:
    data = load("ekiga-3.2.7-register-bad-contact.sip")
    with pytest.raises(ParseError, match="Contact") as info:
        parse_message(data)
    assert info.value.status_code == 400
    with pytest.raises(ParseError):
        parse_contact("<sip:twolmsted@24.183.120.253")
