"""kx_sipd.metrics: call records into per-route counters and the set-up histogram, the
engine's snapshot into metric families, the store wrapper's timings, the relay monitor;
and docs/operations.md names every metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kx_sipd.metrics import (
    METRIC_NAMES,
    AnswerLog,
    RelayMonitor,
    ServerMetrics,
    Snapshot,
)
from sansio_sip import Account, CallRecordData, Log, MediaStats, StoreUnavailable

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(metrics: ServerMetrics) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def record(ref: str, route: str | None = "carrier", **fields: Any) -> CallRecordData:
    base = CallRecordData(
        call_ref=ref,
        account="alice",
        a_call_id=f"{ref}@client",
        b_call_id=None,
        source="192.0.2.1:5060",
        transport="UDP",
        user_agent="test",
        dialed="0044",
        sent_digits="0044",
        route=route,
        start_wall=1000.0,
    )
    return attrs.evolve(base, **fields)


def test_call_records_make_attempts_answers_failures_and_calls_up() -> None:
    metrics = ServerMetrics(driver="anyio", version="9.9")
    metrics.observe_record(record("c1"))
    metrics.observe_record(record("c2"))
    found = samples(metrics)
    assert value(found, "kx_sipd_call_attempts_total", route="carrier") == 2
    assert value(found, "kx_sipd_calls_up", route="carrier") == 2
    metrics.observe_record(record("c1", answer_wall=1002.5, end_wall=1010.0, final_status=200))
    metrics.observe_record(record("c2", end_wall=1001.0, final_status=486, ended_by="carrier"))
    # Rejected before the carrier: only a final record.
    metrics.observe_record(record("c3", route=None, end_wall=1000.0, final_status=403))
    found = samples(metrics)
    assert value(found, "kx_sipd_call_attempts_total", route="carrier") == 2
    assert value(found, "kx_sipd_call_attempts_total", route="none") == 1
    assert value(found, "kx_sipd_call_answers_total", route="carrier") == 1
    assert value(found, "kx_sipd_call_failures_total", route="carrier", code="486") == 1
    assert value(found, "kx_sipd_call_failures_total", route="none", code="403") == 1
    assert value(found, "kx_sipd_calls_up", route="carrier") == 0
    assert value(found, "kx_sipd_call_setup_seconds_count", route="carrier") == 1
    assert value(found, "kx_sipd_call_setup_seconds_sum", route="carrier") == pytest.approx(2.5)
    assert value(found, "kx_sipd_call_setup_seconds_bucket", route="carrier", le="3.0") == 1
    assert value(found, "kx_sipd_call_setup_seconds_bucket", route="carrier", le="2.0") == 0
    routes = metrics.routes()
    assert (routes["carrier"].attempts, routes["carrier"].answers, routes["carrier"].up) == (
        2,
        1,
        0,
    )
    assert routes["carrier"].failures == {486: 1}
    assert value(found, "kx_sipd_info", version="9.9", driver="anyio") == 1


def _snapshot(**engine: int) -> Snapshot:
    return Snapshot(
        engine=engine,
        driver={"udp_received": 7, "tcp_connections": 2, "records_pending": 1},
        active_calls=engine.get("calls_active", 0),
        bans=(("192.0.2.9", 300.0), ("192.0.2.10", 12.0)),
        shared=(("bob", ("192.0.2.1:5060", "192.0.2.2:5060")),),
        addresses=(("127.0.0.1", 5060),),
        wall=0.0,
    )


def _answer(call_id: str, cseq: str = "2 INVITE", status: str = "200 OK") -> bytes:
    """A 2xx as kx-sipd sends it, with an SDP body whose ``i=`` line must not be read
    as the compact Call-ID header."""
    body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.5\r\ns=-\r\ni=not-a-call-id\r\nt=0 0\r\n"
    return (
        f"SIP/2.0 {status}\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1\r\n"
        f"From: <sip:alice@sip.kx21.com>;tag=a\r\nTo: <sip:0044@sip.kx21.com>;tag=b\r\n"
        f"{call_id}\r\nCSeq: {cseq}\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_an_answer_counts_when_it_goes_out_not_when_the_call_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records come at a call's start and end; AnswerLog, the driver's log sink, sees
    the engine's call.answered event (the 2xx to the INVITE going out) and counts the
    answer and its set-up time then. Every entry still reaches the log."""
    metrics = ServerMetrics()
    logged: list[Log] = []
    sink = AnswerLog(metrics, logged.append)
    metrics.observe_record(record("c1"))  # a_call_id c1@client, started at 1000.0
    metrics.observe_record(record("c2"))
    clock = [1001.25]
    monkeypatch.setattr("kx_sipd.metrics.time.time", lambda: clock[0])

    def answered(call_id: str) -> Log:
        fields = (("call_ref", "r"), ("call_id", call_id), ("status", 200))
        return Log(level="info", event="call.answered", fields=fields)

    sink(Log(level="info", event="call.ended", fields=(("call_id", "c1@client"),)))
    sink(answered("elsewhere@client"))  # no such open call
    assert value(samples(metrics), "kx_sipd_call_answers_total", route="carrier") == 0
    sink(answered("c1@client"))
    clock[0] = 1009.0
    sink(answered("c1@client"))  # told again: counted once
    found = samples(metrics)
    assert value(found, "kx_sipd_call_answers_total", route="carrier") == 1
    assert value(found, "kx_sipd_call_setup_seconds_sum", route="carrier") == 1.25
    assert value(found, "kx_sipd_calls_up", route="carrier") == 2
    assert metrics.routes()["carrier"].answers == 1
    # The call's end does not count it again; a call not seen answered (a driver
    # without the log sink) is counted from its final record as before.
    metrics.observe_record(record("c1", answer_wall=1001.2, end_wall=1500.0, final_status=200))
    metrics.observe_record(record("c2", answer_wall=1003.0, end_wall=1500.0, final_status=200))
    found = samples(metrics)
    assert value(found, "kx_sipd_call_answers_total", route="carrier") == 2
    assert value(found, "kx_sipd_call_setup_seconds_count", route="carrier") == 2
    assert value(found, "kx_sipd_call_setup_seconds_sum", route="carrier") == 4.25
    # Ended calls are forgotten: a late event counts nothing.
    sink(answered("c1@client"))
    assert value(samples(metrics), "kx_sipd_call_answers_total", route="carrier") == 2
    assert len(logged) == 5  # every entry passed on


