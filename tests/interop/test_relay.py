"""The relay as real processes (supervisor + shards) on loopback, driven by a
small RTP sender: forwarding, latching, anti-hijack, RFC 4733 pass-through,
echo, RTCP, media timeout, shard restart, exhaustion, control security, CLI."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from kx_sipd.relay_cli import relay as relay_cli
from rtp_relay import LocalRelay, RelayClient, RelayConfig, RelayStartError, start_local_relay
from rtp_relay._protocol import open_datagram, seal
from sansio_sip import MediaAllocation, MediaUnavailable

SECRET_TEXT = "relay-test-secret-0123456789"
SECRET = SECRET_TEXT.encode()
WAIT = 2.0  # bound on any single receive


def free_rtp_range(pairs: int) -> tuple[int, int]:
    """2*pairs consecutive ports below the ephemeral range, all free right now."""
    for _ in range(100):
        lo = random.randrange(21000, 32000, 2)
        probes = []
        try:
            for port in range(lo, lo + 2 * pairs):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probes.append(s)
                s.bind(("127.0.0.1", port))
            return lo, lo + 2 * pairs - 1
        except OSError:
            continue
        finally:
            for s in probes:
                s.close()
    raise RuntimeError("no free port range")


def start(pairs: int, **overrides: object) -> LocalRelay:
    fields: dict[str, object] = {
        "secret": SECRET,
        "control": ("127.0.0.1", 0),
        "rtp_range": free_rtp_range(pairs),
        "shards": 2,
        "media_host": "127.0.0.1",
        "media_timeout": 1.0,
        "log_level": "warning",
    }
    fields.update(overrides)
    return start_local_relay(RelayConfig(**fields))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def relay() -> Iterator[LocalRelay]:
    r = start(40)
    yield r
    r.stop()


@pytest.fixture
def client(relay: LocalRelay) -> Iterator[RelayClient]:
    c = relay.client()
    yield c
    c.close()


class Endpoint:
    """A UDP socket on loopback standing in for a phone or a carrier."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(WAIT)
        self.address: tuple[str, int] = self.sock.getsockname()

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        self.sock.sendto(data, to)

    def recv(self, timeout: float = WAIT) -> tuple[bytes, tuple[str, int]] | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recvfrom(4096)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def endpoints() -> Iterator[list[Endpoint]]:
    eps = [Endpoint() for _ in range(5)]
    yield eps
    for e in eps:
        e.close()


def rtp(
    seq: int,
    ts: int = 0,
    ssrc: int = 0xA1,
    pt: int = 0,
    payload: bytes = b"\xd5" * 160,
    marker: bool = False,
) -> bytes:
    return (
        struct.pack(
            "!BBHII", 0x80, pt | (0x80 if marker else 0), seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc
        )
        + payload
    )


def a_side(alloc: MediaAllocation) -> tuple[str, int]:
    return (alloc.a_address, alloc.a_port)


def b_side(alloc: MediaAllocation) -> tuple[str, int]:
    return (alloc.b_address, alloc.b_port)


def call_ref() -> str:
    return "call-" + os.urandom(6).hex()


# ------------------------------------------------------------------ media


def test_media_flows_both_ways_latching_to_real_sources(
    client: RelayClient, endpoints: list[Endpoint]
) -> None:
    phone, phone_sdp_decoy, carrier = endpoints[:3]
    ref = call_ref()
    alloc = client.allocate(ref, a_peer=phone_sdp_decoy.address, echo=False)
    assert alloc.a_address == "127.0.0.1" and alloc.a_port != alloc.b_port
    client.update(ref, a_peer=phone_sdp_decoy.address, b_peer=carrier.address)
    for i in range(20):
        phone.send(rtp(i, ts=160 * i), a_side(alloc))
        got = carrier.recv()
        assert got is not None and got[0] == rtp(i, ts=160 * i) and got[1] == b_side(alloc)
        carrier.send(rtp(i, ts=160 * i, ssrc=0xB2), b_side(alloc))
        back = phone.recv()
        assert (
            back is not None
            and back[0] == rtp(i, ts=160 * i, ssrc=0xB2)
            and back[1] == a_side(alloc)
        )
    assert phone_sdp_decoy.recv(timeout=0.2) is None  # the SDP address was overridden by latching
    a_stats, b_stats = client.release(ref)
    assert a_stats is not None and b_stats is not None
    assert (a_stats.packets_in, a_stats.packets_out, a_stats.bytes_in) == (20, 20, 20 * 172)
    assert (b_stats.packets_in, b_stats.packets_out, b_stats.packets_lost) == (20, 20, 0)


