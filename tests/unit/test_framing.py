"""StreamFramer: TCP framing by Content-Length, keep-alive pings, limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sansio_sip import ParseError, StreamFramer, parse_message


def message(i: int, body: bytes = b"") -> bytes:
    return (
        f"OPTIONS sip:u{i}@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK{i}\r\n"
        f"From: <sip:a@example.com>;tag={i}\r\nTo: <sip:u{i}@example.com>\r\n"
        f"Call-ID: call{i}\r\nCSeq: {i} OPTIONS\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


MESSAGES = [message(1), message(2, b"hello\r\n\r\nworld"), message(3, b"x" * 300)]
STREAM = b"".join(MESSAGES)


def test_whole_stream() -> None:
    framer = StreamFramer()
    assert framer.feed(STREAM) == MESSAGES
    assert framer.buffered == 0
    assert [parse_message(m).cseq.number for m in framer.feed(MESSAGES[0])] == [1]


def test_byte_by_byte() -> None:
    framer = StreamFramer()
    out: list[bytes] = []
    for i in range(len(STREAM)):
        out += framer.feed(STREAM[i : i + 1])
    assert out == MESSAGES


def test_keepalive_pings_are_counted_and_skipped() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n") == []
    assert framer.keepalives == 1
    assert framer.feed(b"\r\n") == []  # half a ping: wait
    assert framer.feed(b"\r\n" + MESSAGES[0] + b"\r\n\r\n\r\n\r\n" + MESSAGES[1]) == MESSAGES[:2]
    assert framer.keepalives == 4
    assert framer.take_pongs() == 4
    assert framer.take_pongs() == 0
    assert framer.pongs_due == 0


def test_a_stray_crlf_before_a_message_is_not_a_ping() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n" + MESSAGES[0]) == MESSAGES[:1]
    assert framer.keepalives == 0


def test_compact_and_spaced_content_length() -> None:
    data = MESSAGES[1].replace(b"Content-Length: 16", b"l :   16")
    assert StreamFramer().feed(data) == [data]
    folded = MESSAGES[1].replace(b"Content-Length: 16", b"content-LENGTH:\r\n 16")
    assert StreamFramer().feed(folded) == [folded]


@pytest.mark.parametrize(
    ("data", "reason", "status"),
    [
        (MESSAGES[0].replace(b"Content-Length: 0\r\n", b""), "Missing Content-Length", 400),
        (MESSAGES[0].replace(b"Content-Length: 0", b"Content-Length: x"), "Bad Content-Length", 400),
        (MESSAGES[0].replace(b"Content-Length: 0", b"Content-Length: 0\r\nl: 1"), "Conflicting", 400),
        (MESSAGES[0].replace(b"Content-Length: 0", b"Content-Length: 70000"), "Too Large", 513),
        (b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n", "Missing Content-Length", None),
        (b"\rX", "Bad message start", 400),
    ],
)  # fmt: skip
def test_framing_errors(data: bytes, reason: str, status: int | None) -> None:
    with pytest.raises(ParseError, match=reason) as info:
        StreamFramer().feed(data)
    assert info.value.status_code == status


def test_header_block_limit_without_end() -> None:
    framer = StreamFramer(max_header_bytes=100)
    framer.feed(b"OPTIONS sip:a SIP/2.0\r\n")
    with pytest.raises(ParseError, match="header block") as info:
        framer.feed(b"X-Pad: " + b"a" * 200)
    assert info.value.status_code == 513


def test_body_limit() -> None:
    with pytest.raises(ParseError, match="body"):
        StreamFramer(max_body_bytes=10).feed(MESSAGES[2])


@settings(max_examples=100)
@given(st.lists(st.integers(1, len(STREAM)), max_size=20), st.lists(st.booleans(), max_size=4))
def test_any_chunking_yields_the_same_messages(cuts: list[int], pings: list[bool]) -> None:
    stream = b"".join(
        (b"\r\n\r\n" if i < len(pings) and pings[i] else b"") + m for i, m in enumerate(MESSAGES)
    )
    points = sorted({c for c in cuts if c < len(stream)})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    framer = StreamFramer()
    out: list[bytes] = []
    for chunk in chunks:
        out += framer.feed(chunk)
    assert out == MESSAGES
    assert framer.keepalives == sum(pings[: len(MESSAGES)])
    assert framer.buffered == 0


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_chunks_frame_or_raise_parse_error(chunks: list[bytes]) -> None:
    framer = StreamFramer(max_header_bytes=256, max_body_bytes=256)
    try:
        for chunk in chunks:
            for m in framer.feed(chunk):
                assert m.find(b"\r\n\r\n") >= 0
    except ParseError:
        pass
    assert framer.buffered <= 256 + 256 + 4 + 64
