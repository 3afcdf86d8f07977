"""Messages: Headers multimap, parse_message, serialisation, accessors, make_response."""

from __future__ import annotations

import contextlib

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sansio_sip import (
    CSeq,
    Headers,
    ParseError,
    Request,
    Response,
    Via,
    is_keepalive,
    make_response,
    parse_message,
    parse_name_addr,
    parse_via,
)

INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK.top;rport\r\n"
    b"v: SIP/2.0/TCP proxy.example.net;branch=z9hG4bK.p1, SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK.p2\r\n"
    b'From: "Alice" <sip:alice@example.com>;tag=a1\r\n'
    b"t: <sip:bob@example.com>\r\n"
    b"Call-ID: c1@192.0.2.10\r\n"
    b"CSeq: 7 INVITE\r\n"
    b"Max-Forwards: 70\r\n"
    b"Contact: <sip:alice@192.0.2.10:5060>\r\n"
    b'Authorization: Digest username="alice", realm="example.com", nonce="n,1", uri="sip:bob@example.com", response="x"\r\n'
    b"Supported: replaces, timer\r\n"
    b"Supported: 100rel\r\n"
    b"Content-Type: application/SDP; charset=utf-8\r\n"
    b"Content-Length: 4\r\n"
    b"\r\n"
    b"v=0\n"
)


def parse_request(data: bytes = INVITE) -> Request:
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


# ---------------------------------------------------------------- Headers


def test_headers_lookup_is_case_insensitive_and_knows_compact_forms() -> None:
    h = Headers([("v", "SIP/2.0/UDP a"), ("Via", "SIP/2.0/UDP b"), ("X-Thing", "1")])
    assert "VIA" in h
    assert "x-thing" in h
    assert "Route" not in h
    assert h.get("via") == "SIP/2.0/UDP a"
    assert h.get("V") == "SIP/2.0/UDP a"
    assert h.get("Route") is None
    assert h.get("Route", "dflt") == "dflt"
    assert h.get_all("Via") == ["SIP/2.0/UDP a", "SIP/2.0/UDP b"]
    assert len(h) == 3
    assert list(h) == [("v", "SIP/2.0/UDP a"), ("Via", "SIP/2.0/UDP b"), ("X-Thing", "1")]


def test_get_all_splits_list_headers_only() -> None:
    m = parse_request()
    assert m.headers.get_all("Supported") == ["replaces", "timer", "100rel"]
    assert len(m.headers.get_all("Via")) == 3
    [auth] = m.headers.get_all("Authorization")
    assert auth.startswith("Digest username=") and 'nonce="n,1"' in auth
    h = Headers([("Date", "Sat, 13 Nov 2010 23:29:00 GMT"), ("X-List", "a, b")])
    assert h.get_all("Date") == ["Sat, 13 Nov 2010 23:29:00 GMT"]
    assert h.get_all("X-List") == ["a, b"]  # unknown headers are never split
    h = Headers([("WWW-Authenticate", 'Digest realm="a", nonce="b"')])
    assert h.get_all("www-authenticate") == ['Digest realm="a", nonce="b"']


def test_headers_mutation() -> None:
    h = Headers([("A", "1"), ("B", "2"), ("a", "3"), ("C", "4")])
    h.set("A", "9")
    assert list(h) == [("A", "9"), ("B", "2"), ("C", "4")]
    h.set("D", "5")
    assert list(h)[-1] == ("D", "5")
    h.insert(0, "Z", "0")
    assert next(iter(h)) == ("Z", "0")
    h.add("B", "6")
    assert h.get_all("b") == ["2", "6"]
    assert h.remove("B") == 2
    assert h.remove("B") == 0
    assert list(h) == [("Z", "0"), ("A", "9"), ("C", "4"), ("D", "5")]
    copy = h.copy()
    copy.add("E", "7")
    assert "E" not in h
    assert copy != h
    copy.remove("E")
    assert copy == h


