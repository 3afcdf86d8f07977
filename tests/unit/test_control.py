"""kx_sipd.control over loopback HTTP with a fake engine and driver: every route, the
health verdicts (store down, relay down, loop stuck), bad requests answered clearly;
and the CLI commands (status, bans list|clear) against it."""

from __future__ import annotations

import http.client
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from kx_sipd._cli_ops import _status_text
from kx_sipd.cli import main
from kx_sipd.control import ControlEndpoint, ControlError, _loopback, control_request
from kx_sipd.metrics import RelayMonitor, ServerMetrics
from kx_sipd.settings import format_address
from sansio_sip import Address, StoreUnavailable

WAIT = 5.0


class FakeEngine:
    def __init__(self) -> None:
        self.banned = {"192.0.2.9": 300.0, "192.0.2.10": 20.0}
        self.active_calls = 1
        self.accepting = True  # Engine.stop_accepting (graceful shutdown) makes it False

    def stats(self) -> dict[str, int]:
        return {
            "requests_in.REGISTER": 4,
            "calls.started": 2,
            "calls.answered": 1,
            "auth.accepted": 2,
            "accounts_shared": 3,
            "refused_second_device": 2,
        }

    def bans(self, *, now: float) -> list[tuple[str, float]]:
        return sorted(self.banned.items())

    def shared_accounts(self, *, now: float) -> list[tuple[str, tuple[str, ...]]]:
        return [("bob", ("192.0.2.1", "192.0.2.2"))]

    def clear_bans(self, ip: str | None = None) -> int:
        if ip is None:
            count = len(self.banned)
            self.banned.clear()
            return count
        return 1 if self.banned.pop(ip, None) is not None else 0


class FakeServer:
    """call_in_loop runs at once, or raises TimeoutError when ``stuck``."""

    def __init__(self) -> None:
        self.addresses = [("127.0.0.1", 5060)]
        self.stuck = False

    def stats(self) -> dict[str, int]:
        return {"tcp_connections": 0}

    def call_in_loop(self, func: Callable[[], Any], *, timeout: float) -> Any:
        if self.stuck:
            raise TimeoutError(f"the driver loop did not answer within {timeout} s")
        return func()


class FakeRelayClient:
    up = True

    def shard_stats(self) -> list[dict[str, Any]]:
        if not FakeRelayClient.up:
            from sansio_sip import MediaUnavailable

            raise MediaUnavailable("relay at 127.0.0.1:1 does not answer")
        return [{"index": 0, "ok": True, "calls": 0, "free_pairs": 10, "media": {}}]

    def close(self) -> None:
        pass