def test_engine_counters_become_labelled_families() -> None:
    metrics = ServerMetrics()
    stats = {
        "requests_in": 12,
        "requests_in.REGISTER": 6,
        "requests_in.INVITE": 4,
        "requests_in.FOO": 1,
        "requests_in.BAR": 1,
        "responses_out.401": 5,
        "responses_out.200": 5,
        "auth.accepted": 4,
        "auth.challenge": 5,
        "auth.bad-credentials": 2,
        "auth.unknown-user": 1,
        "auth.challenged": 5,
        "calls.started": 3,
        "calls.rejected.488": 1,
        "calls.ended.client": 2,
        "dropped_banned": 9,
        "bans_imposed": 1,
        "calls_active": 1,
        "transactions": 3,
        "bans": 99,
        "keepalives": 4,
        "answered.REGISTER.401": 4,
        "answered.INVITE.401": 1,
        "answered.malformed.400": 2,
    }
    metrics.attach(snapshot=lambda: _snapshot(**stats))
    found = samples(metrics)
    assert value(found, "kx_sipd_sip_requests_total", method="REGISTER") == 6
    assert value(found, "kx_sipd_sip_requests_total", method="other") == 2  # FOO and BAR
    assert value(found, "kx_sipd_sip_responses_total", code="401") == 5
    assert value(found, "kx_sipd_sip_answers_total", method="REGISTER", code="401") == 4
    assert value(found, "kx_sipd_sip_answers_total", method="INVITE", code="401") == 1
    assert value(found, "kx_sipd_sip_answers_total", method="malformed", code="400") == 2
    assert value(found, "kx_sipd_auth_outcomes_total", outcome="challenge") == 5
    assert value(found, "kx_sipd_auth_failures_total", reason="bad-credentials") == 2
    assert value(found, "kx_sipd_auth_failures_total", reason="unknown-user") == 1
    assert ("kx_sipd_auth_failures_total", (("reason", "challenge"),)) not in found
    # A reason that never happened is there at 0 (alerts on rate() need the series).
    assert found[("kx_sipd_auth_failures_total", (("reason", "source-not-allowed"),))] == 0
    assert value(found, "kx_sipd_auth_challenges_total") == 5
    assert value(found, "kx_sipd_calls_started_total") == 3
    assert value(found, "kx_sipd_calls_rejected_total", code="488") == 1
    assert value(found, "kx_sipd_calls_ended_total", ended_by="client") == 2
    assert value(found, "kx_sipd_dropped_total", reason="banned") == 9
    assert value(found, "kx_sipd_calls_active") == 1
    assert value(found, "kx_sipd_transactions") == 3
    assert value(found, "kx_sipd_bans") == 2  # live bans, not the engine's stale count
    assert value(found, "kx_sipd_shared_accounts") == 1
    assert value(found, "kx_sipd_engine_events_total", event="keepalives") == 4
    assert value(found, "kx_sipd_driver_events_total", event="udp_received") == 7
    assert value(found, "kx_sipd_tcp_connections") == 2
    assert value(found, "kx_sipd_records_pending") == 1
    names = {name for name, _labels in found}
    assert "kx_sipd_requests_in_total" not in names  # the sum is not repeated


