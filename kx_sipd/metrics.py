"""kx-sipd's figures for Prometheus and ``kx-sipd status``.

Three sources, each read where it is safe to read it:

* **The engine and the driver** count everything SIP (``Engine.stats()``,
  ``Server.stats()``). Neither is thread-safe, so a ``Snapshot`` of them is
  taken *in the driver's loop* (``take_snapshot`` through the driver's
  ``call_in_loop``) when a scrape or a status request comes, and turned into
  metric families then: nothing is copied on the hot path.
* **Call records** (the driver's ``on_record`` hook, in the loop) give attempts,
  answers and failures by route and final status, calls up per route and the
  call set-up time (answer − start). Records come at a call's start and end
  only, so ``AnswerLog`` (the driver's log sink) counts an answer and its set-up
  time at the engine's ``call.answered`` event, when the 2xx to the INVITE goes out. The store wrapper ``TimedStore`` times
  every store call the driver makes (look-ups, record writes, media figures)
  and sees the media figures of each ended call (loss, jitter per leg).
* **The relay** is asked by ``RelayMonitor`` (shard figures over the control
  protocol, with short timeouts, cached for a second so /metrics, /healthz and
  /status together cost one round of questions).

Label values are bounded: SIP methods outside the RFC set count as ``other``,
status codes are numbers, routes are the operator's, and the table of calls in
progress is capped. Metric names start with ``kx_sipd_``; docs/operations.md
lists them all (a test checks the page against ``METRIC_NAMES``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from sansio_sip import (
    KNOWN_METHODS,
    Account,
    AccountStore,
    CallRecordData,
    Log,
    MediaStats,
)

__all__ = [
    "METRIC_NAMES",
    "AnswerLog",
    "RelayMonitor",
    "RelaySample",
    "RouteFigures",
    "ServerMetrics",
    "Snapshot",
    "TimedStore",
    "take_snapshot",
]

AUTH_FAILURES = ("unknown-user", "bad-credentials", "source-not-allowed")
# Calls whose start record was seen and whose final one was not yet; a lost final record
# (a crash of the store, say) must not grow this for ever.
_MAX_OPEN_CALLS = 200_000
_NO_ROUTE = "none"

# Engine counters that are gauges, or have a family of their own below.
_ENGINE_GAUGES = {
    "transactions": ("kx_sipd_transactions", "Live SIP transactions."),
    "calls_active": ("kx_sipd_calls_active", "Calls up (authenticated and not ended)."),
    "pending_lookups": ("kx_sipd_pending_lookups", "Requests waiting for the account store."),
    "guard_entries": ("kx_sipd_guard_entries", "Entries of the brute-force guard's tables."),
}
_ENGINE_NAMED = {
    "bans_imposed": ("kx_sipd_bans_imposed", "Sources banned for failed authentications."),
    "accounts_shared": (
        "kx_sipd_accounts_shared",
        "Times an account was seen from a second address within its registration interval.",
    ),
    "refused_second_device": (
        "kx_sipd_second_devices_refused",
        "Requests refused because the account is in use from another address.",
    ),
    "auth.challenged": ("kx_sipd_auth_challenges", "401/407 challenges sent."),
    "calls.started": ("kx_sipd_calls_started", "Calls that passed authentication and checks."),
    "calls.answered": ("kx_sipd_calls_answered", "Calls answered (200 to the client)."),
    "calls.media_failed": ("kx_sipd_calls_media_failed", "Calls the relay could not take."),
}
_SKIPPED = {"requests_in", "bans"}  # a sum of labelled series; the live ban count is exact

METRIC_NAMES = (
    "kx_sipd_info",
    "kx_sipd_uptime_seconds",
    "kx_sipd_up",
    "kx_sipd_sip_requests_total",
    "kx_sipd_sip_responses_total",
    "kx_sipd_sip_answers_total",
    "kx_sipd_auth_outcomes_total",
    "kx_sipd_auth_failures_total",
    "kx_sipd_calls_rejected_total",
    "kx_sipd_calls_ended_total",
    "kx_sipd_dropped_total",
    "kx_sipd_engine_events_total",
    "kx_sipd_driver_events_total",
    "kx_sipd_tcp_connections",
    "kx_sipd_records_pending",
    "kx_sipd_bans",
    "kx_sipd_shared_accounts",
    *(name for name, _doc in _ENGINE_GAUGES.values()),
    *(f"{name}_total" for name, _doc in _ENGINE_NAMED.values()),
    "kx_sipd_call_attempts_total",
    "kx_sipd_call_answers_total",
    "kx_sipd_call_failures_total",
    "kx_sipd_calls_up",
    "kx_sipd_call_setup_seconds",
    "kx_sipd_call_media_packets_lost_total",
    "kx_sipd_call_media_jitter_ms",
    "kx_sipd_store_seconds",
    "kx_sipd_store_errors_total",
    "kx_sipd_relay_up",
    "kx_sipd_relay_shard_up",
    "kx_sipd_relay_shard_calls",
    "kx_sipd_relay_shard_free_pairs",
    "kx_sipd_relay_shard_restarts",
    "kx_sipd_relay_packets_total",
    "kx_sipd_relay_bytes_total",
    "kx_sipd_relay_dropped_total",
    "kx_sipd_relay_packets_lost",
    "kx_sipd_relay_jitter_ms",
)


@attrs.frozen(kw_only=True)
class Snapshot:
    """The engine's and the driver's figures at one moment (taken in the loop)."""

    engine: dict[str, int]
    driver: dict[str, int]
    active_calls: int
    bans: tuple[tuple[str, float], ...]
    shared: tuple[tuple[str, tuple[str, ...]], ...]
    addresses: tuple[tuple[str, int], ...]
    wall: float
    # False once a graceful shutdown began: new calls get 503 while running ones end.
    accepting: bool = True


def take_snapshot(engine: Any, server: Any) -> Snapshot:
    """Read ``engine`` (a ``sansio_sip.Engine``) and ``server`` (a driver's ``Server``).
    Must run in the driver's loop: hand it to ``server.call_in_loop``."""
    now = time.monotonic()
    return Snapshot(
        engine=dict(engine.stats()),
        driver=dict(server.stats()),
        active_calls=int(engine.active_calls),
        bans=tuple(engine.bans(now=now)),
        shared=tuple(engine.shared_accounts(now=now)),
        addresses=tuple(server.addresses),
        wall=time.time(),
        accepting=_accepting(engine),
    )


def _accepting(engine: Any) -> bool:
    """Whether the engine still takes new calls (False from ``stop_accepting`` on).
    Engines without the property (test doubles) read as accepting."""
    return bool(getattr(engine, "accepting", True))


@attrs.define
class _OpenCall:
    route: str
    call_id: str
    start_wall: float
    answered: bool = False


@attrs.define
class RouteFigures:
    """Per-route call counts since start (for ``kx-sipd status``)."""

    up: int = 0
    attempts: int = 0
    answers: int = 0
    failures: Counter[int] = attrs.field(factory=Counter)


@attrs.frozen(kw_only=True)
class RelaySample:
    """The relay's state at ``wall``: ``up`` when it answered and at least one shard did;
    ``shards`` one dict per shard (index, up, calls, free_pairs, restarts, packets/bytes
    in and out, drops, packets_lost and jitter of live calls, or error)."""

    up: bool
    shards: tuple[dict[str, Any], ...]
    error: str | None
    wall: float


class RelayMonitor:
    """Asks the relay for its shards' figures, at most once per ``max_age`` seconds.

    ``client_factory`` makes a fresh ``rtp_relay.RelayClient`` (short timeouts) for
    each round, so a relay that restarted on new shard ports is found again. Loss and
    jitter of live calls need one paged question per 100 calls; shards holding more
    than ``max_calls_listed`` calls report only their totals. Thread-safe."""

    def __init__(
        self,
        client_factory: Callable[[], Any],
        *,
        max_age: float = 1.0,
        max_calls_listed: int = 1000,
    ) -> None:
        self._factory = client_factory
        self._max_age = max_age
        self._max_calls = max_calls_listed
        self._lock = threading.Lock()
        self._last: RelaySample | None = None

    def sample(self) -> RelaySample:
        with self._lock:
            last = self._last
            if last is not None and time.time() - last.wall < self._max_age:
                return last
            self._last = sample = self._ask()
            return sample

    def _ask(self) -> RelaySample:
        client = self._factory()
        try:
            try:
                shards = client.shard_stats()
            except Exception as exc:
                return RelaySample(
                    up=False, shards=(), error=str(exc) or repr(exc), wall=time.time()
                )
            out = [self._shard(client, shard) for shard in shards]
        finally:
            client.close()
        up = any(shard["up"] for shard in out)
        error = None if up else "no shard answers"
        return RelaySample(up=up, shards=tuple(out), error=error, wall=time.time())

    def _shard(self, client: Any, reply: dict[str, Any]) -> dict[str, Any]:
        index = int(reply.get("index", -1))
        if "error" in reply or not reply.get("ok", False):
            return {"index": index, "up": False, "error": str(reply.get("error", "refused"))}
        media = reply.get("media") or {}
        shard: dict[str, Any] = {
            "index": index,
            "up": True,
            "pid": reply.get("pid"),
            "calls": int(reply.get("calls", 0)),
            "free_pairs": int(reply.get("free_pairs", 0)),
            "restarts": int(reply.get("restarts", 0)),
            "rtp": reply.get("rtp"),
            "packets_in": int(media.get("packets_in", 0)),
            "packets_out": int(media.get("packets_out", 0)),
            "bytes_in": int(media.get("bytes_in", 0)),
            "bytes_out": int(media.get("bytes_out", 0)),
            "dropped": {
                reason: int(media.get(f"dropped_{reason}", 0))
                for reason in ("foreign", "malformed", "no_peer")
            },
        }
        if 0 < shard["calls"] <= self._max_calls:
            try:
                calls = client.shard_calls(index)
            except Exception:
                return shard  # the totals are still true; the live figures wait for next time
            lost, jitters = 0, []
            for call in calls:
                for side in ("a", "b"):
                    rtp = (call.get(side) or {}).get("rtp") or {}
                    lost += max(0, int(rtp.get("packets_lost", 0)))
                    if rtp.get("packets_in"):
                        jitters.append(float(rtp.get("jitter_ms", 0.0)))
            shard["packets_lost"] = lost
            shard["jitter_ms_mean"] = round(sum(jitters) / len(jitters), 3) if jitters else 0.0
            shard["jitter_ms_max"] = max(jitters, default=0.0)
        elif shard["calls"] == 0:
            shard.update(packets_lost=0, jitter_ms_mean=0.0, jitter_ms_max=0.0)
        return shard


class ServerMetrics:
    """The registry of one server's metrics and the observers that feed it.

    ``observe_record`` is the drivers' ``on_record`` hook; ``timed(store)`` wraps the
    store; ``attach(snapshot, relay, ...)`` adds what is read at scrape time.
    Thread-safe (records arrive in the loop, scrapes in the control thread)."""

    def __init__(self, *, driver: str = "", version: str = "") -> None:
        self.registry = CollectorRegistry()
        self.started_wall = time.time()
        self._started = time.monotonic()
        self._info = {"driver": driver, "version": version}
        self._lock = threading.Lock()
        self._open: dict[str, _OpenCall] = {}  # by call reference
        self._by_call_id: dict[str, str] = {}  # the client leg's Call-ID -> call reference
        self._routes: dict[str, RouteFigures] = {}
        self._snapshot: Callable[[], Snapshot] | None = None
        self._relay: RelayMonitor | None = None
        self._health: Callable[[], dict[str, bool]] | None = None
        registry = self.registry
        self.attempts = PromCounter(
            "kx_sipd_call_attempts",
            "Call attempts (authenticated INVITEs) by route.",
            ["route"],
            registry=registry,
        )
        self.answers = PromCounter(
            "kx_sipd_call_answers", "Calls answered, by route.", ["route"], registry=registry
        )
        self.failures = PromCounter(
            "kx_sipd_call_failures",
            "Calls that ended without an answer, by route and final status.",
            ["route", "code"],
            registry=registry,
        )
        self.calls_up = PromGauge(
            "kx_sipd_calls_up", "Calls in progress, by route.", ["route"], registry=registry
        )
        self.setup = Histogram(
            "kx_sipd_call_setup_seconds",
            "Seconds from the INVITE to the answer, by route.",
            ["route"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60),
            registry=registry,
        )
        self.media_lost = PromCounter(
            "kx_sipd_call_media_packets_lost",
            "RTP packets lost in ended calls, by leg (A client, B carrier).",
            ["leg"],
            registry=registry,
        )
        self.media_jitter = Histogram(
            "kx_sipd_call_media_jitter_ms",
            "Interarrival jitter of ended calls' RTP (RFC 3550), by leg.",
            ["leg"],
            buckets=(1, 2, 5, 10, 20, 30, 50, 100, 200),
            registry=registry,
        )
        self.store_seconds = Histogram(
            "kx_sipd_store_seconds",
            "Duration of the driver's store calls, by operation.",
            ["operation"],
            buckets=(
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2,
            ),
            registry=registry,
        )
        self.store_errors = PromCounter(
            "kx_sipd_store_errors",
            "Store calls that failed, by operation.",
            ["operation"],
            registry=registry,
        )
        registry.register(_Collector(self))

    # -- wiring ------------------------------------------------------------------------------

    def attach(
        self,
        *,
        snapshot: Callable[[], Snapshot] | None = None,
        relay: RelayMonitor | None = None,
        health: Callable[[], dict[str, bool]] | None = None,
    ) -> None:
        """What is read at scrape time: the loop's snapshot (raises TimeoutError when the
        loop is stuck), the relay monitor, and the health verdicts (``kx_sipd_up``)."""
        if snapshot is not None:
            self._snapshot = snapshot
        if relay is not None:
            self._relay = relay
        if health is not None:
            self._health = health

    def timed(self, store: AccountStore) -> TimedStore:
        """``store`` with every call timed; batched writes stay batched when the
        store offers them (a driver's writer thread looks for ``write_batch``)."""
        if callable(getattr(store, "write_batch", None)):
            return TimedBatchStore(store, self)
        return TimedStore(store, self)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started

    def render(self) -> bytes:
        """The Prometheus text format of everything."""
        return generate_latest(self.registry)

    def snapshot(self) -> Snapshot:
        """A fresh snapshot of the loop's figures. Raises TimeoutError, RuntimeError."""
        if self._snapshot is None:
            raise RuntimeError("the server is not serving yet")
        return self._snapshot()

    def relay_sample(self) -> RelaySample | None:
        return None if self._relay is None else self._relay.sample()

    # -- observers ---------------------------------------------------------------------------

    def observe_record(self, record: CallRecordData) -> None:
        """A call record as the driver performs it (the start record, then the final one)."""
        route = record.route or _NO_ROUTE
        ref = record.call_ref
        with self._lock:
            open_call = self._open.get(ref)
            figures = self._routes.get(route)
            if figures is None:
                figures = self._routes[route] = RouteFigures()
            if open_call is None:
                figures.attempts += 1
                self.attempts.labels(route).inc()
            if record.end_wall is None:
                if open_call is None:
                    if len(self._open) >= _MAX_OPEN_CALLS:
                        oldest = next(iter(self._open))
                        self._by_call_id.pop(self._open.pop(oldest).call_id, None)
                    self._open[ref] = _OpenCall(route, record.a_call_id, record.start_wall)
                    self._by_call_id[record.a_call_id] = ref
                    figures.up += 1
                    self.calls_up.labels(route).inc()
                return
            if open_call is not None:
                del self._open[ref]
                self._by_call_id.pop(open_call.call_id, None)
                figures.up -= 1
                self.calls_up.labels(route).dec()
                if open_call.answered:
                    return  # counted when the answer went out (observe_answer)
            if record.answer_wall is not None:
                self._answered(figures, route, record.answer_wall - record.start_wall)
            else:
                code = record.final_status or 0
                figures.failures[code] += 1
                self.failures.labels(route, str(code)).inc()

    def observe_answer(self, call_id: str, wall: float) -> None:
        """kx-sipd sent a 2xx to the INVITE of the call whose client leg is ``call_id``
        (``AnswerLog``): the answer and the set-up time count now, not when the call
        ends, which may be hours later. Repeats (retransmissions, re-INVITEs) and
        Call-IDs of no open call are ignored."""
        with self._lock:
            ref = self._by_call_id.get(call_id)
            open_call = None if ref is None else self._open.get(ref)
            if open_call is None or open_call.answered:
                return
            open_call.answered = True
            route = open_call.route
            figures = self._routes.setdefault(route, RouteFigures())
            self._answered(figures, route, wall - open_call.start_wall)

    def _answered(self, figures: RouteFigures, route: str, setup: float) -> None:
        figures.answers += 1
        self.answers.labels(route).inc()
        self.setup.labels(route).observe(max(0.0, setup))

    def observe_media(self, leg: str, stats: MediaStats | None) -> None:
        if stats is None:
            return
        self.media_lost.labels(leg).inc(max(0, stats.packets_lost))
        if stats.packets_in:
            self.media_jitter.labels(leg).observe(stats.jitter_ms)

    def routes(self) -> dict[str, RouteFigures]:
        """A copy of the per-route figures."""
        with self._lock:
            return {
                name: RouteFigures(f.up, f.attempts, f.answers, Counter(f.failures))
                for name, f in sorted(self._routes.items())
            }

    # -- collection --------------------------------------------------------------------------

    def _collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "kx_sipd_info", "Version and driver.", labels=["version", "driver"]
        )
        info.add_metric([self._info["version"], self._info["driver"]], 1)
        yield info
        yield GaugeMetricFamily("kx_sipd_uptime_seconds", "Seconds since start.", value=self.uptime)
        if self._health is not None:
            up = GaugeMetricFamily(
                "kx_sipd_up",
                "1 when the component is up (sip, store, relay).",
                labels=["component"],
            )
            for component, ok in self._health().items():
                up.add_metric([component], 1 if ok else 0)
            yield up
        snapshot: Snapshot | None
        try:
            snapshot = self.snapshot()
        except (TimeoutError, RuntimeError):
            snapshot = None  # kx_sipd_up{component="sip"} says why the SIP figures are missing
        if snapshot is not None:
            yield from _engine_families(snapshot)
        sample = self.relay_sample()
        if sample is not None:
            yield from _relay_families(sample)


