"""URI parsing: sip/sips, tel, other schemes (sansio_sip._uri)."""

from __future__ import annotations

import pytest

from sansio_sip import AbsoluteUri, ParseError, SipUri, TelUri, format_host, parse_uri, unescape


def test_full_sip_uri() -> None:
    uri = parse_uri("sips:alice:secret@[2001:db8::1]:5061;transport=TCP;lr?subject=hi&x=y")
    assert isinstance(uri, SipUri)
    assert uri.scheme == "sips"
    assert (uri.user, uri.password) == ("alice", "secret")
    assert uri.host == "2001:db8::1"
    assert uri.port == 5061
    assert uri.params == (("transport", "TCP"), ("lr", None))
    assert uri.transport == "tcp"
    assert uri.has_param("LR")
    assert uri.param("lr") is None
    assert uri.headers == (("subject", "hi"), ("x", "y"))
    assert uri.hostport == "[2001:db8::1]:5061"
    assert str(uri) == "sips:alice:secret@[2001:db8::1]:5061;transport=TCP;lr?subject=hi&x=y"


@pytest.mark.parametrize(
    "text",
    [
        "sip:example.com",
        "sip:+442071234567@sip.example.com;user=phone",
        "sip:1001@192.0.2.10:5060;transport=udp",
        "sip:%75se%72@example.com",
        "sip:host_with_underscore.example.com",
    ],
)
def test_sip_uris_round_trip(text: str) -> None:
    uri = parse_uri(text)
    assert isinstance(uri, SipUri)
    assert str(uri) == text


def test_scheme_is_case_insensitive() -> None:
    uri = parse_uri("SIP:bob@Example.COM")
    assert isinstance(uri, SipUri)
    assert uri.scheme == "sip"
    assert uri.host == "Example.COM"


def test_user_keeps_escapes_and_unescapes_on_demand() -> None:
    uri = parse_uri("sip:sips%3Auser%40example.com@example.net")
    assert isinstance(uri, SipUri)
    assert uri.user == "sips%3Auser%40example.com"
    assert uri.user_unescaped == "sips:user@example.com"
    assert uri.host == "example.net"


def test_unescape() -> None:
    assert unescape("a%20b") == "a b"
    assert unescape("null-%00-null") == "null-\x00-null"
    assert unescape("plain") == "plain"
    assert unescape("%C3%A9") == "é"
    assert unescape("%FF").encode("utf-8", "surrogateescape") == b"\xff"


def test_tel_uri() -> None:
    uri = parse_uri("tel:+1-201-555-0123;phone-context=example.com")
    assert isinstance(uri, TelUri)
    assert uri.number == "+1-201-555-0123"
    assert uri.param("phone-context") == "example.com"
    assert str(uri) == "tel:+1-201-555-0123;phone-context=example.com"


def test_other_schemes_are_kept_verbatim() -> None:
    uri = parse_uri("http://www.example.com/a?b=c")
    assert uri == AbsoluteUri("http", "http://www.example.com/a?b=c")
    assert str(uri) == "http://www.example.com/a?b=c"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nocolon",
        ":empty-scheme",
        "1sip:x",
        "sip:",
        "sip:user@",
        "sip:host:99999",
        "sip:host:port",
        "sip:us er@host",
        "sip:host;;lr",
        "sip:host;=x",
        "sip:[1.2.3.4]",
        "sip:bad%zzescape@host",
        "tel:",
        "tel:abc;=1",
        "http:",
        "http:has space",
        "http:<angle>",
    ],
)
def test_bad_uris(text: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_uri(text)
    assert info.value.status_code == 400
    assert "URI" in info.value.reason


def test_format_host() -> None:
    assert format_host("::1") == "[::1]"
    assert format_host("192.0.2.1") == "192.0.2.1"
    assert format_host("example.com") == "example.com"
