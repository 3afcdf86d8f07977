"""SIP traces in the formats operators' tools read: HEP v3 streamed live to a
collector (Homer, ``sngrep -L``), and a pcap file per call built from its
ladder (Wireshark, sngrep, tshark).

**HEP v3** (the Homer Encapsulation Protocol, version 3): one UDP datagram per
SIP message, ``"HEP3"``, the total length (16 bits), then chunks, each a vendor
id (0 = generic), a type, a length counting its own 6-byte header, and the
value. We write the generic chunks every collector reads: 1 IP family (2 IPv4,
10 IPv6), 2 IP protocol (17 UDP, 6 TCP), 3/4 IPv4 or 5/6 IPv6 source and
destination, 7/8 ports, 9/10 timestamp seconds and microseconds, 11 payload
type (1 = SIP), 12 capture agent id, 15 the message. ``HepTrace`` is the
drivers' ``MessageTrace``: it is told of every datagram and TCP chunk read and
every message sent, cuts TCP streams into messages (``sansio_sip.StreamFramer``
per connection) and sends one datagram per message without blocking. A
collector that is down or slow costs a counted drop, never a wait: sending is
a non-blocking ``sendto`` into the kernel's buffer.

**pcap**: the classic libpcap format (microsecond timestamps, Ethernet link
type) with one frame per ladder entry: Ethernet, IPv4 or IPv6, then UDP, or TCP
with sequence numbers kept per direction so Wireshark reassembles the stream.
The peer's address is the ladder's; ours is the top Via of the first request we
sent on the carrier leg (our advertised address), else what the caller passes.
MAC addresses are fixed locally administered ones (02:00:00:00:00:01 for us,
…:02 for peers): they are not in the record. The ladder keeps at most the first
4,096 bytes of each message (the engine's bound), so a longer body is cut there.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import attrs

from sansio_sip import (
    Address,
    CallRecordData,
    LadderEntry,
    ParseError,
    Request,
    Response,
    SipUri,
    StreamFramer,
    Transport,
    parse_message,
    parse_uri,
)

__all__ = [
    "HEP_SIP",
    "HepPacket",
    "HepTrace",
    "decode_hep",
    "encode_hep",
    "ladder_frames",
    "parse_peer",
    "server_address",
    "write_pcap",
]

HEP_SIP = 1
"""HEP payload type of SIP."""

_FAMILY = {4: 2, 6: 10}  # IP version -> HEP address family (AF_INET, AF_INET6 as on Linux)
_PROTOCOL = {Transport.UDP: 17, Transport.TCP: 6}
_MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4
# Bound of the per-connection framers: the drivers keep at most 4,096 TCP connections by
# default; past this many (a driver configured far higher), the oldest framer is dropped.
_MAX_FRAMERS = 16_384


@attrs.frozen(kw_only=True)
class HepPacket:
    """One decoded HEP v3 packet (what a collector sees)."""

    family: int
    protocol: int
    source: Address
    destination: Address
    seconds: int
    micros: int
    payload_type: int
    agent_id: int
    payload: bytes


# Every chunk but the addresses and the payload, in one struct: family, protocol, ports,
# seconds, microseconds, payload type, agent id (each with its 6-byte chunk header).
_FIXED = struct.Struct("!HHHB HHHB HHHH HHHH HHHI HHHI HHHB HHHI")
_ADDRESS_CHUNK = struct.Struct("!HHH")


@functools.lru_cache(maxsize=4096)
def _packed(host: str) -> tuple[int, bytes]:
    """(IP version, packed address); ValueError for anything but an IP literal. Cached:
    the same few addresses (ours, the carriers', active clients') come again and again."""
    ip = ipaddress.ip_address(host)
    return ip.version, ip.packed


def encode_hep(
    payload: bytes,
    *,
    source: Address,
    destination: Address,
    transport: Transport,
    wall: float,
    agent_id: int,
) -> bytes:
    """One HEP v3 packet carrying a SIP message. ``source`` and ``destination`` must
    be IP literals of one family. Raises ValueError otherwise, or when the packet
    would not fit one datagram."""
    version, src = _packed(source[0])
    dst_version, dst = _packed(destination[0])
    if version != dst_version:
        raise ValueError(f"mixed address families: {source[0]} -> {destination[0]}")
    # Header and chunks take 99 bytes around the payload over IPv4, 123 over IPv6.
    if len(payload) > _MAX_DATAGRAM - 123:
        raise ValueError(f"a {len(payload)}-byte message does not fit a HEP datagram")
    seconds = int(wall)
    micros = min(999_999, round((wall - seconds) * 1_000_000))
    src_kind, dst_kind = (3, 4) if version == 4 else (5, 6)
    fixed = _FIXED.pack(
        *(0, 1, 7, _FAMILY[version]),
        *(0, 2, 7, _PROTOCOL[transport]),
        *(0, 7, 8, source[1]),
        *(0, 8, 8, destination[1]),
        *(0, 9, 10, seconds),
        *(0, 10, 10, micros),
        *(0, 11, 7, HEP_SIP),
        *(0, 12, 10, agent_id),
    )
    total = 6 + len(fixed) + 2 * (6 + len(src)) + 6 + len(payload)
    return b"".join(
        (
            b"HEP3",
            struct.pack("!H", total),
            fixed,
            _ADDRESS_CHUNK.pack(0, src_kind, 6 + len(src)),
            src,
            _ADDRESS_CHUNK.pack(0, dst_kind, 6 + len(dst)),
            dst,
            _ADDRESS_CHUNK.pack(0, 15, 6 + len(payload)),
            payload,
        )
    )


def decode_hep(data: bytes) -> HepPacket:
    """Decode a HEP v3 packet (the generic chunks above; others are skipped).
    Raises ValueError naming the fault."""
    if len(data) < 6 or data[:4] != b"HEP3":
        raise ValueError("not a HEP v3 packet")
    (total,) = struct.unpack("!H", data[4:6])
    if total != len(data):
        raise ValueError(f"HEP length {total} but {len(data)} bytes")
    chunks: dict[int, bytes] = {}
    offset = 6
    while offset < total:
        if total - offset < 6:
            raise ValueError("truncated HEP chunk header")
        vendor, kind, length = struct.unpack("!HHH", data[offset : offset + 6])
        if length < 6 or offset + length > total:
            raise ValueError(f"bad HEP chunk length {length}")
        if vendor == 0:
            chunks[kind] = data[offset + 6 : offset + length]
        offset += length
    try:
        family = chunks[1][0]
        if family == 2:
            src_ip, dst_ip = chunks[3], chunks[4]
        else:
            src_ip, dst_ip = chunks[5], chunks[6]
        return HepPacket(
            family=family,
            protocol=chunks[2][0],
            source=(str(ipaddress.ip_address(src_ip)), struct.unpack("!H", chunks[7])[0]),
            destination=(str(ipaddress.ip_address(dst_ip)), struct.unpack("!H", chunks[8])[0]),
            seconds=struct.unpack("!I", chunks[9])[0],
            micros=struct.unpack("!I", chunks[10])[0],
            payload_type=chunks[11][0],
            agent_id=struct.unpack("!I", chunks[12])[0],
            payload=chunks[15],
        )
    except (KeyError, IndexError, struct.error) as exc:
        raise ValueError(f"HEP packet without a needed chunk: {exc!r}") from None


class HepTrace:
    """Streams every SIP message in and out to a HEP v3 collector (a driver's
    ``MessageTrace``; see the module docstring). ``ours`` is the address written
    for our side when the socket's own is a wildcard or unknown (the advertised
    SIP address). Not thread-safe: the driver calls it from its loop only."""

    def __init__(self, collector: Address, *, agent_id: int, ours: Address) -> None:
        self.collector = collector
        self.agent_id = agent_id
        self._ours = ours
        family = socket.AF_INET6 if ":" in collector[0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._framers: dict[int, StreamFramer] = {}
        self.counters: Counter[str] = Counter()

    def close(self) -> None:
        self._sock.close()

    def received(
        self,
        data: bytes,
        *,
        source: Address,
        local: Address,
        transport: Transport,
        connection: int | None,
        wall: float,
    ) -> None:
        """A datagram (one message) or a TCP chunk (cut into messages) arrived."""
        if transport is Transport.UDP or connection is None:
            self._send(data, source, self._local(local), transport, wall)
            return
        framer = self._framers.get(connection)
        if framer is None:
            if len(self._framers) >= _MAX_FRAMERS:
                del self._framers[next(iter(self._framers))]
            # Generous limits: the engine enforces the real ones; this only follows along.
            framer = StreamFramer(max_header_bytes=1 << 17, max_body_bytes=1 << 17)
            self._framers[connection] = framer
        try:
            messages = framer.feed(data)
        except ParseError:
            # The engine closes such a connection; send the rest as it came.
            self.counters["framing_errors"] += 1
            del self._framers[connection]
            messages = [data]
        for message in messages:
            self._send(message, source, self._local(local), transport, wall)

    def sent(
        self,
        data: bytes,
        *,
        destination: Address,
        local: Address,
        transport: Transport,
        wall: float,
    ) -> None:
        """One message went out."""
        self._send(data, self._local(local), destination, transport, wall)

    def connection_closed(self, connection: int) -> None:
        self._framers.pop(connection, None)

    def _local(self, local: Address) -> Address:
        host, port = local
        if host in ("", "0.0.0.0", "::"):
            host = self._ours[0]
        return (host, port or self._ours[1])

    def _send(
        self,
        payload: bytes,
        source: Address,
        destination: Address,
        transport: Transport,
        wall: float,
    ) -> None:
        if payload.strip(b"\r\n") == b"":
            return  # keep-alive pings are not SIP messages
        try:
            packet = encode_hep(
                payload,
                source=_unmapped(source),
                destination=_unmapped(destination),
                transport=transport,
                wall=wall,
                agent_id=self.agent_id,
            )
        except ValueError:
            self.counters["unencodable"] += 1
            return
        try:
            self._sock.sendto(packet, self.collector)
        except OSError:
            # Buffer full, or an ICMP error from an earlier datagram: a trace copy is
            # best effort, the SIP traffic it mirrors is not held up by it.
            self.counters["send_errors"] += 1
            return
        self.counters["packets"] += 1


def _unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as plain IPv4, so both ends match."""
    if address[0][:7].lower() != "::ffff:":
        return address
    try:
        ip = ipaddress.IPv6Address(address[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return (str(ip.ipv4_mapped), address[1])
    return address


# -- pcap ------------------------------------------------------------------------------------

_MAC_OURS = bytes.fromhex("020000000001")
_MAC_PEER = bytes.fromhex("020000000002")
_TCP_SEGMENT = 60_000  # IPv4's total length is 16 bits: bigger messages take several segments


def parse_peer(text: str) -> Address:
    """``ip:port`` or ``[ipv6]:port`` (a ladder entry's peer). Raises ValueError."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    ipaddress.ip_address(host)
    return (host, int(port))


def server_address(records: Iterable[CallRecordData]) -> Address | None:
    """Our SIP address as the calls wrote it, from the best witness present: the top Via
    of a request we sent (the carrier leg), else the Contact of a response we sent (the
    client leg), else the Request-URI of a request we received when it names an IP.
    None when no message says it."""
    entries = [entry for record in records for entry in record.ladder]
    for witness in (_our_via, _our_contact, _their_request_uri):
        for entry in entries:
            found = witness(entry)
            if found is not None:
                return found
    return None


def _parsed(entry: LadderEntry) -> Request | Response | None:
    try:
        return parse_message(entry.message.encode("utf-8"))
    except ParseError:
        return None


def _ip_address(host: str, port: int | None) -> Address | None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return (host, port or 5060)


def _uri_address(text: str) -> Address | None:
    try:
        uri = parse_uri(text)
    except ParseError:
        return None
    if not isinstance(uri, SipUri):
        return None
    return _ip_address(uri.host, uri.port)


def _our_via(entry: LadderEntry) -> Address | None:
    if entry.direction != "out" or entry.message.startswith("SIP/"):
        return None
    message = _parsed(entry)
    if not isinstance(message, Request):
        return None
    try:
        via = message.top_via
    except ParseError:
        return None
    return _ip_address(via.host, via.port)


def _our_contact(entry: LadderEntry) -> Address | None:
    if entry.direction != "out" or not entry.message.startswith("SIP/"):
        return None
    message = _parsed(entry)
    if message is None:
        return None
    try:
        contacts = message.contacts
    except ParseError:
        return None
    for contact in contacts:
        if contact != "*":
            return _uri_address(contact.uri)
    return None


def _their_request_uri(entry: LadderEntry) -> Address | None:
    if entry.direction != "in" or entry.message.startswith("SIP/"):
        return None
    message = _parsed(entry)
    return _uri_address(message.uri) if isinstance(message, Request) else None


@attrs.frozen(kw_only=True)
class _Frame:
    wall: float
    data: bytes


def ladder_frames(
    records: Sequence[CallRecordData], *, ours: Address, ours_v6: Address | None = None
) -> list[_Frame]:
    """Every ladder entry of ``records`` as an Ethernet frame, in time order. ``ours`` is
    our address for IPv4 peers, ``ours_v6`` for IPv6 ones (default ``[::1]`` with
    ``ours``'s port when ``ours`` is IPv4, and the other way round)."""
    if ":" in ours[0]:
        v6, v4 = ours, (ours_v6 or ("127.0.0.1", ours[1]))
    else:
        v4, v6 = ours, (ours_v6 or ("::1", ours[1]))
    entries: list[LadderEntry] = sorted(
        (entry for record in records for entry in record.ladder), key=lambda entry: entry.wall
    )
    sequences: dict[tuple[Address, Address], int] = {}
    frames: list[_Frame] = []
    for entry in entries:
        try:
            peer = parse_peer(entry.peer)
        except ValueError:
            continue
        local = v6 if ":" in peer[0] else v4
        out = entry.direction == "out"
        source, destination = (local, peer) if out else (peer, local)
        payload = entry.message.encode("utf-8")
        if entry.transport.upper() == "TCP":
            for start in range(0, len(payload), _TCP_SEGMENT):
                segment = payload[start : start + _TCP_SEGMENT]
                seq = sequences.get((source, destination), 1)
                ack = sequences.get((destination, source), 1)
                sequences[(source, destination)] = (seq + len(segment)) & 0xFFFFFFFF
                transport = _tcp(source, destination, segment, seq, ack)
                data = _frame(source, destination, 6, transport, out=out)
                frames.append(_Frame(wall=entry.wall, data=data))
        else:
            transport = _udp(source, destination, payload)
            data = _frame(source, destination, 17, transport, out=out)
            frames.append(_Frame(wall=entry.wall, data=data))
    return frames


def write_pcap(file: BinaryIO, frames: Sequence[_Frame]) -> int:
    """Write a libpcap file (microseconds, Ethernet); returns the number of frames."""
    file.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262_144, 1))
    for frame in frames:
        seconds = int(frame.wall)
        micros = min(999_999, round((frame.wall - seconds) * 1_000_000))
        file.write(struct.pack("<IIII", seconds, micros, len(frame.data), len(frame.data)))
        file.write(frame.data)
    return len(frames)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(source: Address, destination: Address, protocol: int, length: int) -> bytes:
    src = ipaddress.ip_address(source[0]).packed
    dst = ipaddress.ip_address(destination[0]).packed
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, protocol, length)
    return src + dst + struct.pack("!IxxxB", length, protocol)