class _Collector:
    """Adapts ``ServerMetrics._collect`` to prometheus_client's collector interface."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names are dynamic; nothing to check for duplicates

    def collect(self) -> Iterator[Metric]:
        return self._metrics._collect()


def _engine_families(snapshot: Snapshot) -> Iterator[Metric]:
    stats = snapshot.engine
    requests = CounterMetricFamily(
        "kx_sipd_sip_requests", "SIP requests received, by method.", labels=["method"]
    )
    responses = CounterMetricFamily(
        "kx_sipd_sip_responses",
        "SIP responses sent by the server, by status code.",
        labels=["code"],
    )
    answered = CounterMetricFamily(
        "kx_sipd_sip_answers",
        "SIP responses sent by the server, by the request's method and the status code"
        " (method 'malformed': a request answered 400/413/505... before it could be parsed).",
        labels=["method", "code"],
    )
    outcomes = CounterMetricFamily(
        "kx_sipd_auth_outcomes", "Digest authentication outcomes.", labels=["outcome"]
    )
    failures = CounterMetricFamily(
        "kx_sipd_auth_failures", "Failed authentications, by reason.", labels=["reason"]
    )
    rejected = CounterMetricFamily(
        "kx_sipd_calls_rejected", "Calls refused before the carrier, by status.", labels=["code"]
    )
    ended = CounterMetricFamily(
        "kx_sipd_calls_ended", "Calls ended, by who or what ended them.", labels=["ended_by"]
    )
    dropped = CounterMetricFamily(
        "kx_sipd_dropped", "Input dropped without an answer, by reason.", labels=["reason"]
    )
    events = CounterMetricFamily(
        "kx_sipd_engine_events", "Other engine counters, by name.", labels=["event"]
    )
    methods: Counter[str] = Counter()
    named: dict[str, int] = {}
    for key, value in sorted(stats.items()):
        prefix, _, rest = key.partition(".")
        if key in _SKIPPED:
            continue
        if key in _ENGINE_GAUGES or key in _ENGINE_NAMED:
            named[key] = value
        elif prefix == "requests_in" and rest:
            methods[rest if rest in KNOWN_METHODS else "other"] += value
        elif prefix == "responses_out" and rest:
            responses.add_metric([rest], value)
        elif prefix == "answered" and rest:
            method, _, code = rest.rpartition(".")
            answered.add_metric([method, code], value)
        elif prefix == "auth" and rest:
            outcomes.add_metric([rest], value)
        elif key.startswith("calls.rejected."):
            rejected.add_metric([key.removeprefix("calls.rejected.")], value)
        elif key.startswith("calls.ended."):
            ended.add_metric([key.removeprefix("calls.ended.")], value)
        elif key.startswith("dropped_"):
            dropped.add_metric([key.removeprefix("dropped_")], value)
        else:
            events.add_metric([key], value)
    for method, value in sorted(methods.items()):
        requests.add_metric([method], value)
    for reason in AUTH_FAILURES:
        # Every reason from the start, at 0 until it happens: rate() and alerts need the
        # series before the first failure, not only after it.
        failures.add_metric([reason], stats.get(f"auth.{reason}", 0))
    yield from (requests, responses, answered, outcomes, failures, rejected, ended, dropped, events)
    for key, (name, doc) in _ENGINE_GAUGES.items():
        yield GaugeMetricFamily(name, doc, value=named.get(key, 0))
    for key, (name, doc) in _ENGINE_NAMED.items():
        yield CounterMetricFamily(name, doc, value=named.get(key, 0))
    yield GaugeMetricFamily(
        "kx_sipd_bans", "Sources banned now (failed authentications).", value=len(snapshot.bans)
    )
    yield GaugeMetricFamily(
        "kx_sipd_shared_accounts",
        "Accounts in use from several addresses within their registration interval.",
        value=len(snapshot.shared),
    )
    driver = CounterMetricFamily(
        "kx_sipd_driver_events", "Driver counters (datagrams, TCP, drops ...).", labels=["event"]
    )
    for key, value in sorted(snapshot.driver.items()):
        if key not in ("tcp_connections", "records_pending"):
            driver.add_metric([key], value)
    yield driver
    yield GaugeMetricFamily(
        "kx_sipd_tcp_connections",
        "Open TCP connections.",
        value=snapshot.driver.get("tcp_connections", 0),
    )
    yield GaugeMetricFamily(
        "kx_sipd_records_pending",
        "Call records waiting for the store.",
        value=snapshot.driver.get("records_pending", 0),
    )


def _relay_families(sample: RelaySample) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "kx_sipd_relay_up", "1 when the relay answers.", value=1 if sample.up else 0
    )
    shard_up = GaugeMetricFamily(
        "kx_sipd_relay_shard_up", "1 when the shard answers.", labels=["shard"]
    )
    calls = GaugeMetricFamily("kx_sipd_relay_shard_calls", "Calls on the shard.", labels=["shard"])
    free = GaugeMetricFamily(
        "kx_sipd_relay_shard_free_pairs", "Free RTP/RTCP port pairs of the shard.", labels=["shard"]
    )
    restarts = GaugeMetricFamily(
        "kx_sipd_relay_shard_restarts", "Times the shard process was restarted.", labels=["shard"]
    )
    packets = CounterMetricFamily(
        "kx_sipd_relay_packets",
        "Packets relayed, by shard and direction.",
        labels=["shard", "direction"],
    )
    octets = CounterMetricFamily(
        "kx_sipd_relay_bytes",
        "Bytes relayed, by shard and direction.",
        labels=["shard", "direction"],
    )
    dropped = CounterMetricFamily(
        "kx_sipd_relay_dropped",
        "Packets dropped by the relay, by shard and reason.",
        labels=["shard", "reason"],
    )
    lost = GaugeMetricFamily(
        "kx_sipd_relay_packets_lost",
        "RTP packets lost in the shard's live calls.",
        labels=["shard"],
    )
    jitter = GaugeMetricFamily(
        "kx_sipd_relay_jitter_ms",
        "Interarrival jitter of the shard's live RTP streams (mean and max).",
        labels=["shard", "stat"],
    )
    for shard in sample.shards:
        index = str(shard["index"])
        shard_up.add_metric([index], 1 if shard["up"] else 0)
        if not shard["up"]:
            continue
        calls.add_metric([index], shard["calls"])
        free.add_metric([index], shard["free_pairs"])
        restarts.add_metric([index], shard["restarts"])
        for direction in ("in", "out"):
            packets.add_metric([index, direction], shard[f"packets_{direction}"])
            octets.add_metric([index, direction], shard[f"bytes_{direction}"])
        for reason, value in shard["dropped"].items():
            dropped.add_metric([index, reason], value)
        if "packets_lost" in shard:
            lost.add_metric([index], shard["packets_lost"])
            jitter.add_metric([index, "mean"], shard["jitter_ms_mean"])
            jitter.add_metric([index, "max"], shard["jitter_ms_max"])
    yield from (shard_up, calls, free, restarts, packets, octets, dropped, lost, jitter)


class AnswerLog:
    """The driver's log sink with ``ServerMetrics`` listening: the engine's
    ``call.answered`` event counts a call's answer and its set-up time when the 2xx
    goes out (call records come at a call's start and end only). Every entry is
    then passed on to ``log``; one string comparison per entry."""

    def __init__(self, metrics: ServerMetrics, log: Callable[[Log], None]) -> None:
        self._metrics = metrics
        self._log = log

    def __call__(self, entry: Log) -> None:
        if entry.event == "call.answered":
            call_id = dict(entry.fields).get("call_id")
            if isinstance(call_id, str):
                self._metrics.observe_answer(call_id, time.time())
        self._log(entry)


class TimedStore:
    """An ``AccountStore`` that times every call into ``metrics`` and passes it on.

    What the driver does with errors is unchanged: they are counted here and raised."""

    def __init__(self, store: AccountStore, metrics: ServerMetrics) -> None:
        self._store = store
        self._metrics = metrics

    def _timed(self, operation: str, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return call()
        except Exception:
            self._metrics.store_errors.labels(operation).inc()
            raise
        finally:
            self._metrics.store_seconds.labels(operation).observe(time.perf_counter() - start)

    def get_account(self, username: str) -> Account | None:
        account: Account | None = self._timed(
            "get_account", lambda: self._store.get_account(username)
        )
        return account

    def write_call_record(self, record: CallRecordData) -> None:
        self._timed("write_call_record", lambda: self._store.write_call_record(record))

    def attach_media_stats(
        self, call_ref: str, a_leg: MediaStats | None, b_leg: MediaStats | None
    ) -> None:
        self._timed(
            "attach_media_stats", lambda: self._store.attach_media_stats(call_ref, a_leg, b_leg)
        )
        self._metrics.observe_media("A", a_leg)
        self._metrics.observe_media("B", b_leg)


class TimedBatchStore(TimedStore):
    """A ``TimedStore`` for a store with ``write_batch`` (``kx_sipd.store.Store``).

    A batch is one transaction, so each write in it is observed under its own
    operation (``write_call_record``, ``attach_media_stats``) with the batch's
    time: how long that write took to become durable. A failed batch counts an
    error for each of its writes."""

    def write_batch(
        self, writes: Sequence[CallRecordData | tuple[str, MediaStats | None, MediaStats | None]]
    ) -> None:
        operations = [
            "write_call_record" if isinstance(item, CallRecordData) else "attach_media_stats"
            for item in writes
        ]
        start = time.perf_counter()
        try:
            self._store.write_batch(writes)  # type: ignore[attr-defined]
        except Exception:
            for operation in operations:
                self._metrics.store_errors.labels(operation).inc()
            raise
        finally:
            elapsed = time.perf_counter() - start
            for operation in operations:
                self._metrics.store_seconds.labels(operation).observe(elapsed)
        for item in writes:
            if not isinstance(item, CallRecordData):
                self._metrics.observe_media("A", item[1])
                self._metrics.observe_media("B", item[2])
