"""Per-stream media logic: latching, anti-hijack, counters, loss and jitter.

This module is pure. A ``Stream`` is the state of one relay socket (a side's
RTP or RTCP port); ``Stream.receive(packet, size, source, now)`` decides
whether a datagram is accepted and where it goes, and updates the figures.
The shard's loop only moves bytes between sockets; everything it decides
per packet is here and tested with a fake clock.

Forwarding. A call has two sides: A faces the client, B the carrier. A packet
accepted on one side's socket is sent out of the *other* side's socket (the
``twin``) to that side's peer; in echo mode a stream is its own twin, so a
packet goes back to its sender.

Latching (symmetric RTP, RFC 4961 practice for NAT). A stream's peer is the
source of the first well-formed packet it receives, whatever the SDP said;
the SDP address (``expected``) is only used to send toward a side that has
not sent anything yet. After latching, packets from any other source are
dropped and counted (``dropped_foreign``), except in one case: an RTP packet
carrying a *new SSRC* from a new source, arriving after the latched source
has been silent for ``relatch_after`` seconds, takes the stream over. The
silence rule stops an attacker spraying the port range from hijacking a live
stream (the real source keeps refreshing its claim every 20 ms); the SSRC
rule keeps a stale duplicate path of the same sender (e.g. a second NAT
binding) from flapping the latch. A same-SSRC move (a NAT rebinding) is
picked up when the controller sends ``update`` with the new SDP address
(a re-INVITE), which clears the latch. An RTCP stream re-latches only to a
source on the host its side's RTP stream is latched to, so RTCP follows the
vetted RTP decision instead of making its own.

Figures. Packets and bytes in and out per stream; for RTP, loss from the
sequence numbers (RFC 3550 §A.1/§A.3: extended highest sequence with cycle
counting across the 16-bit wrap, a restart after two sequential packets
following a large jump) and interarrival jitter (§A.8) at 8000 Hz. Jitter is
fed only by static 8 kHz audio payload types (PCMU 0, PCMA 8, CN 13, G729
18 and their siblings): RFC 4733 telephone-event packets (dynamic PT) repeat
one timestamp for a whole event (§2.3.5), which the §A.8 estimator would
read as network delay, so they are counted but not fed to it. Payloads are
never rewritten; the one header change is the telephone-event payload type
when the two sides number it differently (DESIGN §7: a client that keeps
sending its offered number after the answer renumbered the events).
"""

from __future__ import annotations

import struct

import attrs

from sansio_sip import Address, MediaStats

__all__ = ["AUDIO_8K", "CallMedia", "Stream"]

_RTP_UNPACK = struct.Struct("!HII").unpack_from  # sequence, timestamp, SSRC at offset 2

MAX_DROPOUT = 3000  # RFC 3550 §A.1 defaults
MAX_MISORDER = 100
SEQ_MOD = 1 << 16
CLOCK = 8000.0

AUDIO_8K = frozenset({0, 3, 4, 5, 7, 8, 9, 12, 13, 15, 18})
"""Static payload types with an 8000 Hz RTP clock (RFC 3551 Table 4; G722's
RTP clock is 8000 by that table's historical error)."""