def test_a_stuck_loop_leaves_out_the_engine_figures_but_not_the_rest() -> None:
    metrics = ServerMetrics()

    def stuck() -> Snapshot:
        raise TimeoutError("the driver loop did not answer")

    metrics.attach(snapshot=stuck, health=lambda: {"sip": False, "store": True, "relay": True})
    found = samples(metrics)
    assert value(found, "kx_sipd_up", component="sip") == 0
    assert value(found, "kx_sipd_up", component="store") == 1
    assert value(found, "kx_sipd_uptime_seconds") >= 0
    assert not any(name == "kx_sipd_calls_active" for name, _labels in found)


class _Store:
    def __init__(self) -> None:
        self.fail = False

    def get_account(self, username: str) -> Account | None:
        if self.fail:
            raise StoreUnavailable("locked")
        return Account(username=username)

    def write_call_record(self, record: CallRecordData) -> None:
        pass

    def attach_media_stats(self, call_ref: str, a: MediaStats | None, b: MediaStats | None) -> None:
        pass


def test_timed_store_times_every_call_counts_errors_and_sees_media_figures() -> None:
    metrics = ServerMetrics()
    store = _Store()
    timed = metrics.timed(store)
    assert timed.get_account("alice") == Account(username="alice")
    store.fail = True
    with pytest.raises(StoreUnavailable):
        timed.get_account("alice")
    timed.write_call_record(record("c1"))
    timed.attach_media_stats(
        "c1",
        MediaStats(packets_in=100, packets_lost=3, jitter_ms=4.5),
        MediaStats(packets_in=0, packets_lost=0),
    )
    found = samples(metrics)
    assert value(found, "kx_sipd_store_seconds_count", operation="get_account") == 2
    assert value(found, "kx_sipd_store_errors_total", operation="get_account") == 1
    assert value(found, "kx_sipd_store_seconds_count", operation="write_call_record") == 1
    assert value(found, "kx_sipd_call_media_packets_lost_total", leg="A") == 3
    assert value(found, "kx_sipd_call_media_jitter_ms_count", leg="A") == 1
    assert value(found, "kx_sipd_call_media_jitter_ms_count", leg="B") == 0  # no media, no jitter


class _BatchStore(_Store):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[object]] = []

    def write_batch(self, writes: list[object]) -> None:
        if self.fail:
            raise StoreUnavailable("disk full")
        self.batches.append(list(writes))


def test_a_batching_store_keeps_its_batches_and_each_write_is_observed() -> None:
    metrics = ServerMetrics()
    assert not hasattr(metrics.timed(_Store()), "write_batch")  # the driver looks for it
    store = _BatchStore()
    timed = metrics.timed(store)
    media = ("c1", MediaStats(packets_in=50, packets_lost=2, jitter_ms=1.5), None)
    timed.write_batch([record("c1"), media, record("c2")])
    assert store.batches == [[record("c1"), media, record("c2")]]
    found = samples(metrics)
    assert value(found, "kx_sipd_store_seconds_count", operation="write_call_record") == 2
    assert value(found, "kx_sipd_store_seconds_count", operation="attach_media_stats") == 1
    assert value(found, "kx_sipd_call_media_packets_lost_total", leg="A") == 2
    store.fail = True
    with pytest.raises(StoreUnavailable):
        timed.write_batch([record("c3"), media])
    found = samples(metrics)
    assert value(found, "kx_sipd_store_errors_total", operation="write_call_record") == 1
    assert value(found, "kx_sipd_store_errors_total", operation="attach_media_stats") == 1
    assert value(found, "kx_sipd_call_media_packets_lost_total", leg="A") == 2  # not written


