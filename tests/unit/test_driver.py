"""Driver mechanics, the same tests for every driver, with a fake engine (tests/unit/driver_fakes.py).

Each test starts a driver in a background thread on a free loopback port,
talks to it with plain blocking sockets (every wait has a timeout) and stops it.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio.from_thread
import pytest
from driver_fakes import FakeEngine, FakeRelay, FakeStore

import io_anyio
import io_socket
from sansio_sip import Log, Transport

DRIVERS = ["anyio-asyncio", "anyio-trio", "socket"]
WAIT = 5.0  # upper bound of every wait; never an assertion about speed


class Running:
    """A driver serving a FakeEngine, and what the test needs to poke it."""

    def __init__(self, engine: FakeEngine, store: FakeStore, relay: FakeRelay) -> None:
        self.engine, self.store, self.relay = engine, store, relay
        self.logs: list[Log] = []
        self.addresses: list[tuple[str, int]] = []
        self.server: Any = None
        self.stop_server: Any = None
        self.done = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        return self.addresses[0]

    def events(self, name: str) -> list[Log]:
        return [entry for entry in list(self.logs) if entry.event == name]

    def stats(self) -> dict[str, int]:
        return dict(self.server.stats())


@contextlib.contextmanager
def running(driver: str, listen: str = "127.0.0.1", **options: Any) -> Iterator[Running]:
    run = Running(FakeEngine(), FakeStore(), FakeRelay())
    settings = {"listen": ((listen, 0),), "handle_signals": False, **options}
    if driver.startswith("anyio-"):
        server = io_anyio.Server(
            run.engine,
            store=run.store,
            relay=run.relay,
            options=io_anyio.DriverOptions(**settings),
            log=run.logs.append,
        )
        run.server = server
        with anyio.from_thread.start_blocking_portal(driver.removeprefix("anyio-")) as portal:
            future, run.addresses = portal.start_task(server.serve)
            run.stop_server = lambda: portal.call(server.shutdown)
            future.add_done_callback(lambda _f: run.done.set())
            try:
                yield run
            finally:
                if not run.done.is_set():
                    portal.call(server.shutdown)
                future.result(timeout=WAIT + 30)
    else:
        blocking = io_socket.Server(
            run.engine,
            store=run.store,
            relay=run.relay,
            options=io_socket.DriverOptions(**settings),
            log=run.logs.append,
        )
        run.server = blocking
        bound = threading.Event()

        def started(addresses: list[tuple[str, int]]) -> None:
            run.addresses = addresses
            bound.set()

        def serve() -> None:
            try:
                blocking.serve(started=started)
            finally:
                run.done.set()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        assert bound.wait(WAIT)
        run.stop_server = blocking.shutdown
        try:
            yield run
        finally:
            blocking.shutdown()
            thread.join(WAIT + 30)
            assert not thread.is_alive()


def udp_client(run: Running) -> socket.socket:
    host = run.address[0]
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(WAIT)
    sock.connect(run.address)
    return sock


def ask(sock: socket.socket, data: bytes) -> bytes:
    sock.send(data)
    return sock.recv(65535)


def tcp_client(run: Running) -> socket.socket:
    sock = socket.create_connection(run.address, timeout=WAIT)
    return sock


def read_lines(sock: socket.socket, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65535)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n")[:count]


def wait_for(predicate: Any, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_udp_datagram_in_and_reply_out(driver: str) -> None:
    with running(driver) as run, udp_client(run) as client:
        assert ask(client, b"ECHO hello") == b"hello"
        kind, (data, source, transport, connection) = run.engine.calls[0]  # type: ignore[misc]
        assert (kind, data, transport, connection) == (
            "receive",
            b"ECHO hello",
            Transport.UDP,
            None,
        )
        assert source == client.getsockname()[:2]


def test_ipv6_listen_address(driver: str) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this host")
    with running(driver, listen="::1") as run, udp_client(run) as client:
        assert ask(client, b"ECHO six") == b"six"
        with socket.create_connection(run.address, timeout=WAIT) as stream:
            stream.sendall(b"ECHO over tcp\n")
            assert read_lines(stream, 1) == [b"over tcp"]


def test_tcp_stream_chunks_keep_their_order_and_connection_id(driver: str) -> None:
    with running(driver) as run:
        with tcp_client(run) as client:
            for piece in (b"EC", b"HO hel", b"lo\nECHO t", b"wo\n"):
                client.sendall(piece)
                time.sleep(0.02)
            assert read_lines(client, 2) == [b"hello", b"two"]
            idents = {call[1][3] for call in run.engine.calls}  # type: ignore[index]
            assert len(idents) == 1 and None not in idents
            (ident,) = idents
        assert wait_for(lambda: ident in run.engine.closed)


def test_each_connection_has_its_own_id(driver: str) -> None:
    with running(driver) as run, tcp_client(run) as first, tcp_client(run) as second:
        first.sendall(b"ECHO one\n")
        second.sendall(b"ECHO two\n")
        assert read_lines(first, 1) == [b"one"]
        assert read_lines(second, 1) == [b"two"]
        idents = {call[1][3] for call in run.engine.calls}  # type: ignore[index]
        assert len(idents) == 2


def test_engine_close_connection_closes_the_socket(driver: str) -> None:
    with running(driver) as run, tcp_client(run) as client:
        client.sendall(b"ECHO x\nCLOSE\n")
        assert read_lines(client, 1) == [b"x"]
        assert client.recv(100) == b""  # end of stream
        assert wait_for(lambda: len(run.engine.closed) == 1)


def test_timer_fires_at_its_deadline_never_before(driver: str) -> None:
    with running(driver) as run, udp_client(run) as client:
        client.send(b"TIMER 0.2")
        reply = client.recv(100)
        assert reply.startswith(b"FIRED ")
        assert float(reply.split()[1]) >= 0.0  # now passed in is never before the deadline
        ((now, deadline),) = run.engine.fired
        assert now >= deadline


def test_account_lookup_found_unknown_and_unavailable(driver: str) -> None:
    with running(driver, store_timeout=0.3) as run, udp_client(run) as client:
        assert ask(client, b"LOOKUP alice") == b"FOUND alice"
        assert ask(client, b"LOOKUP mallory") == b"NONE"
        run.store.unavailable = True
        assert ask(client, b"LOOKUP alice") == b"UNAVAILABLE"
        assert run.events("store.failed")


def test_slow_store_past_its_deadline_is_unavailable_and_loop_keeps_serving(driver: str) -> None:
    if driver == "socket":
        pytest.skip("io_socket calls the store inline by design (io_socket/server.py)")
    with running(driver, store_timeout=0.3, store_inline=False) as run, udp_client(run) as client:
        run.store.delay = 1.0
        client.send(b"LOOKUP alice")
        time.sleep(0.05)
        client.send(b"ECHO meanwhile")
        assert client.recv(100) == b"meanwhile"
        assert client.recv(100) == b"UNAVAILABLE"


def test_inline_lookup_past_its_deadline_is_unavailable_on_the_socket_driver() -> None:
    """Driver-specific: io_socket cannot abandon an inline look-up (no threads), so it
    gives the answer io_anyio gives at the deadline (above) once the look-up returns."""
    with running("socket", store_timeout=0.2) as run, udp_client(run) as client:
        run.store.delay = 0.4
        assert ask(client, b"LOOKUP alice") == b"UNAVAILABLE"
        (failed,) = run.events("store.failed")
        assert "store_timeout" in str(failed.as_dict()["error"])
        run.store.delay = 0.0
        assert ask(client, b"LOOKUP alice") == b"FOUND alice"


def test_slow_inline_lookup_sends_later_ones_to_worker_threads(driver: str) -> None:
    if driver == "socket":
        pytest.skip("io_socket calls the store inline by design (io_socket/server.py)")
    options = {"inline_budget": 0.01, "inline_strikes": 2, "inline_cooldown": 60.0}
    with running(driver, **options) as run, udp_client(run) as client:
        assert ask(client, b"LOOKUP alice") == b"FOUND alice"
        assert run.stats().get("store_inline_lookups") == 1
        run.store.delay = 0.05  # over the budget once: a hiccup, the fast path stays
        assert ask(client, b"LOOKUP alice") == b"FOUND alice"
        assert run.stats().get("store_inline_suspended") is None
        # twice in a row: the store is slow, look-ups go to threads
        assert ask(client, b"LOOKUP alice") == b"FOUND alice"
        run.store.delay = 0.0
        assert ask(client, b"LOOKUP alice") == b"FOUND alice"
        stats = run.stats()
        assert stats["store_inline_suspended"] == 1
        assert stats["store_inline_lookups"] == 3 and stats["store_thread_lookups"] == 1
        assert run.events("store.inline_suspended")


def test_failing_inline_lookup_is_unavailable_and_later_ones_use_threads(driver: str) -> None:
    if driver == "socket":
        pytest.skip("io_socket calls the store inline by design (io_socket/server.py)")
    with running(driver) as run, udp_client(run) as client:
        run.store.unavailable = True
        assert ask(client, b"LOOKUP alice") == b"UNAVAILABLE"
        run.store.unavailable = False
        assert ask(client, b"LOOKUP alice") == b"FOUND alice"
        assert run.stats()["store_thread_lookups"] == 1


def test_call_record_written_before_the_following_send(driver: str) -> None:
    with running(driver) as run, udp_client(run) as client:
        run.store.delay = 0.3
        client.send(b"RECORD")
        time.sleep(0.05)
        client.send(b"ECHO not stalled")
        replies = [client.recv(100), client.recv(100)]
        received = time.monotonic()
        assert b"AFTER-RECORD" in replies and b"not stalled" in replies
        ((written, record),) = run.store.records
        assert written <= received and record.call_ref == "call-1"
        if driver != "socket":  # io_socket writes inline by design; io_anyio must not stall
            assert replies == [b"not stalled", b"AFTER-RECORD"]


def test_failed_record_write_is_retried_and_logged(driver: str) -> None:
    with running(driver) as run, udp_client(run) as client:
        run.store.write_failures = 2
        assert ask(client, b"RECORD") == b"AFTER-RECORD"
        assert len(run.store.records) == 1
        assert run.stats()["store_write_retries"] == 2
        assert len(run.events("store.failed")) == 2


def test_engine_bug_is_logged_with_input_hash_and_serving_goes_on(driver: str) -> None:
    with running(driver) as run, udp_client(run) as client:
        client.send(b"BUG")
        assert ask(client, b"ECHO alive") == b"alive"
        (bug,) = run.events("engine.bug")
        fields = bug.as_dict()
        assert fields["input_sha256"] == hashlib.sha256(b"BUG").hexdigest()[:16]
        assert "fake engine bug" in str(fields["error"])
        assert run.stats()["engine_bugs"] == 1


def test_media_allocation_failure_release_and_expiry(driver: str) -> None:
    with running(driver, expire_poll=0.05) as run, udp_client(run) as client:
        assert ask(client, b"ALLOC") == b"ALLOCATED 20000"
        run.relay.unavailable = True
        assert ask(client, b"ALLOC") == b"MEDIA-FAILED ports exhausted"
        client.send(b"RELEASE call-9")
        assert wait_for(lambda: run.store.stats)
        ((call_ref, a_leg, b_leg),) = run.store.stats
        assert (call_ref, a_leg and a_leg.packets_in, b_leg and b_leg.packets_in) == (
            "call-9",
            5,
            7,
        )
        with run.relay.lock:
            run.relay.ended.append(("call-7", "media-timeout"))
        assert wait_for(lambda: run.engine.media_ended_calls == [("call-7", "media-timeout")])


def test_tcp_send_without_connection_opens_one_and_reuses_it(driver: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as peer, running(driver) as run:
        peer.settimeout(WAIT)
        port = peer.getsockname()[1]
        with udp_client(run) as client:
            client.send(b"TCPOUT %d first" % port)
            conn, _ = peer.accept()
            conn.settimeout(WAIT)
            client.send(b"TCPOUT %d second" % port)
            assert read_lines(conn, 2) == [b"first", b"second"]
            # What the peer sends back on that connection reaches the engine with its id.
            conn.sendall(b"ECHO back\n")
            assert read_lines(conn, 1) == [b"back"]
            tcp_calls = [c for c in run.engine.calls if c[1][2] is Transport.TCP]  # type: ignore[index]
            assert tcp_calls and tcp_calls[0][1][3] is not None  # type: ignore[index]
            conn.close()


def test_tcp_connect_failure_is_reported_to_the_engine(driver: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with running(driver) as run, udp_client(run) as client:
        assert ask(client, b"TCPOUT %d lost" % closed_port) == b"FAILED %d" % closed_port
        assert run.engine.failed == [(("127.0.0.1", closed_port), Transport.TCP)]


def test_udp_input_beyond_the_queue_bound_is_dropped_and_counted(driver: str) -> None:
    if driver == "socket":
        pytest.skip("io_socket queues nothing: input waits in the kernel's bounded buffer")
    with running(driver, input_queue=4, udp_batch=1000) as run, udp_client(run) as client:
        client.send(b"SLOW 0.5")
        time.sleep(0.1)
        for index in range(200):
            client.send(b"ECHO %d" % index)
        assert wait_for(lambda: run.stats().get("udp_dropped", 0) > 0)
        assert ask(client, b"ECHO after") in {b"after", *(b"%d" % i for i in range(200))}
        assert run.events("udp.queue_full")


def test_tcp_connections_per_address_are_limited(driver: str) -> None:
    with running(driver, max_tcp_per_ip=2) as run, tcp_client(run) as one, tcp_client(run) as two:
        one.sendall(b"ECHO 1\n")
        two.sendall(b"ECHO 2\n")
        assert read_lines(one, 1) == [b"1"] and read_lines(two, 1) == [b"2"]
        with tcp_client(run) as three:
            assert three.recv(100) == b""
        assert run.stats()["tcp_refused"] == 1


def test_idle_tcp_connection_is_closed(driver: str) -> None:
    with running(driver, tcp_idle_timeout=0.2) as run, tcp_client(run) as client:
        client.sendall(b"ECHO x\n")
        assert read_lines(client, 1) == [b"x"]
        assert client.recv(100) == b""
        assert wait_for(lambda: run.stats().get("tcp_closed_idle") == 1)


def test_a_peer_that_does_not_read_is_closed_not_buffered_for(driver: str) -> None:
    """Every queue bounded (STYLE.md §10): answers to a peer that never reads pile up
    in the kernel and then in the driver, up to its bound (io_anyio: ``tcp_send_queue``
    messages; io_socket: ``tcp_send_buffer`` bytes), and then the connection is closed."""
    bound = {"tcp_send_queue": 8} if driver.startswith("anyio-") else {"tcp_send_buffer": 65536}
    line = b"ECHO " + b"x" * 4000 + b"\n"
    with running(driver, **bound) as run:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        sock.settimeout(0.5)
        sock.connect(run.address)
        with sock:
            deadline = time.monotonic() + WAIT * 4
            sent = 0
            while time.monotonic() < deadline and not run.stats().get("tcp_slow_peer"):
                try:
                    sock.sendall(line)  # never reading what comes back
                    sent += 1
                except TimeoutError:
                    continue  # the server is not reading either: wait for its verdict
                except OSError:
                    break  # closed
            # (io_anyio counts every answer dropped while the connection is being closed)
            assert wait_for(lambda: run.stats().get("tcp_slow_peer", 0) >= 1), (sent, run.stats())
            assert wait_for(lambda: run.stats()["tcp_connections"] == 0)
        assert run.events("tcp.slow_peer")
        with udp_client(run) as client:  # and the server serves on
            assert ask(client, b"ECHO alive") == b"alive"


def test_the_socket_driver_starts_no_thread() -> None:
    """Driver-specific: issue 6 asks for io_socket without threads. Serving (UDP, TCP,
    a store look-up, a record, the relay) runs in the one thread that called serve()."""
    before = set(threading.enumerate())
    with running("socket") as run, udp_client(run) as client, tcp_client(run) as tcp:
        assert ask(client, b"LOOKUP alice") == b"FOUND alice"
        assert ask(client, b"RECORD") == b"AFTER-RECORD"
        assert ask(client, b"ALLOC").startswith(b"ALLOCATED")
        tcp.sendall(b"ECHO over tcp\n")
        assert read_lines(tcp, 1) == [b"over tcp"]
        started = set(threading.enumerate()) - before
        assert len(started) == 1, started  # running() serves in one thread of the test's


def test_a_timer_deadline_that_does_not_move_does_not_spin_the_loop(driver: str) -> None:
    """An engine bug: handle_timer returns normally but next_timer() keeps the same past
    deadline. The driver tries again every _TIMER_BUG_BACKOFF (0.1 s), never in a spin."""
    with running(driver) as run, udp_client(run) as client:
        fired: list[float] = []

        def stuck(*, now: float, wall: float) -> list[Any]:
            fired.append(now)
            return []

        run.engine.handle_timer = stuck  # type: ignore[method-assign]
        client.send(b"TIMER 0")  # a deadline now, which ``stuck`` never clears
        time.sleep(0.5)
        assert ask(client, b"ECHO alive") == b"alive"
        assert 1 <= len(fired) <= 50, len(fired)  # ~5 with the back-off; a spin: thousands


def test_graceful_shutdown_waits_for_calls_then_ends_them(driver: str) -> None:
    with running(driver, grace_period=0.3) as run, udp_client(run) as client:
        assert ask(client, b"CALL") == b"CALLS 1"
        run.stop_server()
        assert run.done.wait(WAIT)
        assert not run.engine.accepting and run.engine.ended_all
        assert run.events("fake.stop_accepting") and run.events("driver.stopped")


def test_a_record_the_store_never_takes_is_logged_whole_at_exit(driver: str) -> None:
    """Records are never dropped silently: one whose writes fail until the drain period
    is over goes to the log, whole, for an operator to replay; the server still stops."""
    with running(driver, drain_period=0.5, store_timeout=0.2) as run, udp_client(run) as client:
        run.store.write_failures = 1_000_000
        client.send(b"RECORD lost-call")
        assert wait_for(lambda: run.events("store.failed"))
        run.stop_server()
        assert run.done.wait(WAIT)
        (unwritten,) = run.events("record.unwritten")
        fields = unwritten.as_dict()
        assert fields["call_ref"] == "lost-call"
        assert '"call_ref": "lost-call"' in str(fields["record"])
    assert run.store.records == []


def test_shutdown_without_calls_does_not_wait_for_the_grace_period(driver: str) -> None:
    with running(driver, grace_period=60.0) as run:
        run.stop_server()
        assert run.done.wait(WAIT)
        assert run.engine.ended_all


def test_slow_inline_lookup_while_preempted_is_no_strike(
    driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if driver == "socket":
        pytest.skip("io_socket calls the store inline by design (io_socket/server.py)")
    import io_anyio.server

    # The thread never slept and used no CPU: only the busy host made it late.
    monkeypatch.setattr(io_anyio.server, "_thread_usage", lambda: (7, 1.0))
    options = {"inline_budget": 0.01, "inline_strikes": 2, "inline_cooldown": 60.0}
    with running(driver, **options) as run, udp_client(run) as client:
        run.store.delay = 0.05  # over the budget each time
        for _ in range(3):
            assert ask(client, b"LOOKUP alice") == b"FOUND alice"
        stats = run.stats()
        assert stats.get("store_inline_suspended") is None
        assert stats["store_inline_lookups"] == 3 and stats["store_inline_preempted"] == 3


def test_only_preempted_needs_no_sleep_and_little_cpu() -> None:
    from io_anyio.server import _only_preempted

    assert _only_preempted((5, 1.0), (5, 1.001), 0.005)
    assert not _only_preempted((5, 1.0), (6, 1.001), 0.005)  # slept: waited for the store
    assert not _only_preempted((5, 1.0), (5, 1.02), 0.005)  # computed past the budget
    assert not _only_preempted(None, None, 0.005)  # unknown: the overrun counts


def test_a_backlog_longer_than_a_batch_loses_nothing(driver: str) -> None:
    """Inputs queued while the engine was busy are fed in batches of ``udp_batch``;
    every one of them is fed (an input taken at the end of a batch used to be lost:
    a datagram, or the answer of an account look-up, which left its request waiting)."""
    with running(driver, udp_batch=2) as run, udp_client(run) as client:
        client.send(b"SLOW 0.3")
        time.sleep(0.05)
        for index in range(40):
            client.send(b"LOOKUP alice" if index % 2 else b"ECHO %d" % index)
        answers = sorted(client.recv(100) for _ in range(40))
        expected = sorted(b"FOUND alice" if index % 2 else b"%d" % index for index in range(40))
        assert answers == expected
