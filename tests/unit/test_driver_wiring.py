"""``kx-sipd serve --driver socket`` honours every serve option ``--driver anyio`` does.

Each ``ServerSettings`` field (one per serve option) is placed below in exactly one
group: what the drivers apply themselves (handed to both as ``DriverOptions`` by
kx_sipd/app.py), what only one driver can use (and why), and what the engine, the
relay or the application apply whichever driver runs. A serve option added without
being placed fails here, so nobody adds one to a single driver by accident; the
driver group is then checked to reach both drivers with the same values, and the
application's hooks (store, relay, log, HEP trace, metrics, control endpoint) too.
Over the wire, the driver group is exercised per driver in
tests/conformance/test_serve_options.py and test_lifecycle.py.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest

import io_anyio
import io_socket
from kx_sipd import app
from kx_sipd.settings import ServerSettings

# serve option -> DriverOptions field, applied by each driver on its own sockets
DRIVER = {
    "listen": "listen",
    "store_timeout": "store_timeout",
    "shutdown_grace": "grace_period",
    "max_tcp_connections": "max_tcp_connections",
    "max_tcp_per_ip": "max_tcp_per_ip",
    "tcp_idle_timeout": "tcp_idle_timeout",
}
# The event loop io_anyio runs on; io_socket has none to choose (it is logged as null).
ANYIO_ONLY = {"backend"}
# Applied by the engine (EngineConfig), the relay, or the application around the driver.
ELSEWHERE = {
    "db", "realm", "demo", "driver", "log_level", "sip_address", "relay", "relay_shards",
    "rtp_range", "rtp_address", "relay_secret", "media_timeout", "echo_number", "max_calls",
    "one_device_per_account", "uniform_auth_failures", "max_message_size", "max_headers",
    "max_via_depth", "max_transactions", "max_pending_lookups", "retry_after",
    "ban_failures", "ban_window", "ban_time", "slow_after", "drop_scanners", "metrics",
    "hep", "hep_agent_id",
}  # fmt: skip

NON_DEFAULT: dict[str, Any] = {
    "listen": (("127.0.0.1", 5070), ("::1", 5071)),
    "store_timeout": 0.7,
    "shutdown_grace": 3.0,
    "max_tcp_connections": 11,
    "max_tcp_per_ip": 5,
    "tcp_idle_timeout": 42.0,
}


def test_every_serve_option_is_placed_once() -> None:
    fields = [field.name for field in attrs.fields(ServerSettings)]
    groups = [set(DRIVER), ANYIO_ONLY, ELSEWHERE]
    unplaced = [name for name in fields if not any(name in group for group in groups)]
    assert not unplaced, f"serve options not placed in a group here: {unplaced}"
    twice = [name for name in fields if sum(name in group for group in groups) > 1]
    assert not twice, twice
    assert set().union(*groups) <= set(fields), set().union(*groups) - set(fields)


def test_both_drivers_have_every_driver_field() -> None:
    for options in (io_anyio.DriverOptions, io_socket.DriverOptions):
        names = {field.name for field in attrs.fields(options)}
        assert set(DRIVER.values()) <= names, (options, set(DRIVER.values()) - names)
    anyio_fields = {field.name for field in attrs.fields(io_anyio.DriverOptions)}
    socket_fields = {field.name for field in attrs.fields(io_socket.DriverOptions)}
    assert anyio_fields <= socket_fields, anyio_fields - socket_fields  # one mapping fits both


def serve_with(monkeypatch: pytest.MonkeyPatch, driver: str) -> tuple[Any, dict[str, Any]]:
    """What kx_sipd.app hands the driver: (options, the other keyword arguments)."""
    handed: list[tuple[Any, dict[str, Any]]] = []

    def fake_serve(engine: object, *, options: Any, **kwargs: Any) -> None:
        handed.append((options, kwargs))

    monkeypatch.setattr(io_anyio, "serve", fake_serve)
    monkeypatch.setattr(io_socket, "serve", fake_serve)
    settings = ServerSettings(driver=driver, **NON_DEFAULT)
    observed = {name: object() for name in ("store", "relay", "log", "trace", "on_record")}
    observed["started"] = print
    app._serve(settings, object(), observed)  # type: ignore[arg-type]
    ((options, kwargs),) = handed
    return options, {**kwargs, **{f"observed.{k}": v for k, v in observed.items()}}


def test_the_driver_options_reach_either_driver_with_the_same_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    socket_options, socket_rest = serve_with(monkeypatch, "socket")
    anyio_options, anyio_rest = serve_with(monkeypatch, "anyio")
    assert isinstance(socket_options, io_socket.DriverOptions)
    assert isinstance(anyio_options, io_anyio.DriverOptions)
    for setting, field in DRIVER.items():
        expected = NON_DEFAULT[setting]
        assert getattr(socket_options, field) == expected, (setting, field)
        assert getattr(anyio_options, field) == expected, (setting, field)
    # The hooks: the same objects to both (the anyio one also gets its backend).
    for name in ("store", "relay", "log", "trace", "on_record", "started"):
        assert socket_rest[name] is socket_rest[f"observed.{name}"], name
        assert anyio_rest[name] is anyio_rest[f"observed.{name}"], name
    assert "backend" not in socket_rest and anyio_rest["backend"] == "asyncio"