def _udp(source: Address, destination: Address, payload: bytes) -> bytes:
    length = 8 + len(payload)
    header = struct.pack("!HHHH", source[1], destination[1], length, 0)
    checksum = _checksum(_pseudo_header(source, destination, 17, length) + header + payload)
    # RFC 768: a computed zero is sent as all ones (zero means "no checksum").
    return struct.pack("!HHHH", source[1], destination[1], length, checksum or 0xFFFF) + payload


def _tcp(source: Address, destination: Address, payload: bytes, seq: int, ack: int) -> bytes:
    flags = 0x18  # PSH, ACK
    header = struct.pack(
        "!HHIIBBHHH", source[1], destination[1], seq, ack, 5 << 4, flags, 65535, 0, 0
    )
    length = len(header) + len(payload)
    checksum = _checksum(_pseudo_header(source, destination, 6, length) + header + payload)
    header = header[:16] + struct.pack("!H", checksum) + header[18:]
    return header + payload


def _frame(
    source: Address, destination: Address, protocol: int, transport: bytes, *, out: bool
) -> bytes:
    """Ethernet + IPv4/IPv6 around a UDP or TCP segment (``out``: we are the sender)."""
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if src.version == 4:
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(transport),
            0,
            0x4000,  # don't fragment
            64,
            protocol,
            0,
            src.packed,
            dst.packed,
        )
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        ethertype = 0x0800
    else:
        header = struct.pack(
            "!IHBB16s16s", 6 << 28, len(transport), protocol, 64, src.packed, dst.packed
        )
        ethertype = 0x86DD
    macs = _MAC_PEER + _MAC_OURS if out else _MAC_OURS + _MAC_PEER  # destination first
    return macs + struct.pack("!H", ethertype) + header + transport
