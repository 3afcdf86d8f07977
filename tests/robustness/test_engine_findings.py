"""Engine bugs found by the hardening work (fuzz/fuzz_engine.py, the wire
tests), each pinned by a minimal test. A test marked xfail(strict=True) fails
the suite as soon as the engine is fixed, so the mark is then removed; the
tests stay as regression tests."""

from __future__ import annotations

import random

from sansio_sip import Engine, EngineConfig, Send, Transport, parse_message

SOURCE = ("198.51.100.7", 40000)


def _engine(**config: object) -> Engine:
    return Engine(
        EngineConfig(nonce_secret=b"k" * 32, **config),  # type: ignore[arg-type]
        entropy=random.Random(1).randbytes,
    )


def _register_with_bad_to(branch: str) -> bytes:
    # RFC 4475 escnull with one broken escape in the To URI: the message
    # parses, the To's URI does not (it is read lazily, after the transaction
    # exists).
    return (
        "REGISTER sip:example.com SIP/2.0\r\n"
        "To: sip:null-%0nul0-l@example.com\r\n"
        "From: sip:null@example.com;tag=839923423\r\n"
        "Max-Forwards: 70\r\n"
        f"Call-ID: {branch}@example\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bK{branch}\r\n"
        "L: 0\r\n\r\n"
    ).encode()


def _statuses(actions: list[object]) -> list[int]:
    out = []
    for action in actions:
        if isinstance(action, Send):
            message = parse_message(action.data)
            out.append(message.status_code)  # type: ignore[union-attr]
    return out


def test_a_request_rejected_after_its_transaction_exists_does_not_leak_it() -> None:
    """Found by fuzz/fuzz_engine.py (drain check): the 400 for a malformed
    To URI is sent statelessly after the server transaction was created, so
    the transaction never gets a final response and never ends."""
    engine = _engine()
    now = 1000.0
    actions = engine.receive(
        _register_with_bad_to("leak1"), source=SOURCE, transport=Transport.UDP, now=now, wall=now
    )
    assert _statuses(actions) == [400]
    for _ in range(100):
        deadline = engine.next_timer()
        if deadline is None:
            break
        now = max(now, deadline)
        engine.handle_timer(now=now, wall=now)
    engine.handle_timer(now=now + 3600, wall=now + 3600)
    assert engine.stats()["transactions"] == 0


def test_malformed_requests_cannot_fill_the_transaction_table() -> None:
    """The consequence of the leak above: an attacker sending max_transactions
    such requests makes the server answer 503 to everyone, for ever."""
    engine = _engine(max_transactions=5)
    now = 1000.0
    for i in range(5):
        engine.receive(
            _register_with_bad_to(f"fill{i}"), source=SOURCE, transport=Transport.UDP,
            now=now, wall=now,
        )  # fmt: skip
    later = now + 3600.0
    engine.handle_timer(now=later, wall=later)
    options = (
        b"OPTIONS sip:sip.kx21.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 198.51.100.7:40000;branch=z9hG4bKopt1\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:a@sip.kx21.com>;tag=1\r\nTo: <sip:sip.kx21.com>\r\n"
        b"Call-ID: opt1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    actions = engine.receive(options, source=SOURCE, transport=Transport.UDP, now=later, wall=later)
    assert _statuses(actions) == [200]


def test_a_datagram_from_port_zero_is_a_counted_drop() -> None:
    """Found by fuzz/wire.py (forged sources): the answer goes to the source
    port (symmetric routing), and ``Send`` refuses port 0, so the ValueError
    escapes ``receive`` (the driver logs ``engine.bug``)."""
    engine = _engine()
    options = (
        b"OPTIONS sip:sip.kx21.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKport0;rport\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:a@sip.kx21.com>;tag=1\r\nTo: <sip:sip.kx21.com>\r\n"
        b"Call-ID: port0\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    actions = engine.receive(
        options, source=("127.0.0.1", 0), transport=Transport.UDP, now=1.0, wall=1.0
    )
    assert not any(isinstance(action, Send) for action in actions)
