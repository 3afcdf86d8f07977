"""Every RFC 4475 torture message fed to the whole engine over (virtual) UDP.

The parser-level checks live in test_rfc4475.py; this file checks the answer
a kx-sipd server gives on the wire, as INDEX.json and RFC 4475 describe it
for an element in kx-sipd's role (a registrar and UAS toward clients that
originates calls as a B2BUA): the status code, or a silent drop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_harness import Harness, Phone, account, parsed

from sansio_sip._digest import compute_ha1
from sansio_sip._message import Request, Response, parse_message

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "rfc4475"
INDEX = json.loads((VECTORS / "INDEX.json").read_text())
MESSAGES = {m["name"]: m for m in INDEX["messages"]}

# What kx-sipd answers to each valid message, in its role. Unauthenticated
# REGISTER and INVITE are challenged (guide §6); OPTIONS is answered.
EXPECTED: dict[str, int | None] = {
    "wsinv": 481,  # carries a To tag: a dialog kx-sipd does not have (§12.2.2)
    "intmeth": 405,  # an extension method: guide §8, 405 with Allow
    "esc01": 401,
    "escnull": 401,
    "lwsdisp": 200,
    "longreq": 401,
    "dblreq": 401,  # the REGISTER is processed, the trailing INVITE discarded
    "mpart01": 405,  # MESSAGE
    "noreason": None,  # a response nobody asked for
    "unkscm": 416,
    "unksm2": 400,  # a registrar refuses a non-SIP address-of-record
    "bext01": 420,
    "invut": 415,
    "bcast": None,  # a response: dropped, never forwarded to a broadcast address
    "zeromf": 200,  # OPTIONS with Max-Forwards 0: kx-sipd is the endpoint
    "cparam01": 401,
    "regescrt": 401,
    "badbranch": 200,  # RFC 2543 matching is the fallback (index: 400 also fine)
    "insuf": 400,
    "mcl01": 400,
}


def _answers(h: Harness, data: bytes) -> list[Response]:
    return [m for m in parsed(h.receive(data)) if isinstance(m, Response)]


def _status_lines(h: Harness, data: bytes) -> list[bytes]:
    return [s.data.split(b"\r\n", 1)[0] for s in h.receive(data)]


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_engine_answers_each_torture_message(name: str) -> None:
    entry = MESSAGES[name]
    data = (VECTORS / entry["file"]).read_bytes()
    h = Harness.make(account())
    lines = _status_lines(h, data)
    expected = EXPECTED.get(name, entry["expected_status"])
    if expected is None:
        assert lines == [], f"{name} must be dropped"
        return
    assert len(lines) == 1, lines
    assert lines[0].startswith(b"SIP/2.0 %d " % expected), (name, lines[0])
    reason = lines[0].split(b" ", 2)[2]
    assert reason.strip(), "the reason phrase names the fault"


def test_bext01_lists_the_unsupported_extensions_from_require() -> None:
    h = Harness.make()
    [answer] = _answers(h, (VECTORS / "bext01.dat").read_bytes())
    assert answer.headers.get("Unsupported") == "nothingSupportsThis, nothingSupportsThisEither"


def test_invut_announces_what_kx_sipd_accepts() -> None:
    h = Harness.make()
    [answer] = _answers(h, (VECTORS / "invut.dat").read_bytes())
    assert answer.headers.get("Accept") == "application/sdp"


def test_invite_with_max_forwards_zero_is_not_forwarded() -> None:
    h = Harness.make(account())
    data = (VECTORS / "zeromf.dat").read_bytes().replace(b"OPTIONS", b"INVITE")
    [answer] = _answers(h, data)
    assert answer.status_code == 483


def _register_with_auth(h: Harness, data: bytes, username: str) -> Response:
    first = parse_message(data)
    assert isinstance(first, Request)
    [challenge] = _answers(h, data)
    assert challenge.status_code == 401
    second = parse_message(data)
    assert isinstance(second, Request)
    second.headers.set("CSeq", f"{first.cseq.number + 1} REGISTER")
    second.headers.set("Via", "SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw-2")
    phone = Phone(username=username, password="pw")
    h.accounts[username] = account(username, "pw")
    phone.authorize(second, challenge)
    [answer] = _answers(h, bytes(second))
    return answer


def test_cparam01_registers_and_unknownparam_stays_a_contact_parameter() -> None:
    h = Harness.make()
    answer = _register_with_auth(h, (VECTORS / "cparam01.dat").read_bytes(), "watson")
    assert answer.status_code == 200
    contact = answer.headers.get("Contact") or ""
    assert contact.startswith("<sip:+19725552222@gw1.example.net>;unknownparam")
    assert compute_ha1("watson", "sip.kx21.com", "pw")


def test_regescrt_registers_and_keeps_the_escaped_route_header() -> None:
    h = Harness.make()
    answer = _register_with_auth(h, (VECTORS / "regescrt.dat").read_bytes(), "user")
    assert answer.status_code == 200
    assert "<sip:user@example.com?Route=%3Csip:sip.example.com%3E>" in (
        answer.headers.get("Contact") or ""
    )
