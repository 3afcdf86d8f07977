"""Media end to end: the real ``kx-sipd serve`` with its own relay, a raw UDP
SIP client, a tiny carrier UAS, and small RTP endpoints.

What lives here, so tests/interop/test_media_e2e.py reads as call flows:

* ``MediaServer``: ``python -m kx_sipd serve`` as a subprocess on a free
  loopback port with a database made by the operator's CLI (one account, one
  carrier route), a small RTP range, a known relay secret (so the relay's
  figures can be read with ``kx-sipd relay stats``), stopped afterwards. The
  relay's control address is read from the server's ``relay.started`` log
  line, as an operator would.
* ``SipClient``: the customer's softphone as a UDP socket: INVITE, the 401
  challenge answered with digest credentials (guide §6.2), ACK, BYE, and a
  200 to a BYE from the server.
* ``Carrier``: the route's carrier as a UDP socket served by a thread: it
  answers every INVITE with 100/180/200 and an SDP naming a media port the
  test chose, takes the ACK and answers BYE.
* ``RtpEndpoint`` and ``rtp_packet``: a UDP socket sending and collecting RTP.

SIP text is written and read by hand here, independently of sansio_sip, so a
parser bug in the server cannot hide itself; only the digest arithmetic is
imported (compute_ha1, parse_challenge, answer_challenge, make_authorization).
Only 127.0.0.1 is used; every wait is bounded; every process started here is
stopped here, by its own pid.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson

from rtp_relay import RelayClient
from sansio_sip import answer_challenge, compute_ha1, make_authorization, parse_challenge

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
REALM = "sip.kx21.com"
USER = "alice"
PASSWORD = "alice-Media-Secret-1"
RELAY_SECRET = "media-e2e-relay-secret-0123456789"
START_WAIT = 40.0
CLI_WAIT = 60.0
SIP_WAIT = 10.0
RTP_WAIT = 3.0

_COMPACT = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
}


# ------------------------------------------------------------------ ports


def free_port(*, tcp_too: bool = False) -> int:
    """A loopback UDP port free right now (and free for TCP too when asked)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = int(udp.getsockname()[1])
            if not tcp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port")


RTP_PORTS = (61000, 65400)
"""Where the servers' RTP ranges are taken from: above Linux's ephemeral range
(32768-60999), so no socket bound to port 0 lands in them, and away from the
ranges the other suites and bench/relay.py use (10000-32000), whose relays and
load generators would otherwise hold or spray our ports while both run."""


def free_rtp_range(ports: int) -> tuple[int, int]:
    """``ports`` consecutive free UDP ports starting even, inside ``RTP_PORTS``."""
    for _ in range(200):
        low = random.randrange(RTP_PORTS[0], RTP_PORTS[1] - ports, 2)
        probes: list[socket.socket] = []
        try:
            for port in range(low, low + ports):
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probes.append(probe)
                probe.bind(("0.0.0.0", port))
            return low, low + ports - 1
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no free RTP port range")


# ------------------------------------------------------------------ the server


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("KX_DB", "KX_RELAY_SECRET"):
        env.pop(name, None)
    return env


def kx_cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``kx-sipd ARGS`` (with ``--db DB`` appended); a failing command fails the test."""
    result = subprocess.run(
        [sys.executable, "-m", "kx_sipd", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        env=_environment(),
        cwd=db.parent,
        timeout=CLI_WAIT,
        check=False,
    )
    assert result.returncode == 0, f"kx-sipd {' '.join(args)}: {result.stderr}"
    return result


def log_events(path: Path, name: str) -> list[dict[str, object]]:
    """The ``fields`` of every JSON log line of event ``name`` in ``path``."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("event") == name:
            fields = entry.get("fields")
            found.append(fields if isinstance(fields, dict) else {})
    return found


