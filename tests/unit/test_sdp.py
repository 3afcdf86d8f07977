"""SDP (sansio_sip._sdp): parse/serialise, the G.711 offer policy, answers, relay rewrite."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sansio_sip import ParseError, RemoteProtocolError
from sansio_sip._sdp import (
    Media,
    NoAcceptableCodec,
    Origin,
    SessionDescription,
    audio_formats,
    codec_name,
    filter_offer,
    make_answer,
    media_address,
    parse_sdp,
    rewrite_media,
    serialize_sdp,
    without_endpoint_features,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "sdp"
TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata"
VECTOR_FILES = sorted(VECTORS.glob("*.json"))
SOFTPHONE_INVITES = sorted((TESTDATA / "softphones").glob("*invite*.sip"))
RELAY = ("203.0.113.5", 20000)


def sdp(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


def load(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def lines_of(value: object) -> list[str]:
    assert isinstance(value, list)
    return [str(x) for x in value]


def softphone_body(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw.split(b"\r\n\r\n", 1)[1]


def assert_format_attributes_consistent(m: Media) -> None:
    """Every per-format attribute names a format still in the m= line."""
    for name, value in m.attributes:
        if name in ("rtpmap", "fmtp", "rtcp-fb") and value is not None:
            pt = value.split(" ", 1)[0]
            assert pt == "*" or pt in m.formats, (name, value)


# -- vectors ----------------------------------------------------------------


def test_vectors_name_their_source() -> None:
    assert len(VECTOR_FILES) >= 10
    for path in VECTOR_FILES:
        assert load(path)["source"]


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_vector(path: Path) -> None:
    case = load(path)
    body = sdp(lines_of(case["offer"]))
    offer = parse_sdp(body)
    assert serialize_sdp(offer) == body
    assert bytes(offer) == body

    if "error" in case:
        with pytest.raises(NoAcceptableCodec) as info:
            filter_offer(offer)
        err = info.value
        assert isinstance(err, RemoteProtocolError)
        assert err.status_code == 488
        assert err.reason == "Not Acceptable Here"
        assert err.warning_code == case["error"]
        ((name, value),) = err.headers
        assert name == "Warning"
        assert value.startswith(f'{case["error"]} kx-sipd "')
        with pytest.raises(NoAcceptableCodec):
            make_answer(offer, offer)
        return

    forwarded = filter_offer(offer)
    assert len(forwarded.media) == 1
    m = forwarded.media[0]
    assert m.media == "audio" and m.proto == "RTP/AVP"
    assert list(m.formats) == case["forwarded_formats"]
    assert_format_attributes_consistent(m)
    assert not any(name in ("crypto", "fingerprint") for name, _ in m.attributes)
    assert codec_name(forwarded) == case["codec"]
    if "forwarded_direction" in case:
        assert m.direction == case["forwarded_direction"]

    relayed = rewrite_media(forwarded, address=RELAY[0], port=RELAY[1])
    assert relayed.media[0].port == RELAY[1]
    assert not any(
        name in ("candidate", "ice-ufrag", "ice-pwd", "rtcp", "rtcp-mux")
        for name, _ in (*relayed.media[0].attributes, *_session_attributes(relayed))
    )
    if case.get("hold"):
        assert media_address(relayed) is None  # 0.0.0.0 kept: still on hold
        assert "0.0.0.0" in serialize_sdp(relayed).decode()
    else:
        assert media_address(relayed) == RELAY
    assert parse_sdp(serialize_sdp(relayed)) == relayed

    if "other_answer" in case:
        other = parse_sdp(sdp(lines_of(case["other_answer"])))
        answer = make_answer(offer, other)
        assert len(answer.media) == len(offer.media)  # RFC 3264 §6
        got = [[x.media, x.port, list(x.formats)] for x in answer.media]
        assert got == case["answer_media"]
        for offered, answered in zip(offer.media, answer.media, strict=True):
            assert offered.media == answered.media
        if "answer_codec" in case:
            assert codec_name(answer) == case["answer_codec"]
        if "answer_direction" in case:
            carried = next(x for x in answer.media if x.port)
            assert carried.direction == case["answer_direction"]
        to_client = rewrite_media(answer, address=RELAY[0], port=30002)
        assert media_address(to_client) == (RELAY[0], 30002)
        assert [x.port for x in to_client.media] == [30002 if x.port else 0 for x in answer.media]


def _session_attributes(sd: SessionDescription) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for kind, value in sd.lines:
        if kind == "a":
            name, sep, rest = value.partition(":")
            out.append((name, rest if sep else None))
    return out


@pytest.mark.parametrize("path", SOFTPHONE_INVITES, ids=lambda p: p.stem)
def test_softphone_offers(path: Path) -> None:
    body = softphone_body(path)
    offer = parse_sdp(body)
    assert serialize_sdp(offer) == body
    forwarded = filter_offer(offer)
    m = forwarded.media[0]
    assert_format_attributes_consistent(m)
    assert {enc.upper() for _, enc, _ in audio_formats(forwarded)} <= {
        "PCMU",
        "PCMA",
        "TELEPHONE-EVENT",
    }
    assert not any(name == "crypto" for name, _ in m.attributes)
    assert media_address(offer) is not None


def test_microsip_srtp_best_effort_offer_loses_its_keys() -> None:
    body = softphone_body(TESTDATA / "softphones" / "microsip-3.19.8-invite-tls-srtp.sip")
    forwarded = filter_offer(parse_sdp(body))
    assert forwarded.media[0].formats == ("8", "0", "101")
    text = serialize_sdp(rewrite_media(forwarded, address="203.0.113.5", port=20000)).decode()
    assert "crypto" not in text and "a=rtcp:" not in text
    assert "a=ssrc:" not in text  # the source's CNAME stays on its own leg
    assert "b=TIAS:64000" in text


def test_xpro_offer_keeps_lower_case_g711_and_event() -> None:
    body = softphone_body(TESTDATA / "softphones" / "xpro-1103v-invite.sip")
    offer = parse_sdp(body)
    assert media_address(offer) == ("192.168.1.2", 8004)
    forwarded = filter_offer(offer)
    assert forwarded.media[0].formats == ("0", "8", "101")
    assert codec_name(forwarded) == "PCMU"
    assert audio_formats(forwarded)[0] == ("0", "pcmu", 8000)


# -- the policy in focused cases -------------------------------------------

BASE = ["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "c=IN IP4 192.0.2.1", "t=0 0"]


def offer_of(*media_lines: str) -> SessionDescription:
    return parse_sdp(sdp([*BASE, *media_lines]))


def test_opus_pcma_telephone_event_keeps_pcma_and_event_only() -> None:
    offer = offer_of(
        "m=audio 4000 RTP/AVP 111 8 101 13",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtcp-fb:111 transport-cc",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=rtpmap:13 CN/8000",
        "a=ptime:20",
        "a=maxptime:40",
        "a=sendrecv",
    )
    m = filter_offer(offer).media[0]
    assert m.formats == ("8", "101")
    assert m.attributes == (
        ("rtpmap", "8 PCMA/8000"),
        ("rtpmap", "101 telephone-event/8000"),
        ("fmtp", "101 0-16"),
        ("ptime", "20"),
        ("maxptime", "40"),
        ("sendrecv", None),
    )


def test_static_g711_without_rtpmap_is_recognised() -> None:
    m = filter_offer(offer_of("m=audio 4000 RTP/AVP 3 0 8")).media[0]
    assert m.formats == ("0", "8")
    assert m.rtpmap("0") == ("PCMU", 8000, 1)
    assert m.rtpmap("3") == ("GSM", 8000, 1)
    assert m.rtpmap("96") is None


def test_rtpmap_overrides_static_numbers_and_stereo_is_refused() -> None:
    with pytest.raises(NoAcceptableCodec):
        filter_offer(offer_of("m=audio 4000 RTP/AVP 0", "a=rtpmap:0 G722/8000"))
    with pytest.raises(NoAcceptableCodec):
        filter_offer(offer_of("m=audio 4000 RTP/AVP 96", "a=rtpmap:96 PCMU/8000/2"))
    m = filter_offer(offer_of("m=audio 4000 RTP/AVP 96", "a=rtpmap:96 PCMU/8000/1")).media[0]
    assert m.formats == ("96",)


def test_telephone_event_alone_is_not_enough() -> None:
    with pytest.raises(NoAcceptableCodec) as info:
        filter_offer(offer_of("m=audio 4000 RTP/AVP 101", "a=rtpmap:101 telephone-event/8000"))
    assert info.value.warning_code == 305


def test_disabled_audio_stream_is_skipped() -> None:
    offer = offer_of("m=audio 0 RTP/AVP 0", "m=audio 5000 RTP/AVP 8")
    assert filter_offer(offer).media[0].formats == ("8",)
    with pytest.raises(NoAcceptableCodec) as info:
        filter_offer(offer_of("m=audio 0 RTP/AVP 0"))
    assert info.value.warning_code == 304


def test_session_level_security_and_bundle_are_dropped() -> None:
    offer = parse_sdp(
        sdp(
            [
                *BASE,
                "a=fingerprint:sha-256 AB:CD",
                "a=group:BUNDLE 0 1",
                "a=msid-semantic: WMS",
                "m=audio 4000 RTP/AVP 0",
                "a=mid:0",
                "a=setup:actpass",
                "m=video 4002 RTP/AVP 96",
                "a=mid:1",
            ]
        )
    )
    forwarded = filter_offer(offer)
    text = serialize_sdp(forwarded).decode()
    assert "fingerprint" not in text and "BUNDLE" not in text and "setup" not in text
    assert "a=msid-semantic: WMS" in text and "a=mid:0" in text
    assert "m=video" not in text


def test_make_answer_filters_unoffered_formats_and_refusals() -> None:
    offer = offer_of("m=audio 4000 RTP/AVP 0 8 101", "a=rtpmap:101 telephone-event/8000")
    carrier = parse_sdp(
        sdp(
            [
                "v=0",
                "o=c 1 1 IN IP4 198.51.100.1",
                "s=-",
                "c=IN IP4 198.51.100.1",
                "t=0 0",
                "m=audio 30000 RTP/AVP 8 18 101",
                "a=rtpmap:8 PCMA/8000",
                "a=rtpmap:18 G729/8000",
                "a=fmtp:18 annexb=no",
                "a=rtpmap:101 telephone-event/8000",
            ]
        )
    )
    answer = make_answer(offer, carrier)
    assert answer.media[0].formats == ("8", "101")
    assert_format_attributes_consistent(answer.media[0])
    assert codec_name(answer) == "PCMA"

    refused = parse_sdp(sdp([*BASE, "m=audio 0 RTP/AVP 0"]))
    with pytest.raises(NoAcceptableCodec):
        make_answer(offer, refused)
    no_media = parse_sdp(sdp(BASE))
    with pytest.raises(NoAcceptableCodec):
        make_answer(offer, no_media)
    only_g729 = parse_sdp(sdp([*BASE, "m=audio 3000 RTP/AVP 18 101"]))
    with pytest.raises(NoAcceptableCodec):
        make_answer(offer, only_g729)


def test_rewrite_sets_addresses_versions_and_drops_relay_invalidated_lines() -> None:
    offer = parse_sdp(
        sdp(
            [
                "v=0",
                "o=alice 10 20 IN IP4 192.0.2.1",
                "s=-",
                "c=IN IP4 192.0.2.1",
                "t=0 0",
                "a=ice-lite",
                "m=audio 4000 RTP/AVP 0",
                "c=IN IP4 192.0.2.2",
                "a=rtcp:4001 IN IP4 192.0.2.2",
                "a=rtcp-mux",
                "a=candidate:1 1 UDP 1 192.0.2.2 4000 typ host",
                "a=end-of-candidates",
                "a=ptime:20",
                "m=video 0 RTP/AVP 31",
            ]
        )
    )
    out = rewrite_media(offer, address="2001:db8::5", port=20002, bump_version=True)
    assert out.origin == Origin(
        username="alice",
        session_id="10",
        session_version="21",
        nettype="IN",
        addrtype="IP6",
        address="2001:db8::5",
    )
    assert out.connection == "IN IP6 2001:db8::5"
    assert out.media[0].connection == "IN IP6 2001:db8::5"
    assert out.media[0].attributes == (("ptime", "20"),)
    assert out.media[0].port == 20002
    assert out.media[1].port == 0
    assert media_address(out) == ("2001:db8::5", 20002)
    same = rewrite_media(offer, address="203.0.113.9", port=20004, origin_user="kx-sipd")
    assert same.origin.session_version == "20"
    assert same.origin.username == "kx-sipd"
    assert same.connection == "IN IP4 203.0.113.9"
    with pytest.raises(ValueError):
        rewrite_media(offer, address="relay.example.com", port=20000)
    with pytest.raises(ValueError):
        rewrite_media(offer, address="203.0.113.9", port=0)


def test_media_level_hold_address_survives_rewrite() -> None:
    offer = offer_of("m=audio 4000 RTP/AVP 0", "c=IN IP4 0.0.0.0", "a=sendonly")
    out = rewrite_media(filter_offer(offer), address="203.0.113.5", port=20000)
    assert out.connection == "IN IP4 203.0.113.5"
    assert out.media[0].connection == "IN IP4 0.0.0.0"
    assert out.media[0].direction == "sendonly"
    assert media_address(out) is None


def test_media_address_prefers_media_level_connection() -> None:
    offer = offer_of("m=audio 4000 RTP/AVP 0", "c=IN IP4 192.0.2.9/127")
    assert media_address(offer) == ("192.0.2.9", 4000)
    assert media_address(offer_of("m=video 4000 RTP/AVP 31")) is None
    no_c = parse_sdp(sdp(["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "m=audio 4 RTP/AVP 0"]))
    assert media_address(no_c) is None
    assert codec_name(offer_of("m=audio 4000 RTP/AVP 101 13")) is None


def test_directions() -> None:
    sd = parse_sdp(sdp([*BASE, "a=recvonly", "m=audio 4000 RTP/AVP 0", "a=inactive"]))
    assert sd.direction == "recvonly"
    assert sd.media[0].direction == "inactive"
    assert offer_of("m=audio 4000 RTP/AVP 0").media[0].direction == "sendrecv"


# -- parsing ----------------------------------------------------------------


def test_parse_model() -> None:
    body = sdp(
        [
            "v=0",
            "o=jdoe 2890844526 2890842807 IN IP4 10.47.16.5",
            "s=SDP Seminar",
            "i=A Seminar on the session description protocol",
            "c=IN IP4 224.2.17.12/127",
            "t=2873397496 2873404696",
            "a=recvonly",
            "m=audio 49170 RTP/AVP 0",
            "m=video 51372/2 RTP/AVP 99",
            "b=AS:128",
            "a=rtpmap:99 h263-1998/90000",
        ]
    )  # RFC 8866 §5 example, with a port count added
    sd = parse_sdp(body)
    assert sd.version == "0"
    assert sd.origin.username == "jdoe" and sd.origin.address == "10.47.16.5"
    assert sd.session_name == "SDP Seminar"
    assert sd.connection == "IN IP4 224.2.17.12/127"
    assert sd.media[1].port == 51372 and sd.media[1].port_count == 2
    assert sd.media[1].m_line == "video 51372/2 RTP/AVP 99"
    assert sd.media[1].other == (("b", "AS:128"),)
    assert sd.media[1].rtpmap("99") == ("h263-1998", 90000, None)
    assert sd.media[1].rtpmap("0") is None  # static table is for audio only
    assert serialize_sdp(sd) == body


def test_non_ascii_digits_are_not_numbers() -> None:
    body = "v=0\r\no=- 1 \u00b2 IN IP4 h\r\nm=audio 4 RTP/AVP 96\r\na=rtpmap:96 PCMU/\u00b2\r\n"
    sd = parse_sdp(body.encode())
    assert sd.media[0].rtpmap("96") is None
    out = rewrite_media(sd, address="192.0.2.1", port=5, bump_version=True)
    assert out.origin.session_version == "\u00b2"  # left alone, not an error


def test_parse_tolerates_lf_trailing_space_and_blank_lines() -> None:
    crlf = sdp([*BASE, "m=audio 4000 RTP/AVP 0", "a=ptime:20"])
    sloppy = crlf.replace(b"\r\n", b"  \n").replace(b"a=ptime", b"\na=ptime") + b"\n\n"
    assert parse_sdp(sloppy) == parse_sdp(crlf)
    assert serialize_sdp(parse_sdp(sloppy)) == crlf
    assert parse_sdp(crlf.rstrip(b"\r\n")) == parse_sdp(crlf)  # no final line end


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"", "empty body"),
        (b"\r\n\r\n", "empty body"),
        (b"hello", "malformed line"),
        (b"o=- 1 1 IN IP4 1.2.3.4\r\nv=0\r\n", "must start with v=0"),
        (b"v=1\r\no=- 1 1 IN IP4 1.2.3.4\r\n", "must start with v=0"),
        (b"v=0\r\ns=-\r\n", "missing o= line"),
        (b"v=0\r\no=- 1 1 IN IP4\r\n", "malformed o= line"),
        (b"v=0\r\no=- 1 1 IN IP4 h\r\nc=IN IP4\r\n", "malformed c= line"),
        (b"v=0\r\no=- 1 1 IN IP4 h\r\nm=audio x RTP/AVP 0\r\n", "bad m= port"),
        (b"v=0\r\no=- 1 1 IN IP4 h\r\nm=audio 70000 RTP/AVP 0\r\n", "bad m= port"),
        (b"v=0\r\no=- 1 1 IN IP4 h\r\nm=audio 1/0 RTP/AVP 0\r\n", "bad m= port count"),
        ("v=0\r\no=- 1 1 IN IP4 h\r\nm=audio \u00b2 RTP/AVP 0\r\n".encode(), "bad m= port"),
        ("v=0\r\no=- 1 1 IN IP4 h\r\nm=audio 1/\u0663 RTP/AVP 0\r\n".encode(), "bad m= port count"),
        (b"v=0\r\no=- 1 1 IN IP4 h\r\nm=audio 1 RTP/AVP\r\n", "malformed m= line"),
        (b"v=0\r\no=- 1 1 IN IP4 h\r\nX=1\r\n", "malformed line"),
        (b"v=0\r\no=- 1 1 IN IP4 h\r\ns=a\x00b\r\n", "control character"),
        (b"v=0\r\no=- 1 1 IN IP4 \xff\r\n", "not UTF-8"),
        (b"v=0\r\nm=audio 1 RTP/AVP 0\r\n", "missing o= line"),
    ],
)
def test_parse_errors(body: bytes, detail: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_sdp(body)
    assert info.value.reason == f"Bad SDP: {detail}"
    assert info.value.status_code == 400


# -- properties -------------------------------------------------------------

_line_value = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x7f"),
    max_size=30,
).map(str.strip)


@st.composite
def descriptions(draw: st.DrawFn) -> bytes:
    lines = ["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-"]
    for _ in range(draw(st.integers(0, 3))):
        lines.append(draw(st.sampled_from("iuebzka")) + "=" + draw(_line_value))
    for _ in range(draw(st.integers(0, 3))):
        port = draw(st.integers(0, 65535))
        fmts = draw(st.lists(st.sampled_from(["0", "8", "18", "96", "101", "121"]), min_size=1))
        lines.append(f"m=audio {port} RTP/AVP {' '.join(fmts)}")
        for pt in fmts:
            enc = draw(st.sampled_from(["PCMU", "PCMA", "opus", "telephone-event", "G729"]))
            rate = draw(st.sampled_from([8000, 16000, 48000]))
            lines.append(f"a=rtpmap:{pt} {enc}/{rate}")
        if draw(st.booleans()):
            lines.append("c=IN IP4 " + draw(st.sampled_from(["0.0.0.0", "192.0.2.7", "h.example"])))
        lines.append("a=" + draw(st.sampled_from(["sendonly", "ptime:20", "rtcp:9", "crypto:1 x"])))
    return sdp(lines)


@settings(max_examples=150, deadline=None)
@given(descriptions())
def test_round_trip_and_policy_never_raise_unexpectedly(body: bytes) -> None:
    sd = parse_sdp(body)
    assert serialize_sdp(sd) == body
    assert parse_sdp(serialize_sdp(sd)) == sd
    try:
        forwarded = filter_offer(sd)
    except NoAcceptableCodec:
        return
    assert_format_attributes_consistent(forwarded.media[0])
    relayed = rewrite_media(forwarded, address="203.0.113.5", port=20000)
    assert parse_sdp(serialize_sdp(relayed)) == relayed
    answer = make_answer(sd, forwarded)
    assert len(answer.media) == len(sd.media)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_raises_only_parse_error(data: bytes) -> None:
    try:
        sd = parse_sdp(data)
    except ParseError:
        return
    assert parse_sdp(serialize_sdp(sd)) == sd


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(
            alphabet=st.sampled_from(list("vomcast=0123456789 /:.IN IP4\t")),
            max_size=25,
        ),
        max_size=12,
    )
)
def test_sdp_like_text_parses_or_raises_parse_error(lines: list[str]) -> None:
    body = "\r\n".join(["v=0", "o=- 1 1 IN IP4 192.0.2.1", *lines]).encode()
    try:
        sd = parse_sdp(body)
    except ParseError:
        return
    again = parse_sdp(serialize_sdp(sd))
    assert again == sd
    with contextlib.suppress(NoAcceptableCodec):
        filter_offer(sd)


def test_ipv6_offer_and_answer_mapping_keep_offer_order() -> None:
    offer = parse_sdp(
        sdp(
            [
                "v=0",
                "o=- 7 7 IN IP6 2001:db8::10",
                "s=-",
                "c=IN IP6 2001:db8::10",
                "t=0 0",
                "m=video 6000 RTP/AVP 96",
                "a=rtpmap:96 H264/90000",
                "m=audio 6002 RTP/AVP 9 0",
                "i=voice",
                "k=prompt",
                "a=rtpmap:9 G722/8000",
            ]
        )
    )
    assert media_address(offer) == ("2001:db8::10", 6002)
    assert offer.media[1].other == (("i", "voice"), ("k", "prompt"))
    forwarded = filter_offer(offer)
    assert forwarded.media[0].formats == ("0",)
    assert forwarded.media[0].other == (("i", "voice"),)  # k= is obsolete keying
    carrier = parse_sdp(sdp([*BASE, "m=audio 7000 RTP/AVP 0"]))
    answer = rewrite_media(make_answer(offer, carrier), address="2001:db8::99", port=20010)
    assert [(m.media, m.port, m.formats) for m in answer.media] == [
        ("video", 0, ("96",)),
        ("audio", 20010, ("0",)),
    ]
    text = serialize_sdp(answer).decode()
    assert "c=IN IP6 2001:db8::99\r\n" in text and "IP4" not in text


def test_answer_without_rtpmap_is_judged_by_the_offer_mapping() -> None:
    offer = offer_of(
        "m=audio 4000 RTP/AVP 96 101", "a=rtpmap:96 PCMA/8000", "a=rtpmap:101 telephone-event/8000"
    )
    carrier = parse_sdp(sdp([*BASE, "m=audio 7000 RTP/AVP 96 101"]))
    assert make_answer(offer, carrier).media[0].formats == ("96", "101")


def test_no_acceptable_codec_is_a_remote_error_with_warning_header() -> None:
    err = NoAcceptableCodec()
    assert isinstance(err, RemoteProtocolError)
    assert (err.status_code, err.reason, err.warning_code) == (488, "Not Acceptable Here", 305)
    assert err.headers == (("Warning", '305 kx-sipd "Incompatible media format"'),)


def test_answer_keeps_telephone_event_renumbered_by_the_carrier() -> None:
    # linphonec offers telephone-event as 96; an Asterisk-style trunk answers 101.
    offer = parse_sdp(
        b"v=0\r\no=- 1 1 IN IP4 10.0.0.7\r\ns=-\r\nc=IN IP4 10.0.0.7\r\nt=0 0\r\n"
        b"m=audio 7078 RTP/AVP 0 8 96\r\na=rtpmap:96 telephone-event/8000\r\n"
    )
    answer = parse_sdp(
        b"v=0\r\no=- 2 2 IN IP4 192.0.2.60\r\ns=-\r\nc=IN IP4 192.0.2.60\r\nt=0 0\r\n"
        b"m=audio 13701 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
        b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n"
    )
    for_client = make_answer(offer, answer)
    [m] = for_client.media
    assert m.formats == ("0", "101")
    assert m.rtpmap("101") == ("telephone-event", 8000, None)


def test_answer_drops_a_renumbered_format_that_was_never_offered() -> None:
    offer = parse_sdp(
        b"v=0\r\no=- 1 1 IN IP4 10.0.0.7\r\ns=-\r\nc=IN IP4 10.0.0.7\r\nt=0 0\r\n"
        b"m=audio 7078 RTP/AVP 0\r\n"
    )
    answer = parse_sdp(
        b"v=0\r\no=- 2 2 IN IP4 192.0.2.60\r\ns=-\r\nc=IN IP4 192.0.2.60\r\nt=0 0\r\n"
        b"m=audio 13701 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"
    )
    assert make_answer(offer, answer).media[0].formats == ("0",)


def test_relayed_sdp_does_not_carry_the_endpoints_identity() -> None:
    offer = parse_sdp(
        b"v=0\r\no=- 1 1 IN IP4 10.0.0.7\r\ns=-\r\nc=IN IP4 10.0.0.7\r\nt=0 0\r\n"
        b"a=tool:baresip 1.0.0\r\nm=audio 7078 RTP/AVP 0\r\n"
        b"a=ssrc:1234 cname:sip:acme@sip.kx21.com\r\na=rtcp-xr:rcvr-rtt=all\r\n"
    )
    relayed = bytes(rewrite_media(offer, address="203.0.113.9", port=20000))
    assert b"tool" not in relayed and b"cname" not in relayed and b"acme" not in relayed
    assert b"rtcp-xr" in relayed  # end to end through the relay: the carrier may use it
    own = bytes(without_endpoint_features(parse_sdp(relayed)))
    assert b"rtcp-xr" not in own


def test_rtpmap_lookups_read_the_first_mapping_and_follow_a_changed_stream() -> None:
    m = offer_of(
        "m=audio 4000 RTP/AVP 96 97 0",
        "a=rtpmap:96 telephone-event/8000",
        "a=rtpmap:96 opus/48000/2",
        "a=rtpmap:97  PCMA/8000",
        "a=rtpmap:98\tPCMU/8000",
    ).media[0]
    assert m.rtpmap("96") == ("telephone-event", 8000, None)
    assert m.rtpmap("97") == ("PCMA", 8000, None)
    assert m.rtpmap("98") is None
    assert m.rtpmap("0") == ("PCMU", 8000, 1)
    changed = attrs.evolve(m, lines=(("a", "rtpmap:96 PCMU/8000"),))
    assert changed.rtpmap("96") == ("PCMU", 8000, None)
    assert m.rtpmap("96") == ("telephone-event", 8000, None)
    assert changed == attrs.evolve(changed) and hash(changed) == hash(attrs.evolve(changed))


def test_control_characters_are_refused_wherever_they_are() -> None:
    base = ["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "c=IN IP4 192.0.2.1", "t=0 0"]
    for bad in ("s=a\x0bb", "s=a\rb", "s=a\x00", "a=x\x7f"):
        with pytest.raises(ParseError, match="control character"):
            parse_sdp(sdp([*base[:2], bad, *base[3:]]))
    # Trailing white space and CR before LF are line ends, not content.
    assert parse_sdp(b"v=0\r\no=- 1 1 IN IP4 192.0.2.1 \r\r\ns=-\t\r\nt=0 0\n").session_name == "-"
