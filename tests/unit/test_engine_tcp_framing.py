"""A TCP message the framer cannot cut (RFC 3261 §18.3) is answered, then the
connection is closed: the client learns why (400 names the Content-Length
fault, 513 the size) instead of seeing a bare reset."""

from __future__ import annotations

from engine_harness import Harness

from sansio_sip import CloseConnection, Send, Transport, parse_message

OPTIONS = (
    b"OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 192.0.2.7:5090;branch=z9hG4bK-framing-1\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:probe@example.net>;tag=f1\r\n"
    b"To: <sip:127.0.0.1>\r\n"
    b"Call-ID: framing-1@192.0.2.7\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Content-Length: 0\r\n\r\n"
)
SOURCE = ("192.0.2.7", 5090)


def feed(harness: Harness, data: bytes) -> list[object]:
    return harness.engine.receive(
        data, source=SOURCE, transport=Transport.TCP, now=harness.now, wall=harness.wall,
        connection=3,
    )  # fmt: skip


def answer_then_close(actions: list[object]) -> tuple[int, str]:
    kinds = [type(a) for a in actions if isinstance(a, Send | CloseConnection)]
    assert kinds == [Send, CloseConnection], actions
    send = next(a for a in actions if isinstance(a, Send))
    assert send.connection == 3 and send.destination == SOURCE
    response = parse_message(send.data)
    assert response.call_id == "framing-1@192.0.2.7"
    assert response.headers.get("Via").startswith("SIP/2.0/TCP 192.0.2.7:5090")
    assert response.to.tag, "the answer carries a To tag"
    return response.status_code, response.reason


def test_missing_content_length_is_answered_400_before_the_close() -> None:
    harness = Harness.make()
    actions = feed(harness, OPTIONS.replace(b"Content-Length: 0\r\n", b""))
    assert answer_then_close(actions) == (400, "Missing Content-Length")


def test_a_bad_content_length_is_answered_400() -> None:
    harness = Harness.make()
    actions = feed(harness, OPTIONS.replace(b"Content-Length: 0", b"Content-Length: -5"))
    assert answer_then_close(actions) == (400, "Bad Content-Length")


def test_a_body_over_the_limit_is_answered_513() -> None:
    harness = Harness.make(max_message_size=4096)
    actions = feed(harness, OPTIONS.replace(b"Content-Length: 0", b"Content-Length: 900000"))
    status, reason = answer_then_close(actions)
    assert status == 513 and "Too Large" in reason


def test_a_broken_response_or_ack_is_closed_without_an_answer() -> None:
    for data in (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 192.0.2.7:5090;branch=z9hG4bK-x\r\n\r\n",
        OPTIONS.replace(b"OPTIONS", b"ACK").replace(b"Content-Length: 0\r\n", b""),
    ):
        actions = feed(Harness.make(), data)
        assert [type(a) for a in actions if isinstance(a, Send | CloseConnection)] == [
            CloseConnection
        ]


def test_without_a_via_nothing_can_be_answered() -> None:
    data = b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nCall-ID: x\r\n\r\n"
    actions = feed(Harness.make(), data)
    assert [type(a) for a in actions if isinstance(a, Send | CloseConnection)] == [CloseConnection]