def test_hijack_from_third_port_dropped_and_counted(
    client: RelayClient, endpoints: list[Endpoint]
) -> None:
    phone, carrier, attacker = endpoints[:3]
    ref = call_ref()
    alloc = client.allocate(ref, a_peer=phone.address, echo=False)
    client.update(ref, a_peer=phone.address, b_peer=carrier.address)
    phone.send(rtp(1), a_side(alloc))
    assert carrier.recv() is not None
    for i in range(10):
        attacker.send(
            rtp(100 + i, ssrc=0xA1), a_side(alloc)
        )  # same SSRC as the phone: never re-latches
    phone.send(rtp(2), a_side(alloc))
    got = carrier.recv()
    assert got is not None and got[0] == rtp(2)  # the next packet the carrier sees is the phone's
    assert carrier.recv(timeout=0.2) is None
    figures = client.query(ref)
    assert figures is not None
    assert figures["a"]["rtp"]["dropped_foreign"] == 10
    assert figures["a"]["rtp"]["peer"] == list(phone.address)
    client.release(ref)


def test_dtmf_rfc4733_packets_arrive_byte_identical(
    client: RelayClient, endpoints: list[Endpoint]
) -> None:
    phone, carrier = endpoints[:2]
    ref = call_ref()
    alloc = client.allocate(ref, a_peer=phone.address, echo=False)
    client.update(ref, a_peer=phone.address, b_peer=carrier.address)
    packets = []
    for i in range(
        6
    ):  # digit 5, volume 10, growing duration, end bit on the last three (RFC 4733 §2.5.1.4)
        end = 0x80 if i >= 3 else 0
        payload = struct.pack("!BBH", 5, end | 10, 160 * (i + 1))
        packets.append(rtp(500 + i, ts=48000, ssrc=0xA1, pt=101, payload=payload, marker=(i == 0)))
    for packet in packets:
        phone.send(packet, a_side(alloc))
        got = carrier.recv()
        assert got is not None and got[0] == packet
    client.release(ref)


def test_echo_mode_returns_each_packet_to_its_sender(
    client: RelayClient, endpoints: list[Endpoint]
) -> None:
    phone = endpoints[0]
    ref = call_ref()
    alloc = client.allocate(ref, a_peer=None, echo=True)
    assert a_side(alloc) == b_side(alloc)
    for i in range(5):
        packet = rtp(i, ts=160 * i)
        phone.send(packet, a_side(alloc))
        got = phone.recv()
        assert got is not None and got == (packet, a_side(alloc))
    a_stats, b_stats = client.release(ref)
    assert b_stats is None and a_stats is not None and a_stats.packets_out == 5


def test_rtcp_is_relayed_between_latched_rtcp_sources(
    client: RelayClient, endpoints: list[Endpoint]
) -> None:
    phone, phone_rtcp, carrier, carrier_rtcp = endpoints[:4]
    ref = call_ref()
    alloc = client.allocate(ref, a_peer=phone.address, echo=False)
    client.update(ref, a_peer=phone.address, b_peer=carrier.address)
    from_carrier = struct.pack("!BBHI", 0x80, 200, 6, 0xB2) + b"\x01" * 20
    from_phone = struct.pack("!BBHI", 0x80, 201, 6, 0xA1) + b"\x02" * 20
    a_rtcp, b_rtcp = (alloc.a_address, alloc.a_port + 1), (alloc.b_address, alloc.b_port + 1)
    # The phone's first report latches A's RTCP (it goes to the carrier's SDP port + 1).
    phone_rtcp.send(from_phone, a_rtcp)
    time.sleep(0.05)
    carrier_rtcp.send(from_carrier, b_rtcp)  # latches B's RTCP, reaches the phone's latched source
    assert phone_rtcp.recv() == (from_carrier, a_rtcp)
    phone_rtcp.send(from_phone, a_rtcp)
    assert carrier_rtcp.recv() == (from_phone, b_rtcp)
    client.release(ref)


