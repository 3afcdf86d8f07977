"""RFC 4475 torture messages, walked from shared/testdata/rfc4475/INDEX.json.

How the index's categories map onto the parser (sansio_sip._message):
* valid-tortuous, valid-semantic-oddity: ``parse_message`` accepts the
  message, ``parse_message(bytes(m)) == m``, and the facts the engine needs
  are exposed (FACTS below). The oddities' statuses (416, 420, 415, 483, 200)
  are the engine's decisions; here we check the parser hands over what those
  decisions need.
* invalid-syntax: the fault is flagged with the index's expected_status
  (None = drop silently: bigcode), either by ``parse_message`` itself or, for
  a header parsed on first access, by the accessor of the header the index
  names (FLAGGED_BY). The engine reads those accessors first thing, so on the
  wire both answer the same (test_rfc4475_engine.py).
* invalid-semantic: the documented choice for each: insuf and mcl01 are
  refused by ``parse_message`` itself (400); badbranch parses and its branch
  is exactly the magic cookie, which the transaction layer rejects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sansio_sip import (
    AbsoluteUri,
    CSeq,
    ParseError,
    Request,
    Response,
    SipUri,
    parse_message,
    parse_uri,
)

TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "rfc4475"
INDEX = json.loads((TESTDATA / "INDEX.json").read_text())
ENTRIES = {entry["name"]: entry for entry in INDEX["messages"]}


def load(name: str) -> bytes:
    return (TESTDATA / ENTRIES[name]["file"]).read_bytes()


def _wsinv(m: Any) -> None:
    assert m.method == "INVITE"
    assert m.max_forwards == 68  # "0068"
    assert m.cseq == CSeq(9, "INVITE")  # "0009\r\n  INVITE"
    assert [v.transport for v in m.vias] == ["UDP", "TCP", "UDP"]
    assert [v.branch for v in m.vias] == ["390skdjuw", "z9hG4bK9ikj8", "z9hG4bK30239"]
    assert m.vias[1].host == "spindle.example.com"
    assert m.to.tag == "1918181833n"
    assert m.from_.display_name == 'J Rosenberg \\"'
    assert m.from_.tag == "98asjd8"
    assert m.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert m.headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert m.headers.get("Subject") == ""
    [contact] = m.contacts
    assert contact.display_name == 'Quoted string ""'
    assert contact.param("newparam") == "newvalue"
    assert contact.param("q") == "0.33"
    assert contact.has_param("secondparam")
    assert m.routes[0].parsed_uri.has_param("lr")
    assert len(m.body) == 150


def _intmeth(m: Any) -> None:
    assert m.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert m.cseq.method == m.method
    uri = m.to.parsed_uri
    assert isinstance(uri, SipUri)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert m.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert m.from_.display_name == "token1~` token2'+_ token3*%!.-"
    assert m.from_.tag == "_token~1'+`*%!-."
    assert m.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    ruri = parse_ruri(m)
    assert isinstance(ruri, SipUri)
    assert ruri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"


def parse_ruri(m: Request) -> Any:
    return parse_uri(m.uri)


def _esc01(m: Any) -> None:
    ruri = parse_ruri(m)
    assert ruri.user == "sips%3Auser%40example.com"  # kept as written for forwarding
    assert ruri.user_unescaped == "sips:user@example.com"
    assert m.to.parsed_uri.user_unescaped == "user"
    assert m.from_.parsed_uri.user_unescaped == "I have spaces"
    contact = m.contacts[0].parsed_uri
    assert contact.params == (("%6C%72", None), ("n%61me", "v%61lue%25%34%31"))
    assert m.content_type == "application/sdp"  # compact "C:"


def _escnull(m: Any) -> None:
    assert m.to.parsed_uri.user_unescaped == "null-\x00-null"
    assert [c.parsed_uri.user_unescaped for c in m.contacts] == ["\x00", "\x00\x00"]


def _lwsdisp(m: Any) -> None:
    assert m.from_.display_name == "caller"
    assert m.from_.uri == "sip:caller@example.com"


def _longreq(m: Any) -> None:
    assert len(m.vias) == 34
    assert len(m.from_.tag) > 100
    assert len(m.call_id) > 100


def _dblreq(m: Any) -> None:
    assert m.method == "REGISTER"
    assert m.body == b""  # the trailing INVITE is discarded


def _mpart01(m: Any) -> None:
    assert len(m.body) == int(m.headers.get("Content-Length"))
    assert b"\x00" in m.body
    assert m.content_type == "multipart/mixed"


def _noreason(m: Any) -> None:
    assert isinstance(m, Response)
    assert (m.status_code, m.reason) == (100, "")


def _unkscm(m: Any) -> None:
    ruri = parse_ruri(m)
    assert isinstance(ruri, AbsoluteUri)
    assert ruri.scheme == "nobodyknowsthisscheme"


def _unksm2(m: Any) -> None:
    assert isinstance(m.to.parsed_uri, AbsoluteUri)
    assert m.to.parsed_uri.scheme == "isbn"
    assert m.from_.parsed_uri.scheme == "http"
    assert m.contacts[0].parsed_uri.scheme == "name"


def _bext01(m: Any) -> None:
    assert m.headers.get_all("Require") == ["nothingSupportsThis", "nothingSupportsThisEither"]
    assert m.headers.get_all("Proxy-Require") == [
        "noProxiesSupportThis",
        "norDoAnyProxiesSupportThis",
    ]


def _invut(m: Any) -> None:
    assert m.content_type == "application/unknownformat"


def _bcast(m: Any) -> None:
    assert m.vias[1].host == "255.255.255.255"


def _zeromf(m: Any) -> None:
    assert m.max_forwards == 0


def _cparam01(m: Any) -> None:
    [contact] = m.contacts
    assert not contact.angle
    assert contact.has_param("unknownparam")  # a header (contact) parameter...
    assert contact.parsed_uri.params == ()  # ...not a URI parameter


def _regescrt(m: Any) -> None:
    [contact] = m.contacts
    assert contact.parsed_uri.headers == (("Route", "%3Csip:sip.example.com%3E"),)
    assert "Route=%3Csip:sip.example.com%3E" in str(contact)


def _badbranch(m: Any) -> None:
    assert m.top_via.branch == "z9hG4bK"  # only the cookie: the transaction layer refuses it


FACTS: dict[str, Callable[[Any], None]] = {
    "wsinv": _wsinv,
    "intmeth": _intmeth,
    "esc01": _esc01,
    "escnull": _escnull,
    "lwsdisp": _lwsdisp,
    "longreq": _longreq,
    "dblreq": _dblreq,
    "mpart01": _mpart01,
    "noreason": _noreason,
    "unkscm": _unkscm,
    "unksm2": _unksm2,
    "bext01": _bext01,
    "invut": _invut,
    "bcast": _bcast,
    "zeromf": _zeromf,
    "cparam01": _cparam01,
    "regescrt": _regescrt,
    "badbranch": _badbranch,
}
# invalid-semantic messages parse_message itself refuses, with the answer.
REFUSED_AT_PARSE = {"insuf": 400, "mcl01": 400}


def test_index_is_complete() -> None:
    for entry in INDEX["messages"]:
        assert (TESTDATA / entry["file"]).stat().st_size == entry["size"]
    accepted = [e["name"] for e in INDEX["messages"] if e["category"] != "invalid-syntax"]
    assert set(accepted) == set(FACTS) | set(REFUSED_AT_PARSE)


# The accessor of the header each invalid-syntax message gets wrong, as the
# index's "expected" text names it; parse_message leaves these headers for
# first access. A message not listed must be refused by parse_message.
FLAGGED_BY = {
    "badinv01": "vias",  # "Via and Contact carry stray ';' and ','"
    "quotbal": "to",  # "the To display name opens a quote that is never closed"
    "badaspec": "to",  # "the To addr-spec has spaces inside the angle brackets"
    "regbadct": "contacts",  # a REGISTER: refused at parse time, see below
}
REFUSED_BY_PARSE_MESSAGE = {"regbadct"}  # a registrar judges the binding first


@pytest.mark.parametrize(
    "name", [e["name"] for e in INDEX["messages"] if e["category"] == "invalid-syntax"]
)
def test_invalid_syntax_is_refused(name: str) -> None:
    expected = ENTRIES[name]["expected_status"]
    with pytest.raises(ParseError) as info:
        message = parse_message(load(name))
        accessor = FLAGGED_BY.get(name)
        if accessor is None or name in REFUSED_BY_PARSE_MESSAGE:
            pytest.fail(f"{name}: parse_message accepted it")
        getattr(message, accessor)
    assert info.value.status_code == expected


@pytest.mark.parametrize("name", sorted(REFUSED_AT_PARSE))
def test_invalid_semantic_refused_at_parse(name: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_message(load(name))
    assert info.value.status_code == REFUSED_AT_PARSE[name]


@pytest.mark.parametrize("name", sorted(FACTS))
def test_accepted_messages_parse_round_trip_and_expose_facts(name: str) -> None:
    message = parse_message(load(name))
    assert parse_message(bytes(message)) == message
    FACTS[name](message)


def test_insuf_names_the_missing_header() -> None:
    with pytest.raises(ParseError, match="Missing"):
        parse_message(load("insuf"))


def test_mismatch01_reason() -> None:
    with pytest.raises(ParseError, match="CSeq method does not match"):
        parse_message(load("mismatch01"))
