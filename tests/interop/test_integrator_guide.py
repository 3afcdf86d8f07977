"""docs/integrator-guide.md, checked against a running ``kx-sipd serve``.

The page's tables are read from the markdown (connection parameters, the
firewall table, the error table), so the page and this test cannot drift: a
row added to the error table without a way to provoke it here fails
``test_every_error_row_has_a_check``, and each row's code and reason phrase
must be what kx-sipd sends on the wire.

The SIP client is written out here (requests as text, RFC 2617 digests with
hashlib) so the server is checked the way a softphone sees it, not through the
engine's own parsers. A small UDP "carrier" behind the account's route answers
by the first digits of the number dialed: 486… busy, 302… redirect, 407… a
challenge, anything else silence.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from kx_sipd.settings import DEFAULT_REALM, ServerSettings
from kx_sipd.store import Store
from sansio_sip import EngineConfig, Route

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "integrator-guide.md"
PAGE = GUIDE.read_text(encoding="utf-8")
WAIT = 5.0

PASSWORD = "correct horse"
ACCOUNTS = {
    # username: Store.add_account keyword arguments
    "acme": {"route": "carrier"},
    "limited": {"route": "carrier", "allowed_prefixes": ("1",), "max_calls": 1},
    "noroute": {},
    "paused": {"route": "carrier"},
    "rotate": {"route": "carrier"},
    "office": {"route": "carrier", "allowed_sources": ("192.0.2.0/24",)},
    "shared": {"route": "carrier"},
}
SECOND_DEVICE = "127.0.0.2"  # another loopback address: another device to the server


# -- reading the page ------------------------------------------------------------


def table(heading: str) -> list[dict[str, str]]:
    """The first table under the ``## …`` heading that starts with ``heading``."""
    start = PAGE.index("\n## " + heading) + 1
    lines = PAGE[start:].splitlines()[1:]
    rows: list[list[str]] = []
    for line in lines:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, f"no table under {heading!r}"
    header, _rule, *body = rows
    return [dict(zip(header, row, strict=True)) for row in body]


PARAMETERS = {row["Parameter"]: row["Value"] for row in table("2. Connection parameters")}
REALM = PARAMETERS["Authentication Realm"].split()[0]
ECHO = PARAMETERS["Echo test number"]
ERROR_ROWS = [
    (int(row["Code"].split(" ", 1)[0]), row["Code"].split(" ", 1)[1])
    for row in table("9. Error codes")
]


def port_range(text: str) -> tuple[int, int]:
    match = re.search(r"(\d+)\s*[–-]\s*(\d+)", text)
    assert match is not None, text
    return int(match.group(1)), int(match.group(2))


def allowed_methods_on_page() -> set[str]:
    match = re.search(r"Only these SIP methods are accepted: ([A-Z, \n]+)\.", PAGE)
    assert match is not None, "§8 no longer lists the accepted methods"
    return {method.strip() for method in match.group(1).replace("\n", " ").split(",")}


# -- a SIP client, written out -----------------------------------------------------


