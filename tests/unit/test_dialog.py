"""Dialog helpers (sansio_sip._dialog): the fast paths give what the general
parse gives, and the requests kx-sipd builds inside a dialog."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sansio_sip._dialog import Leg, make_request, without_tag
from sansio_sip._errors import ParseError
from sansio_sip._headers import parse_name_addr
from sansio_sip._message import parse_message
from sansio_sip._model import Transport


def _general(value: str) -> str:
    """without_tag as the parse-and-format path computes it."""
    try:
        name_addr = parse_name_addr(value)
    except ParseError:
        return value
    params = tuple((k, v) for k, v in name_addr.params if k.lower() != "tag")
    return str(attrs.evolve(name_addr, params=params))


@pytest.mark.parametrize(
    "value",
    [
        "<sip:17752180264@anchor.test>",
        "<sip:1001@example.com;user=phone>",
        "<sip:1001@[2001:db8::1]:5060>",
        "<tel:+1-555-0100>",
        "<sip:a@b?subject=x>",
        "< sip:a@b>",
        "<sip:a@b >",
        "<>",
        "<sip:a@b>;tag=abc",
        "<sip:a@b>;TAG=abc;x=y",
        '"Alice" <sip:a@b>;tag=1',
        "Alice  Smith <sip:a@b>",
        "sip:a@b;tag=1",
        "<sip:a@b><sip:c@d>",
    ],
)
def test_without_tag_matches_the_general_path(value: str) -> None:
    assert without_tag(value) == _general(value)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="<>sip:@ab;=tag\"' .[]1", max_size=30))
def test_without_tag_matches_the_general_path_on_any_text(value: str) -> None:
    assert without_tag(value) == _general(value)


def _leg(**overrides: object) -> Leg:
    fields: dict[str, object] = {
        "name": "B",
        "call_id": "b-call@kx",
        "local_tag": "ltag",
        "local_header": "<sip:1001@203.0.113.1>",
        "remote_header": "<sip:17752180264@192.0.2.50>",
        "remote_target": "sip:17752180264@192.0.2.50:5060",
        "destination": ("192.0.2.50", 5060),
        "transport": Transport.UDP,
        "connection": None,
    }
    fields.update(overrides)
    return Leg(**fields)  # type: ignore[arg-type]


def test_an_invite_has_its_fields_in_order_and_parses_back() -> None:
    leg = _leg(route_set=("<sip:p1;lr>", "<sip:p2;lr>"))
    request = make_request(
        leg, "INVITE", sip_address=("203.0.113.1", 5060), branch="z9hG4bKx",
        user_agent="kx-sipd", extra=(("Max-Forwards", "69"),), body=b"v=0\r\n",
    )  # fmt: skip
    assert [name for name, _ in request.headers] == [
        "Via", "Route", "Route", "From", "To", "Call-ID", "CSeq", "Contact",
        "Max-Forwards", "Allow", "User-Agent", "Content-Type",
    ]  # fmt: skip
    assert leg.local_cseq == 1
    again = parse_message(bytes(request))
    assert again == request
    assert again.headers.get("From") == "<sip:1001@203.0.113.1>;tag=ltag"
    assert again.headers.get("CSeq") == "1 INVITE"
    assert again.headers.get("Via") == "SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKx;rport"


def test_an_ack_keeps_the_invite_cseq_and_gets_max_forwards_70() -> None:
    leg = _leg(transport=Transport.TCP, local_cseq=4)
    ack = make_request(
        leg, "ACK", sip_address=("203.0.113.1", 5060), branch="z9hG4bKy",
        user_agent="kx-sipd", cseq=4,
    )  # fmt: skip
    assert leg.local_cseq == 4
    assert [name for name, _ in ack.headers] == [
        "Via", "Max-Forwards", "From", "To", "Call-ID", "CSeq", "User-Agent",
    ]  # fmt: skip
    assert ack.headers.get("Max-Forwards") == "70"
    assert ack.headers.get("Via", "").startswith("SIP/2.0/TCP ")
    with pytest.raises(ValueError):
        make_request(
            _leg(remote_header="<sip:a@b>\r\nX: y"), "BYE", sip_address=("203.0.113.1", 5060),
            branch="z9hG4bKz", user_agent="kx-sipd",
        )  # fmt: skip
