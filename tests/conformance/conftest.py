"""The conformance harness: the real ``kx-sipd serve`` as a subprocess, talked to over loopback.

``server`` (one per driver and test module) and ``fresh_server`` (one per test,
for tests that change the database or stop the process) start
``python -m kx_sipd serve`` on a free UDP+TCP loopback port with a temporary
database whose accounts were made with the CLI, wait until it answers OPTIONS,
and stop it afterwards (SIGTERM, then kill). Every test runs once per driver:
``anyio-asyncio``, ``anyio-trio`` and ``socket`` (DESIGN.md §3: a behaviour
present in one driver and not the other is a bug).

The SIP client here is deliberately independent of sansio_sip: requests are
written as text and responses are parsed by a few lines below, so a parser bug
in the engine cannot hide itself in the tests.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVERS = ["anyio-asyncio", "anyio-trio", "socket"]
REALM = "sip.kx21.com"
WAIT = 5.0  # every wait is bounded by this; nothing asserts speed
START_WAIT = 30.0

Address = tuple[str, int]

ACCOUNTS = {"alice": "alice-secret", "carol": "carol-secret", "dave": "dave-secret"}
SUSPENDED = {"bob": "bob-secret"}


@attrs.frozen
class SipResponse:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        wanted = {name.lower(), *_COMPACT.get(name.lower(), ())}
        return [value for key, value in self.headers if key.lower() in wanted]


_COMPACT = {
    "via": ("v",),
    "contact": ("m",),
    "call-id": ("i",),
    "from": ("f",),
    "to": ("t",),
    "content-length": ("l",),
    "content-type": ("c",),
    "supported": ("k",),
}


def parse_response(raw: bytes) -> SipResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    version, status, reason = [*lines[0].split(" ", 2), ""][:3]
    assert version == "SIP/2.0", lines[0]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return SipResponse(int(status), reason, tuple(headers), body, raw)


def split_stream(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete messages at the front of a TCP byte stream, and the rest."""
    messages = []
    while b"\r\n\r\n" in buffer:
        head, _, rest = buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() in (b"content-length", b"l"):
                length = int(value.strip())
        if len(rest) < length:
            break
        messages.append(head + b"\r\n\r\n" + rest[:length])
        buffer = rest[length:]
    return messages, buffer


