"""Calls over real sockets: the real ``kx-sipd serve``, SIPp as the client and as the carrier.

What lives here, so the tests read as call flows:

* ``KxServer``: ``python -m kx_sipd serve`` as a subprocess on a free loopback
  port (UDP and TCP), with a temporary database made with the operator's CLI
  (accounts, one carrier route), a small RTP range, stopped afterwards.
* ``Sipp``: one SIPp process (UAC or the carrier UAS) with ``-trace_msg`` and
  ``-trace_err``, bounded by ``-m``, ``-timeout`` and a wait of our own; its
  message log parsed into ``Traced`` messages so tests can assert what crossed
  each leg.
* ``RawClient``: a few lines of UDP SIP written by hand, for the requests SIPp
  cannot make (a replayed Authorization). It is independent of sansio_sip so a
  parser bug in the engine cannot hide itself in the tests.

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
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import orjson

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = Path(__file__).resolve().parent / "sipp"
HOST = "127.0.0.1"
REALM = "sip.kx21.com"
START_WAIT = 30.0
CLI_WAIT = 60.0

SIPP = shutil.which("sipp")

# SIPp exit statuses (sipp(1)): 0 every call succeeded, 1 at least one failed.
SIPP_ALL_OK = 0


def free_port(kind: int = socket.SOCK_DGRAM, *, tcp_too: bool = False) -> int:
    """A loopback port free right now (for UDP, and TCP as well when asked)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, kind) as first:
            first.bind((HOST, 0))
            port = int(first.getsockname()[1])
            if not tcp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port")


def free_rtp_range(ports: int, band: tuple[int, int] = (30000, 32000)) -> tuple[int, int]:
    """``ports`` consecutive UDP ports (even start) in ``band`` (below the ephemeral
    range), free now."""
    for _ in range(200):
        low = random.randrange(band[0], band[1] - ports, 2)
        probes: list[socket.socket] = []
        try:
            for port in range(low, low + ports):
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probes.append(probe)
                probe.bind((HOST, port))
            return low, low + ports - 1
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no free RTP port range")


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("KX_DB", None)
    return env