_NAMES = st.sampled_from(["Via", "v", "VIA", "To", "t", "Contact", "m", "X-A", "x-a", "Route"])
_MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["add", "insert", "set", "remove", "pop", "get"]),
        _NAMES,
        st.integers(-3, 6),
        st.sampled_from(["1", "2, 3", "<sip:a@b>"]),
    ),
    max_size=12,
)


@settings(max_examples=100)
@given(st.lists(st.tuples(_NAMES, st.sampled_from(["a", "b, c"])), max_size=6), _MUTATIONS)
def test_headers_index_follows_every_mutation(
    start: list[tuple[str, str]], mutations: list[tuple[str, str, int, str]]
) -> None:
    # The index is kept up to date by add/insert/set rather than rebuilt: after
    # any sequence, look-ups agree with a fresh Headers of the same fields.
    h = Headers(start)
    for op, name, at, value in mutations:
        if op == "add":
            h.add(name, value)
        elif op == "insert":
            h.insert(at, name, value)
        elif op == "set":
            h.set(name, value)
        elif op == "remove":
            h.remove(name)
        elif op == "pop":
            h.pop_first_value(name)
        else:
            h.get(name)  # builds the index if a mutation dropped it
        fresh = Headers(list(h))
        for probe in ("via", "To", "contact", "X-A", "route", "From"):
            assert h.get(probe) == fresh.get(probe)
            assert h.get_all(probe) == fresh.get_all(probe)
            assert (probe in h) == (probe in fresh)


def test_pop_first_value() -> None:
    h = Headers([("Route", "<sip:p1;lr>, <sip:p2;lr>"), ("Route", "<sip:p3;lr>")])
    assert h.pop_first_value("route") == "<sip:p1;lr>"
    assert h.get_all("Route") == ["<sip:p2;lr>", "<sip:p3;lr>"]
    assert h.pop_first_value("Route") == "<sip:p2;lr>"
    assert list(h) == [("Route", "<sip:p3;lr>")]
    assert h.pop_first_value("Route") == "<sip:p3;lr>"
    assert h.pop_first_value("Route") is None
    assert len(h) == 0


def test_headers_refuse_injection() -> None:
    with pytest.raises(ValueError):
        Headers([("X", "a\r\nVia: evil")])
    h = Headers()
    with pytest.raises(ValueError):
        h.add("Bad Name", "x")
    with pytest.raises(ValueError):
        h.set("X", "a\nb")


# ---------------------------------------------------------------- parsing


def test_parse_invite_accessors() -> None:
    m = parse_request()
    assert (m.method, m.uri, m.version) == ("INVITE", "sip:bob@example.com", "SIP/2.0")
    assert m.call_id == "c1@192.0.2.10"
    assert m.cseq == CSeq(7, "INVITE")
    assert attrs.asdict(m.cseq) == attrs.asdict(CSeq(7, "INVITE"))  # built without __init__
    assert [v.branch for v in m.vias] == ["z9hG4bK.top", "z9hG4bK.p1", "z9hG4bK.p2"]
    assert m.top_via.sent_by == "192.0.2.10:5060"
    assert m.from_.display_name == "Alice"
    assert m.from_.tag == "a1"
    assert m.to.tag is None
    assert m.max_forwards == 70
    assert m.content_type == "application/sdp"
    assert m.body == b"v=0\n"
    assert m.routes == []
    assert m.expires is None
    [contact] = m.contacts
    assert contact != "*"


def test_accessor_cache_is_dropped_on_mutation() -> None:
    m = parse_request()
    assert m.cseq.number == 7
    m.headers.set("CSeq", "8 INVITE")
    assert m.cseq.number == 8
    m.headers.pop_first_value("Via")
    assert m.top_via.branch == "z9hG4bK.p1"
    m.headers.remove("Call-ID")
    with pytest.raises(ParseError, match="Missing Call-ID") as info:
        m.call_id  # noqa: B018
    assert info.value.status_code == 400
    m.headers.add("Max-Forwards", "x")
    m.headers.set("Max-Forwards", "256")
    with pytest.raises(ParseError, match="Bad Max-Forwards"):
        m.max_forwards  # noqa: B018


