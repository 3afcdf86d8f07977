#!/usr/bin/env python3
"""The call path inside the engine: cost per call and where it goes.

One call is what bench/calls.py makes SIPp do, seen from kx-sipd: the
client's INVITE -> 401 -> ACK -> INVITE with Authorization -> account look-up
-> 100 -> relay allocation -> the B-leg INVITE to the carrier -> the
carrier's 100, 180, 200 with SDP -> ACK to the carrier, 180 and 200 to the
client -> the client's ACK -> (held) -> the client's BYE -> the call record,
200 to the client, BYE to the carrier -> the carrier's 200. The relay's
answers (AllocateMedia) are given in process as tests/engine_harness.py does;
UpdateMedia, ReleaseMedia and CallRecord are taken and dropped, as a driver
that hands them on would. The messages are those of the anchors' SIPp
scenarios (sipp/uac_call_auth.xml, sipp/uas.xml).

As bench/register_inprocess.py does, the script first *records* N calls
against one engine (the client's digest and the carrier's answers computed
between datagrams), then *replays* the recorded datagrams into a fresh engine
built with the same seed and fed the same clock. The engine is deterministic,
so the replay sends byte for byte what the recording sent (checked), and the
replay loop runs server code only. The calls overlap as on the real bench:
one starts every 1/``--rate`` s and lasts ``--hold`` s, so about rate*hold
calls are up at once and the transaction and call timers fire on the way.

The replay runs with the cyclic collector as ``kx-sipd serve`` sets it
(``--gc server``: start-up objects frozen, thresholds ``kx_sipd.app.GC_THRESHOLDS``);
``--gc default`` keeps CPython's 700/10/10.

* ``--callgrind``: instructions per call (valgrind, replay of N minus replay
  of 0, over N: stable however loaded the machine is);
* ``--profile``: the split of the replay's time by layer (cProfile).

``--relay`` measures the relay's control per call instead, the same two ways
(allocate, update and delete: the client's framing and the shard's handling,
in process, with no socket between them). ``--relay-loop`` measures a
driver's side of those commands against a local relay: the CPU of this
process per call through worker threads and awaited directly.

``--driver uvloop|asyncio|trio`` measures io_anyio instead: a datagram in and
its answer out, one at a time, with the echo engine of the driver tests (with
``--callgrind``: instructions per round trip, the client in the same process).

  python3 bench/calls_inprocess.py [--n 2000] [--rate 200] [--hold 10]
                                   [--profile] [--callgrind] [--relay] [--relay-loop]
                                   [--driver uvloop|asyncio|trio]
"""

from __future__ import annotations

import argparse
import functools
import heapq
import os
import pickle
import random
import re
import sys
import tempfile
import time
from collections.abc import Generator
from pathlib import Path

from _measure import instructions, print_profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sansio_sip import (  # noqa: E402
    Account,
    AllocateMedia,
    Engine,
    EngineConfig,
    LookupAccount,
    MediaAllocation,
    Route,
    Send,
    Transport,
    parse_message,
)
from sansio_sip._digest import (  # noqa: E402
    answer_challenge,
    compute_ha1,
    make_authorization,
    parse_challenge,
)

REALM = "sip.example.com"
SERVER = ("127.0.0.1", 5060)
CLIENT = ("127.0.0.1", 5061)
CARRIER = ("127.0.0.1", 5080)
RELAY = "127.0.0.1"
USER, PASSWORD = "1001", "secret1001"
DIALED = "17752180264"
WALL = 1_780_000_000.0

