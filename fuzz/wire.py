#!/usr/bin/env python3
"""Wire fuzzing of a running kx-sipd with scapy: malformed and edge-case
packets on loopback, and after every batch a valid OPTIONS that must be answered.

Batches (each a list of packets built with scapy and sent through raw
sockets, so IP and UDP headers, fragments and sources are ours to choose):

* ``truncated``     valid requests cut at every kind of boundary
* ``oversize``      datagrams of 1,500 to 65,507 bytes (the largest IPv4 UDP payload)
* ``nul``           NUL bytes at random places of valid requests
* ``utf8``          invalid UTF-8 (lone continuation bytes, overlongs, surrogates)
* ``content_length`` huge, negative, non-numeric and conflicting Content-Length
* ``headers``       thousands of header fields, and one header of 60 KB
* ``via``           deep Via stacks (100 to 2,000 entries)
* ``mutations``     valid requests with random bytes flipped, inserted, removed
* ``fragments``     IP fragments: a valid OPTIONS in 8-byte fragments (must be
                    answered), overlapping fragments, sets missing a piece,
                    fragments of an oversize datagram
* ``spoofed``       requests from many forged loopback sources (127.x.y.z),
                    source port 0, a UDP length field that lies
* ``ipv6``          the same kinds over IPv6 to ::1, with IPv6 fragments
* ``tcp``           garbage streams, a request with a huge Content-Length,
                    slowloris connections sending a header byte at a time,
                    pipelined and byte-by-byte requests (plain sockets: the
                    kernel owns TCP handshakes)

Raw sockets need root (or CAP_NET_RAW). Run against a server on loopback:

    python3 fuzz/wire.py 127.0.0.1:5060 [--ipv6] [--rounds 3] [--seed 1]

It prints one line per batch (packets sent, whether OPTIONS was answered
after it) and exits non-zero when the server stopped answering.
tests/robustness/test_wire.py runs it against ``kx-sipd serve`` (both drivers).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.packet import Packet, Raw
from scapy.supersocket import L3RawSocket

try:
    from scapy.supersocket import L3RawSocket6  # type: ignore[attr-defined]
except ImportError:  # older scapy keeps it with the IPv6 layers
    from scapy.layers.inet6 import L3RawSocket6  # type: ignore[attr-defined,no-redef]

REALM = "sip.kx21.com"
CHECK_WAIT = 3.0
CHECK_TRIES = 3


def request(
    method: str = "OPTIONS",
    *,
    host: str = "127.0.0.1",
    port: int = 5999,
    transport: str = "UDP",
    extra: tuple[str, ...] = (),
    body: bytes = b"",
    rng: random.Random | None = None,
) -> bytes:
    """A well-formed request (the base every batch breaks)."""
    rng = rng or random.Random()
    shown = f"[{host}]" if ":" in host else host
    lines = [
        f"{method} sip:{REALM} SIP/2.0",
        f"Via: SIP/2.0/{transport} {shown}:{port};branch=z9hG4bK{rng.getrandbits(48):012x};rport",
        "Max-Forwards: 70",
        f"From: <sip:alice@{REALM}>;tag={rng.getrandbits(32):08x}",
        f"To: <sip:alice@{REALM}>",
        f"Call-ID: {rng.getrandbits(64):016x}@wire",
        f"CSeq: 1 {method}",
        *extra,
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ------------------------------------------------------------------ batches


@dataclass
class Target:
    host: str
    port: int
    ipv6_port: int | None  # the same server on ::1, when it listens there


def _udp(target: Target, payload: bytes, *, src: str = "127.0.0.1", sport: int = 5999) -> Packet:
    return IP(src=src, dst=target.host) / UDP(sport=sport, dport=target.port) / Raw(payload)


def _udp6(port: int, payload: bytes, *, sport: int = 5999) -> Packet:
    return IPv6(src="::1", dst="::1") / UDP(sport=sport, dport=port) / Raw(payload)


def batch_truncated(target: Target, rng: random.Random) -> Iterator[Packet]:
    for method in ("OPTIONS", "REGISTER", "INVITE", "BYE"):
        whole = request(method, rng=rng, body=b"v=0\r\n" if method == "INVITE" else b"")
        cuts = {1, 7, len(whole) // 3, len(whole) // 2, len(whole) - 5, len(whole) - 2}
        cuts |= {i for i, b in enumerate(whole) if b in b"\r:;"}
        for cut in sorted(cuts)[:40]:
            yield _udp(target, whole[:cut])


def batch_oversize(target: Target, rng: random.Random) -> Iterator[Packet]:
    for size in (1500, 4096, 9000, 32768, 65000, 65507):
        head = request(rng=rng, extra=("X-Pad: ",))
        pad = max(0, size - len(head))
        yield _udp(target, request(rng=rng, extra=("X-Pad: " + "a" * pad,))[:size])
    yield _udp(target, b"\x00" * 65507)
    yield _udp(target, b"OPTIONS " + b"a" * 65000 + b" SIP/2.0\r\n\r\n")


def batch_nul(target: Target, rng: random.Random) -> Iterator[Packet]:
    for _ in range(40):
        data = bytearray(request(rng=rng))
        for _ in range(rng.randint(1, 4)):
            data.insert(rng.randrange(len(data)), 0)
        yield _udp(target, bytes(data))
    yield _udp(target, b"\x00" * 100)
    yield _udp(target, request(rng=rng, extra=("Subject: \x00\x00",)))


_BAD_UTF8 = (
    b"\x80",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xff\xfe",
    b"\xe2\x82",
)


def batch_utf8(target: Target, rng: random.Random) -> Iterator[Packet]:
    for bad in _BAD_UTF8:
        base = request(rng=rng)
        yield _udp(target, base.replace(b"alice", b"al" + bad + b"ice", 1))
        yield _udp(target, base.replace(b"OPTIONS sip:", b"OPTIONS sip:" + bad, 1))
        subject = request(rng=rng, extra=("Subject: x",))
        yield _udp(target, subject.replace(b"Subject: x", b"Subject: " + bad, 1))


def batch_content_length(target: Target, rng: random.Random) -> Iterator[Packet]:
    for value in ("99999999999999999999999", "-1", "4294967296", "abc", "1e9", " 5 5", "0x10", ""):
        yield _udp(
            target,
            request(rng=rng).replace(b"Content-Length: 0", f"Content-Length: {value}".encode()),
        )
    yield _udp(target, request(rng=rng, extra=("Content-Length: 10", "l: 3")))
    yield _udp(
        target,
        request(rng=rng, body=b"x" * 10).replace(b"Content-Length: 10", b"Content-Length: 10000"),
    )


def batch_headers(target: Target, rng: random.Random) -> Iterator[Packet]:
    for count in (257, 1000, 5000):
        yield _udp(target, request(rng=rng, extra=tuple(f"X{i}:{i}" for i in range(count)))[:65507])
    yield _udp(target, request(rng=rng, extra=("Subject: " + "s" * 60000,)))
    yield _udp(target, request(rng=rng, extra=tuple("X: " for _ in range(4000)))[:65507])
    yield _udp(
        target, request(rng=rng, extra=("Subject: a", *(" folded" for _ in range(2000))))[:65507]
    )


def batch_via(target: Target, rng: random.Random) -> Iterator[Packet]:
    for depth in (65, 100, 500, 2000):
        vias = tuple(
            f"Via: SIP/2.0/UDP 10.{i % 250}.0.1:5060;branch=z9hG4bK{i}" for i in range(depth)
        )
        yield _udp(target, request(rng=rng, extra=vias)[:65507])
        joined = "Via: " + ",".join(
            f"SIP/2.0/UDP h{i}:5060;branch=z9hG4bKj{i}" for i in range(depth)
        )
        yield _udp(target, request(rng=rng, extra=(joined,))[:65507])


def batch_mutations(target: Target, rng: random.Random) -> Iterator[Packet]:
    for _ in range(200):
        method = rng.choice(("OPTIONS", "REGISTER", "INVITE", "BYE", "CANCEL", "ACK"))
        data = bytearray(request(method, rng=rng))
        for _ in range(rng.randint(1, 8)):
            action = rng.randrange(3)
            at = rng.randrange(len(data))
            if action == 0:
                data[at] = rng.randrange(256)
            elif action == 1:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            else:
                del data[at : at + rng.randint(1, 16)]
        yield _udp(
            target, bytes(data), src=f"127.0.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}"
        )


def batch_fragments(target: Target, rng: random.Random) -> Iterator[Packet]:
    # A valid OPTIONS in tiny fragments: reassembled by the kernel, then answered
    # (the answer goes to a port nobody listens on; the check after the batch
    # proves the server is fine).
    yield from fragment(_udp(target, request(rng=rng)), fragsize=8)
    # Fragments of a 60 KB datagram, in reverse order.
    big = _udp(target, request(rng=rng, extra=("X-Pad: " + "b" * 60000,)))
    yield from reversed(fragment(big, fragsize=1400))
    # A set missing its last fragment (the kernel's reassembly times out).
    yield from fragment(
        _udp(target, request(rng=rng, extra=("X-Pad: " + "c" * 3000,))), fragsize=512
    )[:-1]
    # Overlapping fragments (teardrop-style offsets).
    pieces = fragment(_udp(target, request(rng=rng, extra=("X-Pad: " + "d" * 2000,))), fragsize=256)
    for piece in pieces:
        piece = piece.copy()
        if piece.frag > 0:
            piece.frag -= 1
        yield piece
    # A lone "first fragment" and a lone "last fragment".
    lone = _udp(target, request(rng=rng))
    lone.flags = "MF"
    yield lone
    tail = IP(src="127.0.0.1", dst=target.host, frag=100, proto=17) / Raw(b"tail" * 10)
    yield tail


def batch_spoofed(target: Target, rng: random.Random) -> Iterator[Packet]:
    for _ in range(100):
        src = f"127.{rng.randrange(0, 255)}.{rng.randrange(0, 255)}.{rng.randrange(1, 255)}"
        yield _udp(target, request(rng=rng, host=src), src=src, sport=rng.randrange(1, 65536))
    yield _udp(target, request(rng=rng), sport=0)
    lying = _udp(target, request(rng=rng))
    lying[UDP].len = 2000  # longer than the datagram: the kernel drops it
    yield lying
    short = _udp(target, request(rng=rng))
    short[UDP].len = 20  # shorter: the kernel truncates the payload
    yield short


def batch_ipv6(target: Target, rng: random.Random) -> Iterator[Packet]:
    port = target.ipv6_port
    if port is None:
        return
    yield _udp6(port, b"\xff" * 100)
    yield _udp6(port, request(rng=rng, host="::1")[:50])
    yield _udp6(port, request(rng=rng, host="::1").replace(b"Call-ID", b"X-Gone"))
    yield _udp6(port, request(rng=rng, host="::1", extra=tuple(f"X{i}:{i}" for i in range(1000))))
    for _ in range(30):
        data = bytearray(request(rng=rng, host="::1"))
        data[rng.randrange(len(data))] = rng.randrange(256)
        yield _udp6(port, bytes(data))
    whole = IPv6(src="::1", dst="::1") / IPv6ExtHdrFragment() / UDP(sport=5999, dport=port)
    yield from fragment6(
        whole / Raw(request(rng=rng, host="::1", extra=("X-Pad: " + "e" * 4000,))), 1280
    )
    yield from fragment6(
        whole / Raw(request(rng=rng, host="::1", extra=("X-Pad: " + "f" * 60000,))), 1280
    )[:-1]


BATCHES: dict[str, Callable[[Target, random.Random], Iterator[Packet]]] = {
    "truncated": batch_truncated,
    "oversize": batch_oversize,
    "nul": batch_nul,
    "utf8": batch_utf8,
    "content_length": batch_content_length,
    "headers": batch_headers,
    "via": batch_via,
    "mutations": batch_mutations,
    "fragments": batch_fragments,
    "spoofed": batch_spoofed,
    "ipv6": batch_ipv6,
}


# ------------------------------------------------------------------ TCP


def tcp_batch(target: Target, rng: random.Random, *, slowloris: int = 8, hold: float = 2.0) -> int:
    """Hostile TCP over plain sockets; returns how many connections were used.
    Slowloris connections stay open (sending a byte at a time) while the
    OPTIONS check runs, so the check proves they do not starve the server."""
    address = (target.host, target.port)
    used = 0

    def connect() -> socket.socket:
        nonlocal used
        used += 1
        sock = socket.create_connection(address, timeout=2.0)
        return sock

    streams = [
        rng.randbytes(4096),
        b"\r\n" * 1000,
        request(transport="TCP", rng=rng).replace(
            b"Content-Length: 0", b"Content-Length: 999999999"
        ),
        request(transport="TCP", rng=rng) * 20,
        b"".join(request(transport="TCP", rng=rng)[i : i + 1] for i in range(400)),
        request(transport="TCP", rng=rng, extra=("X-Pad: " + "g" * 70000,)),
        b"OPTIONS sip:x SIP/2.0\r\n" + b"X: y\r\n" * 20000,
    ]
    for stream in streams:
        with contextlib.suppress(OSError), connect() as sock:
            sock.sendall(stream)
            sock.settimeout(0.3)
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
    slow: list[socket.socket] = []
    try:
        for _ in range(slowloris):
            with contextlib.suppress(OSError):
                slow.append(connect())
        partial = request(transport="TCP", rng=rng)
        deadline = time.monotonic() + hold
        position = 0
        while time.monotonic() < deadline and position < len(partial) - 4:
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(partial[position : position + 1])
            position += 1
            time.sleep(0.05)
        if not options_answered(target):
            raise ServerGone("no OPTIONS answer while slowloris connections were open")
    finally:
        for sock in slow:
            sock.close()
    return used


# ------------------------------------------------------------------ checks


class ServerGone(Exception):
    """The server stopped answering a valid OPTIONS."""


def options_answered(target: Target, *, ipv6: bool = False) -> bool:
    """A valid OPTIONS from a real socket gets a 200 (a few tries: UDP may drop)."""
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    host = "::1" if ipv6 else "127.0.0.1"
    port = target.ipv6_port if ipv6 else target.port
    assert port is not None
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        local_port = sock.getsockname()[1]
        for _ in range(CHECK_TRIES):
            data = request(host=host, port=local_port)
            call_id = data.split(b"Call-ID: ", 1)[1].split(b"\r\n", 1)[0]
            sock.sendto(data, (target.host if not ipv6 else "::1", port))
            deadline = time.monotonic() + CHECK_WAIT
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    answer, _ = sock.recvfrom(65535)
                except TimeoutError:
                    break
                if answer.startswith(b"SIP/2.0 200 ") and call_id in answer:
                    return True
    return False


@dataclass
class BatchResult:
    name: str
    packets: int
    answered: bool
    ipv6_answered: bool | None


def run(
    target: Target, *, rounds: int = 1, seed: int = 1, only: tuple[str, ...] = ()
) -> list[BatchResult]:
    """Every batch ``rounds`` times; after each, the OPTIONS check (IPv4, and
    IPv6 when the server listens on ::1). Raises ServerGone at the first
    batch after which the server does not answer."""
    rng = random.Random(seed)
    results: list[BatchResult] = []
    sock4 = L3RawSocket()
    sock6 = L3RawSocket6() if target.ipv6_port is not None else None
    try:
        for _ in range(rounds):
            for name, batch in BATCHES.items():
                if only and name not in only:
                    continue
                count = 0
                for packet in batch(target, rng):
                    sock = sock6 if packet.haslayer(IPv6) else sock4
                    assert sock is not None
                    with contextlib.suppress(OSError):
                        sock.send(packet)
                    count += 1
                results.append(_checked(target, name, count))
            if not only or "tcp" in only:
                results.append(_checked(target, "tcp", tcp_batch(target, rng)))
    finally:
        sock4.close()
        if sock6 is not None:
            sock6.close()
    return results


def _checked(target: Target, name: str, count: int) -> BatchResult:
    answered = options_answered(target)
    ipv6 = options_answered(target, ipv6=True) if target.ipv6_port is not None else None
    result = BatchResult(name, count, answered, ipv6)
    if not answered or ipv6 is False:
        raise ServerGone(f"after batch {name!r}: {result}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="HOST:PORT of kx-sipd on loopback, e.g. 127.0.0.1:5060")
    parser.add_argument("--ipv6", action="store_true", help="the server also listens on [::1]:PORT")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", action="append", default=[], help="run only this batch")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    target = Target(host, int(port), int(port) if args.ipv6 else None)
    started = time.monotonic()
    try:
        results = run(target, rounds=args.rounds, seed=args.seed, only=tuple(args.only))
    except ServerGone as exc:
        print(f"FAIL {exc}", flush=True)
        return 1
    for result in results:
        print(f"{result.name:16} packets={result.packets:5}  OPTIONS answered", flush=True)
    total = sum(r.packets for r in results)
    print(
        f"{len(results)} batches, {total} packets/connections, {time.monotonic() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
