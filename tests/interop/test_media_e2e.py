"""Media end to end: calls through the real ``kx-sipd serve`` and the relay it
starts, with RTP sent by both the client side and the carrier side.

The client is a raw UDP softphone (guide §6.2: INVITE, 401, INVITE with
digest credentials, 100 → 180 → 200, ACK, BYE); the carrier is a tiny UAS
that answers with an SDP naming a socket the test reads. Between them, every
RTP packet crosses the relay's ports that kx-sipd wrote into each leg's SDP
(guide §2 and §7: the RTP range, UDP). Issue 5, "How it is checked":

1. media arrives at each far end, out of the relay's ports named in the SDP
   each leg saw (client: A ports, carrier: B ports, in --rtp-range, even);
2. latching to a client source port different from its SDP's;
3. a third source after latching is dropped (never reaches the carrier) and
   counted in ``kx-sipd relay stats``;
4. RFC 4733 telephone-events arrive byte-identical;
5. a call without RTP for --media-timeout is ended with BYE on both legs and
   recorded as "media-timeout" (one-way RTP keeps it up);
6. a SIGKILLed shard is restarted while a call on the other shard flows on
   with zero loss (and the killed shard's call is ended on both legs);
7. port exhaustion: 503 for the next call, the server keeps serving;
8. the call record carries each leg's media figures;
9. the echo test (9196) sends back what the client sends.

Servers: ``main`` (2 shards, media timeout 30 s), ``timeout_server``
(media timeout 2 s), ``tiny`` (one port pair per side) and, for a known bug
only, ``split_tiny`` (one pair per side over two shards). The shard-kill test
runs last on ``main``. Every wait is bounded. Bugs found are kept as strict
xfail tests and described in /work/brief/requests-media_e2e.md.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from media_support import (
    HOST,
    PASSWORD,
    RELAY_SECRET,
    SIP_WAIT,
    USER,
    Carrier,
    MediaServer,
    RtpEndpoint,
    SipClient,
    SipMessage,
    StandaloneRelay,
    answers_options,
    dtmf_packets,
    free_port,
    kx_cli,
    log_events,
    make_database,
    make_sdp,
    rtcp_receiver_report,
    rtp_packet,
    sdp_media,
    start_server,
    start_sipp_media,
    start_standalone_relay,
    write_tone,
)

from rtp_relay import RelayClient

pytestmark = pytest.mark.interop

MEDIA_TIMEOUT = 2.0
ECHO_NUMBER = "9196"

_numbers = itertools.count(1)


def next_digits() -> str:
    """A fresh E.164-style number per call, so the carrier can tell calls apart."""
    return f"1775{next(_numbers):07d}"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def carrier() -> Iterator[Carrier]:
    uas = Carrier().start()
    yield uas
    uas.close()


def _server(
    factory: pytest.TempPathFactory,
    carrier: Carrier,
    name: str,
    *,
    rtp_ports: int,
    shards: int,
    media_timeout: float,
) -> Iterator[MediaServer]:
    directory = factory.mktemp(name)
    db = make_database(directory, carrier.port)
    server = start_server(
        directory, db, rtp_ports=rtp_ports, shards=shards, media_timeout=media_timeout
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory, carrier: Carrier) -> Iterator[MediaServer]:
    yield from _server(
        tmp_path_factory, carrier, "media-main", rtp_ports=48, shards=2, media_timeout=30.0
    )


@pytest.fixture(scope="module")
def timeout_server(
    tmp_path_factory: pytest.TempPathFactory, carrier: Carrier
) -> Iterator[MediaServer]:
    yield from _server(
        tmp_path_factory,
        carrier,
        "media-timeout",
        rtp_ports=8,
        shards=1,
        media_timeout=MEDIA_TIMEOUT,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, carrier: Carrier) -> Iterator[MediaServer]:
    """One port pair per side: RTP+RTCP for A and for B, i.e. one call."""
    yield from _server(
        tmp_path_factory, carrier, "media-tiny", rtp_ports=4, shards=1, media_timeout=30.0
    )


# ------------------------------------------------------------------ calls


@attrs.define
class Call:
    """An answered call: the client, its media socket (the port its SDP named),
    the carrier's media socket, and the relay addresses each leg's SDP gave."""

    client: SipClient
    phone: RtpEndpoint
    far: RtpEndpoint
    digits: str
    answer: SipMessage
    carrier_invite: SipMessage
    relay_a: tuple[str, int]
    relay_b: tuple[str, int]

    @property
    def call_id(self) -> str:
        return self.client.call_id


@contextlib.contextmanager
def answered_call(server: MediaServer, carrier: Carrier, *, ready: bool = True) -> Iterator[Call]:
    """Place a call and wait for both legs to be up (and, with ``ready``, for the
    relay to know the carrier's media address). Sockets are closed on exit;
    hanging up is the test's business."""
    with SipClient(server.address) as client, RtpEndpoint() as phone, RtpEndpoint() as far:
        digits = next_digits()
        carrier.expect(digits, far.port)
        answer = client.invite(digits, make_sdp(phone.port))
        assert answer.status == 200, f"{answer.start}\n{server.log_tail()}"
        seen = carrier.wait(digits, lambda call: call.acked)
        a = sdp_media(answer.body)
        b = sdp_media(seen.invite.body)
        if ready:
            server.wait_media_ready(a.port)
        yield Call(
            client=client,
            phone=phone,
            far=far,
            digits=digits,
            answer=answer,
            carrier_invite=seen.invite,
            relay_a=(a.address, a.port),
            relay_b=(b.address, b.port),
        )


def voice(seq: int, *, ssrc: int, size: int = 160) -> bytes:
    """A PCMU packet whose payload names its sequence number."""
    return rtp_packet(seq, ts=160 * seq, ssrc=ssrc, payload=bytes([seq & 0xFF]) * size)


def hang_up(call: Call) -> None:
    assert call.client.bye().status == 200


def in_range(server: MediaServer, port: int) -> bool:
    """An RTP port of the server's range (even, with its RTCP port inside too)."""
    low, high = server.rtp_range
    return low <= port and port + 1 <= high and port % 2 == 0


# ------------------------------------------------------------------ 1. media and SDP


def test_media_crosses_the_relay_ports_each_legs_sdp_names(
    main: MediaServer, carrier: Carrier
) -> None:
    with answered_call(main, carrier) as call:
        (a_host, a_port), (b_host, b_port) = call.relay_a, call.relay_b
        # The client's answer names the relay's A port, the carrier's offer its
        # B port: the --rtp-address, inside --rtp-range, RTP on even ports.
        assert a_host == b_host == HOST
        assert in_range(main, a_port), (a_port, main.rtp_range)
        assert in_range(main, b_port), (b_port, main.rtp_range)
        assert a_port != b_port
        figures = main.relay_call(a_port)
        assert figures["b_port"] == b_port
        # The carrier is offered the client's codecs (G.711 and telephone-event).
        assert sdp_media(call.carrier_invite.body).payloads == (0, 8, 101)

        to_carrier = [voice(i, ssrc=0x1111) for i in range(10)]
        to_phone = [voice(i, ssrc=0x2222, size=80) for i in range(10)]
        for up, down in zip(to_carrier, to_phone, strict=True):
            call.phone.send(up, call.relay_a)
            call.far.send(down, call.relay_b)
        at_carrier = call.far.collect(len(to_carrier))
        at_phone = call.phone.collect(len(to_phone))
        assert [data for data, _ in at_carrier] == to_carrier
        assert [data for data, _ in at_phone] == to_phone
        # Each side's packets leave through the other side's relay socket.
        assert {source for _, source in at_carrier} == {call.relay_b}
        assert {source for _, source in at_phone} == {call.relay_a}
        hang_up(call)


def test_rtcp_is_relayed_on_the_odd_port_next_to_each_rtp_port(
    main: MediaServer, carrier: Carrier
) -> None:
    phone_rtp, phone_rtcp = RtpEndpoint.pair()
    far_rtp, far_rtcp = RtpEndpoint.pair()
    with (
        phone_rtp,
        phone_rtcp,
        far_rtp,
        far_rtcp,
        SipClient(main.address) as client,
    ):
        digits = next_digits()
        carrier.expect(digits, far_rtp.port)
        answer = client.invite(digits, make_sdp(phone_rtp.port))
        assert answer.status == 200, answer.start
        a = sdp_media(answer.body)
        b = sdp_media(carrier.wait(digits, lambda c: c.acked).invite.body)
        main.wait_media_ready(a.port)
        relay_a_rtcp, relay_b_rtcp = (a.address, a.port + 1), (b.address, b.port + 1)
        phone_rtp.send(voice(0, ssrc=0x1212), (a.address, a.port))
        far_rtp.send(voice(0, ssrc=0x2121), (b.address, b.port))
        assert far_rtp.recv() is not None and phone_rtp.recv() is not None
        up, down = rtcp_receiver_report(0x1212), rtcp_receiver_report(0x2121)
        phone_rtcp.send(up, relay_a_rtcp)
        assert far_rtcp.recv() == (up, relay_b_rtcp)
        far_rtcp.send(down, relay_b_rtcp)
        assert phone_rtcp.recv() == (down, relay_a_rtcp)
        assert client.bye().status == 200


# ------------------------------------------------------------------ 2. latching


def test_latching_sends_the_carriers_media_to_the_clients_real_source(
    main: MediaServer, carrier: Carrier
) -> None:
    with answered_call(main, carrier) as call, RtpEndpoint() as nat:
        # Behind NAT the client's packets come from another port than its SDP says.
        assert nat.port != call.phone.port
        up = [voice(i, ssrc=0x3333) for i in range(3)]
        for packet in up:
            nat.send(packet, call.relay_a)
        assert [data for data, _ in call.far.collect(len(up))] == up
        down = [voice(i, ssrc=0x4444) for i in range(5)]
        for packet in down:
            call.far.send(packet, call.relay_b)
        assert [data for data, _ in nat.collect(len(down))] == down
        assert call.phone.drain(0.3) == []  # nothing toward the SDP's port
        figures = main.relay_call(call.relay_a[1])
        assert figures["a"]["rtp"]["peer"] == [HOST, nat.port]
        hang_up(call)


# ------------------------------------------------------------------ 3. hijack


def test_a_third_source_after_latching_is_dropped_and_counted(
    main: MediaServer, carrier: Carrier
) -> None:
    with answered_call(main, carrier) as call, RtpEndpoint() as attacker:
        sent: list[bytes] = []
        hijacks = 0
        for i in range(20):
            packet = voice(i, ssrc=0x5555)
            call.phone.send(packet, call.relay_a)
            sent.append(packet)
            if i >= 2 and i % 2 == 0:
                # Another SSRC from a third port while the client keeps talking.
                attacker.send(voice(1000 + i, ssrc=0xBAD), call.relay_a)
                hijacks += 1
            time.sleep(0.01)
        assert [data for data, _ in call.far.collect(len(sent) + hijacks, wait=1.0)] == sent
        # The carrier's media still goes to the client, never to the attacker.
        reply = voice(1, ssrc=0x6666)
        call.far.send(reply, call.relay_b)
        got = call.phone.recv()
        assert got is not None and got[0] == reply
        assert attacker.drain(0.3) == []
        # Counted where an operator looks: kx-sipd relay stats --json.
        shards, calls = main.relay_stats()
        mine = next(entry for entry in calls if entry["a_port"] == call.relay_a[1])
        assert mine["a"]["rtp"]["dropped_foreign"] == hijacks, mine
        assert mine["a"]["rtp"]["peer"] == [HOST, call.phone.port]
        shard = next(s for s in shards if s["index"] == mine["shard_index"])
        assert shard["media"]["dropped_foreign"] >= hijacks
        hang_up(call)


# ------------------------------------------------------------------ 4. DTMF


def test_rfc4733_telephone_events_arrive_byte_identical(
    main: MediaServer, carrier: Carrier
) -> None:
    with answered_call(main, carrier) as call:
        ssrc = 0x7777
        up = [voice(i, ssrc=ssrc) for i in range(3)]
        up += dtmf_packets(5, seq=3, ts=480, ssrc=ssrc)  # digit 5: 4 updates + 3 end packets
        up += [voice(i, ssrc=ssrc) for i in range(10, 13)]
        for packet in up:
            call.phone.send(packet, call.relay_a)
            time.sleep(0.005)
        assert [data for data, _ in call.far.collect(len(up))] == up
        down = dtmf_packets(11, seq=100, ts=16000, ssrc=0x8888)  # '#', carrier → client
        for packet in down:
            call.far.send(packet, call.relay_b)
        assert [data for data, _ in call.phone.collect(len(down))] == down
        hang_up(call)


def _relay_calls(server: MediaServer) -> int:
    shards, _calls = server.relay_stats()
    return sum(int(shard["calls"]) for shard in shards)


def _wait_relay_calls(server: MediaServer, count: int, wait: float = SIP_WAIT) -> None:
    deadline = time.monotonic() + wait
    while (now := _relay_calls(server)) != count:
        assert time.monotonic() < deadline, f"relay holds {now} calls, expected {count}"
        time.sleep(0.2)


def test_a_cancelled_call_gives_its_relay_ports_back(main: MediaServer, carrier: Carrier) -> None:
    before = _relay_calls(main)
    with SipClient(main.address) as client, RtpEndpoint() as phone:
        digits = next_digits()
        carrier.expect(digits, phone.port, answer=False)
        client.send_invite(digits, make_sdp(phone.port))
        # The carrier rings: by now the relay holds the call's ports.
        carrier.wait(digits, lambda c: True)
        assert _relay_calls(main) == before + 1
        cancelled, invite_final = client.cancel()
        assert (cancelled.status, invite_final.status) == (200, 487)
        carrier.wait(digits, lambda c: c.cancelled)
        _wait_relay_calls(main, before)
        record = main.record(client.call_id)
    assert record["ended_by"] == "cancel" and record["final_status"] == 487, record


# ------------------------------------------------------------------ 8. records


def test_the_call_record_carries_each_legs_media_figures(
    main: MediaServer, carrier: Carrier
) -> None:
    with answered_call(main, carrier) as call:
        up = [voice(i, ssrc=0x9999) for i in range(13) if i != 5]  # 12 sent, seq 5 never
        down = [voice(i, ssrc=0xAAAA, size=80) for i in range(7)]
        for packet in up:
            call.phone.send(packet, call.relay_a)
        for packet in down:
            call.far.send(packet, call.relay_b)
        assert len(call.far.collect(len(up))) == len(up)
        assert len(call.phone.collect(len(down))) == len(down)
        hang_up(call)
        record = main.record(call.call_id, media=True)
    up_bytes = sum(len(p) for p in up)
    down_bytes = sum(len(p) for p in down)
    a_media, b_media = record["a_media"], record["b_media"]
    assert isinstance(a_media, dict) and isinstance(b_media, dict), record
    # A leg (client side): what the client sent in, what reached it out.
    assert a_media["packets_in"] == 12 and a_media["bytes_in"] == up_bytes, a_media
    assert a_media["packets_out"] == 7 and a_media["bytes_out"] == down_bytes, a_media
    assert a_media["packets_lost"] == 1, a_media  # the missing sequence number
    # B leg (carrier side): the mirror image, nothing lost.
    assert b_media["packets_in"] == 7 and b_media["bytes_in"] == down_bytes, b_media
    assert b_media["packets_out"] == 12 and b_media["bytes_out"] == up_bytes, b_media
    assert b_media["packets_lost"] == 0, b_media
    assert record["ended_by"] == "client" and record["codec"] == "PCMU", record
    shown = main.cli("calls", "show", call.call_id, "--summary").stdout
    assert f"in 12 pkts/{up_bytes} B, out 7 pkts/{down_bytes} B, lost 1" in shown, shown


# ------------------------------------------------------------------ 9. echo


def test_echo_test_sends_back_what_the_client_sends(main: MediaServer, carrier: Carrier) -> None:
    with SipClient(main.address) as client, RtpEndpoint() as phone:
        answer = client.invite(ECHO_NUMBER, make_sdp(phone.port))
        assert answer.status == 200, answer.start
        media = sdp_media(answer.body)
        relay = (media.address, media.port)
        assert media.address == HOST and in_range(main, media.port), media
        sent = [voice(i, ssrc=0xECC0) for i in range(8)]
        sent += dtmf_packets(1, seq=8, ts=8 * 160, ssrc=0xECC0)
        for packet in sent:
            phone.send(packet, relay)
            got = phone.recv()
            assert got is not None, f"packet {sent.index(packet)} did not come back"
            assert got == (packet, relay)
        assert client.bye().status == 200
        record = main.record(client.call_id, media=True)
    assert record["route"] == "echo" and record["ended_by"] == "client", record
    assert record["b_call_id"] is None and record["b_media"] is None, record
    a_media = record["a_media"]
    assert isinstance(a_media, dict)
    assert a_media["packets_in"] == a_media["packets_out"] == len(sent), a_media
    assert ECHO_NUMBER not in carrier.calls and carrier.unexpected == []


# ------------------------------------------------------------------ 5. media timeout


def test_a_call_without_media_is_ended_on_both_legs_after_the_media_timeout(
    timeout_server: MediaServer, carrier: Carrier
) -> None:
    with answered_call(timeout_server, carrier) as call:
        # One-way RTP (client → carrier) for longer than the timeout keeps the
        # call up: only silence in *both* directions ends it.
        started = time.monotonic()
        seq = 0
        while time.monotonic() - started < MEDIA_TIMEOUT * 1.5:
            call.phone.send(voice(seq, ssrc=0xBBBB), call.relay_a)
            seq += 1
            call.client.poll(0.1)
        stopped = time.monotonic()
        assert call.client.byes == [], "ended while RTP still flowed one way"
        assert carrier.calls[call.digits].bye is None
        assert len(call.far.drain(0.0)) > 0
        # Silence: the server ends the call with BYE on both legs.
        bye = call.client.wait_bye(wait=MEDIA_TIMEOUT + 10)
        ended_after = time.monotonic() - stopped
        assert bye.call_id == call.call_id
        carrier.wait(call.digits, lambda c: c.bye is not None, wait=SIP_WAIT)
        assert ended_after >= MEDIA_TIMEOUT - 0.2, ended_after  # not before the timeout
        record = timeout_server.record(call.call_id, media=True)
    assert record["ended_by"] == "media-timeout", record
    assert record["final_status"] == 200, record
    a_media, b_media = record["a_media"], record["b_media"]
    assert isinstance(a_media, dict) and isinstance(b_media, dict), record
    assert a_media["packets_in"] == seq and b_media["packets_out"] == seq, record
    assert b_media["packets_in"] == 0, record


# ------------------------------------------------------------------ 7. exhaustion


def test_port_exhaustion_answers_503_and_the_server_keeps_serving(
    tiny: MediaServer, carrier: Carrier
) -> None:
    with answered_call(tiny, carrier) as first:
        assert in_range(tiny, first.relay_a[1]) and in_range(tiny, first.relay_b[1])
        with SipClient(tiny.address) as second, RtpEndpoint() as phone:
            digits = next_digits()
            carrier.expect(digits, phone.port)
            refused = second.invite(digits, make_sdp(phone.port))
            assert refused.status == 503, refused.start
            assert refused.header("retry-after"), refused.headers
            assert digits not in carrier.calls  # the carrier never saw it
            refused_record = tiny.record(second.call_id)
        assert refused_record["final_status"] == 503, refused_record
        # The server keeps serving: OPTIONS, and the running call's media.
        assert answers_options(tiny)
        packet = voice(1, ssrc=0xCCCC)
        first.phone.send(packet, first.relay_a)
        got = first.far.recv()
        assert got is not None and got[0] == packet
        hang_up(first)
        tiny.record(first.call_id, media=True)  # the relay has released its ports
    # Once the call is over its ports serve the next one.
    with answered_call(tiny, carrier) as third:
        packet = voice(2, ssrc=0xDDDD)
        third.phone.send(packet, third.relay_a)
        got = third.far.recv()
        assert got is not None and got[0] == packet
        hang_up(third)
    shards, _calls = tiny.relay_stats()
    assert shards[0]["counters"]["allocate-exhausted"] >= 1
    assert shards[0]["calls"] == 0 and shards[0]["free_pairs"] == 2, shards
    # The operator finds why in the log: the server's refusal of the call and the
    # relay's own line naming the shard that ran out.
    refused_calls = log_events(tiny.log, "relay.allocate_failed")
    assert any("exhausted" in str(fields.get("reason")) for fields in refused_calls), refused_calls
    assert log_events(tiny.log, "relay.ports_exhausted"), tiny.log_tail()


def test_the_server_log_stays_json_lines_when_ports_run_out(
    tiny: MediaServer, carrier: Carrier
) -> None:
    with answered_call(tiny, carrier) as first:
        with SipClient(tiny.address) as second, RtpEndpoint() as phone:
            digits = next_digits()
            carrier.expect(digits, phone.port)
            assert second.invite(digits, make_sdp(phone.port)).status == 503
        hang_up(first)
        tiny.record(first.call_id, media=True)
    not_json = []
    for line in tiny.log.read_text(errors="replace").splitlines():
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            not_json.append(line)
    assert not_json == [], not_json


@pytest.fixture(scope="module")
def split_tiny(tmp_path_factory: pytest.TempPathFactory, carrier: Carrier) -> Iterator[MediaServer]:
    """One port pair per side again, but over two shards (the brief's --relay-shards 2)."""
    yield from _server(
        tmp_path_factory, carrier, "media-split", rtp_ports=4, shards=2, media_timeout=30.0
    )


def test_one_pair_per_side_over_two_shards_still_carries_one_call(
    split_tiny: MediaServer, carrier: Carrier
) -> None:
    with SipClient(split_tiny.address) as client, RtpEndpoint() as phone:
        digits = next_digits()
        carrier.expect(digits, phone.port)
        answer = client.invite(digits, make_sdp(phone.port))
        assert answer.status == 200, answer.start
        client.bye()


# ------------------------------------------------------------------ first packets


def test_rtp_sent_as_soon_as_the_call_is_answered_reaches_the_carrier(
    main: MediaServer, carrier: Carrier
) -> None:
    arrived = []
    for _ in range(3):
        with answered_call(main, carrier, ready=False) as call:
            first = voice(0, ssrc=0xEEEE)
            call.phone.send(first, call.relay_a)
            got = call.far.recv(1.0)
            arrived.append(got is not None and got[0] == first)
            hang_up(call)
    assert all(arrived), arrived


# ------------------------------------------------------------------ 6. shard restart


def _shard_of(server: MediaServer, call: Call) -> int:
    return int(server.relay_call(call.relay_a[1])["shard_index"])


def test_a_killed_shard_restarts_while_the_other_shards_call_loses_nothing(
    main: MediaServer, carrier: Carrier
) -> None:
    with contextlib.ExitStack() as stack:
        # One call on each shard (the relay client places calls round robin).
        placed: dict[int, Call] = {}
        for _ in range(4):
            call = stack.enter_context(answered_call(main, carrier))
            placed.setdefault(_shard_of(main, call), call)
            if len(placed) == 2:
                break
        assert len(placed) == 2, placed
        keeper_index, victim_index = sorted(placed)
        keep, doomed = placed[keeper_index], placed[victim_index]
        shards, _calls = main.relay_stats()
        pids = {int(s["index"]): int(s["pid"]) for s in shards}
        victim_slice = next(s["rtp"] for s in shards if s["index"] == victim_index)
        victim_pid = pids[victim_index]
        supervisor, children = main.relay_pids()
        assert {pids[keeper_index], victim_pid} <= set(children), (pids, children)

        # 2 s of 20 ms packets both ways on the keeper's call, the other shard
        # SIGKILLed half a second in.
        up_sent, down_sent, up_got, down_got = [], [], [], []
        for i in range(100):
            if i == 25:
                os.kill(victim_pid, signal.SIGKILL)
            up, down = voice(i, ssrc=0x1234), voice(i, ssrc=0x4321, size=80)
            keep.phone.send(up, keep.relay_a)
            keep.far.send(down, keep.relay_b)
            up_sent.append(up)
            down_sent.append(down)
            up_got += keep.far.drain(0.0)
            down_got += keep.phone.drain(0.0)
            time.sleep(0.02)
        up_got += [data for data, _ in keep.far.collect(len(up_sent) - len(up_got))]
        down_got += [data for data, _ in keep.phone.collect(len(down_sent) - len(down_got))]
        assert len(up_got) == len(up_sent) and up_got == up_sent  # zero loss, in order
        assert len(down_got) == len(down_sent) and down_got == down_sent

        # The supervisor restarted the killed shard (a new process, its slice back).
        deadline = time.monotonic() + 10
        while True:
            shards, _calls = main.relay_stats()
            entry = next(s for s in shards if s["index"] == victim_index)
            if entry.get("pid") not in (None, victim_pid):
                break
            assert time.monotonic() < deadline, f"shard {victim_index} not restarted: {entry}"
            time.sleep(0.2)
        assert entry["restarts"] == 1, entry
        assert entry["rtp"] == victim_slice, entry
        supervisor_now, children_now = main.relay_pids()
        assert supervisor_now == supervisor
        assert int(entry["pid"]) in children_now

        # The call whose media died with the shard is ended on both legs.
        doomed.client.wait_bye(wait=10)
        carrier.wait(doomed.digits, lambda c: c.bye is not None, wait=SIP_WAIT)
        lost = main.record(doomed.call_id)
        assert lost["ended_by"] == "error" and "relay" in str(lost["reason"]), lost

        # The keeper's call goes on, and its record shows every packet.
        hang_up(keep)
        record = main.record(keep.call_id, media=True)
    a_media, b_media = record["a_media"], record["b_media"]
    assert isinstance(a_media, dict) and isinstance(b_media, dict), record
    assert a_media["packets_in"] == len(up_sent) and a_media["packets_lost"] == 0, a_media
    assert b_media["packets_in"] == len(down_sent) and b_media["packets_lost"] == 0, b_media
    # Every call of the module is over: the relay holds no allocation.
    _wait_relay_calls(main, 0)


# ------------------------------------------------------------------ SIPp, standalone relay


def _live_call(control: tuple[str, int], wait: float) -> dict[str, Any]:
    """The relay's only call once media has crossed it both ways (polled in-process:
    the call lasts seconds), with its shard's index."""
    client = RelayClient(control, RELAY_SECRET.encode())
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            for shard in client.shard_stats():
                for call in client.shard_calls(int(shard["index"])):
                    if call["a"]["rtp"]["packets_in"] and call["b"]["rtp"]["packets_in"]:
                        return {**call, "shard_index": shard["index"]}
            time.sleep(0.05)
    finally:
        client.close()
    raise AssertionError("no call with media both ways seen at the relay")


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneRelay]:
    """``kx-sipd relay serve`` on its own (2 shards, the default 60 s media timeout)."""
    relay = start_standalone_relay(tmp_path_factory.mktemp("standalone"), rtp_ports=40, shards=2)
    try:
        yield relay
    finally:
        assert relay.stop() == 0, relay.log.read_text()[-4000:]


