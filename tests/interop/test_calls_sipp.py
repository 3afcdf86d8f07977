"""Calls through the real ``kx-sipd serve`` over loopback, SIPp on both sides.

A SIPp UAC with ``[authentication]`` plays the customer's softphone (guide
§6.2); a SIPp UAS plays the carrier of the account's route. Each test runs
one call flow from tests/interop/sipp/ and asserts the status codes on both
legs twice over: the scenarios themselves expect exact responses (SIPp fails
the call on anything else), and the ``-trace_msg`` logs are read back to check
what crossed each leg. Each test then reads the call record with
``kx-sipd calls list --json`` / ``calls show`` (guide §10: the Call-ID is what
support is asked about).

One server serves the module: a database with two accounts and one carrier
route (strip 1 digit, prefix 00, so the record's dialed and sent digits
differ), and a free loopback port for UDP and TCP.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from calls_support import (
    HOST,
    REALM,
    SIPP,
    KxServer,
    RawClient,
    Sipp,
    Traced,
    free_port,
    kx_cli,
    sipp_command,
    start_kx,
    users_file,
)

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(SIPP is None, reason="sipp (OS package sip-tester) is not installed"),
]

DIALED = "17752180264"
SENT = "007752180264"  # route: strip 1, prefix 00
ALICE = ("alice", "alice-Secret-1")
ROTOR = ("rotor", "rotor-Secret-1")


@pytest.fixture(scope="module")
def carrier_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def kx(tmp_path_factory: pytest.TempPathFactory, carrier_port: int) -> Iterator[KxServer]:
    directory = tmp_path_factory.mktemp("kx-calls")
    db = directory / "kx.sqlite"
    kx_cli(
        db,
        "routes", "add", "carrier", "--host", HOST, "--port", str(carrier_port),
        "--strip", "1", "--prefix", "00",
    )  # fmt: skip
    for user, password in (ALICE, ROTOR):
        kx_cli(db, "accounts", "add", user, "--password", password, "--route", "carrier")
    server = start_kx(directory, db)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def run_call(
    kx: KxServer,
    workdir: Path,
    carrier_port: int,
    uac: str,
    uas: str | None,
    *,
    user: tuple[str, str] = ALICE,
    name: str = "",
    pause_ms: int = 300,
    transport: str = "u1",
    timeout: float = 20.0,
) -> tuple[Sipp, Sipp | None]:
    """One call: the carrier UAS (if any) started first, then the client UAC.

    Both are waited for (bounded by ``timeout``); their exit statuses are left
    to the test so a failing one can be shown with its logs.
    """
    prefix = f"{name}_" if name else ""
    carrier = None
    if uas is not None:
        carrier = sipp_command(
            f"{prefix}carrier",
            uas,
            workdir,
            port=carrier_port,
            timeout=timeout,
        ).start()
    client = sipp_command(
        f"{prefix}client",
        uac,
        workdir,
        port=free_port(tcp_too=transport.startswith("t")),
        remote=kx.address,
        timeout=timeout,
        transport=transport,
        extra=[
            "-inf", str(users_file(workdir, [user])),
            "-s", DIALED,
            "-d", str(pause_ms),
            "-recv_timeout", str(int(timeout * 1000)),
        ],
    ).start()  # fmt: skip
    try:
        client.wait(timeout + 10)
        if carrier is not None:
            carrier.wait(timeout + 10)
    finally:
        client.stop()
        if carrier is not None:
            carrier.stop()
    return client, carrier


def statuses(messages: list[Traced], direction: str, method: str = "INVITE") -> list[int]:
    """Status codes of the responses to ``method`` that went ``direction``."""
    return [
        m.status
        for m in messages
        if m.direction == direction and m.status is not None and m.method == method
    ]


def requests(messages: list[Traced], direction: str) -> list[str]:
    return [m.method for m in messages if m.direction == direction and m.is_request]


def call_id_of(client: Sipp) -> str:
    first = client.messages()[0]
    value = first.header("Call-ID")
    assert value, first.text
    return value


def check_record(
    kx: KxServer, client: Sipp, *, ended_by: str, final_status: int
) -> dict[str, object]:
    """The call record: fields the guide's support section relies on, and the ladder."""
    call_id = call_id_of(client)
    record = kx.record(call_id)
    assert record["account"] == ALICE[0] or record["account"] == ROTOR[0]
    assert record["ended_by"] == ended_by, record
    assert record["final_status"] == final_status, record
    assert record["dialed"] == DIALED, record
    assert record["a_call_id"] == call_id
    shown = kx.cli("calls", "show", call_id, "--summary").stdout
    assert call_id in shown, shown
    assert ladder_lines(shown), shown
    assert f"INVITE sip:{DIALED}@" in shown, shown
    assert f"SIP/2.0 {final_status} " in shown, shown
    return record