def test_media_timeout_reported_once_by_expired(client: RelayClient) -> None:
    ref = call_ref()
    client.allocate(ref, a_peer=None, echo=False)
    deadline = time.monotonic() + 10
    reported: list[tuple[str, str]] = []
    while time.monotonic() < deadline and not reported:
        reported = [e for e in client.expired() if e[0] == ref]
        time.sleep(0.2)
    assert reported == [(ref, "media-timeout")]
    assert [e for e in client.expired() if e[0] == ref] == []
    a_stats, _b = client.release(ref)
    assert a_stats is not None and a_stats.packets_in == 0


# ------------------------------------------------------------------ control


def test_allocate_is_idempotent_per_call_ref(client: RelayClient) -> None:
    before = sum(s["calls"] for s in client.shard_stats())
    ref = call_ref()
    first = client.allocate(ref, a_peer=None, echo=False)
    assert client.allocate(ref, a_peer=None, echo=False) == first
    assert sum(s["calls"] for s in client.shard_stats()) == before + 1
    client.release(ref)


def test_retransmitted_command_gets_the_same_reply(relay: LocalRelay) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(WAIT)
    try:
        ref = call_ref()
        datagram = seal(
            SECRET, {"c": "retx-1", "op": "allocate", "ts": time.time(), "call": ref, "echo": False}
        )
        sock.sendto(datagram, relay.control)
        first = sock.recv(65535)
        sock.sendto(datagram, relay.control)
        second = sock.recv(65535)
        assert first == second
        reply = open_datagram(SECRET, first)
        assert reply["ok"] and reply["c"] == "retx-1"
        shard_port = relay.control[1] + 1 + reply["shard"]
        delete = seal(SECRET, {"c": "retx-2", "op": "delete", "ts": time.time(), "call": ref})
        sock.sendto(delete, ("127.0.0.1", shard_port))
        gone = open_datagram(SECRET, sock.recv(65535))
        sock.sendto(delete, ("127.0.0.1", shard_port))
        assert open_datagram(SECRET, sock.recv(65535)) == gone
        assert (
            gone["ok"] and gone["a"] is not None
        )  # not "unknown": the retransmission was not re-executed
    finally:
        sock.close()


def test_bad_secret_is_ignored(relay: LocalRelay) -> None:
    good = relay.client()

    def refused() -> int:
        return sum(s["counters"].get("control-bad-tag", 0) for s in good.shard_stats())

    def calls() -> int:
        return sum(s["calls"] for s in good.shard_stats())

    intruder = RelayClient(relay.control, b"not-the-secret-at-all", timeout=0.1, retries=1)
    try:
        before, held = refused(), calls()
        with pytest.raises(MediaUnavailable):
            intruder.allocate(call_ref(), a_peer=None, echo=False)
        # Its info request and one retransmission, each dropped and counted;
        # nothing was allocated.
        assert refused() == before + 2
        assert calls() == held
    finally:
        intruder.close()
        good.close()


def test_allocations_are_spread_over_shards(client: RelayClient) -> None:
    refs = [call_ref() for _ in range(4)]
    for ref in refs:
        client.allocate(ref, a_peer=None, echo=False)
    stats = client.shard_stats()
    assert all(s["calls"] >= 2 for s in stats)
    for ref in refs:
        client.release(ref)