@attrs.frozen
class Response:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def parse_response(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    _version, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = tuple(
        (name.strip(), value.strip())
        for name, _, value in (line.partition(":") for line in lines[1:])
    )
    return Response(int(status), reason, headers, body)


def digest_params(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    assert scheme == "Digest", header
    return {
        name.strip().lower(): value.strip().strip('"')
        for name, _, value in (part.partition("=") for part in re.split(r",\s*(?=\w+=)", rest))
    }


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def authorization(user: str, password: str, method: str, uri: str, challenge: Response) -> str:
    """RFC 2617 §3.2.2 with qop=auth, as a softphone computes it (realm from the 401)."""
    params = digest_params(challenge.header("WWW-Authenticate") or "")
    realm, nonce = params["realm"], params["nonce"]
    cnonce = f"{random.getrandbits(32):08x}"
    ha1 = md5(f"{user}:{realm}:{password}")
    response = md5(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{md5(f'{method}:{uri}')}")
    return (
        f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
        f'response="{response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="{cnonce}"'
    )


def offer(rtp: tuple[str, int], formats: str = "96 0 8 101") -> bytes:
    host, port = rtp
    return (
        "v=0\r\n"
        f"o=guide 1 1 IN IP4 {host}\r\n"
        "s=-\r\n"
        f"c=IN IP4 {host}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/AVP {formats}\r\n"
        "a=rtpmap:96 opus/48000/2\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:8 PCMA/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-16\r\n"
        "a=sendrecv\r\n"
    ).encode()


class Phone:
    """One softphone: a UDP (or TCP) SIP socket and an RTP socket."""

    def __init__(
        self,
        server: tuple[str, int],
        user: str,
        transport: str = "udp",
        *,
        host: str = "127.0.0.1",
        public: tuple[str, int] | None = None,
    ) -> None:
        """``host``: the address the phone's sockets are bound to; ``public``: the
        address it writes in Via, Contact and SDP instead (what STUN told it)."""
        self.server, self.user, self.transport = server, user, transport
        if transport == "udp":
            self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sip.bind((host, 0))
        else:
            self.sip = socket.create_connection(server, timeout=WAIT, source_address=(host, 0))
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind((host, 0))
        self.local = public or self.sip.getsockname()[:2]
        self.rtp_address = (public[0], public[1] + 2) if public else self.rtp.getsockname()[:2]
        self.buffer = b""
        self.tag = f"{random.getrandbits(32):08x}"
        self.cseq = 0

    def close(self) -> None:
        self.sip.close()
        self.rtp.close()

    def __enter__(self) -> Phone:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        uri: str,
        *,
        call_id: str,
        cseq: int | None = None,
        branch: str | None = None,
        to_tag: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
    ) -> tuple[bytes, str]:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        branch = branch or f"z9hG4bK{random.getrandbits(48):012x}"
        host, port = self.local
        to = f"<sip:{self.user}@{REALM}>" + (f";tag={to_tag}" if to_tag else "")
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/{self.transport.upper()} {host}:{port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:{self.user}@{REALM}>;tag={self.tag}",
            f"To: {to}",
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:{self.user}@{host}:{port};transport={self.transport}>",
            "User-Agent: integrator-guide-test",
            *(f"{name}: {value}" for name, value in headers),
            *(["Content-Type: application/sdp"] if body else []),
            f"Content-Length: {len(body)}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body, branch

    def send(self, data: bytes) -> None:
        if self.transport == "udp":
            self.sip.sendto(data, self.server)
        else:
            self.sip.sendall(data)

    def receive(self, timeout: float = WAIT) -> Response | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sip.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if self.transport == "udp":
                    data = self.sip.recv(65535)
                else:
                    if b"\r\n\r\n" not in self.buffer:
                        self.buffer += self.sip.recv(65535)
                        continue
                    head, _, rest = self.buffer.partition(b"\r\n\r\n")
                    length = int(re.search(rb"Content-Length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                    if len(rest) < length:
                        self.buffer += self.sip.recv(65535)
                        continue
                    data, self.buffer = head + b"\r\n\r\n" + rest[:length], rest[length:]
            except TimeoutError:
                return None
            if data.startswith(b"SIP/2.0 "):
                return parse_response(data)
            # A request from the server (a BYE, say): not what these checks wait for.
        return None

    def final(self, data: bytes, timeout: float = WAIT) -> tuple[list[Response], Response]:
        """Send a request; its provisional responses and its final one. Responses to
        other requests (a retransmitted final answer of an earlier one) are skipped."""
        self.send(data)
        cseq = re.search(rb"\r\nCSeq: ([^\r]+)\r\n", data).group(1).decode()  # type: ignore[union-attr]
        call_id = re.search(rb"\r\nCall-ID: ([^\r]+)\r\n", data).group(1).decode()  # type: ignore[union-attr]
        provisional = []
        deadline = time.monotonic() + timeout
        while True:
            response = self.receive(max(0.0, deadline - time.monotonic()))
            assert response is not None, "no final response to:\n" + data.decode(errors="replace")
            if (response.header("CSeq"), response.header("Call-ID")) != (cseq, call_id):
                continue
            if response.status >= 200:
                return provisional, response
            provisional.append(response)


@attrs.define
class Call:
    phone: Phone
    uri: str
    call_id: str
    branch: str
    cseq: int
    challenge: Response
    provisional: list[Response]
    final: Response

    @property
    def to_tag(self) -> str:
        match = re.search(r";tag=([^;>\s]+)", self.final.header("To") or "")
        assert match is not None, self.final
        return match.group(1)

    def ack(self) -> None:
        """ACK the final answer: hop-by-hop for a failure (same branch), end-to-end for 2xx."""
        same = self.final.status >= 300
        data, _ = self.phone.request(
            "ACK",
            self.uri,
            call_id=self.call_id,
            cseq=self.cseq,
            branch=self.branch if same else None,
            to_tag=self.to_tag,
        )
        self.phone.send(data)

    def bye(self) -> Response:
        data, _ = self.phone.request("BYE", self.uri, call_id=self.call_id, to_tag=self.to_tag)
        return self.phone.final(data)[1]


def invite(
    phone: Phone,
    number: str | None,
    password: str = PASSWORD,
    *,
    body: bytes | None = None,
    timeout: float = WAIT,
    wait_final: bool = True,
) -> Call:
    """INVITE, answer the 401, return the call with its final answer (ACKed)."""
    uri = f"sip:{number}@{REALM}" if number else f"sip:{REALM}"
    call_id = f"{random.getrandbits(64):016x}@guide"
    sdp = offer(phone.rtp_address) if body is None else body
    data, first_branch = phone.request("INVITE", uri, call_id=call_id, body=sdp)
    _, challenge = phone.final(data)
    assert (challenge.status, challenge.reason) == (401, "Unauthorized"), challenge
    Call(phone, uri, call_id, first_branch, phone.cseq, challenge, [], challenge).ack()
    credentials = authorization(phone.user, password, "INVITE", uri, challenge)
    data, branch = phone.request(
        "INVITE", uri, call_id=call_id, headers=(("Authorization", credentials),), body=sdp
    )
    call = Call(phone, uri, call_id, branch, phone.cseq, challenge, [], challenge)
    if not wait_final:
        phone.send(data)
        return call
    call.provisional, call.final = phone.final(data, timeout)
    call.ack()
    return call


def register(phone: Phone, password: str = PASSWORD, expires: int = 300) -> Response:
    uri = f"sip:{REALM}"
    call_id = f"{random.getrandbits(64):016x}@guide"
    data, _ = phone.request("REGISTER", uri, call_id=call_id, headers=(("Expires", str(expires)),))
    _, challenge = phone.final(data)
    assert challenge.status == 401, challenge
    credentials = authorization(phone.user, password, "REGISTER", uri, challenge)
    data, _ = phone.request(
        "REGISTER",
        uri,
        call_id=call_id,
        headers=(("Expires", str(expires)), ("Authorization", credentials)),
    )
    return phone.final(data)[1]


# -- the carrier behind the route ---------------------------------------------------


CARRIER_ANSWERS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "486": ("486 Busy Here", ()),
    "302": ("302 Moved Temporarily", (("Contact", "<sip:elsewhere@192.0.2.1>"),)),
    "407": (
        "407 Proxy Authentication Required",
        (("Proxy-Authenticate", 'Digest realm="carrier", nonce="abc", algorithm=MD5'),),
    ),
}


class Carrier(threading.Thread):
    """Answers INVITEs by the number's first digits; answers CANCEL and BYE."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()[:2]
        self.running = True
        self.invites: dict[str, bytes] = {}  # Call-ID -> the INVITE still unanswered

    def run(self) -> None:
        while self.running:
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if data.startswith(b"SIP/2.0") or not data.strip():
                continue
            self.handle(data, source)

    def handle(self, data: bytes, source: tuple[str, int]) -> None:
        head = data.partition(b"\r\n\r\n")[0].decode(errors="replace")
        method, uri = head.split(" ", 2)[:2]
        call_id = re.search(r"(?im)^(?:call-id|i):\s*(\S+)", head)
        key = call_id.group(1) if call_id else ""
        if method == "INVITE":
            number = re.sub(r"^sips?:", "", uri).split("@", 1)[0]
            answer = CARRIER_ANSWERS.get(number[:3])
            if answer is None:
                self.invites[key] = data  # silence: no 100, nothing
                return
            self.reply(data, source, *answer)
        elif method == "CANCEL":
            self.reply(data, source, "200 OK", ())
            pending = self.invites.pop(key, None)
            if pending is not None:
                self.reply(pending, source, "487 Request Terminated", ())
        elif method in ("BYE", "OPTIONS"):
            self.reply(data, source, "200 OK", ())

    def reply(
        self,
        request: bytes,
        destination: tuple[str, int],
        status: str,
        extra: tuple[tuple[str, str], ...],
    ) -> None:
        head = request.partition(b"\r\n\r\n")[0].decode(errors="replace").split("\r\n")
        copied = [
            line
            for line in head[1:]
            if line.split(":", 1)[0].strip().lower()
            in ("via", "v", "from", "f", "call-id", "i", "cseq")
        ]
        to = next(line for line in head[1:] if line.split(":", 1)[0].strip().lower() in ("to", "t"))
        if ";tag=" not in to:
            to += ";tag=carrier"
        lines = [
            f"SIP/2.0 {status}",
            *copied,
            to,
            *(f"{n}: {v}" for n, v in extra),
            "Content-Length: 0",
        ]
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), destination)

    def stop(self) -> None:
        self.running = False
        self.join(timeout=2)
        self.sock.close()


# -- the server ---------------------------------------------------------------------


@attrs.define
class Server:
    address: tuple[str, int]
    db: Path
    rtp_range: tuple[int, int]
    process: subprocess.Popen[bytes]
    log: Path

    def cli(self, *args: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "kx_sipd", *args, "--db", str(self.db)],
            capture_output=True,
            env=environment(),
            timeout=60,
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("KX_DB", None)
    return env


def free_sip_port() -> int:
    """A loopback port free for UDP and TCP, below the ephemeral range."""
    for _ in range(200):
        port = random.randrange(10000, 20000)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            try:
                udp.bind(("127.0.0.1", port))
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port")


def free_rtp_range() -> tuple[int, int]:
    """Four free UDP ports (two RTP/RTCP pairs: one call through a carrier, or two echo
    calls), so that running out of relay ports is easy to provoke."""
    for _ in range(200):
        low = random.randrange(20000, 30000, 2)
        sockets = []
        try:
            for port in range(low, low + 4):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return low, low + 3
    raise RuntimeError("no free RTP ports")


def answers_options(address: tuple[str, int]) -> bool:
    with Phone(address, "probe") as phone:
        data, _ = phone.request("OPTIONS", f"sip:{REALM}", call_id="probe")
        phone.send(data)
        response = phone.receive(timeout=0.5)
        return response is not None and response.status == 200


@pytest.fixture(scope="module")
def carrier() -> Iterator[Carrier]:
    carrier = Carrier()
    carrier.start()
    yield carrier
    carrier.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, carrier: Carrier) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("integrator-guide")
    db = directory / "kx.sqlite"
    with Store(db) as store:
        host, port = carrier.address
        store.put_route(Route(name="carrier", host=host, port=port))
        for user, options in ACCOUNTS.items():
            store.add_account(user, PASSWORD, **options)  # type: ignore[arg-type]
        store.set_active("paused", False)
    for _attempt in range(3):
        address = ("127.0.0.1", free_sip_port())
        rtp_range = free_rtp_range()
        log = directory / "server.log"
        command = [
            sys.executable, "-m", "kx_sipd", "serve",
            "--db", str(db),
            "--listen", f"{address[0]}:{address[1]}",
            "--rtp-range", f"{rtp_range[0]}-{rtp_range[1]}",
            "--relay-shards", "1",
            "--rtp-address", "127.0.0.1",
            "--ban-failures", "1000",  # every test client shares 127.0.0.1
            "--one-device-per-account",  # the operator's option behind one §9 row
        ]  # fmt: skip
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                env=environment(), cwd=directory,
            )  # fmt: skip
        running = Server(address, db, rtp_range, process, log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            if answers_options(address):
                break
        else:
            stop(process)
            continue
        try:
            yield running
        finally:
            stop(process)
        return
    pytest.fail("kx-sipd serve did not start:\n" + log.read_text(errors="replace")[-3000:])


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(WAIT)


# -- §2 connection parameters, §7 firewall --------------------------------------------


def test_the_parameters_are_the_servers_defaults() -> None:
    defaults = ServerSettings()
    assert int(PARAMETERS["SIP Port"]) == defaults.listen[0][1]
    assert port_range(PARAMETERS["RTP Port Range"]) == defaults.rtp_range
    assert defaults.echo_number == ECHO
    assert DEFAULT_REALM == REALM == PARAMETERS["SIP Server / Domain"]
    assert PARAMETERS["Outbound Proxy"] == f"{REALM}:{PARAMETERS['SIP Port']}"


def test_the_firewall_table_matches_the_parameters() -> None:
    rows = table("7. Network requirements")
    sip = [row for row in rows if "RTP" not in row["Remote port"] + row["Local port"]]
    rtp = [row for row in rows if row not in sip]
    assert [row["Remote port"] for row in sip] == [PARAMETERS["SIP Port"]]
    rtp_range = port_range(PARAMETERS["RTP Port Range"])
    for row in rtp:
        assert port_range(row["Remote port"] + row["Local port"]) == rtp_range


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_both_transports_are_served(server: Server, transport: str) -> None:
    assert PARAMETERS["Transport"] == "UDP (preferred) or TCP"
    with Phone(server.address, "acme", transport) as phone:
        data, _ = phone.request("OPTIONS", f"sip:{REALM}", call_id=f"options-{transport}")
        assert phone.final(data)[1].status == 200
        assert register(phone).status == 200


def test_the_401_announces_the_realm_and_md5(server: Server) -> None:
    with Phone(server.address, "acme") as phone:
        data, _ = phone.request("REGISTER", f"sip:{REALM}", call_id="realm")
        _, answer = phone.final(data)
    assert (answer.status, answer.reason) == (401, "Unauthorized")
    params = digest_params(answer.header("WWW-Authenticate") or "")
    assert params["realm"] == REALM
    assert PARAMETERS["Auth Method"].startswith("Digest MD5")
    assert params["algorithm"] == "MD5"


# -- §6 verification, §8 behaviour ------------------------------------------------------


def test_registration_grants_at_most_the_documented_expiry(server: Server) -> None:
    granted = int(re.search(r"granting at most (\d+)", PAGE).group(1))  # type: ignore[union-attr]
    assert "Register expires     : 300 seconds (recommended)" in PAGE
    with Phone(server.address, "acme") as phone:
        for asked, expected in ((300, 300), (3600, granted)):
            answer = register(phone, expires=asked)
            assert answer.status == 200
            assert f"expires={expected}" in (answer.header("Contact") or ""), answer


def test_the_echo_test_answers_and_sends_the_audio_back(server: Server) -> None:
    with Phone(server.address, "acme") as phone:
        call = invite(phone, ECHO)
        assert (call.final.status, call.final.reason) == (200, "OK"), call.final
        assert [r.status for r in call.provisional][:1] == [100]
        sdp = call.final.body.decode()
        media = re.search(r"m=audio (\d+) RTP/AVP ([\d ]+)", sdp)
        address = re.search(r"c=IN IP4 (\S+)", sdp)
        assert media is not None and address is not None, sdp
        port = int(media.group(1))
        assert server.rtp_range[0] <= port <= server.rtp_range[1]
        formats = set(media.group(2).split())
        assert formats <= {"0", "8", "101"} and formats & {"0", "8"}, sdp  # G.711 + DTMF
        assert "101" in formats, "telephone-event (RFC 2833/4733) must survive"
        phone.rtp.settimeout(0.2)
        echoed = 0
        for sequence in range(50):
            packet = struct.pack("!BBHII", 0x80, 0, sequence, sequence * 160, 0x1234) + bytes(160)
            phone.rtp.sendto(packet, (address.group(1), port))
            try:
                if phone.rtp.recv(2048)[12:] == bytes(160):
                    echoed += 1
            except TimeoutError:
                pass
            if echoed >= 3:
                break
        assert echoed >= 3, "the echo test sent no audio back"
        assert call.bye().status == 200


def test_every_invite_is_authenticated_with_a_fresh_nonce(server: Server) -> None:
    with Phone(server.address, "acme") as phone:
        assert register(phone).status == 200
        call = invite(phone, ECHO)  # challenged although registered (invite() checks the 401)
        assert call.final.status == 200
        assert call.bye().status == 200
        # The nonce that call used, on a new INVITE: refused, with a fresh challenge.
        credentials = authorization("acme", PASSWORD, "INVITE", call.uri, call.challenge)
        data, _ = phone.request(
            "INVITE", call.uri, call_id="replay@guide",
            headers=(("Authorization", credentials),), body=offer(phone.rtp_address),
        )  # fmt: skip
        _, answer = phone.final(data)
        assert (answer.status, answer.reason) == (401, "Unauthorized")
        assert (
            digest_params(answer.header("WWW-Authenticate") or "")["nonce"]
            != digest_params(call.challenge.header("WWW-Authenticate") or "")["nonce"]
        )


def test_a_password_change_fails_the_next_call_without_reregistering(server: Server) -> None:
    with Phone(server.address, "rotate") as phone:
        assert register(phone).status == 200
        server.cli("accounts", "passwd", "rotate", "--password", "a new password")
        call = invite(phone, ECHO)
        assert (call.final.status, call.final.reason) == (403, "Bad credentials")
        call = invite(phone, ECHO, "a new password")
        assert call.final.status == 200
        assert call.bye().status == 200


def test_the_allowed_methods_are_the_documented_ones(server: Server) -> None:
    documented = allowed_methods_on_page()
    with Phone(server.address, "acme") as phone:
        data, _ = phone.request("OPTIONS", f"sip:{REALM}", call_id="allow")
        allow = phone.final(data)[1].header("Allow") or ""
    assert {method.strip() for method in allow.split(",")} == documented


def test_behind_nat_or_with_stun_sip_and_audio_follow_the_packets(server: Server) -> None:
    """§7: a phone that writes another address in Via, Contact and SDP (a public one
    learnt from STUN, or a private one behind NAT) gets its answers and its audio
    where its packets come from."""
    public = ("203.0.113.9", 40000)  # nothing here: only the phone's real socket answers
    with Phone(server.address, "acme", public=public) as phone:
        assert register(phone).status == 200
        call = invite(phone, ECHO)
        assert call.final.status == 200, call.final
        sdp = call.final.body.decode()
        media = re.search(r"m=audio (\d+) ", sdp)
        address = re.search(r"c=IN IP4 (\S+)", sdp)
        assert media is not None and address is not None, sdp
        relay = (address.group(1), int(media.group(1)))
        phone.rtp.settimeout(0.2)
        echoed = 0
        for sequence in range(50):
            payload = bytes([sequence]) * 160
            phone.rtp.sendto(
                struct.pack("!BBHII", 0x80, 0, sequence, sequence * 160, 0x4321) + payload, relay
            )
            try:
                if phone.rtp.recv(2048)[12:] == payload:
                    echoed += 1
            except TimeoutError:
                pass
            if echoed >= 3:
                break
        assert echoed >= 3, "no audio came back to the phone's real RTP socket"
        assert call.bye().status == 200


def test_the_operator_options_named_on_the_page_exist() -> None:
    options = {f"--{name.replace('_', '-')}" for name in attrs.fields_dict(ServerSettings)}
    named = set(re.findall(r"`(--[a-z-]+)`", PAGE[: PAGE.index("## 1.")]))
    assert named == {"--realm", "--uniform-auth-failures", "--one-device-per-account"}
    assert named <= options


def test_ban_figures_are_the_defaults() -> None:
    defaults = ServerSettings()
    text = re.search(r"\((\d+) within a minute\) block\s+that address for (\d+) minutes", PAGE)
    assert text is not None, "§8 no longer states the ban figures"
    assert (int(text.group(1)), int(text.group(2)) * 60) == (
        defaults.ban_failures,
        defaults.ban_time,
    )
    assert defaults.ban_window == 60


# -- §9 the error table -----------------------------------------------------------------


def provoke_401(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "acme") as phone:
        data, _ = phone.request("REGISTER", f"sip:{REALM}", call_id="e401")
        return [phone.final(data)[1]]


def provoke_unknown_user(server: Server, carrier: Carrier) -> list[Response]:
    answers = []
    for user in ("nobody", "paused"):  # unknown, and suspended
        with Phone(server.address, user) as phone:
            answers.append(register(phone))
    return answers


def provoke_bad_credentials(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "acme") as phone:
        return [register(phone, "wrong password"), invite(phone, ECHO, "wrong password").final]


def provoke_destination_not_allowed(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "limited") as phone:
        return [invite(phone, "525512345678").final]


def provoke_no_route(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "noroute") as phone:
        return [invite(phone, "17752180264").final]


def provoke_source_not_allowed(server: Server, carrier: Carrier) -> list[Response]:
    # "office" may connect from 192.0.2.0/24 only; this phone is on 127.0.0.1.
    with Phone(server.address, "office") as phone:
        return [register(phone), invite(phone, ECHO).final]


def provoke_second_device(server: Server, carrier: Carrier) -> list[Response]:
    silent = int(
        re.search(r"silent for (\d+) seconds", PAGE).group(1)  # type: ignore[union-attr]
    )
    assert silent == attrs.fields(EngineConfig).register_expires.default  # the device interval
    with (
        Phone(server.address, "shared") as first,
        Phone(server.address, "shared", host=SECOND_DEVICE) as second,
    ):
        assert register(first).status == 200
        answers = [register(second), invite(second, ECHO).final]
        # The first device is not disturbed.
        call = invite(first, ECHO)
        assert call.final.status == 200, call.final
        assert call.bye().status == 200
        return answers


def provoke_call_limit(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "limited") as first, Phone(server.address, "limited") as second:
        up = invite(first, ECHO)
        assert up.final.status == 200, up.final
        try:
            return [invite(second, ECHO).final]
        finally:
            assert up.bye().status == 200


def provoke_405(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "acme") as phone:
        data, _ = phone.request("MESSAGE", f"sip:{REALM}", call_id="e405")
        answer = phone.final(data)[1]
    allow = {method.strip() for method in (answer.header("Allow") or "").split(",")}
    assert allow == allowed_methods_on_page()
    return [answer]


def provoke_408(server: Server, carrier: Carrier) -> list[Response]:
    # The carrier stays silent: Timer B (64 x T1 = 32 s) ends the B-leg.
    with Phone(server.address, "acme") as phone:
        call = invite(phone, "17752180264", timeout=60)
        assert [r.status for r in call.provisional][:1] == [100]
        return [call.final]


def provoke_480(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "acme") as phone:
        return [invite(phone, "3025551212").final]


def provoke_484(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "acme") as phone:
        return [invite(phone, None).final]


def provoke_486(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "acme") as phone:
        return [invite(phone, "4865551212").final]


def provoke_487(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "acme") as phone:
        call = invite(phone, "18005551212", wait_final=False)
        trying = phone.receive()
        assert trying is not None and trying.status == 100, trying
        data, _ = phone.request(
            "CANCEL", call.uri, call_id=call.call_id, cseq=call.cseq, branch=call.branch
        )
        phone.send(data)
        answers = [phone.receive(), phone.receive()]
        assert all(answer is not None for answer in answers), answers
        by_method = {answer.header("CSeq").split()[1]: answer for answer in answers if answer}  # type: ignore[union-attr]
        assert by_method["CANCEL"].status == 200
        call.final = by_method["INVITE"]
        call.ack()
        return [call.final]


def provoke_488(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "acme") as phone:
        opus_only = offer(phone.rtp_address, "96")
        return [invite(phone, ECHO, body=opus_only).final, invite(phone, ECHO, body=b"").final]


def provoke_503_backend(server: Server, carrier: Carrier) -> list[Response]:
    break_accounts(server.db, broken=True)
    try:
        with Phone(server.address, "acme") as phone:
            data, _ = phone.request("REGISTER", f"sip:{REALM}", call_id="e503")
            _, challenge = phone.final(data)
            credentials = authorization("acme", PASSWORD, "REGISTER", f"sip:{REALM}", challenge)
            data, _ = phone.request(
                "REGISTER", f"sip:{REALM}", call_id="e503",
                headers=(("Authorization", credentials),),
            )  # fmt: skip
            answer = phone.final(data)[1]
    finally:
        break_accounts(server.db, broken=False)
    assert (answer.header("Retry-After") or "").isdigit(), answer
    deadline = time.monotonic() + 10
    with Phone(server.address, "acme") as phone:  # the server recovers on its own
        while register(phone).status != 200:
            assert time.monotonic() < deadline, "no recovery after the store came back"
    return [answer]


def break_accounts(db: Path, *, broken: bool) -> None:
    """Make the server's account look-ups fail (the table gone), or heal them; touching a
    row first bumps the store's generation, so the server cannot answer from its cache."""
    old, new = ("accounts", "accounts_away") if broken else ("accounts_away", "accounts")
    connection = sqlite3.connect(db, isolation_level=None, timeout=5)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(f"UPDATE {old} SET status = status")
        connection.execute(f"ALTER TABLE {old} RENAME TO {new}")
        connection.execute("COMMIT")
    finally:
        connection.close()


def provoke_503_relay(server: Server, carrier: Carrier) -> list[Response]:
    # The relay has two port pairs: two echo calls take them all.
    with (
        Phone(server.address, "acme") as one,
        Phone(server.address, "acme") as two,
        Phone(server.address, "acme") as three,
    ):
        calls = [invite(one, ECHO), invite(two, ECHO)]
        try:
            assert [call.final.status for call in calls] == [200, 200]
            answer = invite(three, ECHO).final
        finally:
            for call in calls:
                if call.final.status == 200:
                    call.bye()
    return [answer]


def provoke_503_carrier(server: Server, carrier: Carrier) -> list[Response]:
    with Phone(server.address, "acme") as phone:
        return [invite(phone, "4075551212").final]


PROVOKE: dict[tuple[int, str], Callable[[Server, Carrier], list[Response]]] = {
    (401, "Unauthorized"): provoke_401,
    (403, "Unknown user"): provoke_unknown_user,
    (403, "Bad credentials"): provoke_bad_credentials,
    (403, "Destination not allowed"): provoke_destination_not_allowed,
    (403, "No route for account"): provoke_no_route,
    (403, "Source not allowed"): provoke_source_not_allowed,
    (403, "Account in use by another device"): provoke_second_device,
    (403, "Call limit reached"): provoke_call_limit,
    (405, "Method Not Allowed"): provoke_405,
    (408, "Request Timeout"): provoke_408,
    (480, "Temporarily Unavailable"): provoke_480,
    (484, "Address Incomplete"): provoke_484,
    (486, "Busy Here"): provoke_486,
    (487, "Request Terminated"): provoke_487,
    (488, "Not Acceptable Here"): provoke_488,
    (503, "Service Unavailable"): provoke_503_backend,
    (503, "Media relay unavailable"): provoke_503_relay,
    (503, "Carrier rejected the call"): provoke_503_carrier,
}


def test_every_error_row_has_a_check() -> None:
    assert len(ERROR_ROWS) == len(set(ERROR_ROWS)), "a code and reason appear twice"
    assert set(ERROR_ROWS) == set(PROVOKE), (
        f"rows without a check: {sorted(set(ERROR_ROWS) - set(PROVOKE))}; "
        f"checks without a row: {sorted(set(PROVOKE) - set(ERROR_ROWS))}"
    )


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        pytest.param(*row, marks=pytest.mark.slow) if row[0] == 408 else row
        for row in ERROR_ROWS
        if row in PROVOKE
    ],
    ids=lambda value: str(value),
)
def test_the_server_sends_each_documented_error(
    server: Server, carrier: Carrier, code: int, reason: str
) -> None:
    provoke = PROVOKE[(code, reason)]
    answers = provoke(server, carrier)
    for _ in range(3):
        # The relay has two port pairs, so the previous row's call may still
        # hold them for a moment: its release reaches the relay after the BYE
        # is answered. A row that needs relay ports is tried again, bounded,
        # once they are back (the 503 relay row provokes exactly that).
        if reason == "Media relay unavailable" or [(a.status, a.reason) for a in answers] != [
            (503, "Media relay unavailable")
        ]:
            break
        time.sleep(0.5)
        answers = provoke(server, carrier)
    assert answers
    for answer in answers:
        assert (answer.status, answer.reason) == (code, reason), answer
