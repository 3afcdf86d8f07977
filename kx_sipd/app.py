"""The wiring of ``kx-sipd serve``: store, relay, engine and driver, in that order.

``run_server(settings)`` opens the operator's store (a database made for
another realm stops the server with a clear message instead of failing every
login), closes the call records a previous run left open, builds the engine's
configuration from the settings and the store (realm, nonce secret shared
through the database), starts the local RTP relay unless a remote one is
named, and hands everything to the chosen driver until SIGINT/SIGTERM. What a
driver does with them is the driver's business (DESIGN.md §3); this module
holds no SIP and no I/O loop of its own.

Operations (docs/operations.md): the metrics (kx_sipd/metrics.py) observe the
driver's call records and time its store calls through a wrapper; the HTTP
control endpoint (kx_sipd/control.py: /metrics, /healthz, /status, /bans)
listens on ``--metrics`` or, by default, 127.0.0.1:9061 (an explicit address
that cannot be bound stops the server; the default one only logs a warning);
``--hep`` streams every SIP message to a HEP v3 collector (kx_sipd/trace.py). The
driver's log sink goes through ``AnswerLog``, which counts a call's answer and its
set-up time at the engine's ``call.answered`` event, when the 2xx goes out.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

import attrs

from sansio_sip import AccountStore, Address, Engine, EngineConfig, MediaRelay, StoreUnavailable

from . import __version__
from .control import DEFAULT_CONTROL, STORE_PROBE_USER, ControlEndpoint
from .logging import JsonLogger, capture_library_logs
from .metrics import AnswerLog, RelayMonitor, ServerMetrics
from .settings import ServerSettings, format_address
from .trace import HepTrace

if TYPE_CHECKING:
    from rtp_relay import LocalRelay

__all__ = ["GC_THRESHOLDS", "demo_banner", "run_server", "settle_gc"]


def run_server(settings: ServerSettings) -> None:
    """Serve until signalled; returns after a clean shutdown.

    Raises SystemExit with a message (non-zero status) when the store cannot be
    opened or belongs to another realm, or when the relay cannot be started.
    """
    from rtp_relay import RelayClient, RelayStartError

    from .store import RealmMismatch, Store, StoreError

    log = JsonLogger(settings.log_level)
    # The relay client warns through stdlib logging (ports exhausted, a shard
    # not answering): those must be JSON lines like everything else.
    capture_library_logs(log, "rtp_relay", "relay.client")
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
        monitor: RelayMonitor
        if settings.relay is not None:
            assert settings.relay_secret is not None  # the settings refuse --relay without it
            # Each allocation carries --media-timeout: it holds whatever the
            # remote relay was started with (docs/relay-protocol.md).
            relay = RelayClient(
                settings.relay,
                settings.relay_secret.encode(),
                media_timeout=settings.media_timeout,
            )
            relay_at = format_address(settings.relay)
            remote, secret = settings.relay, settings.relay_secret.encode()
            ignored = _local_relay_options_given(settings)
            if ignored:
                log.log(
                    "warning",
                    "relay.options_ignored",
                    options=",".join(ignored),
                    reason="a remote relay (--relay) uses the options it was started with",
                )
            monitor = RelayMonitor(lambda: RelayClient(remote, secret, timeout=0.25, retries=1))
        else:
            try:
                local_relay = _start_local_relay(settings)
            except RelayStartError as exc:
                _fail(log, "relay.failed", str(exc))
            relay = local_relay.client()
            relay_at = format_address(local_relay.control)
            monitor = RelayMonitor(partial(local_relay.client, timeout=0.25, retries=1))
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
        _run_driver(settings, engine, store, relay, log, monitor)
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
    monitor: RelayMonitor,
) -> None:
    metrics = ServerMetrics(driver=settings.driver, version=__version__)
    metrics.attach(relay=monitor)
    explicit = settings.metrics is not None
    endpoint = ControlEndpoint(
        settings.metrics or DEFAULT_CONTROL,
        metrics=metrics,
        # The operator's uncached look-up: the driver's path may answer from its cache.
        store_check=partial(getattr(store, "account_info", store.get_account), STORE_PROBE_USER),
        info={
            "version": __version__,
            "driver": settings.driver,
            "backend": settings.backend if settings.driver == "anyio" else None,
            "listen": [format_address(address) for address in settings.listen],
            "sip_address": format_address(settings.advertised_sip_address),
        },
        log=log.log,
    )
    try:
        control_at = endpoint.start()
    except OSError as exc:
        where = format_address(endpoint.requested)
        if explicit:
            _fail(log, "control.failed", f"cannot listen on --metrics {where}: {exc.strerror}")
        log.log("warning", "control.unavailable", address=where, error=str(exc))
    else:
        log.log("info", "control.listening", address=format_address(control_at))
    hep_at: Address | None = getattr(settings, "hep", None)
    hep = None
    if hep_at is not None:
        hep = HepTrace(
            hep_at,
            agent_id=int(getattr(settings, "hep_agent_id", 2001)),
            ours=settings.advertised_sip_address,
        )
        log.log("info", "hep.sending", collector=format_address(hep_at), agent_id=hep.agent_id)
    observed: dict[str, Any] = {
        "store": metrics.timed(store),
        "relay": relay,
        # Answers count when they go out (records come at a call's start and end).
        "log": AnswerLog(metrics, log),
        # Only HEP reads every message; without it the drivers trace nothing.
        "trace": hep,
        "on_record": metrics.observe_record,
        "started": lambda server: _started(endpoint, engine, server, up),
    }
    up: list[bool] = []
    try:
        _serve(settings, engine, observed)
    except (OSError, BaseExceptionGroup) as exc:
        bind_error = _bind_error(exc)
        if up or bind_error is None:
            raise
        # The driver could not open its SIP sockets: a line, not a traceback.
        where = ", ".join(format_address(address) for address in settings.listen)
        _fail(log, "listen.failed", f"cannot listen on {where}: {bind_error.strerror}")
    finally:
        endpoint.stop()
        if hep is not None:
            hep.close()
            log.log("info", "hep.stopped", **hep.counters)


def _started(endpoint: ControlEndpoint, engine: Engine, server: Any, up: list[bool]) -> None:
    up.append(True)
    endpoint.attach(engine=engine, server=server)
    settle_gc()


GC_THRESHOLDS = (50_000, 100, 100)
"""The cyclic collector's thresholds while serving (CPython's default: 700, 10, 10).

