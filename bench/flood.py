#!/usr/bin/env python3
"""Flood: kx-sipd under several times its capacity, then back to normal.

1. Capacity: REGISTERs without credentials (each a new transaction and a 401
   with a fresh nonce) sent in closed loop, a window of requests outstanding,
   for a few seconds: the answered rate is the server's capacity on this
   machine, measured in the same run as the flood.
2. Flood: the same requests open loop from several sender processes, as fast
   as they go, for ``--seconds``: the offered rate over capacity is printed,
   with what came back (401 answered, 503 with Retry-After, nothing = dropped)
   and the server's resident memory sampled every half second.
3. Recovery: right after the flood, a normal client registers (401, then 200)
   every 0.25 s from a fresh socket until it succeeds: the seconds it took.

    python3 bench/flood.py [--seconds 20] [--senders 3] [--max-transactions N] [--driver anyio]
    python3 bench/flood.py --target 127.0.0.1:5060     # a server you started (no RSS then)

Prints one figure per line and a JSON line (``--json``) for comparisons.
tests/robustness/test_flood.py runs a short version with assertions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "robustness"))

from robust_support import KxServer, Raw

REALM = "sip.kx21.com"


def flood_message(local: tuple[str, int], seq: int, salt: int) -> bytes:
    host, port = local
    return (
        f"REGISTER sip:{REALM} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{salt:x}x{seq:x};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:flood{seq % 1000}@{REALM}>;tag={salt:x}\r\n"
        f"To: <sip:flood{seq % 1000}@{REALM}>\r\n"
        f"Call-ID: {salt:x}-{seq:x}@flood\r\n"
        f"CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:flood@{host}:{port}>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _count(sock: socket.socket, counts: Counter[str]) -> int:
    """Drain whatever answers are waiting; returns how many."""
    got = 0
    while True:
        try:
            data = sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return got
        except ConnectionRefusedError:
            counts["refused"] += 1
            continue
        got += 1
        if data.startswith(b"SIP/2.0 "):
            status = data[8:11].decode("ascii", "replace")
            counts[status] += 1
            if status == "503" and b"Retry-After:" not in data:
                counts["503_without_retry_after"] += 1


def capacity(target: tuple[str, int], seconds: float = 4.0, window: int = 64) -> float:
    """Answers per second with ``window`` requests outstanding (closed loop)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    local = sock.getsockname()
    salt = random.getrandbits(40)
    counts: Counter[str] = Counter()
    sent = answered = 0
    start = time.monotonic()
    last_progress = start
    while time.monotonic() - start < seconds:
        while sent - answered < window:
            sock.sendto(flood_message(local, sent, salt), target)
            sent += 1
        got = _count(sock, counts)
        answered += got
        if got:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > 0.5:
            answered = sent  # lost answers: refill the window
            last_progress = time.monotonic()
        else:
            time.sleep(0.0005)
    elapsed = time.monotonic() - start
    sock.close()
    return sum(v for k, v in counts.items() if k.isdigit()) / elapsed


