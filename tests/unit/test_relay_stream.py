"""Pure per-stream logic of the relay (rtp_relay._stream) with a fake clock."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from rtp_relay._stream import CallMedia, Stream

A_SRC = ("198.51.100.7", 40000)
A_NAT = ("203.0.113.9", 61000)
ATTACKER = ("192.0.2.66", 5555)
CARRIER = ("10.0.0.5", 30000)


def rtp(
    seq: int, ts: int = 0, ssrc: int = 0x1234, pt: int = 0, payload: bytes = b"\xff" * 160
) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def rtcp(ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHI", 0x81, 201, 7, ssrc) + b"\x00" * 24


def feed(
    stream: Stream, packet: bytes, source: tuple[str, int], now: float
) -> tuple[str, int] | None:
    return stream.receive(packet, len(packet), source, now)


def call(echo: bool = False) -> CallMedia:
    return CallMedia.build("c1", a_port=20000, b_port=20002, echo=echo, now=0.0, relatch_after=0.5)


# ------------------------------------------------------------------ forwarding and latching


def test_forwards_to_other_sides_sdp_address_until_it_latches() -> None:
    c = call()
    c.set_peers(A_SRC, CARRIER)
    assert feed(c.a_rtp, rtp(1), A_NAT, 0.01) == CARRIER
    # The carrier answers from another port than its SDP said: it latches there,
    # and the client is reached at the source it latched from, not its SDP address.
    carrier_real = ("10.0.0.5", 30010)
    assert feed(c.b_rtp, rtp(1, ssrc=9), carrier_real, 0.02) == A_NAT
    assert feed(c.a_rtp, rtp(2), A_NAT, 0.03) == carrier_real
    assert c.a_rtp.peer == A_NAT and c.b_rtp.peer == carrier_real
    assert c.b_rtp.packets_out == 2 and c.a_rtp.packets_out == 1


def test_packet_without_any_destination_is_dropped_and_counted() -> None:
    c = call()
    assert feed(c.a_rtp, rtp(1), A_SRC, 0.0) is None
    assert c.a_rtp.dropped_no_peer == 1
    assert c.a_rtp.packets_in == 1  # it was accepted (and latched), just had nowhere to go
    assert c.a_rtp.peer == A_SRC


def test_foreign_source_dropped_after_latching() -> None:
    c = call()
    c.set_peers(None, CARRIER)
    assert feed(c.a_rtp, rtp(1), A_SRC, 0.0) == CARRIER
    for i in range(5):
        assert feed(c.a_rtp, rtp(100 + i, ssrc=0x6666), ATTACKER, 0.01 + i * 0.001) is None
    assert c.a_rtp.dropped_foreign == 5
    assert c.a_rtp.peer == A_SRC
    assert c.a_rtp.packets_in == 1


def test_relatch_needs_silence_and_new_ssrc() -> None:
    s = call().a_rtp
    feed(s, rtp(1, ssrc=1), A_SRC, 10.0)
    # new SSRC but the latched source spoke 0.3 s ago: refused
    assert feed(s, rtp(1, ssrc=2), A_NAT, 10.3) is None
    # silent long enough but the same SSRC: refused (same-SSRC moves go through update)
    assert feed(s, rtp(2, ssrc=1), A_NAT, 10.6) is None
    # silent long enough and a new SSRC: takes over
    assert (
        s.receive(rtp(1, ssrc=2), 172, A_NAT, 10.61) is None
    )  # no twin peer known: dropped after accepting
    assert s.peer == A_NAT and s.relatches == 1
    # the old source is now foreign
    assert feed(s, rtp(3, ssrc=1), A_SRC, 10.62) is None
    assert s.peer == A_NAT
    assert s.dropped_foreign == 3


def test_foreign_packets_do_not_refresh_the_silence_clock() -> None:
    s = call().a_rtp
    feed(s, rtp(1, ssrc=1), A_SRC, 0.0)
    for i in range(5):
        feed(s, rtp(i, ssrc=7), ATTACKER, 0.1 * i)
    assert s.last_in == 0.0 and s.peer == A_SRC
    # Once the latched source has been silent for relatch_after, a new SSRC takes
    # over: this is the documented re-latch window, not a hijack of live media.
    feed(s, rtp(5, ssrc=7), ATTACKER, 0.5)
    assert s.peer == ATTACKER and s.relatches == 1


def test_rtcp_relatches_only_to_the_host_rtp_latched_to() -> None:
    c = call()
    c.set_peers(None, CARRIER)
    feed(c.a_rtp, rtp(1), A_SRC, 0.0)
    feed(c.a_rtcp, rtcp(), (A_SRC[0], A_SRC[1] + 1), 0.0)
    assert feed(c.a_rtcp, rtcp(0x77), ATTACKER, 10.0) is None
    assert c.a_rtcp.dropped_foreign == 1
    # RTP moves to a new host (new SSRC after silence); RTCP may now follow it
    feed(c.a_rtp, rtp(1, ssrc=0x99), A_NAT, 20.0)
    assert feed(c.a_rtcp, rtcp(0x99), (A_NAT[0], A_NAT[1] + 1), 20.1) == (
        CARRIER[0],
        CARRIER[1] + 1,
    )
    assert c.a_rtcp.peer == (A_NAT[0], A_NAT[1] + 1)


def test_rtcp_goes_to_rtp_peer_plus_one_when_rtcp_not_latched() -> None:
    c = call()
    carrier_real = ("10.0.0.5", 30010)
    feed(c.b_rtp, rtp(1), carrier_real, 0.0)
    assert feed(c.a_rtcp, rtcp(), A_SRC, 0.1) == ("10.0.0.5", 30011)


def test_sdp_change_clears_the_latch() -> None:
    c = call()
    c.set_peers(A_SRC, CARRIER)
    feed(c.a_rtp, rtp(1), A_SRC, 0.0)
    c.set_peers(A_SRC, CARRIER)  # same answer again: nothing changes
    assert c.a_rtp.peer == A_SRC
    c.set_peers(A_NAT, None)  # a re-INVITE moved the client's media
    assert c.a_rtp.peer is None
    assert feed(c.a_rtp, rtp(2, ssrc=0x1234), A_NAT, 0.1) == CARRIER
    assert c.a_rtp.peer == A_NAT


def test_figures_give_each_streams_last_packet_time() -> None:
    c = call()
    c.set_peers(None, CARRIER)
    feed(c.a_rtp, rtp(1), A_SRC, 10.0)
    feed(c.b_rtp, rtp(1), CARRIER, 12.5)
    feed(c.a_rtp, rtp(2), ATTACKER, 14.0)  # foreign: not a packet of the stream
    figures = c.figures(now=15.0)
    assert figures["a"]["rtp"]["idle"] == 5.0  # type: ignore[index]
    assert figures["b"]["rtp"]["idle"] == 2.5  # type: ignore[index]
    assert figures["a"]["rtcp"]["idle"] is None  # type: ignore[index]
    assert figures["idle"] == 2.5  # the call: the latest of either direction


def test_malformed_packets_dropped_and_counted() -> None:
    s = call().a_rtp
    assert s.receive(b"\x80\x00\x00", 3, A_SRC, 0.0) is None
    assert feed(s, b"\x00" * 20, A_SRC, 0.0) is None  # version 0
    assert s.dropped_malformed == 2
    assert s.peer is None  # garbage never latches


def test_echo_sends_back_to_sender() -> None:
    c = call(echo=True)
    assert feed(c.a_rtp, rtp(1), A_NAT, 0.0) == A_NAT
    assert feed(c.a_rtp, rtp(2), ATTACKER, 0.01) is None
    a, b = c.stats()
    assert b is None
    assert (a.packets_in, a.packets_out, a.bytes_in, a.bytes_out) == (1, 1, 172, 172)


def test_telephone_event_is_counted_but_not_fed_to_jitter() -> None:
    c = call()
    c.set_peers(None, CARRIER)
    for i in range(10):
        feed(c.a_rtp, rtp(i, ts=i * 160), A_SRC, i * 0.020)
    before = c.a_rtp.jitter
    # an RFC 4733 event: 6 packets, one timestamp, 50 ms apart
    event = struct.pack("!BBH", 1, 0x0A, 400)
    for i in range(6):
        feed(c.a_rtp, rtp(10 + i, ts=1600, pt=101, payload=event), A_SRC, 0.2 + i * 0.05)
    assert c.a_rtp.jitter == before
    assert c.a_rtp.packets_in == 16 and c.a_rtp.packets_lost == 0


# ------------------------------------------------------------------ loss (RFC 3550 §A.1/§A.3)


def test_loss_across_sequence_wrap() -> None:
    s = call().a_rtp
    seqs = [65530, 65531, 65533, 65535, 0, 1, 4, 5]  # missing 65532, 65534, 2, 3
    for i, seq in enumerate(seqs):
        feed(s, rtp(seq), A_SRC, i * 0.02)
    assert s.cycles == 65536
    assert s.packets_lost == 4


def test_duplicates_and_reordering_never_make_loss_negative() -> None:
    s = call().a_rtp
    for i, seq in enumerate([10, 11, 11, 13, 12, 14, 14, 14]):
        feed(s, rtp(seq), A_SRC, i * 0.02)
    assert s.packets_lost == 0


def test_large_jump_restarts_after_two_sequential_packets() -> None:
    s = call().a_rtp
    for i in range(5):
        feed(s, rtp(100 + i), A_SRC, i * 0.02)
    feed(s, rtp(30000), A_SRC, 0.2)  # jump: not counted yet
    feed(s, rtp(30001), A_SRC, 0.22)  # confirmed: sequence restarts here
    feed(s, rtp(30003), A_SRC, 0.24)  # one lost after the restart
    assert s.packets_lost == 1


def test_ssrc_change_keeps_earlier_loss() -> None:
    s = call().a_rtp
    for seq in (1, 2, 5):  # two lost
        feed(s, rtp(seq, ssrc=1), A_SRC, 0.0)
    for seq in (700, 701, 703):  # one lost under the new SSRC
        feed(s, rtp(seq, ssrc=2), A_SRC, 0.1)
    assert s.packets_lost == 3


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(0, 65535),
    gaps=st.lists(st.integers(1, 5), min_size=1, max_size=300),
)
def test_loss_counts_missing_sequence_numbers(start: int, gaps: list[int]) -> None:
    s = call().a_rtp
    seq = start
    feed(s, rtp(seq), A_SRC, 0.0)
    for i, gap in enumerate(gaps):
        seq += gap
        feed(s, rtp(seq), A_SRC, (i + 1) * 0.02)
    assert s.packets_lost == sum(g - 1 for g in gaps)


# ------------------------------------------------------------------ jitter (RFC 3550 §A.8)


def reference_jitter(arrivals: list[float], timestamps: list[int]) -> float:
    """RFC 3550 §6.4.1: J(i) = J(i-1) + (|D(i-1,i)| - J(i-1))/16, in timestamp units."""
    j = 0.0
    for i in range(1, len(arrivals)):
        d = (arrivals[i] * 8000 - arrivals[i - 1] * 8000) - (timestamps[i] - timestamps[i - 1])
        j = j + (abs(d) - j) / 16
    return j


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 0.04), min_size=2, max_size=200), st.integers(0, 2**32 - 1))
def test_jitter_matches_rfc3550_formula(delays: list[float], ts0: int) -> None:
    s = call().a_rtp
    arrivals = [i * 0.020 + delay for i, delay in enumerate(delays)]
    timestamps = [ts0 + 160 * i for i in range(len(delays))]
    for i, (arrival, ts) in enumerate(zip(arrivals, timestamps, strict=True)):
        feed(s, rtp(i, ts=ts), A_SRC, arrival)
    assert abs(s.jitter - reference_jitter(arrivals, timestamps)) < 1e-6
    assert abs(s.jitter_ms - s.jitter / 8) < 1e-9


def test_loss_and_jitter_against_a_hand_computed_sequence() -> None:
    """Five packets worked through RFC 3550 by hand (§A.1/§A.3 loss, §A.8 jitter),
    across both the 16-bit sequence wrap and the 32-bit timestamp wrap.

    Sequence 65533, 65534, 65535, (0 lost), 1, 2: extended max = 65536 + 2 = 65538,
    expected = 65538 - 65533 + 1 = 6, received 5, lost 1.
    Jitter, timestamp units at 8000 Hz (20 ms = 160), D = arrival delta - ts delta:
      #1 +20 ms, ts +160:  D =    0 -> J = 0
      #2 +25 ms, ts +160:  D =  +40 -> J = 0 + (40 - 0)/16            = 2.5
      #3 +35 ms, ts +320:  D =  -40 -> J = 2.5 + (40 - 2.5)/16        = 4.84375
      #4 +20 ms, ts +160:  D =    0 -> J = 4.84375 - 4.84375/16       = 4.541015625
    i.e. 4.541015625 / 8 = 0.567626953125 ms.
    """
    s = call().a_rtp
    ts0 = 0xFFFFFEC0  # 4294966976: the third packet's timestamp wraps to 0
    vector = [  # (sequence, timestamp offset in 20 ms frames, arrival in s)
        (65533, 0, 1000.000),
        (65534, 1, 1000.020),
        (65535, 2, 1000.045),
        (1, 4, 1000.080),
        (2, 5, 1000.100),
    ]
    for seq, frame, arrival in vector:
        feed(s, rtp(seq, ts=ts0 + 160 * frame), A_SRC, arrival)
    assert s.packets_in == 5
    assert s.packets_lost == 1
    assert abs(s.jitter - 4.541015625) < 1e-6
    assert s.media_stats().jitter_ms == 0.568  # 0.567626953125 rounded to the microsecond
    assert s.media_stats().packets_lost == 1


def test_steady_stream_has_no_jitter() -> None:
    s = call().a_rtp
    for i in range(100):
        feed(s, rtp(i, ts=0xFFFFFF00 + 160 * i), A_SRC, 5.0 + i * 0.020)  # timestamp wraps too
    assert s.jitter < 1e-6


# ------------------------------------------------------------------ media timeout


def test_media_timeout_counts_rtp_either_way_and_fires_once() -> None:
    c = call()
    c.set_peers(None, CARRIER)
    assert not c.check_timeout(now=59.0, media_timeout=60.0)
    feed(c.b_rtp, rtp(1), CARRIER, 50.0)
    assert not c.check_timeout(now=100.0, media_timeout=60.0)
    feed(c.a_rtcp, rtcp(), A_SRC, 105.0)  # RTCP alone does not keep a call alive
    assert c.check_timeout(now=110.0, media_timeout=60.0)
    assert c.timed_out == 110.0
    assert not c.check_timeout(now=111.0, media_timeout=60.0)


def test_hijack_packets_do_not_keep_a_call_alive() -> None:
    c = call()
    feed(c.a_rtp, rtp(1), A_SRC, 0.0)
    for i in range(1, 100):
        feed(c.a_rtp, rtp(i, ssrc=0x1234), ATTACKER, float(i))
    assert c.check_timeout(now=60.0, media_timeout=60.0)


def test_telephone_event_renumbered_per_direction_and_only_when_they_differ() -> None:
    from rtp_relay._stream import Stream

    a, b = Stream(), Stream()
    a.twin, b.twin = b, a
    a.events_from, a.events_to = 96, 101  # the client's number → the carrier's
    b.events_from, b.events_to = 101, 96
    b.peer = ("192.0.2.60", 30000)
    a.peer = ("198.51.100.7", 40000)

    def packet(pt: int, marker: bool = False) -> bytearray:
        return bytearray(
            [0x80, (0x80 if marker else 0) | pt, 0, 1, 0, 0, 0, 160, 0, 0, 0, 7]
        ) + bytes(4)

    event = packet(96, marker=True)
    assert a.receive(event, len(event), a.peer, 1.0) == b.peer
    assert event[1] == 0x80 | 101  # renumbered, marker kept
    audio = packet(0)
    a.receive(audio, len(audio), a.peer, 1.02)
    assert audio[1] == 0  # G.711 untouched
    correct = packet(101)  # a client that already sends the answer's number
    a.receive(correct, len(correct), a.peer, 1.04)
    assert correct[1] == 101
    back = packet(101)
    b.receive(back, len(back), b.peer, 1.06)
    assert back[1] == 96
