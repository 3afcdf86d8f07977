"""Real softphones against ``kx-sipd serve`` (issue 8 §1).

baresip and linphonec, from the OS packages, run headless (no sound card) and are
configured as the customer's guide §4 tells an integrator: username = auth name,
password, domain sip.kx21.com, UDP, the server as (outbound) proxy, no realm (it
comes from the 401), PCMU/PCMA only. Each one registers, calls the echo test
(9196, answered by kx-sipd, media echoed by its relay) and the carrier (a SIPp
UAS whose SDP points at an RTP socket of the test's), sends an RFC 4733 digit,
hangs up; a wrong password gets ``403 Bad credentials`` (guide §9).

Media is counted where it arrives: at the carrier socket (what the client sent),
by the client itself (baresip's RTP figures, linphonec's recording of what it
heard), and by the relay (``kx-sipd relay stats``) while the call is up.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from interop.softphones.baresip import Baresip, baresip_binary
from interop.softphones.carrier import Carrier
from interop.softphones.linphone import Linphonec, linphonec_binary
from interop.softphones.ports import HOST, free_port
from interop.softphones.required import requires
from interop.softphones.rtp import PCMU, TELEPHONE_EVENT, parse_dtmf
from interop.softphones.server import REALM, KxServer, make_database

pytestmark = pytest.mark.interop
T = TypeVar("T")

needs_baresip = requires(
    "baresip", baresip_binary(), "scripts/install-test-deps.sh installs baresip-core"
)
needs_linphonec = requires(
    "linphonec", linphonec_binary(), "scripts/install-test-deps.sh installs linphone-cli"
)
needs_sipsak = requires("sipsak", shutil.which("sipsak"), "scripts/install-test-deps.sh")
needs_sipp = requires(
    "sipp", shutil.which("sipp"), "scripts/install-test-deps.sh installs sip-tester"
)

ECHO = "9196"
DIALED = "17752180264"  # guide §5's first example
MEDIA_WAIT = 6.0  # bound on every wait for media to show up
AUDIBLE = 1000.0  # RMS of a recording that holds the test tone (silence is ~0)

# username: (password, route); one account per client and purpose (guide §3)
ACCOUNTS = {
    "bare-echo": ("bare-echo-secret", "echo"),
    "bare-trunk": ("bare-trunk-secret", "carrier"),
    "bare-rotate": ("bare-rotate-secret", "echo"),
    "lin-echo": ("lin-echo-secret", "echo"),
    "lin-trunk": ("lin-trunk-secret", "carrier"),
    "sak": ("sak-secret", "echo"),
}


class Setup:
    """The module's server, and the port its carrier route points at."""

    def __init__(self, server: KxServer, carrier_port: int) -> None:
        self.server = server
        self.carrier_port = carrier_port


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("softphones")
    carrier_port = free_port()
    server = KxServer(directory, make_database(directory, ACCOUNTS, carrier_port))
    server.start()
    try:
        yield Setup(server, carrier_port)
    finally:
        server.stop()


@pytest.fixture
def carrier(setup: Setup, tmp_path: Path) -> Iterator[Carrier]:
    running = Carrier(tmp_path, setup.carrier_port)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def baresip_for(setup: Setup, tmp_path: Path) -> Iterator[Callable[..., Baresip]]:
    started: list[Baresip] = []

    def make(username: str, password: str | None = None) -> Baresip:
        phone = Baresip(tmp_path, username, password or ACCOUNTS[username][0], setup.server.port)
        started.append(phone)
        phone.start()
        return phone

    yield make
    for phone in started:
        phone.stop()


@pytest.fixture
def linphonec_for(setup: Setup, tmp_path: Path) -> Iterator[Callable[..., Linphonec]]:
    started: list[Linphonec] = []

    def make(username: str, password: str | None = None) -> Linphonec:
        phone = Linphonec(tmp_path, username, password or ACCOUNTS[username][0], setup.server.port)
        started.append(phone)
        phone.start()
        phone.use_files()
        phone.keep_only_g711()
        return phone

    yield make
    for phone in started:
        phone.stop()


# --- reading messages and records


def first_line(message: str) -> str:
    return message.split("\n", 1)[0]


def header(message: str, name: str) -> str | None:
    match = re.search(rf"(?im)^{re.escape(name)}\s*:\s*(.*)$", message)
    return match.group(1).strip() if match else None


def telephone_event(message: str) -> int:
    """The payload type an SDP gives telephone-event/8000."""
    match = re.search(r"(?m)^a=rtpmap:(\d+) telephone-event/8000", message)
    assert match is not None, message
    return int(match.group(1))


