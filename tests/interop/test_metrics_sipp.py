"""Operating a running ``kx-sipd serve`` (issue 8 §2-§4), over loopback, both drivers:

* /metrics scraped during a SIPp run (REGISTER with digest, calls to the echo number
  9196) and after it: the counters add up to what SIPp sent and received;
* /healthz 200, then 503 naming the store when its accounts table is broken, and
  the relay when the (remote) relay is stopped;
* ``kx-sipd status --json``, ``kx-sipd bans list|clear`` against a server that banned
  127.0.0.1 after wrong passwords;
* ``kx-sipd calls pcap``: the file read with scapy holds every message of the ladder;
* ``--hep``: HEP v3 packets received on a loopback UDP socket during a call, decoded.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.from_thread
import attrs
import orjson
import pytest
from calls_support import (
    HOST,
    REALM,
    SIPP,
    KxServer,
    Sipp,
    _environment,
    free_port,
    free_rtp_range,
    kx_cli,
    sipp_command,
    start_kx,
    users_file,
)
from interop.softphones.required import requires
from media_support import start_sipp_media, write_tone
from prometheus_client.parser import text_string_to_metric_families

import io_anyio
import io_socket
from kx_sipd.store import Store
from kx_sipd.trace import HepTrace, decode_hep
from sansio_sip import Address, Engine, EngineConfig, MediaAllocation, MediaStats

pytestmark = pytest.mark.interop
# Each test drives SIPp: skipped without it, failed under CI (interop/softphones/required.py).
needs_sipp = requires("sipp", SIPP, "scripts/install-test-deps.sh installs sip-tester")
SNGREP = shutil.which("sngrep")  # reads our pcap files and our HEP stream, as operators do
needs_sngrep = requires("sngrep", SNGREP, "scripts/install-test-deps.sh installs sngrep")

ANCHORS = Path(__file__).resolve().parents[3] / "shared" / "anchors" / "sipp"
USERS = [(f"u{n:05d}", f"pw{n:05d}x") for n in range(1, 4)]
REGISTRATIONS = 12
CALLS = 4
WAIT = 30.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module", params=["anyio", "socket"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _database(directory: Path) -> Path:
    db = directory / "kx.sqlite"
    for user, password in USERS:
        kx_cli(db, "accounts", "add", user, "--password", password)
    return db


@attrs.define
class Monitored:
    kx: KxServer
    control: tuple[str, int]
    directory: Path

    def get(self, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(*self.control, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def scrape(self) -> Samples:
        status, data = self.get("/metrics")
        assert status == 200
        out: Samples = {}
        for family in text_string_to_metric_families(data.decode()):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def health(self) -> tuple[int, dict[str, Any]]:
        status, data = self.get("/healthz")
        return status, orjson.loads(data)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kx_sipd", *args, "--control", f"{HOST}:{self.control[1]}"],
            capture_output=True,
            text=True,
            env=_environment(),
            timeout=60,
            check=False,
        )


def _serve(directory: Path, driver: str, *extra: str) -> Monitored:
    control = (HOST, free_port(socket.SOCK_STREAM))
    kx = start_kx(
        directory,
        _database(directory),
        "--driver",
        driver,
        "--metrics",
        f"{HOST}:{control[1]}",
        *extra,
    )
    return Monitored(kx, control, directory)


@pytest.fixture(scope="module")
def monitored(driver: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    server = _serve(tmp_path_factory.mktemp(f"metrics-{driver}"), driver)
    try:
        yield server
    finally:
        server.kx.stop()


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def _sipp(
    name: str, scenario: str, server: Address, directory: Path, calls: int, *extra: str
) -> Sipp:
    return sipp_command(
        name,
        str(ANCHORS / scenario),
        directory,
        port=free_port(),
        remote=server,
        calls=calls,
        timeout=60,
        extra=["-inf", str(users_file(directory, USERS)), *extra],
    )


def _wait(predicate: Any, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


@needs_sipp
def test_metrics_add_up_to_what_sipp_sent(monitored: Monitored) -> None:
    kx, directory = monitored.kx, monitored.directory
    before = monitored.scrape()
    registrations = _sipp("reg", "reg_auth.xml", kx.address, directory, REGISTRATIONS, "-r", "20")
    registrations.start()
    registrations.wait(WAIT)
    registrations.assert_ok()
    calls = _sipp(
        "calls", "uac_call_auth.xml", kx.address, directory, CALLS, "-s", "9196", "-d", "2500"
    )
    calls.start()
    # Scraped during the run: the calls are up.
    assert _wait(lambda: value(monitored.scrape(), "kx_sipd_calls_active") >= 1)
    during = monitored.scrape()
    assert value(during, "kx_sipd_calls_up", route="echo") >= 1
    # The echo test answers within milliseconds: answers (and set-up times) are counted
    # while the calls are up, when the 200 goes out, not only when each call ends.

    def answered_while_up() -> bool:
        found = monitored.scrape()
        started = delta(found, before, "kx_sipd_call_attempts_total", route="echo")
        return value(found, "kx_sipd_calls_up", route="echo") >= 1 and started == delta(
            found, before, "kx_sipd_call_answers_total", route="echo"
        ) == delta(found, before, "kx_sipd_call_setup_seconds_count", route="echo")

    assert _wait(answered_while_up, timeout=5)
    calls.wait(WAIT)
    calls.assert_ok()
    assert _wait(lambda: value(monitored.scrape(), "kx_sipd_calls_up", route="echo") == 0)
    after = monitored.scrape()

    sent: Counter[str] = Counter()
    on_the_wire: Counter[str] = Counter()  # retransmissions included: kx-sipd counts them too
    received: Counter[int] = Counter()
    answered: Counter[tuple[str, int]] = Counter()
    for run in (registrations, calls):
        for message in run.messages():
            if message.direction == "sent" and message.is_request:
                sent[message.method] += 1
            elif message.direction == "received" and not message.is_request:
                assert message.status is not None
                received[message.status] += 1
                answered[message.method, message.status] += 1
        for message in run.messages(retransmissions=True):
            if message.direction == "sent" and message.is_request:
                on_the_wire[message.method] += 1
    assert sent["REGISTER"] == 2 * REGISTRATIONS and sent["INVITE"] == 2 * CALLS
    for method, count in on_the_wire.items():
        assert delta(after, before, "kx_sipd_sip_requests_total", method=method) == count, method
    for code, count in received.items():
        got = delta(after, before, "kx_sipd_sip_responses_total", code=str(code))
        assert got == count, (code, got, count)
    for (method, code), count in answered.items():
        got = delta(after, before, "kx_sipd_sip_answers_total", method=method, code=str(code))
        assert got == count, (method, code, got, count)
    attempts = REGISTRATIONS + CALLS
    assert delta(after, before, "kx_sipd_auth_challenges_total") == attempts
    assert delta(after, before, "kx_sipd_auth_outcomes_total", outcome="accepted") == attempts
    assert delta(after, before, "kx_sipd_calls_started_total") == CALLS
    assert delta(after, before, "kx_sipd_calls_answered_total") == CALLS
    assert delta(after, before, "kx_sipd_calls_ended_total", ended_by="client") == CALLS
    assert delta(after, before, "kx_sipd_call_attempts_total", route="echo") == CALLS
    assert delta(after, before, "kx_sipd_call_answers_total", route="echo") == CALLS
    assert delta(after, before, "kx_sipd_call_setup_seconds_count", route="echo") == CALLS
    assert value(after, "kx_sipd_calls_active") == 0
    # Every record was written through the timed store: start and end of each call.
    writes = delta(after, before, "kx_sipd_store_seconds_count", operation="write_call_record")
    assert writes >= 2 * CALLS
    assert delta(after, before, "kx_sipd_store_seconds_count", operation="get_account") >= 1
    records = kx.cli("calls", "list", "--json").stdout.splitlines()
    assert len(records) == CALLS
    assert value(after, "kx_sipd_relay_up") == 1
    assert value(after, "kx_sipd_relay_shard_up", shard="0") == 1
    assert delta(after, before, "kx_sipd_relay_packets_total", shard="0", direction="in") >= 0


@needs_sipp
def test_relay_and_media_figures_add_up_to_the_rtp_sipp_streamed(tmp_path: Path) -> None:
    """A carrier call with SIPp on both ends, each streaming 100 PCMU packets through the
    relay (media_support's relay_uac_rtp/relay_uas_rtp scenarios): scraped during the
    call, the shard has it with loss and jitter figures; afterwards the shard's packet
    counters moved by exactly what both SIPps sent, the call's media figures were
    observed once per leg with no loss, and the route's counters say one answered call."""
    carrier_port = free_port()
    db = tmp_path / "kx.sqlite"
    kx_cli(db, "routes", "add", "carrier", "--host", HOST, "--port", str(carrier_port))
    user, password = USERS[0]
    kx_cli(db, "accounts", "add", user, "--password", password, "--route", "carrier")
    control = (HOST, free_port(socket.SOCK_STREAM))
    server = Monitored(
        start_kx(tmp_path, db, "--metrics", f"{HOST}:{control[1]}"), control, tmp_path
    )
    packets = 2 * write_tone(tmp_path / "tone.ulaw")  # played twice by each side
    users = users_file(tmp_path, [(user, password)])
    sipps = []
    try:
        before = server.scrape()
        uas = start_sipp_media("uas", "relay_uas_rtp.xml", tmp_path, port=carrier_port)
        sipps.append(uas)
        uac = start_sipp_media(
            "uac",
            "relay_uac_rtp.xml",
            tmp_path,
            port=free_port(),
            remote=server.kx.address,
            extra=("-s", "17752180264", "-inf", str(users)),
        )
        sipps.append(uac)

        def flowing() -> bool:
            during = server.scrape()
            return (
                value(during, "kx_sipd_relay_shard_calls", shard="0") == 1
                and delta(during, before, "kx_sipd_relay_packets_total", shard="0", direction="in")
                > 0
            )

        assert _wait(flowing), uac.diagnostics()
        during = server.scrape()
        assert value(during, "kx_sipd_calls_up", route="carrier") == 1
        assert ("kx_sipd_relay_packets_lost", (("shard", "0"),)) in during
        assert ("kx_sipd_relay_jitter_ms", (("shard", "0"), ("stat", "max"))) in during
        assert uac.wait(30) == 0, uac.diagnostics()
        assert uas.wait(30) == 0, uas.diagnostics()

        def media_seen() -> bool:
            found = server.scrape()
            return delta(found, before, "kx_sipd_call_media_jitter_ms_count", leg="B") == 1

        assert _wait(media_seen)
        after = server.scrape()
    finally:
        for sipp in sipps:
            sipp.stop()
        server.kx.stop()
    for direction in ("in", "out"):
        moved = delta(after, before, "kx_sipd_relay_packets_total", shard="0", direction=direction)
        assert moved == 2 * packets, (direction, moved)
        octets = delta(after, before, "kx_sipd_relay_bytes_total", shard="0", direction=direction)
        assert octets == 2 * packets * 172, (direction, octets)
    for leg in ("A", "B"):
        assert delta(after, before, "kx_sipd_call_media_jitter_ms_count", leg=leg) == 1
        assert delta(after, before, "kx_sipd_call_media_packets_lost_total", leg=leg) == 0
    assert value(after, "kx_sipd_relay_shard_calls", shard="0") == 0
    assert delta(after, before, "kx_sipd_call_attempts_total", route="carrier") == 1
    assert delta(after, before, "kx_sipd_call_answers_total", route="carrier") == 1
    assert delta(after, before, "kx_sipd_call_setup_seconds_count", route="carrier") == 1
    assert delta(after, before, "kx_sipd_store_seconds_count", operation="attach_media_stats") == 1


@needs_sipp
def test_pcap_of_a_call_holds_every_message_of_its_ladder(monitored: Monitored) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap

    path, ladder = _call_pcap(monitored)
    packets = rdpcap(str(path))
    assert len(packets) == len(ladder)
    for packet, entry in zip(packets, ladder, strict=True):
        assert bytes(packet[UDP].payload) == entry["message"].encode()
        assert float(packet.time) == pytest.approx(entry["wall"], abs=1e-6)
        peer = f"{packet[IP].src}:{packet[UDP].sport}"
        ours = f"{packet[IP].dst}:{packet[UDP].dport}"
        if entry["direction"] == "out":
            peer, ours = ours, peer
        assert peer == entry["peer"]
        assert ours == f"{HOST}:{monitored.kx.port}"


def _call_pcap(monitored: Monitored) -> tuple[Path, list[dict[str, Any]]]:
    """``kx-sipd calls pcap`` of the latest call (one is made first when there is none):
    the file, and the call's ladder as ``kx-sipd calls show --json`` gives it."""
    kx = monitored.kx
    line = kx.cli("calls", "list", "--limit", "1", "--json").stdout.splitlines()
    if not line:  # run alone: make one call first
        calls = _sipp("one", "uac_call_auth.xml", kx.address, monitored.directory, 1, "-s", "9196")
        calls.start()
        calls.wait(WAIT)
        calls.assert_ok()
        line = kx.cli("calls", "list", "--limit", "1", "--json").stdout.splitlines()
    call_id = orjson.loads(line[0])["a_call_id"]
    (shown,) = [
        orjson.loads(text)
        for text in kx.cli("calls", "show", call_id, "--json").stdout.splitlines()
    ]
    ladder: list[dict[str, Any]] = shown["ladder"]
    methods = [entry["message"].split(" ", 1)[0] for entry in ladder]
    assert "INVITE" in methods and "BYE" in methods, methods
    path = monitored.directory / "call.pcap"
    written = kx.cli("calls", "pcap", call_id, "-o", str(path))
    assert written.returncode == 0, written.stderr
    return path, ladder


@needs_sipp
@needs_sngrep
def test_sngrep_reads_the_pcap_of_a_call(monitored: Monitored) -> None:
    """The file is one sngrep takes (``sngrep -I call.pcap``): sngrep, reading it
    headless, saves again every packet it parsed as SIP; all of the ladder is there."""
    from scapy.layers.inet import UDP
    from scapy.utils import rdpcap

    path, ladder = _call_pcap(monitored)
    again = path.with_name("sngrep-again.pcap")
    subprocess.run(
        [str(SNGREP), "-N", "-q", "-I", str(path), "-O", str(again)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=True,
    )
    saved = [bytes(packet[UDP].payload) for packet in rdpcap(str(again))]
    assert saved == [entry["message"].encode() for entry in ladder]


def test_healthz_follows_the_store(monitored: Monitored) -> None:
    status, body = monitored.health()
    assert (status, body["status"], body["down"]) == (200, "ok", [])
    db = monitored.kx.db
    _rename(db, "accounts", "accounts_away")
    try:
        assert _wait(lambda: monitored.health()[0] == 503, timeout=10)
        status, body = monitored.health()
        assert body["down"] == ["store"] and body["store"]["error"]
        found = monitored.scrape()
        assert value(found, "kx_sipd_up", component="store") == 0
    finally:
        _rename(db, "accounts_away", "accounts")
    assert _wait(lambda: monitored.health()[0] == 200, timeout=10)


def _rename(db: Path, old: str, new: str) -> None:
    with sqlite3.connect(db) as connection:
        connection.execute(f"ALTER TABLE {old} RENAME TO {new}")
    connection.close()


def test_healthz_says_the_relay_is_down_when_it_stops(driver: str, tmp_path: Path) -> None:
    control = free_port()
    rtp = free_rtp_range(40)
    secret = "metrics-test-relay-secret"
    relay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kx_sipd",
            "relay",
            "serve",
            "--control",
            f"{HOST}:{control}",
            "--rtp-range",
            f"{rtp[0]}-{rtp[1]}",
            "--relay-shards",
            "1",
            "--rtp-address",
            HOST,
            "--secret",
            secret,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "relay.log").open("wb"),
        env=_environment(),
    )
    server = None
    try:
        server = _serve(tmp_path, driver, "--relay", f"{HOST}:{control}", "--relay-secret", secret)
        assert _wait(lambda: server.health()[0] == 200), server.health()
        relay.send_signal(signal.SIGTERM)
        relay.wait(15)
        assert _wait(lambda: server.health()[0] == 503, timeout=15)
        status, body = server.health()
        assert body["down"] == ["relay"] and body["relay"]["error"]
        assert value(server.scrape(), "kx_sipd_relay_up") == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait(5)
        if server is not None:
            server.kx.stop()