def test_shared_control_port_spreads_new_allocations_over_shards(relay: LocalRelay) -> None:
    """The shared control port is bound by every shard with SO_REUSEPORT: allocations
    sent to it from different source ports are balanced by the kernel over the
    shards (16 senders all hashed to one of two shards: odds 1 in 32,768)."""
    owners: dict[str, int] = {}
    try:
        for i in range(16):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(WAIT)
                ref = call_ref()
                request = {"c": f"spread-{i}-{ref}", "op": "allocate", "ts": time.time()}
                sock.sendto(seal(SECRET, {**request, "call": ref, "echo": True}), relay.control)
                reply = open_datagram(SECRET, sock.recv(65535))
                assert reply["ok"], reply
                owners[ref] = int(reply["shard"])
        assert set(owners.values()) == {0, 1}, owners
    finally:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(WAIT)
            for ref, index in owners.items():
                delete = {"c": f"free-{ref}", "op": "delete", "ts": time.time(), "call": ref}
                sock.sendto(seal(SECRET, delete), ("127.0.0.1", relay.control[1] + 1 + index))
                assert open_datagram(SECRET, sock.recv(65535))["ok"]


def _udp_ports_of(pid: int) -> set[int]:
    """The local ports of the IPv4 UDP sockets process ``pid`` holds (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    with open("/proc/net/udp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_each_shard_binds_only_the_ports_of_its_slice() -> None:
    """Every port pair of the range in use: each shard process holds exactly the
    RTP/RTCP ports of its own slice (plus its control ports), the supervisor none."""
    relay = start(8, media_timeout=30.0)  # 8 pairs, 2 shards: 2 calls each
    client = relay.client()
    try:
        low, high = relay.config.rtp_range
        for _ in range(4):
            client.allocate(call_ref(), a_peer=None, echo=False)
        stats = client.shard_stats()
        assert [s["free_pairs"] for s in stats] == [0, 0], stats
        seen: set[int] = set()
        for shard in stats:
            first, last = shard["rtp"]
            media = {p for p in _udp_ports_of(int(shard["pid"])) if low <= p <= high}
            assert media == set(range(first, last + 1)), (shard["index"], sorted(media))
            assert not media & seen
            seen |= media
        assert seen == set(range(low, high + 1))
        assert not {p for p in _udp_ports_of(relay.pid) if low <= p <= high}
    finally:
        client.close()
        relay.stop()


def test_relatch_after_silence_with_a_new_ssrc_over_real_sockets(
    relay: LocalRelay, client: RelayClient, endpoints: list[Endpoint]
) -> None:
    """The re-latch window: a new source with a new SSRC is refused while the
    latched one is talking, and takes the stream over once it has been silent
    for relatch_after (0.5 s); the carrier's media then follows the new source."""
    phone, moved, carrier = endpoints[:3]
    ref = call_ref()
    alloc = client.allocate(ref, a_peer=phone.address, echo=False)
    client.update(ref, a_peer=phone.address, b_peer=carrier.address)
    try:
        phone.send(rtp(1, ssrc=0xA1), a_side(alloc))
        assert carrier.recv() is not None
        moved.send(rtp(1, ssrc=0xC3), a_side(alloc))  # too soon: dropped
        assert carrier.recv(timeout=0.2) is None
        time.sleep(relay.config.relatch_after + 0.2)
        moved.send(rtp(2, ssrc=0xC3), a_side(alloc))  # after the silence: takes over
        got = carrier.recv()
        assert got is not None and got[0] == rtp(2, ssrc=0xC3)
        carrier.send(rtp(9, ssrc=0xB2), b_side(alloc))
        back = moved.recv()
        assert back is not None and back[0] == rtp(9, ssrc=0xB2)
        assert phone.recv(timeout=0.2) is None
        phone.send(rtp(3, ssrc=0xA1), a_side(alloc))  # the old source is foreign now
        assert carrier.recv(timeout=0.2) is None
        figures = client.query(ref)
        assert figures is not None
        assert figures["a"]["rtp"]["peer"] == list(moved.address)
        assert figures["a"]["rtp"]["relatches"] == 1
        assert figures["a"]["rtp"]["dropped_foreign"] == 2
    finally:
        client.release(ref)