class _RelayClient:
    def __init__(
        self, shards: list[dict[str, Any]] | Exception, calls: list[dict[str, Any]]
    ) -> None:
        self.shards, self.calls = shards, calls
        self.closed = False

    def shard_stats(self) -> list[dict[str, Any]]:
        if isinstance(self.shards, Exception):
            raise self.shards
        return self.shards

    def shard_calls(self, index: int) -> list[dict[str, Any]]:
        return self.calls

    def close(self) -> None:
        self.closed = True


def _shard(index: int, calls: int) -> dict[str, Any]:
    return {
        "index": index,
        "ok": True,
        "pid": 10 + index,
        "calls": calls,
        "free_pairs": 40,
        "restarts": 1,
        "rtp": [20000, 20099],
        "media": {"packets_in": 500, "packets_out": 490, "bytes_in": 86000, "dropped_foreign": 3},
    }


def _call(lost_a: int, jitter_a: float, lost_b: int, jitter_b: float) -> dict[str, Any]:
    return {
        "a": {"rtp": {"packets_in": 50, "packets_lost": lost_a, "jitter_ms": jitter_a}},
        "b": {"rtp": {"packets_in": 50, "packets_lost": lost_b, "jitter_ms": jitter_b}},
    }


def test_relay_monitor_reports_shards_loss_and_jitter_and_caches() -> None:
    made: list[_RelayClient] = []

    def factory() -> _RelayClient:
        client = _RelayClient(
            [_shard(0, 2), {"index": 1, "error": "no reply"}],
            [_call(2, 4.0, 1, 6.0), _call(0, 2.0, 0, 0.0)],
        )
        made.append(client)
        return client

    metrics = ServerMetrics()
    monitor = RelayMonitor(factory, max_age=60.0)
    metrics.attach(relay=monitor)
    sample = monitor.sample()
    assert sample.up and sample.error is None
    shard0, shard1 = sample.shards
    assert (shard0["packets_lost"], shard0["jitter_ms_max"]) == (3, 6.0)
    assert shard0["jitter_ms_mean"] == pytest.approx(3.0)
    assert shard1 == {"index": 1, "up": False, "error": "no reply"}
    found = samples(metrics)
    assert len(made) == 1 and made[0].closed  # one round per max_age, client closed
    assert value(found, "kx_sipd_relay_up") == 1
    assert value(found, "kx_sipd_relay_shard_up", shard="0") == 1
    assert value(found, "kx_sipd_relay_shard_up", shard="1") == 0
    assert value(found, "kx_sipd_relay_packets_total", shard="0", direction="in") == 500
    assert value(found, "kx_sipd_relay_dropped_total", shard="0", reason="foreign") == 3
    assert value(found, "kx_sipd_relay_packets_lost", shard="0") == 3
    assert value(found, "kx_sipd_relay_jitter_ms", shard="0", stat="max") == 6.0
    assert value(found, "kx_sipd_relay_shard_restarts", shard="0") == 1


def test_relay_monitor_down_when_the_relay_or_every_shard_is_silent() -> None:
    from sansio_sip import MediaUnavailable

    down = RelayMonitor(lambda: _RelayClient(MediaUnavailable("relay does not answer"), []))
    sample = down.sample()
    assert not sample.up and sample.error == "relay does not answer"
    silent = RelayMonitor(lambda: _RelayClient([{"index": 0, "error": "no reply"}], []))
    assert not silent.sample().up
    many = RelayMonitor(lambda: _RelayClient([_shard(0, 5000)], []), max_calls_listed=100)
    (shard,) = many.sample().shards
    assert shard["up"] and "packets_lost" not in shard  # totals only past the listing bound


def test_operations_page_lists_every_metric() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    missing = [name for name in METRIC_NAMES if f"`{name}`" not in text]
    assert not missing, f"docs/operations.md does not list {missing}"