@attrs.define
class MediaServer:
    """A running ``kx-sipd serve`` (local relay), its database and log."""

    address: tuple[str, int]
    db: Path
    log: Path
    process: subprocess.Popen[bytes]
    rtp_range: tuple[int, int]
    control: tuple[str, int] = ("", 0)

    @property
    def port(self) -> int:
        return self.address[1]

    def stop(self, timeout: float = 20.0) -> int:
        return stop_process(self.process, timeout)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return kx_cli(self.db, *args)

    def records(self, call_id: str) -> list[dict[str, object]]:
        """``kx-sipd calls list --call-id CALL_ID --json``, parsed."""
        output = self.cli("calls", "list", "--call-id", call_id, "--json").stdout
        return [orjson.loads(line) for line in output.splitlines() if line.strip()]

    def record(self, call_id: str, *, wait: float = 8.0, media: bool = False) -> dict[str, object]:
        """The one finished record of the call with ``call_id`` (polled: a call
        ended by a timer, and the media figures attached after the relay
        released the ports, may be a moment behind the test). With ``media``,
        waits for the client leg's media figures too."""
        deadline = time.monotonic() + wait
        while True:
            found = self.records(call_id)
            if found and found[0].get("end_wall") is not None:
                assert len(found) == 1, found
                if not media or found[0].get("a_media") is not None:
                    return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no finished record for {call_id}: {found}")
            time.sleep(0.2)

    def relay_stats(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``kx-sipd relay stats --json`` against this server's relay: (shards, calls)."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "kx_sipd",
                "relay",
                "stats",
                "--json",
                "--control",
                f"{self.control[0]}:{self.control[1]}",
                "--secret",
                RELAY_SECRET,
            ],
            capture_output=True,
            text=True,
            env=_environment(),
            timeout=CLI_WAIT,
            check=False,
        )
        assert result.returncode == 0, f"kx-sipd relay stats: {result.stderr}"
        shards: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for line in result.stdout.splitlines():
            entry = orjson.loads(line)
            if "shard" in entry:
                shards.append(entry["shard"])
            else:
                calls.append({**entry["call"], "shard_index": entry["shard_index"]})
        return shards, calls

    def cli_relay_stats(self) -> str:
        """``kx-sipd relay stats`` (the text table) against this server's relay."""
        control = f"{self.control[0]}:{self.control[1]}"
        command = [sys.executable, "-m", "kx_sipd", "relay", "stats", "--control", control]
        result = subprocess.run(
            [*command, "--secret", RELAY_SECRET],
            capture_output=True,
            text=True,
            env=_environment(),
            timeout=CLI_WAIT,
            check=False,
        )
        assert result.returncode == 0, f"kx-sipd relay stats: {result.stderr}"
        return result.stdout

    def relay_call(self, a_port: int) -> dict[str, Any]:
        """The relay's figures for the call whose client-side port is ``a_port``,
        read in-process with a RelayClient (``relay_stats`` is the operator's way,
        slower for polling); an empty dict when the relay has no such call."""
        client = RelayClient(self.control, RELAY_SECRET.encode())
        try:
            for shard in client.shard_stats():
                if "error" in shard:
                    continue
                for call in client.shard_calls(int(shard["index"])):
                    if call["a_port"] == a_port:
                        return {**call, "shard_index": shard["index"]}
        finally:
            client.close()
        return {}

    def wait_media_ready(self, a_port: int, wait: float = SIP_WAIT) -> dict[str, Any]:
        """Wait until the relay knows the carrier's media address for the call on
        ``a_port`` (the server tells it after the carrier's answer); its figures."""
        deadline = time.monotonic() + wait
        while True:
            call = self.relay_call(a_port)
            if call and call["b"]["rtp"]["expected"] is not None:
                return call
            if time.monotonic() > deadline:
                raise AssertionError(f"relay never learnt the carrier's address: {call}")
            time.sleep(0.05)

    def relay_pids(self) -> tuple[int, list[int]]:
        """(supervisor pid, pids of the supervisor's children): the relay's
        processes as ``ps`` shows them, shards and the warm spare."""
        supervisors = _children(self.process.pid)
        assert len(supervisors) == 1, supervisors
        return supervisors[0], _children(supervisors[0])


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: fields follow the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def _answers_options(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(0.5)
        local = sock.getsockname()[1]
        tag = f"{random.getrandbits(64):016x}"
        sock.sendto(
            (
                f"OPTIONS sip:{REALM} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {HOST}:{local};branch=z9hG4bK{tag};rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:probe@{REALM}>;tag={tag}\r\n"
                f"To: <sip:{REALM}>\r\nCall-ID: {tag}\r\nCSeq: 1 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode(),
            (HOST, port),
        )
        try:
            return sock.recv(65535).startswith(b"SIP/2.0 200 ")
        except OSError:
            return False


def answers_options(server: MediaServer) -> bool:
    """Whether the server answers an OPTIONS with 200 (it keeps serving)."""
    return any(_answers_options(server.port) for _ in range(3))


def make_database(directory: Path, carrier_port: int) -> Path:
    """A database with the account ``alice`` routed to a carrier on ``carrier_port``."""
    db = directory / "kx.sqlite"
    kx_cli(db, "routes", "add", "carrier", "--host", HOST, "--port", str(carrier_port))
    kx_cli(db, "accounts", "add", USER, "--password", PASSWORD, "--route", "carrier")
    return db


def start_server(
    directory: Path,
    db: Path,
    *,
    rtp_ports: int = 0,
    shards: int = 1,
    media_timeout: float = 60.0,
    relay: StandaloneRelay | None = None,
) -> MediaServer:
    """``kx-sipd serve`` on free ports (retried if a port was taken meanwhile),
    with its own relay, or with ``--relay`` naming a standalone one."""
    log = directory / "kx-sipd.log"
    for _attempt in range(3):
        port = free_port(tcp_too=True)
        if relay is None:
            rtp = free_rtp_range(rtp_ports)
            media = [
                "--rtp-range", f"{rtp[0]}-{rtp[1]}",
                "--rtp-address", HOST,
                "--relay-shards", str(shards),
            ]  # fmt: skip
        else:
            rtp = relay.rtp_range
            media = ["--relay", f"{relay.control[0]}:{relay.control[1]}"]
        command = [
            sys.executable, "-m", "kx_sipd", "serve",
            "--db", str(db),
            "--listen", f"{HOST}:{port}",
            *media,
            "--media-timeout", str(media_timeout),
            "--relay-secret", RELAY_SECRET,
            "--log-level", "info",
        ]  # fmt: skip
        with log.open("ab") as sink:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=sink,
                env=_environment(),
                cwd=directory,
            )
        server = MediaServer((HOST, port), db, log, process, rtp)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline and process.poll() is None:
            if _answers_options(port):
                if relay is not None:
                    server.control = relay.control
                    return server
                started = log_events(log, "relay.started")
                assert started, log.read_text()[-4000:]
                host, control = started[-1]["control"]  # type: ignore[misc]
                server.control = (str(host), int(control))
                return server
        server.stop(timeout=5)
    raise RuntimeError("kx-sipd serve did not answer OPTIONS:\n" + log.read_text()[-4000:])


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM, ``timeout`` seconds to exit, then SIGKILL; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return int(process.returncode)


@attrs.define
class StandaloneRelay:
    """A running ``kx-sipd relay serve`` (the relay on "another host"), its log."""

    control: tuple[str, int]
    rtp_range: tuple[int, int]
    shards: int
    log: Path
    process: subprocess.Popen[bytes]

    def stop(self, timeout: float = 20.0) -> int:
        return stop_process(self.process, timeout)


def start_standalone_relay(directory: Path, *, rtp_ports: int, shards: int) -> StandaloneRelay:
    """``kx-sipd relay serve`` on a free control block and RTP range, secret from
    $KX_RELAY_SECRET (as an operator would keep it off the command line); returns
    once its ``relay.started`` line is logged."""
    from rtp_relay._supervisor import pick_control_port

    log = directory / "relay.log"
    for _attempt in range(3):
        control = (HOST, pick_control_port(HOST, shards))
        rtp = free_rtp_range(rtp_ports)
        command = [
            sys.executable, "-m", "kx_sipd", "relay", "serve",
            "--control", f"{control[0]}:{control[1]}",
            "--rtp-range", f"{rtp[0]}-{rtp[1]}",
            "--relay-shards", str(shards),
            "--media-host", HOST,
            "--rtp-address", HOST,
            "--log-level", "info",
        ]  # fmt: skip
        with log.open("ab") as sink:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=sink,
                env={**_environment(), "KX_RELAY_SECRET": RELAY_SECRET},
                cwd=directory,
            )
        relay = StandaloneRelay(control, rtp, shards, log, process)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline and process.poll() is None:
            started = log_events(log, "relay.started")
            if started and started[-1]["control"] == list(control):
                return relay
            time.sleep(0.1)
        relay.stop(timeout=5)
    raise RuntimeError("kx-sipd relay serve did not start:\n" + log.read_text()[-4000:])