def digest_response(
    username: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    *,
    realm: str = REALM,
    qop: str | None = "auth",
    nc: str = "00000001",
    cnonce: str = "0a4f113b",
) -> str:
    """RFC 2617 §3.2.2.1, written out here so the server is checked against the formula."""

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    ha1 = md5(f"{username}:{realm}:{password}")
    ha2 = md5(f"{method}:{uri}")
    if qop is None:
        return md5(f"{ha1}:{nonce}:{ha2}")
    return md5(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def challenge_params(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    assert scheme.lower() == "digest", header
    params = {}
    for part in _split_params(rest):
        name, _, value = part.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return params


def _split_params(text: str) -> list[str]:
    parts, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part for part in parts if part.strip()]


class SipClient:
    """One client socket (UDP, or one TCP connection) toward the server."""

    def __init__(
        self, server: Address, transport: str = "udp", *, sock: socket.socket | None = None
    ) -> None:
        """A new socket, or ``sock`` (a TCP connection the test opened its own way)."""
        self.server = server
        self.transport = transport
        if sock is not None:
            self.sock = sock
        elif transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", 0))
        else:
            self.sock = socket.create_connection(server, timeout=WAIT)
        self.sock.settimeout(WAIT)
        self.local = self.sock.getsockname()[:2]
        self.buffer = b""
        self.cseq = 0
        self.call_id = f"{random.getrandbits(64):016x}@conformance"
        self.tag = f"{random.getrandbits(32):08x}"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SipClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        uri: str = f"sip:{REALM}",
        *,
        user: str = "alice",
        headers: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
        via: str | None = None,
        new_call: bool = False,
    ) -> bytes:
        """A well-formed request from this client, as bytes."""
        if new_call:
            self.call_id = f"{random.getrandbits(64):016x}@conformance"
        self.cseq += 1
        host, port = self.local
        branch = f"z9hG4bK{random.getrandbits(48):012x}"
        lines = [
            f"{method} {uri} SIP/2.0",
            via or f"Via: SIP/2.0/{self.transport.upper()} {host}:{port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:{user}@{REALM}>;tag={self.tag}",
            f"To: <sip:{user}@{REALM}>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} {method}",
            f"Contact: <sip:{user}@{host}:{port};transport={self.transport}>",
            "User-Agent: kx-conformance",
            *(f"{name}: {value}" for name, value in headers),
            f"Content-Length: {len(body)}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def send(self, data: bytes) -> None:
        if self.transport == "udp":
            self.sock.sendto(data, self.server)
        else:
            self.sock.sendall(data)

    def receive(self, timeout: float = WAIT) -> SipResponse | None:
        """The next response, or None when nothing came within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            if self.transport == "udp":
                data, _ = self.sock.recvfrom(65535)
                while not data.startswith(b"SIP/2.0 "):  # not a response: not for us
                    data, _ = self.sock.recvfrom(65535)
                return parse_response(data)
            while True:
                messages, rest = split_stream(self.buffer)
                if messages:
                    self.buffer = self.buffer[len(messages[0]) :]
                    return parse_response(messages[0])
                chunk = self.sock.recv(65535)
                if not chunk:
                    return None
                self.buffer += chunk
        except TimeoutError:
            return None

    def exchange(self, data: bytes) -> list[SipResponse]:
        """Send a request; every response up to and including the final one."""
        self.send(data)
        responses = []
        while True:
            response = self.receive()
            assert response is not None, f"no final response to:\n{data.decode(errors='replace')}"
            responses.append(response)
            if response.status >= 200:
                return responses

    def final(self, data: bytes) -> SipResponse:
        return self.exchange(data)[-1]

    def register(self, user: str, password: str, *, expires: int = 300) -> SipResponse:
        """REGISTER, answer the challenge, return the final answer to the second request."""
        uri = f"sip:{REALM}"
        first = self.final(
            self.request("REGISTER", uri, user=user, headers=(("Expires", str(expires)),))
        )
        assert first.status == 401, first.raw
        challenge = challenge_params(first.header("WWW-Authenticate") or "")
        response = digest_response(user, password, "REGISTER", uri, challenge["nonce"])
        authorization = (
            f'Digest username="{user}", realm="{challenge["realm"]}", nonce="{challenge["nonce"]}", '
            f'uri="{uri}", response="{response}", algorithm=MD5, qop=auth, nc=00000001, '
            f'cnonce="0a4f113b"'
        )
        return self.final(
            self.request(
                "REGISTER",
                uri,
                user=user,
                headers=(("Expires", str(expires)), ("Authorization", authorization)),
            )
        )


@attrs.define
class SipServer:
    """A running ``kx-sipd serve`` and what a test needs to talk to it."""

    driver: str
    address: Address
    db: Path
    stderr_path: Path
    process: subprocess.Popen[bytes]

    def client(self, transport: str = "udp") -> SipClient:
        return SipClient(self.address, transport)

    def sip(self, data: bytes, transport: str = "udp") -> list[SipResponse]:
        """Send one request on a new client socket; every response up to the final one."""
        with self.client(transport) as client:
            return client.exchange(data)

    def cli(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return run_cli(self.db, *args, stdin=stdin)

    def log_lines(self) -> list[str]:
        return self.stderr_path.read_text(errors="replace").splitlines()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; kill if it lingers. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        return int(self.process.returncode)


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("KX_DB", None)
    return env


def run_cli(db: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [sys.executable, "-m", "kx_sipd", *args, "--db", str(db)],
        input=stdin,
        capture_output=True,
        env=_environment(),
        cwd=db.parent,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


def make_database(directory: Path) -> Path:
    """A database with the test accounts, made with the operator's CLI."""
    db = directory / "kx.sqlite"
    for user, password in {**ACCOUNTS, **SUSPENDED}.items():
        run_cli(db, "accounts", "add", user, "--password", password)
    for user in SUSPENDED:
        run_cli(db, "accounts", "suspend", user)
    return db


def copy_database(template: Path, directory: Path) -> Path:
    """A private copy of the template database (the CLI is slow to start; copying is not)."""
    with sqlite3.connect(template) as source, sqlite3.connect(directory / "kx.sqlite") as copy:
        source.backup(copy)
    source.close()
    copy.close()
    return directory / "kx.sqlite"


def free_port() -> int:
    """A loopback port free for both UDP and TCP right now, below the kernel's ephemeral
    range (32768 and up) so that no client socket of the tests can be handed it meanwhile."""
    for _ in range(200):
        port = random.randrange(10000, 20000)
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        ):
            try:
                udp.bind(("127.0.0.1", port))
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port")


def _answers_options(address: Address) -> bool:
    with SipClient(address) as client:
        client.send(client.request("OPTIONS", f"sip:{REALM}"))
        response = client.receive(timeout=0.5)
        return response is not None and response.status == 200


def start_server(driver: str, directory: Path, db: Path, *extra: str) -> SipServer:
    """Start ``kx-sipd serve`` on a free port (retrying if the port was taken meanwhile)."""
    name, _, backend = driver.partition("-")
    for attempt in range(3):
        port = free_port()
        rtp_low = random.randrange(30000, 60000, 100)
        stderr_path = directory / f"server-{driver}-{attempt}.log"
        command = [
            sys.executable,
            "-m",
            "kx_sipd",
            "serve",
            "--db",
            str(db),
            "--listen",
            f"127.0.0.1:{port}",
            "--driver",
            name,
            "--log-level",
            "debug",
            "--relay-shards",
            "1",
            "--rtp-range",
            f"{rtp_low}-{rtp_low + 99}",
            *(("--backend", backend) if backend else ()),
            *extra,
        ]
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=_environment(),
                cwd=directory,
            )
        server = SipServer(driver, ("127.0.0.1", port), db, stderr_path, process)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline and process.poll() is None:
            if _answers_options(server.address):
                return server
        server.stop(timeout=WAIT)
    raise RuntimeError(
        f"kx-sipd serve ({driver}) did not answer OPTIONS:\n"
        + stderr_path.read_text(errors="replace")[-4000:]
    )


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_database(tmp_path_factory.mktemp("kx-template"))


@pytest.fixture(scope="module", params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def server(
    driver: str, template_db: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SipServer]:
    """A server shared by a module's tests for one driver; tests must not change its accounts."""
    directory = tmp_path_factory.mktemp(f"kx-{driver}")
    running = start_server(driver, directory, copy_database(template_db, directory))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def fresh_server(driver: str, template_db: Path, tmp_path: Path) -> Iterator[SipServer]:
    """A server of the test's own, with its own database."""
    running = start_server(driver, tmp_path, copy_database(template_db, tmp_path))
    try:
        yield running
    finally:
        running.stop()