def _media_totals(server: MediaServer) -> tuple[int, int]:
    shards, _calls = server.relay_stats()
    return (
        sum(s["media"]["packets_in"] for s in shards),
        sum(s["media"]["packets_out"] for s in shards),
    )


@pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp is not installed")
def test_sipp_on_both_ends_streams_rtp_through_a_standalone_relay(
    tmp_path: Path, standalone: StandaloneRelay
) -> None:
    """Issue 5 end to end with real processes only: ``kx-sipd relay serve`` on its
    own (2 shards), ``kx-sipd serve --relay HOST:PORT`` using it, SIPp as the
    client and SIPp as the carrier, each streaming PCMU with rtp_stream.

    Each leg's SDP names the relay's ports; the relay latches to SIPp's media
    ports; every packet of each side is counted in and out; the call record
    carries both legs' figures; ``kx-sipd relay stats`` shows the packets."""
    carrier_port = free_port()
    db = make_database(tmp_path, carrier_port)
    packets = 2 * write_tone(tmp_path / "tone.ulaw")  # played twice: 100 packets each way
    users = tmp_path / "users.csv"
    users.write_text(
        f"SEQUENTIAL\n{USER};{PASSWORD};[authentication username={USER} password={PASSWORD}]\n"
    )
    relay = standalone
    server: MediaServer | None = None
    sipps = []
    try:
        server = start_server(tmp_path, db, relay=relay)
        before = _media_totals(server)
        started = log_events(server.log, "server.started")[-1]
        assert started["relay_local"] is False, started
        assert started["relay"] == f"{HOST}:{relay.control[1]}", started
        uas = start_sipp_media("uas", "relay_uas_rtp.xml", tmp_path, port=carrier_port)
        sipps.append(uas)
        uac = start_sipp_media(
            "uac",
            "relay_uac_rtp.xml",
            tmp_path,
            port=free_port(),
            remote=server.address,
            extra=("-s", next_digits(), "-inf", str(users)),
        )
        sipps.append(uac)

        live = _live_call(relay.control, wait=SIP_WAIT)
        low, high = relay.rtp_range
        for port in (live["a_port"], live["b_port"]):
            assert low <= port < high and port % 2 == 0, (port, relay.rtp_range)
        # Latched to the ports SIPp streams from.
        assert live["a"]["rtp"]["peer"] == [HOST, uac.media_port], live
        assert live["b"]["rtp"]["peer"] == [HOST, uas.media_port], live

        assert uac.wait(30) == 0, uac.diagnostics()
        assert uas.wait(30) == 0, uas.diagnostics()
        # The SDP each leg saw: the client's 200 names the A port, the carrier's
        # INVITE the B port.
        assert uac.sdp_ports("SIP/2.0 200") == [live["a_port"]], uac.diagnostics()
        assert uas.sdp_ports("INVITE ") == [live["b_port"]], uas.diagnostics()

        deadline = time.monotonic() + SIP_WAIT
        while True:
            output = kx_cli(db, "calls", "list", "--json").stdout
            records = [orjson.loads(line) for line in output.splitlines() if line.strip()]
            if records and records[0].get("a_media") is not None:
                break
            assert time.monotonic() < deadline, records
            time.sleep(0.2)
        assert len(records) == 1, records
        record = records[0]
        assert record["ended_by"] == "client" and record["codec"] == "PCMU", record
        for leg in ("a_media", "b_media"):
            media = record[leg]
            assert isinstance(media, dict), record
            assert media["packets_in"] == media["packets_out"] == packets, (leg, media)
            assert media["bytes_in"] == media["bytes_out"] == packets * 172, (leg, media)
            assert media["packets_lost"] == 0, (leg, media)

        # The operator's view of the standalone relay: the call is gone, its
        # packets stay counted in the shard totals.
        shards, calls = server.relay_stats()
        assert calls == [] and len(shards) == 2, (shards, calls)
        after = _media_totals(server)
        assert (after[0] - before[0], after[1] - before[1]) == (2 * packets, 2 * packets)
        text = server.cli_relay_stats()
        assert text.splitlines()[0].split()[:7] == [
            "shard", "pid", "restarts", "rtp", "calls", "free", "pkts_in"
        ]  # fmt: skip
        rows = [line.split() for line in text.splitlines()[1:3]]
        assert sum(int(row[6]) for row in rows) == after[0], text
    finally:
        for sipp in sipps:
            sipp.stop()
        if server is not None:
            server.stop()


def test_kx_media_timeout_holds_with_a_remote_relay_started_with_another(
    tmp_path: Path, standalone: StandaloneRelay, carrier: Carrier
) -> None:
    """``kx-sipd serve --relay ... --media-timeout 2`` against a relay started with
    the default 60 s: a call without RTP is ended after 2 s, BYE on both legs,
    recorded "media timeout" (each allocation carries kx-sipd's timeout)."""
    db = make_database(tmp_path, carrier.port)
    server = start_server(tmp_path, db, relay=standalone, media_timeout=MEDIA_TIMEOUT)
    try:
        with answered_call(server, carrier) as call:
            answered = time.monotonic()
            bye = call.client.wait_bye(wait=MEDIA_TIMEOUT + 10)
            ended_after = time.monotonic() - answered
            assert bye.call_id == call.call_id
            carrier.wait(call.digits, lambda c: c.bye is not None, wait=SIP_WAIT)
            assert ended_after >= MEDIA_TIMEOUT - 0.2, ended_after
            record = server.record(call.call_id, media=True)
        assert record["ended_by"] == "media-timeout", record
        assert record["reason"] == "media timeout", record
    finally:
        server.stop()
