"""Credential sharing (issue 8 §5): one account from several devices."""

from __future__ import annotations

from engine_harness import Harness, Phone, account, parsed, statuses

from sansio_sip._devices import DeviceTracker
from sansio_sip._message import Response


def test_a_second_address_within_the_interval_is_a_second_device() -> None:
    devices = DeviceTracker(interval=300)
    assert devices.seen("acme", "192.0.2.1", now=0) == []
    assert devices.seen("acme", "192.0.2.1", now=10) == []  # same device, re-registering
    assert devices.seen("acme", "198.51.100.9", now=20) == ["192.0.2.1"]
    assert devices.shared(now=30) == [("acme", ("192.0.2.1", "198.51.100.9"))]
    assert devices.shared(now=400) == []  # both went quiet
    assert devices.seen("acme", "203.0.113.5", now=700) == []


def test_unregistering_forgets_the_device_and_tables_are_bounded() -> None:
    devices = DeviceTracker(interval=300, capacity=10, per_account=2)
    devices.seen("acme", "192.0.2.1", now=0)
    devices.forget("acme", "192.0.2.1")
    assert devices.seen("acme", "192.0.2.2", now=1) == []
    for i in range(100):
        devices.seen(f"user{i}", "192.0.2.1", now=2)
        devices.seen("acme", f"10.0.0.{i}", now=2)
    assert len(devices) <= 10
    assert len(devices.others("acme", "x", now=2)) <= 2


def _register(h: Harness, phone: Phone, source: tuple[str, int]) -> int:
    challenge = parsed(h.receive(phone.request("REGISTER"), source=source))[-1]
    assert isinstance(challenge, Response)
    phone.cseq += 1
    [code] = statuses(h.receive(phone.authorize(phone.request("REGISTER"), challenge),
                                source=source))
    return code


def test_engine_counts_sharing_and_can_refuse_the_second_device() -> None:
    h = Harness.make(account())
    assert _register(h, Phone(call_id="a@x"), ("192.0.2.1", 5060)) == 200
    assert _register(h, Phone(call_id="b@x"), ("198.51.100.9", 5060)) == 200
    assert h.engine.stats()["accounts_shared"] == 1
    assert h.engine.shared_accounts(now=h.now) == [("acme", ("192.0.2.1", "198.51.100.9"))]
    assert any(log.event == "account.shared" for log in h.logs)

    strict = Harness.make(account(), one_device_per_account=True)
    assert _register(strict, Phone(call_id="a@x"), ("192.0.2.1", 5060)) == 200
    assert _register(strict, Phone(call_id="b@x"), ("198.51.100.9", 5060)) == 403
    assert _register(strict, Phone(call_id="c@x"), ("192.0.2.1", 5061)) == 200  # same device
    assert strict.engine.stats()["refused_second_device"] == 1
    [refusal] = [log for log in strict.logs if log.event == "account.second_device_refused"]
    assert refusal.level == "warning"
    assert dict(refusal.fields) == {
        "account": "acme",
        "source": "198.51.100.9",
        "method": "REGISTER",
        "others": "192.0.2.1",
    }


def test_the_engine_says_when_it_stops_accepting_calls() -> None:
    h = Harness.make(account())
    assert h.engine.accepting
    h.engine.stop_accepting(now=h.now, wall=h.wall)
    assert not h.engine.accepting
