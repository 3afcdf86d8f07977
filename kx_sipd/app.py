"""The wiring of ``kx-sipd serve``: store, relay, engine and driver, in that order.

``run_server(settings)`` opens the operator's store (a database made for
another realm stops the server with a clear message instead of failing every
login), closes the call records a previous run left open, builds the engine's
configuration from the settings and the store (realm, nonce secret shared
through the database), starts the local RTP relay unless a remote one is
named, and hands everything to the chosen driver until SIGINT/SIGTERM. What a
driver does with them is the driver's business (DESIGN.md §3); this module
holds no SIP and no I/O loop of its own.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

from sansio_sip import AccountStore, Engine, EngineConfig, MediaRelay, StoreUnavailable

from .logging import JsonLogger
from .settings import ServerSettings, format_address

if TYPE_CHECKING:
    from rtp_relay import LocalRelay

__all__ = ["demo_banner", "run_server"]


def run_server(settings: ServerSettings) -> None:
    """Serve until signalled; returns after a clean shutdown.

    Raises SystemExit with a message (non-zero status) when the store cannot be
    opened or belongs to another realm, or when the relay cannot be started.
    """
    from rtp_relay import RelayClient, RelayStartError

    from .store import RealmMismatch, Store, StoreError

    log = JsonLogger(settings.log_level)
    try:
        store = Store(settings.db, realm=settings.realm)
    except RealmMismatch as exc:
        _fail(log, "store.realm_mismatch", f"{exc} (serve without --realm to use the database's)")
    except (StoreError, StoreUnavailable) as exc:
        _fail(log, "store.unavailable", f"cannot open the database {settings.db}: {exc}")
    local_relay: LocalRelay | None = None
    try:
        recovered = store.recover_unfinished(time.time())
        if recovered:
            log.log("warning", "records.recovered", count=recovered, reason="server restarted")
        sip_address = settings.advertised_sip_address
        config = EngineConfig(
            realm=store.realm,
            nonce_secret=store.nonce_secret,
            sip_address=sip_address,
            echo_number=settings.echo_number,
            **settings.engine_limits(),
        )
        relay: MediaRelay
        if settings.relay is not None:
            assert settings.relay_secret is not None  # the settings refuse --relay without it
            relay = RelayClient(settings.relay, settings.relay_secret.encode())
            relay_at = format_address(settings.relay)
        else:
            try:
                local_relay = _start_local_relay(settings)
            except RelayStartError as exc:
                _fail(log, "relay.failed", str(exc))
            relay = local_relay.client()
            relay_at = format_address(local_relay.control)
        engine = Engine(config, entropy=os.urandom)
        if settings.demo:
            print(demo_banner(settings, store.realm), flush=True)
        log.log(
            "info",
            "server.started",
            listen=" ".join(format_address(address) for address in settings.listen),
            sip_address=format_address(sip_address),
            realm=store.realm,
            driver=settings.driver,
            backend=settings.backend if settings.driver == "anyio" else None,
            relay=relay_at,
            relay_local=local_relay is not None,
            database=store.path,
            pid=os.getpid(),
        )
        _run_driver(settings, engine, store, relay, log)
        log.log("info", "server.exited", **engine.stats())
    finally:
        if local_relay is not None:
            local_relay.stop()
        store.close()


def _run_driver(
    settings: ServerSettings,
    engine: Engine,
    store: AccountStore,
    relay: MediaRelay,
    log: JsonLogger,
) -> None:
    shared: dict[str, Any] = {
        "listen": settings.listen,
        "store_timeout": settings.store_timeout,
        "grace_period": settings.shutdown_grace,
        "max_tcp_connections": settings.max_tcp_connections,
        "max_tcp_per_ip": settings.max_tcp_per_ip,
        "tcp_idle_timeout": settings.tcp_idle_timeout,
    }
    if settings.driver == "socket":
        import io_socket

        io_socket.serve(
            engine, store=store, relay=relay, options=io_socket.DriverOptions(**shared), log=log
        )
    else:
        import io_anyio

        io_anyio.serve(
            engine,
            store=store,
            relay=relay,
            options=io_anyio.DriverOptions(**shared),
            log=log,
            backend=settings.backend,
        )


def _start_local_relay(settings: ServerSettings) -> LocalRelay:
    from rtp_relay import RelayConfig, start_local_relay

    advertised = settings.advertised_rtp_address
    secret = settings.relay_secret.encode() if settings.relay_secret else os.urandom(32)
    config = RelayConfig(
        secret=secret,
        control=("127.0.0.1", 0),
        rtp_range=settings.rtp_range,
        shards=settings.relay_shards,
        media_host="::" if ":" in advertised else "0.0.0.0",
        advertised=advertised,
        media_timeout=settings.media_timeout,
        log_level=settings.log_level,
    )
    return start_local_relay(config)


def demo_banner(settings: ServerSettings, realm: str) -> str:
    """What a first-time operator types into a softphone to try the demo."""
    from .settings import DEMO_PASSWORD, DEMO_USERNAME

    host, port = settings.advertised_sip_address
    server = f"[{host}]" if ":" in host else host
    return "\n".join(
        [
            "kx-sipd demo: point a softphone at this server",
            f"  SIP server / domain : {server}",
            f"  Port                : {port}",
            "  Transport           : UDP (or TCP)",
            f"  Username / Auth name: {DEMO_USERNAME}",
            f"  Password            : {DEMO_PASSWORD}",
            f"  Realm               : {realm} (or leave blank: the 401 announces it)",
            f"  Dial {settings.echo_number} for the echo test (you hear yourself).",
            f"  Database            : {settings.db}",
        ]
    )


def _fail(log: JsonLogger, event: str, message: str) -> NoReturn:
    log.log("error", event, error=message)
    print(f"kx-sipd: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)
