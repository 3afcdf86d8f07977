#!/usr/bin/env python3
"""RTP relay benchmark: kx-sipd's relay against a minimal Python relay (the
floor, bench/relay_floor.py) and against no relay at all (direct), in one run.

N calls = 2N endpoints (caller, callee) in separate load processes, each
sending 172-byte RTP packets (G.711, 20 ms) at 50 pps paced evenly, and
receiving; the target is 100*N packets/s. Latency is send -> receive inside
the same load process (both ends of a call live in one process), so "added"
latency is the relay's figure minus direct's at the same N.

Phases (each step lasts --secs after a latching round):
  1. the whole default range: N=250 calls (every port pair of 20000-20999,
     RTCP ports included) for direct, kx and floor: loss and added p50/p99;
  2. a ramp of N for kx and floor on --ramp-range: the highest N each relays
     with < 0.1 % loss (and >= 98 % of the target delivered), its packets/s,
     and the ratio kx/floor.

  python3 bench/relay.py                      # defaults: ~2-3 minutes
  python3 bench/relay.py --ramp 250,500 --secs 2   # quick look
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import multiprocessing as mp
import os
import resource
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rtp_relay import LocalRelay, RelayConfig, start_local_relay  # noqa: E402
from sansio_sip import MediaUnavailable  # noqa: E402

DIRECT = (("", 0), ("", 0))
"""A placeholder destination pair: the endpoints of a call send to each other."""
PKT = 172
PERIOD = 0.020
HEADER = struct.Struct("!BBHII")
TAIL = struct.Struct("!Iq")
PAD = b"\xd5" * (PKT - HEADER.size - TAIL.size)
TICK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ load process


def load_worker(
    dests: list[tuple[tuple[str, int], tuple[str, int]]], secs: float, start_at: float, out: Any
) -> None:
    """Run len(dests) calls: endpoint 2i (caller) sends to dests[i][0], 2i+1 to dests[i][1]."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = 2 * len(dests)
    socks, targets = [], []
    for a, b in dests:
        for target in (a, b):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            socks.append(s)
            targets.append(target)
    if dests and dests[0] == DIRECT:
        targets = [socks[k ^ 1].getsockname() for k in range(n)]
    ep = select.epoll()
    by_fd = {}
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = s
    latencies = array.array("q")
    received = [0]

    def drain(timeout: float, record: bool) -> None:
        for fd, _ in ep.poll(timeout):
            s = by_fd[fd]
            while True:
                try:
                    d = s.recv(2048)
                except BlockingIOError:
                    break
                if len(d) != PKT:
                    continue
                _k, t = TAIL.unpack_from(d, HEADER.size)
                if record and t > 0:
                    received[0] += 1
                    latencies.append(time.perf_counter_ns() - t)

    # Latching rounds: a callee's first packet may be dropped before the caller latched.
    for _round in range(2):
        for k in range(n):
            socks[k].sendto(HEADER.pack(0x80, 0, 0, 0, k) + TAIL.pack(k, 0) + PAD, targets[k])
        end = time.monotonic() + 0.15
        while time.monotonic() < end:
            drain(0.02, False)
    while time.time() < start_at:
        drain(min(0.02, max(0.0, start_at - time.time())), False)
    seq = [0] * n
    sent = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    stop = t0 + secs
    cycle = k = 0
    while True:
        now = time.perf_counter()
        if now >= stop:
            break
        while True:
            due = t0 + cycle * PERIOD + (k / n) * PERIOD
            if due > now:
                break
            seq[k] = (seq[k] + 1) & 0xFFFF
            packet = (
                HEADER.pack(0x80, 0, seq[k], (cycle * 160) & 0xFFFFFFFF, k)
                + TAIL.pack(k, time.perf_counter_ns())
                + PAD
            )
            with contextlib.suppress(BlockingIOError):  # a full buffer counts as sent and lost
                socks[k].sendto(packet, targets[k])
            sent += 1
            k += 1
            if k == n:
                k, cycle = 0, cycle + 1
        due = t0 + cycle * PERIOD + (k / n) * PERIOD
        drain(max(0.0, min(due - time.perf_counter(), 0.005)), True)
    elapsed = time.perf_counter() - t0
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        drain(0.02, True)
    cpu = time.process_time() - cpu0
    for s in socks:
        s.close()
    out.put((sent, received[0], elapsed, cpu, latencies.tobytes()))


def run_load(
    dests: list[tuple[tuple[str, int], tuple[str, int]]], secs: float, procs: int
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    chunks = [dests[i::procs] for i in range(procs) if dests[i::procs]]
    start_at = time.time() + 1.5 + 0.002 * len(dests)
    workers = [
        ctx.Process(target=load_worker, args=(chunk, secs, start_at, out)) for chunk in chunks
    ]
    for w in workers:
        w.start()
    results = [out.get(timeout=secs + 60) for _ in workers]
    for w in workers:
        w.join(10)
    sent = sum(r[0] for r in results)
    received = sum(r[1] for r in results)
    elapsed = max(r[2] for r in results)
    lat = array.array("q")
    for r in results:
        lat.frombytes(r[4])
    ordered = sorted(lat)

    def pct(p: float) -> float | None:
        return (
            round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1e3, 1)
            if ordered
            else None
        )

    return {
        "calls": len(dests),
        "target_pps": round(2 * len(dests) / PERIOD),
        "sent": sent,
        "received": received,
        "loss_pct": round(100.0 * max(0, sent - received) / max(sent, 1), 3),
        "delivered_pps": round(received / elapsed),
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "load_cpu_pct": round(100 * sum(r[3] for r in results) / elapsed, 1),
    }


