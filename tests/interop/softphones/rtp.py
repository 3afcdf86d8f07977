"""RTP (RFC 3550) on a loopback socket the test controls: counts what arrives, by
payload type, and sends a PCMU stream back to where the relay sends from."""

from __future__ import annotations

import collections
import math
import socket
import struct
import threading
import time

import attrs

from .ports import HOST

PCMU = 0
PCMA = 8
TELEPHONE_EVENT = 101  # the number both clients and the carrier scenario use
CARRIER_SSRC = 0x4B580001
_HEADER = struct.Struct("!BBHII")
_EVENT = struct.Struct("!BBH")


@attrs.frozen
class RtpPacket:
    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes


def parse_rtp(data: bytes) -> RtpPacket | None:
    """An RTP version 2 packet (CSRCs and extension skipped), or None for anything else
    (RTCP included: its second byte is a packet type of 200-204)."""
    if len(data) < _HEADER.size:
        return None
    first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != 2 or 72 <= (second & 0x7F) <= 76:
        return None
    offset = _HEADER.size + 4 * (first & 0x0F)
    if first & 0x10:
        if len(data) < offset + 4:
            return None
        offset += 4 + 4 * struct.unpack_from("!H", data, offset + 2)[0]
    end = len(data)
    if first & 0x20:
        end -= data[-1]
    if end < offset:
        return None
    return RtpPacket(
        second & 0x7F, bool(second & 0x80), sequence, timestamp, ssrc, data[offset:end]
    )


def make_rtp(
    payload_type: int,
    sequence: int,
    timestamp: int,
    ssrc: int,
    payload: bytes,
    *,
    marker: bool = False,
) -> bytes:
    second = (0x80 if marker else 0) | payload_type
    return _HEADER.pack(0x80, second, sequence & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc) + payload


@attrs.frozen
class DtmfEvent:
    """The payload of an RFC 4733 telephone-event packet."""

    event: int
    end: bool
    volume: int
    duration: int


def parse_dtmf(payload: bytes) -> DtmfEvent | None:
    if len(payload) < _EVENT.size:
        return None
    event, flags, duration = _EVENT.unpack_from(payload)
    return DtmfEvent(event, bool(flags & 0x80), flags & 0x3F, duration)


DTMF_DIGITS = "0123456789*#ABCD"


def ulaw(sample: int) -> int:
    """G.711 µ-law code of a 16-bit linear sample."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = 7
    while exponent > 0 and not magnitude & (0x80 << exponent):
        exponent -= 1
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def pcmu_tone(frame: int, *, frequency: float = 1000.0, amplitude: int = 8000) -> bytes:
    """The ``frame``-th 20 ms PCMU frame (160 samples at 8 kHz) of a sine tone."""
    first = frame * 160
    return bytes(
        ulaw(int(amplitude * math.sin(2 * math.pi * frequency * (first + i) / 8000)))
        for i in range(160)
    )


class MediaEndpoint:
    """A UDP socket on 127.0.0.1 standing in for the carrier's media.

    A thread receives everything (bounded by ``stop``): RTP is counted per payload
    type and kept (up to a cap) for inspection; the first source is the relay's
    B-leg port, where ``send_stream`` then sends PCMU (symmetric RTP)."""

    KEEP = 2000

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, port))
        self.sock.settimeout(0.1)
        self.port = port
        self.counts: collections.Counter[int] = collections.Counter()
        self.packets: list[RtpPacket] = []
        self.non_rtp = 0
        self.peer: tuple[str, int] | None = None
        self.sent = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._receiver.start()
        self._sender: threading.Thread | None = None

    def _receive(self) -> None:
        while not self._stopping.is_set():
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            packet = parse_rtp(data)
            with self._lock:
                if self.peer is None:
                    self.peer = source[:2]
                if packet is None:
                    self.non_rtp += 1
                    continue
                self.counts[packet.payload_type] += 1
                if len(self.packets) < self.KEEP:
                    self.packets.append(packet)

    def count(self, payload_type: int) -> int:
        with self._lock:
            return self.counts[payload_type]

    def received(self, payload_type: int) -> list[RtpPacket]:
        with self._lock:
            return [p for p in self.packets if p.payload_type == payload_type]

    def wait_for(self, payload_type: int, at_least: int, timeout: float) -> int:
        """Wait (bounded) until ``at_least`` packets of this type came; the count."""
        deadline = time.monotonic() + timeout
        while self.count(payload_type) < at_least and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.count(payload_type)

    def send_stream(self, packets: int) -> None:
        """Start sending ``packets`` 20 ms PCMU frames of a 1 kHz tone to the latched peer."""

        def run() -> None:
            deadline = time.monotonic() + 5.0
            while self.peer is None and time.monotonic() < deadline:
                time.sleep(0.01)
            peer = self.peer
            if peer is None:
                return
            for index in range(packets):
                if self._stopping.is_set():
                    return
                data = make_rtp(
                    PCMU, index, index * 160, CARRIER_SSRC, pcmu_tone(index), marker=index == 0
                )
                try:
                    self.sock.sendto(data, peer)
                except OSError:
                    return
                self.sent += 1
                time.sleep(0.02)

        self._sender = threading.Thread(target=run, daemon=True)
        self._sender.start()

    def wait_sent(self, timeout: float) -> int:
        if self._sender is not None:
            self._sender.join(timeout)
        return self.sent

    def close(self) -> None:
        self._stopping.set()
        if self._sender is not None:
            self._sender.join(2.0)
        self._receiver.join(2.0)
        self.sock.close()
