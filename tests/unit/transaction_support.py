"""Shared helpers for the transaction-layer tests: message builders and a
virtual clock runner. Time is just numbers; nothing here sleeps."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sansio_sip._actions import Send
from sansio_sip._events import Event
from sansio_sip._message import Request, Response, make_response, parse_message
from sansio_sip._transaction import TransactionLayer

TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata"

CLIENT = ("192.0.2.10", 5070)  # where test requests come from
CARRIER = ("198.51.100.7", 5060)  # where client transactions send to


def request(
    method: str = "INVITE",
    *,
    branch: str | None = "z9hG4bK-test-1",
    uri: str = "sip:17752180264@sip.kx21.com",
    via: str | None = None,
    sent_by: str = "192.0.2.10:5070",
    transport: str = "UDP",
    from_tag: str = "ftag1",
    to_tag: str | None = None,
    call_id: str = "call-1@192.0.2.10",
    cseq: int = 1,
    cseq_method: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
    more_vias: Iterable[str] = (),
) -> Request:
    """A request parsed from wire text, as the engine would see it."""
    if via is None:
        via = f"SIP/2.0/{transport} {sent_by}" + (f";branch={branch}" if branch else "")
    to = "<sip:17752180264@sip.kx21.com>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: {via}",
        *(f"Via: {v}" for v in more_vias),
        "Max-Forwards: 70",
        f"From: <sip:acme@sip.kx21.com>;tag={from_tag}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method or method}",
        *(f"{name}: {value}" for name, value in extra),
        "Content-Length: 0",
    ]
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def response_to(req: Request, status: int, *, to_tag: str | None = "ttag1") -> Response:
    """A response to ``req`` as the peer would send it (parsed back from bytes)."""
    reason = {100: "Trying", 180: "Ringing", 200: "OK", 486: "Busy Here"}.get(status, "Status")
    made = make_response(req, status, reason, to_tag=None if status == 100 else to_tag)
    parsed = parse_message(bytes(made))
    assert isinstance(parsed, Response)
    return parsed


def sends(outputs: Iterable[object]) -> list[Send]:
    return [item for item in outputs if isinstance(item, Send)]


def events(outputs: Iterable[object]) -> list[object]:
    return [item for item in outputs if not isinstance(item, Send)]


def run_timers(layer: TransactionLayer, until: float) -> list[tuple[float, Send | Event]]:
    """Advance a virtual clock from deadline to deadline up to ``until``;
    return every output with the time it happened."""
    seen: list[tuple[float, Send | Event]] = []
    for _ in range(10_000):  # bound the loop whatever the layer does
        deadline = layer.next_timer()
        if deadline is None or deadline > until:
            return seen
        seen.extend((deadline, item) for item in layer.handle_timer(now=deadline))
    raise AssertionError("timers never settled")