def test_stats_command_prints_counted_packets(
    relay: LocalRelay, client: RelayClient, endpoints: list[Endpoint]
) -> None:
    phone, carrier = endpoints[:2]
    ref = call_ref()
    alloc = client.allocate(ref, a_peer=phone.address, echo=False)
    client.update(ref, a_peer=phone.address, b_peer=carrier.address)
    for i in range(7):
        phone.send(rtp(i), a_side(alloc))
        assert carrier.recv() is not None
    control = f"{relay.control[0]}:{relay.control[1]}"
    runner = CliRunner()
    result = runner.invoke(
        relay_cli, ["stats", "--control", control, "--secret", SECRET_TEXT, "--json"]
    )
    assert result.exit_code == 0, result.output
    records = [orjson.loads(line) for line in result.output.splitlines()]
    calls = [r["call"] for r in records if "call" in r and r["call"]["call"] == ref]
    assert (
        calls
        and calls[0]["a"]["rtp"]["packets_in"] == 7
        and calls[0]["b"]["rtp"]["packets_out"] == 7
    )
    # Each stream's last-packet time, as seconds since: the carrier sent nothing.
    assert 0 <= calls[0]["a"]["rtp"]["idle"] < 30 and calls[0]["b"]["rtp"]["idle"] is None
    assert len([r for r in records if "shard" in r]) == 2
    text = runner.invoke(relay_cli, ["stats", "--control", control, "--secret", SECRET_TEXT])
    assert text.exit_code == 0
    line = next(
        line for line in text.output.splitlines() if line.startswith(ref[:24]) and " A " in line
    )
    assert line.split()[4] == "7"  # packets in on the A leg
    b_line = next(
        line for line in text.output.splitlines() if line.startswith(ref[:24]) and " B " in line
    )
    assert b_line.split()[9] == "-"  # idle_s: the B leg has received nothing

    def refused() -> int:
        return sum(s["counters"].get("control-bad-tag", 0) for s in client.shard_stats())

    before = refused()
    wrong = runner.invoke(
        relay_cli, ["stats", "--control", control, "--secret", "x" * 20, "--timeout", "0.1"]
    )
    assert wrong.exit_code != 0 and "does not answer" in wrong.output
    assert "--secret" in wrong.output  # the likely cause is named
    assert refused() == before + 4  # the first try and 3 retransmissions, each counted
    client.release(ref)


# ------------------------------------------------------------------ faults


def shard_of(stats: list[dict[str, object]], port: int) -> int:
    for s in stats:
        lo, hi = s["rtp"]  # type: ignore[misc]
        if lo <= port <= hi:
            return int(s["index"])  # type: ignore[call-overload]
    raise AssertionError(f"port {port} in no slice")