def check_reached_carrier(record: dict[str, object], carrier: Sipp) -> None:
    assert record["sent_digits"] == SENT, record
    invite = next(m for m in carrier.messages() if m.direction == "received")
    assert invite.first_line.startswith(f"INVITE sip:{SENT}@"), invite.text
    assert record["b_call_id"] == invite.header("Call-ID"), record


# ------------------------------------------------------------------ the tests


def test_answered_call_client_hangs_up(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    client, carrier = run_call(kx, workdir, carrier_port, "uac_answer.xml", "uas_answer.xml")
    client.assert_ok()
    assert carrier is not None
    carrier.assert_ok()
    a, b = client.messages(), carrier.messages()
    # Client leg (guide §6.2): 401, then 100 → 180 → 200; the BYE answered 200.
    assert without_100(statuses(a, "received")) == [401, 180, 200]
    assert 100 in statuses(a, "received")
    assert requests(a, "sent") == ["INVITE", "ACK", "INVITE", "ACK", "BYE"]
    assert statuses(a, "received", "BYE") == [200]
    # Carrier leg: one INVITE (no credentials of the client), the ACK for its
    # 200, then kx-sipd's BYE.
    assert requests(b, "received") == ["INVITE", "ACK", "BYE"]
    assert statuses(b, "sent") == [100, 180, 200]
    assert b[0].header("Authorization") is None
    record = check_record(kx, client, ended_by="client", final_status=200)
    check_reached_carrier(record, carrier)
    # The ladder holds the hang-up: the client's BYE, the BYE sent on to the
    # carrier and the 200 to the client (the carrier's 200 comes after the record).
    shown = kx.cli("calls", "show", call_id_of(client), "--summary").stdout
    # Each line: time, "leg", the leg, the arrow, the peer, the transport, the first line.
    last = [line.split()[2:4] + line.split()[6:7] for line in ladder_lines(shown)[-3:]]
    assert last == [["A", "<-", "BYE"], ["B", "->", "BYE"], ["A", "->", "SIP/2.0"]], shown
    assert record["codec"] == "PCMU"
    assert record["transport"] == "UDP"
    assert record["answer_wall"] is not None


def test_answered_call_over_tcp(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    """Guide §2: UDP or TCP; kx-sipd serves TCP on the same port (the carrier stays UDP)."""
    client, carrier = run_call(
        kx, workdir, carrier_port, "uac_answer.xml", "uas_answer.xml", transport="t1"
    )
    client.assert_ok()
    assert carrier is not None
    carrier.assert_ok()
    a = client.messages()
    assert {m.transport for m in a} == {"TCP"}
    assert without_100(statuses(a, "received")) == [401, 180, 200]
    assert statuses(a, "received", "BYE") == [200]
    assert requests(carrier.messages(), "received") == ["INVITE", "ACK", "BYE"]
    record = check_record(kx, client, ended_by="client", final_status=200)
    check_reached_carrier(record, carrier)
    assert record["transport"] == "TCP"


def test_carrier_busy(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    client, carrier = run_call(kx, workdir, carrier_port, "uac_busy.xml", "uas_busy.xml")
    check_rejected(kx, client, carrier, 486)


def test_carrier_unavailable(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    client, carrier = run_call(
        kx, workdir, carrier_port, "uac_unavailable.xml", "uas_unavailable.xml"
    )
    check_rejected(kx, client, carrier, 503)


def check_rejected(kx: KxServer, client: Sipp, carrier: Sipp | None, code: int) -> None:
    client.assert_ok()
    assert carrier is not None
    carrier.assert_ok()
    a, b = client.messages(), carrier.messages()
    assert without_100(statuses(a, "received")) == [401, 180, code]
    assert requests(a, "sent") == ["INVITE", "ACK", "INVITE", "ACK"]
    assert statuses(b, "sent") == [100, 180, code]
    # kx-sipd ACKs the carrier's failure (same transaction, §17.1.1.3), and
    # sends nothing after it (no CANCEL: §9.1; the scenario fails on one).
    assert requests(b, "received") == ["INVITE", "ACK"]
    record = check_record(kx, client, ended_by="carrier", final_status=code)
    check_reached_carrier(record, carrier)
    assert record["answer_wall"] is None


def test_carrier_silent_until_timer_b(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    """No response at all from the carrier: Timer B (64*T1 = 32 s) ends the B-leg
    INVITE and the client gets 408. No T1 setting exists on the server, so this
    waits the RFC's full 32 s."""
    client, carrier = run_call(
        kx, workdir, carrier_port, "uac_no_answer.xml", "uas_silent.xml", timeout=50.0
    )
    client.assert_ok()
    assert carrier is not None
    carrier.assert_ok()  # also: no CANCEL came (§9.1), else SIPp fails the call
    a, b = client.messages(), carrier.messages(retransmissions=True)
    assert without_100(statuses(a, "received")) == [401, 408]
    received = [m for m in b if m.direction == "received"]
    assert {m.method for m in received} == {"INVITE"}, [m.first_line for m in received]
    # Retransmitted by kx-sipd's client transaction (Timer A), one branch.
    assert len(received) >= 2
    assert len({m.header("Via") for m in received}) == 1
    assert statuses(b, "sent") == []
    record = check_record(kx, client, ended_by="timeout", final_status=408)
    check_reached_carrier(record, carrier)


def test_cancel_while_ringing(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    client, carrier = run_call(kx, workdir, carrier_port, "uac_cancel.xml", "uas_cancel.xml")
    client.assert_ok()
    assert carrier is not None
    carrier.assert_ok()
    a, b = client.messages(), carrier.messages()
    assert requests(a, "sent") == ["INVITE", "ACK", "INVITE", "CANCEL", "ACK"]
    assert statuses(a, "received", "CANCEL") == [200]
    assert without_100(statuses(a, "received")) == [401, 180, 487]
    # The CANCEL reached the carrier, on the B-leg INVITE's branch (§9.1).
    assert requests(b, "received") == ["INVITE", "CANCEL", "ACK"]
    invite, cancel = (m for m in b if m.direction == "received" and m.method != "ACK")
    assert cancel.header("Via") == invite.header("Via")
    assert statuses(b, "sent", "CANCEL") == [200]
    assert statuses(b, "sent") == [100, 180, 487]
    record = check_record(kx, client, ended_by="cancel", final_status=487)
    check_reached_carrier(record, carrier)
    assert record["answer_wall"] is None


def test_carrier_hangs_up(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    client, carrier = run_call(kx, workdir, carrier_port, "uac_carrier_bye.xml", "uas_hangup.xml")
    client.assert_ok()
    assert carrier is not None
    carrier.assert_ok()
    a, b = client.messages(), carrier.messages()
    assert without_100(statuses(a, "received")) == [401, 180, 200]
    # The BYE reached the client in its dialog, and was answered 200.
    assert requests(a, "received") == ["BYE"]
    bye = next(m for m in a if m.direction == "received" and m.is_request)
    assert bye.header("Call-ID") == call_id_of(client)
    assert statuses(a, "sent", "BYE") == [200]
    assert requests(b, "sent") == ["BYE"]
    assert statuses(b, "received", "BYE") == [200]
    record = check_record(kx, client, ended_by="carrier", final_status=200)
    check_reached_carrier(record, carrier)


def test_hold_and_unhold(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    client, carrier = run_call(kx, workdir, carrier_port, "uac_hold.xml", "uas_hold.xml")
    client.assert_ok()
    assert carrier is not None
    carrier.assert_ok()
    a, b = client.messages(), carrier.messages()
    assert requests(a, "sent") == ["INVITE", "ACK", "INVITE", "ACK"] + ["INVITE", "ACK"] * 2 + [
        "BYE"
    ]
    assert without_100(statuses(a, "received")) == [401, 180, 200, 200, 200]
    assert requests(b, "received") == ["INVITE", "ACK"] * 3 + ["BYE"]
    reinvites = [m for m in b if m.direction == "received" and m.method == "INVITE"][1:]
    record = check_record(kx, client, ended_by="client", final_status=200)
    low, high = kx.rtp_range
    for reinvite, direction in zip(reinvites, ("sendonly", "sendrecv"), strict=True):
        body = reinvite.body
        assert f"a={direction}" in body, body
        assert f"c=IN IP4 {HOST}" in body, body
        port = int(body.split("m=audio ", 1)[1].split()[0])
        assert low <= port <= high, body  # the relay's carrier-side port
        assert reinvite.header("Call-ID") == record["b_call_id"]
    # The client sees the carrier's answers on the relay's client side.
    answers = [
        m for m in a if m.direction == "received" and m.status == 200 and m.method == "INVITE"
    ]
    assert "a=recvonly" in answers[1].body and "a=sendrecv" in answers[2].body
    for answer in answers:
        assert f"c=IN IP4 {HOST}" in answer.body


def test_offer_without_g711_gets_488(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    with UdpWatch(carrier_port) as watch:
        client, _ = run_call(kx, workdir, carrier_port, "uac_codecs_rejected.xml", None)
        client.assert_ok()
        assert watch.datagrams(wait=0.5) == []
    a = client.messages()
    assert without_100(statuses(a, "received")) == [401, 488]
    final = next(m for m in a if m.status == 488)
    # RFC 3261 §20.43: warn-code SP warn-agent SP "warn-text" (3xx: SDP trouble).
    assert re.fullmatch(r'3\d\d \S+ ".+"', final.header("Warning") or ""), final.text
    record = check_record(kx, client, ended_by="rejected", final_status=488)
    assert record["b_call_id"] is None


def test_offer_is_filtered_to_g711(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    client, carrier = run_call(
        kx, workdir, carrier_port, "uac_codecs_filtered.xml", "uas_answer_pcma.xml"
    )
    client.assert_ok()
    assert carrier is not None
    carrier.assert_ok()
    invite = next(m for m in carrier.messages() if m.direction == "received")
    media = [line for line in invite.body.splitlines() if line.startswith(("m=", "a=rtpmap"))]
    assert media[0].split()[3:] == ["8", "101"], invite.body
    assert sorted(media[1:]) == ["a=rtpmap:101 telephone-event/8000", "a=rtpmap:8 PCMA/8000"]
    assert "opus" not in invite.body.lower()
    record = check_record(kx, client, ended_by="client", final_status=200)
    check_reached_carrier(record, carrier)
    assert record["codec"] == "PCMA"


def test_password_rotation_takes_effect_on_the_next_call(
    kx: KxServer, workdir: Path, carrier_port: int
) -> None:
    """Guide §8: rotate the password and the next call fails with 403 Bad
    credentials, with no REGISTER in between (none is ever sent here)."""
    first, carrier = run_call(
        kx, workdir, carrier_port, "uac_answer.xml", "uas_answer.xml", user=ROTOR, name="first"
    )
    first.assert_ok()
    assert carrier is not None
    carrier.assert_ok()
    kx.cli("accounts", "passwd", ROTOR[0], "--password", "rotor-Secret-2")
    with UdpWatch(carrier_port) as watch:
        second, _ = run_call(
            kx, workdir, carrier_port, "uac_bad_credentials.xml", None, user=ROTOR, name="second"
        )
        second.assert_ok()
        assert watch.datagrams(wait=0.5) == []
    final = next(m for m in second.messages() if m.status == 403)
    assert final.reason == "Bad credentials"
    assert "REGISTER" not in requests(first.messages() + second.messages(), "sent")


def test_replayed_authorization_is_refused(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    """An Authorization captured from a real call, replayed on a new INVITE: the
    nonce was single-use (guide §8: fresh nonce per INVITE), so 401 stale=true."""
    client, carrier = run_call(kx, workdir, carrier_port, "uac_answer.xml", "uas_answer.xml")
    client.assert_ok()
    invite = [m for m in client.messages() if m.direction == "sent" and m.method == "INVITE"][1]
    captured = invite.header("Authorization")
    assert captured and "nonce=" in captured
    with UdpWatch(carrier_port) as watch, RawClient(kx.address) as raw:
        body = (
            "v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
        )
        request_uri = invite.first_line.split()[1]
        call_id = f"replay-{os.getpid()}-{time.monotonic_ns()}"
        raw.send(
            f"INVITE {request_uri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{raw.port};branch=z9hG4bK{time.monotonic_ns()};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:{ALICE[0]}@{REALM}>;tag=replay\r\n"
            f"To: <sip:{DIALED}@{REALM}>\r\n"
            f"Call-ID: {call_id}\r\n"
            "CSeq: 1 INVITE\r\n"
            f"Contact: <sip:{ALICE[0]}@{HOST}:{raw.port}>\r\n"
            f"Authorization: {captured}\r\n"
            "Content-Type: application/sdp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        )
        _, final = raw.final_response()
        assert final.status == 401, final.text
        challenge = final.header("WWW-Authenticate") or ""
        assert "stale=true" in challenge.replace(" ", "").lower(), challenge
        assert watch.datagrams(wait=0.5) == []
    assert kx.records(call_id) == []


# ------------------------------------------------- fixed bugs, kept as tests


def test_no_cancel_after_the_carriers_final_response(
    kx: KxServer, workdir: Path, carrier_port: int
) -> None:
    client, carrier = run_call(kx, workdir, carrier_port, "uac_busy.xml", "uas_busy.xml")
    assert carrier is not None
    carrier.assert_ok()
    assert requests(carrier.messages(), "received") == ["INVITE", "ACK"]


def test_rejected_call_shows_its_ladder(kx: KxServer, workdir: Path, carrier_port: int) -> None:
    client, _ = run_call(kx, workdir, carrier_port, "uac_codecs_rejected.xml", None)
    client.assert_ok()
    shown = kx.cli("calls", "show", call_id_of(client), "--summary").stdout
    assert ladder_lines(shown), shown
    assert "SIP/2.0 488 " in shown, shown


# ------------------------------------------------------------------ helpers


def ladder_lines(shown: str) -> list[str]:
    """The SIP lines of `calls show --summary` (after its 'SIP ladder' heading)."""
    _, _, ladder = shown.partition("SIP ladder")
    return [line for line in ladder.splitlines()[1:] if "SIP/2.0" in line]


def without_100(codes: list[int]) -> list[int]:
    """100 Trying is hop-by-hop and may come once per INVITE or not at all."""
    return [code for code in codes if code != 100]


class UdpWatch:
    """A socket on the carrier's port: proves that nothing reached the carrier."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, port))

    def __enter__(self) -> UdpWatch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.sock.close()

    def datagrams(self, wait: float) -> list[bytes]:
        got = []
        self.sock.settimeout(wait)
        try:
            while True:
                got.append(self.sock.recv(65535))
        except TimeoutError:
            return got