# -- bans and status ---------------------------------------------------------------------------


def _digest(user: str, password: str, nonce: str, uri: str) -> str:
    ha1 = hashlib.md5(f"{user}:{REALM}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"REGISTER:{uri}".encode()).hexdigest()
    return hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()


def _register(
    server: tuple[str, int], user: str, password: str, *, source: str = HOST
) -> int | None:
    """REGISTER from ``source`` (a loopback address), answer the challenge with
    ``password``; the final status (None: no answer)."""
    return _register_answer(server, user, password, source=source)[0]


def _register_answer(
    server: tuple[str, int], user: str, password: str, *, source: str = HOST
) -> tuple[int | None, str]:
    """(final status, its reason phrase) of a REGISTER from ``source``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(2.0)
        port = sock.getsockname()[1]
        call_id = f"{random.getrandbits(64):x}"
        uri = f"sip:{REALM}"
        authorization = ""
        for cseq in (1, 2):
            sock.sendto(
                (
                    f"REGISTER {uri} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP {source}:{port};branch=z9hG4bK{call_id}{cseq};rport\r\n"
                    f"Max-Forwards: 70\r\nFrom: <sip:{user}@{REALM}>;tag={call_id}\r\n"
                    f"To: <sip:{user}@{REALM}>\r\nCall-ID: {call_id}\r\n"
                    f"CSeq: {cseq} REGISTER\r\nContact: <sip:{user}@{source}:{port}>\r\n"
                    f"{authorization}Expires: 60\r\nContent-Length: 0\r\n\r\n"
                ).encode(),
                server,
            )
            try:
                answer = sock.recv(65535).decode()
            except TimeoutError:
                return None, ""
            _version, code, reason = answer.split("\r\n", 1)[0].split(" ", 2)
            status = int(code)
            if status != 401:
                return status, reason
            nonce = answer.split('nonce="', 1)[1].split('"', 1)[0]
            response = _digest(user, password, nonce, uri)
            authorization = (
                f'Authorization: Digest username="{user}", realm="{REALM}", nonce="{nonce}", '
                f'uri="{uri}", response="{response}", algorithm=MD5\r\n'
            )
        return None, ""


def test_status_and_bans_against_a_running_server(driver: str, tmp_path: Path) -> None:
    server = _serve(tmp_path, driver, "--ban-failures", "3", "--ban-window", "60")
    try:
        user, password = USERS[0]
        assert _register(server.kx.address, user, password) == 200
        for _ in range(3):
            assert _register(server.kx.address, user, "wrong") == 403
        # 127.0.0.1 is banned now: even the right password goes unanswered.
        assert _register(server.kx.address, user, password) is None
        listed = server.cli("bans", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        (ban,) = [orjson.loads(text) for text in listed.stdout.splitlines()]
        assert ban["ip"] == HOST and 0 < ban["seconds_left"] <= 600
        status = server.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        body = orjson.loads(status.stdout)
        assert body["server"]["driver"] == driver
        assert body["server"]["listen"] == [f"{HOST}:{server.kx.port}"]
        assert body["health"]["status"] == "ok"
        assert body["calls"]["up"] == 0
        assert [entry["ip"] for entry in body["bans"]] == [HOST]
        assert body["sip"]["auth"]["bad-credentials"] == 3
        assert body["relay"]["up"] is True and len(body["relay"]["shards"]) == 1
        text = server.cli("status")
        assert text.returncode == 0 and "bans: 1" in text.stdout and HOST in text.stdout
        cleared = server.cli("bans", "clear", HOST)
        assert cleared.returncode == 0 and "1 ban lifted" in cleared.stdout
        assert _register(server.kx.address, user, password) == 200
        listed = server.cli("bans", "list")
        assert listed.stdout.strip() == "no bans"
    finally:
        server.kx.stop()


# -- credential sharing (guide §3: one user per endpoint) -----------------------------------------

SECOND_DEVICE = "127.0.0.2"  # another loopback address: another device to the server


def test_an_account_used_from_two_addresses_is_counted_and_listed(
    driver: str, tmp_path: Path
) -> None:
    server = _serve(tmp_path, driver)
    try:
        (user, password), (other, other_password) = USERS[0], USERS[1]
        before = server.scrape()
        assert _register(server.kx.address, user, password) == 200
        assert _register(server.kx.address, other, other_password) == 200
        assert value(server.scrape(), "kx_sipd_shared_accounts") == 0
        # Without --one-device-per-account the second device is served, and noticed.
        assert _register(server.kx.address, user, password, source=SECOND_DEVICE) == 200
        after = server.scrape()
        assert value(after, "kx_sipd_shared_accounts") == 1
        assert delta(after, before, "kx_sipd_accounts_shared_total") == 1
        assert value(after, "kx_sipd_second_devices_refused_total") == 0
        status = server.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        body = orjson.loads(status.stdout)
        assert body["shared_accounts"] == [{"account": user, "addresses": [HOST, SECOND_DEVICE]}]
        assert body["devices"] == {"sharing_seen": 1, "second_refused": 0}
        text = server.cli("status").stdout
        assert "accounts used from several addresses: 1  (since start: 1 requests" in text, text
        assert re.search(rf"(?m)^{user} +{HOST} {SECOND_DEVICE}$", text), text
        assert '"event":"account.shared"' in server.kx.log_tail(20_000)
    finally:
        server.kx.stop()


def test_one_device_per_account_refuses_the_second_device_clearly(
    driver: str, tmp_path: Path
) -> None:
    server = _serve(tmp_path, driver, "--one-device-per-account")
    try:
        user, password = USERS[0]
        assert _register_answer(server.kx.address, user, password) == (200, "OK")
        refused = _register_answer(server.kx.address, user, password, source=SECOND_DEVICE)
        assert refused == (403, "Account in use by another device")
        # The first device goes on as before; another account is not affected.
        assert _register(server.kx.address, user, password) == 200
        assert _register(server.kx.address, *USERS[1], source=SECOND_DEVICE) == 200
        found = server.scrape()
        assert value(found, "kx_sipd_second_devices_refused_total") == 1
        assert value(found, "kx_sipd_shared_accounts") == 0
        assert value(found, "kx_sipd_auth_failures_total", reason="bad-credentials") == 0
        body = orjson.loads(server.cli("status", "--json").stdout)
        assert body["devices"] == {"sharing_seen": 0, "second_refused": 1}
        assert "0 requests from a second address, 1 refused)" in server.cli("status").stdout
    finally:
        server.kx.stop()


# -- graceful shutdown -------------------------------------------------------------------------


@needs_sipp
def test_healthz_is_503_while_the_server_stops_taking_calls(driver: str, tmp_path: Path) -> None:
    """SIGTERM with a call up: the call goes on for the grace period and new calls get
    503, so /healthz says the SIP service is down (a load balancer moves new calls to
    another host) while the control endpoint still answers."""
    server = _serve(tmp_path, driver, "--shutdown-grace", "30")
    calls = None
    try:
        assert server.health()[0] == 200
        calls = _sipp(
            "long", "uac_call_auth.xml", server.kx.address, tmp_path, 1, "-s", "9196", "-d", "30000"
        )
        calls.start()
        assert _wait(lambda: value(server.scrape(), "kx_sipd_calls_active") == 1)
        server.kx.process.send_signal(signal.SIGTERM)
        assert _wait(lambda: server.health()[0] == 503, timeout=10), server.health()
        status, body = server.health()
        assert body["down"] == ["sip"], body
        assert body["sip"]["error"].startswith("stopping"), body
        found = server.scrape()
        assert value(found, "kx_sipd_up", component="sip") == 0
        assert value(found, "kx_sipd_calls_active") == 1  # the call up is not cut
    finally:
        if calls is not None:
            calls.stop()
        server.kx.stop()  # a second SIGTERM: calls ended at once


# -- HEP ---------------------------------------------------------------------------------------


@needs_sipp
def test_hep_packets_reach_a_collector_during_a_call(driver: str, tmp_path: Path) -> None:
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind((HOST, 0))
    collector.settimeout(0.5)
    server = None
    try:
        server = _serve(
            tmp_path,
            driver,
            "--hep",
            f"{HOST}:{collector.getsockname()[1]}",
            "--hep-agent-id",
            "4242",
        )
        calls = _sipp("hep", "uac_call_auth.xml", server.kx.address, tmp_path, 1, "-s", "9196")
        calls.start()
        calls.wait(WAIT)
        calls.assert_ok()
        packets = _collect_hep(collector)
    finally:
        collector.close()
        if server is not None:
            server.kx.stop()
    _check_hep(packets, calls, server.kx.port, agent_id=4242)


def _collect_hep(collector: socket.socket) -> list[Any]:
    """HEP packets until the collector has been quiet for 0.5 s (bounded)."""
    collector.settimeout(0.5)
    packets = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            packets.append(decode_hep(collector.recv(65535)))
        except TimeoutError:
            if packets:
                break
    return packets


def _check_hep(packets: list[Any], calls: Sipp, sip_port: int, *, agent_id: int) -> None:
    """Every message SIPp sent or received crossed kx-sipd's SIP port: each has its HEP
    packet, in the right direction, with the payload as it was on the wire."""
    assert all(p.agent_id == agent_id and p.payload_type == 1 for p in packets)
    for message in calls.messages():
        first_line = message.first_line.encode()
        ours = (HOST, sip_port)
        matching = [
            packet
            for packet in packets
            if packet.payload.startswith(first_line)
            and (packet.destination if message.direction == "sent" else packet.source) == ours
        ]
        assert matching, (message.first_line, [p.payload[:40] for p in packets])
    invites = [p for p in packets if p.payload.startswith(b"INVITE ")]
    assert len(invites) == 2 and all(p.protocol == 17 and p.family == 2 for p in invites)
    assert all(p.seconds > 1_600_000_000 and 0 <= p.micros < 1_000_000 for p in packets)


@needs_sipp
@needs_sngrep
def test_sngrep_reads_the_hep_stream_of_a_call(tmp_path: Path) -> None:
    """The HEP v3 stream read by a tool operators use, not by our own decoder: sngrep
    listening as a HEP collector (``sngrep -L``) writes what it decapsulated to a pcap
    file, read back with scapy. Every message SIPp sent to or got from kx-sipd is
    there, byte for byte, with SIPp's and kx-sipd's addresses and ports."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap

    port = free_port()
    capture = tmp_path / "hep.pcap"
    sngrep = subprocess.Popen(
        [str(SNGREP), "-N", "-q", "-L", f"udp:{HOST}:{port}", "-O", str(capture)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "sngrep.log").open("wb"),
    )
    server = None
    try:
        time.sleep(0.5)  # sngrep binds its socket
        assert sngrep.poll() is None, (tmp_path / "sngrep.log").read_text()
        server = _serve(tmp_path, "anyio", "--hep", f"{HOST}:{port}")
        calls = _sipp("sngrep", "uac_call_auth.xml", server.kx.address, tmp_path, 1, "-s", "9196")
        calls.start()
        calls.wait(WAIT)
        calls.assert_ok()
        expected = calls.messages(retransmissions=True)
        assert _wait(lambda: capture.exists() and len(rdpcap(str(capture))) >= len(expected))
    finally:
        if server is not None:
            server.kx.stop()
        sngrep.send_signal(signal.SIGTERM)
        try:
            sngrep.wait(5)
        except subprocess.TimeoutExpired:
            sngrep.kill()
            sngrep.wait(5)
    packets = rdpcap(str(capture))
    seen = [
        (
            bytes(packet[UDP].payload),
            (packet[IP].src, packet[UDP].sport),
            (packet[IP].dst, packet[UDP].dport),
        )
        for packet in packets
    ]
    sipp_port = int(calls.command[calls.command.index("-p") + 1])
    ours, theirs = (HOST, server.kx.port), (HOST, sipp_port)
    for message in expected:
        key = (message.first_line, message.header("Call-ID"), message.header("CSeq"))
        ends = (theirs, ours) if message.direction == "sent" else (ours, theirs)
        found = [
            payload
            for payload, source, destination in seen
            if (source, destination) == ends and _key(payload) == key
        ]
        assert found, (key, message.direction, [_key(payload) for payload, _s, _d in seen])
    assert len(seen) >= len(expected)


def _key(payload: bytes) -> tuple[str, str | None, str | None]:
    """(first line, Call-ID, CSeq) of a SIP message as bytes."""
    head = payload.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    return head[0].strip(), fields.get("call-id"), fields.get("cseq")


class _Relay:
    """Media ports on paper: the echo call's SDP needs an allocation, no RTP flows."""

    def allocate(self, call_ref: str, *, a_peer: Address | None, echo: bool) -> MediaAllocation:
        return MediaAllocation(
            call_ref=call_ref, a_address=HOST, a_port=20000, b_address=HOST, b_port=20002
        )

    def update(
        self,
        call_ref: str,
        *,
        a_peer: Address | None,
        b_peer: Address | None,
        a_events: int | None = None,
        b_events: int | None = None,
    ) -> None:
        return None

    def release(self, call_ref: str) -> tuple[MediaStats | None, MediaStats | None]:
        return None, None

    def expired(self) -> list[tuple[str, str]]:
        return []


@needs_sipp
@pytest.mark.parametrize("engine_driver", ["anyio-asyncio", "anyio-trio", "socket"])
def test_each_driver_streams_hep_during_a_call(engine_driver: str, tmp_path: Path) -> None:
    """The same, with the engine served in this process by each driver and its HepTrace
    (what ``serve --hep`` wires), so both drivers are held to it."""
    store = Store(str(_database(tmp_path)))
    port = free_port(tcp_too=True)
    engine = Engine(
        EngineConfig(realm=store.realm, nonce_secret=store.nonce_secret, sip_address=(HOST, port)),
        entropy=os.urandom,
    )
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind((HOST, 0))
    hep = HepTrace(collector.getsockname(), agent_id=77, ours=(HOST, port))
    listen = {"listen": ((HOST, port),), "handle_signals": False}

    def call() -> Sipp:
        calls = _sipp("hep", "uac_call_auth.xml", (HOST, port), tmp_path, 1, "-s", "9196")
        calls.start()
        calls.wait(WAIT)
        calls.assert_ok()
        return calls

    try:
        if engine_driver.startswith("anyio-"):
            server = io_anyio.Server(
                engine,
                store=store,
                relay=_Relay(),
                options=io_anyio.DriverOptions(**listen),
                trace=hep,
            )
            backend = engine_driver.removeprefix("anyio-")
            with anyio.from_thread.start_blocking_portal(backend) as portal:
                future, _addresses = portal.start_task(server.serve)
                try:
                    calls = call()
                finally:
                    portal.call(server.shutdown)
                    future.result(timeout=60)
        else:
            blocking = io_socket.Server(
                engine,
                store=store,
                relay=_Relay(),
                options=io_socket.DriverOptions(**listen),
                trace=hep,
            )
            bound = threading.Event()
            thread = threading.Thread(
                target=lambda: blocking.serve(started=lambda _a: bound.set()), daemon=True
            )
            thread.start()
            assert bound.wait(WAIT)
            try:
                calls = call()
            finally:
                blocking.shutdown()
                thread.join(60)
        packets = _collect_hep(collector)
    finally:
        collector.close()
        hep.close()
        store.close()
    _check_hep(packets, calls, port, agent_id=77)
    assert hep.counters["packets"] == len(packets)