def digits_at(carrier: Carrier) -> set[int]:
    """The RFC 4733 events that reached the carrier's socket and ended, under the
    telephone-event number of the offer the carrier got (its answer uses it too)."""
    [offer] = wait_until(lambda: carrier.received("INVITE"), MEDIA_WAIT, "the carrier's INVITE")
    ended = wait_until(
        lambda: [
            event
            for packet in carrier.media.received(telephone_event(offer))
            if (event := parse_dtmf(packet.payload)) is not None and event.end
        ],
        MEDIA_WAIT,
        "the end of an RFC 4733 event at the carrier",
    )
    return {event.event for event in ended}


def audio_payloads(message: str) -> list[int]:
    """The payload types of the SDP's m=audio line."""
    match = re.search(r"(?m)^m=audio \d+ RTP/AVP ([\d ]+)", message)
    assert match is not None, message
    return [int(number) for number in match.group(1).split()]


def unique(messages: list[str]) -> list[str]:
    """The messages without UDP retransmissions (byte-identical repeats)."""
    return list(dict.fromkeys(messages))


def exchange(messages: list[str], method: str) -> list[str]:
    """The first lines of the messages of ``method`` transactions (requests and
    responses, retransmissions left out), ``-> `` for what the client sent and
    ``<- `` for what it got."""
    found = []
    for message in unique(messages):
        cseq = header(message[3:], "CSeq") or ""
        if cseq.split()[-1:] == [method]:
            found.append(first_line(message))
    return found


