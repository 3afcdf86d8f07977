#!/usr/bin/env python3
"""Soak: kx-sipd under mixed traffic for a long time, memory watched.

For ``--minutes`` (10 by default) a fresh ``kx-sipd serve`` on loopback gets,
all at once:

* registrations: SIPp (tests/robustness/sipp/register.xml), ``--register-rate`` per second;
* calls: SIPp client (call.xml, each call ``--call-seconds`` long) through
  kx-sipd to a SIPp carrier (carrier.xml), ``--call-rate`` per second;
* failed logins: wrong passwords from rotating 127.x.y.z sources (below the
  ban threshold each), a few per second, so the guard's tables fill;
* bad packets: a mix from the robustness catalogue (garbage, truncated and
  oversize datagrams, missing headers, NUL bytes, deep Via stacks, hostile
  TCP), ``--bad-rate`` per second.

The server's resident memory is sampled every 5 s. Printed: RSS after the
warm-up and at the end, their ratio (the issue asks for the end within 10 %
of the warm-up figure), the peak, SIPp's successful and failed registrations and
calls, the bad packets sent, the machine's load average, and the engine's
counters at exit.

Finding what grows (docs/robustness.md, Soak): RSS alone does not say. What
worked: a ``sitecustomize.py`` on ``PYTHONPATH`` (the server inherits it) that,
in the ``kx_sipd serve`` process only, logs every 10 s ``mallinfo2`` (glibc:
in use vs. freed-but-kept heap), ``sqlite3_memory_used``, descriptors on the
database and ``gc.get_count()``, and every minute or so runs
``gc.set_debug(gc.DEBUG_SAVEALL); gc.collect()`` and counts the garbage by
type (exceptions with their traceback): anything there is a reference cycle
that waits for the collector, which ``serve`` runs rarely.

    python3 bench/soak.py [--minutes 10] [--warmup S] [--driver anyio] [--json]

The warm-up is the time the server's time-bounded tables take to fill: used
nonces and the per-account device table live 300 s (``nonce_lifetime``,
``register_expires``), transactions 32 s, so memory rises for about five
minutes under steady traffic and is flat after. The default warm-up is
therefore 330 s (or half the run, if shorter); 10 % of the run would measure
that filling as growth.

tests/robustness/test_soak.py runs a 60 s version (KX_SLOW=1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "robustness"))

from robust_support import (
    KxServer,
    Raw,
    authorization,
    free_port,
    make_database,
    nonce_of,
    start_sipp,
    stop_process,
)

REALM = "sip.kx21.com"


def bad_packets(rng: random.Random) -> list[bytes]:
    """One of each kind of malformed datagram (fresh branches each call)."""
    branch = f"z9hG4bK{rng.getrandbits(48):012x}"
    good = (
        f"OPTIONS sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch={branch}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:x@{REALM}>;tag=1\r\nTo: <sip:x@{REALM}>\r\n"
        f"Call-ID: {rng.getrandbits(64):x}@soak\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    return [
        rng.randbytes(rng.randint(1, 1400)),
        good[: rng.randint(1, len(good) - 1)],
        good.replace(b"Call-ID", b"X-Call-ID"),
        good.replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE"),
        good.replace(b"Max-Forwards: 70", b"Max-Forwards: 70\r\nSubject: a\x00b"),
        good.replace(b"Content-Length: 0", b"Content-Length: 99999"),
        good.replace(b"Max-Forwards", "\r\n".join(f"X{i}: {i}" for i in range(300)).encode() + b"\r\nMax-Forwards"),
        good.replace(b"Via:", "".join(f"Via: SIP/2.0/UDP h{i}:5060;branch=z9hG4bKv{i}\r\n" for i in range(80)).encode() + b"Via:"),
        good.replace(b"OPTIONS sip:", b"FOO sip:"),
        good.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1),
        b"SIP/2.0 200 OK\r\n" + good.split(b"\r\n", 1)[1],
        good + b"X" * rng.randint(0, 9000),
    ]  # fmt: skip


class Hostile(threading.Thread):
    """Bad packets and failed logins at fixed rates until stopped."""

    def __init__(self, server: KxServer, bad_rate: float, failure_rate: float) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.bad_rate = bad_rate
        self.failure_rate = failure_rate
        self.stop = threading.Event()
        self.bad_sent = 0
        self.failures_sent = 0
        self.tcp_sent = 0

    def run(self) -> None:
        rng = random.Random(11)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        next_failure = time.monotonic()
        next_tcp = time.monotonic()
        pool: list[bytes] = []
        while not self.stop.is_set():
            if not pool:
                pool = bad_packets(rng)
                rng.shuffle(pool)
            try:
                sock.sendto(pool.pop(), self.server.address)
                self.bad_sent += 1
            except OSError:
                pass
            while True:  # answers are not needed: drain them
                try:
                    sock.recv(65535)
                except OSError:
                    break
            now = time.monotonic()
            if self.failure_rate and now >= next_failure:
                next_failure = now + 1.0 / self.failure_rate
                self._failed_login(rng)
            if now >= next_tcp:
                next_tcp = now + 2.0
                self._tcp_garbage(rng)
            self.stop.wait(1.0 / self.bad_rate)
        sock.close()

    def _failed_login(self, rng: random.Random) -> None:
        source = f"127.{rng.randrange(1, 250)}.{rng.randrange(0, 250)}.{rng.randrange(2, 250)}"
        uri = f"sip:{REALM}"
        user = rng.choice(("alice", "carol", "nobody", f"u{rng.randrange(10_000)}"))
        try:
            with Raw(self.server.address, bind=source) as raw:
                raw.send(raw.request("REGISTER", uri, user=user))
                challenge = raw.final(timeout=2.0)
                if challenge is None or challenge.status != 401:
                    return
                auth = authorization(user, "wrong", "REGISTER", uri, nonce_of(challenge))
                raw.send(raw.request("REGISTER", uri, user=user, new_call=False,
                                     headers=(("Authorization", auth),)))  # fmt: skip
                raw.final(timeout=0.2)  # answers may be slowed down: no need to wait
                self.failures_sent += 1
        except OSError:
            pass

    def _tcp_garbage(self, rng: random.Random) -> None:
        try:
            with socket.create_connection(self.server.address, timeout=1.0) as conn:
                conn.sendall(rng.randbytes(rng.randint(10, 3000)))
                self.tcp_sent += 1
        except OSError:
            pass


def sipp_counts(path: Path) -> dict[str, int]:
    """Successful and failed calls from a SIPp screen dump (its stdout)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    out = {}
    for key, label in (("successful", "Successful call"), ("failed", "Failed call")):
        found = re.findall(rf"{label}\s*\|\s*\d+\s*\|\s*(\d+)", text)
        out[key] = int(found[-1]) if found else -1
    return out