@pytest.mark.slow
def test_killed_shard_restarts_while_other_shard_loses_nothing() -> None:
    relay = start(16, media_timeout=30.0)
    client = relay.client()
    phone, carrier, phone2, carrier2 = (Endpoint() for _ in range(4))
    try:
        stats = client.shard_stats()
        refs = {}
        for _ in range(4):
            ref = call_ref()
            alloc = client.allocate(ref, a_peer=None, echo=False)
            refs.setdefault(shard_of(stats, alloc.a_port), (ref, alloc))
        assert set(refs) == {0, 1}
        victim_ref, _victim = refs[0]
        ref, alloc = refs[1]
        client.update(ref, a_peer=phone.address, b_peer=carrier.address)
        old_pid = int(stats[0]["pid"])  # type: ignore[call-overload]
        sent = received = 0
        killed_at = None
        restarted_after = None
        for i in range(150):  # 3 s of 20 ms packets
            if i == 25:
                os.kill(old_pid, signal.SIGKILL)
                killed_at = time.monotonic()
            phone.send(rtp(i, ts=160 * i), a_side(alloc))
            sent += 1
            got = carrier.recv()
            if got is not None and got[0] == rtp(i, ts=160 * i):
                received += 1
            if killed_at is not None and restarted_after is None and i % 10 == 0:
                now_pid = client.shard_stats()[0].get("pid")
                if now_pid not in (None, old_pid):
                    restarted_after = time.monotonic() - killed_at
            time.sleep(0.02)
        assert received == sent  # zero loss on the other shard
        assert restarted_after is not None and restarted_after < 5.0
        lost: list[tuple[str, str]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not lost:
            lost = client.expired()
            time.sleep(0.2)
        assert (victim_ref, "relay-lost") in lost
        assert ref not in [r for r, _ in lost]
        assert client.release(victim_ref) == (None, None)
        # The restarted shard took its slice back: new calls land there again.
        placed = {
            shard_of(
                client.shard_stats(), client.allocate(call_ref(), a_peer=None, echo=False).a_port
            )
            for _ in range(4)
        }
        assert 0 in placed
        assert client.shard_stats()[0]["restarts"] == 1
    finally:
        for e in (phone, carrier, phone2, carrier2):
            e.close()
        client.close()
        relay.stop()


def test_port_exhaustion_raises_media_unavailable_and_nothing_else_breaks() -> None:
    relay = start(8)  # 8 pairs over 2 shards: 4 calls
    client = relay.client()
    phone, carrier = Endpoint(), Endpoint()
    try:
        allocs = [client.allocate(call_ref(), a_peer=None, echo=False) for _ in range(4)]
        ports = {a.a_port for a in allocs} | {a.b_port for a in allocs}
        assert len(ports) == 8
        with pytest.raises(MediaUnavailable):
            client.allocate(call_ref(), a_peer=None, echo=False)
        # a live call still relays
        ref = allocs[0].call_ref
        client.update(ref, a_peer=phone.address, b_peer=carrier.address)
        phone.send(rtp(1), a_side(allocs[0]))
        assert carrier.recv() is not None
        # and freeing one makes room again
        client.release(allocs[1].call_ref)
        client.allocate(call_ref(), a_peer=None, echo=False)
        assert sum(s["counters"].get("allocate-exhausted", 0) for s in client.shard_stats()) >= 2
    finally:
        phone.close()
        carrier.close()
        client.close()
        relay.stop()


def test_standalone_relay_serves_and_stops_on_sigterm() -> None:
    lo, hi = free_rtp_range(4)
    from rtp_relay._supervisor import pick_control_port

    port = pick_control_port("127.0.0.1", 1)
    env = dict(os.environ, KX_RELAY_SECRET=SECRET_TEXT)
    code = "from kx_sipd.relay_cli import relay; relay()"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            "--control",
            f"127.0.0.1:{port}",
            "--rtp-range",
            f"{lo}-{hi}",
            "--shards",
            "1",
            "--media-host",
            "127.0.0.1",
            "--log-level",
            "warning",
        ],
        env=env,
        stderr=subprocess.PIPE,
    )
    client = RelayClient(("127.0.0.1", port), SECRET, timeout=0.5, retries=10)
    try:
        alloc = client.allocate(call_ref(), a_peer=None, echo=True)
        assert lo <= alloc.a_port <= hi
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_start_fails_clearly_when_the_control_port_is_taken() -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(RelayStartError, match="control port"):
            start(4, control=blocker.getsockname(), shards=1)
    finally:
        blocker.close()