class Running:
    def __init__(self) -> None:
        self.engine = FakeEngine()
        self.server = FakeServer()
        self.store_down = False
        self.metrics = ServerMetrics(driver="socket", version="0.1.0")
        self.metrics.attach(relay=RelayMonitor(FakeRelayClient, max_age=0.0))
        self.endpoint = ControlEndpoint(
            ("127.0.0.1", 0),
            metrics=self.metrics,
            store_check=self._store_check,
            info={"version": "0.1.0", "driver": "socket", "listen": ["127.0.0.1:5060"]},
        )

    def _store_check(self) -> None:
        if self.store_down:
            raise StoreUnavailable("kx.sqlite: no such table: accounts")

    def ask(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
        host, port = self.endpoint.address
        connection = http.client.HTTPConnection(host, port, timeout=WAIT)
        try:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            return response.status, response.read(), response.getheader("Content-Type") or ""
        finally:
            connection.close()

    def json(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        status, data, kind = self.ask(method, path, body)
        assert kind == "application/json"
        return status, orjson.loads(data)


@pytest.fixture
def run() -> Iterator[Running]:
    running = Running()
    FakeRelayClient.up = True
    running.endpoint.start()
    running.endpoint.attach(engine=running.engine, server=running.server)
    try:
        yield running
    finally:
        running.endpoint.stop()


def test_metrics_route_serves_the_prometheus_text_format(run: Running) -> None:
    status, data, kind = run.ask("GET", "/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    text = data.decode()
    assert 'kx_sipd_sip_requests_total{method="REGISTER"} 4.0' in text
    assert 'kx_sipd_up{component="store"} 1.0' in text
    assert "kx_sipd_bans 2.0" in text


def test_healthz_is_200_when_all_is_up_and_503_naming_what_is_down(run: Running) -> None:
    status, body = run.json("GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and body["down"] == []
    run.store_down = True
    run.endpoint._store._last = None  # skip the one-second cache of the probe
    status, body = run.json("GET", "/healthz")
    assert status == 503 and body["down"] == ["store"]
    assert "no such table" in body["store"]["error"]
    run.store_down = False
    run.endpoint._store._last = None
    FakeRelayClient.up = False
    status, body = run.json("GET", "/healthz")
    assert status == 503 and body["down"] == ["relay"]
    FakeRelayClient.up = True
    run.server.stuck = True
    status, body = run.json("GET", "/healthz")
    assert status == 503 and body["down"] == ["sip"]
    assert "did not answer" in body["sip"]["error"]


def test_healthz_is_503_while_the_server_stops_taking_calls(run: Running) -> None:
    """Graceful shutdown: calls up go on, new ones get 503; a load balancer must move
    new calls to another host, so the SIP component is down then."""
    run.engine.accepting = False
    status, body = run.json("GET", "/healthz")
    assert status == 503 and body["down"] == ["sip"]
    assert body["sip"]["error"].startswith("stopping") and body["sip"]["listen"]
    status, data, _kind = run.ask("GET", "/metrics")
    assert b'kx_sipd_up{component="sip"} 0.0' in data
    run.engine.accepting = True
    assert run.json("GET", "/healthz")[0] == 200


def test_healthz_before_the_driver_serves_says_sip_is_down() -> None:
    running = Running()
    running.endpoint.start()
    try:
        status, body = running.json("GET", "/healthz")
    finally:
        running.endpoint.stop()
    assert status == 503 and body["down"] == ["sip"]


def test_status_bans_and_clearing(run: Running) -> None:
    status, body = run.json("GET", "/status")
    assert status == 200
    assert body["server"]["driver"] == "socket" and body["server"]["uptime_s"] >= 0
    assert body["calls"]["up"] == 1 and body["calls"]["started"] == 2
    assert body["sip"]["requests"] == {"REGISTER": 4}
    assert body["bans"] == [
        {"ip": "192.0.2.10", "seconds_left": 20.0},
        {"ip": "192.0.2.9", "seconds_left": 300.0},
    ]
    assert body["shared_accounts"] == [{"account": "bob", "addresses": ["192.0.2.1", "192.0.2.2"]}]
    assert body["devices"] == {"sharing_seen": 3, "second_refused": 2}
    assert body["relay"]["up"] is True
    status, body = run.json("POST", "/bans/clear", b'{"ip": "192.0.2.9"}')
    assert (status, body) == (200, {"cleared": 1, "ip": "192.0.2.9"})
    status, body = run.json("GET", "/bans")
    assert body == {"bans": [{"ip": "192.0.2.10", "seconds_left": 20.0}]}
    status, body = run.json("POST", "/bans/clear")
    assert (status, body) == (200, {"cleared": 1, "ip": None})


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("POST", "/bans/clear", b'{"ip": "not-an-ip"}', 400),
        ("POST", "/bans/clear", b"{not json", 400),
        ("GET", "/bans/clear", None, 405),
        ("POST", "/metrics", b"", 405),
        ("GET", "/nothing", None, 404),
    ],
)
def test_bad_requests_get_a_clear_answer(
    run: Running, method: str, path: str, body: bytes | None, expected: int
) -> None:
    status, answer = run.json(method, path, body)
    assert status == expected and answer["error"]


def test_a_stuck_loop_answers_503_on_control_routes(run: Running) -> None:
    run.server.stuck = True
    status, body = run.json("POST", "/bans/clear")
    assert status == 503 and "did not answer" in body["error"]
    status, data, _kind = run.ask("GET", "/metrics")
    assert status == 200 and b'kx_sipd_up{component="sip"} 0.0' in data


def test_only_loopback_clients_reach_control_routes() -> None:
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("::ffff:127.0.0.1")
    assert not _loopback("192.0.2.1") and not _loopback("2001:db8::1")
    assert not _loopback("garbage")


def test_a_taken_address_raises_oserror(run: Running) -> None:
    other = ControlEndpoint(
        run.endpoint.address, metrics=ServerMetrics(), store_check=lambda: None, info={}
    )
    with pytest.raises(OSError):
        other.start()


def test_control_request_reports_an_absent_endpoint() -> None:
    running = Running()
    address = running.endpoint.start()
    running.endpoint.stop()
    with pytest.raises(ControlError, match="no kx-sipd control endpoint"):
        control_request(address, "GET", "/status", timeout=WAIT)


# -- the CLI -------------------------------------------------------------------------------------


def _cli(address: Address, *args: str) -> Any:
    return CliRunner().invoke(main, [*args, "--control", format_address(address)])


def test_status_command_text_and_json(run: Running) -> None:
    result = _cli(run.endpoint.address, "status")
    assert result.exit_code == 0, result.output
    assert "kx-sipd 0.1.0 (socket)" in result.output
    assert "health: ok" in result.output
    assert "calls up: 1" in result.output
    assert "192.0.2.9" in result.output
    assert "accounts used from several addresses: 1  (since start: 3 requests from a second " in (
        result.output
    )
    assert "2 refused)" in result.output
    assert re.search(r"(?m)^bob +192\.0\.2\.1 192\.0\.2\.2$", result.output), result.output
    result = _cli(run.endpoint.address, "status", "--json")
    assert result.exit_code == 0
    assert orjson.loads(result.output)["calls"]["up"] == 1


def test_bans_commands(run: Running) -> None:
    result = _cli(run.endpoint.address, "bans", "list", "--json")
    assert result.exit_code == 0
    assert [orjson.loads(line)["ip"] for line in result.output.splitlines()] == [
        "192.0.2.10",
        "192.0.2.9",
    ]
    result = _cli(run.endpoint.address, "bans", "clear", "192.0.2.10")
    assert result.exit_code == 0 and "1 ban lifted (on 192.0.2.10)" in result.output
    result = _cli(run.endpoint.address, "bans", "clear", "nonsense")
    assert result.exit_code == 2 and "not an IP address" in result.output
    result = _cli(run.endpoint.address, "bans", "clear")
    assert result.exit_code == 0 and "1 ban lifted (in all)" in result.output
    result = _cli(run.endpoint.address, "bans", "list")
    assert result.output.strip() == "no bans"


def test_commands_say_clearly_when_no_server_listens() -> None:
    running = Running()
    address = running.endpoint.start()
    running.endpoint.stop()
    result = _cli(address, "status")
    assert result.exit_code == 1
    assert "no kx-sipd control endpoint" in result.output


OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
STATUS_EXAMPLE: dict[str, Any] = {
    "server": {
        "version": "0.1.0",
        "driver": "anyio",
        "backend": "asyncio",
        "pid": 4242,
        "uptime_s": 7987.2,
        "started": "2026-11-26T11:02:40Z",
        "listen": ["0.0.0.0:5060"],
        "sip_address": "203.0.113.5:5060",
    },
    "health": {"status": "ok", "down": []},
    "calls": {"up": 3, "started": 118, "answered": 97},
    "routes": {
        "carrier": {
            "up": 3,
            "attempts": 112,
            "answers": 93,
            "failures": {"486": 9, "487": 7, "503": 3},
        },
        "echo": {"up": 0, "attempts": 6, "answers": 4, "failures": {"487": 2}},
    },
    "relay": {
        "up": True,
        "error": None,
        "shards": [
            {
                "index": 0,
                "up": True,
                "calls": 2,
                "free_pairs": 248,
                "packets_in": 81234,
                "packets_out": 81190,
                "packets_lost": 3,
                "jitter_ms_mean": 1.2,
            },
            {
                "index": 1,
                "up": True,
                "calls": 1,
                "free_pairs": 249,
                "packets_in": 40611,
                "packets_out": 40598,
                "packets_lost": 0,
                "jitter_ms_mean": 0.9,
            },
        ],
    },
    "bans": [{"ip": "198.51.100.7", "seconds_left": 412.3}],
    "shared_accounts": [{"account": "acmeclient", "addresses": ["192.0.2.10", "203.0.113.44"]}],
    "devices": {"sharing_seen": 14, "second_refused": 0},
}


def test_the_operations_page_shows_what_status_prints() -> None:
    """docs/operations.md's ``kx-sipd status`` example is the formatter's output for the
    figures it shows (uptime, calls, routes, relay shards, bans, shared accounts)."""
    page = OPERATIONS.read_text(encoding="utf-8")
    shown = page.split("$ kx-sipd status\n", 1)[1].split("```", 1)[0].rstrip("\n")
    assert shown == _status_text(STATUS_EXAMPLE)