def soak(
    seconds: float, *, warmup: float, driver: str, register_rate: float, call_rate: float,
    call_seconds: float, bad_rate: float, failure_rate: float, directory: Path,
) -> dict[str, object]:  # fmt: skip
    carrier_port = free_port()
    db = make_database(directory / "kx.sqlite", carrier=("127.0.0.1", carrier_port))
    carrier = start_sipp(
        "carrier.xml", "-i", "127.0.0.1", "-p", str(carrier_port), "-m", "10000000",
        directory=directory, name="carrier",
    )  # fmt: skip
    server = KxServer.start(directory, "--log-level", "info", driver=driver, db=db, ipv6=False)
    target = f"127.0.0.1:{server.port}"
    run_for = int(seconds)
    registers = start_sipp(
        "register.xml", "-i", "127.0.0.2", "-p", "0", "-s", "alice", "-au", "alice",
        "-ap", "alice-secret", "-r", f"{register_rate:g}", "-m", str(int(register_rate * run_for)),
        "-timeout", f"{run_for + 60}s", target, directory=directory, name="registers",
    )  # fmt: skip
    calls = start_sipp(
        "call.xml", "-i", "127.0.0.3", "-p", "0", "-s", "17752180264", "-au", "alice",
        "-ap", "alice-secret", "-r", f"{call_rate:g}", "-m", str(int(call_rate * run_for)),
        "-d", str(int(call_seconds * 1000)), "-timeout", f"{run_for + 60}s", target,
        directory=directory, name="calls",
    )  # fmt: skip
    hostile = Hostile(server, bad_rate, failure_rate)
    hostile.start()
    load_at_start = os.getloadavg()
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds and server.alive:
            samples.append((time.monotonic() - start, server.rss_kib()))
            time.sleep(5.0)
        samples.append((time.monotonic() - start, server.rss_kib()))
        hostile.stop.set()
        hostile.join(timeout=10)
        for process in (registers, calls):
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                stop_process(process)
        alive = server.alive
    finally:
        hostile.stop.set()
        for process in (registers, calls, carrier):
            stop_process(process)
        server.stop()
    after_warmup = next(rss for t, rss in samples if t >= warmup)
    end = samples[-1][1]
    return {
        "seconds": seconds,
        "warmup_s": warmup,
        "rss_kib_after_warmup": after_warmup,
        "rss_kib_end": end,
        "rss_kib_peak": max(rss for _, rss in samples),
        "rss_end_over_warmup": end / after_warmup,
        "rss_kib_samples": samples,
        "registrations": sipp_counts(directory / "sipp-registers.out"),
        "calls": sipp_counts(directory / "sipp-calls.out"),
        "bad_packets_sent": hostile.bad_sent,
        "failed_logins_sent": hostile.failures_sent,
        "tcp_garbage_connections": hostile.tcp_sent,
        "alive_at_end": alive,
        "load_average_start_end": (load_at_start[0], os.getloadavg()[0]),
        "engine": server.exit_stats() if _has_exit_line(server) else {},
    }