# ------------------------------------------------------------------ relays under test


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) consumed so far by these processes."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError, ValueError):
            pass
    return total


class Kx:
    name = "kx"

    def __init__(self, rtp_range: tuple[int, int], shards: int) -> None:
        self.relay: LocalRelay = start_local_relay(
            RelayConfig(
                secret=os.urandom(32),
                control=("127.0.0.1", 0),
                rtp_range=rtp_range,
                shards=shards,
                media_host="127.0.0.1",
                media_timeout=600.0,
                log_level="warning",
            )
        )
        self.client = self.relay.client(timeout=1.0)
        self.pids = [self.relay.pid] + [int(s["pid"]) for s in self.client.shard_stats()]
        self.refs: list[str] = []

    def setup(self, calls: int) -> list[tuple[tuple[str, int], tuple[str, int]]]:
        dests = []
        for i in range(calls):
            ref = f"bench-{i}"
            try:
                alloc = self.client.allocate(ref, a_peer=None, echo=False)
            except MediaUnavailable as exc:
                raise SystemExit(
                    f"allocating call {i + 1} of {calls} failed ({exc}): is another relay "
                    "holding ports of the range? choose another with --range/--ramp-range"
                ) from None
            self.refs.append(ref)
            dests.append(((alloc.a_address, alloc.a_port), (alloc.b_address, alloc.b_port)))
        return dests

    def teardown(self) -> None:
        for ref in self.refs:
            self.client.release(ref)
        self.refs.clear()

    def close(self) -> None:
        self.client.close()
        self.relay.stop()


class Floor:
    name = "floor"

    def __init__(self, base: int, calls: int) -> None:
        self.base = base
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "relay_floor.py"), "127.0.0.1", str(base), str(calls)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the floor relay did not start")
        self.pids = [self.proc.pid]

    def setup(self, calls: int) -> list[tuple[tuple[str, int], tuple[str, int]]]:
        return [
            (("127.0.0.1", self.base + 2 * i), ("127.0.0.1", self.base + 2 * i + 1))
            for i in range(calls)
        ]

    def teardown(self) -> None:
        """The floor has no control: a new step starts with a fresh process."""

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def step(relay: Kx | Floor | None, calls: int, secs: float, procs: int) -> dict[str, Any]:
    """One measurement of ``calls`` calls through ``relay`` (None: direct)."""
    if relay is None:
        result = run_load([DIRECT] * calls, secs, procs)
        result.update(mode="direct", relay_us_per_pkt=None)
        return result
    dests = relay.setup(calls)
    cpu0 = tree_cpu(relay.pids)
    result = run_load(dests, secs, procs)
    cpu = tree_cpu(relay.pids) - cpu0
    # CPU per forwarded packet, over the whole step (latching rounds and idle
    # start-up included, which only adds a little to the relay's figure).
    result["relay_us_per_pkt"] = round(1e6 * cpu / max(result["received"], 1), 2)
    result["mode"] = relay.name
    relay.teardown()
    return result


def held(result: dict[str, Any]) -> bool:
    """< 0.1 % loss and >= 98 % of the target rate delivered."""
    return result["loss_pct"] < 0.1 and result["delivered_pps"] >= 0.98 * result["target_pps"]


COLUMNS = (
    "mode",
    "calls",
    "target_pps",
    "delivered_pps",
    "loss_pct",
    "p50_us",
    "p99_us",
    "relay_us_per_pkt",
    "load_cpu_pct",
)


def added(value: float, reference: float) -> str:
    """Relay minus direct latency; a negative difference means the direct run was noisier."""
    difference = round(value - reference, 1)
    return f"{difference} us" if difference >= 0 else f"<0 us (direct noisier by {-difference} us)"


def show(result: dict[str, Any]) -> None:
    print("  ".join(f"{result.get(c)!s:>13}" for c in COLUMNS), flush=True)


KX_AT: dict[int, dict[str, Any]] = {}
"""kx results held during the ramp, by number of calls (for same-N comparisons)."""


def ramp_up(make: Any, ramp: list[int], args: argparse.Namespace) -> dict[str, Any] | None:
    """Steps of growing N; a step is held when one of ``--tries`` attempts holds.
    Stops at the first step not held. ``make(calls)`` gives a relay for a step
    (the same one for kx, a fresh floor process per step)."""
    best = None
    for calls in ramp:
        ok = False
        for _attempt in range(args.tries):
            relay = make(calls)
            try:
                result = step(relay, calls, args.secs, args.load_procs)
            finally:
                if isinstance(relay, Floor):
                    relay.close()
            show(result)
            record(args, result)
            if result["mode"] == "kx" and held(result):
                KX_AT[calls] = result
            if held(result):
                ok = True
                break
        if not ok:
            break
        best = result
    return best


