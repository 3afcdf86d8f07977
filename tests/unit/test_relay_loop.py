"""``RelayClient.on_loop``: the relay's operations as callbacks of an asyncio loop.

Against a scripted relay (a UDP socket in the test that answers, drops or
forges as each test says) and against a real local relay, on asyncio and
uvloop: each operation ends exactly once, never inside the call that starts
it, with the blocking client's results and errors; a lost reply is
retransmitted as the same datagram; a forged or stale reply changes nothing;
``close()`` drops what is under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rtp_relay import LoopRelay, RelayClient, RelayConfig, start_local_relay
from rtp_relay._protocol import open_datagram, seal
from sansio_sip import MediaAllocation, MediaStats, MediaUnavailable

SECRET = b"loop-relay-test-secret-0123456789"


def _run(flavour: str, main: Callable[[], Any]) -> Any:
    if flavour == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())
    return asyncio.run(main())


class ScriptedRelay:
    """A relay's control socket whose answers the test writes: ``answer(request)``
    returns the reply's fields (``c`` is added), or None to stay silent."""

    def __init__(self, answer: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.answer = answer
        self.received: list[tuple[dict[str, Any], bytes]] = []
        self.peers: list[tuple[str, int]] = []  # where each request came from

    def serve(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                self.take_one()
            except BlockingIOError:
                return

    def take_one(self) -> None:
        """Read one request and answer it (raises as the socket's recvfrom does)."""
        data, peer = self.sock.recvfrom(65535)
        request = open_datagram(SECRET, data)
        self.received.append((request, data))
        self.peers.append(peer)
        fields = self.answer(request)
        if fields is not None:
            self.sock.sendto(seal(SECRET, {"c": request["c"], **fields}), peer)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.sock.fileno())
        self.sock.close()


def _shard_answers(port: int, **overrides: dict[str, Any] | None) -> Any:
    """A one-shard relay on this socket: ``info`` names it, the commands succeed
    unless ``overrides`` gives an op's reply (None: silent)."""

    def answer(request: dict[str, Any]) -> dict[str, Any] | None:
        op = request["op"]
        if op in overrides:
            return overrides[op]
        if op == "info":
            return {"ok": True, "shards": [{"index": 0, "port": port}]}
        if op == "allocate":
            return {"ok": True, "a": ["127.0.0.9", 30000], "b": ["127.0.0.9", 30002], "inc": 7}
        if op == "update":
            return {"ok": True, "inc": 7}
        if op == "delete":
            figures = {"packets_in": 5, "packets_out": 4, "bytes_in": 800, "bytes_out": 640}
            return {"ok": True, "inc": 7, "a": figures, "b": figures}
        return {"ok": False, "error": "unknown op"}

    return answer


class Outcomes:
    """The ``done`` callbacks' calls, and a way to wait for them."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Any, BaseException | None]] = []
        self.starting = False

    def done(self, name: str) -> Callable[[Any, BaseException | None], None]:
        def record(result: Any, error: BaseException | None) -> None:
            assert not self.starting, "called back inside the call that started it"
            self.got.append((name, result, error))

        return record

    async def wait(self, count: int, within: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        while len(self.got) < count and loop.time() < end:
            await asyncio.sleep(0.005)


def _scripted(
    flavour: str,
    body: Callable[[LoopRelay, ScriptedRelay, Outcomes, RelayClient], Any],
    *,
    timeout: float = 0.05,
    retries: int = 2,
    **overrides: dict[str, Any] | None,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        relay = ScriptedRelay(lambda r: None)
        relay.answer = _shard_answers(relay.address[1], **overrides)
        relay.serve(loop)
        client = RelayClient(relay.address, SECRET, timeout=timeout, retries=retries)
        on_loop = client.on_loop(loop)
        try:
            await body(on_loop, relay, Outcomes(), client)
        finally:
            on_loop.close()
            relay.close(loop)
            client.close()

    _run(flavour, main)


@pytest.mark.parametrize("flavour", ["asyncio", "uvloop"])
def test_the_three_operations_give_the_blocking_clients_results(flavour: str) -> None:
    async def body(on_loop: LoopRelay, relay: ScriptedRelay, out: Outcomes, client: RelayClient):
        out.starting = True
        on_loop.allocate("call-1", a_peer=("127.0.0.1", 6000), echo=False, done=out.done("a"))
        out.starting = False
        await out.wait(1)
        ((name, allocation, error),) = out.got
        assert (name, error) == ("a", None)
        assert allocation == MediaAllocation(
            call_ref="call-1",
            a_address="127.0.0.9",
            a_port=30000,
            b_address="127.0.0.9",
            b_port=30002,
        )
        out.starting = True
        on_loop.update(
            "call-1", a_peer=None, b_peer=("127.0.0.1", 6002), b_events=101, done=out.done("u")
        )
        out.starting = False
        await out.wait(2)
        assert out.got[1] == ("u", None, None)
        out.starting = True
        on_loop.release("call-1", done=out.done("r"))
        out.starting = False
        await out.wait(3)
        name, figures, error = out.got[2]
        assert (name, error) == ("r", None)
        expected = MediaStats(packets_in=5, packets_out=4, bytes_in=800, bytes_out=640)
        assert figures == (expected, expected)
        ops = [request["op"] for request, _ in relay.received]
        assert ops == ["info", "allocate", "update", "delete"]
        update = relay.received[2][0]
        assert (update["call"], update["b_peer"], update["b_events"]) == (
            "call-1",
            ["127.0.0.1", 6002],
            101,
        )
        assert on_loop.running == 0
        # The client's own table saw it all: the call is gone after the release.
        assert client.expired() == []

    _scripted(flavour, body)


@pytest.mark.parametrize("flavour", ["asyncio", "uvloop"])
def test_a_lost_command_is_retransmitted_as_the_same_datagram(flavour: str) -> None:
    async def body(on_loop: LoopRelay, relay: ScriptedRelay, out: Outcomes, client: RelayClient):
        answer = relay.answer
        dropped: list[bytes] = []

        def lossy(request: dict[str, Any]) -> dict[str, Any] | None:
            if request["op"] == "allocate" and len(dropped) < 2:
                dropped.append(request["c"])
                return None
            return answer(request)

        relay.answer = lossy
        on_loop.allocate("call-2", a_peer=None, echo=True, done=out.done("a"))
        await out.wait(1)
        assert [(n, e) for n, _, e in out.got] == [("a", None)]
        allocates = [data for request, data in relay.received if request["op"] == "allocate"]
        assert len(allocates) == 3
        assert len(set(allocates)) == 1, "a retransmission is the same datagram (same cookie)"

    _scripted(flavour, body)


@pytest.mark.parametrize("flavour", ["asyncio", "uvloop"])
def test_a_silent_relay_fails_the_operation_after_the_retries(flavour: str) -> None:
    async def body(on_loop: LoopRelay, relay: ScriptedRelay, out: Outcomes, client: RelayClient):
        loop = asyncio.get_running_loop()
        started = loop.time()
        on_loop.allocate("call-3", a_peer=None, echo=False, done=out.done("a"))
        await out.wait(1)
        took = loop.time() - started
        ((_, result, error),) = out.got
        assert result is None
        assert isinstance(error, MediaUnavailable)
        assert "do not answer" in str(error)
        allocates = [request for request, _ in relay.received if request["op"] == "allocate"]
        assert len(allocates) == 3  # the first and retries=2
        assert took >= 3 * 0.05 * 0.9
        assert on_loop.running == 0

    _scripted(flavour, body, allocate=None)


@pytest.mark.parametrize("flavour", ["asyncio", "uvloop"])
def test_a_refusal_is_the_blocking_clients_error(flavour: str) -> None:
    async def body(on_loop: LoopRelay, relay: ScriptedRelay, out: Outcomes, client: RelayClient):
        on_loop.allocate("call-4", a_peer=None, echo=False, done=out.done("a"))
        on_loop.update("unknown", a_peer=None, b_peer=None, done=out.done("u"))
        on_loop.release("unknown", done=out.done("r"))
        await out.wait(3)
        got = {name: (result, error) for name, result, error in out.got}
        assert isinstance(got["a"][1], MediaUnavailable)
        assert "bad port" in str(got["a"][1])
        assert isinstance(got["u"][1], MediaUnavailable)  # no allocation for that call
        assert got["r"] == ((None, None), None)  # nothing to release: no figures, no error

    _scripted(flavour, body, allocate={"ok": False, "error": "bad port"})


@pytest.mark.parametrize("flavour", ["asyncio", "uvloop"])
def test_the_deadline_ends_an_operation_once_with_timeout_error(flavour: str) -> None:
    async def body(on_loop: LoopRelay, relay: ScriptedRelay, out: Outcomes, client: RelayClient):
        on_loop.allocate("call-5", a_peer=None, echo=False, done=out.done("a"), deadline=0.1)
        await out.wait(1)
        await asyncio.sleep(0.6)  # past every retransmission: no second callback
        ((_, result, error),) = out.got
        assert result is None
        assert isinstance(error, TimeoutError)
        assert on_loop.running == 0

    _scripted(flavour, body, timeout=0.15, retries=3, allocate=None)


@pytest.mark.parametrize("flavour", ["asyncio", "uvloop"])
def test_forged_and_stale_replies_change_nothing(flavour: str) -> None:
    async def body(on_loop: LoopRelay, relay: ScriptedRelay, out: Outcomes, client: RelayClient):
        answer = relay.answer
        sent: list[str] = []

        def slow(request: dict[str, Any]) -> dict[str, Any] | None:
            if request["op"] != "allocate":
                return answer(request)
            sent.append(request["c"])
            peer = relay.peers[-1]
            if len(sent) == 1:
                # A forged reply (another secret) and one to a cookie never sent
                # arrive first; then the first attempt's reply comes late, twice.
                forged = {"c": request["c"], "ok": True, "a": ["6.6.6.6", 1], "b": ["6.6.6.6", 3]}
                relay.sock.sendto(seal(b"x" * 32, {**forged, "inc": 7}), peer)
                relay.sock.sendto(seal(SECRET, {**forged, "c": "0" * 16, "inc": 7}), peer)
                return None
            reply = answer(request)
            assert reply is not None
            relay.sock.sendto(seal(SECRET, {"c": request["c"], **reply}), peer)
            return reply

        relay.answer = slow
        on_loop.allocate("call-6", a_peer=None, echo=False, done=out.done("a"))
        await out.wait(1)
        await asyncio.sleep(0.2)
        ((_, allocation, error),) = out.got
        assert error is None
        assert allocation.a_address == "127.0.0.9"

    _scripted(flavour, body, timeout=0.05, retries=3)


@pytest.mark.parametrize("flavour", ["asyncio", "uvloop"])
def test_close_drops_what_is_under_way_without_a_callback(flavour: str) -> None:
    async def body(on_loop: LoopRelay, relay: ScriptedRelay, out: Outcomes, client: RelayClient):
        on_loop.allocate("call-7", a_peer=None, echo=False, done=out.done("a"), deadline=0.1)
        await asyncio.sleep(0.02)
        assert on_loop.running == 1
        sock = on_loop._sock
        on_loop.close()
        on_loop.close()  # twice is harmless
        assert sock.fileno() == -1
        assert on_loop.running == 0
        await asyncio.sleep(0.3)
        assert out.got == []
        with pytest.raises(RuntimeError):
            on_loop.release("call-7", done=out.done("r"))

    _scripted(flavour, body, timeout=0.05, retries=2, allocate=None)


@pytest.fixture(scope="module")
def local_relay() -> Iterator[RelayClient]:
    from test_relay_control import free_rtp_range

    config = RelayConfig(
        secret=SECRET,
        control=("127.0.0.1", 0),
        rtp_range=free_rtp_range(16),  # 16 pairs: 8 calls of two pairs
        shards=2,
        media_host="127.0.0.1",
        log_level="error",
    )
    relay = start_local_relay(config)
    client = relay.client()
    try:
        yield client
    finally:
        client.close()
        relay.stop()


@pytest.mark.parametrize("flavour", ["asyncio", "uvloop"])
def test_against_a_real_relay_many_calls_at_once(flavour: str, local_relay: RelayClient) -> None:
    """Eight calls allocated at once over one socket (replies sorted by cookie),
    spread over both shards, then updated and released; the relay's own figures
    agree, and a ninth allocation on a full range is refused."""

    async def main() -> None:
        out = Outcomes()
        on_loop = local_relay.on_loop(asyncio.get_running_loop())
        try:
            refs = [f"{flavour}-{i}" for i in range(8)]
            for ref in refs:
                on_loop.allocate(ref, a_peer=None, echo=False, done=out.done(ref))
            await out.wait(8)
            assert all(error is None for _, _, error in out.got), out.got
            ports = {result.a_port for _, result, _ in out.got}
            ports |= {result.b_port for _, result, _ in out.got}
            assert len(ports) == 16
            on_loop.allocate("one-too-many", a_peer=None, echo=False, done=out.done("x"))
            await out.wait(9)
            assert isinstance(out.got[8][2], MediaUnavailable)
            assert "exhausted" in str(out.got[8][2])
            shards = local_relay.shard_stats()
            assert sum(s["calls"] for s in shards) == 8
            assert all(s["calls"] > 0 for s in shards)
            for ref in refs:
                on_loop.update(ref, a_peer=("127.0.0.1", 7000), b_peer=None, done=out.done(ref))
            await out.wait(17)
            assert [error for _, _, error in out.got[9:]] == [None] * 8
            for ref in refs:
                on_loop.release(ref, done=out.done(ref))
            await out.wait(25)
            assert all(error is None and result[0] is not None for _, result, error in out.got[17:])
            assert sum(s["calls"] for s in local_relay.shard_stats()) == 0
        finally:
            on_loop.close()

    _run(flavour, main)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_io_anyio_runs_the_relays_commands_as_loop_callbacks_on_asyncio(backend: str) -> None:
    """io_anyio with a RelayClient: on asyncio its commands go through a LoopRelay
    (one socket, registered with the loop, for every command), on trio through the
    async client's pooled sockets; either way the engine gets the allocation, and a
    silent relay becomes media_failed within relay_timeout."""
    import anyio.from_thread
    from driver_fakes import FakeEngine, FakeStore

    import io_anyio

    relay = ScriptedRelay(lambda r: None)
    relay.answer = _shard_answers(relay.address[1])
    replies: list[bytes] = []
    engine = FakeEngine()
    client = RelayClient(relay.address, SECRET, timeout=0.05, retries=1)
    server = io_anyio.Server(
        engine,
        store=FakeStore(),
        relay=client,
        options=io_anyio.DriverOptions(
            listen=(("127.0.0.1", 0),), handle_signals=False, relay_timeout=0.5
        ),
    )
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    phone.settimeout(5)
    stop = threading.Event()

    def relay_thread() -> None:  # the scripted relay answers from its own thread
        relay.sock.setblocking(True)
        relay.sock.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                relay.take_one()

    answering = threading.Thread(target=relay_thread, daemon=True)
    answering.start()
    try:
        with anyio.from_thread.start_blocking_portal(backend) as portal:
            future, addresses = portal.start_task(server.serve)
            try:
                phone.sendto(b"ALLOC", addresses[0])
                replies.append(phone.recv(1000))
                loop_relay = server._loop_relay
                phone.sendto(b"RELEASE call-1", addresses[0])
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not any(
                    request["op"] == "delete" for request, _ in list(relay.received)
                ):
                    time.sleep(0.01)
                relay.answer = _shard_answers(relay.address[1], allocate=None)
                phone.sendto(b"ALLOC", addresses[0])
                replies.append(phone.recv(1000))
            finally:
                portal.call(server.shutdown)
                future.result(timeout=30)
    finally:
        stop.set()
        answering.join(5)
        phone.close()
        relay.sock.close()
        client.close()
    assert replies[0] == b"ALLOCATED 30000"
    assert replies[1].startswith(b"MEDIA-FAILED")
    ops = [request["op"] for request, _ in relay.received]
    assert ops[:3] == ["info", "allocate", "delete"]
    assert ops[3:] == ["allocate"] * (len(ops) - 3) and len(ops) > 3
    senders = set(relay.peers)
    if backend == "asyncio":
        assert isinstance(loop_relay, LoopRelay)
        assert len(senders) == 1  # every command from the LoopRelay's one socket
    else:
        assert loop_relay is None
    assert server._loop_relay is None  # closed with the server


@pytest.mark.parametrize("flavour", ["asyncio", "uvloop"])
def test_a_command_that_cannot_be_sealed_fails_the_operation(flavour: str) -> None:
    async def body(on_loop: LoopRelay, relay: ScriptedRelay, out: Outcomes, client: RelayClient):
        on_loop.allocate("x" * 70_000, a_peer=None, echo=False, done=out.done("a"))
        await out.wait(1)
        ((_, result, error),) = out.got
        assert result is None
        assert isinstance(error, MediaUnavailable)
        assert "not sent" in str(error)
        assert on_loop.running == 0

    _scripted(flavour, body)