def _has_exit_line(server: KxServer) -> bool:
    return any(e.get("event") == "server.exited" for e in server.log_events())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds (default: 330, or half the run)"
    )
    parser.add_argument("--driver", default="anyio", choices=("anyio", "socket"))
    parser.add_argument("--register-rate", type=float, default=5.0)
    parser.add_argument("--call-rate", type=float, default=2.0)
    parser.add_argument("--call-seconds", type=float, default=3.0)
    parser.add_argument("--bad-rate", type=float, default=50.0)
    parser.add_argument("--failure-rate", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("sipp") is None:
        sys.exit("soak needs SIPp (scripts/install-test-deps.sh)")
    seconds = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(330.0, seconds / 2)
    directory = Path(tempfile.mkdtemp(prefix="kx-soak-"))
    result = soak(
        seconds, warmup=warmup, driver=args.driver, register_rate=args.register_rate,
        call_rate=args.call_rate, call_seconds=args.call_seconds, bad_rate=args.bad_rate,
        failure_rate=args.failure_rate, directory=directory,
    )  # fmt: skip
    print(f"soak {seconds:g} s ({args.driver}), files in {directory}")
    print(f"RSS after warm-up ({warmup:g} s): {result['rss_kib_after_warmup']} KiB")
    print(f"RSS at the end: {result['rss_kib_end']} KiB "
          f"(x{result['rss_end_over_warmup']:.3f} of warm-up), peak {result['rss_kib_peak']} KiB")  # fmt: skip
    print(f"registrations {result['registrations']}, calls {result['calls']}")
    load_start, load_end = result["load_average_start_end"]
    print(f"load average (1 min) at the start and the end: {load_start:.2f}, {load_end:.2f} "
          "(the server shares the machine: a starved server queues more)")  # fmt: skip
    print(f"bad packets {result['bad_packets_sent']}, failed logins {result['failed_logins_sent']}, "
          f"TCP garbage connections {result['tcp_garbage_connections']}, alive {result['alive_at_end']}")  # fmt: skip
    if args.json:
        print(json.dumps({k: v for k, v in result.items()}))


if __name__ == "__main__":
    main()
