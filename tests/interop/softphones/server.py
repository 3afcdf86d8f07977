"""``kx-sipd serve`` as a subprocess with a temporary database made by the operator CLI."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from .ports import HOST, free_block, free_port

REPO = Path(__file__).resolve().parents[3]
REALM = "sip.kx21.com"
START_WAIT = 30.0
CLI_WAIT = 60.0
RELAY_SECRET = "softphones-relay-secret-0123456789"


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("KX_DB", None)
    env.pop("KX_RELAY_SECRET", None)
    return env


def kx_cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """One ``kx-sipd`` command on ``db``; fails the test when it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "kx_sipd", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        env=_environment(),
        cwd=db.parent,
        stdin=subprocess.DEVNULL,
        timeout=CLI_WAIT,
    )
    if result.returncode != 0:
        raise AssertionError(f"kx-sipd {' '.join(args)} failed:\n{result.stderr}")
    return result


def _answers_options(port: int) -> bool:
    """One OPTIONS over UDP: True when a 200 comes back within half a second."""
    call_id = f"{random.getrandbits(64):016x}@softphones"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(0.5)
        local = sock.getsockname()[1]
        request = (
            f"OPTIONS sip:{REALM} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{local};branch=z9hG4bK{call_id[:12]};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:probe@{REALM}>;tag=probe\r\n"
            f"To: <sip:{REALM}>\r\n"
            f"Call-ID: {call_id}\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        sock.sendto(request.encode(), (HOST, port))
        try:
            data, _ = sock.recvfrom(65535)
        except OSError:
            return False
        return data.startswith(b"SIP/2.0 200 ")


class KxServer:
    """A running ``kx-sipd serve`` on loopback (UDP and TCP on ``port``), its own relay
    (one shard, a small RTP range on 127.0.0.1) and the database ``db``."""

    def __init__(self, directory: Path, db: Path) -> None:
        self.directory = directory
        self.db = db
        self.port = 0
        self.relay_control = ""
        self.log_path = directory / "kx-sipd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for attempt in range(3):
            self.port = free_port(tcp=True)
            rtp_low = free_block(40)
            self.log_path = self.directory / f"kx-sipd-{attempt}.log"
            command = [
                sys.executable,
                "-m",
                "kx_sipd",
                "serve",
                "--db",
                str(self.db),
                "--listen",
                f"{HOST}:{self.port}",
                "--rtp-range",
                f"{rtp_low}-{rtp_low + 39}",
                "--rtp-address",
                HOST,
                "--relay-shards",
                "1",
                "--relay-secret",
                RELAY_SECRET,
                "--log-level",
                "debug",
            ]
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_environment(),
                    cwd=self.directory,
                )
            deadline = time.monotonic() + START_WAIT
            while time.monotonic() < deadline and self.process.poll() is None:
                if _answers_options(self.port):
                    self.relay_control = self._relay_control()
                    return
            self.stop()
        raise RuntimeError("kx-sipd serve did not start:\n" + self.log_text()[-4000:])

    def _relay_control(self) -> str:
        for event in self.events("relay.started"):
            host, port = event["fields"]["control"]
            return f"{host}:{port}"
        raise RuntimeError("kx-sipd serve logged no relay.started line:\n" + self.log_text())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; the relay goes with it."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines with this event key, in order."""
        found = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return kx_cli(self.db, *args)

    def calls(self) -> list[dict[str, Any]]:
        """``kx-sipd calls list --json``: the call records, one dict each."""
        out = self.cli("calls", "list", "--json").stdout
        return [orjson.loads(line) for line in out.splitlines() if line.strip()]

    def relay_calls(self) -> list[dict[str, Any]]:
        """``kx-sipd relay stats --json``: the relay's live calls with per-leg figures."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "kx_sipd",
                "relay",
                "stats",
                "--json",
                "--control",
                self.relay_control,
                "--secret",
                RELAY_SECRET,
            ],
            capture_output=True,
            text=True,
            env=_environment(),
            stdin=subprocess.DEVNULL,
            timeout=CLI_WAIT,
        )
        if result.returncode != 0:
            raise AssertionError(f"kx-sipd relay stats failed:\n{result.stderr}")
        lines = [orjson.loads(line) for line in result.stdout.splitlines() if line.strip()]
        return [line["call"] for line in lines if "call" in line]


def make_database(directory: Path, accounts: dict[str, tuple[str, str]], carrier_port: int) -> Path:
    """A database with the route ``carrier`` (127.0.0.1:``carrier_port``) and the
    accounts {username: (password, route)}, all made with the operator's CLI."""
    db = directory / "kx.sqlite"
    kx_cli(db, "routes", "add", "carrier", "--host", HOST, "--port", str(carrier_port))
    for username, (password, route) in accounts.items():
        kx_cli(db, "accounts", "add", username, "--password", password, "--route", route)
    return db