OFFER = (
    "v=0\r\n"
    "o={user} 53655765 2353687637 IN IP4 127.0.0.1\r\n"
    "s=call\r\n"
    "c=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\n"
    "m=audio 6000 RTP/AVP 0 8 101\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=ptime:20\r\n"
)
ANSWER = (
    "v=0\r\n"
    "o=carrier 53655765 2353687637 IN IP4 127.0.0.1\r\n"
    "s=-\r\n"
    "c=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\n"
    "m=audio 6002 RTP/AVP 0\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=ptime:20\r\n"
)
INVITE = (
    "INVITE sip:{dialed}@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5061;branch={branch};rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:{user}@anchor.test>;tag={tag}\r\n"
    "To: <sip:{dialed}@anchor.test>\r\n"
    "Call-ID: {call_id}\r\n"
    "CSeq: {cseq} INVITE\r\n"
    "Contact: <sip:{user}@127.0.0.1:5061;transport=udp>\r\n"
    "{authorization}"
    "User-Agent: SIPp-anchor\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: {length}\r\n"
    "\r\n"
    "{body}"
)
IN_DIALOG = (  # the client's ACKs and BYE
    "{method} {uri} SIP/2.0\r\n"
    "{via}\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:{user}@anchor.test>;tag={tag}\r\n"
    "{to}\r\n"
    "Call-ID: {call_id}\r\n"
    "CSeq: {cseq} {method}\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
)
CARRIER_RESPONSE = (
    "SIP/2.0 {status}\r\n{echoed}{contact}{content_type}Content-Length: {length}\r\n\r\n{body}"
)

# Layers: by file; the parser's own modules together. Built-in functions and
# attrs-generated methods are charged to the layer of their caller.
FILE_LAYERS = {
    "_message.py": "message parse/build", "_headers.py": "message parse/build",
    "_uri.py": "message parse/build", "_framing.py": "message parse/build",
    "_wire.py": "message parse/build",
    "_transaction.py": "transaction layer", "_timers.py": "transaction layer",
    "_digest.py": "digest + nonces", "_auth.py": "digest + nonces",
    "_engine.py": "engine + TU + guard", "_tu.py": "engine + TU + guard",
    "_guard.py": "engine + TU + guard", "_devices.py": "engine + TU + guard",
    "_actions.py": "engine + TU + guard", "_model.py": "call layer (B2BUA)",
    "_call.py": "call layer (B2BUA)", "_dialog.py": "call layer (B2BUA)",
    "_sdp.py": "SDP parse/rewrite",
    "calls_inprocess.py": "this script (feeding)",
}  # fmt: skip


def layer_of(func: tuple[str, int, str]) -> str | None:
    """The layer of a profiled function, None for built-ins and generated code."""
    return FILE_LAYERS.get(os.path.basename(func[0]))


# ------------------------------------------------------------------ the engine


def make_engine(seed: int) -> Engine:
    rng = random.Random(seed)
    config = EngineConfig(
        nonce_secret=b"k" * 32, sip_address=SERVER, realm=REALM, max_calls=100_000
    )
    return Engine(config, entropy=rng.randbytes)


def account() -> Account:
    return Account(
        username=USER,
        ha1={"MD5": compute_ha1(USER, REALM, PASSWORD)},
        route=Route(name="carrier", host=CARRIER[0], port=CARRIER[1]),
    )


class Server:
    """One engine with its store and relay answered in process."""

    def __init__(self, seed: int) -> None:
        self.engine = make_engine(seed)
        self.account = account()
        self.port = 20000
        self.sent: list[Send] = []

    def perform(self, actions: list[object], now: float) -> list[Send]:
        engine, wall = self.engine, WALL + now
        out: list[Send] = []
        for action in actions:
            if isinstance(action, Send):
                out.append(action)
            elif isinstance(action, LookupAccount):
                out += self.perform(
                    engine.account_found(action.token, self.account, now=now, wall=wall), now
                )
            elif isinstance(action, AllocateMedia):
                allocation = MediaAllocation(
                    call_ref=action.call_ref,
                    a_address=RELAY,
                    a_port=self.port,
                    b_address=RELAY,
                    b_port=self.port + 2,
                )
                self.port = 20000 + (self.port - 20000 + 4) % 40000
                out += self.perform(
                    engine.media_allocated(action.token, allocation, now=now, wall=wall), now
                )
            # CallRecord, UpdateMedia, ReleaseMedia, Log: a driver hands them on.
        return out

    def feed(self, data: bytes, source: tuple[str, int], now: float) -> list[Send]:
        """Fire the timers due by ``now``, then take one datagram."""
        engine = self.engine
        while (due := engine.next_timer()) is not None and due <= now:
            self.sent += self.perform(engine.handle_timer(now=due, wall=WALL + due), due)
        sends = self.perform(
            engine.receive(data, source=source, transport=Transport.UDP, now=now, wall=WALL + now),
            now,
        )
        self.sent += sends
        return sends