def test_accessor_errors_in_responses_and_acks_are_drops() -> None:
    response = Response(200, "OK", [("Via", "SIP/2.0/UDP h;branch=z9hG4bK1")])
    with pytest.raises(ParseError) as info:
        response.cseq  # noqa: B018
    assert info.value.status_code is None
    ack = Request("ACK", "sip:a@b", [("CSeq", "x")])
    with pytest.raises(ParseError) as info:
        ack.cseq  # noqa: B018
    assert info.value.status_code is None


def test_folding_lws_and_compact_names() -> None:
    data = (
        b"OPTIONS sip:a@b SIP/2.0\r\n"
        b"Via  :  SIP/2.0/UDP h\r\n  ;branch=z9hG4bK1\r\n"
        b"f: <sip:c@d>;tag=1\r\nt: sip:a@b\r\ni: x\r\nCSEQ: 1\r\n\tOPTIONS\r\nl: 0\r\n\r\n"
    )
    m = parse_request(data)
    assert m.top_via.branch == "z9hG4bK1"
    assert m.cseq == CSeq(1, "OPTIONS")
    assert m.headers.get("Via") == "SIP/2.0/UDP h ;branch=z9hG4bK1"
    assert parse_message(bytes(m)) == m


def test_leading_crlf_and_trailing_bytes() -> None:
    m = parse_request(b"\r\n\r\n" + INVITE + b"garbage after the body")
    assert m.body == b"v=0\n"


def test_no_content_length_takes_the_rest_and_short_one_truncates() -> None:
    base = INVITE.replace(b"Content-Length: 4\r\n", b"")
    assert parse_request(base + b"more").body == b"v=0\nmore"
    short = INVITE.replace(b"Content-Length: 4", b"Content-Length: 2")
    assert parse_request(short).body == b"v="


def test_duplicate_equal_content_length_is_accepted() -> None:
    data = INVITE.replace(b"Content-Length: 4\r\n", b"Content-Length: 4\r\nl: 4\r\n")
    assert parse_request(data).body == b"v=0\n"