def kx_cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``kx-sipd ARGS --db DB``; a failing command fails the test with its stderr."""
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


@attrs.define
class KxServer:
    """A running ``kx-sipd serve`` and its database."""

    address: tuple[str, int]
    db: Path
    log: Path
    process: subprocess.Popen[bytes]
    rtp_range: tuple[int, int]

    @property
    def port(self) -> int:
        return self.address[1]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return kx_cli(self.db, *args)

    def records(self, call_id: str) -> list[dict[str, object]]:
        """``kx-sipd calls list --call-id CALL_ID --json``, parsed."""
        output = self.cli("calls", "list", "--call-id", call_id, "--json").stdout
        return [orjson.loads(line) for line in output.splitlines() if line.strip()]

    def record(self, call_id: str, *, wait: float = 5.0) -> dict[str, object]:
        """The one finished record of the call with ``call_id`` (client leg).

        A record is on disk before the answer that ends the call goes out, but a
        call that ends by a timer on kx-sipd's side may be a moment behind the
        test: poll, bounded by ``wait``.
        """
        deadline = time.monotonic() + wait
        while True:
            found = self.records(call_id)
            if found and found[0].get("end_wall") is not None:
                assert len(found) == 1, found
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no finished record for {call_id}: {found}")
            time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return int(self.process.returncode)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _answers_options(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(0.5)
        local = sock.getsockname()[1]
        call_id = f"{random.getrandbits(64):016x}"
        sock.sendto(
            (
                f"OPTIONS sip:{REALM} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {HOST}:{local};branch=z9hG4bK{call_id};rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:probe@{REALM}>;tag=1\r\n"
                f"To: <sip:{REALM}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode(),
            (HOST, port),
        )
        try:
            return sock.recv(65535).startswith(b"SIP/2.0 200 ")
        except OSError:
            return False


def start_kx(directory: Path, db: Path, *extra: str, rtp_ports: int = 100) -> KxServer:
    """``kx-sipd serve`` on a free port (retried if the port was taken meanwhile)."""
    log = directory / "kx-sipd.log"
    for _attempt in range(3):
        port = free_port(tcp_too=True)
        rtp = free_rtp_range(rtp_ports)
        command = [
            sys.executable,
            "-m",
            "kx_sipd",
            "serve",
            "--db",
            str(db),
            "--listen",
            f"{HOST}:{port}",
            "--rtp-range",
            f"{rtp[0]}-{rtp[1]}",
            "--rtp-address",
            HOST,
            "--relay-shards",
            "1",
            "--log-level",
            "info",
            "--shutdown-grace",
            "2",
            *extra,
        ]
        with log.open("ab") as sink:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=sink,
                env=_environment(),
                cwd=directory,
            )
        server = KxServer((HOST, port), db, log, process, rtp)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline and process.poll() is None:
            if _answers_options(port):
                return server
        server.stop(timeout=5)
    raise RuntimeError("kx-sipd serve did not answer OPTIONS:\n" + log.read_text()[-4000:])


# ----------------------------------------------------------------------- SIPp


@attrs.frozen
class Traced:
    """One message from a SIPp ``-trace_msg`` log, as SIPp sent or received it."""

    direction: str  # "sent" or "received"
    transport: str  # "UDP" or "TCP"
    text: str

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    @property
    def is_request(self) -> bool:
        return not self.first_line.startswith("SIP/2.0 ")

    @property
    def method(self) -> str:
        """The request's method, or the CSeq method of a response."""
        if self.is_request:
            return self.first_line.split(" ", 1)[0]
        return (self.header("CSeq") or " ").split()[-1]

    @property
    def status(self) -> int | None:
        return None if self.is_request else int(self.first_line.split()[1])

    @property
    def reason(self) -> str:
        return "" if self.is_request else self.first_line.split(" ", 2)[2]

    def headers(self, name: str) -> list[str]:
        head = self.text.split("\n\n", 1)[0]
        wanted = name.lower()
        values = []
        for line in head.split("\n")[1:]:
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() == wanted:
                values.append(value.strip())
        return values

    def header(self, name: str) -> str | None:
        values = self.headers(name)
        return values[0] if values else None

    @property
    def body(self) -> str:
        return self.text.split("\n\n", 1)[1] if "\n\n" in self.text else ""


_TRACE_SEPARATOR = re.compile(r"^-{20,} \d{4}-\d\d-\d\d [\d:.]+$", re.MULTILINE)
_TRACE_HEAD = re.compile(r"^(UDP|TCP) message (sent|received)\b.*$", re.MULTILINE)


def parse_trace(text: str) -> list[Traced]:
    """The messages of a SIPp ``-trace_msg`` file, in order (line ends made ``\\n``)."""
    messages = []
    for chunk in _TRACE_SEPARATOR.split(text.replace("\r\n", "\n")):
        head = _TRACE_HEAD.search(chunk)
        if head is None:
            continue
        body = chunk[head.end() :].lstrip("\n").rstrip("\n")
        if not body.strip():
            continue
        messages.append(Traced(direction=head.group(2), transport=head.group(1), text=body))
    return messages