# ------------------------------------------------------------- one call's script

Step = tuple[bytes, tuple[str, int], float]
Script = Generator[Step, list[Send], None]


def _header_lines(data: bytes, names: tuple[str, ...]) -> str:
    """The raw lines of ``names`` in ``data`` (as SIPp's [last_X:] copies them)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    wanted = {name.lower() for name in names}
    return "".join(
        line + "\r\n" for line in head.split("\r\n")[1:] if line.split(":", 1)[0].lower() in wanted
    )


def _to_line(message: bytes) -> str:
    return _header_lines(message, ("To",)).rstrip("\r\n")


def _only(sends: list[Send], destination: tuple[str, int], start: bytes) -> bytes:
    found = [s.data for s in sends if s.destination == destination and s.data.startswith(start)]
    if len(found) != 1:
        got = [s.data.split(b"\r\n", 1)[0] for s in sends]
        sys.exit(f"expected one {start!r} to {destination}, the engine sent {got}")
    return found[0]


def call_script(i: int, start: float, hold: float) -> Script:
    """Call ``i`` as SIPp's UAC and UAS play it; each yield is one datagram."""
    tag, call_id = f"{i}c{i}", f"{i}-bench@127.0.0.1"
    body = OFFER.format(user=USER)
    fields = dict(dialed=DIALED, user=USER, tag=tag, call_id=call_id, body=body, length=len(body))
    first = INVITE.format(branch=f"z9hG4bK-a{i}", cseq=1, authorization="", **fields).encode()
    sends = yield first, CLIENT, start
    challenge = _only(sends, CLIENT, b"SIP/2.0 401")
    ack = IN_DIALOG.format(
        method="ACK", uri=f"sip:{DIALED}@127.0.0.1:5060",
        via=f"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-a{i};rport",
        user=USER, tag=tag, to=_to_line(challenge), call_id=call_id, cseq=1,
    )  # fmt: skip
    yield ack.encode(), CLIENT, start + 0.001
    header = parse_message(challenge).headers.get("WWW-Authenticate") or ""
    credentials = answer_challenge(
        parse_challenge(header),
        username=USER,
        ha1=compute_ha1(USER, REALM, PASSWORD),
        method="INVITE",
        uri=f"sip:{DIALED}@127.0.0.1:5060",
        cnonce=f"{i:08x}",
        nc=1,
    )
    authorization = f"Authorization: {make_authorization(credentials)}\r\n"
    second = INVITE.format(branch=f"z9hG4bK-b{i}", cseq=2, authorization=authorization, **fields)
    sends = yield second.encode(), CLIENT, start + 0.002
    b_invite = _only(sends, CARRIER, b"INVITE ")
    echoed = _header_lines(b_invite, ("Via", "From", "Call-ID", "CSeq"))
    to = _to_line(b_invite)
    contact = "Contact: <sip:carrier@127.0.0.1:5080;transport=udp>\r\n"
    yield (
        CARRIER_RESPONSE.format(
            status="100 Trying", echoed=echoed + to + "\r\n", contact="", content_type="",
            length=0, body="",
        ).encode(),
        CARRIER,
        start + 0.003,
    )  # fmt: skip
    tagged = f"{to};tag={i}u{i}\r\n"
    yield (
        CARRIER_RESPONSE.format(
            status="180 Ringing", echoed=echoed + tagged, contact=contact, content_type="",
            length=0, body="",
        ).encode(),
        CARRIER,
        start + 0.004,
    )  # fmt: skip
    sends = yield (
        CARRIER_RESPONSE.format(
            status="200 OK", echoed=echoed + tagged, contact=contact,
            content_type="Content-Type: application/sdp\r\n", length=len(ANSWER), body=ANSWER,
        ).encode(),
        CARRIER,
        start + 0.005,
    )  # fmt: skip
    ok = _only(sends, CLIENT, b"SIP/2.0 200")
    _only(sends, CARRIER, b"ACK ")
    contact_uri = re.search(rb"Contact: <([^>]*)>", ok)
    assert contact_uri is not None
    uri = contact_uri.group(1).decode()
    for method, cseq, branch, when in (
        ("ACK", 2, f"z9hG4bK-c{i}", start + 0.006),
        ("BYE", 3, f"z9hG4bK-d{i}", start + hold),
    ):
        message = IN_DIALOG.format(
            method=method, uri=uri, via=f"Via: SIP/2.0/UDP 127.0.0.1:5061;branch={branch};rport",
            user=USER, tag=tag, to=_to_line(ok), call_id=call_id, cseq=cseq,
        )  # fmt: skip
        sends = yield message.encode(), CLIENT, when
    bye = _only(sends, CARRIER, b"BYE ")
    _only(sends, CLIENT, b"SIP/2.0 200")
    yield (
        CARRIER_RESPONSE.format(
            status="200 OK",
            echoed=_header_lines(bye, ("Via", "From", "To", "Call-ID", "CSeq")),
            contact="", content_type="", length=0, body="",
        ).encode(),
        CARRIER,
        start + hold + 0.001,
    )  # fmt: skip