The REGISTER and call paths create no reference cycles: what they allocate
is freed by reference counting, so a collection finds nothing and only walks
what is alive: lingering transactions (Timer J keeps each REGISTER's two
transactions 32 s), about twenty objects each, and the calls that are up,
about 120 each. With the default 700 a young collection ran every ~16
messages and full collections walked every live transaction: a quarter to a
third of the CPU of a registration (bench/register_inprocess.py --profile).
At 50,000 the young collection runs ~70 times less often. The middle
generation's collection walks everything that survived the young ones since
the last, about the whole live set: with 2,000 calls up, 0.1-0.5 s with the
loop stopped. After every 10th young collection (the default's ratio), that
was a pause every ~15 s at 200 calls/s, long enough for the clients'
retransmissions (T1, 500 ms); after every 100th, about every 2.3 minutes (a
reckoning: young collections came ~1.4 s apart at 200 calls/s, measured with
gc.callbacks).
Cyclic garbage (finished tasks, tracebacks) is still collected: it counts
towards the thresholds like any allocation, so a young collection comes
within 50,000 net allocations, one of the middle generation after
5,000,000, and a full one after 100 of those (CPython also waits for the old
generation to grow by a quarter)."""


def settle_gc() -> None:
    """Once the server is up: move everything start-up created (modules,
    classes, settings, the store) out of the collector's sight with
    ``gc.freeze()`` -- it lives as long as the process, and would otherwise be
    walked by every full collection -- and raise the thresholds (``GC_THRESHOLDS``).
    Objects frozen are still freed by reference counting when released."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _serve(settings: ServerSettings, engine: Engine, observed: dict[str, Any]) -> None:
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

        io_socket.serve(engine, options=io_socket.DriverOptions(**shared), **observed)
    else:
        import io_anyio

        io_anyio.serve(
            engine,
            options=io_anyio.DriverOptions(**shared),
            backend=settings.backend,
            **observed,
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


def _local_relay_options_given(settings: ServerSettings) -> list[str]:
    """The local relay's settings given a value other than their default, which
    a remote relay ignores (it was started with its own)."""
    defaults = attrs.fields_dict(ServerSettings)
    return [
        "--" + name.replace("_", "-")
        for name in ("relay_shards", "rtp_range", "rtp_address")
        if getattr(settings, name) != defaults[name].default
    ]


def _bind_error(exc: BaseException) -> OSError | None:
    """The OSError behind a driver's failure to start (io_anyio raises it inside
    an exception group), or None."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _bind_error(inner)
            if found is not None:
                return found
    return None


def _fail(log: JsonLogger, event: str, message: str) -> NoReturn:
    log.log("error", event, error=message)
    print(f"kx-sipd: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)