def _sender(target: tuple[str, int], seconds: float, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One flooding process: open loop, several sockets, counting what comes back."""
    socks = []
    for _ in range(4):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        socks.append(sock)
    salt = random.getrandbits(40) ^ os.getpid()
    messages = [
        [flood_message(sock.getsockname(), seq, salt) for seq in range(5000)] for sock in socks
    ]
    counts: Counter[str] = Counter()
    sent = 0
    start = time.monotonic()
    end = start + seconds
    round_ = 0
    while time.monotonic() < end:
        for index, sock in enumerate(socks):
            batch = messages[index]
            base = (round_ * 64) % len(batch)
            for data in batch[base : base + 64]:
                try:
                    sock.sendto(data, target)
                    sent += 1
                except (BlockingIOError, ConnectionRefusedError):
                    counts["send_blocked"] += 1
            _count(sock, counts)
        round_ += 1
        if base + 64 >= len(messages[0]):
            # New branches for the next pass, so nothing is a retransmission.
            salt += 1
            messages = [
                [flood_message(sock.getsockname(), seq, salt) for seq in range(5000)]
                for sock in socks
            ]
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        for sock in socks:
            _count(sock, counts)
        time.sleep(0.01)
    queue.put((sent, dict(counts), time.monotonic() - start))


def flood(
    target: tuple[str, int], seconds: float, senders: int, rss: KxServer | None
) -> dict[str, object]:
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [
        multiprocessing.Process(target=_sender, args=(target, seconds, queue), daemon=True)
        for _ in range(senders)
    ]
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set() and rss is not None:
            try:
                samples.append(rss.rss_kib())
            except (OSError, RuntimeError):
                return
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
    stop.set()
    sampler.join(timeout=5)
    sent = sum(r[0] for r in results)
    counts: Counter[str] = Counter()
    for r in results:
        counts.update(r[1])
    elapsed = max(r[2] for r in results)
    answered = sum(v for k, v in counts.items() if k.isdigit())
    return {
        "offered_per_s": sent / elapsed,
        "sent": sent,
        "answered": answered,
        "answers": {k: v for k, v in counts.items() if k.isdigit()},
        "dropped": max(0, sent - answered),
        "send_blocked": counts.get("send_blocked", 0),
        "503_without_retry_after": counts.get("503_without_retry_after", 0),
        "rss_kib_samples": samples,
    }


def recovery(target: tuple[str, int], limit: float = 60.0) -> float | None:
    """Seconds until a normal REGISTER (401, then 200) succeeds, or None."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        with Raw(target, bind="127.0.0.1") as raw:
            answer = raw.register("alice", "alice-secret")
        if answer is not None and answer.status == 200:
            return time.monotonic() - start
        time.sleep(0.25)
    return None


def run(
    target: tuple[str, int], *, seconds: float, senders: int, server: KxServer | None
) -> dict[str, object]:
    rss_before = server.rss_kib() if server else None
    cap = capacity(target)
    result = flood(target, seconds, senders, server)
    result["recovery_s"] = recovery(target)
    result["capacity_per_s"] = cap
    result["overload_factor"] = float(result["offered_per_s"]) / cap if cap else None  # type: ignore[arg-type]
    result["rss_kib_before"] = rss_before
    samples = result["rss_kib_samples"]
    assert isinstance(samples, list)
    result["rss_kib_peak"] = max(samples) if samples else None
    result["rss_kib_after"] = server.rss_kib() if server else None
    result["alive"] = server.alive if server else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="HOST:PORT of a running server (default: start one)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--driver", default="anyio", choices=("anyio", "socket"))
    parser.add_argument("--max-transactions", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server: KxServer | None = None
    if args.target:
        host, _, port = args.target.rpartition(":")
        target = (host, int(port))
    else:
        extra = ["--log-level", "warning"]
        if args.max_transactions:
            extra += ["--max-transactions", str(args.max_transactions)]
        directory = Path(tempfile.mkdtemp(prefix="kx-flood-"))
        server = KxServer.start(directory, *extra, driver=args.driver, ipv6=False)
        target = server.address
    try:
        result = run(target, seconds=args.seconds, senders=args.senders, server=server)
    finally:
        if server is not None:
            server.stop()
    samples = result.pop("rss_kib_samples")
    print(f"capacity (closed loop, REGISTER -> 401): {result['capacity_per_s']:.0f}/s")
    print(f"flood offered: {result['offered_per_s']:.0f}/s for {args.seconds:g} s "
          f"= {result['overload_factor']:.1f}x capacity ({result['sent']} datagrams)")  # fmt: skip
    print(f"answers: {result['answers']}, unanswered (dropped): {result['dropped']}")
    print(f"503 without Retry-After: {result['503_without_retry_after']}")
    if server is not None:
        print(f"server RSS KiB: before {result['rss_kib_before']}, peak {result['rss_kib_peak']}, "
              f"after {result['rss_kib_after']} ({len(samples)} samples); alive {result['alive']}")  # type: ignore[arg-type]  # fmt: skip
    print(f"normal REGISTER succeeded {result['recovery_s']:.2f} s after the flood"
          if result["recovery_s"] is not None else "normal REGISTER did NOT succeed within 60 s")  # fmt: skip
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