@attrs.define
class Sipp:
    """One SIPp process with its message and error logs."""

    name: str
    command: list[str]
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    returncode: int | None = None

    @property
    def message_file(self) -> Path:
        return self.directory / f"{self.name}_messages.log"

    @property
    def error_file(self) -> Path:
        return self.directory / f"{self.name}_errors.log"

    @property
    def output_file(self) -> Path:
        return self.directory / f"{self.name}_output.log"

    def start(self) -> Sipp:
        with self.output_file.open("wb") as sink:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        return self

    def wait(self, timeout: float) -> int:
        """Wait for SIPp to exit (killed after ``timeout``); its exit status."""
        assert self.process is not None
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"SIPp {self.name} did not finish:\n{self.diagnostics()}"
            ) from None
        return self.returncode

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(3)
        if self.process is not None:
            self.returncode = self.process.returncode

    def messages(self, *, retransmissions: bool = False) -> list[Traced]:
        """What SIPp sent and received, in order. A retransmission is the same
        bytes again (SIPp's own, or kx-sipd's Timer A/G or 2xx retransmission on
        a busy machine); it is left out unless asked for, so a flow reads the
        same however loaded the machine was."""
        if not self.message_file.exists():
            return []
        traced = parse_trace(self.message_file.read_text(errors="replace"))
        if retransmissions:
            return traced
        seen: set[tuple[str, str]] = set()
        distinct = []
        for message in traced:
            key = (message.direction, message.text)
            if key not in seen:
                seen.add(key)
                distinct.append(message)
        return distinct

    def diagnostics(self) -> str:
        parts = [f"$ {' '.join(self.command)}", f"exit status {self.returncode}"]
        for path in (self.output_file, self.error_file):
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        parts.append("--- messages\n" + "\n====\n".join(m.text for m in self.messages())[-6000:])
        return "\n".join(parts)

    def assert_ok(self) -> None:
        assert self.returncode == SIPP_ALL_OK, self.diagnostics()


def sipp_command(
    name: str,
    scenario: str,
    directory: Path,
    *,
    port: int,
    remote: tuple[str, int] | None = None,
    calls: int = 1,
    timeout: float = 30.0,
    transport: str = "u1",
    extra: Sequence[str] = (),
) -> Sipp:
    """A SIPp process for ``tests/interop/sipp/<scenario>`` (not started yet)."""
    assert SIPP is not None
    command = [
        SIPP,
        *([f"{remote[0]}:{remote[1]}"] if remote else []),
        "-sf",
        str(SCENARIOS / scenario),
        "-i",
        HOST,
        "-p",
        str(port),
        "-t",
        transport,
        "-m",
        str(calls),
        "-nostdin",
        "-timeout",
        f"{int(timeout)}s",
        "-timeout_error",
        "-trace_msg",
        "-message_file",
        str(directory / f"{name}_messages.log"),
        "-trace_err",
        "-error_file",
        str(directory / f"{name}_errors.log"),
        "-mp",
        # Apart from the servers' relay ranges (30000-32000): the relay binds its
        # ports call by call, after SIPp's ports were found free (SIPp then failed
        # to bind its media port, "Address already in use", in 2 CI runs).
        str(free_rtp_range(8, band=(28000, 30000))[0]),
        *extra,
    ]
    return Sipp(name=name, command=command, directory=directory)


def users_file(directory: Path, users: Sequence[tuple[str, str]]) -> Path:
    """A SIPp injection file: user;password;[authentication ...] (SIPp 3.6 does not
    expand [fieldN] inside [authentication], so the keyword is a field of its own)."""
    path = directory / "users.csv"
    lines = ["SEQUENTIAL"] + [
        f"{user};{password};[authentication username={user} password={password}]"
        for user, password in users
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ raw UDP SIP


@attrs.frozen
class RawResponse:
    status: int
    reason: str
    text: str

    def header(self, name: str) -> str | None:
        head = self.text.split("\r\n\r\n", 1)[0]
        for line in head.split("\r\n")[1:]:
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() == name.lower():
                return value.strip()
        return None


class RawClient:
    """A UDP socket speaking just enough SIP to send a hand-written request."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def send(self, text: str) -> None:
        self.sock.sendto(text.replace("\r\n", "\n").replace("\n", "\r\n").encode(), self.server)

    def final_response(self, wait: float = 5.0) -> tuple[list[RawResponse], RawResponse]:
        """Responses until the first final one (provisional ones listed first)."""
        seen: list[RawResponse] = []
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no final response; got {[r.status for r in seen]}"
            self.sock.settimeout(left)
            data = self.sock.recv(65535).decode(errors="replace")
            status, reason = data.split("\r\n", 1)[0].split(" ", 2)[1:]
            response = RawResponse(int(status), reason, data)
            if response.status >= 200:
                return seen, response
            seen.append(response)