SCENARIOS = Path(__file__).resolve().parent / "sipp"


@attrs.define
class SippMedia:
    """One SIPp process that also streams RTP (``rtp_stream``) from ``media_port``."""

    name: str
    media_port: int
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def messages(self) -> Path:
        return self.directory / f"{self.name}_messages.log"

    def wait(self, timeout: float) -> int:
        try:
            return int(self.process.wait(timeout))
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"SIPp {self.name} did not finish: {self.diagnostics()}") from None

    def stop(self) -> None:
        stop_process(self.process, 3.0)

    def diagnostics(self) -> str:
        parts = []
        for path in (
            self.directory / f"{self.name}_output.log",
            self.directory / f"{self.name}_errors.log",
            self.messages,
        ):
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def sdp_ports(self, start: str) -> list[int]:
        """The ``m=audio`` ports of the messages SIPp received whose first line
        starts with ``start`` (e.g. "SIP/2.0 200" or "INVITE ")."""
        text = self.messages.read_text(errors="replace").replace("\r\n", "\n")
        ports = []
        for chunk in text.split("message received")[1:]:
            # The message ends where SIPp's next "----- date" separator starts.
            body = chunk.split("\n", 1)[1].lstrip("\n").split("\n-----", 1)[0]
            if body.startswith(start):
                ports += [int(p) for p in re.findall(r"^m=audio (\d+) ", body, re.MULTILINE)]
        return ports


