"""Structured header values: Via, CSeq, name-addr, Contact, params, names."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sansio_sip import (
    COMPACT_FORMS,
    CSeq,
    NameAddr,
    ParseError,
    Via,
    _headers,
    canonical_name,
    parse_contact,
    parse_cseq,
    parse_name_addr,
    parse_params,
    parse_via,
    split_header_values,
)

# ---------------------------------------------------------------- names


def test_compact_forms_are_the_rfc_ones() -> None:
    # RFC 3261 §7.3.3 plus RFC 3515, 3892, 6665, 3841, 4028, 4474.
    assert COMPACT_FORMS == {
        "i": "Call-ID", "m": "Contact", "e": "Content-Encoding", "l": "Content-Length",
        "c": "Content-Type", "f": "From", "s": "Subject", "k": "Supported", "t": "To",
        "v": "Via", "r": "Refer-To", "b": "Referred-By", "o": "Event", "u": "Allow-Events",
        "a": "Accept-Contact", "j": "Reject-Contact", "d": "Request-Disposition",
        "x": "Session-Expires", "y": "Identity", "n": "Identity-Info",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("name", "key"),
    [("v", "via"), ("V", "via"), ("VIA", "via"), ("call-id", "call-id"), ("I", "call-id"),
     ("X-Custom", "x-custom"), ("l", "content-length"), ("z", "z")],
)  # fmt: skip
def test_canonical_name(name: str, key: str) -> None:
    assert canonical_name(name) == key


# ---------------------------------------------------------------- splitting and params


def test_split_header_values_respects_quotes_and_angles() -> None:
    value = '"Doe, John" <sip:a@b;x="1,2">;p="q,r", <sip:c@d>, sip:e@f'
    assert split_header_values(value) == [
        '"Doe, John" <sip:a@b;x="1,2">;p="q,r"',
        "<sip:c@d>",
        "sip:e@f",
    ]
    assert split_header_values('"a\\", b" <sip:x@y>') == ['"a\\", b" <sip:x@y>']
    assert split_header_values("a, ,b") == ["a", "", "b"]
    assert split_header_values("single") == ["single"]


def test_parse_params_with_lws_and_quotes() -> None:
    assert parse_params(";a=b;c") == (("a", "b"), ("c", None))
    assert parse_params(' ; a = b ;  c ; d = "x; y"') == (("a", "b"), ("c", None), ("d", '"x; y"'))
    assert parse_params(";maddr=[2001:db8::1]") == (("maddr", "[2001:db8::1]"),)
    assert parse_params("") == ()


@pytest.mark.parametrize("text", [";", ";;", ";a=", "a=b", ";a b", ';a="open'])
def test_bad_params(text: str) -> None:
    with pytest.raises(ParseError):
        parse_params(text)


# ---------------------------------------------------------------- CSeq


def test_cseq() -> None:
    assert parse_cseq("20 INVITE") == CSeq(20, "INVITE")
    assert parse_cseq("0009   INVITE") == CSeq(9, "INVITE")
    assert parse_cseq(f"{2**31 - 1} BYE") == CSeq(2**31 - 1, "BYE")
    assert str(CSeq(1, "ACK")) == "1 ACK"


@pytest.mark.parametrize(
    "text", ["", "INVITE", "1", "x INVITE", "-1 INVITE", f"{2**31} INVITE",
             "36893488147419103232 REGISTER", "1 IN VITE", "1 <INVITE>", "１ INVITE"],
)  # fmt: skip
def test_bad_cseq(text: str) -> None:
    with pytest.raises(ParseError, match="Bad CSeq") as info:
        parse_cseq(text)
    assert info.value.status_code == 400


# ---------------------------------------------------------------- Via


def test_via_plain() -> None:
    via = parse_via("SIP/2.0/udp 192.0.2.10:5060;branch=z9hG4bK.X;rport;received=203.0.113.9")
    assert via.protocol == "SIP/2.0"
    assert via.transport == "UDP"
    assert (via.host, via.port) == ("192.0.2.10", 5060)
    assert via.branch == "z9hG4bK.X"
    assert via.received == "203.0.113.9"
    assert via.has_rport
    assert via.rport is None
    assert via.sent_by == "192.0.2.10:5060"
    assert str(via) == "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK.X;rport;received=203.0.113.9"


def test_via_with_lws_everywhere() -> None:
    via = parse_via("SIP  /    2.0   / UDP  192.168.255.111   ; branch= z9hG4bK30239")
    assert via.protocol == "SIP/2.0"
    assert via.host == "192.168.255.111"
    assert via.branch == "z9hG4bK30239"
    via = parse_via("SIP/2.0/TCP host.example.com : 5070 ; maddr=239.1.1.1 ; ttl=16")
    assert via.port == 5070
    assert via.maddr == "239.1.1.1"
    assert via.ttl == 16


def test_via_ipv6_and_rport_value() -> None:
    via = parse_via("SIP/2.0/UDP [2001:db8::9]:5062;branch=z9hG4bKabc;rport=5062")
    assert via.host == "2001:db8::9"
    assert via.sent_by == "[2001:db8::9]:5062"
    assert via.rport == 5062


def test_via_with_params_replaces_in_place_and_appends() -> None:
    via = parse_via("SIP/2.0/UDP 10.0.0.1;rport;branch=z9hG4bKx")
    updated = via.with_params(received="198.51.100.7", rport="40000")
    assert str(updated) == "SIP/2.0/UDP 10.0.0.1;rport=40000;branch=z9hG4bKx;received=198.51.100.7"
    assert via.rport is None  # frozen: the original is unchanged
    assert updated.with_params(("RPORT", None)).params[0] == ("rport", None)


@pytest.mark.parametrize(
    "text",
    ["", "SIP/2.0/UDP", "SIP/2.0 192.0.2.1", "SIP/2.0/UDP 192.0.2.15;;,;,,",
     "SIP/2.0/UDP host:99999", "SIP/2.0/UDP host;=x",
     "SIP/2.0/UDP ho st"],
)  # fmt: skip
def test_bad_via(text: str) -> None:
    with pytest.raises(ParseError):
        parse_via(text)


def test_via_equality_and_hash() -> None:
    a = parse_via("SIP/2.0/UDP h;branch=z9hG4bK1")
    assert a == Via("SIP/2.0", "UDP", "h", None, (("branch", "z9hG4bK1"),))
    assert hash(a) == hash(parse_via("SIP/2.0/UDP h;branch=z9hG4bK1"))


# ---------------------------------------------------------------- name-addr


@pytest.mark.parametrize(
    ("text", "display", "uri", "params", "angle"),
    [
        ("<sip:a@b>;tag=1", None, "sip:a@b", (("tag", "1"),), True),
        ('"Alice" <sip:a@b>', "Alice", "sip:a@b", (), True),
        ('"" <sip:a@b>', "", "sip:a@b", (), True),
        ('"A \\"B\\"" <sip:a@b>', 'A "B"', "sip:a@b", (), True),
        ("caller<sip:c@d>;tag=3", "caller", "sip:c@d", (("tag", "3"),), True),
        ("Bob  Smith   <sip:b@d>", "Bob Smith", "sip:b@d", (), True),
        ("sip:a@b;tag=1", None, "sip:a@b", (("tag", "1"),), False),
        ("sip:a@b ;  tag = 2", None, "sip:a@b", (("tag", "2"),), False),
        ("<sip:a@b;lr>", None, "sip:a@b;lr", (), True),
        ("Jörg <sip:j@example.com>", "Jörg", "sip:j@example.com", (), True),
        ('<sip:a@b>;+sip.instance="<urn:uuid:1>"', None, "sip:a@b",
         (("+sip.instance", '"<urn:uuid:1>"'),), True),
        ("<tel:+123>;tag=9", None, "tel:+123", (("tag", "9"),), True),
    ],
)  # fmt: skip
def test_name_addr_forms(
    text: str,
    display: str | None,
    uri: str,
    params: tuple[tuple[str, str | None], ...],
    angle: bool,
) -> None:
    na = parse_name_addr(text)
    assert (na.display_name, na.uri, na.params, na.angle) == (display, uri, params, angle)
    again = parse_name_addr(str(na))
    assert (again.display_name, again.uri, again.params) == (display, uri, params)


@pytest.mark.parametrize(
    "text",
    ["", '"unterminated <sip:a@b>', "< sip:a@b >", "<sip:a@b", "sip:a@b?x=y", "sip:a@b,c@d",
     "just words", "<sip:a@b>;;", '"x" sip:a@b', "<>", "<sip:a@b>junk"],
)  # fmt: skip
def test_bad_name_addr(text: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_name_addr(text, header="To")
    assert info.value.reason.startswith("Bad To")


def test_name_addr_tag_helpers_and_str() -> None:
    na = parse_name_addr("sip:a@b")
    tagged = na.with_tag("xyz")
    assert tagged.tag == "xyz"
    assert na.tag is None
    assert str(tagged) == "sip:a@b;tag=xyz"
    assert str(tagged.with_tag("abc")) == "sip:a@b;tag=abc"
    assert str(NameAddr("Doe, John", "sip:j@d")) == '"Doe, John" <sip:j@d>'
    assert str(NameAddr(None, "sip:a@b;lr", angle=False)) == "<sip:a@b;lr>"


def test_parsed_uri_is_cached_and_not_part_of_equality() -> None:
    na = parse_name_addr("<sip:alice@example.com:5070>")
    uri = na.parsed_uri
    assert uri is na.parsed_uri
    assert na == parse_name_addr("<sip:alice@example.com:5070>")
    bad = parse_name_addr("<sip:a@b:99999>")
    with pytest.raises(ParseError):
        bad.parsed_uri  # noqa: B018


def test_contact() -> None:
    assert parse_contact(" * ") == "*"
    contact = parse_contact("<sip:u@h>;expires=0;q=0.5")
    assert isinstance(contact, NameAddr)
    assert contact.param("EXPIRES") == "0"
    assert contact.param("q") == "0.5"
    with pytest.raises(ParseError, match="Bad Contact"):
        parse_contact("sip:user@example.com?Route=%3Csip:sip.example.com%3E")


# ---------------------------------------------------------------- fast-path regexes

_POSSESSIVE = [
    _headers._VIA_COMMON,
    _headers._FROM_TO_COMMON,
    _headers._VIA_FROM_TO_COMMON,
    _headers._ANGLE_URI_COMMON,
    _headers._ADDR_SPEC_COMMON,
    _headers._URI_COMMON,
]
_FAST_PATH_TEXT = st.text(alphabet='SIP/2.0UDPudp sip:a1@[]:;=,<>"\\\nbranchtag~-+', max_size=60)


@pytest.mark.parametrize("fast", _POSSESSIVE, ids=lambda p: p.pattern[:30])
@settings(max_examples=300, deadline=None)
@given(text=_FAST_PATH_TEXT)
def test_possessive_fast_paths_match_as_their_backtracking_forms(
    fast: re.Pattern[str], text: str
) -> None:
    # The fast paths use possessive quantifiers for speed; they must accept
    # and capture exactly what the plain (backtracking) spelling would.
    plain = re.compile(
        fast.pattern.replace("++", "+").replace("*+", "*").replace("?+", "?").replace("}+", "}")
    )
    assert plain.pattern != fast.pattern
    for sample in (text, "SIP/2.0/UDP " + text, "<sip:" + text, "sip:" + text):
        got, want = fast.fullmatch(sample), plain.fullmatch(sample)
        assert (got and got.groups()) == (want and want.groups())