def wait_until(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def finished_record(server: KxServer, call_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for record in server.calls():
            if record["a_call_id"] == call_id and record["end_wall"] is not None:
                return record
        return None

    return wait_until(find, 10.0, f"the call record of {call_id}")


def relay_call(server: KxServer, least_packets: int) -> dict[str, Any]:
    """The relay's one live call, once its A leg has relayed ``least_packets`` each way."""

    def find() -> dict[str, Any] | None:
        calls = server.relay_calls()
        assert len(calls) <= 1, calls
        if not calls:
            return None
        rtp = calls[0]["a"]["rtp"]
        if rtp["packets_in"] >= least_packets and rtp["packets_out"] >= least_packets:
            return calls[0]
        return None

    return wait_until(find, MEDIA_WAIT, f"{least_packets} packets each way through the relay")


def assert_registration_challenged(messages: list[str], final: str) -> None:
    """Guide §6.1: REGISTER → 401 (realm sip.kx21.com) → REGISTER with credentials
    for the realm the client learnt from the 401 → ``final``."""
    register = [m for m in unique(messages) if (header(m[3:], "CSeq") or "").endswith(" REGISTER")]
    lines = [first_line(m) for m in register[:4]]
    assert [line[:3] for line in lines] == ["-> ", "<- ", "-> ", "<- "], lines
    assert lines[1] == "<- SIP/2.0 401 Unauthorized", lines
    assert header(register[0], "Authorization") is None
    challenge = header(register[1], "WWW-Authenticate") or ""
    assert f'realm="{REALM}"' in challenge, challenge
    credentials = header(register[2], "Authorization") or ""
    assert f'realm="{REALM}"' in credentials, credentials
    assert lines[3] == f"<- SIP/2.0 {final}", lines


def assert_invite_challenged(messages: list[str], final: str) -> list[str]:
    """Guide §6.2: INVITE → 401 → INVITE with credentials → 100 Trying → … → ``final``.
    The authenticated INVITE's messages are returned."""
    lines = exchange(messages, "INVITE")
    assert lines[0].startswith("-> INVITE "), lines
    assert lines[1] == "<- SIP/2.0 401 Unauthorized", lines
    assert lines[2].startswith("-> INVITE "), lines
    assert "<- SIP/2.0 100 Trying" in lines[3:], lines
    assert lines[-1] == f"<- SIP/2.0 {final}", lines
    return lines


# --- baresip


@needs_baresip
def test_baresip_echo_call(setup: Setup, baresip_for: Callable[..., Baresip]) -> None:
    """baresip registers (realm from the 401), calls 9196 and hears its own RTP and
    its RFC 4733 digit come back through the relay's echo, then hangs up."""
    phone = baresip_for("bare-echo")
    assert phone.register()["type"] == "REGISTER_OK"
    assert_registration_challenged(phone.sip_messages(), "200 OK")

    phone.dial(ECHO)
    established = phone.wait_event("CALL_ESTABLISHED", "CALL_CLOSED")
    assert established["type"] == "CALL_ESTABLISHED", established
    call_id = established["id"]

    relayed = relay_call(setup.server, 25)
    assert relayed["echo"] is True
    assert relayed["a"]["rtp"]["peer"][0] == HOST

    def echoed() -> tuple[int, int] | None:
        figures = phone.rtp_figures()
        return figures if figures[1] >= 25 else None

    sent, heard = wait_until(echoed, MEDIA_WAIT, "25 echoed packets heard by baresip")
    assert sent >= 25 and heard >= 25, (sent, heard)

    phone.send_digits("5")
    dtmf = phone.wait_event("CALL_DTMF_START", timeout=MEDIA_WAIT)
    assert dtmf["param"] == "5", dtmf  # the telephone-event packets came back decoded

    phone.hangup()
    assert phone.wait_event("CALL_CLOSED")["id"] == call_id
    messages = phone.sip_messages()
    lines = assert_invite_challenged(messages, "200 OK")
    assert lines[2] == f"-> INVITE sip:{ECHO}@{REALM};transport=udp SIP/2.0", lines
    bye = exchange(messages, "BYE")
    assert bye[0].startswith("-> BYE ") and bye[-1] == "<- SIP/2.0 200 OK", bye

    record = finished_record(setup.server, call_id)
    assert record["account"] == "bare-echo"
    assert (record["dialed"], record["route"], record["final_status"]) == (ECHO, "echo", 200)
    assert record["ended_by"] == "client"
    assert record["codec"] == "PCMU"
    assert record["user_agent"].startswith("baresip")
    assert record["a_media"]["packets_in"] >= 25 and record["a_media"]["packets_out"] >= 25


@needs_baresip
@needs_sipp
def test_baresip_carrier_call(
    setup: Setup, baresip_for: Callable[..., Baresip], carrier: Carrier, tmp_path: Path
) -> None:
    """baresip calls a number routed to the carrier: its tone reaches the carrier's
    socket, the carrier's RTP reaches baresip, its digit arrives at the carrier as
    RFC 4733 events, and its BYE ends the carrier leg."""
    phone = baresip_for("bare-trunk")
    assert phone.register()["type"] == "REGISTER_OK"
    phone.dial(DIALED)
    established = phone.wait_event("CALL_ESTABLISHED", "CALL_CLOSED")
    assert established["type"] == "CALL_ESTABLISHED", established
    call_id = established["id"]

    assert carrier.media.wait_for(PCMU, 25, MEDIA_WAIT) >= 25  # client → carrier
    carrier.media.send_stream(50)
    assert carrier.media.wait_sent(MEDIA_WAIT) == 50
    wait_until(lambda: phone.rtp_figures()[1] >= 45, MEDIA_WAIT, "carrier RTP heard by baresip")

    phone.send_digits("7")
    assert digits_at(carrier) == {7}

    phone.hangup()
    phone.wait_event("CALL_CLOSED")
    assert carrier.finish() == 0, carrier.diagnostics()  # INVITE, ACK, BYE as scripted

    [invite] = carrier.received("INVITE")
    assert first_line(invite).startswith(f"INVITE sip:{DIALED}@"), invite
    assert re.search(rf"(?m)^c=IN IP4 {re.escape(HOST)}\s*$", invite), invite
    assert audio_payloads(invite) == [0, 8, TELEPHONE_EVENT], invite  # as baresip offered
    assert len(carrier.received("BYE")) >= 1

    record = finished_record(setup.server, call_id)
    assert (record["route"], record["final_status"], record["ended_by"]) == (
        "carrier",
        200,
        "client",
    )
    assert record["b_call_id"] == header(invite, "Call-ID")
    assert record["b_media"]["packets_in"] >= 50
    assert_pcap_holds_the_ladder(setup.server, call_id, tmp_path / "call.pcap")


def assert_pcap_holds_the_ladder(server: KxServer, call_id: str, path: Path) -> None:
    """Issue 8 §4: ``kx-sipd calls pcap`` of a call through the carrier, read with scapy,
    holds every message of both legs in order, between kx-sipd and each leg's peer."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap

    written = server.cli("calls", "pcap", call_id, "-o", str(path))
    assert written.returncode == 0, written.stderr
    (shown,) = [orjson.loads(line) for line in server.cli("calls", "show", call_id, "--json")
                .stdout.splitlines()]  # fmt: skip
    ladder = shown["ladder"]
    assert {entry["leg"] for entry in ladder} == {"A", "B"}
    packets = rdpcap(str(path))
    assert len(packets) == len(ladder)
    ours = f"{HOST}:{server.port}"
    for packet, entry in zip(packets, ladder, strict=True):
        assert bytes(packet[UDP].payload) == entry["message"].encode()
        ends = (f"{packet[IP].src}:{packet[UDP].sport}", f"{packet[IP].dst}:{packet[UDP].dport}")
        assert ends == (
            (entry["peer"], ours) if entry["direction"] == "in" else (ours, entry["peer"])
        )


@needs_baresip
def test_baresip_wrong_password(setup: Setup, baresip_for: Callable[..., Baresip]) -> None:
    """Guide §9: a wrong password gets 403 Bad credentials, on REGISTER and on INVITE."""
    phone = baresip_for("bare-echo", "not-the-password")
    failed = phone.register()
    assert failed["type"] == "REGISTER_FAIL", failed
    assert "403 Bad credentials" in failed["param"], failed
    assert_registration_challenged(phone.sip_messages(), "403 Bad credentials")

    phone.dial(ECHO)
    closed = phone.wait_event("CALL_ESTABLISHED", "CALL_CLOSED")
    assert closed["type"] == "CALL_CLOSED", closed
    assert "403 Bad credentials" in closed["param"], closed
    assert_invite_challenged(phone.sip_messages(), "403 Bad credentials")


@needs_baresip
def test_baresip_password_rotation(setup: Setup, baresip_for: Callable[..., Baresip]) -> None:
    """Guide §8: after the password is rotated, the next call fails with 403 Bad
    credentials without any re-registration."""
    phone = baresip_for("bare-rotate")
    assert phone.register()["type"] == "REGISTER_OK"
    setup.server.cli("accounts", "passwd", "bare-rotate", "--password", "rotated-secret")
    registers_before = len(exchange(phone.sip_messages(), "REGISTER"))

    phone.dial(ECHO)
    closed = phone.wait_event("CALL_ESTABLISHED", "CALL_CLOSED")
    assert closed["type"] == "CALL_CLOSED", closed
    assert "403 Bad credentials" in closed["param"], closed
    messages = phone.sip_messages()
    assert len(exchange(messages, "REGISTER")) == registers_before
    assert_invite_challenged(messages, "403 Bad credentials")


# --- sipsak


def sipsak_register(port: int, username: str, password: str) -> tuple[int, list[str]]:
    """sipsak's usrloc mode: one REGISTER with digest (sipsak resolves the URI's host
    itself, so the AOR names the server's address rather than sip.kx21.com). Its exit
    status and the status lines it received."""
    result = subprocess.run(
        [
            *("sipsak", "-U", "-i", "-vvv", "-s", f"sip:{username}@{HOST}:{port}"),
            *("-H", HOST, "-u", username, "-a", password),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # it reports the failing reply on stderr
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    return result.returncode, re.findall(r"(?m)^SIP/2\.0 \d{3} [^\r\n]*", result.stdout)


@needs_sipsak
def test_sipsak_registration(setup: Setup) -> None:
    """A third client: sipsak answers the 401 with the realm it names and is
    registered; with a wrong password it gets 403 Bad credentials."""
    status, lines = sipsak_register(setup.server.port, "sak", ACCOUNTS["sak"][0])
    assert (status, lines[:1], lines[-1:]) == (0, ["SIP/2.0 401 Unauthorized"], ["SIP/2.0 200 OK"])
    status, lines = sipsak_register(setup.server.port, "sak", "not-the-password")
    assert status != 0
    assert "SIP/2.0 401 Unauthorized" in lines and "SIP/2.0 403 Bad credentials" in lines, lines


# --- linphonec


def linphone_call(phone: Linphonec, number: str) -> None:
    match = phone.run(
        f"call sip:{number}@{REALM}", r"Call \d+ with \S+ (connected|error|ended)", timeout=10.0
    )
    assert match.group(1) == "connected", phone.screen()[-2000:]
    phone.wait_for(r"Media streams established", timeout=5.0)


def linphone_invite(phone: Linphonec) -> str:
    """The authenticated INVITE linphonec sent (its second)."""
    invites = [m for m in phone.sip_messages() if m.startswith("-> INVITE ")]
    assert len(invites) >= 2, invites
    return invites[1][3:]


@needs_linphonec
def test_linphonec_echo_call(setup: Setup, linphonec_for: Callable[..., Linphonec]) -> None:
    """linphonec registers (realm from the 401), offers G.711 only, calls 9196, hears
    its own tone and its RFC 4733 digit come back, then hangs up."""
    phone = linphonec_for("lin-echo")
    enabled = {name.split("@")[0] for name, on in phone.codecs().items() if on}
    assert enabled == {"PCMU/8000", "PCMA/8000"}
    assert phone.registration().startswith("registered, identity=sip:lin-echo@"), phone.screen()
    assert_registration_challenged(phone.sip_messages(), "200 OK")

    linphone_call(phone, ECHO)
    relayed = relay_call(setup.server, 25)
    assert relayed["echo"] is True
    phone.type("5")
    phone.wait_for(r"Receiving tone 5", timeout=MEDIA_WAIT)  # the echoed RFC 4733 event
    phone.run("terminate", r"Call \d+ with \S+ ended")

    invite = linphone_invite(phone)
    assert [p for p in audio_payloads(invite) if p < 96] == [0, 8], invite
    call_id = header(invite, "Call-ID") or ""
    assert_invite_challenged(phone.sip_messages(), "200 OK")
    assert phone.heard_level() > AUDIBLE  # its tone, echoed, is in what it recorded

    record = finished_record(setup.server, call_id)
    assert (record["dialed"], record["route"], record["final_status"]) == (ECHO, "echo", 200)
    assert record["ended_by"] == "client"
    assert record["user_agent"].startswith("Linphonec")
    assert record["a_media"]["packets_in"] >= 25 and record["a_media"]["packets_out"] >= 25


@needs_linphonec
@needs_sipp
def test_linphonec_carrier_call(
    setup: Setup, linphonec_for: Callable[..., Linphonec], carrier: Carrier
) -> None:
    """linphonec calls the carrier: its tone reaches the carrier's socket, the
    carrier's tone is in linphonec's recording, its digit reaches the carrier as
    RFC 4733 events, and its BYE ends the carrier leg."""
    phone = linphonec_for("lin-trunk")
    assert phone.registration().startswith("registered,"), phone.screen()
    linphone_call(phone, DIALED)

    assert carrier.media.wait_for(PCMU, 25, MEDIA_WAIT) >= 25
    tone = carrier.media.received(PCMU)[-1].payload
    assert len(set(tone)) > 4, tone  # a tone, not silence
    carrier.media.send_stream(50)
    assert carrier.media.wait_sent(MEDIA_WAIT) == 50

    phone.type("7")
    assert digits_at(carrier) == {7}
    phone.run("terminate", r"Call \d+ with \S+ ended")
    assert carrier.finish() == 0, carrier.diagnostics()

    assert phone.heard_level() > AUDIBLE  # the carrier's 1 kHz tone
    call_id = header(linphone_invite(phone), "Call-ID") or ""
    record = finished_record(setup.server, call_id)
    assert (record["route"], record["final_status"], record["ended_by"]) == (
        "carrier",
        200,
        "client",
    )
    [invite] = carrier.received("INVITE")
    assert record["b_call_id"] == header(invite, "Call-ID")
    assert audio_payloads(invite) == [0, 8, telephone_event(invite)], invite


@needs_linphonec
def test_linphonec_wrong_password(setup: Setup, linphonec_for: Callable[..., Linphonec]) -> None:
    """Guide §9 with linphonec: 403 Bad credentials on REGISTER and on INVITE."""
    phone = linphonec_for("lin-echo", "not-the-password")
    assert phone.registration(timeout=3.0) == "registered=-1"
    assert_registration_challenged(phone.sip_messages(), "403 Bad credentials")
    match = phone.run(
        f"call sip:{ECHO}@{REALM}", r"Call \d+ with \S+ (connected|error|ended)", timeout=10.0
    )
    assert match.group(1) == "error"
    assert_invite_challenged(phone.sip_messages(), "403 Bad credentials")


@needs_linphonec
@needs_sipp
def test_linphonec_dtmf_when_carrier_renumbers_telephone_event(
    setup: Setup, linphonec_for: Callable[..., Linphonec], tmp_path: Path
) -> None:
    """DESIGN.md §7: dynamic payload types are per leg. linphonec set up as the guide
    says (G.711 only) offers telephone-event as 96; a carrier answering it as 101
    must still get the client's digits."""
    carrier = Carrier(tmp_path, setup.carrier_port, telephone_event=101)
    carrier.start()
    try:
        phone = linphonec_for("lin-trunk")
        assert phone.registration().startswith("registered,"), phone.screen()
        linphone_call(phone, DIALED)
        [offer] = carrier.received("INVITE")
        assert "a=rtpmap:96 telephone-event/8000" in offer, offer

        answers = [
            m for m in phone.sip_messages() if m.startswith("<- SIP/2.0 200 OK") and "v=0" in m
        ]
        assert answers and "telephone-event/8000" in answers[-1], answers

        phone.type("7")
        wait_until(
            lambda: carrier.media.received(101), MEDIA_WAIT, "RFC 4733 packets at the carrier"
        )
        phone.run("terminate", r"Call \d+ with \S+ ended")
        assert carrier.finish() == 0, carrier.diagnostics()
    finally:
        carrier.stop()