def record(n: int, rate: float, hold: float, seed: int) -> tuple[list[Step], list[bytes]]:
    """N overlapping calls against one engine: the datagrams, and what it sent."""
    server = Server(seed)
    steps: list[Step] = []
    queue: list[tuple[float, int, Script, Step]] = []
    for i in range(n):
        script = call_script(i, 1000.0 + i / rate, hold)
        queue.append((1000.0 + i / rate, i, script, next(script)))
    heapq.heapify(queue)
    while queue:
        _, i, script, step = heapq.heappop(queue)
        steps.append(step)
        sends = server.feed(*step)
        try:
            following = script.send(sends)
        except StopIteration:
            continue
        heapq.heappush(queue, (following[2], i, script, following))
    return steps, [s.data for s in server.sent]


def server_gc(setting: str) -> None:
    """The cyclic collector as ``kx-sipd serve`` settles it once up
    (``kx_sipd.app.settle_gc``), or CPython's default, untouched."""
    if setting == "server":
        from kx_sipd.app import settle_gc

        settle_gc()


def replay(steps: list[Step], seed: int) -> list[bytes]:
    server = Server(seed)
    for data, source, now in steps:
        server.feed(data, source, now)
    return [s.data for s in server.sent]


# ------------------------------------------------------------ the relay's control


def relay_calls(n: int, *, handle: bool) -> float:
    """The relay control of n calls, in process: for each, the client's
    allocate, update and delete commands (``RelayClient``'s framing), the
    shard's handling of each (``Shard.handle_control``: ports bound and
    closed, the call's media state), and the client opening each reply. No
    socket between them. Returns the CPU seconds spent (0 without ``handle``)."""
    from rtp_relay import RelayClient, RelayConfig
    from rtp_relay._protocol import open_datagram
    from rtp_relay._shard import Shard

    secret = b"s" * 32
    config = RelayConfig(
        secret=secret,
        control=("127.0.0.1", 9),
        rtp_range=(50000, 53999),
        shards=1,
        media_host="127.0.0.1",
        log_level="error",
    )
    shard = Shard(config, 0, 1, 0)
    client = RelayClient(config.control, secret)
    if not handle:
        return 0.0
    t0 = time.process_time()
    for i in range(n):
        ref = f"{i:024x}"
        commands = (
            ("allocate", {"call": ref, "a_peer": ["127.0.0.1", 6000], "echo": False}),
            ("update", {"call": ref, "a_peer": None, "b_peer": ["127.0.0.1", 6002],
                        "a_events": 101, "b_events": None}),
            ("delete", {"call": ref}),
        )  # fmt: skip
        for op, fields in commands:
            _, datagram = client._request(op, **fields)
            reply = shard.handle_control(datagram, now=time.monotonic(), wall=time.time())
            if reply is None or not open_datagram(secret, reply).get("ok"):
                sys.exit(f"the shard refused {op}: {reply!r}")
    return time.process_time() - t0


