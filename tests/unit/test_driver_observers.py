"""The drivers' observer hooks, the same tests for every driver (fake engine of
tests/unit/driver_fakes.py): ``trace`` sees every datagram and TCP chunk in and every
message out with both addresses, ``on_record`` every call record, an observer that
raises is counted and never stops the server, and ``call_in_loop`` runs a function in
the loop from another thread (the control endpoint's way in)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import anyio.from_thread
import pytest
from driver_fakes import FakeEngine, FakeRelay, FakeStore
from test_driver import DRIVERS, WAIT, Running, ask, read_lines, wait_for

import io_anyio
import io_socket
from sansio_sip import CallRecordData, Transport


class Recorder:
    """A MessageTrace that keeps what it is told (and can be made to fail)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def received(self, data: bytes, **fields: Any) -> None:
        with self.lock:
            self.events.append(("in", data, fields))
        if self.fail:
            raise RuntimeError("observer bug")

    def sent(self, data: bytes, **fields: Any) -> None:
        with self.lock:
            self.events.append(("out", data, fields))
        if self.fail:
            raise RuntimeError("observer bug")

    def connection_closed(self, connection: int) -> None:
        with self.lock:
            self.events.append(("closed", connection, {}))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [event for event in self.events if event[0] == kind]


@contextlib.contextmanager
def observed(driver: str, trace: Any = None, on_record: Any = None) -> Iterator[Running]:
    run = Running(FakeEngine(), FakeStore(), FakeRelay())
    settings = {"listen": (("127.0.0.1", 0),), "handle_signals": False}
    hooks = {"trace": trace, "on_record": on_record}
    if driver.startswith("anyio-"):
        server = io_anyio.Server(
            run.engine,
            store=run.store,
            relay=run.relay,
            options=io_anyio.DriverOptions(**settings),
            log=run.logs.append,
            **hooks,
        )
        run.server = server
        with anyio.from_thread.start_blocking_portal(driver.removeprefix("anyio-")) as portal:
            future, run.addresses = portal.start_task(server.serve)
            try:
                yield run
            finally:
                portal.call(server.shutdown)
                future.result(timeout=WAIT + 30)
    else:
        blocking = io_socket.Server(
            run.engine,
            store=run.store,
            relay=run.relay,
            options=io_socket.DriverOptions(**settings),
            log=run.logs.append,
            **hooks,
        )
        run.server = blocking
        bound = threading.Event()

        def started(addresses: list[tuple[str, int]]) -> None:
            run.addresses = addresses
            bound.set()

        thread = threading.Thread(target=lambda: blocking.serve(started=started), daemon=True)
        thread.start()
        assert bound.wait(WAIT)
        try:
            yield run
        finally:
            blocking.shutdown()
            thread.join(WAIT + 30)
            assert not thread.is_alive()


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_trace_sees_udp_in_and_out_with_both_addresses(driver: str) -> None:
    trace = Recorder()
    with observed(driver, trace=trace) as run:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(WAIT)
            client.connect(run.address)
            assert ask(client, b"ECHO hi") == b"hi"
            ours = client.getsockname()[:2]
        assert wait_for(lambda: trace.of("out"))
    ((kind, data, fields),) = trace.of("in")
    assert data == b"ECHO hi"
    assert fields["source"] == ours and fields["local"] == run.address
    assert fields["transport"] is Transport.UDP and fields["connection"] is None
    ((kind, data, fields),) = trace.of("out")
    assert data == b"hi"
    assert fields["destination"] == ours and fields["local"] == run.address
    assert fields["wall"] > 1e9


def test_trace_sees_tcp_chunks_sends_and_the_close(driver: str) -> None:
    trace = Recorder()
    with observed(driver, trace=trace) as run:
        with socket.create_connection(run.address, timeout=WAIT) as client:
            client.sendall(b"ECHO over tcp\n")
            assert read_lines(client, 1) == [b"over tcp"]
            ours = client.getsockname()[:2]
        assert wait_for(lambda: trace.of("closed"))
    chunks = trace.of("in")
    assert b"".join(event[1] for event in chunks) == b"ECHO over tcp\n"
    fields = chunks[0][2]
    assert fields["source"] == ours and fields["local"] == run.address
    assert fields["transport"] is Transport.TCP
    connection = fields["connection"]
    ((_, data, out_fields),) = trace.of("out")
    assert data == b"over tcp\n" and out_fields["destination"] == ours
    assert [event[1] for event in trace.of("closed")] == [connection]


def test_on_record_sees_each_call_record_before_it_is_written(driver: str) -> None:
    seen: list[CallRecordData] = []
    with (
        observed(driver, on_record=seen.append) as run,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.settimeout(WAIT)
        client.connect(run.address)
        assert ask(client, b"RECORD call-9") == b"AFTER-RECORD"
    assert [record.call_ref for record in seen] == ["call-9"]
    assert [record.call_ref for _when, record in run.store.records] == ["call-9"]


def test_a_failing_observer_is_counted_and_the_server_goes_on(driver: str) -> None:
    trace = Recorder(fail=True)

    def broken(_record: CallRecordData) -> None:
        raise RuntimeError("record observer bug")

    with observed(driver, trace=trace, on_record=broken) as run:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(WAIT)
            client.connect(run.address)
            assert ask(client, b"ECHO one") == b"one"
            assert ask(client, b"RECORD call-1") == b"AFTER-RECORD"
            assert ask(client, b"ECHO two") == b"two"
        assert run.stats()["trace_errors"] >= 5
        assert len(run.events("trace.failed")) == 1  # logged once, not per message


def test_call_in_loop_from_another_thread(driver: str) -> None:
    with observed(driver) as run:
        server = run.server
        loop_threads: list[int] = []

        def in_loop() -> int:
            loop_threads.append(threading.get_ident())
            return int(run.engine.active)

        results = []
        threads = [
            threading.Thread(
                target=lambda: results.append(server.call_in_loop(in_loop, timeout=WAIT))
            )
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert results == [0] * 8
        assert len(set(loop_threads)) == 1 and loop_threads[0] != threading.get_ident()

        def failing() -> None:
            raise ValueError("from the loop")

        with pytest.raises(ValueError, match="from the loop"):
            server.call_in_loop(failing, timeout=WAIT)
    with pytest.raises(RuntimeError):
        server.call_in_loop(lambda: 1, timeout=WAIT)


def test_call_in_loop_times_out_while_the_loop_is_busy(driver: str) -> None:
    with observed(driver) as run, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.connect(run.address)
        client.send(b"SLOW 1.5")  # the fake engine blocks the loop this long
        assert wait_for(lambda: any(c[1][0] == b"SLOW 1.5" for c in run.engine.calls))
        ran: list[bool] = []
        with pytest.raises(TimeoutError):
            run.server.call_in_loop(lambda: ran.append(True), timeout=0.2)
        # A call given up is never run later.
        assert run.server.call_in_loop(lambda: len(ran), timeout=WAIT) == 0
