"""What the robustness tests share: a running ``kx-sipd serve`` and a raw SIP client.

* ``KxServer.start``: ``python -m kx_sipd serve`` as a subprocess on a free
  loopback port (UDP and TCP, on 127.0.0.1 and, when free, on ::1 too), with
  a temporary database holding the test accounts and an optional carrier
  route, and a small RTP range; ``stop`` / ``kill`` by its own pid; ``rss``
  reads its resident memory from /proc; ``exit_stats`` reads the engine's
  counters from the ``server.exited`` log line.
* ``Raw``: a socket that sends bytes and reads SIP responses, written without
  sansio_sip so a parser bug in the engine cannot hide itself in the tests.

Only loopback addresses are used; every wait is bounded; every process
started here is stopped here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import orjson

REPO = Path(__file__).resolve().parents[2]
REALM = "sip.kx21.com"
START_WAIT = 40.0
WAIT = 2.0

ACCOUNTS = {"alice": "alice-secret", "carol": "carol-secret", "dave": "dave-secret"}
SUSPENDED = {"bob": "bob-secret"}

Address = tuple[str, int]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("KX_DB", None)
    return env


def free_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1 (and ::1 when it exists), below
    the ephemeral range so no client socket is handed it meanwhile."""
    for _ in range(300):
        port = random.randrange(10000, 30000)
        sockets = []
        try:
            for family, host, kind in (
                (socket.AF_INET, "127.0.0.1", socket.SOCK_DGRAM),
                (socket.AF_INET, "127.0.0.1", socket.SOCK_STREAM),
                (socket.AF_INET6, "::1", socket.SOCK_DGRAM),
                (socket.AF_INET6, "::1", socket.SOCK_STREAM),
            ):
                probe = socket.socket(family, kind)
                sockets.append(probe)
                probe.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise RuntimeError("no free loopback port")


def free_rtp_range(ports: int = 100) -> tuple[int, int]:
    for _ in range(200):
        low = random.randrange(30000, 32000 - ports, 2)
        probes: list[socket.socket] = []
        try:
            for port in range(low, low + ports):
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return low, low + ports - 1
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no free RTP range")


def make_database(
    path: Path, *, carrier: Address | None = None, accounts: dict[str, str] | None = None
) -> Path:
    """The test accounts (and a ``carrier`` route to ``carrier`` for their calls)."""
    from kx_sipd.store import Store
    from sansio_sip import Route, Transport

    with Store(str(path)) as store:
        route = None
        if carrier is not None:
            store.put_route(
                Route(name="carrier", host=carrier[0], port=carrier[1], transport=Transport.UDP)
            )
            route = "carrier"
        for user, password in (accounts or {**ACCOUNTS, **SUSPENDED}).items():
            store.add_account(user, password, route=route)
        for user in SUSPENDED:
            if store.account_info(user) is not None:
                store.set_active(user, False)
    return path


@attrs.define
class KxServer:
    """A running ``kx-sipd serve``."""

    port: int
    db: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    ipv6: bool

    @property
    def address(self) -> Address:
        return ("127.0.0.1", self.port)

    @classmethod
    def start(
        cls, directory: Path, *extra: str, driver: str = "anyio", db: Path | None = None,
        log_level: str = "info", ipv6: bool = True,
    ) -> KxServer:  # fmt: skip
        """Start a server on a free port (retrying when the port was taken meanwhile)."""
        directory.mkdir(parents=True, exist_ok=True)
        db = db or make_database(directory / "kx.sqlite")
        for attempt in range(3):
            port = free_port()
            low, high = free_rtp_range()
            log_path = directory / f"server-{driver}-{port}-{attempt}.log"
            listen = ["--listen", f"127.0.0.1:{port}"]
            if ipv6:
                listen += ["--listen", f"[::1]:{port}"]
            command = [
                sys.executable, "-m", "kx_sipd", "serve", "--db", str(db), *listen,
                "--driver", driver, "--log-level", log_level, "--relay-shards", "1",
                "--rtp-range", f"{low}-{high}", "--shutdown-grace", "1", *extra,
            ]  # fmt: skip
            with log_path.open("wb") as stderr:
                process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    env=environment(), cwd=directory,
                )  # fmt: skip
            server = cls(port, db, log_path, process, ipv6)
            deadline = time.monotonic() + START_WAIT
            while time.monotonic() < deadline and process.poll() is None:
                if server.answers_options(timeout=0.5):
                    return server
            server.stop()
        raise RuntimeError(
            "kx-sipd serve did not answer OPTIONS:\n" + log_path.read_text(errors="replace")[-3000:]
        )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def answers_options(self, *, timeout: float = WAIT, source: str = "127.0.0.1") -> bool:
        """A valid OPTIONS gets 200 (from a fresh socket, bound to ``source``)."""
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        target = ("::1", self.port) if family == socket.AF_INET6 else self.address
        with Raw(target, bind=source, family=family) as raw:
            raw.send(raw.request("OPTIONS"))
            response = raw.final(timeout=timeout)
            return response is not None and response.status == 200

    def rss_kib(self) -> int:
        """Resident memory of the server process (KiB), from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def log_events(self) -> list[dict[str, object]]:
        events = []
        for line in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                events.append(orjson.loads(line))
        return events

    def exit_stats(self) -> dict[str, int]:
        """The engine's counters, from the ``server.exited`` line (after ``stop``)."""
        for event in reversed(self.log_events()):
            if event.get("event") == "server.exited":
                fields = event.get("fields")
                assert isinstance(fields, dict)
                return {str(k): int(v) for k, v in fields.items() if isinstance(v, int)}
        raise AssertionError("no server.exited line:\n" + self.log_tail())

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL if it lingers. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILL, as a crash would. Its local relay (a child process) then
        notices its parent is gone and exits on its own; ``reap_relay`` makes sure."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@attrs.frozen
