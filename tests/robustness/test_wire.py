"""fuzz/wire.py against ``kx-sipd serve`` on loopback, for both drivers: every
batch of malformed and edge-case packets (truncated, oversize, NUL, invalid
UTF-8, huge Content-Length, thousands of headers, deep Via stacks, mutated
requests, IP fragments, forged sources, IPv6 on ::1, hostile TCP and
slowloris) is followed by a valid OPTIONS that must be answered, on IPv4 and
IPv6; the server must then stop cleanly, having counted what it dropped."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from robust_support import KxServer, running

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets (scapy) need root")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_kx_wire", FUZZ / "wire.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


WIRE = _load()


@pytest.fixture(params=["anyio", "socket"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KxServer]:
    running = KxServer.start(tmp_path, driver=str(request.param))
    try:
        yield running
    finally:
        running.stop()


def test_the_server_answers_after_every_batch(server: KxServer) -> None:
    target = WIRE.Target("127.0.0.1", server.port, server.port if server.ipv6 else None)
    results = WIRE.run(target, rounds=1, seed=20)
    names = [result.name for result in results]
    assert names == [*WIRE.BATCHES, "tcp"]
    assert all(result.answered for result in results)
    assert all(result.ipv6_answered in (True, None) for result in results)
    assert sum(result.packets for result in results) > 500
    assert server.alive, server.log_tail()
    assert server.stop() == 0, server.log_tail()
    stats = server.exit_stats()
    assert stats["dropped_malformed"] > 50, stats
    assert stats["responses_out.400"] > 50, stats
    assert stats.get("framing_errors", 0) > 0, stats


def test_no_input_on_the_wire_is_an_engine_bug(tmp_path: Path) -> None:
    """Found by the ``spoofed`` batch: the driver logs ``engine.bug`` (an
    exception escaped ``Engine.receive``) for a request from UDP port 0."""
    with running(tmp_path) as server:
        target = WIRE.Target("127.0.0.1", server.port, None)
        WIRE.run(target, rounds=1, seed=20, only=("spoofed",))
        assert server.stop() == 0
        bugs = [e for e in server.log_events() if e.get("event") == "engine.bug"]
        assert not bugs, bugs


def test_the_command_line_reports_a_silent_server() -> None:
    """Not vacuous: against a port where nothing answers, wire.py fails."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quiet:
        quiet.bind(("127.0.0.1", 0))
        port = quiet.getsockname()[1]
        WIRE.CHECK_WAIT, saved = 0.2, WIRE.CHECK_WAIT
        try:
            assert WIRE.main([f"127.0.0.1:{port}", "--only", "oversize"]) == 1
        finally:
            WIRE.CHECK_WAIT = saved