@attrs.define(eq=False)
class Stream:
    """One relay socket's view of its media. See the module docstring."""

    rtcp: bool = False
    relatch_after: float = 0.5
    twin: Stream | None = None
    sibling: Stream | None = None
    """For an RTCP stream, the RTP stream of the same side."""
    expected: Address | None = None
    peer: Address | None = None
    ssrc: int = -1
    last_in: float = float("-inf")
    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    dropped_foreign: int = 0
    dropped_malformed: int = 0
    dropped_no_peer: int = 0
    relatches: int = 0
    # RFC 3550 §A.1 sequence state for the current SSRC
    base_seq: int = 0
    max_seq: int = 0
    cycles: int = 0
    bad_seq: int = SEQ_MOD + 1
    received: int = 0
    lost_prior: int = 0
    # RFC 3550 §A.8 jitter state, in timestamp units
    jitter: float = 0.0
    last_arrival: float = -1.0
    last_ts: int = 0
    # RFC 4733 payload-type rewrite for packets received here (-1: none)
    events_from: int = -1
    events_to: int = -1

    def receive(
        self, packet: bytes | bytearray, size: int, source: Address, now: float
    ) -> Address | None:
        """Account for a datagram of ``size`` bytes (``packet[:size]``) that
        arrived from ``source`` at monotonic ``now``; the destination to send
        it to out of the twin's socket, or None to drop it (counted).

        This runs once per relayed packet, so the RTP accounting is inline.
        """
        if size < (8 if self.rtcp else 12) or packet[0] & 0xC0 != 0x80:
            self.dropped_malformed += 1
            return None
        if source != self.peer and not self._admit(packet, source, now):
            self.dropped_foreign += 1
            return None
        self.last_in = now
        self.packets_in += 1
        self.bytes_in += size
        if not self.rtcp:
            # RFC 3550 §A.1 sequence accounting
            seq, timestamp, ssrc = _RTP_UNPACK(packet, 2)
            counted = True
            if ssrc != self.ssrc:
                self._restart(seq, ssrc)
            else:
                delta = (seq - self.max_seq) & 0xFFFF
                if delta < MAX_DROPOUT:
                    if seq < self.max_seq:
                        self.cycles += SEQ_MOD
                    self.max_seq = seq
                elif delta <= SEQ_MOD - MAX_MISORDER:
                    if seq == self.bad_seq:
                        self._restart(seq, ssrc)
                    else:
                        # A large jump: the next packet must confirm a restart (§A.1).
                        self.bad_seq = (seq + 1) & 0xFFFF
                        counted = False
                # else: a duplicate or a reordered packet, counted as received
            if counted:
                self.received += 1
                # RFC 3550 §A.8 interarrival jitter, for 8 kHz audio payloads only
                if packet[1] & 0x7F in AUDIO_8K:
                    arrival = now * CLOCK
                    if self.last_arrival >= 0.0:
                        moved = ((timestamp - self.last_ts + 0x80000000) & 0xFFFFFFFF) - 0x80000000
                        d = arrival - self.last_arrival - moved
                        self.jitter += ((d if d >= 0.0 else -d) - self.jitter) / 16.0
                    self.last_arrival = arrival
                    self.last_ts = timestamp
            if (
                self.events_from >= 0
                and packet[1] & 0x7F == self.events_from
                and isinstance(packet, bytearray)
            ):
                # DESIGN §7: this side numbers telephone-event differently from
                # the other; rewrite the number in place, keep the marker bit.
                packet[1] = (packet[1] & 0x80) | self.events_to
        twin = self.twin
        if twin is None:
            self.dropped_no_peer += 1
            return None
        destination = twin.peer or twin.expected
        if destination is None and twin.rtcp:
            destination = twin.rtcp_fallback()
        if destination is None:
            self.dropped_no_peer += 1
            return None
        twin.packets_out += 1
        twin.bytes_out += size
        return destination

    def _admit(self, packet: bytes | bytearray, source: Address, now: float) -> bool:
        """Latch on the first packet; decide whether a new source may take over."""
        if self.peer is None:
            self.peer = source
            return True
        if self.rtcp:
            sibling = self.sibling
            if sibling is None or sibling.peer is None or sibling.peer[0] != source[0]:
                return False
        elif now - self.last_in < self.relatch_after or _RTP_UNPACK(packet, 2)[2] == self.ssrc:
            return False
        self.peer = source
        self.relatches += 1
        return True

    def _restart(self, seq: int, ssrc: int) -> None:
        """Start sequence accounting afresh (new SSRC or confirmed jump), keeping
        the loss counted so far."""
        self.lost_prior += self._current_loss()
        self.ssrc = ssrc
        self.base_seq = seq
        self.max_seq = seq
        self.cycles = 0
        self.bad_seq = SEQ_MOD + 1
        self.received = 0
        self.last_arrival = -1.0

    def _current_loss(self) -> int:
        if self.ssrc < 0:
            return 0
        expected = self.cycles + self.max_seq - self.base_seq + 1
        # Duplicates can make received exceed expected (§A.3); never report negative loss.
        return max(0, expected - self.received)

    @property
    def packets_lost(self) -> int:
        """Packets lost over the stream's life, all SSRCs (RFC 3550 §A.3)."""
        return self.lost_prior + self._current_loss()

    @property
    def jitter_ms(self) -> float:
        """Interarrival jitter in milliseconds (timestamp units / 8)."""
        return self.jitter * 1000.0 / CLOCK

    def rtcp_fallback(self) -> Address | None:
        """For an RTCP stream that has heard nothing: its side's RTP peer, port + 1."""
        sibling = self.sibling
        if sibling is None:
            return None
        rtp = sibling.peer or sibling.expected
        if rtp is None:
            return None
        return (rtp[0], rtp[1] + 1)

    def set_expected(self, address: Address | None) -> None:
        """Record where the SDP says this stream's peer is. A change of an
        address already known means the media moved (re-INVITE): the latch is
        cleared so the next packet latches afresh."""
        if address is None or address == self.expected:
            return
        if self.expected is not None:
            self.peer = None
        self.expected = address

    def media_stats(self) -> MediaStats:
        """This stream's figures as the engine's per-leg MediaStats."""
        return MediaStats(
            packets_in=self.packets_in,
            packets_out=self.packets_out,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            packets_lost=self.packets_lost,
            jitter_ms=round(self.jitter_ms, 3),
        )

    def figures(self, *, now: float) -> dict[str, object]:
        """Everything about the stream, for the stats command; ``idle`` is the
        time since its last accepted packet (None before the first)."""
        return {
            "idle": round(now - self.last_in, 3) if self.packets_in else None,
            "peer": list(self.peer[:2]) if self.peer else None,
            "expected": list(self.expected) if self.expected else None,
            "packets_in": self.packets_in,
            "bytes_in": self.bytes_in,
            "packets_out": self.packets_out,
            "bytes_out": self.bytes_out,
            "packets_lost": self.packets_lost,
            "jitter_ms": round(self.jitter_ms, 3),
            "dropped_foreign": self.dropped_foreign,
            "dropped_malformed": self.dropped_malformed,
            "dropped_no_peer": self.dropped_no_peer,
            "relatches": self.relatches,
        }