class Response:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    raw: bytes

    def header(self, name: str) -> str | None:
        wanted = {name.lower(), *_COMPACT.get(name.lower(), ())}
        for key, value in self.headers:
            if key.lower() in wanted:
                return value
        return None


_COMPACT = {"call-id": ("i",), "via": ("v",), "to": ("t",), "from": ("f",), "contact": ("m",)}


def parse_response(raw: bytes) -> Response | None:
    """A response's status line and headers; None for anything else."""
    if not raw.startswith(b"SIP/2.0 "):
        return None
    head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    lines = head.split("\r\n")
    _, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    try:
        code = int(status)
    except ValueError:
        return None
    return Response(code, reason, tuple(headers), raw)


def split_stream(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete messages at the front of a TCP byte stream, and the rest."""
    messages = []
    while b"\r\n\r\n" in buffer:
        buffer = buffer.lstrip(b"\r\n")
        if b"\r\n\r\n" not in buffer:
            break
        head, _, rest = buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() in (b"content-length", b"l"):
                length = int(value.strip() or b"0")
        if len(rest) < length:
            break
        messages.append(head + b"\r\n\r\n" + rest[:length])
        buffer = rest[length:]
    return messages, buffer


def digest(
    user: str, password: str, method: str, uri: str, nonce: str, *, realm: str = REALM,
    nc: str = "00000001", cnonce: str = "0a4f113b",
) -> str:  # fmt: skip
    """RFC 2617 §3.2.2.1 (qop=auth), written out so the server is checked against the formula."""

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    ha1 = md5(f"{user}:{realm}:{password}")
    return md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{md5(f'{method}:{uri}')}")


def nonce_of(response: Response) -> str:
    value = response.header("WWW-Authenticate") or ""
    start = value.index('nonce="') + len('nonce="')
    return value[start : value.index('"', start)]


def authorization(user: str, password: str, method: str, uri: str, nonce: str) -> str:
    response = digest(user, password, method, uri, nonce)
    return (
        f'Digest username="{user}", realm="{REALM}", nonce="{nonce}", uri="{uri}", '
        f'response="{response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="0a4f113b"'
    )


class Raw:
    """One client socket (UDP, or one TCP connection) toward the server."""

    def __init__(
        self, server: Address, *, transport: str = "udp", bind: str = "127.0.0.1",
        family: int = socket.AF_INET,
    ) -> None:  # fmt: skip
        self.server = server
        self.transport = transport
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(family, kind)
        self.sock.bind((bind, 0))
        if transport == "tcp":
            self.sock.settimeout(WAIT)
            self.sock.connect(server)
        self.local = self.sock.getsockname()[:2]
        self.buffer = b""
        self.closed = False
        self.cseq = 0
        self.call_id = f"{random.getrandbits(64):016x}@robust"
        self.tag = f"{random.getrandbits(32):08x}"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(
        self, method: str, uri: str = f"sip:{REALM}", *, user: str = "alice",
        headers: Sequence[tuple[str, str]] = (), body: bytes = b"", new_call: bool = True,
        user_agent: str = "kx-robustness",
    ) -> bytes:  # fmt: skip
        """A well-formed request from this socket."""
        if new_call:
            self.call_id = f"{random.getrandbits(64):016x}@robust"
        self.cseq += 1
        host, port = self.local
        host = f"[{host}]" if ":" in host else host
        branch = f"z9hG4bK{random.getrandbits(48):012x}"
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/{self.transport.upper()} {host}:{port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:{user}@{REALM}>;tag={self.tag}",
            f"To: <sip:{user}@{REALM}>" if method == "REGISTER" else f"To: <{uri}>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} {method}",
            f"Contact: <sip:{user}@{host}:{port};transport={self.transport}>",
            f"User-Agent: {user_agent}",
            *(f"{name}: {value}" for name, value in headers),
            f"Content-Length: {len(body)}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def send(self, data: bytes) -> None:
        if self.transport == "udp":
            self.sock.sendto(data, self.server)
        else:
            self.sock.sendall(data)

    def receive(self, timeout: float = WAIT) -> Response | None:
        """The next response, or None when nothing (parseable) came within ``timeout``;
        over TCP ``closed`` is set when the server closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                if self.transport == "udp":
                    data, _ = self.sock.recvfrom(65535)
                    response = parse_response(data)
                    if response is not None:
                        return response
                    continue
                messages, _ = split_stream(self.buffer)
                if messages:
                    self.buffer = self.buffer.lstrip(b"\r\n")[len(messages[0]) :]
                    response = parse_response(messages[0])
                    if response is not None:
                        return response
                    continue
                chunk = self.sock.recv(65535)
                if not chunk:
                    self.closed = True
                    return None
                self.buffer += chunk
            except (TimeoutError, BlockingIOError):
                return None
            except (ConnectionResetError, BrokenPipeError):
                self.closed = True
                return None

    def final(self, timeout: float = WAIT) -> Response | None:
        """The next final (>= 200) response, skipping provisional ones."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.receive(max(0.0, deadline - time.monotonic()))
            if response is None or response.status >= 200:
                return response

    def register(self, user: str, password: str) -> Response | None:
        """REGISTER, answer the 401, return the final answer to the second one."""
        uri = f"sip:{REALM}"
        self.send(self.request("REGISTER", uri, user=user, headers=(("Expires", "300"),)))
        first = self.final()
        if first is None or first.status != 401:
            return first
        auth = authorization(user, password, "REGISTER", uri, nonce_of(first))
        self.send(
            self.request(
                "REGISTER",
                uri,
                user=user,
                new_call=False,
                headers=(("Expires", "300"), ("Authorization", auth)),
            )
        )
        return self.final()


def reap(pids: Sequence[int]) -> None:
    """SIGKILL the given pids (processes this test started) if still there."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (its local relay), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def running(directory: Path, *extra: str, **kwargs: object) -> Iterator[KxServer]:
    server = KxServer.start(directory, *extra, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


SIPP_DIR = Path(__file__).resolve().parent / "sipp"


def sipp(
    scenario: str, target: Address, *, service: str = "alice", user: str = "alice",
    password: str = "alice-secret",
    local_ip: str = "127.0.0.1", rate: float = 5.0, calls: int = 10, directory: Path,
    timeout: float = 60.0, extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run SIPp (UAC) with ``tests/robustness/sipp/<scenario>`` to completion,
    bounded by ``-m calls`` and ``timeout``; its exit status is 0 when every
    call succeeded."""
    command = [
        "sipp", "-sf", str(SIPP_DIR / scenario), "-i", local_ip, "-p", "0",
        "-s", service, "-au", user, "-ap", password, "-r", f"{rate:g}", "-m", str(calls),
        "-nostdin", "-timeout", f"{timeout:g}s", "-timeout_error", "-recv_timeout", "10000",
        "-trace_err", "-error_file", str(directory / f"sipp-{scenario}-{local_ip}.err"),
        *extra, f"{target[0]}:{target[1]}",
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout + 30, cwd=directory,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def start_sipp(scenario: str, *args: str, directory: Path, name: str) -> subprocess.Popen[bytes]:
    """SIPp in the background (``tests/robustness/sipp/<scenario>``); the
    caller stops it with ``stop_process``."""
    command = [
        "sipp", "-sf", str(SIPP_DIR / scenario), "-nostdin", "-trace_err",
        "-error_file", str(directory / f"sipp-{name}.err"), *args,
    ]  # fmt: skip
    with (directory / f"sipp-{name}.out").open("wb") as out:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=directory,
        )  # fmt: skip


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM (SIGKILL if it lingers) one process this test started."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def call_records(db: Path) -> list[object]:
    """Every call record in the database (CallRecordData), oldest first."""
    from kx_sipd.store import Store

    with Store(str(db)) as store:
        return [entry.record for entry in reversed(store.list_calls(limit=None))]