def free_even_port() -> int:
    """An even ephemeral loopback UDP port whose odd neighbour is free too (a SIPp
    media port: outside ``RTP_PORTS``, so never inside a relay's range)."""
    rtp, rtcp = RtpEndpoint.pair()
    rtp.close()
    rtcp.close()
    return rtp.port


def start_sipp_media(
    name: str,
    scenario: str,
    directory: Path,
    *,
    port: int,
    remote: tuple[str, int] | None = None,
    extra: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> SippMedia:
    """SIPp on ``tests/interop/sipp/<scenario>`` for one call, streaming RTP with
    ``rtp_stream`` from a media port of its own (``-mp``)."""
    sipp = shutil.which("sipp")
    assert sipp is not None
    media_port = free_even_port()
    command = [
        sipp,
        *([f"{remote[0]}:{remote[1]}"] if remote else []),
        "-sf", str(SCENARIOS / scenario),
        "-i", HOST, "-p", str(port), "-mi", HOST, "-mp", str(media_port),
        "-m", "1", "-nostdin",
        "-timeout", f"{int(timeout)}s", "-timeout_error",
        "-trace_msg", "-message_file", str(directory / f"{name}_messages.log"),
        "-trace_err", "-error_file", str(directory / f"{name}_errors.log"),
        *extra,
    ]  # fmt: skip
    with (directory / f"{name}_output.log").open("wb") as sink:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, cwd=directory
        )
    return SippMedia(name, media_port, directory, process)


def write_tone(path: Path, seconds: int = 1) -> int:
    """A raw PCMU file for SIPp's ``rtp_stream`` (8000 bytes a second); the
    number of 20 ms packets one play of it makes."""
    path.write_bytes(bytes((i * 7) & 0xFF for i in range(8000 * seconds)))
    return 50 * seconds


# ------------------------------------------------------------------ SIP text


@attrs.frozen
class SipMessage:
    """One SIP message as received: start line, headers in order, body."""

    start: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    source: tuple[str, int]

    @classmethod
    def parse(cls, data: bytes, source: tuple[str, int]) -> SipMessage:
        head, _sep, body = data.partition(b"\r\n\r\n")
        lines = head.decode("utf-8", errors="replace").split("\r\n")
        headers = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and headers:
                name, value = headers[-1]
                headers[-1] = (name, f"{value} {line.strip()}")
                continue
            name, _colon, value = line.partition(":")
            key = name.strip().lower()
            headers.append((_COMPACT.get(key, key), value.strip()))
        return cls(start=lines[0], headers=tuple(headers), body=body, source=source)

    @property
    def is_response(self) -> bool:
        return self.start.startswith("SIP/2.0 ")

    @property
    def status(self) -> int:
        return int(self.start.split()[1]) if self.is_response else 0

    @property
    def method(self) -> str:
        """The request's method, or the CSeq method of a response."""
        if self.is_response:
            return self.header("cseq").split()[-1]
        return self.start.split(" ", 1)[0]

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key == name.lower():
                return value
        return ""

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]

    @property
    def call_id(self) -> str:
        return self.header("call-id")

    @property
    def request_user(self) -> str:
        """The user part of the Request-URI (the digits a carrier is asked for)."""
        uri = self.start.split(" ")[1]
        return uri.split(":", 1)[1].split("@", 1)[0]