def relay_from_a_loop(n: int) -> None:
    """A driver's side of the relay's control: the CPU this process spends per
    call on the three commands, sent to a local relay (its own processes) from
    an AnyIO loop through worker threads (the blocking client) and awaited
    directly (``*_async``), alternately, twice."""
    import anyio

    from rtp_relay import RelayConfig, start_local_relay

    config = RelayConfig(
        secret=b"relay-bench-secret-0123456789",
        control=("127.0.0.1", 0),
        rtp_range=(52000, 53999),
        shards=1,
        media_host="127.0.0.1",
        log_level="error",
    )
    relay = start_local_relay(config)
    client = relay.client()

    async def threads(count: int, tag: str) -> None:
        for i in range(count):
            ref = f"{tag}{i:08d}"
            await anyio.to_thread.run_sync(
                functools.partial(client.allocate, ref, a_peer=("127.0.0.1", 6000), echo=False)
            )
            await anyio.to_thread.run_sync(
                functools.partial(
                    client.update, ref, a_peer=None, b_peer=("127.0.0.1", 6002), a_events=101
                )
            )
            await anyio.to_thread.run_sync(client.release, ref)

    async def awaited(count: int, tag: str) -> None:
        for i in range(count):
            ref = f"{tag}{i:08d}"
            await client.allocate_async(ref, a_peer=("127.0.0.1", 6000), echo=False)
            await client.update_async(ref, a_peer=None, b_peer=("127.0.0.1", 6002), a_events=101)
            await client.release_async(ref)

    async def main() -> None:
        await threads(20, "warm-t")
        await awaited(20, "warm-a")
        for round_ in range(2):
            for name, run in (("worker threads", threads), ("awaited", awaited)):
                t0, w0 = time.process_time(), time.monotonic()
                await run(n, f"{name[0]}{round_}-")
                cpu, wall = time.process_time() - t0, time.monotonic() - w0
                print(
                    f"relay commands {name:<15} {cpu / n * 1e6:7,.0f} us CPU per call in this "
                    f"process, {wall / n * 1e3:.2f} ms wall (n={n})"
                )

    try:
        anyio.run(main)
    finally:
        client.close()
        relay.stop()


def callgrind_relay(args: argparse.Namespace) -> None:
    run = ("--relay", "--n", str(args.n), "--replays")
    counts = [instructions(__file__, *run, str(k)) for k in (0, args.n)]
    print(
        f"callgrind: {(counts[1] - counts[0]) / args.n:,.0f} instructions per call of relay "
        f"control (allocate, update, delete; n={args.n}; user space only)"
    )


def callgrind(args: argparse.Namespace) -> None:
    """Instructions per call: (replay of n) - (replay of 0), over n. The calls
    are recorded here, natively; the two runs under valgrind load them."""
    steps, _ = record(args.n, args.rate, args.hold, args.seed)
    with tempfile.NamedTemporaryFile(suffix=".pickle") as saved:
        pickle.dump(steps, saved)
        saved.flush()
        run = ("--seed", str(args.seed), "--steps", saved.name, "--gc", args.gc, "--replays")
        counts = [instructions(__file__, *run, str(k)) for k in (0, 1)]
    print(
        f"callgrind: {(counts[1] - counts[0]) / args.n:,.0f} instructions per call "
        f"(n={args.n}, rate={args.rate:g}/s, hold={args.hold:g} s, {args.gc} GC)"
    )


