"""fuzz/fuzz_engine.py (the whole engine fed scripts of datagrams, stream
chunks, clock steps and back-end answers), run briefly in CI: over its seed
corpus from ../shared/testdata and scripted call flows, and under hypothesis
on random and mutated scripts (STYLE §9)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_harness_{name}", FUZZ / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


HARNESS = _load("fuzz_engine")
SEEDS: list[bytes] = HARNESS.seeds()


def test_the_seeds_come_from_the_vectors_and_reach_calls() -> None:
    vectors = len(list((TESTDATA / "rfc4475").glob("*.dat"))) + len(
        list((TESTDATA / "softphones").glob("*.sip"))
    )
    assert vectors >= 30
    assert len(SEEDS) >= 3 * vectors
    reached: set[str] = set()
    for seed in SEEDS:
        driver = HARNESS.Driver()
        driver.run(seed)
        reached.update(name for name, count in driver.engine.stats().items() if count)
    # The scripts reach the deep states, not only the 401 path.
    for counter in (
        "calls.answered", "calls.ended.client", "calls.ended.cancel", "calls.ended.carrier",
        "auth.accepted", "auth.bad-credentials", "bans_imposed", "answers_delayed",
        "responses_out.400",
    ):  # fmt: skip
        assert counter in reached, counter


@pytest.mark.parametrize("index", range(len(SEEDS)))
def test_each_seed_holds_the_invariant(index: int) -> None:
    HARNESS.one_input(SEEDS[index])


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.binary(max_size=2048))
def test_random_scripts_hold_the_invariant(data: bytes) -> None:
    HARNESS.one_input(data)


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)), max_size=6),
)
def test_mutated_seeds_hold_the_invariant(seed: bytes, edits: list[tuple[int, bytes]]) -> None:
    data = bytearray(seed)
    for position, chunk in edits:
        at = position % (len(data) + 1)
        data[at : at + len(chunk)] = chunk
    HARNESS.one_input(bytes(data))


def test_the_harness_reports_a_broken_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: an engine that kept one transaction for ever is caught."""
    original = HARNESS.Engine.stats

    def leaky(self: object) -> dict[str, int]:
        stats = original(self)
        stats["transactions"] += 1
        return stats

    monkeypatch.setattr(HARNESS.Engine, "stats", leaky)
    with pytest.raises(AssertionError):
        HARNESS.one_input(SEEDS[0])


def test_records_round_trip() -> None:
    script = HARNESS.record(0, b"abc", select=5) + HARNESS.record(2, length=150)
    script += HARNESS.record(1, b"x" * 10, select=2)
    assert list(HARNESS.records(script)) == [
        (5 << 3, 3, b"abc"),
        (2, 150, b""),
        (17, 10, b"x" * 10),
    ]


def test_a_carrier_silent_after_ringing_leaves_no_transaction() -> None:
    """Found by fuzz/fuzz_engine.py (5-minute run, drain check): INVITE with
    valid credentials, the carrier answers 180 Ringing and then nothing."""
    invite = HARNESS._request("INVITE", f"sip:17752180264@{HARNESS.REALM}", body=HARNESS.OFFER)
    script = HARNESS.record(HARNESS.KIND_AUTH, invite) + HARNESS.record(
        HARNESS.KIND_CARRIER_ANSWER, select=1
    )
    HARNESS.one_input(script)


def _whole_call(invite: bytes) -> bytes:
    """A script for one call: authenticated INVITE, carrier answers 200, the
    client ACKs and hangs up, the carrier answers the BYE, six seconds pass."""
    return (
        HARNESS.record(HARNESS.KIND_AUTH, invite)
        + HARNESS.record(HARNESS.KIND_CARRIER_ANSWER, select=3)
        + HARNESS.record(HARNESS.KIND_FOLLOW_UP, select=0)
        + HARNESS.record(HARNESS.KIND_FOLLOW_UP, select=1)
        + HARNESS.record(HARNESS.KIND_CARRIER_ANSWER, select=3)
        + HARNESS.record(HARNESS.KIND_TIME, length=6000)
    )


def _run(driver: object, script: bytes) -> None:
    for control, length, payload in HARNESS.records(script):
        driver.step(control, length, payload)  # type: ignore[attr-defined]


def test_call_start_times_do_not_pile_up() -> None:
    """Found while looking for the soak's memory growth: one float per call
    per account, never trimmed when the account has no calls-per-second limit."""
    driver = HARNESS.Driver()
    invite = HARNESS._request("INVITE", f"sip:17752180264@{HARNESS.REALM}", body=HARNESS.OFFER)
    for i in range(20):
        _run(driver, _whole_call(invite.replace(b"seed-invite", b"pile%d" % i)))
    assert driver.engine.stats()["calls.ended.client"] >= 10
    assert len(driver.engine._calls._recent_starts.get("alice", ())) <= 2


def test_ended_calls_are_not_held_by_their_timers() -> None:
    """Found by bench/soak.py (RSS +78 % in 10 minutes): every call ended
    normally is kept alive, ladder, transactions and all, by its hang-up
    deadline in the call timer heap."""
    import attrs

    config = attrs.evolve(HARNESS.CONFIG, max_call_duration=4 * 3600.0)
    driver = HARNESS.Driver(config)
    invite = HARNESS._request("INVITE", f"sip:17752180264@{HARNESS.REALM}", body=HARNESS.OFFER)
    # One call stays up (as on any busy server): its deadlines sit at the top of the heap.
    long_call = (
        HARNESS.record(HARNESS.KIND_AUTH, invite.replace(b"seed-invite", b"long"))
        + HARNESS.record(HARNESS.KIND_CARRIER_ANSWER, select=3)
        + HARNESS.record(HARNESS.KIND_FOLLOW_UP, select=0)
    )
    _run(driver, long_call)
    for i in range(10):
        _run(driver, _whole_call(invite.replace(b"seed-invite", b"held%d" % i)))
    stats = driver.engine.stats()
    assert stats["calls.ended.client"] >= 5, stats
    calls = driver.engine._calls
    held = [entry for entry in calls._timers if not isinstance(entry[2], str)]
    assert not held, f"{len(held)} call objects referenced by the timer heap"
    assert len(calls._timers) <= 4 * len(calls._calls) + 64  # stale refs are compacted