def record(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        with open(args.json, "a") as out:
            out.write(json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--range", default="20000-20999", help="kx relay range for phase 1")
    ap.add_argument("--ramp-range", default="20000-24999", help="kx relay range for phase 2")
    ap.add_argument("--floor-base", type=int, default=26000, help="first port of the floor relay")
    ap.add_argument("--calls", type=int, default=250, help="phase 1 calls")
    ap.add_argument(
        "--ramp", default="50,100,175,250,400,550,700,850,1000,1150", help="phase 2 calls per step"
    )
    ap.add_argument("--secs", type=float, default=4.0, help="seconds per step")
    ap.add_argument("--tries", type=int, default=2, help="attempts per ramp step (noisy hosts)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--load-procs", type=int, default=2)
    ap.add_argument("--phases", default="1,2", help="which phases to run")
    ap.add_argument("--json", help="append every step as a JSON line to this file")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    lo, hi = (int(x) for x in args.range.split("-"))
    rlo, rhi = (int(x) for x in args.ramp_range.split("-"))
    ramp = [int(x) for x in args.ramp.split(",")]
    phases = {int(x) for x in args.phases.split(",")}
    print(
        f"# relay bench: {args.shards} shards, {args.load_procs} load processes, "
        f"{args.secs} s per step, {os.cpu_count()} CPUs"
    )
    print("  ".join(f"{c:>13}" for c in COLUMNS))
    summary: list[str] = []

    if 1 in phases:
        print(f"# phase 1: {args.calls} calls on {lo}-{hi}")
        phase1 = {"direct": step(None, args.calls, args.secs, args.load_procs)}
        show(phase1["direct"])
        kx = Kx((lo, hi), args.shards)
        try:
            phase1["kx"] = step(kx, args.calls, args.secs, args.load_procs)
            show(phase1["kx"])
        finally:
            kx.close()
        floor = Floor(args.floor_base, args.calls)
        try:
            phase1["floor"] = step(floor, args.calls, args.secs, args.load_procs)
            show(phase1["floor"])
        finally:
            floor.close()
        for result in phase1.values():
            record(args, result)
        d = phase1["direct"]
        for name in ("kx", "floor"):
            r = phase1[name]
            summary.append(
                f"{name:>5} @ {r['calls']} calls: {r['delivered_pps']} pps delivered, "
                f"loss {r['loss_pct']} %, p50 {r['p50_us']} / p99 {r['p99_us']} us, added "
                f"p50 {added(r['p50_us'], d['p50_us'])} / p99 {added(r['p99_us'], d['p99_us'])} "
                f"(direct p50 {d['p50_us']} / p99 {d['p99_us']} us), "
                f"relay CPU {r['relay_us_per_pkt']} us/packet"
            )

    if 2 in phases:
        print(f"# phase 2: ramp {ramp} (kx on {rlo}-{rhi}, floor from {args.floor_base})")
        kx = Kx((rlo, rhi), args.shards)
        try:
            best_kx = ramp_up(lambda _calls: kx, ramp, args)
        finally:
            kx.close()
        best_floor = ramp_up(lambda calls: Floor(args.floor_base, calls), ramp, args)
        top = max((b["calls"] for b in (best_kx, best_floor) if b), default=0)
        direct_top = step(None, top, args.secs, args.load_procs) if top else None
        if direct_top:
            show(direct_top)
            record(args, direct_top)
        for name, b in (("kx", best_kx), ("floor", best_floor)):
            if b is None:
                summary.append(f"{name:>5}: held no ramp step")
                continue
            extra = ""
            if direct_top and direct_top["calls"] == b["calls"]:
                extra = (
                    f", added p50 {added(b['p50_us'], direct_top['p50_us'])} / "
                    f"p99 {added(b['p99_us'], direct_top['p99_us'])}"
                )
            summary.append(
                f"{name:>5} largest N held: {b['calls']} calls, {b['delivered_pps']} pps, "
                f"loss {b['loss_pct']} %, p50 {b['p50_us']} us / p99 {b['p99_us']} us{extra}, "
                f"relay CPU {b['relay_us_per_pkt']} us/packet"
            )
        if best_kx and best_floor:
            ratio = best_kx["delivered_pps"] / best_floor["delivered_pps"]
            summary.append(f"ratio kx/floor, highest packets/s held: {ratio:.2f}x")
            if best_kx["calls"] >= best_floor["calls"]:
                same = KX_AT.get(best_floor["calls"])
                if same and same["relay_us_per_pkt"]:
                    summary.append(
                        f"CPU per relayed packet at {best_floor['calls']} calls: floor "
                        f"{best_floor['relay_us_per_pkt']} us / kx {same['relay_us_per_pkt']} us = "
                        f"{best_floor['relay_us_per_pkt'] / same['relay_us_per_pkt']:.2f}x"
                    )

    print("\n# summary")
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