def driver_round_trips(n: int, backend: str) -> None:
    """``n`` datagrams through io_anyio's ``Server`` one at a time (each answered
    before the next is sent), with tests/unit/driver_fakes.py's echo engine: the
    driver's own cost per datagram in and out (receive, input queue, loop wake-up,
    send), which a call pays for each of its 17 SIP datagrams. The client runs in
    this process, the same for every version measured."""
    import socket

    import anyio.from_thread

    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from driver_fakes import FakeEngine, FakeRelay, FakeStore

    import io_anyio

    server = io_anyio.Server(
        FakeEngine(),
        store=FakeStore(),
        relay=FakeRelay(),
        options=io_anyio.DriverOptions(listen=(("127.0.0.1", 0),), handle_signals=False),
    )
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    name = "asyncio" if backend == "uvloop" else backend
    with anyio.from_thread.start_blocking_portal(name, backend_options=options) as portal:
        future, addresses = portal.start_task(server.serve)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5.0)
            sock.connect(addresses[0])
            # A deadline far away, as a real engine always has one (transaction timers).
            sock.send(b"TIMER 3600")
            for _ in range(20 + n):
                sock.send(b"ECHO x")
                sock.recv(100)
        portal.call(server.shutdown)
        future.result(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="calls")
    ap.add_argument("--rate", type=float, default=200.0, help="calls started per virtual second")
    ap.add_argument("--hold", type=float, default=10.0, help="virtual seconds each call lasts")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="split the replay's time by layer")
    ap.add_argument("--callgrind", action="store_true", help="instructions per call")
    ap.add_argument(
        "--gc",
        choices=("server", "default"),
        default="server",
        help="the cyclic collector as kx-sipd serve sets it (default), or CPython's default",
    )
    ap.add_argument("--replays", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--relay", action="store_true", help="the relay's control per call instead of the engine"
    )
    ap.add_argument(
        "--relay-loop",
        action="store_true",
        help="a driver's CPU per call for the relay commands: worker threads vs awaited",
    )
    ap.add_argument(
        "--driver",
        choices=("uvloop", "asyncio", "trio"),
        default=None,
        help="io_anyio's cost per datagram round trip (echo engine) instead of the engine",
    )
    ap.add_argument("--driver-run", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver is not None:
        if args.driver_run is not None:
            driver_round_trips(args.driver_run, args.driver)
            return
        n = min(args.n, 1000)
        if args.callgrind:
            script = str(Path(__file__).resolve())
            counts = [
                instructions(script, "--driver", args.driver, "--driver-run", str(count))
                for count in (0, n)
            ]
            print(
                f"io_anyio on {args.driver}: {(counts[1] - counts[0]) / n:,.0f} instructions "
                f"per datagram round trip (n={n}, echo engine, the client included)"
            )
        else:
            t0 = time.process_time()
            driver_round_trips(n, args.driver)
            print(
                f"io_anyio on {args.driver}: {(time.process_time() - t0) / n * 1e6:,.1f} us CPU "
                f"per datagram round trip (n={n}, echo engine, the client and start-up included)"
            )
        return
    if args.relay_loop:
        relay_from_a_loop(min(args.n, 1000))
        return
    if args.relay:
        if args.callgrind:
            callgrind_relay(args)
        elif args.replays is not None:
            relay_calls(args.n, handle=args.replays > 0)
        else:
            cpu = relay_calls(args.n, handle=True)
            print(f"relay control: {cpu / args.n * 1e6:,.1f} us CPU per call (n={args.n})")
        return
    if args.callgrind:
        callgrind(args)
        return
    if args.replays is not None:  # a run callgrind counts: load the calls, replay 0 or 1 time
        with args.steps.open("rb") as saved:
            loaded: list[Step] = pickle.load(saved)
        make_engine(args.seed)
        server_gc(args.gc)
        if args.replays:
            replay(loaded, args.seed)
        return
    steps, recorded = record(args.n, args.rate, args.hold, args.seed)
    server_gc(args.gc)
    t0 = time.process_time()
    replayed = replay(steps, args.seed)
    cpu = time.process_time() - t0
    if replayed != recorded:
        sys.exit("the replay did not send what the recording sent")
    print(
        f"python {sys.version.split()[0]}  {args.gc} GC  n={args.n} calls ({len(steps) / args.n:g} datagrams "
        f"in, {len(replayed) / args.n:g} out each)  {cpu / args.n * 1e6:,.1f} us CPU per call, "
        f"{args.n / cpu:,.0f} calls/s"
    )
    if args.profile:
        print_profile(lambda: replay(steps, args.seed), cpu, layer_of, top=25)


if __name__ == "__main__":
    main()