def tag_of(value: str) -> str | None:
    for param in value.split(";")[1:]:
        key, _eq, tag = param.partition("=")
        if key.strip().lower() == "tag":
            return tag.strip()
    return None


def contact_uri(value: str) -> str:
    if "<" in value:
        return value.split("<", 1)[1].split(">", 1)[0]
    return value.split(";", 1)[0].strip()


def response_to(
    request: SipMessage,
    status: int,
    reason: str,
    *,
    to_tag: str | None = None,
    extra: tuple[str, ...] = (),
    body: bytes = b"",
) -> bytes:
    """A response to ``request`` (RFC 3261 §8.2.6: Via, From, To, Call-ID, CSeq copied)."""
    to = request.header("to")
    if to_tag is not None and tag_of(to) is None:
        to = f"{to};tag={to_tag}"
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {via}" for via in request.all("via")]
    lines += [
        f"From: {request.header('from')}",
        f"To: {to}",
        f"Call-ID: {request.call_id}",
        f"CSeq: {request.header('cseq')}",
        *extra,
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def make_sdp(port: int, *, user: str = "phone", payloads: tuple[int, ...] = (0, 8, 101)) -> bytes:
    """An audio offer or answer on 127.0.0.1:port with PCMU, PCMA, telephone-event."""
    maps = {0: "PCMU/8000", 8: "PCMA/8000", 101: "telephone-event/8000"}
    lines = [
        "v=0",
        f"o={user} 1 1 IN IP4 {HOST}",
        "s=-",
        f"c=IN IP4 {HOST}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {' '.join(str(p) for p in payloads)}",
        *(f"a=rtpmap:{p} {maps[p]}" for p in payloads),
        *(["a=fmtp:101 0-16"] if 101 in payloads else []),
        "a=ptime:20",
        "a=sendrecv",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


@attrs.frozen
class SdpMedia:
    """The connection address, audio port and payload types of an SDP body."""

    address: str
    port: int
    payloads: tuple[int, ...]


def sdp_media(body: bytes) -> SdpMedia:
    """The first audio stream of an SDP body (a media-level c= wins over the session's)."""
    session_address = media_address = ""
    port = -1
    payloads: tuple[int, ...] = ()
    for raw in body.decode().splitlines():
        line = raw.strip()
        if line.startswith("m="):
            if port >= 0:
                break  # only the first audio stream
            parts = line.split()
            if parts[0] == "m=audio":
                port = int(parts[1])
                payloads = tuple(int(p) for p in parts[3:])
        elif line.startswith("c="):
            if port >= 0:
                media_address = line.split()[-1]
            else:
                session_address = line.split()[-1]
    return SdpMedia(address=media_address or session_address, port=port, payloads=payloads)


# ------------------------------------------------------------------ the client


def _token() -> str:
    return f"{random.getrandbits(64):016x}"


class SipClient:
    """A softphone as a UDP socket: one call at a time, driven step by step.

    Every received message is kept in ``received``; a BYE from the server is
    answered 200 whenever it is read.
    """

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = int(self.sock.getsockname()[1])
        self.received: list[SipMessage] = []
        self.byes: list[SipMessage] = []
        self.call_id = ""
        self.local_tag = ""
        self.remote_to = ""
        self.remote_target = ""
        self.cseq = 0
        self._uri = ""
        self._branch = ""
        self.ha1 = compute_ha1(USER, REALM, PASSWORD)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SipClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- wire

    def _send(self, text: str, body: bytes = b"") -> None:
        self.sock.sendto(text.encode() + body, self.server)

    def _read(self, wait: float) -> SipMessage | None:
        self.sock.settimeout(max(wait, 0.001))
        try:
            data, source = self.sock.recvfrom(65535)
        except TimeoutError:
            return None
        message = SipMessage.parse(data, source)
        self.received.append(message)
        if not message.is_response and message.method == "BYE":
            self.byes.append(message)
            self.sock.sendto(response_to(message, 200, "OK"), source)
        return message

    def expect(self, match: Callable[[SipMessage], bool], wait: float = SIP_WAIT) -> SipMessage:
        """The next message ``match`` accepts (others are kept and skipped)."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [m.start for m in self.received[-10:]]
                raise AssertionError(f"client: nothing matching within {wait} s; saw {seen}")
            message = self._read(left)
            if message is not None and match(message):
                return message

    def poll(self, wait: float) -> None:
        """Read (and keep) whatever arrives within ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            self._read(left)

    def wait_bye(self, wait: float) -> SipMessage:
        """The BYE the server sends this call (answered 200 when read)."""
        for bye in self.byes:
            if bye.call_id == self.call_id:
                return bye
        return self.expect(
            lambda m: not m.is_response and m.method == "BYE" and m.call_id == self.call_id,
            wait,
        )

    def _request(
        self,
        method: str,
        uri: str,
        *,
        cseq: int,
        branch: str,
        to: str,
        extra: tuple[str, ...] = (),
        body: bytes = b"",
    ) -> None:
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch=z9hG4bK{branch};rport",
            "Max-Forwards: 70",
            f'From: "{USER}" <sip:{USER}@{REALM}>;tag={self.local_tag}',
            f"To: {to}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            *extra,
            f"Content-Length: {len(body)}",
        ]
        self._send("\r\n".join(lines) + "\r\n\r\n", body)

    # -- a call

    def invite(self, dialed: str, sdp: bytes, *, wait: float = SIP_WAIT) -> SipMessage:
        """INVITE ``dialed``; answer the 401 (ACK it, resend with credentials);
        return the final response to the authenticated INVITE (ACKed)."""
        self.send_invite(dialed, sdp, wait=wait)
        return self.final(wait)

    def send_invite(self, dialed: str, sdp: bytes, *, wait: float = SIP_WAIT) -> None:
        """The INVITE, its 401 and ACK, and the INVITE with credentials, without
        waiting for the answer to the latter (``final`` or ``cancel`` do)."""
        self.call_id = f"{_token()}@media-e2e"
        self.local_tag = _token()[:10]
        uri = self._uri = f"sip:{dialed}@{REALM}"
        to = f"<{uri}>"
        contact = (f"Contact: <sip:{USER}@{HOST}:{self.port}>", "Content-Type: application/sdp")
        branch = _token()
        self.cseq = 1
        self._request("INVITE", uri, cseq=1, branch=branch, to=to, extra=contact, body=sdp)
        final = self._final(1, wait)
        assert final.status == 401, final.start
        self._request("ACK", uri, cseq=1, branch=branch, to=final.header("to"))
        challenge = parse_challenge(final.header("www-authenticate"))
        credentials = answer_challenge(
            challenge,
            username=USER,
            ha1=self.ha1,
            method="INVITE",
            uri=uri,
            cnonce=_token(),
        )
        self.cseq = 2
        self._branch = _token()
        self._request(
            "INVITE",
            uri,
            cseq=2,
            branch=self._branch,
            to=to,
            extra=(f"Authorization: {make_authorization(credentials)}", *contact),
            body=sdp,
        )

    def final(self, wait: float = SIP_WAIT) -> SipMessage:
        """The final response to the authenticated INVITE, ACKed (RFC 3261 §13.2.2.4
        for a 2xx, §17.1.1.3 otherwise)."""
        final = self._final(2, wait)
        if 200 <= final.status < 300:
            self.remote_to = final.header("to")
            self.remote_target = contact_uri(final.header("contact")) or self._uri
            self._request("ACK", self.remote_target, cseq=2, branch=_token(), to=self.remote_to)
        else:
            self._request("ACK", self._uri, cseq=2, branch=self._branch, to=final.header("to"))
        return final

    def cancel(self, wait: float = SIP_WAIT) -> tuple[SipMessage, SipMessage]:
        """CANCEL the pending INVITE (§9.1: same branch, same CSeq number);
        (the CANCEL's final response, the INVITE's final response)."""
        self._request("CANCEL", self._uri, cseq=2, branch=self._branch, to=f"<{self._uri}>")
        answered = self.expect(
            lambda m: (
                m.is_response
                and m.status >= 200
                and m.call_id == self.call_id
                and m.header("cseq") == "2 CANCEL"
            ),
            wait,
        )
        return answered, self.final(wait)

    def _final(self, cseq: int, wait: float) -> SipMessage:
        return self.expect(
            lambda m: (
                m.is_response
                and m.status >= 200
                and m.call_id == self.call_id
                and m.header("cseq") == f"{cseq} INVITE"
            ),
            wait,
        )

    def bye(self, wait: float = SIP_WAIT) -> SipMessage:
        """Hang up; the final response to the BYE."""
        self.cseq += 1
        cseq = self.cseq
        self._request("BYE", self.remote_target, cseq=cseq, branch=_token(), to=self.remote_to)
        return self.expect(
            lambda m: (
                m.is_response
                and m.status >= 200
                and m.call_id == self.call_id
                and m.header("cseq") == f"{cseq} BYE"
            ),
            wait,
        )


# ------------------------------------------------------------------ the carrier


@attrs.define
class CarrierCall:
    """What the carrier saw of one call (keyed by the digits it was asked for)."""

    invite: SipMessage
    answer: bytes
    tag: str
    acked: bool = False
    bye: SipMessage | None = None
    cancelled: bool = False


class Carrier:
    """The route's carrier: answers each INVITE 100/180/200 with an SDP naming
    the media port registered for its digits (``expect``), in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self.media_ports: dict[str, int] = {}
        self.ring_only: set[str] = set()
        self.calls: dict[str, CarrierCall] = {}
        self.unexpected: list[str] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="carrier", daemon=True)

    def start(self) -> Carrier:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def expect(self, digits: str, media_port: int, *, answer: bool = True) -> None:
        """Answer an INVITE for ``digits`` with media on 127.0.0.1:``media_port``
        (or, without ``answer``, only ring until it is cancelled)."""
        with self._changed:
            self.media_ports[digits] = media_port
            if not answer:
                self.ring_only.add(digits)

    def wait(
        self, digits: str, done: Callable[[CarrierCall], bool], wait: float = SIP_WAIT
    ) -> CarrierCall:
        """The call for ``digits`` once ``done`` holds for it (bounded by ``wait``)."""
        deadline = time.monotonic() + wait
        with self._changed:
            while True:
                call = self.calls.get(digits)
                if call is not None and done(call):
                    return call
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"carrier: call {digits} not as expected: {call}")
                self._changed.wait(left)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            message = SipMessage.parse(data, source)
            with self._changed:
                self._handle(message, source)
                self._changed.notify_all()

    def _call_of(self, message: SipMessage) -> CarrierCall | None:
        for call in self.calls.values():
            if call.invite.call_id == message.call_id:
                return call
        return None

    def _handle(self, message: SipMessage, source: tuple[str, int]) -> None:
        if message.is_response:
            return
        method = message.method
        call = self._call_of(message)
        if method == "INVITE":
            if call is not None:  # a retransmission: the same final answer again
                self.sock.sendto(call.answer, source)
                return
            digits = message.request_user
            port = self.media_ports.get(digits)
            if port is None:
                self.unexpected.append(message.start)
                self.sock.sendto(response_to(message, 404, "Not Found", to_tag="c0"), source)
                return
            tag = _token()[:8]
            contact = f"Contact: <sip:carrier@{HOST}:{self.port}>"
            self.sock.sendto(response_to(message, 100, "Trying"), source)
            ringing = response_to(message, 180, "Ringing", to_tag=tag, extra=(contact,))
            self.sock.sendto(ringing, source)
            if digits in self.ring_only:
                self.calls[digits] = CarrierCall(invite=message, answer=ringing, tag=tag)
                return
            answer = response_to(
                message,
                200,
                "OK",
                to_tag=tag,
                extra=(contact, "Content-Type: application/sdp"),
                body=make_sdp(port, user="carrier", payloads=(0, 101)),
            )
            self.calls[digits] = CarrierCall(invite=message, answer=answer, tag=tag)
            self.sock.sendto(answer, source)
        elif method == "CANCEL":
            self.sock.sendto(response_to(message, 200, "OK"), source)
            if call is not None and not call.cancelled:
                call.cancelled = True
                call.answer = response_to(call.invite, 487, "Request Terminated", to_tag=call.tag)
                self.sock.sendto(call.answer, source)
        elif method == "ACK":
            if call is not None:
                call.acked = True
        elif method == "BYE":
            if call is not None:
                call.bye = message
            self.sock.sendto(response_to(message, 200, "OK"), source)
        else:
            self.unexpected.append(message.start)
            self.sock.sendto(response_to(message, 405, "Method Not Allowed"), source)


# ------------------------------------------------------------------ RTP

PCMU = 0
TELEPHONE_EVENT = 101


def rtp_packet(
    seq: int,
    *,
    ts: int,
    ssrc: int,
    pt: int = PCMU,
    marker: bool = False,
    payload: bytes = b"\xff" * 160,
) -> bytes:
    """An RTP packet (RFC 3550 §5.1, version 2, no CSRC, no extension)."""
    second = pt | (0x80 if marker else 0)
    header = struct.pack("!BBHII", 0x80, second, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
    return header + payload


def rtcp_receiver_report(ssrc: int) -> bytes:
    """An RTCP receiver report without report blocks (RFC 3550 §6.4.2)."""
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


def dtmf_packets(digit: int, *, seq: int, ts: int, ssrc: int) -> list[bytes]:
    """One RFC 4733 event as a sender emits it (§2.5): the first packet with the
    marker bit, growing durations, three end packets; one timestamp throughout."""
    packets = []
    durations = [160, 320, 480, 640]
    for index, duration in enumerate(durations):
        payload = struct.pack("!BBH", digit, 10, duration)  # E=0, volume 10
        packets.append(
            rtp_packet(
                seq + index,
                ts=ts,
                ssrc=ssrc,
                pt=TELEPHONE_EVENT,
                marker=index == 0,
                payload=payload,
            )
        )
    end = struct.pack("!BBH", digit, 0x80 | 10, 800)  # E=1
    for repeat in range(3):
        packets.append(
            rtp_packet(
                seq + len(durations) + repeat, ts=ts, ssrc=ssrc, pt=TELEPHONE_EVENT, payload=end
            )
        )
    return packets


class RtpEndpoint:
    """A UDP socket on loopback standing in for one side's media."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((HOST, port))
        except OSError:
            self.sock.close()
            raise
        self.address: tuple[str, int] = self.sock.getsockname()
        self.port = self.address[1]

    @classmethod
    def pair(cls) -> tuple[RtpEndpoint, RtpEndpoint]:
        """An RTP socket on an even port and its RTCP socket on the next one."""
        for _ in range(100):
            rtp = cls()
            if rtp.port % 2 == 0:
                try:
                    return rtp, cls(rtp.port + 1)
                except OSError:
                    pass
            rtp.close()
        raise RuntimeError("no free even/odd port pair")

    def __enter__(self) -> RtpEndpoint:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        self.sock.sendto(data, to)

    def recv(self, wait: float = RTP_WAIT) -> tuple[bytes, tuple[str, int]] | None:
        """One datagram and its source, or None after ``wait`` seconds (0: don't wait)."""
        self.sock.settimeout(wait if wait > 0 else 0.0)
        try:
            return self.sock.recvfrom(65535)
        except (TimeoutError, BlockingIOError):
            return None

    def collect(self, count: int, wait: float = RTP_WAIT) -> list[tuple[bytes, tuple[str, int]]]:
        """Up to ``count`` datagrams with their sources, stopping after ``wait``
        seconds of silence."""
        got: list[tuple[bytes, tuple[str, int]]] = []
        while len(got) < count:
            item = self.recv(wait)
            if item is None:
                break
            got.append(item)
        return got

    def drain(self, quiet: float = 0.3) -> list[bytes]:
        """Whatever arrives until ``quiet`` seconds pass with nothing (0: what is
        queued now)."""
        got: list[bytes] = []
        for _ in range(100_000):
            item = self.recv(quiet)
            if item is None:
                break
            got.append(item[0])
        return got

    def close(self) -> None:
        self.sock.close()