@attrs.define(eq=False)
class CallMedia:
    """The streams of one call: A side (client) and B side (carrier), RTP and
    RTCP each, or only the A side in echo mode.

    ``timed_out`` is the monotonic time the call was found without RTP for the
    media timeout (None while media flows); ``created`` starts that clock.
    ``media_timeout`` is the call's own timeout, asked for by the controller in
    ``allocate`` (None: the relay's ``--media-timeout``).
    """

    call_ref: str
    a_port: int
    b_port: int
    echo: bool
    created: float
    a_rtp: Stream
    a_rtcp: Stream
    b_rtp: Stream
    b_rtcp: Stream
    timed_out: float | None = None
    media_timeout: float | None = None

    @classmethod
    def build(
        cls,
        call_ref: str,
        *,
        a_port: int,
        b_port: int,
        echo: bool,
        now: float,
        relatch_after: float,
    ) -> CallMedia:
        """Wire the streams of a new call: each side's twin is the other side, or itself for echo."""
        a_rtp = Stream(relatch_after=relatch_after)
        a_rtcp = Stream(rtcp=True, relatch_after=relatch_after, sibling=a_rtp)
        b_rtp = Stream(relatch_after=relatch_after)
        b_rtcp = Stream(rtcp=True, relatch_after=relatch_after, sibling=b_rtp)
        if echo:
            a_rtp.twin, a_rtcp.twin = a_rtp, a_rtcp
        else:
            a_rtp.twin, b_rtp.twin = b_rtp, a_rtp
            a_rtcp.twin, b_rtcp.twin = b_rtcp, a_rtcp
        return cls(
            call_ref=call_ref,
            a_port=a_port,
            b_port=b_port,
            echo=echo,
            created=now,
            a_rtp=a_rtp,
            a_rtcp=a_rtcp,
            b_rtp=b_rtp,
            b_rtcp=b_rtcp,
        )

    def set_peers(self, a_peer: Address | None, b_peer: Address | None) -> None:
        """Apply SDP addresses (RTP; RTCP assumed on port + 1 until it latches)."""
        for rtp, rtcp, peer in (
            (self.a_rtp, self.a_rtcp, a_peer),
            (self.b_rtp, self.b_rtcp, b_peer),
        ):
            if peer is not None:
                rtp.set_expected(peer)
                rtcp.set_expected((peer[0], peer[1] + 1))

    def set_events(self, a_events: int | None, b_events: int | None) -> None:
        """Each side's telephone-event payload type: packets from a side that
        carry its own number leave with the other side's (none when equal)."""
        if a_events is None or b_events is None or a_events == b_events:
            self.a_rtp.events_from = self.b_rtp.events_from = -1
            return
        self.a_rtp.events_from, self.a_rtp.events_to = a_events, b_events
        self.b_rtp.events_from, self.b_rtp.events_to = b_events, a_events

    def last_media(self) -> float:
        """The last time RTP was accepted in either direction (or the allocation time)."""
        return max(self.created, self.a_rtp.last_in, self.b_rtp.last_in)

    def check_timeout(self, *, now: float, media_timeout: float) -> bool:
        """Mark the call timed out when no RTP flowed for its own media timeout, or
        else ``media_timeout`` (the relay's); True on the transition."""
        limit = self.media_timeout if self.media_timeout is not None else media_timeout
        if self.timed_out is None and now - self.last_media() >= limit:
            self.timed_out = now
            return True
        return False

    def stats(self) -> tuple[MediaStats, MediaStats | None]:
        """(A-leg, B-leg) figures; an echo call has no B leg."""
        return self.a_rtp.media_stats(), None if self.echo else self.b_rtp.media_stats()

    def figures(self, *, now: float) -> dict[str, object]:
        """The call's figures for the stats and query commands."""
        return {
            "call": self.call_ref,
            "a_port": self.a_port,
            "b_port": self.b_port,
            "echo": self.echo,
            "age": round(now - self.created, 3),
            "idle": round(now - self.last_media(), 3),
            "timed_out": self.timed_out is not None,
            "a": {"rtp": self.a_rtp.figures(now=now), "rtcp": self.a_rtcp.figures(now=now)},
            "b": None
            if self.echo
            else {"rtp": self.b_rtp.figures(now=now), "rtcp": self.b_rtcp.figures(now=now)},
        }
