"""Requests per second through the real ``kx-sipd serve``, per driver, over UDP loopback.

Starts the server (temporary database, one relay shard) for each driver in
turn and keeps ``--window`` requests in flight until ``--count`` have been
answered: OPTIONS (engine + driver, no store) and unauthenticated REGISTER
(a 401 with a fresh nonce). The figures are comparable within one run; the
first driver measured (io_socket, no event loop) is the reference the others
are given as a ratio of.

    python3 bench/driver_udp.py [--count N] [--window W]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVERS = [("socket", None), ("anyio", "asyncio"), ("anyio", "trio")]


def _request(method: str, port: int, number: int) -> bytes:
    return (
        f"{method} sip:sip.kx21.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{number:x}b{random.getrandbits(32):x};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:alice@sip.kx21.com>;tag=1\r\nTo: <sip:alice@sip.kx21.com>\r\n"
        f"Call-ID: {number}-{random.getrandbits(32):x}@bench\r\nCSeq: 1 {method}\r\n"
        f"Contact: <sip:alice@127.0.0.1:{port}>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _load(server: tuple[str, int], method: str, count: int, window: int) -> float:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        port = sock.getsockname()[1]
        sent = answered = 0
        start = time.perf_counter()
        while sent < min(window, count):
            sock.sendto(_request(method, port, sent), server)
            sent += 1
        while answered < count:
            try:
                sock.recvfrom(65535)
            except TimeoutError:
                # A lost datagram (queue bound): refill the window and go on.
                for _ in range(min(window, count - sent)):
                    sock.sendto(_request(method, port, sent), server)
                    sent += 1
                if sent >= count and answered < count:
                    break
                continue
            answered += 1
            if sent < count:
                sock.sendto(_request(method, port, sent), server)
                sent += 1
        return answered / (time.perf_counter() - start)


def _wait_ready(server: tuple[str, int]) -> None:
    """Until the server answers (the relay and the store start first), then a warm-up."""
    deadline = time.monotonic() + 30
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            sock.sendto(_request("OPTIONS", sock.getsockname()[1], 0), server)
            try:
                sock.recvfrom(65535)
                break
            except TimeoutError:
                continue
    _load(server, "OPTIONS", 500, 8)


def _serve(driver: str, backend: str | None, directory: Path, port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "kx_sipd",
        "serve",
        "--db",
        str(directory / "kx.sqlite"),
        "--listen",
        f"127.0.0.1:{port}",
        "--driver",
        driver,
        "--log-level",
        "warning",
        "--relay-shards",
        "1",
        "--rtp-range",
        "41000-41099",
    ]
    if backend:
        command += ["--backend", backend]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--window", type=int, default=32)
    args = parser.parse_args()
    reference: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        for driver, backend in DRIVERS:
            port = random.randrange(10000, 20000)
            process = _serve(driver, backend, directory, port)
            try:
                _wait_ready(("127.0.0.1", port))
                label = driver + (f"-{backend}" if backend else "")
                for method in ("OPTIONS", "REGISTER"):
                    rate = _load(("127.0.0.1", port), method, args.count, args.window)
                    base = reference.setdefault(method, rate)
                    print(f"{label:14s} {method:9s} {rate:8.0f} /s  ({rate / base:4.2f}x socket)")
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(30)


if __name__ == "__main__":
    main()