def test_client_is_thread_safe(client: RelayClient) -> None:
    import threading

    results: dict[str, MediaAllocation] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(3):
                ref = f"thread-{n}-{i}-{os.urandom(3).hex()}"
                results[ref] = client.allocate(ref, a_peer=None, echo=False)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    ports = [p for a in results.values() for p in (a.a_port, a.b_port)]
    assert len(results) == 18 and len(set(ports)) == 36
    for ref in results:
        a_stats, _b = client.release(ref)
        assert a_stats is not None


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_control_and_media() -> None:
    relay = start(4, control=("::1", 0), media_host="::1", advertised="::1")
    client = relay.client()
    phone = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    carrier = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        for s in (phone, carrier):
            s.bind(("::1", 0))
            s.settimeout(WAIT)
        ref = call_ref()
        alloc = client.allocate(ref, a_peer=None, echo=False)
        assert alloc.a_address == "::1"
        client.update(ref, a_peer=None, b_peer=carrier.getsockname()[:2])
        phone.sendto(rtp(1), (alloc.a_address, alloc.a_port))
        data, source = carrier.recvfrom(4096)
        assert data == rtp(1) and source[:2] == ("::1", alloc.b_port)
        carrier.sendto(rtp(1, ssrc=0xB2), (alloc.b_address, alloc.b_port))
        assert phone.recvfrom(4096)[0] == rtp(1, ssrc=0xB2)
        figures = client.query(ref)
        assert figures is not None and figures["a"]["rtp"]["peer"] == [
            "::1",
            phone.getsockname()[1],
        ]
    finally:
        phone.close()
        carrier.close()
        client.close()
        relay.stop()


def test_expired_poll_tolerates_a_release_during_its_round_trip(client: RelayClient) -> None:
    """Another thread's release() may land while expired() waits for replies."""
    ending, staying = call_ref(), call_ref()
    client.allocate(ending, a_peer=None, echo=False)
    client.allocate(staying, a_peer=None, echo=False)
    original = client._await

    def release_meanwhile(*args: Any, **kwargs: Any) -> Any:
        replies = original(*args, **kwargs)
        client.release(ending)
        return replies

    client._await = release_meanwhile  # type: ignore[method-assign]
    try:
        assert client.expired() == []
    finally:
        client._await = original  # type: ignore[method-assign]
    client.release(staying)


def test_range_for_one_call_over_two_shards_carries_it() -> None:
    relay = start(2, shards=2)
    client = relay.client()
    try:
        assert relay.shards == 1
        client.allocate(call_ref(), a_peer=None, echo=False)
        with pytest.raises(MediaUnavailable):
            client.allocate(call_ref(), a_peer=None, echo=False)
    finally:
        client.close()
        relay.stop()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_operations_from_an_event_loop(relay: LocalRelay, backend: str) -> None:
    """allocate/update/release_async: concurrent calls from one event loop, the
    same results as the blocking calls, media relayed, and a silent relay refused."""
    import anyio

    client = relay.client()
    silent_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent_port.bind(("127.0.0.1", 0))
    silent = RelayClient(silent_port.getsockname(), SECRET, timeout=0.05, retries=1)
    phone, carrier = Endpoint(), Endpoint()
    results: dict[str, MediaAllocation] = {}

    async def one(ref: str) -> None:
        results[ref] = await client.allocate_async(ref, a_peer=None, echo=False)

    async def main() -> None:
        refs = [f"async-{i}-{os.urandom(3).hex()}" for i in range(8)]
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                for ref in refs:
                    group.start_soon(one, ref)
            # Idempotent per call, like the blocking client; shared bookkeeping.
            again = await client.allocate_async(refs[0], a_peer=None, echo=False)
            assert again == results[refs[0]] == client.allocate(refs[0], a_peer=None, echo=False)
            first = results[refs[0]]
            await client.update_async(
                refs[0], a_peer=phone.address, b_peer=carrier.address, b_events=101
            )
            phone.send(rtp(1), a_side(first))
            got = carrier.recv()
            assert got is not None and got == (rtp(1), b_side(first))
            for ref in refs:
                a_stats, b_stats = await client.release_async(ref)
                assert a_stats is not None and b_stats is not None
            assert await client.release_async(refs[0]) == (None, None)
            with pytest.raises(MediaUnavailable):
                await client.update_async(refs[0], a_peer=None, b_peer=None)
            with pytest.raises(MediaUnavailable):
                await silent.allocate_async("nobody-answers", a_peer=None, echo=False)

    try:
        anyio.run(main, backend=backend)
    finally:
        client.close()
        silent.close()
        silent_port.close()
        phone.close()
        carrier.close()
    ports = [p for a in results.values() for p in (a.a_port, a.b_port)]
    assert len(results) == 8 and len(set(ports)) == 16