@pytest.mark.parametrize(
    ("data", "reason", "status"),
    [
        (INVITE.replace(b"Content-Length: 4", b"Content-Length: 5"), "exceeds", 400),
        (INVITE.replace(b"Content-Length: 4", b"Content-Length: four"), "Bad Content-Length", 400),
        (INVITE.replace(b"Content-Length: 4\r\n", b"Content-Length: 4\r\nl: 3\r\n"), "Conflicting", 400),
        (INVITE.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1), "Version", 505),
        (INVITE.replace(b"INVITE sip", b"INVITE  sip"), "request line", 400),
        (INVITE.replace(b"Call-ID: c1@192.0.2.10\r\n", b""), "Missing Call-ID", 400),
        (INVITE.replace(b"CSeq: 7 INVITE", b"CSeq: 7 BYE"), "CSeq method does not match", 400),
        (INVITE.replace(b"CSeq: 7 INVITE", b"CSeq: 7 INVITE\r\nCSeq: 8 INVITE"), "CSeq", 400),
        (INVITE.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards 70\r\n"), "header line", 400),
        (INVITE.replace(b"Max-Forwards", b"Max Forwards"), "header", 400),
        (INVITE.replace(b"Alice", b"Al\xffce"), "Invalid UTF-8", 400),
        (INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards: 7\r0"), "Bare CR", 400),
        (INVITE.replace(b"\r\n\r\n", b"\r\n"), "end of header", None),
        (b"", "Empty", None),
        (b"\r\n\r\n", "Empty", None),
        (b"HELLO WORLD\r\n\r\n", "Not a SIP message", None),
        (INVITE.replace(b"INVITE", b"ACK").replace(b"Call-ID: c1@192.0.2.10\r\n", b""), "Missing Call-ID", None),
        (INVITE.replace(b"INVITE sip:bob@example.com SIP/2.0", b"ACK sip:bob@example.com SIP/7.0"), "Version", None),
        (INVITE + b"x" * 70000, "Too Large", 513),
    ],
)  # fmt: skip
def test_refused_requests(data: bytes, reason: str, status: int | None) -> None:
    with pytest.raises(ParseError, match=reason) as info:
        parse_message(data)
    assert info.value.status_code == status


@pytest.mark.parametrize(
    ("data", "accessor", "reason", "status"),
    [
        (INVITE.replace(b"t: <sip:bob@example.com>", b"t: <sip:bob@example.com"), "to", "Bad To", 400),
        (INVITE.replace(b'"Alice" <', b'"Alice <'), "from_", "Bad From", 400),
        (INVITE.replace(b"branch=z9hG4bK.top;rport", b"branch=z9hG4bK.top;;"), "top_via", "Bad Via", 400),
        (INVITE.replace(b"10.0.0.1;branch", b"10.0.0.1 junk;branch"), "vias", "Bad Via", 400),
        (INVITE.replace(b"<sip:alice@192.0.2.10:5060>", b"<sip:alice@192.0.2.10:5060"), "contacts", "Bad Contact", 400),
        (INVITE.replace(b"INVITE", b"ACK").replace(b"t: <sip:bob@example.com>", b"t: <>"), "to", "Bad To", None),
    ],
)  # fmt: skip
def test_lazily_parsed_headers_raise_from_their_accessor(
    data: bytes, accessor: str, reason: str, status: int | None
) -> None:
    message = parse_message(data)  # parsed on first access, not here
    with pytest.raises(ParseError, match=reason) as info:
        getattr(message, accessor)
    assert info.value.status_code == status
    with pytest.raises(ParseError, match=reason):
        getattr(message, accessor)  # a fault is not cached away


def test_top_via_alone_and_then_all_vias_agree() -> None:
    m = parse_request(INVITE.replace(b"10.0.0.1;branch", b"10.0.0.1 junk;branch"))
    assert m.top_via.branch == "z9hG4bK.top"  # the lower Vias wait for m.vias
    good = parse_request()
    assert good.top_via.branch == "z9hG4bK.top"
    assert [v.branch for v in good.vias] == ["z9hG4bK.top", "z9hG4bK.p1", "z9hG4bK.p2"]
    assert good.top_via is good.vias[0]
    fresh = parse_request()
    assert fresh.vias[0] is fresh.top_via


VIA_FROM_TO = [
    ("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK.a;rport", '"Alice" <sip:a@example.com>;tag=1', "sip:b@example.com"),
    ("SIP/2.0/udp [2001:db8::1]:5070;branch=z9hG4bK.b;rport=5;received=192.0.2.1", '"" <sip:a@x>', "<sip:b@x>;tag=2"),
    ("SIP/2.0/TLS host.example.com;branch=z9hG4bK.c", "sip:a@x;tag=3", '"B" <sips:b@x;transport=tcp?h=v>'),
    ("SIP/2.0/UDP h:05060;branch=z9hG4bK.d", "<sip:a@x>;tag=4;x=y", "Bob <sip:b@x>"),
    ("SIP/2.0/UDP h:65536;branch=z9hG4bK.e", "<sip:a@x>;tag=5", "sip:b@x"),
    ("SIP/2.0/UDP h;branch=z9hG4bK.f;a;b;c", '"A \\"q\\"" <sip:a@x>;tag=6', "sip:b@x;TAG=7"),
]  # fmt: skip


@pytest.mark.parametrize(("via", "from_", "to"), VIA_FROM_TO)
def test_via_from_to_read_together_equal_each_read_alone(via: str, from_: str, to: str) -> None:
    # parse_message parses the top Via, From and To in one regex call when
    # all three have the usual shape; otherwise each accessor parses its own
    # on first access. Both must give the same objects, or the same error.
    data = (
        INVITE.replace(b"SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK.top;rport", via.encode())
        .replace(b'"Alice" <sip:alice@example.com>;tag=a1', from_.encode())
        .replace(b"<sip:bob@example.com>\r\n", to.encode() + b"\r\n")
    )
    for first in ("top_via", "from_", "to"):
        message = parse_message(data)
        for accessor in (first, "top_via", "from_", "to"):
            try:
                got = getattr(message, accessor)
            except ParseError as exc:
                got = exc.reason
            if accessor == "top_via":
                try:
                    alone: object = parse_via(via)
                except ParseError:
                    alone = "Bad Via"
                else:
                    assert isinstance(got, Via)
                    assert (got.sent_by, got.branch) == (alone.sent_by, alone.branch)  # type: ignore[attr-defined]
            else:
                alone = parse_name_addr(from_ if accessor == "from_" else to)
            assert got == alone
            if not isinstance(got, str):  # every field set, and the same
                assert attrs.asdict(got, recurse=False) == attrs.asdict(alone, recurse=False)  # type: ignore[arg-type]


def test_register_contact_is_checked_at_parse_time() -> None:
    register = (
        INVITE.replace(b"INVITE sip:bob@example.com", b"REGISTER sip:example.com")
        .replace(b"7 INVITE", b"7 REGISTER")
        .replace(b"<sip:alice@192.0.2.10:5060>", b"sip:alice@192.0.2.10?Route=x")
    )
    with pytest.raises(ParseError, match="Bad Contact") as info:
        parse_message(register)
    assert info.value.status_code == 400


def test_fields_split_at_other_separators_equal_the_usual_ones() -> None:
    usual = parse_request()
    spaced = parse_request(
        INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards:70")
        .replace(b"CSeq: 7 INVITE", b"CSeq :  7 INVITE \t")
        .replace(b"Supported: 100rel", b"SUPPORTED:\t100rel  ")
    )
    assert [(n.lower(), v) for n, v in spaced.headers] == [(n.lower(), v) for n, v in usual.headers]
    assert spaced.cseq == usual.cseq
    assert spaced.max_forwards == 70
    assert spaced.headers.get_all("supported") == ["replaces", "timer", "100rel"]


def test_max_size_parameter() -> None:
    with pytest.raises(ParseError, match="Too Large") as info:
        parse_message(INVITE, max_size=100)
    assert info.value.status_code == 513


RESPONSE = (
    b"SIP/2.0 180 Ringing\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK.top;received=203.0.113.1;rport=1234\r\n"
    b"From: <sip:alice@example.com>;tag=a1\r\n"
    b"To: <sip:bob@example.com>;tag=b2\r\n"
    b"Call-ID: c1\r\n"
    b"CSeq: 7 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def test_parse_response() -> None:
    m = parse_message(RESPONSE)
    assert isinstance(m, Response)
    assert (m.status_code, m.reason) == (180, "Ringing")
    assert m.top_via.rport == 1234
    assert m.to.tag == "b2"
    assert parse_message(bytes(m)) == m
    multi_word = parse_message(RESPONSE.replace(b"180 Ringing", b"183 Session  Progress "))
    assert isinstance(multi_word, Response)
    assert multi_word.reason == "Session  Progress "  # kept as written


@pytest.mark.parametrize(
    "data",
    [
        RESPONSE.replace(b"180", b"099"),
        RESPONSE.replace(b"180", b"700"),
        RESPONSE.replace(b"180", b"18"),
        RESPONSE.replace(b"180", b"4294967301"),
        RESPONSE.replace(b"SIP/2.0 180", b"SIP/3.0 180"),
        RESPONSE.replace(b"Call-ID: c1\r\n", b""),
        RESPONSE.replace(b"CSeq: 7 INVITE", b"CSeq: INVITE"),
        RESPONSE.replace(b"Content-Length: 0", b"Content-Length: 10"),
    ],
)
def test_broken_responses_are_dropped(data: bytes) -> None:
    with pytest.raises(ParseError) as info:
        parse_message(data)
    assert info.value.status_code is None


def test_is_keepalive() -> None:
    assert is_keepalive(b"\r\n\r\n")
    assert is_keepalive(b"\r\n")
    assert not is_keepalive(b"")
    assert not is_keepalive(INVITE)


# ---------------------------------------------------------------- serialisation


def test_serialise_sets_content_length_in_place_or_appends() -> None:
    r = Request("OPTIONS", "sip:a@b", [("Via", "SIP/2.0/UDP h"), ("l", "99"), ("X", "y")], b"abc")
    assert bytes(r) == (b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h\r\nl: 3\r\nX: y\r\n\r\nabc")
    assert r.headers.get("l") == "99"  # serialising does not mutate
    r = Response(200, "OK", [("Via", "SIP/2.0/UDP h")])
    assert bytes(r) == b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h\r\nContent-Length: 0\r\n\r\n"


def test_equality_ignores_content_length_only() -> None:
    a = parse_request()
    b = parse_request(INVITE.replace(b"Content-Length: 4\r\n", b""))
    assert a == b
    b.headers.add("X", "1")
    assert a != b
    assert a != "INVITE"


# ---------------------------------------------------------------- make_response


def test_make_response_copies_the_required_headers() -> None:
    request = parse_request()
    response = make_response(
        request,
        200,
        "OK",
        to_tag="srv1",
        headers=[("Contact", "<sip:b2b@198.51.100.1>")],
        body=b"x",
    )
    assert [name for name, _ in response.headers] == [
        "Via", "Via", "From", "To", "Call-ID", "CSeq", "Contact"
    ]  # fmt: skip
    assert response.headers.get_all("Via") == request.headers.get_all("Via")
    assert response.to.tag == "srv1"
    assert response.from_ == request.from_
    assert response.cseq == request.cseq
    wire = parse_message(bytes(response))
    assert wire == response
    assert wire.body == b"x"


def test_make_response_keeps_an_existing_to_tag() -> None:
    request = parse_request(
        INVITE.replace(b"t: <sip:bob@example.com>", b"t: <sip:bob@example.com>;tag=old")
    )
    response = make_response(request, 481, "Call/Transaction Does Not Exist", to_tag="new")
    assert response.to.tag == "old"
    assert make_response(request, 100, "Trying").to.tag == "old"


# ---------------------------------------------------------------- properties

_TOKEN = st.text(
    alphabet=st.sampled_from(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
    ),
    min_size=1,
    max_size=12,
)
_HOST = st.from_regex(r"[a-z][a-z0-9\-]{0,10}(\.[a-z][a-z0-9]{0,6}){0,2}", fullmatch=True)
_VALIDATED = {
    "via", "v", "from", "f", "to", "t", "call-id", "i", "cseq", "contact", "m", "date",
    "content-length", "l",
}  # fmt: skip
_EXTRA_NAME = _TOKEN.filter(lambda n: n.lower() not in _VALIDATED)
_VALUE = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=30
).map(lambda v: v.strip(" \t"))


@st.composite
def messages(draw: st.DrawFn) -> Request | Response:
    call_id = draw(_TOKEN) + "@" + draw(_HOST)
    method = draw(st.sampled_from(["INVITE", "REGISTER", "BYE", "OPTIONS"]) | _TOKEN)
    port = draw(st.none() | st.integers(1, 65535))
    sent_by = draw(_HOST) + ("" if port is None else f":{port}")
    fields = [
        (
            draw(st.sampled_from(["Via", "v", "VIA"])),
            f"SIP/2.0/UDP {sent_by};branch=z9hG4bK{draw(_TOKEN)}",
        ),
        ("From", f"<sip:{draw(_TOKEN)}@{draw(_HOST)}>;tag={draw(_TOKEN)}"),
        (draw(st.sampled_from(["To", "t"])), f"sip:{draw(_TOKEN)}@{draw(_HOST)}"),
        ("Call-ID", call_id),
        ("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}"),
    ]
    for _ in range(draw(st.integers(0, 5))):
        fields.insert(draw(st.integers(0, len(fields))), (draw(_EXTRA_NAME), draw(_VALUE)))
    body = draw(st.binary(max_size=50))
    if draw(st.booleans()):
        return Request(method, f"sip:{draw(_TOKEN)}@{draw(_HOST)}", fields, body)
    return Response(draw(st.integers(100, 699)), draw(_VALUE), fields, body)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_serialise_then_parse_is_identity(message: Request | Response) -> None:
    assert parse_message(bytes(message)) == message


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_parse_error(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_message(data)


@settings(max_examples=200)
@given(st.integers(0, len(INVITE)), st.integers(0, 20), st.binary(min_size=1, max_size=8))
def test_mutated_messages_parse_or_raise_parse_error(at: int, cut: int, insert: bytes) -> None:
    data = INVITE[:at] + insert + INVITE[at + cut :]
    try:
        message = parse_message(data)
    except ParseError:
        return
    # Whatever was accepted can be read back (or its accessor says what is
    # wrong) and serialised again.
    for accessor in ("top_via", "vias", "from_", "to", "contacts", "routes", "call_id", "cseq"):
        with contextlib.suppress(ParseError):
            getattr(message, accessor)
    assert parse_message(bytes(message)) == message


# -- as_received -----------------------------------------------------------------

_RECEIVED = (
    b"\r\n\r\nINVITE sip:17752180264@sip.kx21.com SIP/2.0\r\n"
    b"v: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-r1;rport\r\n"
    b"f:<sip:acme@sip.kx21.com>;tag=a\r\n"
    b"t: <sip:17752180264@sip.kx21.com>\r\n"
    b"i: r1@10.0.0.7\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"l: 4\r\n"
    b"\r\n"
    b"abcdTRAILING"
)


def test_as_received_is_the_datagram_as_read_without_leading_crlf_or_trailing_bytes() -> None:
    message = parse_message(_RECEIVED)
    expected = _RECEIVED[4 : _RECEIVED.index(b"abcd") + 4]
    assert message.as_received() == expected
    # Serialising writes the same fields again, in their received names but
    # with ": " after each: not the bytes that came.
    assert bytes(message) != expected
    assert parse_message(message.as_received()) == message


def test_as_received_follows_any_change_to_the_message() -> None:
    header_changed = parse_message(_RECEIVED)
    header_changed.headers.add("Subject", "x")
    body_changed = parse_message(_RECEIVED)
    body_changed.body = b"wxyz"
    uri_changed = parse_message(_RECEIVED)
    assert isinstance(uri_changed, Request)
    uri_changed.uri = "sip:1@elsewhere"
    for changed in (header_changed, body_changed, uri_changed):
        assert changed.as_received() == bytes(changed)
    response = parse_message(b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK-1\r\n"
                             b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: x\r\n"
                             b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")  # fmt: skip
    assert isinstance(response, Response)
    assert response.as_received() == bytes(response)
    response.reason = "Ringing Loudly"
    assert response.as_received() == bytes(response)
    assert b"Ringing Loudly" in response.as_received()


def test_a_message_built_here_is_its_serialisation() -> None:
    built = Request("OPTIONS", "sip:x", [("Call-ID", "1"), ("CSeq", "1 OPTIONS")])
    assert built.as_received() == bytes(built)
