"""kx_sipd.trace: HEP v3 packets (encode/decode, the live tracer over loopback UDP) and
pcap files from a call's ladder, read back with scapy."""

from __future__ import annotations

import contextlib
import io
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from kx_sipd.trace import (
    HEP_SIP,
    HepTrace,
    decode_hep,
    encode_hep,
    ladder_frames,
    server_address,
    write_pcap,
)
from sansio_sip import CallRecordData, LadderEntry, Transport

WAIT = 5.0

INVITE = (
    "INVITE sip:0044123@sip.kx21.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK-a1;rport\r\n"
    "From: <sip:alice@sip.kx21.com>;tag=1\r\nTo: <sip:0044123@sip.kx21.com>\r\n"
    "Call-ID: call-a@192.0.2.10\r\nCSeq: 2 INVITE\r\nContent-Length: 0\r\n\r\n"
)
B_INVITE = (
    "INVITE sip:0044123@198.51.100.7:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-b1\r\n"
    "From: <sip:alice@203.0.113.5>;tag=2\r\nTo: <sip:0044123@198.51.100.7>\r\n"
    "Call-ID: call-b\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)
OK = "SIP/2.0 200 OK\r\nCall-ID: call-b\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"


def _entry(
    wall: float, direction: str, leg: str, peer: str, transport: str, text: str
) -> LadderEntry:
    return LadderEntry(
        wall=wall, direction=direction, leg=leg, peer=peer, transport=transport, message=text
    )


def _record(*ladder: LadderEntry) -> CallRecordData:
    return CallRecordData(
        call_ref="ref-1",
        account="alice",
        a_call_id="call-a@192.0.2.10",
        b_call_id="call-b",
        source="192.0.2.10:5062",
        transport="UDP",
        user_agent="test",
        dialed="0044123",
        sent_digits="0044123",
        route="carrier",
        start_wall=1_700_000_000.0,
        ladder=ladder,
    )


RECORD = _record(
    _entry(1_700_000_000.125, "in", "A", "192.0.2.10:5062", "UDP", INVITE),
    _entry(1_700_000_000.250, "out", "B", "198.51.100.7:5060", "UDP", B_INVITE),
    _entry(1_700_000_001.5, "in", "B", "198.51.100.7:5060", "UDP", OK),
    _entry(1_700_000_001.75, "in", "A", "[2001:db8::7]:40000", "TCP", INVITE),
    _entry(1_700_000_002.0, "out", "A", "[2001:db8::7]:40000", "TCP", OK),
)


# -- HEP ---------------------------------------------------------------------------------------


def test_hep_packet_round_trip_ipv4_and_ipv6() -> None:
    for source, destination in (
        (("192.0.2.1", 5060), ("198.51.100.2", 40000)),
        (("2001:db8::1", 5060), ("2001:db8::2", 5070)),
    ):
        data = encode_hep(
            b"OPTIONS sip:x SIP/2.0\r\n\r\n",
            source=source,
            destination=destination,
            transport=Transport.TCP,
            wall=1_700_000_000.654321,
            agent_id=2001,
        )
        assert data[:4] == b"HEP3"
        assert struct.unpack("!H", data[4:6])[0] == len(data)
        packet = decode_hep(data)
        assert packet.source == source and packet.destination == destination
        assert packet.family == (10 if ":" in source[0] else 2)
        assert packet.protocol == 6
        assert (packet.seconds, packet.micros) == (1_700_000_000, 654321)
        assert packet.payload_type == HEP_SIP
        assert packet.agent_id == 2001
        assert packet.payload == b"OPTIONS sip:x SIP/2.0\r\n\r\n"


def test_hep_refuses_mixed_families_and_bad_packets() -> None:
    with pytest.raises(ValueError):
        encode_hep(
            b"x",
            source=("192.0.2.1", 1),
            destination=("::1", 2),
            transport=Transport.UDP,
            wall=0.0,
            agent_id=1,
        )
    for bad in (b"", b"HEP2\x00\x06", b"HEP3\x00\x07abc", b"HEP3\x00\x0a\x00\x00\x00\x01\x00\x02"):
        with pytest.raises(ValueError):
            decode_hep(bad)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_gives_a_packet_or_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        decode_hep(b"HEP3" + struct.pack("!H", len(data) + 6) + data)


def _collector() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(WAIT)
    return sock


def test_hep_trace_sends_one_packet_per_message_and_cuts_tcp_streams() -> None:
    collector = _collector()
    trace = HepTrace(collector.getsockname(), agent_id=7, ours=("203.0.113.5", 5060))
    try:
        trace.received(
            INVITE.encode(),
            source=("192.0.2.10", 5062),
            local=("0.0.0.0", 5060),
            transport=Transport.UDP,
            connection=None,
            wall=10.5,
        )
        # Two messages over TCP in three chunks, with a keep-alive ping between them.
        stream = INVITE.encode() + b"\r\n\r\n" + OK.encode()
        for chunk in (stream[:30], stream[30:-10], stream[-10:]):
            trace.received(
                chunk,
                source=("192.0.2.10", 40001),
                local=("127.0.0.1", 5060),
                transport=Transport.TCP,
                connection=3,
                wall=11.0,
            )
        trace.sent(
            B_INVITE.encode(),
            destination=("198.51.100.7", 5060),
            local=("", 0),
            transport=Transport.UDP,
            wall=12.0,
        )
        trace.connection_closed(3)
        packets = [decode_hep(collector.recv(65535)) for _ in range(4)]
    finally:
        trace.close()
        collector.close()
    first, tcp_one, tcp_two, out = packets
    assert first.payload == INVITE.encode()
    assert first.source == ("192.0.2.10", 5062)
    assert first.destination == ("203.0.113.5", 5060)  # the wildcard replaced by ours
    assert (tcp_one.payload, tcp_two.payload) == (INVITE.encode(), OK.encode())
    assert tcp_one.protocol == 6 and tcp_one.destination == ("127.0.0.1", 5060)
    assert out.source == ("203.0.113.5", 5060) and out.destination == ("198.51.100.7", 5060)
    assert out.agent_id == 7
    assert trace.counters["packets"] == 4


def test_hep_trace_never_raises_when_the_collector_is_gone() -> None:
    collector = _collector()
    address = collector.getsockname()
    collector.close()  # ICMP port unreachable for what follows
    trace = HepTrace(address, agent_id=1, ours=("127.0.0.1", 5060))
    try:
        for _ in range(5):
            trace.sent(
                OK.encode(),
                destination=("127.0.0.1", 9),
                local=("127.0.0.1", 5060),
                transport=Transport.UDP,
                wall=1.0,
            )
        trace.sent(
            b"x" * 70_000,
            destination=("127.0.0.1", 9),
            local=("127.0.0.1", 5060),
            transport=Transport.UDP,
            wall=1.0,
        )
    finally:
        trace.close()
    assert trace.counters["unencodable"] == 1
    assert trace.counters["packets"] + trace.counters["send_errors"] == 5


# -- pcap --------------------------------------------------------------------------------------


def test_server_address_is_the_via_of_our_first_request() -> None:
    assert server_address([RECORD]) == ("203.0.113.5", 5060)


def test_server_address_of_a_client_leg_only_call() -> None:
    answer = (
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK-a1\r\n"
        "From: <sip:alice@sip.kx21.com>;tag=1\r\nTo: <sip:9196@sip.kx21.com>;tag=2\r\n"
        "Contact: <sip:9196@198.51.100.20:5070>\r\nCall-ID: x\r\nCSeq: 2 INVITE\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    echo = _record(
        _entry(1.0, "in", "A", "192.0.2.10:5062", "UDP", INVITE),
        _entry(2.0, "out", "A", "192.0.2.10:5062", "UDP", answer),
    )
    assert server_address([echo]) == ("198.51.100.20", 5070)
    by_uri = INVITE.replace("sip:0044123@sip.kx21.com SIP", "sip:9196@198.51.100.21 SIP")
    assert server_address([_record(_entry(1.0, "in", "A", "192.0.2.10:5062", "UDP", by_uri))]) == (
        "198.51.100.21",
        5060,
    )
    # A host name says nothing about our address.
    assert server_address([_record(RECORD.ladder[0])]) is None


def test_pcap_holds_every_ladder_message_with_addresses_ports_and_times(tmp_path: Path) -> None:
    path = tmp_path / "call.pcap"
    frames = ladder_frames([RECORD], ours=("203.0.113.5", 5060), ours_v6=("2001:db8::5", 5060))
    with path.open("wb") as file:
        assert write_pcap(file, frames) == len(RECORD.ladder)
    packets = rdpcap(str(path))
    assert len(packets) == len(RECORD.ladder)
    for packet, entry in zip(packets, RECORD.ladder, strict=True):
        assert packet.haslayer(Ether)
        assert float(packet.time) == pytest.approx(entry.wall, abs=1e-6)
        ip = packet[IPv6] if packet.haslayer(IPv6) else packet[IP]
        segment = packet[TCP] if entry.transport == "TCP" else packet[UDP]
        assert bytes(segment.payload) == entry.message.encode()
        ours = ("2001:db8::5" if entry.peer.startswith("[") else "203.0.113.5", 5060)
        peer_host, _, peer_port = entry.peer.rpartition(":")
        peer = (peer_host.strip("[]"), int(peer_port))
        ends = ((ip.src, segment.sport), (ip.dst, segment.dport))
        assert ends == ((peer, ours) if entry.direction == "in" else (ours, peer))
    # The checksums scapy recomputes match the ones written.
    for packet in packets:
        layer = packet[TCP] if packet.haslayer(TCP) else packet[UDP]
        written = layer.chksum
        del layer.chksum
        assert packet.__class__(bytes(packet))[layer.__class__].chksum == written
        if packet.haslayer(IP):
            written_ip = packet[IP].chksum
            del packet[IP].chksum
            assert Ether(bytes(packet))[IP].chksum == written_ip


def test_pcap_of_no_messages_is_a_valid_empty_capture() -> None:
    buffer = io.BytesIO()
    assert write_pcap(buffer, ladder_frames([_record()], ours=("127.0.0.1", 5060))) == 0
    assert buffer.getvalue()[:4] == struct.pack("<I", 0xA1B2C3D4)
    assert len(buffer.getvalue()) == 24


def test_hep_trace_writes_ipv4_mapped_peers_as_ipv4() -> None:
    collector = _collector()
    trace = HepTrace(collector.getsockname(), agent_id=1, ours=("127.0.0.1", 5060))
    try:
        trace.received(
            OK.encode(),
            source=("::ffff:192.0.2.7", 5062),
            local=("127.0.0.1", 5060),
            transport=Transport.UDP,
            connection=None,
            wall=1.0,
        )
        packet = decode_hep(collector.recv(65535))
    finally:
        trace.close()
        collector.close()
    assert packet.family == 2 and packet.source == ("192.0.2.7", 5062)


def _chunks(data: bytes) -> dict[int, bytes]:
    """HEP v3 read here from the format's description, not with decode_hep: "HEP3", the
    total length (16 bits, network order), then chunks of vendor id (16 bits), type
    (16 bits), length including these 6 bytes (16 bits) and the value."""
    assert data[:4] == b"HEP3" and struct.unpack("!H", data[4:6])[0] == len(data)
    chunks: dict[int, bytes] = {}
    offset = 6
    while offset < len(data):
        vendor, kind, length = struct.unpack("!HHH", data[offset : offset + 6])
        assert vendor == 0 and length >= 6 and kind not in chunks, (vendor, kind, length)
        chunks[kind] = data[offset + 6 : offset + length]
        offset += length
    assert offset == len(data)
    return chunks


@pytest.mark.parametrize(
    ("source", "destination", "family", "width"),
    [
        (("192.0.2.1", 5060), ("198.51.100.2", 40000), 2, 4),
        (("2001:db8::1", 5060), ("2001:db8::2", 5070), 10, 16),
    ],
)
def test_hep_chunks_are_the_generic_ones_with_their_widths(
    source: tuple[str, int], destination: tuple[str, int], family: int, width: int
) -> None:
    """What Homer's and sngrep's decoders read: IP family (1 byte), protocol (1),
    addresses (4 or 16, types 3/4 for IPv4, 5/6 for IPv6), ports (2 each), seconds and
    microseconds (4 each), protocol type 1 = SIP (1), capture agent id (4), payload."""
    message = b"BYE sip:x SIP/2.0\r\nCall-ID: hep-vector\r\n\r\n"
    chunks = _chunks(
        encode_hep(
            message,
            source=source,
            destination=destination,
            transport=Transport.UDP,
            wall=1_700_000_123.000045,
            agent_id=0x01020304,
        )
    )
    first = 3 if width == 4 else 5
    assert sorted(chunks) == sorted({1, 2, first, first + 1, 7, 8, 9, 10, 11, 12, 15})
    assert chunks[1] == bytes([family]) and chunks[2] == bytes([17]) and chunks[11] == b"\x01"
    assert chunks[first] == socket.inet_pton(
        socket.AF_INET if width == 4 else socket.AF_INET6, source[0]
    )
    assert chunks[first + 1] == socket.inet_pton(
        socket.AF_INET if width == 4 else socket.AF_INET6, destination[0]
    )
    assert chunks[7] == struct.pack("!H", source[1]) and chunks[8] == struct.pack(
        "!H", destination[1]
    )
    assert chunks[9] == struct.pack("!I", 1_700_000_123) and chunks[10] == struct.pack("!I", 45)
    assert chunks[12] == b"\x01\x02\x03\x04"
    assert chunks[15] == message
